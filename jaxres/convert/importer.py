"""Import pretrained ResNet weights (Keras Applications, timm, torchvision, BiT .npz).

    python scripts/convert_weights.py --source keras --model ResNet50V2 \
        --input resnet50v2.weights.h5 --output runs/keras_resnet50v2
    python scripts/evaluate.py --workdir runs/keras_resnet50v2

`convert` reads a local file (it never downloads) into jaxres variables;
`save_run` writes a run directory (`runs.write_run`: `config.json` + `checkpoints/` step 0)
that `evaluate`, `predict`, `linear_probe` and the trainer's `init_from` accept.

Every source network is one of the registered jaxres models, with `ResNet` field
overrides where the source's layout differs (recorded in `config.json`):

==================  ==================================  ==================================
source --model      jaxres model (+ overrides)          preprocessing
==================  ==================================  ==================================
torchvision resnet* resnet*                             ImageNet mean/std
timm resnet*,       same name                           ImageNet mean/std
 seresnet*,
 resnetv2_*
timm / bit_npz      resnetv2_*_bit                      [-1, 1]
 resnetv2_*_bit
keras ResNet*V2     resnetv2_* + `KERAS_V2`             [-1, 1]
keras ResNet*       resnet* + `KERAS_V1`                Caffe: BGR, minus the BGR mean
==================  ==================================  ==================================

Preprocessing is always jaxres' on-device `normalize(x, mean, std)` of RGB uint8
images: [-1, 1] is mean = std = 127.5. Keras' Caffe-style ResNets expect BGR input:
instead of a channel-flip op, the first conv's input channels are reversed, so the
imported model takes RGB with mean (123.68, 116.779, 103.939) in RGB order, std 1.

Conversion is strict: every jaxres variable is assigned exactly once from a tensor
of the expected shape, and every tensor of the file is used, except PyTorch's
`num_batches_tracked` counters and Keras optimizer state. A missing, unused or
mis-shaped tensor raises `CheckpointError` naming the key and what was expected,
so a file of another architecture fails instead of leaving weights at random init.

Weights out (`jaxres.convert.exporter`) walk the same `template` and name maps in reverse.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import hashlib
import os
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxres import models, runs
from jaxres.config_base import IMAGENET_MEAN, IMAGENET_STD, base_config
from jaxres.convert import formats as src
from jaxres.errors import CheckpointError, ConfigError, unknown_name

SOURCES = ("keras", "timm", "torchvision", "bit_npz")

# Keras Applications ResNet (v1, Caffe weights): stride on the first 1x1 conv, a bias
# on every conv, BatchNorm epsilon 1.001e-5, zero-padded max-pool (== -inf after ReLU).
KERAS_V1 = {"stride_in_1x1": True, "conv_bias": "all", "norm_eps": 1.001e-5, "stem_type": "fixed"}
# Keras ResNetV2: the last block of stages 1-3 strides (identity shortcut subsampled),
# biases on stem / projection / last conv only, and the un-activated stem output is
# zero-padded before the max-pool ("fixed" stem).
KERAS_V2 = {
    "stride_block": "last",
    "conv_bias": "residual",
    "norm_eps": 1.001e-5,
    "stem_type": "fixed",
}

# mode -> RGB mean / std in uint8 units, and what the source expects.
PREPROCESSING = {
    "imagenet": (
        IMAGENET_MEAN,
        IMAGENET_STD,
        "x / 255, minus ImageNet mean, over ImageNet std (RGB)",
    ),
    "[-1,1]": ((127.5,) * 3, (127.5,) * 3, "x / 127.5 - 1 (RGB)"),
    "caffe": (
        (123.68, 116.779, 103.939),
        (1.0, 1.0, 1.0),
        (
            "Caffe: BGR minus mean (103.939, 116.779, 123.68), no scaling; the BGR channel "
            "order is folded into stem_conv, so jaxres feeds RGB minus the RGB-ordered mean"
        ),
    ),
}
RESIZE_RULE = (
    "resize the shorter side to image_size / eval_crop_ratio (bilinear), centre-crop image_size"
)

_TORCHVISION = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
_BIT = tuple(f"resnetv2_{v}_bit" for v in ("50x1", "50x3", "101x1", "101x3", "152x2", "152x4"))
_TIMM = (
    _TORCHVISION
    + ("resnet200", "seresnet50", "seresnet101", "seresnet152")
    + tuple(f"resnetv2_{d}" for d in (18, 34, 50, 101, 152))
    + _BIT
)
# Keras Applications name (lower case) -> (jaxres model, is ResNetV2).
_KERAS = {
    f"resnet{d}{v}": (f"resnet{'v2_' if v else ''}{d}", bool(v))
    for d in (50, 101, 152)
    for v in ("", "v2")
}
_KERAS_NAMES = ("ResNet50", "ResNet101", "ResNet152", "ResNet50V2", "ResNet101V2", "ResNet152V2")


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A source network in jaxres terms.

    Attributes:
      model: the registered jaxres model name.
      overrides: `ResNet` fields that differ from the registered model.
      preprocessing: a key of `PREPROCESSING`.
    """

    model: str
    overrides: dict[str, Any]
    preprocessing: str


