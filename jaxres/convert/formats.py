"""Readers and name maps of the weight formats `jaxres.convert.importer` reads.

`jaxres.convert.exporter` writes PyTorch state dicts through the same maps: `torch_key`
names each tensor and `torch_unlayout` (the inverse of `torch_layout`) lays it out.

A *source* turns a local file into `{key: numpy array}` and names, for every jaxres
variable (`module`, `var`), the key holding it and how to re-lay it out. The key of
`stage2_block1/conv1/kernel`:

* torchvision, timm: state dicts (.pth / .pt / .bin / .safetensors); torchvision and
  timm `resnet*` name it `layer2.0.conv1.weight`, timm `resnetv2*`
  `stages.1.blocks.0.conv1.weight`.
* bit_npz: the BiT release .npz, `resnet/block2/unit01/a/standardized_conv2d/kernel`.
* keras: name-keyed legacy .h5 (the Keras Applications downloads), Keras 3
  .weights.h5 / .keras; `conv3_block1_1_conv/kernel`.

PyTorch stores conv kernels OIHW and linear weights [out, in]; jaxres (like Keras
and BiT) stores HWIO and [in, out]. Keras 3 `.weights.h5` files key variables by
layer *class and position* (`layers/conv2d_3/vars/0`), not by name:
`keras_positional_keys` rebuilds Keras's layer order for the architecture so that
each position gets its layer name back.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import zipfile
from typing import Any

import numpy as np

from jaxres.errors import CheckpointError, ConfigError


def require(module: str) -> Any:
    """Imports an optional reader (torch, safetensors, h5py), or says which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(
            f"Reading this weights file needs {module.split('.')[0]!r}, which is not installed; "
            "install the convert extra: pip install -e '.[convert]'."
        ) from None

# Tensors a source may hold that have no jaxres counterpart, and why.
IGNORED_SUFFIXES = (".num_batches_tracked",)  # PyTorch BatchNorm's step counter.

# jaxres variable -> source variable name, per module kind.
_TORCH_VARS = {
    "kernel": "weight",
    "bias": "bias",
    "scale": "weight",
    "mean": "running_mean",
    "var": "running_var",
}
# Keras and BiT call a norm's bias "beta" and its scale "gamma".
_KERAS_VARS = {"kernel": "kernel", "bias": "bias", "mean": "moving_mean", "var": "moving_variance"}
_NORM_VARS = {"scale": "gamma", "bias": "beta"}
# Keras BatchNormalization saves gamma, beta, moving_mean, moving_variance in this order.
_KERAS_BN_ORDER = ("scale", "bias", "mean", "var")


def module_kind(module: str) -> str:
    """The kind ("conv", "norm" or "dense") of a jaxres module path, e.g. `stage1_block1/conv2`."""
    leaf = module.rsplit("/", 1)[-1]
    if leaf in ("head", "fc1", "fc2"):
        return "dense"
    return "conv" if "conv" in leaf else "norm"


def _block_parts(module: str) -> tuple[int, int, str] | None:
    """`stage2_block3/conv1` -> (2, 3, "conv1"); None for stem / final norm / head."""
    head, _, rest = module.partition("/")
    if not head.startswith("stage"):
        return None
    stage, block = head[len("stage") :].split("_block")
    return int(stage), int(block), rest


# --- PyTorch state dicts: torchvision and timm -------------------------------------------------


def torch_key(module: str, var: str, preact: bool) -> str:
    """The state-dict key of a jaxres variable (torchvision / timm `resnet*`, timm `resnetv2*`).

    `var` "bias" of a norm and of a conv/linear are both `.bias`; BatchNorm stats are
    `running_mean` / `running_var`.
    """
    suffix = _TORCH_VARS[var]
    parts = _block_parts(module)
    if parts is None:
        if preact:
            names = {"stem_conv": "stem.conv", "final_norm": "norm", "head": "head.fc"}
        else:
            names = {"stem_conv": "conv1", "stem_norm": "bn1", "head": "fc"}
        return f"{names[module]}.{suffix}"
    stage, block, rest = parts
    if preact:
        prefix = f"stages.{stage - 1}.blocks.{block - 1}"
        rest = {"downsample_conv": "downsample.conv"}.get(rest, rest)
    else:
        prefix = f"layer{stage}.{block - 1}"
        rest = {"downsample_conv": "downsample.0", "downsample_norm": "downsample.1"}.get(
            rest, rest
        )
        rest = rest.replace("norm", "bn")
    return f"{prefix}.{rest.replace('/', '.')}.{suffix}"


