"""Tests for jaxres.models: parameter counts, every registered model's outputs, dtypes,
zero-init of residual branches, weight standardisation and registry errors.

Large models are only traced (`jax.eval_shape`), never initialised, to stay fast on CPU.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxres import parallel
from jaxres.errors import ConfigError
from jaxres.models import ResNet, create_model, list_models
from jaxres.models.resnet import EXPANSION, ResidualBlock, StdConv

FEATURE_KEYS = {"stem", "stage1", "stage2", "stage3", "stage4", "pre_logits", "logits"}


def _num_params(tree) -> int:
    return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _trace(model: ResNet, size: int, batch: int = 2):
    """Shapes of (outputs, variables) of `model.init_with_output`, without computing."""
    x = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32)
    return jax.eval_shape(model.init_with_output, jax.random.key(0), x)


def _image_size(model: ResNet) -> int:
    return 32 if model.stem_type == "cifar" else 64


@pytest.mark.parametrize(
    "name, expected",
    [
        ("resnet50", 25_557_032),  # torchvision resnet50
        ("resnet101", 44_549_160),  # torchvision resnet101
        ("resnet152", 60_192_808),  # torchvision resnet152
        ("seresnet50", 28_088_024),  # timm seresnet50
        ("resnetv2_50", 25_549_352),  # timm resnetv2_50
        ("resnetv2_50x1_bit", 25_549_352),  # timm resnetv2_50x1_bit
    ],
)
def test_param_count_matches_reference(name, expected):
    _, variables = _trace(create_model(name, num_classes=1000), size=64, batch=1)
    assert _num_params(variables["params"]) == expected


@pytest.mark.parametrize("name", list_models())
def test_every_model_outputs_logits_and_features(name):
    model = create_model(name, num_classes=10)
    size = _image_size(model)
    (logits, feats), variables = _trace(model, size)

    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert set(feats) == FEATURE_KEYS
    stem_size = size if model.stem_type == "cifar" else size // 4
    stem_chs = model.stem_width * model.width_factor
    assert feats["stem"].shape == (2, stem_size, stem_size, stem_chs)
    for s, width in enumerate(model.widths, start=1):
        hw = stem_size // 2 ** (s - 1)
        out = width * model.width_factor * EXPANSION[model.block]
        assert feats[f"stage{s}"].shape == (2, hw, hw, out), s
    assert feats["pre_logits"].shape == (2, out) and feats["pre_logits"].dtype == jnp.float32
    assert feats["logits"].shape == (2, 10)
    assert ("batch_stats" in variables) == (model.norm == "batch")
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))


def test_headless_model_returns_pre_logits():
    (logits, feats), variables = _trace(create_model("resnetv2_50", num_classes=0), 64)
    assert feats["pre_logits"].shape == logits.shape
    assert logits.shape == (2, 2048)
    assert "head" not in variables["params"]


@functools.cache
def _init_and_step(name: str, dtype: str):
    """Real init, eval forward and train-mode gradient of a small model, in one compile."""
    model = create_model(name, num_classes=10, dtype=dtype)
    x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))

    def run(rng, x):
        variables = model.init(rng, x)

        def loss_fn(params):
            (logits, feats), state = model.apply(
                {**variables, "params": params}, x, train=True, mutable=["batch_stats"]
            )
            return jnp.mean(logits**2) + jnp.mean(feats["pre_logits"]), state

        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(variables["params"])
        return variables, model.apply(variables, x), loss, state, grads

    return parallel.run_once(run, jax.random.key(0), x)  # Level-0 compile on CPU: half this test.


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["resnetv2_tiny", "resnet18"])
def test_real_forward_and_train_step(name, dtype):
    variables, (logits, feats), loss, state, grads = _init_and_step(name, dtype)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    assert logits.shape == (2, 10) and logits.dtype == jnp.float32
    assert feats["stage4"].dtype == jnp.dtype(dtype)
    assert np.isfinite(np.asarray(logits)).all()

    assert np.isfinite(float(loss))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(grads))
    new_stats = state["batch_stats"]
    assert jax.tree.structure(new_stats) == jax.tree.structure(variables["batch_stats"])
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(new_stats))
    # Train mode must move the running statistics towards the batch statistics.
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new_stats, variables["batch_stats"])
    assert any(jax.tree.leaves(moved))


def _block(preact: bool, block: str, zero_init_last: bool) -> ResidualBlock:
    if preact:
        norm = functools.partial(nn.GroupNorm, num_groups=4)
    else:
        norm = functools.partial(nn.BatchNorm, use_running_average=True)
    return ResidualBlock(
        width=8,
        strides=1,
        block=block,
        preact=preact,
        conv=nn.Conv,
        norm=norm,
        act=nn.relu,
        zero_init_last=zero_init_last,
    )


@pytest.mark.parametrize("preact", [True, False])
@pytest.mark.parametrize("block", ["basic", "bottleneck"])
def test_zero_init_last_makes_block_identity(preact, block):
    channels = 8 * EXPANSION[block]
    # Positive input: the v1.5 block's final ReLU is then the identity too.
    x = jnp.abs(jax.random.normal(jax.random.key(1), (2, 6, 6, channels))) + 0.1
    out, _ = parallel.run_once(_block(preact, block, True).init_with_output, jax.random.key(0), x)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(x))
    out, _ = parallel.run_once(_block(preact, block, False).init_with_output, jax.random.key(0), x)
    assert not np.allclose(np.asarray(out), np.asarray(x))


def test_zero_init_last_params_in_full_models():
    v2 = create_model("resnetv2_tiny", num_classes=10, zero_init_last=True)
    params = parallel.run_once(v2.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
    assert not np.any(params["stage2_block1"]["conv2"]["kernel"])
    assert np.any(params["stage2_block1"]["conv1"]["kernel"])

    variables = _init_and_step("resnet18", "float32")[0]  # v1.5 zero-inits by default
    params = variables["params"]
    assert not np.any(params["stage2_block1"]["norm2"]["scale"])
    assert np.all(params["stage2_block1"]["norm1"]["scale"] == 1)


def test_weight_standardised_conv_ignores_kernel_scale():
    conv = StdConv(4, (3, 3), use_bias=False)
    x = jax.random.normal(jax.random.key(1), (1, 5, 5, 3))
    params = parallel.run_once(conv.init, jax.random.key(0), x)
    scaled = jax.tree.map(lambda k: 3.0 * k + 0.5, params)
    apply = jax.jit(conv.apply)
    np.testing.assert_allclose(apply(params, x), apply(scaled, x), rtol=1e-4, atol=1e-4)


def test_parameter_names_are_stable():
    _, variables = _trace(create_model("resnet50"), 64)
    params = variables["params"]
    assert {"stem_conv", "stem_norm", "stage1_block1", "stage4_block3", "head"} <= set(params)
    assert set(params["stage1_block1"]) == {
        "conv1",
        "norm1",
        "conv2",
        "norm2",
        "conv3",
        "norm3",
        "downsample_conv",
        "downsample_norm",
    }
    _, variables = _trace(create_model("seresnetv2_50"), 64)
    params = variables["params"]
    assert "final_norm" in params and "stem_norm" not in params
    assert set(params["stage2_block1"]) == {
        "norm1",
        "conv1",
        "norm2",
        "conv2",
        "norm3",
        "conv3",
        "downsample_conv",
        "se",
    }
    assert set(params["stage2_block1"]["se"]) == {"fc1", "fc2"}


def test_alias_resolves_to_registered_model():
    assert create_model("resnetv2_50x1_bitm") == create_model("resnetv2_50x1_bit")


def test_unknown_model_name_suggests_close_match():
    with pytest.raises(ConfigError, match="Did you mean 'resnetv2_50'"):
        create_model("resnetv2_5O")


def test_unknown_override_names_field_and_close_match():
    with pytest.raises(ConfigError, match="'widht_factor'.*Did you mean 'width_factor'"):
        create_model("resnet50", widht_factor=2)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"dtype": "float8"}, "Unknown dtype 'float8'"),
        ({"stem_type": "fixd"}, "Did you mean 'fixed'"),
        ({"norm": "layer"}, "Unknown ResNet norm 'layer'"),
        ({"num_classes": -1}, "num_classes must be >= 0"),
    ],
)
def test_bad_values_raise_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        create_model("resnet18", **overrides)


@pytest.mark.parametrize("stem_type, stem_size", [("default", 16), ("fixed", 16), ("same", 16)])
def test_stem_types_downsample_by_four(stem_type, stem_size):
    model = create_model("resnetv2_50", num_classes=10, stem_type=stem_type)
    (_, feats), _ = _trace(model, 64)
    assert feats["stem"].shape == (2, stem_size, stem_size, 64)
