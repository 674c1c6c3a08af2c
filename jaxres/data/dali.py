"""JPEG decoding with NVIDIA DALI (`--config.input.decoder=dali`), an optional extra.

    pip install -e ".[dali]"        # nvidia-dali-cuda130

grain still decides everything random, so a batch stays a pure function of
(seed, batch index): resuming, worker counts and multi-host sharding behave
exactly as with the CPU decoder. Per example, a grain transform here
(`TrainCrops`, `EvalCrops`) only reads the image size from the header and
draws the crop box and flip with the same RNG calls as
`transforms.TrainTransform` / `EvalTransform`; it passes on the encoded bytes.
`DaliDecoder` then decodes just that window of every image of the batch
(`decoders.image_slice`: nvJPEG / the hardware JPEG engines on a GPU, DALI's
CPU threads without one), resizes it (linear, antialiased when shrinking) and
flips it. Same geometry as the CPU path; pixels differ slightly (another IDCT
and resize filter, no DCT-reduced decoding). DALI offers no IDCT choice (nvJPEG,
the hardware engines and its CPU backend pick their own), so `input.train_dct` /
`input.eval_dct` apply only to the CPU fallback below: for PIL's exact pixels,
evaluate with `input.decoder=cpu`.

A batch DALI cannot decode (a damaged file) is decoded on the CPU instead,
example by example with the same boxes, and undecodable images become
masked black ones, as with the CPU decoder. `truncated="skip"` masks a
truncated JPEG in the grain worker already (the same end-of-image check as the
CPU path); other truncated files, and every one with "keep", are decoded as far
as their data goes (by DALI or the CPU fallback). Colour jitter and 10-crop exist
only on the CPU path. Decoded batches are returned as host numpy arrays and
then placed on the devices like any other batch (one uint8 copy each way,
150 KB per 224x224 image); DALI runs on the process's first local GPU.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from jaxres.data import decode, transforms
from jaxres.errors import ConfigError, unknown_name

log = logging.getLogger(__name__)

DECODERS = ("cpu", "dali")
# Decoding work DALI gives the A100 / H100 hardware JPEG engines (the rest: CUDA nvJPEG).
HW_DECODER_LOAD = 0.75


_PLACEHOLDER = np.frombuffer(decode.PLACEHOLDER_JPEG, np.uint8)  # Unreadable records (masked).


def _spec(record: dict[str, Any], box: decode.Box | None, flip: bool, size: tuple[int, int]) -> dict:
    if box is None:
        jpeg, box, mask, label = _PLACEHOLDER, (0, 0, 8, 8), 0.0, 0
    else:
        jpeg, mask, label = np.frombuffer(record["image"], np.uint8), 1.0, record["label"]
    x0, y0, x1, y1 = transforms.pixel_window(box, *size)
    return {
        "jpeg": jpeg,
        "box": np.asarray(box, np.float64),  # Exact, for the CPU fallback.
        "window": np.asarray([x0, y0, x1 - x0, y1 - y0], np.int32),  # Whole pixels, for DALI.
        "flip": np.int32(flip),
        "key": str(record.get("key", "?")),
        "label": np.int32(label),
        "mask": np.float32(mask),
    }


def _header(record: dict[str, Any], truncated: str = "keep") -> tuple[int, int] | None:
    try:
        image = record["image"]
        if truncated == "skip" and image[:2] == b"\xff\xd8" and decode.jpeg_truncated(image):
            raise decode.TruncatedImageError("truncated file (input.truncated=skip)")
        return decode.image_size(image)
    except Exception as e:  # noqa: BLE001 - any unreadable header is skipped, not fatal.
        log.warning("Skipping undecodable image %s: %s", record.get("key", "?"), e)
        return None


class TrainCrops:
    """grain `random_map`: the random-resized-crop box and flip of `TrainTransform`, not decoded."""

    def __init__(self, min_area: float = 0.08, flip: bool = True, truncated: str = "keep"):
        self.area_range = (min_area, 1.0)
        self.flip = flip
        self.truncated = decode.check_truncated(truncated)

    def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        size = _header(record, self.truncated)
        if size is None:
            return _spec(record, None, False, (8, 8))
        box = transforms.random_resized_crop_box(*size, rng, self.area_range)
        return _spec(record, box, self.flip and rng.random() < 0.5, size)


class EvalCrops:
    """grain `map`: the centre-crop box of `EvalTransform`, not decoded."""

    def __init__(self, crop_ratio: float = transforms.EVAL_CROP_RATIO, truncated: str = "keep"):
        self.crop_ratio = crop_ratio
        self.truncated = decode.check_truncated(truncated)

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        size = _header(record, self.truncated)
        if size is None:
            return _spec(record, None, False, (8, 8))
        return _spec(record, transforms.center_crop_box(*size, self.crop_ratio), False, size)


def collate(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """grain `batch_fn`: stacks every field but the variable-length JPEG bytes and keys (lists)."""
    batch = {k: np.stack([e[k] for e in examples]) for k in ("box", "window", "flip", "label", "mask")}
    batch["jpeg"] = [e["jpeg"] for e in examples]
    batch["key"] = [e["key"] for e in examples]
    return batch


def check_available() -> None:
    """Raises a ConfigError naming the install command when DALI is missing."""
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"config.input.decoder='dali' needs NVIDIA DALI ({e}); pip install -e '.[dali]' "
            "or use --config.input.decoder=cpu."
        ) from None


def check_decoder(config: Any) -> None:
    """Fails early, naming the fix, on a `config.input.decoder` that cannot run with these keys."""
    decoder = config.input.decoder
    if decoder not in DECODERS:
        raise ConfigError(unknown_name("config.input.decoder", decoder, DECODERS))
    if decoder == "dali":
        check_available()
        if config.augment.color_jitter:
            raise ConfigError(
                "config.augment.color_jitter runs only on the CPU decoder; set "
                "--config.input.decoder=cpu or --config.augment.color_jitter=0."
            )


class DaliDecoder:
    """Decodes `collate`d batches of crop specs into {"image", "label", "mask"} numpy batches.

    Args:
      image_size: output side.
      batch_size: examples per batch (this process's rows).
      num_threads: DALI CPU threads.
      device_id: the GPU to decode on; None decodes on the CPU (tests, CPU hosts).
      dct: the IDCT of the CPU fallback for a batch DALI cannot decode ("accurate" | "fast").
    """

    def __init__(
        self,
        image_size: int,
        batch_size: int,
        num_threads: int = 4,
        device_id: int | None = None,
        dct: str = "accurate",
    ):
        check_available()
        from nvidia.dali import fn, pipeline_def, types

        self.image_size, self.batch_size, self.dct = image_size, batch_size, decode.check_dct(dct)
        mixed = device_id is not None
        decoder_args = {"device": "mixed", "hw_decoder_load": HW_DECODER_LOAD} if mixed else {"device": "cpu"}

        @pipeline_def(batch_size=batch_size, num_threads=num_threads, device_id=device_id, prefetch_queue_depth=1)
        def crop_pipeline():
            jpegs = fn.external_source(name="jpeg", dtype=types.UINT8)
            window = fn.external_source(name="window", dtype=types.INT32)
            flip = fn.external_source(name="flip", dtype=types.INT32)
            images = fn.decoders.image_slice(
                jpegs,
                window[0:2],
                window[2:4],
                output_type=types.RGB,
                axis_names="WH",
                adjust_orientation=False,  # As the CPU path: pixels as stored, EXIF ignored.
                **decoder_args,
            )
            images = fn.resize(
                images, resize_x=image_size, resize_y=image_size, interp_type=types.INTERP_LINEAR, antialias=True
            )
            return fn.flip(images, horizontal=flip)

        self.pipeline = crop_pipeline()
        self.pipeline.build()

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        try:
            images = self._decode(batch)
        except RuntimeError as e:  # DALI names the file it could not decode in `e`.
            log.warning("DALI could not decode a batch (%s); decoding it on the CPU.", str(e).splitlines()[0])
            return self._decode_on_cpu(batch)
        return {"image": images, "label": batch["label"], "mask": batch["mask"]}

    def _decode(self, batch: dict[str, Any]) -> np.ndarray:
        self.pipeline.feed_input("jpeg", batch["jpeg"])
        self.pipeline.feed_input("window", list(batch["window"]))
        self.pipeline.feed_input("flip", list(batch["flip"]))
        (images,) = self.pipeline.run()
        if hasattr(images, "as_cpu"):
            images = images.as_cpu()
        return images.as_array()

    def _decode_on_cpu(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        """The same crops through the CPU decoder; what it cannot decode either is masked."""
        size = (self.image_size, self.image_size)
        images, masks = [], batch["mask"].copy()
        for i, (jpeg, crop, flip) in enumerate(zip(batch["jpeg"], batch["box"], batch["flip"])):
            record = {"image": jpeg.tobytes(), "key": batch["key"][i], "label": batch["label"][i]}
            try:
                array, box = decode.decode_for_crop(
                    record["image"],
                    lambda w, h, b=tuple(crop): b,
                    lambda box: size,
                    record["key"],
                    dct=self.dct,
                )
                image = transforms.crop_resize(array, box, size)
                images.append(transforms.flip_left_right(image) if flip else image)
            except Exception as e:  # noqa: BLE001 - as the CPU transforms: skip, never stop.
                images.append(decode.skipped(record, size + (3,), e)["image"])
                masks[i] = 0
        return {"image": np.stack(images), "label": batch["label"], "mask": masks}


def decode_batches(
    batches: Iterator[dict[str, Any]],
    image_size: int,
    batch_size: int,
    num_threads: int | None = None,
    dct: str = "accurate",
) -> Iterator[dict[str, np.ndarray]]:
    """Decodes an iterator of crop-spec batches; on the first local GPU when JAX has one.

    `num_threads` (DALI's CPU threads) defaults to the host's cores, at most 8; `dct` is the
    CPU fallback's IDCT (`DaliDecoder`).
    """
    import jax

    num_threads = num_threads or min(8, os.cpu_count() or 1)
    gpus = [d for d in jax.local_devices() if d.platform == "gpu"]
    device = gpus[0].local_hardware_id if gpus else None
    decoder = DaliDecoder(image_size, batch_size, num_threads, device, dct)
    for batch in batches:
        yield decoder(batch)
