"""oneDNN's CPU convolutions (forward, input gradient, weight gradient) as `jax.ffi` calls.

The kernels live in `_native/onednn_conv.cc`, compiled by `pip install -e .` (setup.py) into
`jaxres/models/_onednn_conv*.so` against the `onednn-devel-cpu-gomp` headers and jaxlib's XLA
FFI headers. `libdnnl` itself (oneDNN 3.2, CPU only, GNU OpenMP threads) comes from the
`onednn-cpu-gomp` wheel, which installs it into `<venv>/lib`, outside the loader's search path:
`available()` loads it from there by full path before the kernels, then registers the three
FFI targets for the CPU.

Float32, NHWC activations and HWIO kernels, any stride, padding and kernel dilation, no groups.
Where the library cannot be loaded (no compiler at install time, another platform, or
`JAXRES_ONEDNN=0` in the environment, read once at import), `available()` says why once
and returns False, and `cpu_conv` uses its matmul backward instead.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import logging
import os
import sys
from collections.abc import Sequence

import jax
import numpy as np

ENV_SWITCH = "JAXRES_ONEDNN"
# OpenMP threads per convolution call; default: cores / local CPU devices (see `threads()`).
ENV_THREADS = "JAXRES_ONEDNN_THREADS"
# The documented off switch, read once: "0" keeps every conv on the XLA / matmul path.
_ENABLED = os.environ.get(ENV_SWITCH, "1") != "0"
_TARGETS = {
    "jaxres_onednn_conv_forward": "JaxresOnednnConvForward",
    "jaxres_onednn_conv_backward_data": "JaxresOnednnConvBackwardData",
    "jaxres_onednn_conv_backward_weights": "JaxresOnednnConvBackwardWeights",
}

Pads = Sequence[tuple[int, int]]


def _kernels() -> str | None:
    here = os.path.dirname(os.path.abspath(__file__))
    found = sorted(glob.glob(os.path.join(here, "_onednn_conv*.so")))
    return found[-1] if found else None


def _libdnnl() -> str:
    return os.path.join(sys.prefix, "lib", "libdnnl.so.3")


def installed() -> bool:
    """True when the kernels are built, libdnnl is installed and `JAXRES_ONEDNN` is not 0 (a file
    check: loads nothing and starts no JAX backend, so it may run before the CPU device split)."""
    return _ENABLED and _kernels() is not None and os.path.exists(_libdnnl())


def _load() -> str:
    """Loads libdnnl and the kernels and registers the FFI targets; returns oneDNN's version."""
    kernels = _kernels()
    if kernels is None:
        raise OSError("jaxres/models/_onednn_conv*.so was not built (no C++ compiler at install?)")
    if not os.path.exists(_libdnnl()):
        raise OSError(f"{_libdnnl()} is missing (`onednn-cpu-gomp` is not installed)")
    # Global, so the kernels' undefined dnnl symbols resolve against it.
    ctypes.CDLL(_libdnnl(), mode=ctypes.RTLD_GLOBAL)
    lib = ctypes.CDLL(kernels)
    for target, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    lib.JaxresOnednnSetThreads(ctypes.c_int(threads()))
    lib.JaxresOnednnVersion.restype = ctypes.c_int64
    v = lib.JaxresOnednnVersion()
    return f"{v // 10000}.{v // 100 % 100}.{v % 100}"


def threads() -> int:
    """OpenMP threads for each convolution call: `JAXRES_ONEDNN_THREADS`, else the cores divided
    among the local CPU devices (each device calls from its own thread, each call starts its own
    team: one device per core means one thread per call, no oversubscription)."""
    if os.environ.get(ENV_THREADS):
        return int(os.environ[ENV_THREADS])
    return max(1, len(os.sched_getaffinity(0)) // len(jax.local_devices(backend="cpu")))


@functools.cache
def available() -> bool:
    """True when oneDNN's convolutions are loaded and registered (tried once per process; on
    failure logs the reason once, with the fix)."""
    if not _ENABLED:
        return False
    try:
        version = _load()
    except (OSError, AttributeError) as e:
        logging.getLogger(__name__).warning(
            "jaxres: oneDNN CPU convolutions unavailable (%s); CPU convs use the matmul backward. "
            "Fix: `pip install -e .` with g++ present (or set %s=0 to silence this).",
            e, ENV_SWITCH,
        )
        return False
    logging.getLogger(__name__).info("jaxres: oneDNN %s CPU convolutions loaded", version)
    return True


def _attrs(strides: Sequence[int], pads: Pads, dilation: Sequence[int]) -> dict[str, np.int64]:
    (pt, pb), (pl, pr) = pads
    values = {"stride_h": strides[0], "stride_w": strides[1], "pad_top": pt, "pad_bottom": pb,
              "pad_left": pl, "pad_right": pr, "dilation_h": dilation[0], "dilation_w": dilation[1]}
    return {k: np.int64(v) for k, v in values.items()}


def out_shape(x_shape: Sequence[int], w_shape: Sequence[int], strides: Sequence[int], pads: Pads,
              dilation: Sequence[int]) -> tuple[int, int, int, int]:
    """NHWC output shape of an NHWC x HWIO convolution (XLA's rule: floor division)."""
    n, h, w, _ = x_shape
    kh, kw, _, co = w_shape
    oh = (h + sum(pads[0]) - (kh - 1) * dilation[0] - 1) // strides[0] + 1
    ow = (w + sum(pads[1]) - (kw - 1) * dilation[1] - 1) // strides[1] + 1
    return n, oh, ow, co


def forward(x: jax.Array, w: jax.Array, strides: Sequence[int], pads: Pads,
            dilation: Sequence[int] = (1, 1)) -> jax.Array:
    """y = conv(x, w): NHWC float32 x HWIO float32 -> NHWC float32 (oneDNN; CPU only)."""
    out = jax.ShapeDtypeStruct(out_shape(x.shape, w.shape, strides, pads, dilation), x.dtype)
    return jax.ffi.ffi_call("jaxres_onednn_conv_forward", out)(x, w, **_attrs(strides, pads, dilation))


def input_grad(g: jax.Array, w: jax.Array, x_shape: Sequence[int], strides: Sequence[int],
               pads: Pads, dilation: Sequence[int] = (1, 1)) -> jax.Array:
    """dL/dx (NHWC, `x_shape`) from the output gradient `g` (NHWC) and the kernel (HWIO)."""
    out = jax.ShapeDtypeStruct(tuple(x_shape), g.dtype)
    return jax.ffi.ffi_call("jaxres_onednn_conv_backward_data", out)(
        g, w, **_attrs(strides, pads, dilation))


def weight_grad(x: jax.Array, g: jax.Array, w_shape: Sequence[int], strides: Sequence[int],
                pads: Pads, dilation: Sequence[int] = (1, 1)) -> jax.Array:
    """dL/dw (HWIO, `w_shape`) from the input `x` (NHWC) and the output gradient `g` (NHWC)."""
    out = jax.ShapeDtypeStruct(tuple(w_shape), x.dtype)
    return jax.ffi.ffi_call("jaxres_onednn_conv_backward_weights", out)(
        x, g, **_attrs(strides, pads, dilation))
