"""A drop-in `lax.conv_general_dilated` that runs CPU convolutions through oneDNN or matmuls.

`backend` (the model's `cpu_conv` field, config key `model.cpu_conv`) chooses, for plain
2-D NHWC / HWIO convolutions on CPU:

* "onednn" (the default): forward, input gradient and weight gradient are oneDNN's direct
  convolutions (`jaxres.models.onednn`, FFI calls into the kernels `pip install` builds), for
  float32 convs with any stride, padding and kernel dilation. Where the kernels are not
  available (not built, or `JAXRES_ONEDNN=0`), and for other dtypes, "matmul" below.
* "matmul": XLA's forward, and the backward written as large matmuls (below).
* "xla": `lax.conv_general_dilated` itself, XLA's convolutions (the benchmarks' baseline).

Every other platform (GPU, TPU) runs the standard lowering whatever the backend (cuDNN on
GPU): `jax.lax.platform_dependent` picks the branch when the program is lowered.

The matmul backward. Why: XLA:CPU runs a forward NHWC convolution through a reasonably fast Eigen kernel, but the
two convolutions of the backward pass are different shapes of convolution (the input
gradient of a strided conv has lhs dilation, the weight gradient contracts over batch and
space and has rhs dilation when strided), and XLA:CPU runs several of them far below the
host's sgemm rate (see benchmarks/README.md, "Where the CPU train step goes"). Rewritten
as matmuls, they go to XLA:CPU's dot kernels instead:

* weight gradient: one matmul per kernel tap, `x_tap^T @ g` with the strided input window of
  that tap (`(Ci, N*OH*OW) @ (N*OH*OW, Co)`), stacked to HWIO, or one im2col matmul when
  the patch buffer is small; 1x1 convs are one matmul (XLA's 1x1 weight gradients on 56x56
  maps are the worst case: 2.0-2.5 s vs 0.08-0.2 s as a matmul, ResNet-50 batch 32);
* input gradient: `g @ W^T` into per-tap columns (`(N*OH*OW, Co) @ (Co, KH*KW*Ci)`), then
  col2im: each tap's columns padded into place (interior padding = stride - 1) and summed,
  which XLA fuses into one pass; 1x1 convs are one matmul (and a strided scatter). Only on
  small maps (see `COL2IM_MAX_PIXELS`); on large ones XLA's own backward conv is kept.

KxK convs of fewer than `MATMUL_MIN_FLOPS` keep XLA's whole backward (small convs, where the
matmuls do not pay). The forward pass stays XLA's convolution. Only plain NHWC/HWIO 2-D
convolutions without groups (and, for "matmul", without dilation) take a custom path;
anything else is forwarded to `lax.conv_general_dilated` untouched.

Wired into every conv of `jaxres.models.resnet.ResNet` (`nn.Conv(..., conv_general_dilated=
functools.partial(conv, backend=...))`); parameters and checkpoints do not change.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from jaxres.errors import ConfigError, unknown_name
from jaxres.models import onednn

Pads = tuple[tuple[int, int], tuple[int, int]]
_NHWC = ("NHWC", "HWIO", "NHWC")
# Weight gradient: one im2col matmul when the patch buffer (N*OH*OW x KH*KW*Ci floats) is at
# most this many elements or the input has fewer than IM2COL_MIN_TAP_CHANNELS channels, else
# one matmul per tap. Measured on 2 AVX2 cores, batch 32: im2col wins on deep small maps
# (512 ch @4: 77 vs 95 ms) and on the 3-channel stem at 224 px (1.8 vs 2.9 s), whose taps
# are (3, M) matmuls; the taps win on large patch buffers (64 ch @56: 0.82 vs 0.97 s;
# 256 ch @14: 250 vs 364 ms).
IM2COL_MAX_ELEMENTS = 8 * 2**20
IM2COL_MIN_TAP_CHANNELS = 8
# Input gradient of a KxK conv (K > 1): matmul + col2im when the output map has at most this
# many pixels; on larger maps col2im's K*K passes over the gradient cost more than XLA's own
# backward conv (64 ch @56: 627 vs 325 ms; @28: 80 vs 66 ms), on small ones less
# (512 ch @7: 193 vs 285 ms; @4: 61 vs 118 ms). 1x1 convs always take the matmul.
COL2IM_MAX_PIXELS = 64
# KxK convs (K > 1) below this many FLOPs (2 x N x OH x OW x KH x KW x Ci x Co, the whole batch)
# keep XLA's own backward. Small convs are where the per-tap matmuls have tiny outputs (Ci x Co)
# and XLA's backward conv is as fast or faster, and the extra ops cost compile time. Measured
# on 2 AVX2 cores, 2 devices, batch 32, weight gradient xla / matmul: the demo's 0.6-GFLOP
# 3x3 convs (32 ch @32, 64 @16, 128 @8) 9.9 / 12.2, 9.4 / 12.2, 5.8 / 9.0 ms; ResNet-18 @112's
# 1.9-GFLOP ones even or better; ResNet-50 @224's 7.4-GFLOP ones 1.2-1.7x faster as matmuls.
# A whole demo step: 348 ms with XLA's backward, 372 ms with the matmuls on every conv.
# 1x1 convs always take the matmuls (one dot each; 1.3-2.8x faster at every size measured).
MATMUL_MIN_FLOPS = 1e9
# Values of `conv`'s `backend` (config key `model.cpu_conv`), see the module docstring.
BACKENDS = ("onednn", "matmul", "xla")


def _is_nhwc(dimension_numbers: Any) -> bool:
    """True for the NHWC / HWIO / NHWC layout flax's `nn.Conv` uses for 2-D convs."""
    if dimension_numbers is None:
        return False
    if isinstance(dimension_numbers, lax.ConvDimensionNumbers):
        return dimension_numbers == lax.conv_dimension_numbers((1, 1, 1, 1), (1, 1, 1, 1), _NHWC)
    return tuple(dimension_numbers) == _NHWC


