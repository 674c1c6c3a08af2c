"""Host batches for training and evaluation, and the evaluation views (centre, flip, 10-crop).

    batches = train_micro_batches(config, source, start)        # [A, B_local, ...] per step, endless
    num, batches = device_eval_batches(source, transform, 128, mesh)   # padded + masked, on the mesh

Training and evaluation read through `jaxres.data.pipeline` (grain): the decode
happens in its workers (`input.decoder="cpu"`), or the workers only draw the
crop windows and NVIDIA DALI decodes them (`"dali"`, `jaxres.data.dali`).
Evaluation pads the split to whole global batches with masked copies, so every
example counts exactly once on any number of devices and processes.

Both iterators close their grain pipeline (its worker processes) when they end
or are closed: a caller that stops early calls `.close()` on them (garbage
collection and interpreter exit do it too, later). `input.truncated` ("keep"
| "skip") reaches every CPU transform, and the IDCT (`input.train_dct` for training,
the evaluation preprocessing's for the views) every CPU decode, DALI's CPU
fallback included (DALI's own decoders have no IDCT choice).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Generator, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxres import parallel
from jaxres.data import dali, decode, pipeline, transforms
from jaxres.errors import ConfigError, unknown_name

VIEWS = {"center": 1, "flip": 2, "10crop": 10}  # View name -> views per image.


def train_transform(config: ml_collections.ConfigDict) -> Callable[[dict, np.random.Generator], dict]:
    """The host augmentation of `config.augment` at `config.dataset.image_size`, decoded as
    `config.input` says (for the configured decoder)."""
    input, augment = config.input, config.augment  # noqa: A001 - the config section's name.
    decode.check_dct(input.train_dct, "input.train_dct")
    if input.decoder == "dali":
        if augment.randaugment:  # DALI decodes on the device after the workers; no PIL ops there.
            raise ConfigError(
                "config.augment.randaugment runs on the CPU decoder only; set --config.input.decoder=cpu."
            )
        return dali.TrainCrops(augment.crop_min_area, augment.flip, input.truncated)
    return transforms.TrainTransform(
        config.dataset.image_size,
        augment.crop_min_area,
        augment.flip,
        augment.color_jitter,
        decode_reduced=input.decode_reduced,
        truncated=input.truncated,
        randaugment=augment.randaugment,
        dct=input.train_dct,
    )


def view_transform(
    image_size: int,
    crop_ratio: float,
    views: str = "center",
    decoder: str = "cpu",
    decode_reduced: bool = True,
    truncated: str = "keep",
    dct: str = "accurate",
) -> Callable[[dict], dict]:
    """The evaluation transform for `views`: "center", "flip" (centre + mirror) or "10crop".

    `truncated` is `config.input.truncated` ("keep" or "skip" a truncated image), `dct`
    `config.input.eval_dct` (the JPEG inverse DCT of the CPU decoder).
    """
    if views not in VIEWS:
        raise ConfigError(unknown_name("views", views, VIEWS))
    decode.check_truncated(truncated)
    decode.check_dct(dct)
    if decoder == "dali":
        if views != "center":
            raise ConfigError(f"views={views!r} runs on the CPU decoder only; set --config.input.decoder=cpu.")
        return dali.EvalCrops(crop_ratio, truncated)
    if views == "10crop":
        return transforms.TenCropTransform(image_size, crop_ratio, decode_reduced, truncated, dct)
    centre = transforms.EvalTransform(image_size, crop_ratio, decode_reduced, truncated, dct)
    return centre if views == "center" else CentreAndMirror(centre)


class CentreAndMirror:
    """The centre crop and its mirror image, stacked [2, H, W, 3] (a grain map callable)."""

    def __init__(self, centre: Callable[[dict], dict]):
        self.centre = centre

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        example = self.centre(record)
        example["image"] = np.stack([example["image"], np.ascontiguousarray(example["image"][:, ::-1])])
        return example


def _closing(iterator: Iterator, batches: Any) -> Generator:
    """`iterator`, closing `batches` (a grain pipeline it reads) when it ends or is closed."""
    try:
        yield from iterator
    finally:
        batches.close()


def _decoded(
    batches: Any, decoder: str, image_size: int, global_batch_size: int, dct: str
) -> Iterator:
    if decoder == "dali":
        local = parallel.process_batch_size(global_batch_size)
        return _closing(dali.decode_batches(batches, image_size, local, dct=dct), batches)
    return batches


def train_host_batches(
    config: ml_collections.ConfigDict, source: Any, global_batch_size: int, start: int = 0
) -> Iterator[dict[str, np.ndarray]]:
    """This process's decoded uint8 training batches of `source` from batch `start` on (endless).

    The iterator has `close()`, which stops the grain worker processes.
    """
    d = config.input
    batches = pipeline.train_batches(
        source,
        train_transform(config),
        global_batch_size=global_batch_size,
        seed=config.seed,
        start=start,
        num_workers=d.num_workers,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        batch_fn=dali.collate if d.decoder == "dali" else None,
        repeated_aug=config.augment.repeated_aug,
    )
    return _decoded(batches, d.decoder, config.dataset.image_size, global_batch_size, d.train_dct)


def train_micro_batches(config: ml_collections.ConfigDict, source: Any, start: int) -> Iterator[dict[str, np.ndarray]]:
    """This process's training micro-batches, grouped [A, B_local, ...] per step (A = grad_accum_steps).

    Args:
      config: the training config.
      source: the training source.
      start: the first micro-batch index (a checkpoint's `data_position`).
    """
    # Built now, not on the first step: a bad dataset config (input.truncated) fails at once.
    batches = train_host_batches(config, source, config.batch_size // config.grad_accum_steps, start)
    return _grouped(batches, config.grad_accum_steps)


def _grouped(batches: Any, size: int) -> Generator:
    try:
        while True:
            group = [next(batches) for _ in range(size)]
            yield jax.tree.map(lambda *x: np.stack(x), *group)
    finally:  # Closing this generator (or its garbage collection) stops the workers.
        batches.close()


def device_eval_batches(
    source: Any,
    transform: Callable[[dict], dict],
    global_batch_size: int,
    mesh: jax.sharding.Mesh,
    *,
    num_workers: int = 0,
    decoder: str = "cpu",
    image_size: int = 0,
    name: str = "eval_batch_size",
    dct: str = "accurate",
) -> tuple[int, Iterator[dict[str, jax.Array]]]:
    """(number of batches, global device batches) covering `source` once, padded and masked.

    Args:
      source: a random-access source.
      transform: from `view_transform` (its decoder must match `decoder`).
      global_batch_size: a multiple of the mesh's device count (checked; `name` is quoted).
      mesh: the batches are sharded over its `data` axis.
      num_workers: grain worker processes.
      decoder: "cpu" or "dali" (then `image_size` is DALI's output size, and `dct` the IDCT of
        its CPU fallback for a batch DALI cannot decode).
    """
    parallel.check_batch_size(global_batch_size, mesh, name)
    batches = pipeline.eval_batches(
        source,
        transform,
        global_batch_size=global_batch_size,
        num_workers=num_workers,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        batch_fn=dali.collate if decoder == "dali" else None,
    )
    batches = _decoded(batches, decoder, image_size, global_batch_size, dct)
    num = pipeline.num_eval_batches(len(source), global_batch_size)
    return num, _closing(itertools.islice(parallel.prefetch_to_device(batches, mesh), num), batches)
