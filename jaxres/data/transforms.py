"""Augmentation on the host: crops, flips, colour jitter, RandAugment; images leave as uint8 NHWC.

Normalisation (mean / std) happens on the device, inside the jitted step. Decoding
(crop-window, DCT-scaled, robust to damaged files) is `decode.py`: a transform
computes its crop box on the full-size image, has `decode.decode_for_crop` decode
only that window at the smallest DCT scale that still covers the output, so the
last resize always shrinks by less than 2x and is a plain bilinear one (OpenCV),
as tf.data's (PIL fallback: antialiased bilinear resize). A record that cannot be
decoded becomes a black, masked example (`decode.skipped`). Training decodes with the
fast IDCT by default (`dct`, `input.train_dct`), evaluation with the accurate one
(`input.eval_dct`: PIL's pixels before the resize).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from PIL import Image

from jaxres.data.decode import Box, check_dct, check_truncated, decode_for_crop, skipped
from jaxres.data.randaugment import RandAugment

try:  # Fast bilinear resize; optional (PIL fallback).
    import cv2

    cv2.setNumThreads(1)  # Images are small; parallelism comes from grain workers.
except ImportError:  # pragma: no cover
    cv2 = None

# Inception-style random-resized-crop constants (Szegedy et al. 2015).
RRC_RATIO_RANGE = (3 / 4, 4 / 3)
RRC_ATTEMPTS = 10
EVAL_CROP_RATIO = 0.875  # resize to size / 0.875 (256 for 224), then centre-crop.


def pixel_window(box: Box, width: int, height: int) -> tuple[int, int, int, int]:
    """The whole pixels (x0, y0, x1, y1) a crop `box` covers in a `width` x `height` image (>= 1 px)."""
    left, top, w, h = box
    x0, y0 = min(round(left), width - 1), min(round(top), height - 1)
    return x0, y0, max(x0 + 1, round(left + w)), max(y0 + 1, round(top + h))


def crop_resize(array: np.ndarray, box: Box, size: tuple[int, int]) -> np.ndarray:
    """The `box` of `array` resized to `size` (w, h): bilinear, antialiased only when shrinking >= 2x."""
    x0, y0, x1, y1 = pixel_window(box, array.shape[1], array.shape[0])
    if cv2 is not None:
        crop = array[y0:y1, x0:x1]
        shrink = min(crop.shape[1] / size[0], crop.shape[0] / size[1])
        interpolation = cv2.INTER_AREA if shrink >= 2 else cv2.INTER_LINEAR
        return cv2.resize(crop, size, interpolation=interpolation)
    image = Image.fromarray(array).resize(size, Image.Resampling.BILINEAR, box=(x0, y0, x1, y1))
    return np.asarray(image)


def flip_left_right(array: np.ndarray) -> np.ndarray:
    """A contiguous horizontally mirrored copy (numpy's reversed view is slow to copy)."""
    if cv2 is not None:
        return cv2.flip(array, 1)
    return np.asarray(Image.fromarray(array).transpose(Image.Transpose.FLIP_LEFT_RIGHT))


def random_resized_crop_box(
    width: int, height: int, rng: np.random.Generator, area_range: tuple[float, float]
) -> tuple[int, int, int, int]:
    """Inception crop box (left, top, w, h): area and aspect sampled, centre fallback."""
    area = width * height
    log_ratio = (math.log(RRC_RATIO_RANGE[0]), math.log(RRC_RATIO_RANGE[1]))
    for _ in range(RRC_ATTEMPTS):
        target_area = area * rng.uniform(*area_range)
        ratio = math.exp(rng.uniform(*log_ratio))
        w = round(math.sqrt(target_area * ratio))
        h = round(math.sqrt(target_area / ratio))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1)), w, h
    # Fallback: the largest centred crop with an aspect ratio inside the range.
    in_ratio = width / height
    if in_ratio < RRC_RATIO_RANGE[0]:
        w, h = width, round(width / RRC_RATIO_RANGE[0])
    elif in_ratio > RRC_RATIO_RANGE[1]:
        w, h = round(height * RRC_RATIO_RANGE[1]), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def center_crop_box(width: int, height: int, crop_ratio: float) -> Box:
    """The centred square that "resize shorter side to size / ratio, centre-crop size" keeps."""
    side = min(width, height) * crop_ratio
    return (width - side) / 2, (height - side) / 2, side, side