def _ones(value: Sequence[int] | None) -> bool:
    return value is None or all(v == 1 for v in value)


def conv(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    batch_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    *,
    backend: str = "onednn",
) -> jax.Array:
    """`lax.conv_general_dilated` run on CPU by `backend` (same signature and result).

    Plain 2-D NHWC / HWIO convolutions (any stride and padding, no input dilation, no groups)
    take `backend`'s path on CPU; every other call is `lax.conv_general_dilated` itself.

    Raises:
      ConfigError: `backend` is not one of `BACKENDS`.
    """
    if backend not in BACKENDS:
        raise ConfigError(unknown_name("model.cpu_conv", backend, list(BACKENDS)))
    plain = (
        backend != "xla"
        and lhs.ndim == 4
        and _is_nhwc(dimension_numbers)
        and _ones(lhs_dilation)
        and feature_group_count == 1
        and batch_group_count == 1
        and preferred_element_type is None
    )
    if not plain:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, precision, preferred_element_type,
        )
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
        dilated = [(k - 1) * d + 1 for k, d in zip(rhs.shape[:2], rhs_dilation or (1, 1))]
        pads = lax.padtype_to_pads(lhs.shape[1:3], dilated, strides, padding)
    else:
        pads = padding
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    cropping = any(p < 0 for pair in pads for p in pair)
    float32 = lhs.dtype == rhs.dtype == jnp.float32
    if backend == "onednn" and not cropping and float32 and onednn.available():
        dilation = tuple(int(d) for d in (rhs_dilation or (1, 1)))
        return _onednn_conv(lhs, rhs, strides, pads, dilation, precision)
    if not _ones(rhs_dilation):
        return lax.conv_general_dilated(lhs, rhs, strides, pads, rhs_dilation=rhs_dilation,
                                        dimension_numbers=_NHWC, precision=precision)
    if cropping or _small_kxk(lhs.shape, rhs.shape, strides, pads):
        # Cropping convs (rare) and small KxK convs: XLA's backward (see MATMUL_MIN_FLOPS).
        return lax.conv_general_dilated(lhs, rhs, strides, pads, dimension_numbers=_NHWC, precision=precision)
    return _conv(lhs, rhs, strides, pads, precision)


