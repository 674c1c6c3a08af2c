"""`cpu_pool.max_pool`: the standard max pool's values and gradients, ties included."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxres.models import cpu_pool

GEOMETRIES = [
    # (input shape, window, strides, padding)
    ((2, 9, 11, 3), (3, 3), (2, 2), ((1, 1), (1, 1))),  # ResNet's stem pool, odd sizes
    ((2, 8, 8, 4), (3, 3), (2, 2), "SAME"),
    ((2, 9, 9, 4), (3, 3), (2, 2), "VALID"),
    ((1, 7, 6, 2), (2, 3), (1, 2), ((0, 1), (2, 0))),  # asymmetric window, stride and padding
    ((1, 10, 10, 2), (2, 2), (3, 3), "VALID"),  # stride beyond the window: gaps get no gradient
]


def _inputs(shape, kind, rng):
    x = rng.standard_normal(shape).astype(np.float32)
    if kind == "relu":  # many windows of zeros: ties, as after a ReLU
        return np.maximum(x, 0)
    if kind == "constant":  # every tap ties
        return np.zeros_like(x)
    return x


@pytest.mark.parametrize("shape,window,strides,padding", GEOMETRIES)
@pytest.mark.parametrize("kind", ["random", "relu", "constant"])
def test_values_and_gradients_equal_the_standard_pool(shape, window, strides, padding, kind):
    rng = np.random.default_rng(0)
    x = _inputs(shape, kind, rng)
    ref = nn.max_pool(x, window, strides, padding)
    g = rng.standard_normal(ref.shape).astype(np.float32)

    def loss(pool):
        return lambda v: jnp.sum(pool(v, window, strides, padding) * g)

    np.testing.assert_array_equal(
        jax.jit(lambda v: cpu_pool.max_pool(v, window, strides, padding))(x), ref
    )
    want = jax.grad(loss(nn.max_pool))(x)
    got = jax.jit(jax.grad(loss(cpu_pool.max_pool)))(x)
    # Same positions get the gradient (ties: the first tap); sums of overlapping windows may
    # add in another order.
    np.testing.assert_array_equal(got != 0, want != 0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_the_cpu_lowering_is_the_tap_mask():
    x = jnp.ones((1, 8, 8, 2))
    hlo = (
        jax.jit(jax.grad(lambda v: cpu_pool.max_pool(v, (3, 3), (2, 2), "SAME").sum()))
        .lower(x)
        .as_text()
    )
    assert "select_and_scatter" not in hlo and "reduce_window" not in hlo


def test_other_dtypes_and_ranks_take_the_standard_op():
    x = jnp.arange(2 * 6 * 6 * 1, dtype=jnp.int32).reshape(2, 6, 6, 1)
    np.testing.assert_array_equal(
        cpu_pool.max_pool(x, (2, 2), (2, 2)), nn.max_pool(x, (2, 2), (2, 2))
    )
