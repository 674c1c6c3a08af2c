"""Decoding and augmentation on the host; images leave here as uint8 NHWC.

Normalisation (mean / std) happens on the device, inside the jitted step.
A record that cannot be decoded becomes a black image with `mask = 0` and is
logged with its key, so a corrupt file never stops an epoch and never counts.
"""

from __future__ import annotations

import io
import logging
import math
from typing import Any

import numpy as np
from PIL import Image

# Inception-style random-resized-crop constants (Szegedy et al. 2015).
RRC_RATIO_RANGE = (3 / 4, 4 / 3)
RRC_ATTEMPTS = 10
EVAL_CROP_RATIO = 0.875  # resize to size / 0.875 (256 for 224), then centre-crop.


def decode(image_bytes: bytes) -> Image.Image:
    """Decodes JPEG / PNG / ... bytes (CMYK, grey and palette images included) to RGB."""
    image = Image.open(io.BytesIO(image_bytes))
    image.load()
    return image if image.mode == "RGB" else image.convert("RGB")


def random_resized_crop_box(
    width: int, height: int, rng: np.random.Generator, area_range: tuple[float, float]
) -> tuple[int, int, int, int]:
    """Inception crop box (left, top, w, h): area and aspect sampled, centre fallback."""
    area = width * height
    log_ratio = (math.log(RRC_RATIO_RANGE[0]), math.log(RRC_RATIO_RANGE[1]))
    for _ in range(RRC_ATTEMPTS):
        target_area = area * rng.uniform(*area_range)
        ratio = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * ratio)))
        h = int(round(math.sqrt(target_area / ratio)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    # Fallback: the largest centred crop with an aspect ratio inside the range.
    in_ratio = width / height
    if in_ratio < RRC_RATIO_RANGE[0]:
        w, h = width, int(round(width / RRC_RATIO_RANGE[0]))
    elif in_ratio > RRC_RATIO_RANGE[1]:
        w, h = int(round(height * RRC_RATIO_RANGE[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def resize_shorter(image: Image.Image, size: int) -> Image.Image:
    """Resizes so the shorter side is `size` (bilinear, antialiased)."""
    w, h = image.size
    scale = size / min(w, h)
    new = (max(size, int(round(w * scale))), max(size, int(round(h * scale))))
    return image.resize(new, Image.Resampling.BILINEAR)


def center_crop(image: Image.Image, size: int) -> Image.Image:
    """The central `size` x `size` window."""
    w, h = image.size
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


class TrainTransform:
    """Random-resized-crop + optional horizontal flip; a grain `random_map` callable."""

    def __init__(self, image_size: int, min_area: float = 0.08, flip: bool = True):
        self.image_size = image_size
        self.area_range = (min_area, 1.0)
        self.flip = flip

    def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        try:
            image = decode(record["image"])
        except Exception as e:  # noqa: BLE001 - any undecodable file is skipped, not fatal.
            return _skipped(record, self.image_size, e)
        left, top, w, h = random_resized_crop_box(*image.size, rng, self.area_range)
        # Crop and resize in one resampling pass (`box`), no intermediate copy.
        image = image.resize(
            (self.image_size, self.image_size),
            Image.Resampling.BILINEAR,
            box=(left, top, left + w, top + h),
        )
        array = np.asarray(image, np.uint8)
        if self.flip and rng.random() < 0.5:
            array = array[:, ::-1]
        return {"image": np.ascontiguousarray(array), "label": np.int32(record["label"]), "mask": np.float32(1)}


class EvalTransform:
    """Resize the shorter side to `image_size / crop_ratio`, then centre-crop."""

    def __init__(self, image_size: int, crop_ratio: float = EVAL_CROP_RATIO):
        self.image_size = image_size
        self.resize_size = int(round(image_size / crop_ratio))

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        try:
            image = decode(record["image"])
        except Exception as e:  # noqa: BLE001
            return _skipped(record, self.image_size, e)
        image = center_crop(resize_shorter(image, self.resize_size), self.image_size)
        return {"image": np.asarray(image, np.uint8), "label": np.int32(record["label"]), "mask": np.float32(1)}


def _skipped(record: dict[str, Any], image_size: int, error: Exception) -> dict[str, Any]:
    logging.warning("Skipping undecodable image %s: %s", record.get("key", "?"), error)
    return {
        "image": np.zeros((image_size, image_size, 3), np.uint8),
        "label": np.int32(0),
        "mask": np.float32(0),
    }
