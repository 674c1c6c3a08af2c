"""Decoding and augmentation on the host; images leave here as uint8 NHWC.

Normalisation (mean / std) happens on the device, inside the jitted step.

Speed (see benchmarks/input.md). A transform first reads the image size from
the header, computes its crop box on the full-size image, then decodes only
that window (libjpeg-turbo 3 partial decoding, `jpeg_crop.py`, as tf.data's
`decode_and_crop_jpeg`) at the smallest JPEG DCT scale (1, 1/2, 1/4, 1/8) at
which the crop still covers the output size. So the last resize always
shrinks by less than 2x and is a plain bilinear one (OpenCV), as tf.data's.
Fallbacks, each slower: the whole JPEG with simplejpeg (same DCT scaling),
then PIL (`Image.draft` for the DCT scaling, antialiased bilinear resize);
pixels differ slightly between paths, the geometry does not. The integer
fast IDCT is used, as tf.io.decode_jpeg does by default.

Robustness. CMYK / YCCK JPEGs, grayscale, palette and PNG bytes named .JPEG
decode through PIL to RGB. A truncated file (a JPEG without its end-of-image
marker after the last scan, or one PIL finds cut short) follows
`input.truncated`: "keep" decodes it as far as its data goes (PIL's
`LOAD_TRUNCATED_IMAGES`, turned on only for that retry, under a lock) and logs
its key; "skip" treats it as undecodable. A truncated JPEG always goes
through PIL, so the outcome does not depend on where the crop window falls
(the window decoder succeeds when the window lies in the intact part).
A record that still cannot be decoded (zero bytes, garbage)
becomes a black image with `mask = 0`, logged with its key: a corrupt file
never stops an epoch and never counts in the loss or in a metric. The train
step counts the batch's mask-0 rows (`skipped` in the metrics), so the count is
right across grain worker processes. Both warnings are logged on every call
(training names a bad key each epoch) and carry the record's key as
`record.image_key` (and the reason as `record.image_error` for skipped ones),
so a caller that reports images itself, such as `jaxres.predict`, can filter
them by key.
"""

from __future__ import annotations

import io
import logging
import math
import re
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageFile

from jaxres.data import jpeg_crop
from jaxres.data.randaugment import RandAugment
from jaxres.errors import ConfigError

log = logging.getLogger(__name__)

try:  # libjpeg-turbo with DCT scaling; optional (PIL fallback).
    import simplejpeg
except ImportError:  # pragma: no cover - exercised only without the package.
    simplejpeg = None
try:  # Fast bilinear resize; optional (PIL fallback).
    import cv2

    cv2.setNumThreads(1)  # Images are small; parallelism comes from grain workers.
except ImportError:  # pragma: no cover
    cv2 = None

# Inception-style random-resized-crop constants (Szegedy et al. 2015).
RRC_RATIO_RANGE = (3 / 4, 4 / 3)
RRC_ATTEMPTS = 10
EVAL_CROP_RATIO = 0.875  # resize to size / 0.875 (256 for 224), then centre-crop.
DCT_SCALES = (8, 4, 2, 1)  # Reduced JPEG decoding: 1/8 ... full size.
FAST_COLORSPACES = ("YCbCr", "Gray", "RGB")  # simplejpeg; CMYK / YCCK go through PIL.

Box = tuple[float, float, float, float]  # (left, top, width, height) in pixels.
_TRUNCATED_LOCK = threading.Lock()
TRUNCATED = ("keep", "skip")  # `input.truncated`: decode what is there, or mask the record.
TRUNCATED_INFO = "jaxres_truncated"  # Set in `Image.info` of an image decoded leniently.


class TruncatedImageError(OSError):
    """A truncated file read with `truncated="skip"`."""


def check_truncated(truncated: str) -> str:
    """`truncated` if it is a valid `input.truncated`; a ConfigError listing the valid ones otherwise."""
    if truncated not in TRUNCATED:
        raise ConfigError(
            f"Unknown input.truncated {truncated!r}; set --config.input.truncated to one of "
            f"{' / '.join(TRUNCATED)}."
        )
    return truncated