def architecture(source: str, name: str) -> Architecture:
    """The jaxres architecture of `name` in `source` (see the module docstring's table).

    Raises:
      ConfigError: unknown source, or a model that source does not provide.
    """
    if source not in SOURCES:
        raise ConfigError(unknown_name("weights source", source, SOURCES))
    if source == "keras":
        key = name.lower().replace("_", "")
        if key not in _KERAS:
            raise ConfigError(unknown_name("Keras Applications model", name, _KERAS_NAMES))
        model, v2 = _KERAS[key]
        return Architecture(model, dict(KERAS_V2 if v2 else KERAS_V1), "[-1,1]" if v2 else "caffe")
    valid = source_models(source)
    if name not in valid:
        raise ConfigError(unknown_name(f"{source} model", name, valid))
    return Architecture(name, {}, "[-1,1]" if name in _BIT else "imagenet")


def source_models(source: str) -> tuple[str, ...]:
    """The model names `architecture(source, name)` accepts (the importer's and exporter's twins).

    Raises:
      ConfigError: unknown source.
    """
    if source not in SOURCES:
        raise ConfigError(unknown_name("weights source", source, SOURCES))
    return {"keras": _KERAS_NAMES, "timm": _TIMM, "torchvision": _TORCHVISION, "bit_npz": _BIT}[
        source
    ]


@dataclasses.dataclass
class Converted:
    """Imported weights and what is needed to use them.

    Attributes:
      source: one of `SOURCES`.
      source_model: the model name given for the source.
      path: the file read.
      architecture: the jaxres model, overrides and preprocessing.
      num_classes: head outputs (0: the file has no head).
      variables: `{"params", "batch_stats"}` as float32 numpy arrays.
    """

    source: str
    source_model: str
    path: str
    architecture: Architecture
    num_classes: int
    variables: dict[str, Any]

    def module(self, dtype: str = "float32") -> models.ResNet:
        """The jaxres module these variables belong to."""
        arch = self.architecture
        return models.create_model(arch.model, self.num_classes, dtype, **arch.overrides)

    def preprocessing(self, image_size: int) -> dict[str, Any]:
        """What the source expects of an image, as jaxres `normalize` arguments and words."""
        mean, std, description = PREPROCESSING[self.architecture.preprocessing]
        return {
            "mode": self.architecture.preprocessing,
            "input_size": image_size,
            "mean": list(mean),
            "std": list(std),
            "channel_order": "RGB",
            "source_expects": description,
            "resize": RESIZE_RULE,
        }