def torch_layout(array: np.ndarray, kind: str, var: str) -> np.ndarray:
    """PyTorch layout -> jaxres: conv OIHW -> HWIO; linear (or 1x1 conv) [out, in] -> [in, out]."""
    if var != "kernel":
        return array
    if kind == "conv" and array.ndim == 4:
        return array.transpose(2, 3, 1, 0)
    if kind == "dense" and array.ndim == 4 and array.shape[2:] == (1, 1):
        array = array[:, :, 0, 0]  # timm resnetv2 heads and SE layers are 1x1 convs.
    return array.T if kind == "dense" and array.ndim == 2 else array


def torch_dense_as_conv(module: str, preact: bool) -> bool:
    """Whether PyTorch holds this jaxres `Dense` as a 1x1 conv: timm SE layers, resnetv2 heads."""
    return module.endswith(("se/fc1", "se/fc2")) or (preact and module == "head")


def torch_unlayout(array: np.ndarray, kind: str, var: str, as_conv: bool = False) -> np.ndarray:
    """jaxres layout -> PyTorch, the inverse of `torch_layout`: HWIO -> OIHW, [in, out] -> [out, in].

    Args:
      array: a jaxres variable.
      kind: its module kind ("conv", "norm" or "dense", see `module_kind`).
      var: its variable name ("kernel", "bias", ...).
      as_conv: a dense kernel PyTorch stores as a 1x1 conv [out, in, 1, 1]
        (`torch_dense_as_conv`).
    """
    if var != "kernel":
        return array
    if kind == "conv":
        return array.transpose(3, 2, 0, 1)
    if kind == "dense":
        return array.T[:, :, None, None] if as_conv else array.T
    return array


def read_torch(path: str) -> dict[str, np.ndarray]:
    """A PyTorch state dict from `.safetensors`, or a `torch.save`d `.pth` / `.pt` / `.bin`."""
    if path.endswith(".safetensors"):
        safetensors_numpy = require("safetensors.numpy")
        try:
            return safetensors_numpy.load_file(path)
        except Exception as e:  # noqa: BLE001 - any parse failure is a corrupt file to the user.
            raise CheckpointError(f"{path} is not a readable .safetensors file ({e}).") from None
    torch = require("torch")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - pickled modules, corrupt zips, wrong formats.
        raise CheckpointError(
            f"{path} is not a PyTorch state dict ({str(e).splitlines()[0][:200]}); save "
            "`model.state_dict()` with torch.save, or use a .safetensors file."
        ) from None
    for wrapper in ("state_dict", "model", "state_dict_ema"):  # Training checkpoints wrap it.
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
            break
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path} holds a {type(state).__name__}, not a state dict of tensors."
        )
    if state and all(k.startswith("module.") for k in state):  # Saved from DistributedDataParallel.
        state = {k[len("module.") :]: v for k, v in state.items()}
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in state.items()}


# --- BiT .npz (the original big_transfer release layout, as timm `_load_weights` reads it) ------


def bit_key(module: str, var: str) -> str:
    """The .npz key of a jaxres variable of a BiT (`resnetv2_*_bit`) model."""
    suffix = _NORM_VARS[var] if module_kind(module) == "norm" else var
    if module == "stem_conv":
        return f"resnet/root_block/standardized_conv2d/{suffix}"
    if module == "final_norm":
        return f"resnet/group_norm/{suffix}"
    if module == "head":
        return f"resnet/head/conv2d/{suffix}"
    stage, block, rest = _block_parts(module)
    unit = f"resnet/block{stage}/unit{block:02d}"
    if rest == "downsample_conv":
        return f"{unit}/a/proj/standardized_conv2d/{suffix}"
    layer = "abc"[int(rest[-1]) - 1]  # conv1/norm1 -> a, conv2/norm2 -> b, conv3/norm3 -> c.
    kind = "standardized_conv2d" if rest.startswith("conv") else "group_norm"
    return f"{unit}/{layer}/{kind}/{suffix}"


def bit_layout(array: np.ndarray, kind: str, var: str) -> np.ndarray:
    """BiT layout -> jaxres: the 1x1 conv head [1, 1, in, out] -> [in, out]; the rest is HWIO."""
    if kind == "dense" and var == "kernel" and array.ndim == 4 and array.shape[:2] == (1, 1):
        return array[0, 0]
    return array