def jpeg_truncated(image_bytes: bytes) -> bool:
    """Whether JPEG bytes lack the end-of-image marker after their last scan (a cut-off file).

    Entropy-coded data never holds a 0xFFD9 or 0xFFDA byte pair (0xFF is stuffed),
    so the last start-of-scan marker is the main image's, and the end marker
    must follow it. Bytes after the end marker (camera padding) are allowed.
    Searched from the end: a complete file costs a few bytes of search.
    """
    end = image_bytes.rfind(b"\xff\xd9")
    if end < 0:
        return b"\xff\xda" in image_bytes
    return image_bytes.find(b"\xff\xda", end) >= 0


def _placeholder_jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, "JPEG")
    return buffer.getvalue()


# An 8x8 black JPEG: the image of padding rows and of records DALI cannot read (both masked).
PLACEHOLDER_JPEG = _placeholder_jpeg()
_BYTESIO_REPR = re.compile(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


def pil_open(
    image_bytes: bytes,
    key: str = "?",
    draft_size: tuple[int, int] | None = None,
    truncated: str = "keep",
) -> Image.Image:
    """Decodes to RGB with PIL (at reduced size when `draft_size`).

    A truncated file is decoded leniently with `truncated="keep"` (logged, and
    marked `image.info[TRUNCATED_INFO]`) and raises `TruncatedImageError` with "skip".
    """
    image = Image.open(io.BytesIO(image_bytes))
    if draft_size is not None and image.format == "JPEG":
        image.draft("RGB", draft_size)
    try:
        image.load()
    except OSError as e:
        if "truncated" not in str(e):
            raise
        if truncated == "skip":
            raise TruncatedImageError("truncated file (input.truncated=skip)") from None
        # The flag is module-global in PIL: set it only for this retry, under a lock.
        with _TRUNCATED_LOCK:
            previous, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, True
            try:
                image = Image.open(io.BytesIO(image_bytes))
                if draft_size is not None and image.format == "JPEG":
                    image.draft("RGB", draft_size)
                image.load()
            finally:
                ImageFile.LOAD_TRUNCATED_IMAGES = previous
        log.warning("Decoded truncated image %s as far as its data goes.", key, extra={"image_key": key})
        image.info[TRUNCATED_INFO] = True
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    if image.info.get(TRUNCATED_INFO):
        rgb.info[TRUNCATED_INFO] = True
    return rgb


def decode(image_bytes: bytes, key: str = "?", truncated: str = "keep") -> Image.Image:
    """Decodes JPEG / PNG / ... bytes (CMYK, grey and palette images included) to RGB."""
    return pil_open(image_bytes, key, truncated=truncated)


def dct_scale(box: Box, out_size: tuple[int, int], reduced: bool = True) -> int:
    """The largest DCT scale denominator at which `box` still covers `out_size` (w, h)."""
    if not reduced:
        return 1
    for scale in DCT_SCALES:
        if box[2] / scale >= out_size[0] and box[3] / scale >= out_size[1]:
            return scale
    return 1


def _scaled_box(box: Box, full: tuple[int, int], array: np.ndarray) -> Box:
    sx, sy = array.shape[1] / full[0], array.shape[0] / full[1]
    return box[0] * sx, box[1] * sy, box[2] * sx, box[3] * sy


def decode_for_crop(
    image_bytes: bytes,
    box_fn: Callable[[int, int], Box],
    out_size: Callable[[Box], tuple[int, int]],
    key: str = "?",
    reduced: bool = True,
    truncated: str = "keep",
) -> tuple[np.ndarray, Box]:
    """Decodes as little as the crop needs; returns (uint8 HxWx3, the crop box in its pixels).

    JPEGs: only the crop window (TurboJPEG 3, `jpeg_crop`), else the whole
    image (simplejpeg), in both cases DCT-scaled when `reduced` allows. Other
    formats, CMYK, truncated and damaged files: PIL (`Image.draft` for the scaling).

    Args:
      image_bytes: encoded image.
      box_fn: (full width, full height) -> crop box on the full-size image.
      out_size: crop box -> the (w, h) the crop will be resized to.
      key: the record's key, for log messages.
      reduced: allow DCT-scaled JPEG decoding.
      truncated: "keep" or "skip" (raise `TruncatedImageError`) for a truncated file.
    """
    if image_bytes[:2] == b"\xff\xd8" and not jpeg_truncated(image_bytes):
        for decoder in (_decode_window, _decode_whole):
            decoded = decoder(image_bytes, box_fn, out_size, reduced)
            if decoded is not None:
                return decoded
    image = Image.open(io.BytesIO(image_bytes))  # Header only: no pixels decoded yet.
    full = image.size
    box = box_fn(*full)
    scale = dct_scale(box, out_size(box), reduced)
    draft = (math.ceil(full[0] / scale), math.ceil(full[1] / scale)) if scale > 1 else None
    array = np.asarray(pil_open(image_bytes, key, draft, truncated))
    return array, _scaled_box(box, full, array)


def _decode_window(
    image_bytes: bytes, box_fn: Callable, out_size: Callable, reduced: bool
) -> tuple[np.ndarray, Box] | None:
    if not jpeg_crop.available():
        return None
    found = jpeg_crop.header(image_bytes)
    if found is None:
        return None  # CMYK, 12-bit, unreadable header: PIL decides.
    width, height, mcu_width = found
    box = box_fn(width, height)
    try:
        return jpeg_crop.decode_crop(
            image_bytes, (width, height), mcu_width, box, dct_scale(box, out_size(box), reduced)
        )
    except ValueError:
        return None  # Truncated or damaged: PIL decodes what it can, or raises.


def _decode_whole(
    image_bytes: bytes, box_fn: Callable, out_size: Callable, reduced: bool
) -> tuple[np.ndarray, Box] | None:
    if simplejpeg is None:
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(image_bytes)
    except ValueError:
        return None
    if colorspace not in FAST_COLORSPACES:
        return None
    box = box_fn(width, height)
    scale = dct_scale(box, out_size(box), reduced)
    try:
        array = simplejpeg.decode_jpeg(
            image_bytes,
            colorspace="RGB",
            fastdct=True,
            min_height=math.ceil(height / scale),
            min_width=math.ceil(width / scale),
        )
    except ValueError:
        return None
    return array, _scaled_box(box, (width, height), array)


def image_size(image_bytes: bytes) -> tuple[int, int]:
    """(width, height) from the header alone; raises on bytes no decoder can read."""
    if image_bytes[:2] == b"\xff\xd8":
        found = jpeg_crop.header(image_bytes) if jpeg_crop.available() else None
        if found is not None:
            return found[0], found[1]
    return Image.open(io.BytesIO(image_bytes)).size


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
    ):
        self.image_size = image_size
        self.area_range = (min_area, 1.0)
        self.flip = flip
        self.color_jitter = color_jitter
        self.decode_reduced = decode_reduced
        self.truncated = check_truncated(truncated)
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
    ):
        self.image_size = image_size
        self.crop_ratio = crop_ratio
        self.resize_size = round(image_size / crop_ratio)
        self.decode_reduced = decode_reduced
        self.truncated = check_truncated(truncated)

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
    ):
        self.image_size = image_size
        self.resize_size = round(image_size / crop_ratio)
        self.decode_reduced = decode_reduced
        self.truncated = check_truncated(truncated)

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


def skipped(
    record: dict[str, Any], shape: int | tuple[int, ...], error: Exception
) -> dict[str, Any]:
    """A black, masked example for an undecodable record (`shape`: an image side or a full shape)."""
    key, reason = record.get("key", "?"), undecodable_reason(record.get("image"), error)
    log.warning(
        "Skipping undecodable image %s: %s", key, reason, extra={"image_key": key, "image_error": reason}
    )
    shape = (shape, shape, 3) if isinstance(shape, int) else shape
    return {"image": np.zeros(shape, np.uint8), "label": np.int32(0), "mask": np.float32(0)}


def undecodable_reason(image_bytes: bytes | None, error: Exception) -> str:
    """Why a record could not be decoded, for messages: "0-byte file" or the decoder's error.

    PIL's "cannot identify image file <_io.BytesIO object at 0x...>" loses the address.
    """
    if image_bytes is not None and len(image_bytes) == 0:
        return "0-byte file"
    return _BYTESIO_REPR.sub("", str(error)) or type(error).__name__