def convert(source: str, model: str, path: str) -> Converted:
    """Reads a local weights file into jaxres variables, checking every tensor.

    Args:
      source: "keras", "timm", "torchvision" or "bit_npz".
      model: the source's model name (`resnet50`, `resnetv2_50x1_bit`, `ResNet50V2`...).
      path: a `.pth` / `.pt` / `.bin` / `.safetensors` state dict, a BiT `.npz`, or a
        Keras `.h5` / `.weights.h5` / `.keras` file.

    Returns:
      The converted weights; the class count comes from the file's head.

    Raises:
      ConfigError: unknown source or model name.
      CheckpointError: unreadable file, missing / unused / mis-shaped tensors.
    """
    arch = architecture(source, model)
    path = src.check_file(path)
    preact = models.create_model(arch.model, **arch.overrides).preact
    aliases: dict[str, str] = {}
    if source == "keras":
        tensors, saved_name = src.read_keras(path)
        saved = (saved_name or "").lower()
        if saved in _KERAS and saved != model.lower().replace("_", ""):
            raise CheckpointError(
                f"{path} holds Keras model {saved_name!r}, not {model!r}; "
                f"pass --model {saved_name}."
            )
        key_fn, layout_fn = functools.partial(src.keras_key, preact=preact), src.keras_layout
    elif source == "bit_npz":
        tensors, key_fn, layout_fn = src.read_npz(path), src.bit_key, src.bit_layout
    else:
        tensors, layout_fn = src.read_torch(path), src.torch_layout
        key_fn = functools.partial(src.torch_key, preact=preact)
    if source == "keras" and any(k.startswith("layers/") for k in tensors):
        positional = src.keras_positional_keys(_modules(template(arch, 1)), preact)
        aliases = {name: key for key, name in positional.items()}
        tensors = {positional.get(k, k): v for k, v in tensors.items()}

    head = tensors.get(key_fn("head", "kernel"))
    num_classes = 0 if head is None else int(layout_fn(head, "dense", "kernel").shape[-1])
    context = f"{path} ({source} {model})"
    variables = assign(template(arch, num_classes), tensors, key_fn, layout_fn, context, aliases)
    if arch.preprocessing == "caffe":  # Fold Caffe's BGR input order into the first conv.
        stem = variables["params"]["stem_conv"]
        stem["kernel"] = np.ascontiguousarray(stem["kernel"][:, :, ::-1, :])
    variables.setdefault("batch_stats", {})
    return Converted(source, model, path, arch, num_classes, variables)


def template(arch: Architecture, num_classes: int) -> dict[str, Any]:
    """Abstract variables (shapes only) of the architecture with `num_classes` outputs."""
    module = models.create_model(arch.model, num_classes, "float32", **arch.overrides)
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    return flax.core.unfreeze(
        jax.eval_shape(functools.partial(module.init, train=False), jax.random.key(0), x)
    )


def _modules(template: dict[str, Any]) -> dict[str, list[str]]:
    """Module path -> its variable names, over all collections."""
    modules: dict[str, list[str]] = {}
    for _, *module, var in flax.traverse_util.flatten_dict(template):
        modules.setdefault("/".join(module), []).append(var)
    return modules


