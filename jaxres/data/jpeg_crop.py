"""Decode only a crop window of a JPEG (libjpeg-turbo 3, TurboJPEG API, through ctypes).

tf.data's `decode_and_crop_jpeg` is fast because libjpeg-turbo skips the
rows above the window, stops after its last row and runs the inverse DCT and
colour conversion only on its columns. TurboJPEG 3 exposes the same partial
decoding (`tj3SetCroppingRegion`), together with DCT scaling
(`tj3SetScalingFactor`); no Python JPEG package wraps it, so this module calls
it directly. The TurboJPEG 3 functions report errors by return code (no
longjmp through Python), so a ctypes binding is safe.

The library comes from the `turbojpeg` wheel (it bundles libturbojpeg 3) or
from the system (`libturbojpeg.so.0` of libjpeg-turbo >= 3.0). Without one,
`available()` is False and decode.py decodes the whole image instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
import math
import threading
from pathlib import Path

import numpy as np

# TurboJPEG 3 constants (turbojpeg.h).
TJINIT_DECOMPRESS = 1
TJPARAM_SUBSAMP, TJPARAM_JPEGWIDTH, TJPARAM_JPEGHEIGHT, TJPARAM_COLORSPACE, TJPARAM_FASTDCT = (
    4,
    5,
    6,
    8,
    10,
)
TJPF_RGB = 0
TJCS_RGB, TJCS_YCBCR, TJCS_GRAY = 0, 1, 2  # CMYK (3) / YCCK (4) are left to PIL.
MCU_WIDTH = {
    0: 8,
    1: 16,
    2: 16,
    3: 8,
    4: 8,
    5: 32,
    6: 8,
}  # By TJSAMP_* (444, 422, 420, GRAY, 440, 411, 441).


class _Region(ctypes.Structure):
    _fields_ = [("x", ctypes.c_int), ("y", ctypes.c_int), ("w", ctypes.c_int), ("h", ctypes.c_int)]


class _Scaling(ctypes.Structure):
    _fields_ = [("num", ctypes.c_int), ("denom", ctypes.c_int)]


def _library_candidates() -> list[str]:
    paths = []
    spec = importlib.util.find_spec("turbojpeg")  # The wheel's bundled copy, without importing it.
    if spec is not None and spec.origin:
        paths += sorted(
            str(p) for p in (Path(spec.origin).parent / "turbojpeg.libs").glob("libturbojpeg*.so*")
        )
    system = ctypes.util.find_library("turbojpeg")
    return paths + ([system] if system else [])


def _load() -> ctypes.CDLL | None:
    for path in _library_candidates():
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        if hasattr(lib, "tj3Init") and hasattr(lib, "tj3SetCroppingRegion"):
            break
    else:
        return None
    handle, c_int, buf, size = ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_size_t
    lib.tj3Init.restype, lib.tj3Init.argtypes = handle, [c_int]
    lib.tj3Set.argtypes = [handle, c_int, c_int]
    lib.tj3Get.argtypes = [handle, c_int]
    lib.tj3DecompressHeader.argtypes = [handle, buf, size]
    lib.tj3SetScalingFactor.argtypes = [handle, _Scaling]
    lib.tj3SetCroppingRegion.argtypes = [handle, _Region]
    lib.tj3Decompress8.argtypes = [handle, buf, size, ctypes.c_void_p, c_int, c_int]
    lib.tj3GetErrorStr.restype, lib.tj3GetErrorStr.argtypes = ctypes.c_char_p, [handle]
    return lib


_LIB = _load()
_LOCAL = threading.local()  # One decompressor handle per thread (handles are not thread-safe).


def available() -> bool:
    """Whether a TurboJPEG 3 library was found."""
    return _LIB is not None


def _handle() -> int:
    handle = getattr(_LOCAL, "handle", None)
    if handle is None:
        handle = _LOCAL.handle = _LIB.tj3Init(TJINIT_DECOMPRESS)
    return handle


def _check(status: int, handle: int) -> None:
    if status != 0:  # Warnings (truncated data...) too: the caller falls back to PIL.
        raise ValueError(_LIB.tj3GetErrorStr(handle).decode(errors="replace"))


def header(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, iMCU width) of a JPEG that `decode_crop` can handle; None otherwise."""
    handle = _handle()
    if _LIB.tj3DecompressHeader(handle, data, len(data)) != 0:
        return None
    colorspace, subsampling = (
        _LIB.tj3Get(handle, TJPARAM_COLORSPACE),
        _LIB.tj3Get(handle, TJPARAM_SUBSAMP),
    )
    if colorspace not in (TJCS_RGB, TJCS_YCBCR, TJCS_GRAY) or subsampling not in MCU_WIDTH:
        return None
    return (
        _LIB.tj3Get(handle, TJPARAM_JPEGWIDTH),
        _LIB.tj3Get(handle, TJPARAM_JPEGHEIGHT),
        MCU_WIDTH[subsampling],
    )


