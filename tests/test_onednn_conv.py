"""oneDNN's convolutions (`cpu_conv.conv(..., backend="onednn")`) equal XLA's, and the fallback.

Parity: forward, input gradient and weight gradient against `lax.conv_general_dilated` (relative
error <= 1e-5) on hand-picked geometries (strides, VALID / SAME / asymmetric padding, kernel
dilation) and on every distinct conv geometry of the registered model families; whole-model gradients.
These need the kernels `pip install -e .` builds (skipped where they could not be built: the
fallback tests below then cover what runs instead).
"""

from __future__ import annotations

import functools
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jaxres import models, parallel
from jaxres.bench import op_profile
from jaxres.errors import ConfigError
from jaxres.models import cpu_conv, onednn

NHWC = ("NHWC", "HWIO", "NHWC")
RTOL = 1e-5
needs_onednn = pytest.mark.skipif(not onednn.available(), reason="oneDNN kernels not built here")


def _rel(a: jax.Array, b: jax.Array) -> float:
    """Max absolute difference relative to the largest reference value."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(a)), 1e-30))


def _check(x_shape, k_shape, strides, padding, dilation=(1, 1), seed=0):
    """Forward and both gradients of the oneDNN conv vs XLA's, jitted, within RTOL."""
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.standard_normal(x_shape), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal(k_shape), jnp.float32)
    kwargs = {"window_strides": strides, "padding": padding, "rhs_dilation": dilation,
              "dimension_numbers": NHWC}
    y_ref, vjp_ref = jax.vjp(functools.partial(lax.conv_general_dilated, **kwargs), x, kernel)
    ours = functools.partial(cpu_conv.conv, backend="onednn", **kwargs)
    assert "ffi_call" in str(jax.make_jaxpr(jax.grad(lambda x, k: ours(x, k).sum()))(x, kernel))
    y, vjp = jax.vjp(jax.jit(ours), x, kernel)
    g = jnp.asarray(rng.standard_normal(y_ref.shape), jnp.float32)
    assert y.shape == y_ref.shape and _rel(y_ref, y) <= RTOL
    for ref, got in zip(vjp_ref(g), jax.jit(vjp)(g)):
        assert ref.shape == got.shape and _rel(ref, got) <= RTOL


# (x shape, kernel shape, stride, padding, kernel dilation): the models' (k//2, k//2) padding,
# VALID / SAME with odd sizes, asymmetric padding, dilation, batch 1 and 3.
CASES = [
    ((3, 9, 9, 5), (1, 1, 5, 4), (1, 1), ((0, 0), (0, 0)), (1, 1)),
    ((1, 9, 7, 5), (1, 1, 5, 6), (2, 2), ((0, 0), (0, 0)), (1, 1)),
    ((3, 8, 8, 4), (3, 3, 4, 5), (1, 1), ((1, 1), (1, 1)), (1, 1)),
    ((1, 9, 11, 3), (3, 3, 3, 4), (2, 2), ((1, 1), (1, 1)), (1, 1)),
    ((1, 15, 13, 3), (7, 7, 3, 8), (2, 2), ((3, 3), (3, 3)), (1, 1)),
    ((3, 10, 9, 4), (3, 3, 4, 4), (2, 2), "VALID", (1, 1)),
    ((1, 9, 9, 4), (3, 3, 4, 4), (2, 2), "SAME", (1, 1)),
    ((2, 8, 8, 3), (3, 3, 3, 2), (2, 1), ((0, 1), (2, 0)), (1, 1)),
    ((2, 12, 12, 4), (3, 3, 4, 6), (1, 1), ((2, 2), (2, 2)), (2, 2)),
    ((1, 13, 11, 4), (3, 3, 4, 4), (2, 2), "SAME", (3, 2)),
]


@needs_onednn
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[1][0]}x{c[1][1]}s{c[2][0]}{c[2][1]}_{c[3]}_d{c[4][0]}")
def test_forward_and_both_gradients_match_xla(case):
    _check(*case)


# One model per conv-geometry family: basic and bottleneck v1.5 (stride on the 3x3), pre-activation
# v2, SE, BiT (weight-standardised, its own stem). Deeper and wider variants repeat these kernels,
# strides and paddings with other stage lengths and channel counts.
FAMILIES = ("resnet18", "resnet50", "resnetv2_50", "seresnet50", "resnetv2_50x1_bit")


def _model_geometries() -> dict[tuple, op_profile.ConvShape]:
    """One conv per distinct (kernel, stride, padding, input-is-RGB) geometry of the families,
    at 32 px with the model's own channel counts."""
    found = {}
    for name in FAMILIES:
        convs, _, _ = op_profile.model_shapes(name, image_size=32, batch_size=1)
        for shape in convs:
            found.setdefault((shape.kh, shape.kw, shape.stride, shape.pads, shape.cin == 3), shape)
    return found