def assign(
    template: dict[str, Any],
    tensors: dict[str, np.ndarray],
    key_fn: Callable[[str, str], str],
    layout_fn: Callable[[np.ndarray, str, str], np.ndarray],
    context: str,
    aliases: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Fills every leaf of `template` from `tensors`, using each tensor exactly once.

    Args:
      template: abstract jaxres variables `{collection: {module...: {var: shape}}}`.
      tensors: the file's tensors by key.
      key_fn: (module path, var) -> the key holding it.
      layout_fn: (array, module kind, var) -> the array in jaxres layout.
      context: the file and model, for messages.
      aliases: key -> how the file spells it, for messages (Keras 3 positional keys).

    Returns:
      Variables with the template's structure, as float32 numpy arrays.

    Raises:
      CheckpointError: a missing, mis-shaped or unused tensor.
    """
    aliases = aliases or {}

    def spell(key: str) -> str:
        return f"{key!r}" + (f" ({aliases[key]})" if key in aliases else "")

    flat, used = {}, {}
    for path, abstract in param_leaves_in_network_order(template):
        module, var = "/".join(path[1:-1]), path[-1]
        target = f"{module}/{var}"
        key = key_fn(module, var)
        if key not in tensors:
            close = difflib.get_close_matches(key, list(tensors), n=1)
            hint = f" Closest key in the file: {close[0]!r}." if close else ""
            raise CheckpointError(
                f"{context}: no tensor {spell(key)} for jaxres {target} "
                f"{tuple(abstract.shape)}.{hint} Is the file that model?"
            )
        if key in used:
            raise CheckpointError(
                f"{context}: {spell(key)} would fill both {used[key]} and {target}."
            )
        source = tensors[key]
        array = layout_fn(source, src.module_kind(module), var)
        if array.ndim > 1 and len(abstract.shape) == 1 and array.size == abstract.shape[0]:
            array = array.reshape(-1)  # Vectors some files store as [1, 1, 1, C].
        if array.shape != tuple(abstract.shape):
            raise CheckpointError(
                f"{context}: {spell(key)} has shape {tuple(source.shape)}, but jaxres {target} "
                f"needs {tuple(abstract.shape)}. Is the file that model (depth, width, classes)?"
            )
        flat[path] = np.asarray(array, np.float32)
        used[key] = target
    unused = sorted(k for k in tensors if k not in used and not _ignored(k))
    if unused:
        shown = ", ".join(spell(k) for k in unused[:4])
        raise CheckpointError(
            f"{context}: {len(unused)} tensor(s) of the file fit no jaxres weight, e.g. {shown}. "
            "The file holds another (larger or differently built) network."
        )
    return flax.traverse_util.unflatten_dict(flat)


_VAR_ORDER = ("kernel", "scale", "bias", "mean", "var")


def param_leaves_in_network_order(template: dict[str, Any]) -> list[tuple[tuple[str, ...], Any]]:
    """Template leaves from input to head, so that the first missing tensor is reported."""

    def rank(path: tuple[str, ...]) -> tuple:
        top = path[1]
        if top.startswith("stage"):
            stage, block = top[len("stage") :].split("_block")
            position = (1, int(stage), int(block))
        else:
            position = ({"final_norm": 2, "head": 3}.get(top, 0), 0, 0)
        return position, path[2:-1], _VAR_ORDER.index(path[-1])

    return sorted(flax.traverse_util.flatten_dict(template).items(), key=lambda item: rank(item[0]))


def _ignored(key: str) -> bool:
    # PyTorch's BatchNorm step counters; Keras optimizer state saved in .keras archives.
    return key.endswith(src.IGNORED_SUFFIXES) or key.startswith("optimizer/")


def imported_config(converted: Converted, image_size: int) -> ml_collections.ConfigDict:
    """A full jaxres config whose model, class count and normalisation match the source."""
    config = base_config()
    arch = converted.architecture
    config.model.name = arch.model
    config.model.overrides = ml_collections.ConfigDict(arch.overrides)
    # float32, so that evaluating the import reproduces the source's numbers.
    config.model.dtype = "float32"
    mean, std, _ = PREPROCESSING[arch.preprocessing]
    config.dataset.num_classes = converted.num_classes
    config.dataset.image_size = image_size
    config.dataset.mean, config.dataset.std = tuple(mean), tuple(std)
    return config


def read_class_names(path: str) -> list[str]:
    """Class names from a text file, one per line in head order (blank lines dropped)."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise ConfigError(f"Class names file {path!r} does not exist; give one name per line.")
    with open(path) as f:
        return [line.strip() for line in f if line.strip()]


def default_class_names(num_classes: int) -> list[str]:
    """ImageNet-1k heads keep their numeric class indices ("0".."999"); others "class_i"."""
    if num_classes == 1000:
        return [str(i) for i in range(num_classes)]
    return [f"class_{i}" for i in range(num_classes)]


def save_run(
    converted: Converted,
    output: str,
    image_size: int = 224,
    class_names: Sequence[str] | None = None,
) -> str:
    """Writes `output/config.json` and `output/checkpoints/` (step 0); returns `output`.

    Raises:
      CheckpointError: `output` already holds checkpoints.
      ConfigError: `class_names` does not have one name per class.
    """
    names = (
        list(class_names) if class_names is not None else default_class_names(converted.num_classes)
    )
    if len(names) != converted.num_classes:
        raise ConfigError(
            f"{len(names)} class names for a head of {converted.num_classes} classes; "
            "give one name per line."
        )
    return runs.write_run(
        output,
        imported_config(converted, image_size),
        converted.variables,
        dataset="imported",
        source={
            "format": converted.source,
            "model": converted.source_model,
            "file": converted.path,
            "sha256": _sha256(converted.path),
        },
        preprocessing=converted.preprocessing(image_size),
        class_names=names,
    )


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