def decode_crop(
    data: bytes,
    size: tuple[int, int],
    mcu_width: int,
    box: tuple[float, float, float, float],
    scale: int = 1,
    fast_dct: bool = False,
) -> tuple[np.ndarray, tuple[float, float, float, float]]:
    """Decodes the window around `box` at 1/`scale` size; returns (uint8 RGB array, box in its pixels).

    With the accurate IDCT the window's pixels equal those of the whole image (PIL's
    `Image.open(...).convert("RGB")`; at 1/`scale`, after `Image.draft`). libjpeg's fancy
    (triangular) chroma upsampling reads the chroma sample beyond each pixel pair, which
    a window cut at its edge does not have: it would repeat the edge sample instead (up
    to 25 grey levels off in the first and last columns of a 4:2:2 or 4:2:0 image). So
    one more iMCU is decoded on the left and one more pixel on the right, then cut off
    here (about 2% more time per image, benchmarks/input.md). Rows need no margin:
    libjpeg-turbo's skipped rows keep the upsampler's context. With the fast IDCT the
    window is decoded as before, as tf.data's `decode_and_crop_jpeg` does.

    Args:
      data: JPEG bytes (after `header(data)` said it can be decoded here).
      size: the full (width, height), from `header`.
      mcu_width: the iMCU width, from `header`: the window's left edge is moved
        left onto a multiple of it (scaled), as TurboJPEG requires.
      box: (left, top, width, height) on the full-size image.
      scale: DCT scaling denominator (1, 2, 4 or 8).
      fast_dct: libjpeg's integer fast IDCT (JDCT_IFAST, tf.io.decode_jpeg's default)
        instead of the accurate one (JDCT_ISLOW, PIL's and libjpeg's default). The scaled
        IDCTs (1/2 - 1/8) have no fast variant: below full size it changes only the chroma
        of 4:2:0 images at 1/2, which libjpeg-turbo decodes with the 8x8 IDCT.
    """
    handle = _handle()
    _check(_LIB.tj3DecompressHeader(handle, data, len(data)), handle)
    _LIB.tj3Set(handle, TJPARAM_FASTDCT, int(fast_dct))
    _check(_LIB.tj3SetScalingFactor(handle, _Scaling(1, scale)), handle)
    width, height = math.ceil(size[0] / scale), math.ceil(size[1] / scale)
    left, top, w, h = (v / scale for v in box)
    step = max(1, mcu_width // scale)
    x0, y0 = int(left) // step * step, int(top)
    x1, y1 = min(width, math.ceil(left + w)), min(height, math.ceil(top + h))
    # The decoded columns: upsampling context on each side (see above) where chroma is
    # upsampled across columns (at 1/2 - 1/8 libjpeg-turbo scales chroma in its IDCT instead);
    # not for the fast IDCT, which cannot give PIL's pixels anyway (it stays tf.data's decode).
    context = scale == 1 and mcu_width == 16 and not fast_dct
    dx0, dx1 = (max(0, x0 - step), min(width, x1 + 1)) if context else (x0, x1)
    _check(_LIB.tj3SetCroppingRegion(handle, _Region(dx0, y0, dx1 - dx0, y1 - y0)), handle)
    out = np.empty((y1 - y0, dx1 - dx0, 3), np.uint8)
    status = _LIB.tj3Decompress8(handle, data, len(data), out.ctypes.data, out.strides[0], TJPF_RGB)
    _check(status, handle)
    return out[:, x0 - dx0 : x1 - dx0], (left - x0, top - y0, w, h)