def read_npz(path: str) -> dict[str, np.ndarray]:
    """All arrays of an `.npz` file."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path} is not a readable .npz file ({e}).") from None


# --- Keras Applications -------------------------------------------------------------------------


def keras_layer(module: str, preact: bool) -> str:
    """The Keras Applications layer name of a jaxres module (`conv3_block1_1_conv`)."""
    top = {
        "stem_conv": "conv1_conv",
        "stem_norm": "conv1_bn",
        "final_norm": "post_bn",
        "head": "predictions",
    }
    if module in top:
        return top[module]
    stage, block, rest = _block_parts(module)
    if rest == "downsample_conv":
        name = "0_conv"
    elif rest == "downsample_norm":
        name = "0_bn"
    elif rest.startswith("conv"):
        name = f"{rest[-1]}_conv"
    elif preact:  # v2 block: preact_bn, then 1_bn / 2_bn before the 2nd / 3rd conv.
        index = int(rest[-1]) - 1
        name = f"{index}_bn" if index else "preact_bn"
    else:
        name = f"{rest[-1]}_bn"
    return f"conv{stage + 1}_block{block}_{name}"


def keras_layout(array: np.ndarray, kind: str, var: str) -> np.ndarray:
    """Keras stores conv kernels HWIO and dense kernels [in, out], as jaxres does."""
    del kind, var
    return array


def keras_key(module: str, var: str, preact: bool) -> str:
    """The name-keyed Keras variable of a jaxres variable: `layer/var`."""
    suffix = (
        _NORM_VARS[var] if module_kind(module) == "norm" and var in _NORM_VARS else _KERAS_VARS[var]
    )
    return f"{keras_layer(module, preact)}/{suffix}"


def keras_positional_keys(modules: dict[str, list[str]], preact: bool) -> dict[str, str]:
    """Keras 3 `.weights.h5` keys (`layers/conv2d_3/vars/1`) -> name keys (`layer/bias`).

    Keras 3 numbers layers per class in `model.layers` order, which for the ResNet
    applications is, per block, v2: preact_bn, 1_conv, 1_bn, 2_conv, 2_bn, [0_conv],
    3_conv; v1: 1_conv, 1_bn, 2_conv, 2_bn, [0_conv], 3_conv, [0_bn], 3_bn.

    Args:
      modules: jaxres module path -> its variable names, for every module of the model.
      preact: ResNetV2 (True) or v1 (False) layout.
    """
    if preact:
        block_order = ("norm1", "conv1", "norm2", "conv2", "norm3", "downsample_conv", "conv3")
        order = ["stem_conv"]
    else:
        block_order = (
            "conv1",
            "norm1",
            "conv2",
            "norm2",
            "downsample_conv",
            "conv3",
            "downsample_norm",
            "norm3",
        )
        order = ["stem_conv", "stem_norm"]
    blocks = sorted(
        {m.split("/")[0] for m in modules if m.startswith("stage")}, key=_block_parts_key
    )
    order += [f"{b}/{name}" for b in blocks for name in block_order if f"{b}/{name}" in modules]
    order += [m for m in ("final_norm", "head") if m in modules]

    classes = {"conv": "conv2d", "norm": "batch_normalization", "dense": "dense"}
    counts: dict[str, int] = {}
    keys = {}
    for module in order:
        cls = classes[module_kind(module)]
        index = counts.get(cls, 0)
        counts[cls] = index + 1
        group = f"layers/{cls}" + (f"_{index}" if index else "")
        variables = _KERAS_BN_ORDER if module_kind(module) == "norm" else ("kernel", "bias")
        for position, var in enumerate(v for v in variables if v in modules[module]):
            keys[f"{group}/vars/{position}"] = keras_key(module, var, preact)
    return keys


def _block_parts_key(block: str) -> tuple[int, int]:
    stage, number, _ = _block_parts(block + "/")
    return stage, number


def read_keras(path: str) -> tuple[dict[str, np.ndarray], str | None]:
    """Keras weights -> (`{key: array}`, the model name a `.keras` archive records, else None).

    Name-keyed legacy `.h5` files (the Keras Applications downloads, `save_weights` of
    Keras 2) give `layer/var` keys; Keras 3 `.weights.h5` and `.keras` files keep their
    positional keys (`layers/conv2d_3/vars/0`) for `keras_positional_keys` to rename.
    """
    h5py = require("h5py")
    model_name = None
    try:
        if path.endswith(".keras"):
            with zipfile.ZipFile(path) as archive:
                config = json.loads(archive.read("config.json"))
                model_name = config.get("config", {}).get("name")
                handle = h5py.File(io.BytesIO(archive.read("model.weights.h5")), "r")
        else:
            handle = h5py.File(path, "r")
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path} is not a readable Keras weights file ({e}).") from None
    with handle:
        root = handle.get("model_weights", handle)  # Whole-model legacy .h5 saves nest it.
        tensors: dict[str, np.ndarray] = {}
        positional = "layers" in root and "layer_names" not in root.attrs

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Dataset):
                parts = name.split("/")
                key = name if positional else f"{parts[0]}/{parts[-1].split(':')[0]}"
                tensors[key] = np.asarray(obj[()], np.float32)

        root.visititems(visit)
    return tensors, model_name


def check_file(path: str) -> str:
    """The absolute path of an existing file, or a CheckpointError naming it."""
    path = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(path):
        raise CheckpointError(
            f"Weights file {path!r} does not exist; pass a local file with --input."
        )
    return path
