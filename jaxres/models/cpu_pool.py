"""Max pooling whose CPU gradient is a tap mask, not XLA:CPU's select-and-scatter.

`max_pool` has `flax.linen.max_pool`'s arguments and result; off CPU it is that op. On CPU:

* forward: the maximum of the `KH*KW` strided slices of the -inf-padded input (one fused
  loop; XLA:CPU's reduce-window is half as fast);
* gradient: for each output position the first kernel tap (row-major) whose input equals the
  window's maximum gets the output gradient, as the standard gradient (XLA's
  select-and-scatter, PyTorch's MaxPool2d indices) does, ties included. The tap index is one
  small int8 array; the input gradient is written phase by phase (`tap_mask_grad`).

Why: JAX's standard max-pool gradient lowers on XLA:CPU to a variadic reduce-window that
tracks four index arrays built from input-sized `iota`s, plus a broadcast and a scatter:
about 150 ms of a 690 ms ResNet-18 @112 train step (batch 32, AVX-512 class, 2 cores); the
stem pool's forward + backward here: 168 -> 31 ms (benchmarks/README.md). Every other
platform keeps the standard lowering (`lax.platform_dependent`), so GPU programs are unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Padding = str | Sequence[tuple[int, int]]


def _pads(
    x_shape: Sequence[int], window: Sequence[int], strides: Sequence[int], padding: Padding
) -> list[tuple[int, int]]:
    """(low, high) padding of H and W, from "SAME" / "VALID" or explicit pairs."""
    if isinstance(padding, str):
        return list(lax.padtype_to_pads(x_shape[1:3], window, strides, padding))
    return [tuple(p) for p in padding]


def _taps(xp: jax.Array, window: tuple[int, int], strides: tuple[int, int]):
    """Yields (i, j, the padded input's strided slice under tap (i, j) of every window)."""
    n, hp, wp, c = xp.shape
    (kh, kw), (sh, sw) = window, strides
    oh, ow = (hp - kh) // sh + 1, (wp - kw) // sw + 1  # floor division, as reduce-window
    for i in range(kh):
        for j in range(kw):
            end = (n, i + (oh - 1) * sh + 1, j + (ow - 1) * sw + 1, c)
            yield i, j, lax.slice(xp, (0, i, j, 0), end, (1, sh, sw, 1))


def _pad_inf(x: jax.Array, pads: tuple[tuple[int, int], ...]) -> jax.Array:
    return jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=-jnp.inf)


def tap_max_pool(
    x: jax.Array,
    window: tuple[int, int],
    strides: tuple[int, int],
    pads: tuple[tuple[int, int], ...],
) -> jax.Array:
    """The max pool as the maximum of its taps' strided slices: one fused loop on XLA:CPU,
    twice as fast as its reduce-window (7.4 vs 14.7 ms for ResNet's stem pool, batch 32 @112)."""
    taps = [tap for _, _, tap in _taps(_pad_inf(x, pads), window, strides)]
    return functools.reduce(jnp.maximum, taps)


def tap_mask_grad(
    x: jax.Array,
    y: jax.Array,
    g: jax.Array,
    window: tuple[int, int],
    strides: tuple[int, int],
    pads: tuple[tuple[int, int], ...],
) -> jax.Array:
    """dL/dx of the max pool y = pool(x), given dL/dy = g (the first maximal tap wins).

    The padded input is written phase by phase (positions congruent to (rh, rw) modulo the
    stride): each phase is a sum of whole-array shifts of the taps that land on it, with no
    interior padding, and the phases are interleaved by one reshape.
    """
    xp = _pad_inf(x, pads)
    n, hp, wp, c = xp.shape
    (oh, ow), (sh, sw), (kh, kw) = y.shape[1:3], strides, window
    # The index of the first tap equal to the maximum, as one small array.
    index_dtype = jnp.int8 if kh * kw < 127 else jnp.int32
    first = jnp.full(y.shape, kh * kw, index_dtype)
    for i, j, tap in reversed(list(_taps(xp, window, strides))):
        first = jnp.where(tap == y, jnp.asarray(i * kw + j, index_dtype), first)
    hq, wq = -(-hp // sh), -(-wp // sw)
    zero = jnp.zeros((), g.dtype)
    rows = []
    for rh in range(sh):
        row = []
        for rw in range(sw):
            phase = jnp.zeros((n, hq, wq, c), g.dtype)
            for i in range(rh, kh, sh):
                for j in range(rw, kw, sw):
                    part = jnp.where(first == i * kw + j, g, zero)
                    qi, qj = i // sh, j // sw
                    phase = phase + lax.pad(
                        part,
                        zero,
                        ((0, 0, 0), (qi, hq - qi - oh, 0), (qj, wq - qj - ow, 0), (0, 0, 0)),
                    )
            row.append(phase)
        rows.append(jnp.stack(row, 3))  # (N, HQ, WQ, SW, C)
    dxp = jnp.stack(rows, 2).reshape(n, hq * sh, wq * sw, c)
    (pt, _), (pl, _) = pads
    return dxp[:, pt : pt + x.shape[1], pl : pl + x.shape[2], :]


def _make_cpu_pool(
    window: tuple[int, int], strides: tuple[int, int], pads: tuple[tuple[int, int], ...]
):
    @jax.custom_vjp
    def pool(x):
        return tap_max_pool(x, window, strides, pads)

    def fwd(x):
        y = tap_max_pool(x, window, strides, pads)
        return y, (x, y)

    def bwd(res, g):
        x, y = res
        return (tap_mask_grad(x, y, g, window, strides, pads),)

    pool.defvjp(fwd, bwd)
    return pool


def max_pool(
    x: jax.Array,
    window_shape: Sequence[int],
    strides: Sequence[int] | None = None,
    padding: Padding = "VALID",
) -> jax.Array:
    """Max pooling over H and W of an NHWC array (`flax.linen.max_pool`'s arguments).

    Padding is with -inf (a padded position is never the maximum). Floating-point inputs on
    CPU take the tap-mask gradient (module docstring); anything else is the standard op.
    """
    window = tuple(int(k) for k in window_shape)
    strides = tuple(int(s) for s in (strides or (1,) * len(window)))
    if x.ndim != 4 or len(window) != 2 or not jnp.issubdtype(x.dtype, jnp.floating):
        return nn.max_pool(x, window, strides=strides, padding=padding)
    pads = tuple(_pads(x.shape, window, strides, padding))
    cpu_pool = _make_cpu_pool(window, strides, pads)
    return lax.platform_dependent(
        x, cpu=cpu_pool, default=lambda v: nn.max_pool(v, window, strides=strides, padding=pads)
    )
