"""Model names -> configured `ResNet` modules.

Each name is a small factory decorated with `@register_model` that returns the `ResNet`
fields of that variant (timm `resnetv2.py` style). `create_model` adds the class count,
compute dtype and per-experiment overrides, and checks every name it is given::

    model = create_model("resnetv2_50", num_classes=10, dtype="bfloat16")
    model = create_model("resnetv2_50x1_bit", num_classes=37, head_zero_init=True)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp

from jaxres.errors import ConfigError, unknown_name
from jaxres.models.resnet import ResNet, config_fields

ModelFields = dict[str, Any]

_MODELS: dict[str, Callable[[], ModelFields]] = {}

# Old or alternative spellings -> registered names (timm's deprecations, papers' names).
_ALIASES = {
    "resnet50_v1_5": "resnet50",
    "se_resnet50": "seresnet50",
    "se_resnet101": "seresnet101",
    "se_resnet152": "seresnet152",
    "resnetv2_50x1_bitm": "resnetv2_50x1_bit",
    "resnetv2_50x3_bitm": "resnetv2_50x3_bit",
    "resnetv2_101x1_bitm": "resnetv2_101x1_bit",
    "resnetv2_152x2_bitm": "resnetv2_152x2_bit",
    "bit_m_r50x1": "resnetv2_50x1_bit",
    "bit_m_r50x3": "resnetv2_50x3_bit",
    "bit_m_r101x1": "resnetv2_101x1_bit",
    "bit_m_r152x2": "resnetv2_152x2_bit",
}

# Blocks per stage for each depth (He et al. 2016a/b; 200 from the pre-activation paper).
STAGE_SIZES = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
    200: (3, 24, 36, 3),
}

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}

# timm SE-ResNets reduce channels by 16 in the excitation bottleneck.
SE_RATIO = 1 / 16


def register_model(factory: Callable[[], ModelFields]) -> Callable[[], ModelFields]:
    """Registers `factory` under its function name.

    Args:
      factory: a no-argument function returning `ResNet` field values.

    Returns:
      `factory`, unchanged.
    """
    _MODELS[factory.__name__] = factory
    return factory


def list_models() -> list[str]:
    """Returns the sorted registered model names (aliases excluded)."""
    return sorted(_MODELS)


def create_model(
    name: str, num_classes: int = 1000, dtype: str | Any = "float32", **overrides: Any
) -> ResNet:
    """Builds a registered model.

    Args:
      name: a name from `list_models()` or an alias of one.
      num_classes: head outputs; 0 for a headless feature extractor.
      dtype: compute dtype, "float32", "bfloat16" or "float16" (or the jnp dtype);
        parameters stay float32.
      **overrides: `ResNet` fields replacing the variant's values.

    Returns:
      The configured, unbound `ResNet` module.

    Raises:
      ConfigError: for an unknown name, override field or dtype.
    """
    arch = _ALIASES.get(name, name)
    if arch not in _MODELS:
        raise ConfigError(unknown_name("model", name, list_models()))
    # num_classes and dtype are create_model's own arguments, so never overrides.
    valid = [f for f in config_fields() if f not in ("num_classes", "dtype")]
    for field in overrides:
        if field not in valid:
            raise ConfigError(
                unknown_name("model override", field, valid) + f" (creating {name!r})"
            )
    fields = {**_MODELS[arch](), **overrides}
    # Configs hold lists; tuples keep the module hashable and its repr stable.
    for field in ("stage_sizes", "widths"):
        fields[field] = tuple(fields.get(field, getattr(ResNet, field)))
    return ResNet(num_classes=num_classes, dtype=_to_dtype(dtype), **fields)


def _to_dtype(dtype: str | Any) -> Any:
    try:
        key = dtype if isinstance(dtype, str) else jnp.dtype(dtype).name
    except TypeError:
        key = str(dtype)
    if key not in _DTYPES:
        raise ConfigError(unknown_name("dtype", str(dtype), _DTYPES))
    return _DTYPES[key]


def _resnet_v1(depth: int, **fields: Any) -> ModelFields:
    # torchvision ResNet v1.5; the last BN of each branch starts at zero (Goyal et al.).
    base = {
        "stage_sizes": STAGE_SIZES[depth],
        "block": "basic" if depth < 50 else "bottleneck",
        "preact": False,
        "final_norm": False,
        "zero_init_last": True,
        "head_zero_init": False,
    }
    return {**base, **fields}


def _resnet_v2(depth: int, **fields: Any) -> ModelFields:
    # timm resnetv2_*: BatchNorm, pre-activation, final norm; zero head as BiT.
    base = {
        "stage_sizes": STAGE_SIZES[depth],
        "block": "basic" if depth < 50 else "bottleneck",
        "preact": True,
        "final_norm": True,
        "zero_init_last": False,
        "head_zero_init": True,
    }
    return {**base, **fields}


def _bit(depth: int, width_factor: int) -> ModelFields:
    # timm resnetv2_*_bit: GroupNorm(32) + weight-standardised convs, BiT 'fixed' stem.
    return _resnet_v2(
        depth, width_factor=width_factor, norm="group", weight_std=True, stem_type="fixed"
    )


@register_model
def resnet18() -> ModelFields:
    return _resnet_v1(18)


@register_model
def resnet34() -> ModelFields:
    return _resnet_v1(34)


@register_model
def resnet50() -> ModelFields:
    return _resnet_v1(50)


@register_model
def resnet101() -> ModelFields:
    return _resnet_v1(101)


@register_model
def resnet152() -> ModelFields:
    return _resnet_v1(152)


@register_model
def resnet200() -> ModelFields:
    return _resnet_v1(200)


@register_model
def seresnet50() -> ModelFields:
    return _resnet_v1(50, se_ratio=SE_RATIO)


@register_model
def seresnet101() -> ModelFields:
    return _resnet_v1(101, se_ratio=SE_RATIO)


@register_model
def seresnet152() -> ModelFields:
    return _resnet_v1(152, se_ratio=SE_RATIO)


@register_model
def resnetv2_18() -> ModelFields:
    return _resnet_v2(18)


@register_model
def resnetv2_34() -> ModelFields:
    return _resnet_v2(34)


@register_model
def resnetv2_50() -> ModelFields:
    return _resnet_v2(50)


@register_model
def resnetv2_101() -> ModelFields:
    return _resnet_v2(101)


@register_model
def resnetv2_152() -> ModelFields:
    return _resnet_v2(152)


@register_model
def resnetv2_200() -> ModelFields:
    return _resnet_v2(200)


@register_model
def seresnetv2_50() -> ModelFields:
    return _resnet_v2(50, se_ratio=SE_RATIO)


@register_model
def seresnetv2_101() -> ModelFields:
    return _resnet_v2(101, se_ratio=SE_RATIO)


@register_model
def resnetv2_50x1_bit() -> ModelFields:
    return _bit(50, 1)


@register_model
def resnetv2_50x3_bit() -> ModelFields:
    return _bit(50, 3)


@register_model
def resnetv2_101x1_bit() -> ModelFields:
    return _bit(101, 1)


@register_model
def resnetv2_101x3_bit() -> ModelFields:
    return _bit(101, 3)


@register_model
def resnetv2_152x2_bit() -> ModelFields:
    return _bit(152, 2)


@register_model
def resnetv2_152x4_bit() -> ModelFields:
    return _bit(152, 4)


@register_model
def resnetv2_tiny() -> ModelFields:
    """Test / demo model: one pre-activation basic block per stage, 32x32 inputs."""
    return _resnet_v2(
        18, stage_sizes=(1, 1, 1, 1), stem_width=16, widths=(16, 32, 64, 128), stem_type="cifar"
    )
