"""A run's evaluation and inference preprocessing, derived once from its config.

    prep = preprocessing.of(config)                   # a run's config (training's or config.json)
    transform = prep.views_transform("10crop")        # grain map: record -> uint8 views
    num, batches = prep.device_batches(source, "center", 256, mesh)

Every reader of a run's pixels goes through here: validation during training,
`scripts/evaluate.py` (centre crop and 10-crop, ensembles), `predict.py`, the
feature pass of the transfer protocols and `transfer.py`, and the input
description of an exported model. Deriving it in one place (timm's
`resolve_data_config`) is what keeps them on the same pixels: before, only
training passed `decode_reduced`, so a run with it off was validated on other
pixels than evaluation and the probes saw.

What it holds: the evaluation side (`dataset.eval_image_size`, or the training
`image_size`), the crop ratio (resize the shorter side to size / ratio, then
crop), the channel mean / std applied on the device, the resampling, and the
decoding keys (`input.decoder`, `input.decode_reduced`, `input.truncated`,
`input.eval_dct`). The IDCT is part of it: "accurate" (the default, also for a run
saved before the key existed) gives PIL's pixels, so a model imported from timm or
torchvision is evaluated here on the pixels its published accuracy was measured on;
`description()` holds it, so a feature cache made with the other IDCT is not reused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections

from jaxres.data import loader

# What `transforms.crop_resize` does: bilinear, area averaging when it shrinks 2x or more.
INTERPOLATION = "bilinear"


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How evaluation and inference turn a stored image into the model's input (hashable).

    Attributes:
      image_size: the side of the square crop the model sees.
      crop_ratio: the shorter side is resized to `image_size / crop_ratio`, then cropped.
      mean / std: per-channel statistics in uint8 units, applied on the device.
      interpolation: the resampling (descriptive: what the transforms do).
      decoder: "cpu" (the grain workers decode) or "dali".
      decode_reduced: JPEGs decoded at 1/2, 1/4, 1/8 size when the crop still covers the output.
      truncated: "keep" or "skip" a truncated JPEG.
      dct: the JPEG inverse DCT, "accurate" (PIL's pixels) or "fast" (`decode.DCT_METHODS`).
    """

    image_size: int
    crop_ratio: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    decoder: str
    decode_reduced: bool
    truncated: str
    dct: str

    def views_transform(self, views: str = "center") -> Callable[[dict], dict]:
        """The grain map for `views` ("center", "flip" or "10crop"): record -> uint8 views."""
        return loader.view_transform(
            self.image_size,
            self.crop_ratio,
            views,
            self.decoder,
            self.decode_reduced,
            self.truncated,
            self.dct,
        )

    def device_batches(
        self,
        source: Any,
        views: str,
        global_batch_size: int,
        mesh: jax.sharding.Mesh,
        num_workers: int = 0,
        name: str = "eval_batch_size",
    ) -> tuple[int, Iterator[dict[str, jax.Array]]]:
        """(number of batches, padded + masked global batches) of `source`'s `views`, on `mesh`."""
        return loader.device_eval_batches(
            source,
            self.views_transform(views),
            global_batch_size,
            mesh,
            num_workers=num_workers,
            decoder=self.decoder,
            image_size=self.image_size,
            name=name,
            dct=self.dct,
        )

    def description(self) -> dict[str, Any]:
        """The JSON a cache key, an export's metadata or a results file records."""
        d = dataclasses.asdict(self)
        d.update(mean=[float(v) for v in self.mean], std=[float(v) for v in self.std])
        d.update(image_size=int(self.image_size), crop_ratio=float(self.crop_ratio))
        return d


def eval_image_size(dataset: ml_collections.ConfigDict) -> int:
    """The side evaluation crops to: `dataset.eval_image_size`, or the training `image_size` when 0."""
    return dataset.eval_image_size or dataset.image_size


def of(config: ml_collections.ConfigDict, image_size: int = 0, crop_ratio: float = 0.0) -> Preprocessing:
    """The evaluation preprocessing of a run's `config`.

    Args:
      config: a training config (or a run's config.json read by `runs.read_config`).
      image_size: a side to use instead of the run's (0: the run's evaluation size).
      crop_ratio: a crop ratio to use instead of the run's `dataset.eval_crop_ratio` (0: the run's).
    """
    d = config.dataset
    return Preprocessing(
        image_size=int(image_size or eval_image_size(d)),
        crop_ratio=float(crop_ratio or d.eval_crop_ratio),
        mean=tuple(float(v) for v in d.mean),
        std=tuple(float(v) for v in d.std),
        interpolation=INTERPOLATION,
        decoder=config.input.decoder,
        decode_reduced=bool(config.input.decode_reduced),
        truncated=config.input.truncated,
        dct=config.input.eval_dct,
    )


def write_into(prep: Preprocessing, config: ml_collections.ConfigDict) -> None:
    """Sets `config`'s keys so that `of(config) == prep` (a run written from features, e.g. a
    probe export, is then evaluated on the pixels its features came from)."""
    d = config.dataset
    d.image_size, d.eval_image_size, d.eval_crop_ratio = prep.image_size, 0, prep.crop_ratio
    d.mean, d.std = prep.mean, prep.std
    i = config.input
    i.decoder, i.decode_reduced, i.truncated = prep.decoder, prep.decode_reduced, prep.truncated
    i.eval_dct = prep.dct
