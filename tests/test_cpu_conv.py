"""`cpu_conv.conv` with the matmul backend equals `lax.conv_general_dilated`: forward, input
gradient and weight gradient (the oneDNN backend: tests/test_onednn_conv.py)."""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxres import parallel
from jaxres.bench import op_profile
from jaxres.models import cpu_conv

NHWC = ("NHWC", "HWIO", "NHWC")
MATMUL = functools.partial(cpu_conv.conv, backend="matmul")
RTOL = 1e-5


def _rel(a: jax.Array, b: jax.Array) -> float:
    """Max absolute difference relative to the largest reference value."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))


# (batch, height, width, in, out, kernel, stride, padding): the models' symmetric (k//2, k//2)
# padding, VALID, odd sizes, batch 1 and 3.
CASES = [
    (3, 9, 9, 5, 4, 1, 1, ((0, 0), (0, 0))),
    (1, 9, 7, 5, 6, 1, 2, ((0, 0), (0, 0))),
    (3, 8, 8, 4, 5, 3, 1, ((1, 1), (1, 1))),
    (1, 9, 11, 3, 4, 3, 2, ((1, 1), (1, 1))),
    (3, 10, 10, 4, 3, 3, 2, ((1, 1), (1, 1))),
    (1, 15, 13, 3, 8, 7, 2, ((3, 3), (3, 3))),
    (3, 9, 9, 4, 4, 3, 1, "VALID"),
    (3, 10, 9, 4, 4, 3, 2, "VALID"),
    (1, 9, 9, 4, 4, 3, 2, "SAME"),
]


@pytest.fixture(autouse=True)
def every_conv_takes_the_matmuls(monkeypatch, request):
    """The parity tests' convs are small: without this, KxK ones would keep XLA's backward."""
    if "threshold" not in request.node.name:
        monkeypatch.setattr(cpu_conv, "MATMUL_MIN_FLOPS", 0)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"b{c[0]}_{c[1]}x{c[2]}_k{c[5]}s{c[6]}_{c[7]}")
def test_forward_and_both_gradients_match_xla(case):
    n, h, w, ci, co, k, s, padding = case
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, h, w, ci)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, ci, co)), jnp.float32)
    reference = functools.partial(lax.conv_general_dilated, window_strides=(s, s), padding=padding,
                                  dimension_numbers=NHWC)
    custom = functools.partial(MATMUL, window_strides=(s, s), padding=padding, dimension_numbers=NHWC)
    y_ref, vjp_ref = jax.vjp(lambda x, k: reference(x, k), x, kernel)
    y, vjp = jax.vjp(jax.jit(lambda x, k: custom(x, k)), x, kernel)
    g = jnp.asarray(rng.standard_normal(y_ref.shape), jnp.float32)
    assert y.shape == y_ref.shape
    assert _rel(y_ref, y) <= RTOL
    for ref, got in zip(vjp_ref(g), jax.jit(vjp)(g)):
        assert ref.shape == got.shape
        assert _rel(ref, got) <= RTOL


@pytest.mark.parametrize("case", [CASES[i] for i in (2, 4, 5, 7)], ids=["3x3s1", "3x3s2", "7x7s2", "valid_s2"])
@pytest.mark.parametrize("im2col", [False, True], ids=["taps", "im2col"])
def test_matmul_gradients_on_every_path(case, im2col):
    """Both weight-gradient forms and the col2im input gradient, whatever the size rules pick."""
    n, h, w, ci, co, k, s, padding = case
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.standard_normal((n, h, w, ci)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((k, k, ci, co)), jnp.float32)
    pads = lax.padtype_to_pads((h, w), (k, k), (s, s), padding) if isinstance(padding, str) else padding
    y, vjp = jax.vjp(lambda x, k: lax.conv_general_dilated(x, k, (s, s), pads, dimension_numbers=NHWC), x, kernel)
    g = jnp.asarray(rng.standard_normal(y.shape), jnp.float32)
    dx_ref, dw_ref = vjp(g)
    dw = jax.jit(lambda x, g: cpu_conv.weight_grad_matmul(x, g, kernel.shape, (s, s), pads, im2col=im2col))(x, g)
    dx = jax.jit(lambda g, k: cpu_conv.input_grad_matmul(g, k, x.shape, (s, s), pads))(g, kernel)
    assert _rel(dw_ref, dw) <= RTOL
    assert _rel(dx_ref, dx) <= RTOL
    assert _rel(y, jax.jit(lambda x, k: op_profile.forward_matmul(x, k, (s, s), pads))(x, kernel)) <= RTOL


def test_grad_of_a_loss_under_jit_matches():
    """jax.grad of a scalar loss through two stacked convs (3x3/2 then 1x1), jitted."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((3, 11, 11, 3)), jnp.float32)
    params = (jnp.asarray(rng.standard_normal((3, 3, 3, 8)), jnp.float32),
              jnp.asarray(rng.standard_normal((1, 1, 8, 4)), jnp.float32))

    def loss(conv, params, x):
        y = conv(x, params[0], (2, 2), ((1, 1), (1, 1)), dimension_numbers=NHWC)
        y = conv(jnp.tanh(y), params[1], (1, 1), ((0, 0), (0, 0)), dimension_numbers=NHWC)
        return jnp.sum(y**2)

    ref = jax.jit(jax.grad(functools.partial(loss, lax.conv_general_dilated), argnums=(0, 1)))(params, x)
    got = jax.jit(jax.grad(functools.partial(loss, MATMUL), argnums=(0, 1)))(params, x)
    for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(got)):
        assert _rel(a, b) <= RTOL