def shorter_side_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(w, h) with the shorter side `size` and the aspect ratio kept."""
    scale = size / min(width, height)
    return max(size, round(width * scale)), max(size, round(height * scale))


def color_jitter(image: np.ndarray, strength: float, rng: np.random.Generator) -> np.ndarray:
    """Brightness, contrast and saturation factors in [1 - s, 1 + s], in random order.

    As torchvision's `ColorJitter(s, s, s)`: clipped to [0, 255] after each step.
    """
    x = image.astype(np.float32)
    luma = np.array([0.299, 0.587, 0.114], np.float32)
    for op in rng.permutation(3):
        factor = np.float32(rng.uniform(1 - strength, 1 + strength))
        if op == 0:  # Brightness.
            x = x * factor
        elif op == 1:  # Contrast: towards the mean grey level.
            mean = np.float32((x @ luma).mean())
            x = (x - mean) * factor + mean
        else:  # Saturation: towards the pixel's grey level.
            grey = (x @ luma)[..., None]
            x = (x - grey) * factor + grey
        np.clip(x, 0, 255, out=x)
    return np.rint(x).astype(np.uint8)


class TrainTransform:
    """Random-resized-crop + optional flip, colour jitter and RandAugment; a grain `random_map` callable.

    `randaugment`: a timm RandAugment string (`jaxres.data.randaugment`), "" = off;
    parsed here, so a bad string fails when the transform is built. It runs last,
    as in timm (crop, flip, then auto-augment), with the example's rng.
    """

    def __init__(
        self,
        image_size: int,
        min_area: float = 0.08,
        flip: bool = True,
        color_jitter: float = 0.0,
        decode_reduced: bool = True,
        truncated: str = "keep",
        randaugment: str = "",
        dct: str = "fast",
    ):
        self.image_size = image_size
        self.area_range = (min_area, 1.0)
        self.flip = flip
        self.color_jitter = color_jitter
        self.decode_reduced = decode_reduced
        self.truncated = check_truncated(truncated)
        self.dct = check_dct(dct, "input.train_dct")
        self.randaugment = RandAugment(randaugment) if randaugment else None

    def __call__(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        size = (self.image_size, self.image_size)
        key = record.get("key", "?")
        try:
            array, box = decode_for_crop(
                record["image"],
                lambda w, h: random_resized_crop_box(w, h, rng, self.area_range),
                lambda box: size,
                key,
                self.decode_reduced,
                self.truncated,
                self.dct,
            )
        except Exception as e:  # noqa: BLE001 - any undecodable file is skipped, not fatal.
            return skipped(record, (self.image_size, self.image_size, 3), e)
        image = crop_resize(array, box, size)
        if self.flip and rng.random() < 0.5:
            image = flip_left_right(image)
        if self.color_jitter:
            image = color_jitter(image, self.color_jitter, rng)
        if self.randaugment is not None:
            image = self.randaugment(image, rng)
        return {"image": image, "label": np.int32(record["label"]), "mask": np.float32(1)}


class EvalTransform:
    """Resize the shorter side to `image_size / crop_ratio`, then centre-crop.

    Computed as one crop-and-resize of the centred square the crop keeps, on
    the (DCT-reduced) decoded image: no full-image resize.
    """

    def __init__(
        self,
        image_size: int,
        crop_ratio: float = EVAL_CROP_RATIO,
        decode_reduced: bool = True,
        truncated: str = "keep",
        dct: str = "accurate",
    ):
        self.image_size = image_size
        self.crop_ratio = crop_ratio
        self.resize_size = round(image_size / crop_ratio)
        self.decode_reduced = decode_reduced
        self.truncated = check_truncated(truncated)
        self.dct = check_dct(dct)

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        size = (self.image_size, self.image_size)
        try:
            array, box = decode_for_crop(
                record["image"],
                lambda w, h: center_crop_box(w, h, self.crop_ratio),
                lambda box: size,
                record.get("key", "?"),
                self.decode_reduced,
                self.truncated,
                self.dct,
            )
        except Exception as e:  # noqa: BLE001
            return skipped(record, (self.image_size, self.image_size, 3), e)
        image = crop_resize(array, box, size)
        return {"image": image, "label": np.int32(record["label"]), "mask": np.float32(1)}


class TenCropTransform:
    """Ten crops for evaluation: 4 corners + centre of the resized image, and their mirrors.

    Returns `image` [10, size, size, 3] (corners TL, TR, BL, BR, centre, then
    the same five flipped), from the image resized so its shorter side is
    `image_size / crop_ratio`.
    """

    def __init__(
        self,
        image_size: int,
        crop_ratio: float = EVAL_CROP_RATIO,
        decode_reduced: bool = True,
        truncated: str = "keep",
        dct: str = "accurate",
    ):
        self.image_size = image_size
        self.resize_size = round(image_size / crop_ratio)
        self.decode_reduced = decode_reduced
        self.truncated = check_truncated(truncated)
        self.dct = check_dct(dct)

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        s, r = self.image_size, self.resize_size
        try:
            array, box = decode_for_crop(
                record["image"],
                lambda w, h: (0, 0, w, h),
                lambda box: shorter_side_size(int(box[2]), int(box[3]), r),
                record.get("key", "?"),
                self.decode_reduced,
                self.truncated,
                self.dct,
            )
        except Exception as e:  # noqa: BLE001
            return skipped(record, (10, s, s, 3), e)
        full = (array.shape[1], array.shape[0])
        image = crop_resize(array, box, shorter_side_size(*full, r))
        h, w = image.shape[:2]
        corners = [(0, 0), (w - s, 0), (0, h - s), (w - s, h - s), ((w - s) // 2, (h - s) // 2)]
        crops = [image[y : y + s, x : x + s] for x, y in corners]
        crops += [flip_left_right(np.ascontiguousarray(c)) for c in crops]
        return {"image": np.stack(crops), "label": np.int32(record["label"]), "mask": np.float32(1)}