@needs_onednn
def test_every_conv_geometry_of_the_model_families_matches_xla():
    shapes = _model_geometries()
    assert {(k[0], k[2]) for k in shapes} >= {(1, (1, 1)), (1, (2, 2)), (3, (1, 1)), (3, (2, 2)), (7, (2, 2))}
    for shape in shapes.values():
        _check((2, shape.h, shape.w, shape.cin), (shape.kh, shape.kw, shape.cin, shape.cout),
               shape.stride, shape.pads)


@needs_onednn
@pytest.mark.parametrize("name", ["resnet18", "resnetv2_18"])
def test_whole_model_gradient_matches_xla(name):
    """The parameter gradient of a whole model, oneDNN vs XLA convs. Inference-mode BatchNorm:
    with batch statistics on a 2-image batch, the BatchNorm gradients cancel to near zero and a
    1e-7 change of the input moves XLA's own gradient by ~5e-3 relative, so only this is a test."""
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 32, 32, 3)), jnp.float32)
    model = models.create_model(name, num_classes=4)
    variables = parallel.run_once(model.init, jax.random.key(0), x)

    def grads(backend):
        net = models.create_model(name, num_classes=4, cpu_conv=backend)
        def loss(p):
            return (net.apply({**variables, "params": p}, x)[0] @ jnp.arange(4.0)).sum()

        return jax.jit(jax.grad(loss))(variables["params"])

    for ref, got in zip(jax.tree.leaves(grads("xla")), jax.tree.leaves(grads("onednn"))):
        assert _rel(ref, got) <= RTOL


def test_unknown_backend_names_the_valid_ones():
    x, k = jnp.ones((1, 4, 4, 2)), jnp.ones((1, 1, 2, 2))
    with pytest.raises(ConfigError, match="onednn"):
        cpu_conv.conv(x, k, (1, 1), "SAME", dimension_numbers=NHWC, backend="mkl")
    with pytest.raises(ConfigError, match="cpu_conv"):
        models.create_model("resnet18", cpu_conv="mkl")


def test_bfloat16_convs_take_the_matmul_path():
    """oneDNN's kernels are float32 only: other dtypes keep XLA's forward + the matmul backward."""
    x = jnp.ones((2, 8, 8, 4), jnp.bfloat16)
    k = jnp.ones((1, 1, 4, 4), jnp.bfloat16)
    jaxpr = str(jax.make_jaxpr(lambda x, k: cpu_conv.conv(x, k, (1, 1), "SAME", dimension_numbers=NHWC))(x, k))
    assert "ffi_call" not in jaxpr and "custom_vjp_call" in jaxpr


def test_a_failed_load_says_so_once_and_falls_back(monkeypatch, caplog):
    """Kernels that cannot load (not built, no libdnnl): one warning naming the fix, then the
    matmul path, with the same values."""

    def fail():
        raise OSError("jaxres/models/_onednn_conv*.so was not built")

    monkeypatch.setattr(onednn, "_load", fail)
    onednn.available.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger=onednn.__name__):
            assert not onednn.available() and not onednn.available()
        assert len(caplog.records) == 1 and "pip install -e ." in caplog.records[0].getMessage()
        x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 8, 8, 4)), jnp.float32)
        k = jnp.asarray(np.random.default_rng(2).normal(size=(1, 1, 4, 3)), jnp.float32)
        conv = functools.partial(cpu_conv.conv, window_strides=(1, 1), padding="SAME", dimension_numbers=NHWC)
        assert "ffi_call" not in str(jax.make_jaxpr(conv)(x, k))
        assert _rel(lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=NHWC), conv(x, k)) <= RTOL
    finally:
        onednn.available.cache_clear()


def test_the_environment_switch_turns_it_off():
    """JAXRES_ONEDNN=0 (read once, at import): no oneDNN call in the model, no warning either."""
    code = (
        "import jax, jax.numpy as jnp\n"
        "from jaxres import models\n"
        "from jaxres.models import onednn\n"
        "m = models.create_model('resnet18', num_classes=2)\n"
        "x = jnp.ones((1, 32, 32, 3))\n"
        "v = jax.eval_shape(lambda: m.init(jax.random.key(0), x))\n"
        "print(onednn.available(), 'ffi_call' in str(jax.make_jaxpr(lambda v: m.apply(v, x))(v)))\n"
    )
    env = {**os.environ, "JAXRES_ONEDNN": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
    assert "unavailable" not in out.stderr