def test_flax_conv_with_it_matches_plain_flax_conv():
    """The wiring the module doc names: `nn.Conv(..., conv_general_dilated=partial(cpu_conv.conv, backend=...))`."""
    x = jnp.asarray(np.random.default_rng(2).standard_normal((1, 9, 9, 4)), jnp.float32)
    plain = nn.Conv(6, (3, 3), strides=2, padding=((1, 1), (1, 1)), use_bias=False)
    custom = nn.Conv(6, (3, 3), strides=2, padding=((1, 1), (1, 1)), use_bias=False,
                     conv_general_dilated=MATMUL)
    variables = plain.init(jax.random.key(0), x)

    def loss(module, v, x):
        return jnp.sum(jnp.sin(module.apply(v, x)))

    ref = jax.grad(functools.partial(loss, plain), argnums=(0, 1))(variables, x)
    got = jax.jit(jax.grad(functools.partial(loss, custom), argnums=(0, 1)))(variables, x)
    for a, b in zip(jax.tree_util.tree_leaves(ref), jax.tree_util.tree_leaves(got)):
        assert _rel(a, b) <= RTOL


def test_unsupported_convs_fall_back_to_xla():
    """Dilated, grouped and NCHW convs go straight to `lax.conv_general_dilated` (same values)."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.standard_normal((2, 9, 9, 4)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, 2, 4)), jnp.float32)
    kwargs = {"window_strides": (1, 1), "padding": "SAME", "rhs_dilation": (2, 2),
              "dimension_numbers": NHWC, "feature_group_count": 2}
    assert _rel(lax.conv_general_dilated(x, k, **kwargs), cpu_conv.conv(x, k, **kwargs)) == 0.0
    xn = jnp.transpose(x, (0, 3, 1, 2))
    kn = jnp.asarray(rng.standard_normal((4, 4, 3, 3)), jnp.float32)
    assert _rel(lax.conv_general_dilated(xn, kn, (1, 1), "SAME"), cpu_conv.conv(xn, kn, (1, 1), "SAME")) == 0.0


def test_jaxpr_uses_matmuls_for_the_backward_on_cpu():
    """On CPU the lowered backward has dot ops; the standard branch's convs are what other platforms get."""
    x = jnp.ones((1, 8, 8, 4), jnp.float32)
    k = jnp.ones((3, 3, 4, 4), jnp.float32)

    def loss(k):
        return jnp.sum(MATMUL(x, k, (2, 2), ((1, 1), (1, 1)), dimension_numbers=NHWC))

    hlo = jax.jit(jax.grad(loss)).lower(k).as_text()
    assert "dot_general" in hlo


def test_the_model_uses_it_and_cpu_conv_xla_turns_it_off():
    """Every ResNet conv goes through cpu_conv (its CPU-or-not switch is in the traced gradient);
    the model's `cpu_conv="xla"` has none, and the gradients agree."""
    from jaxres import models

    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)

    def grad_fn(backend):
        model = models.create_model("resnet18", num_classes=4, cpu_conv=backend)
        return jax.grad(lambda params: model.apply({**variables, "params": params}, x)[0].sum())

    model = models.create_model("resnet18", num_classes=4)
    variables = parallel.run_once(model.init, jax.random.key(0), x)  # Eager init: op by op, seconds.
    assert "platform_index" in str(jax.make_jaxpr(grad_fn("matmul"))(variables["params"]))
    assert "platform_index" not in str(jax.make_jaxpr(grad_fn("xla"))(variables["params"]))
    reference = jax.jit(grad_fn("xla"))(variables["params"])
    ours = jax.jit(grad_fn("matmul"))(variables["params"])
    for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(ours)):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_the_flop_threshold_routes_small_kxk_convs_to_xla():
    """KxK convs under `MATMUL_MIN_FLOPS` are plain XLA convs; 1x1 and large KxK ones take the matmuls."""

    def custom(x_shape, k_shape, stride):
        def conv(x, k):
            return MATMUL(x, k, (stride, stride), "SAME", dimension_numbers=NHWC)

        x, k = jax.ShapeDtypeStruct(x_shape, jnp.float32), jax.ShapeDtypeStruct(k_shape, jnp.float32)
        return "custom_vjp_call" in str(jax.make_jaxpr(conv)(x, k))

    assert cpu_conv.MATMUL_MIN_FLOPS == 1e9
    assert not custom((32, 32, 32, 32), (3, 3, 32, 32), 1)  # 0.6 GFLOP: the demo's 3x3 convs.
    assert custom((32, 32, 32, 32), (1, 1, 32, 64), 2)  # 1x1: always.
    assert custom((32, 56, 56, 64), (3, 3, 64, 64), 1)  # 7.4 GFLOP: ResNet-50's.
    # A symbolic batch (a shape-polymorphic export's forward) has no FLOP count: the custom path.
    (batch,) = jax.export.symbolic_shape("b")
    assert custom((batch, 8, 8, 4), (3, 3, 4, 4), 1)
