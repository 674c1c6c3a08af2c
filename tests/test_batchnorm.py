"""`batchnorm.BatchNorm`: flax's BatchNorm values, statistics, variables and gradients."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxres.models import batchnorm


def _both(dtype, **kw):
    common = dict(momentum=0.9, epsilon=1.001e-5, dtype=dtype, param_dtype=jnp.float32, **kw)
    return nn.BatchNorm(force_float32_reductions=True, **common), batchnorm.BatchNorm(**common)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_training_mode_matches_flax(dtype):
    rng = np.random.default_rng(0)
    # A large mean, as on a residual stream, and a non-trivial scale and bias.
    x = jnp.asarray(rng.normal(3.0, 2.0, (4, 6, 5, 8)), dtype)
    g = jnp.asarray(rng.standard_normal((4, 6, 5, 8)), jnp.float32)
    flax_bn, ours = _both(dtype)
    variables = flax_bn.init(jax.random.key(0), x, use_running_average=False)
    assert jax.tree.structure(ours.init(jax.random.key(0), x)) == jax.tree.structure(variables)
    params = {
        "scale": jnp.asarray(rng.uniform(0.5, 2, 8), jnp.float32),
        "bias": jnp.asarray(rng.standard_normal(8), jnp.float32),
    }

    def run(module, kwargs):
        def loss(params, x):
            y, state = module.apply(
                {**variables, "params": params}, x, mutable=["batch_stats"], **kwargs
            )
            return jnp.sum(y.astype(jnp.float32) * g), (y, state)

        return jax.jit(jax.grad(loss, argnums=(0, 1), has_aux=True))(params, x)

    (want_dp, want_dx), (want_y, want_state) = run(flax_bn, {"use_running_average": False})
    (got_dp, got_dx), (got_y, got_state) = run(ours, {})
    tol = 1e-5 if dtype == jnp.float32 else 2e-2
    assert got_y.dtype == want_y.dtype
    np.testing.assert_allclose(np.float32(got_y), np.float32(want_y), rtol=tol, atol=tol)
    for a, b in zip(jax.tree.leaves(got_state), jax.tree.leaves(want_state)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves((got_dp, got_dx)), jax.tree.leaves((want_dp, want_dx))):
        np.testing.assert_allclose(np.float32(a), np.float32(b), rtol=tol, atol=tol * 10)


def test_running_average_mode_matches_flax():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((2, 3, 3, 4)), jnp.float32)
    flax_bn, ours = _both(jnp.float32, use_running_average=True)
    variables = flax_bn.init(jax.random.key(0), x)
    variables = jax.tree.map(
        lambda v: v + jnp.asarray(rng.uniform(0.1, 1, v.shape), v.dtype), variables
    )
    np.testing.assert_allclose(
        ours.apply(variables, x), flax_bn.apply(variables, x), rtol=1e-6, atol=1e-6
    )


def test_the_cpu_gradient_is_the_closed_form():
    """Four reductions on CPU (sum, sum of squares; sum of g, of g * x_hat); autodiff has six."""
    x = jnp.ones((2, 4, 4, 3))

    def reductions(module):
        variables = module.init(jax.random.key(0), x)

        def loss(x):
            return module.apply(variables, x, mutable=["batch_stats"])[0].sum()

        return jax.jit(jax.grad(loss)).lower(x).as_text().count("stablehlo.reduce")

    assert reductions(batchnorm.BatchNorm()) == 4
    assert reductions(nn.BatchNorm(use_running_average=False)) > 4
