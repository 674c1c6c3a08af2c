"""Decoding on the host: encoded bytes to uint8 RGB arrays, as little as a crop needs.

Speed (see benchmarks/input.md). A transform (`transforms.py`) first reads the
image size from the header, computes its crop box on the full-size image, then
`decode_for_crop` decodes only that window (libjpeg-turbo 3 partial decoding,
`jpeg_crop.py`, as tf.data's `decode_and_crop_jpeg`) at the smallest JPEG DCT
scale (1, 1/2, 1/4, 1/8) at which the crop still covers the output size.
Fallbacks, each slower: the whole JPEG with simplejpeg (same DCT scaling),
then PIL (`Image.draft` for the DCT scaling).

The inverse DCT (`dct`, from `input.train_dct` / `input.eval_dct`): "accurate" is
libjpeg's JDCT_ISLOW, what PIL, timm and torchvision decode with (so the weights
they publish were measured on it); "fast" is its integer JDCT_IFAST, tf.io.decode_jpeg's
default, 6-18 grey levels off at most (mean 1.0-1.3) on synthetic ImageNet-like JPEGs and
three photographs (benchmarks/input.md).
With "accurate", both JPEG paths give PIL's `Image.open(...).convert("RGB")` pixels
exactly at full size and `Image.draft`'s at 1/2 - 1/8, for 4:2:0, 4:2:2, 4:4:4 and
grey JPEGs (tests/test_decode_accuracy.py): the same libjpeg-turbo IDCT and fancy
chroma upsampling as PIL, and the window decoded with a margin so that its edge
columns are upsampled as in the whole image (`jpeg_crop.decode_crop`). The scaled
IDCTs have no fast variant, so below full size `dct` only changes the chroma of
4:2:0 images at 1/2. The PIL fallback is always accurate. "accurate" costs about 2%
more per image on the project machine (AVX-512; libjpeg-turbo's ISLOW has AVX2 code, its
IFAST only SSE2), the window's margin included.

Robustness. CMYK / YCCK JPEGs, grayscale, palette and PNG bytes named .JPEG
decode through PIL to RGB. A truncated file (a JPEG without its end-of-image
marker after the last scan, or one PIL finds cut short) follows
`input.truncated`: "keep" decodes it as far as its data goes (PIL's
`LOAD_TRUNCATED_IMAGES`, turned on only for that retry, under a lock) and logs
its key; "skip" treats it as undecodable. A truncated JPEG always goes
through PIL, so the outcome does not depend on where the crop window falls
(the window decoder succeeds when the window lies in the intact part).
A record that still cannot be decoded (zero bytes, garbage)
becomes a black image with `mask = 0` (`skipped`), logged with its key: a
corrupt file never stops an epoch and never counts in the loss or in a metric.
The train step counts the batch's mask-0 rows (`skipped` in the metrics), so the
count is right across grain worker processes. Both warnings are logged on every
call (training names a bad key each epoch) and carry the record's key as
`record.image_key` (and the reason as `record.image_error` for skipped ones),
so a caller that reports images itself, such as `jaxres.predict`, can filter
them by key (on `log`, this module's logger).
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
from jaxres.errors import ConfigError

log = logging.getLogger(__name__)

try:  # libjpeg-turbo with DCT scaling; optional (PIL fallback).
    import simplejpeg
except ImportError:  # pragma: no cover - exercised only without the package.
    simplejpeg = None

DCT_SCALES = (8, 4, 2, 1)  # Reduced JPEG decoding: 1/8 ... full size.
FAST_COLORSPACES = ("YCbCr", "Gray", "RGB")  # simplejpeg; CMYK / YCCK go through PIL.

Box = tuple[float, float, float, float]  # (left, top, width, height) in pixels.
_TRUNCATED_LOCK = threading.Lock()
TRUNCATED = ("keep", "skip")  # `input.truncated`: decode what is there, or mask the record.
TRUNCATED_INFO = "jaxres_truncated"  # Set in `Image.info` of an image decoded leniently.
DCT_METHODS = ("accurate", "fast")  # `input.train_dct` / `input.eval_dct`: libjpeg ISLOW / IFAST.


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


def check_dct(dct: str, key: str = "input.eval_dct") -> str:
    """`dct` if it is a valid IDCT choice; a ConfigError naming `key`'s valid values otherwise."""
    if dct not in DCT_METHODS:
        raise ConfigError(
            f"Unknown {key} {dct!r}; set --config.{key} to one of {' / '.join(DCT_METHODS)}."
        )
    return dct


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
    dct: str = "accurate",
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
      dct: "accurate" (PIL's pixels) or "fast", the JPEG paths' inverse DCT (module docstring).
    """
    if image_bytes[:2] == b"\xff\xd8" and not jpeg_truncated(image_bytes):
        for decoder in (_decode_window, _decode_whole):
            decoded = decoder(image_bytes, box_fn, out_size, reduced, dct == "fast")
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
    image_bytes: bytes, box_fn: Callable, out_size: Callable, reduced: bool, fast_dct: bool
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
            image_bytes,
            (width, height),
            mcu_width,
            box,
            dct_scale(box, out_size(box), reduced),
            fast_dct,
        )
    except ValueError:
        return None  # Truncated or damaged: PIL decodes what it can, or raises.


def _decode_whole(
    image_bytes: bytes, box_fn: Callable, out_size: Callable, reduced: bool, fast_dct: bool
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
            fastdct=fast_dct,
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