def _small_kxk(x_shape: Sequence[int], w_shape: Sequence[int], strides: tuple[int, int], pads: Pads) -> bool:
    """True for a KxK conv (K > 1) of fewer than `MATMUL_MIN_FLOPS` FLOPs (False when a dimension
    is symbolic, as in a shape-polymorphic `jax.export`)."""
    if not all(isinstance(d, int) for d in (*x_shape, *w_shape)):
        return False
    n, h, w, _ = x_shape
    kh, kw, ci, co = w_shape
    if (kh, kw) == (1, 1):
        return False
    oh = (h + sum(pads[0]) - kh) // strides[0] + 1
    ow = (w + sum(pads[1]) - kw) // strides[1] + 1
    return 2.0 * n * oh * ow * kh * kw * ci * co < MATMUL_MIN_FLOPS


def _xla_conv(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: Pads, precision: Any) -> jax.Array:
    return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_NHWC, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: Pads, precision: Any) -> jax.Array:
    return _xla_conv(x, w, strides, pads, precision)


def _conv_fwd(x, w, strides, pads, precision):
    return _xla_conv(x, w, strides, pads, precision), (x, w)


def _conv_bwd(strides, pads, precision, residuals, g):
    x, w = residuals

    def standard(g, x, w):
        # The ordinary autodiff transpose: what GPU / TPU run (cuDNN's backward on GPU).
        _, vjp = jax.vjp(lambda x, w: _xla_conv(x, w, strides, pads, precision), x, w)
        return vjp(g)

    def cpu(g, x, w):
        kh, kw = w.shape[:2]
        if (kh, kw) == (1, 1) or g.shape[1] * g.shape[2] <= COL2IM_MAX_PIXELS:
            dx = input_grad_matmul(g, w, x.shape, strides, pads, precision)
        else:  # Large maps: XLA's transposed conv beats col2im there (see COL2IM_MAX_PIXELS).
            dx = jax.vjp(lambda x: _xla_conv(x, w, strides, pads, precision), x)[1](g)[0]
        return dx, weight_grad_matmul(x, g, w.shape, strides, pads, precision)

    return lax.platform_dependent(g, x, w, cpu=cpu, default=standard)


_conv.defvjp(_conv_fwd, _conv_bwd)


def _xla_dilated(x, w, strides, pads, dilation, precision):
    return lax.conv_general_dilated(x, w, strides, pads, rhs_dilation=dilation,
                                    dimension_numbers=_NHWC, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _onednn_conv(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: Pads,
                 dilation: tuple[int, int], precision: Any) -> jax.Array:
    return lax.platform_dependent(
        x, w,
        cpu=lambda x, w: onednn.forward(x, w, strides, pads, dilation),
        default=lambda x, w: _xla_dilated(x, w, strides, pads, dilation, precision),
    )


def _onednn_fwd(x, w, strides, pads, dilation, precision):
    return _onednn_conv(x, w, strides, pads, dilation, precision), (x, w)


def _onednn_bwd(strides, pads, dilation, precision, residuals, g):
    x, w = residuals

    def standard(g, x, w):
        _, vjp = jax.vjp(lambda x, w: _xla_dilated(x, w, strides, pads, dilation, precision), x, w)
        return vjp(g)

    def cpu(g, x, w):
        return (onednn.input_grad(g, w, x.shape, strides, pads, dilation),
                onednn.weight_grad(x, g, w.shape, strides, pads, dilation))

    return lax.platform_dependent(g, x, w, cpu=cpu, default=standard)


_onednn_conv.defvjp(_onednn_fwd, _onednn_bwd)


def patch_matrix(x: jax.Array, kernel_hw: tuple[int, int], strides: tuple[int, int], pads: Pads,
                 out_hw: tuple[int, int]) -> jax.Array:
    """The (N*OH*OW, KH*KW*Ci) patch matrix of an NHWC conv (taps in HWI order)."""
    xp = _pad_input(x, pads)
    kh, kw = kernel_hw
    taps = [_tap(xp, i, j, out_hw, strides) for i in range(kh) for j in range(kw)]
    return jnp.concatenate(taps, axis=-1).reshape(-1, kh * kw * x.shape[-1])


def _tap(xp: jax.Array, i: int, j: int, out_hw: tuple[int, int], strides: tuple[int, int]) -> jax.Array:
    """The (N, OH, OW, C) window of padded input `xp` that kernel tap (i, j) multiplies."""
    (oh, ow), (sh, sw) = out_hw, strides
    n, _, _, c = xp.shape
    return lax.slice(xp, (0, i, j, 0), (n, i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, c), (1, sh, sw, 1))


def _pad_input(x: jax.Array, pads: Pads) -> jax.Array:
    (pt, pb), (pl, pr) = pads
    return lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (pt, pb, 0), (pl, pr, 0), (0, 0, 0)))


def weight_grad_matmul(x: jax.Array, g: jax.Array, w_shape: Sequence[int], strides: tuple[int, int],
                       pads: Pads, precision: Any = None, im2col: bool | None = None) -> jax.Array:
    """dL/dW (HWIO) of an NHWC conv as matmuls over M = N*OH*OW.

    `im2col`: one `(KH*KW*Ci, M) @ (M, Co)` matmul on the stacked taps; else one
    `(Ci, M) @ (M, Co)` matmul per tap (no patch buffer). None: im2col when
    the patch buffer has at most `IM2COL_MAX_ELEMENTS`.
    """
    kh, kw, ci, co = w_shape
    n, oh, ow, _ = g.shape
    g2 = g.reshape(n * oh * ow, co)
    if (kh, kw) == (1, 1) and pads == ((0, 0), (0, 0)):
        xs = x[:, :: strides[0], :: strides[1], :][:, :oh, :ow, :]
        return (xs.reshape(-1, ci).T @ g2).reshape(1, 1, ci, co).astype(x.dtype)
    if im2col is None:
        im2col = n * oh * ow * kh * kw * ci <= IM2COL_MAX_ELEMENTS or ci < IM2COL_MIN_TAP_CHANNELS
    if im2col:
        # All taps side by side, (M, KH*KW*Ci): one matmul whose output is large enough for
        # the dot kernel to split over the threads.
        patches = patch_matrix(x, (kh, kw), strides, pads, (oh, ow))
        dw = lax.dot_general(patches, g2, (((0,), (0,)), ((), ())), precision=precision)
        return dw.reshape(kh, kw, ci, co).astype(x.dtype)
    xp = _pad_input(x, pads)
    taps = [
        lax.dot_general(_tap(xp, i, j, (oh, ow), strides).reshape(-1, ci), g2, (((0,), (0,)), ((), ())),
                        precision=precision)
        for i in range(kh)
        for j in range(kw)
    ]
    return jnp.stack(taps).reshape(kh, kw, ci, co).astype(x.dtype)


def input_grad_matmul(g: jax.Array, w: jax.Array, x_shape: Sequence[int], strides: tuple[int, int],
                      pads: Pads, precision: Any = None) -> jax.Array:
    """dL/dX (NHWC) of an NHWC conv: `g @ W^T` into per-tap columns, then col2im by padded sums."""
    n, h, wd, ci = x_shape
    kh, kw, _, co = w.shape
    _, oh, ow, _ = g.shape
    sh, sw = strides
    (pt, pb), (pl, pr) = pads
    hp, wp = h + pt + pb, wd + pl + pr
    # (M, Co) @ (Co, KH*KW*Ci): the whole input gradient's arithmetic in one matmul.
    cols = lax.dot_general(g.reshape(-1, co), w.reshape(kh * kw * ci, co), (((1,), (1,)), ((), ())),
                           precision=precision)
    cols = cols.reshape(n, oh, ow, kh, kw, ci).astype(g.dtype)
    zero = jnp.zeros((), g.dtype)
    dxp = None
    for i in range(kh):
        for j in range(kw):
            # Tap (i, j) wrote to rows i + sh*oh, cols j + sw*ow of the padded input; XLA fuses
            # these pads and adds into a single pass over the padded gradient.
            part = lax.pad(cols[:, :, :, i, j, :], zero, (
                (0, 0, 0),
                (i, hp - i - (oh - 1) * sh - 1, sh - 1),
                (j, wp - j - (ow - 1) * sw - 1, sw - 1),
                (0, 0, 0),
            ))
            dxp = part if dxp is None else dxp + part
    return dxp[:, pt : pt + h, pl : pl + wd, :]
