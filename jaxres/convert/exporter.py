"""Export a jaxres run: timm / torchvision state dicts, or a self-contained `jax.export` artifact.

    python scripts/export_weights.py --workdir runs/r50 --format torchvision --output r50.safetensors
    python scripts/export_weights.py --workdir runs/r50 --format jax_export --output r50.bin

Every export writes `FILE` and, beside it, `FILE` with the extension `.json` (`metadata`:
format, twin model name, class names, preprocessing, source run and step).

* timm / torchvision: the importer reversed. The run's model must equal a registered
  model that the library has under the same name (`twin`): `torch_key` names each tensor,
  `formats.torch_unlayout` (the inverse of `torch_layout`) lays it out, walking the same
  abstract `importer.template`. Every export is read back through `importer.assign` and
  must give the run's weights bit for bit. BatchNorm layers also get PyTorch's
  `num_batches_tracked` (0), so `load_state_dict(strict=True)` finds every key.
* jax_export: uint8 NHWC RGB images [b, H, W, 3] (b symbolic) -> float32 logits, the
  run's normalisation and weights baked in as constants, lowered for CPU, CUDA and TPU;
  `jax.export.deserialize(open(FILE, "rb").read()).call(images)` runs it without jaxres.
  Optionally also a TF SavedModel through `jax2tf` (weights as TF variables).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from jaxres import models, runs
from jaxres.convert import formats as src
from jaxres.convert import importer
from jaxres.errors import CheckpointError, ConfigError, unknown_name
from jaxres.models.resnet import config_fields

LIBRARIES = ("timm", "torchvision")
FORMATS = LIBRARIES + ("jax_export",)
STATE_DICT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
PLATFORMS = ("cpu", "cuda", "tpu")
# ResNet fields that only change training (initialisation, BatchNorm momentum, stochastic
# depth): any value exports.
TRAINING_ONLY = ("zero_init_last", "head_zero_init", "norm_momentum", "drop_path_rate")
# A serialized jax.export (a flatbuffer) holds at most 2 GiB; keep room for the program.
MAX_CONSTANT_BYTES = 2**31 - 2**27


def twin(library: str, model_name: str, overrides: dict[str, Any] | None = None) -> str:
    """The `library` model that computes what jaxres `model_name` with `overrides` computes.

    Args:
      library: "timm" or "torchvision".
      model_name: a registered jaxres model (or alias).
      overrides: the run's `config.model.overrides`.

    Returns:
      The library's model name (the importer's name for it).

    Raises:
      ConfigError: unknown library, or no twin; the message names the differing options.
    """
    if library not in LIBRARIES:
        raise ConfigError(unknown_name("export library", library, LIBRARIES))
    overrides = dict(overrides or {})
    ours = _function_fields(models.create_model(model_name, **overrides))
    candidates = importer.source_models(library)
    diffs = {c: _differences(ours, _function_fields(models.create_model(c))) for c in candidates}
    matches = [c for c in candidates if not diffs[c]]
    if matches:
        return model_name if model_name in matches else matches[0]
    closest = min(candidates, key=lambda c: len(diffs[c]))
    named = [
        f"{'model.overrides.' if field in overrides else ''}{field}={value!r} "
        f"({closest}: {theirs!r})"
        for field, value, theirs in diffs[closest][:4]
    ]
    raise ConfigError(
        f"Model {model_name!r} has no {library} twin: it differs from {library} {closest!r} in "
        f"{', '.join(named)}. Export it with --format jax_export (any jaxres model), or train "
        f"a model {library} has ({', '.join(candidates)})."
    )


def _function_fields(module: models.ResNet) -> dict[str, Any]:
    """The `ResNet` fields that decide which weights exist and what they compute."""
    skip = TRAINING_ONLY + ("num_classes", "dtype", "cpu_conv")
    return {f: getattr(module, f) for f in config_fields() if f not in skip}


def _differences(ours: dict[str, Any], theirs: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    return [(f, ours[f], theirs[f]) for f in ours if ours[f] != theirs[f]]


def state_dict(
    library: str, model_name: str, overrides: dict[str, Any] | None, variables: dict[str, Any]
) -> tuple[str, dict[str, np.ndarray]]:
    """A run's variables as the state dict of its timm / torchvision twin.

    Args:
      library: "timm" or "torchvision".
      model_name: the run's jaxres model; overrides: its `model.overrides`.
      variables: `{"params", "batch_stats"}` of that model.

    Returns:
      (twin model name, `{key: array}` in the twin's layout, float32; int64 BatchNorm counters).

    Raises:
      ConfigError: no twin, or a headless model for torchvision (its `fc` always exists).
      CheckpointError: variables that are not that model's.
    """
    name = twin(library, model_name, overrides)
    arch = importer.architecture(library, name)
    head = variables["params"].get("head")
    num_classes = int(np.shape(head["bias"])[0]) if head else 0
    if library == "torchvision" and not num_classes:
        raise ConfigError(
            "A headless model (num_classes=0) has no torchvision twin (its fc always exists); "
            "use --format timm (timm.create_model(name, num_classes=0))."
        )
    template = importer.template(arch, num_classes)
    have = flax.traverse_util.flatten_dict({k: v for k, v in variables.items() if v})
    want = dict(importer.param_leaves_in_network_order(template))
    if set(have) != set(want):
        odd = sorted(set(have) ^ set(want))[:3]
        raise CheckpointError(f"The run's weights are not those of {library} {name}: {odd}.")
    preact = models.create_model(name).preact
    key_fn = functools.partial(src.torch_key, preact=preact)
    tensors = {}
    for path in want:
        module, var = "/".join(path[1:-1]), path[-1]
        array = np.asarray(have[path], np.float32)
        as_conv = src.torch_dense_as_conv(module, preact)
        key = key_fn(module, var)
        tensors[key] = np.ascontiguousarray(
            src.torch_unlayout(array, src.module_kind(module), var, as_conv)
        )
        if var == "var":  # PyTorch BatchNorm's step counter; the importer ignores it.
            tensors[key.replace("running_var", "num_batches_tracked")] = np.zeros((), np.int64)
    _check_round_trip(template, tensors, key_fn, have, f"{library} {name} export")
    return name, tensors


def _check_round_trip(template, tensors, key_fn, have, context) -> None:
    """The importer must read the export back bit for bit (a check of `torch_unlayout`)."""
    back = flax.traverse_util.flatten_dict(
        importer.assign(template, tensors, key_fn, src.torch_layout, context)
    )
    for path, value in back.items():
        if not np.array_equal(value, np.asarray(have[path], np.float32)):
            raise RuntimeError(f"{context}: {'/'.join(path)} does not read back unchanged.")


def write_state_dict(tensors: dict[str, np.ndarray], path: str) -> None:
    """Writes `.safetensors` (safetensors) or `.pth` / `.pt` / `.bin` (torch.save)."""
    if path.endswith(".safetensors"):
        src.require("safetensors.numpy").save_file(tensors, path)
        return
    torch = src.require("torch")
    torch.save(
        {k: torch.from_numpy(np.require(v, requirements="W")) for k, v in tensors.items()}, path
    )


def serving_function(
    loaded: runs.LoadedRun, dtype: str = "float32"
) -> tuple[Callable[[dict[str, Any], jax.Array], jax.Array], dict[str, Any]]:
    """`serve(variables, uint8 images [b, H, W, 3]) -> float32 logits` and the run's variables.

    Args:
      loaded: the run (`runs.load`).
      dtype: compute dtype ("float32" or "bfloat16"); the logits are float32 either way.
    """
    c = loaded.config
    # Plain XLA convolutions: the artifact must not call jaxres's oneDNN kernels (FFI targets
    # registered only in a process that imported jaxres).
    overrides = {**runs.model_overrides(c), "cpu_conv": "xla"}
    model = models.create_model(c.model.name, c.dataset.num_classes, dtype, **overrides)
    mean, std = tuple(c.dataset.mean), tuple(c.dataset.std)

    def serve(variables: dict[str, Any], images: jax.Array) -> jax.Array:
        logits, _ = model.apply(variables, runs.normalize(images, mean, std), train=False)
        return logits.astype(jnp.float32)

    variables = jax.tree.map(np.asarray, {k: v for k, v in loaded.variables.items() if v})
    return serve, variables


def serving_export(
    loaded: runs.LoadedRun, dtype: str = "float32", platforms: Sequence[str] = PLATFORMS
) -> jax.export.Exported:
    """uint8 images [b, H, W, 3] (b symbolic) -> float32 logits [b, C], weights as constants.

    Args:
      loaded: the run (`runs.load`).
      dtype: compute dtype of the exported model ("float32" or "bfloat16").
      platforms: what to lower for; the artifact runs on any of them.

    Raises:
      ConfigError: weights over the 2 GiB a serialized export can hold (resnetv2_152x4_bit),
        or a bad dtype.
    """
    serve, variables = serving_function(loaded, dtype)
    size = sum(a.nbytes for a in jax.tree.leaves(variables))
    if size > MAX_CONSTANT_BYTES:
        raise ConfigError(
            f"{size / 2**30:.1f} GiB of weights exceed the 2 GiB a serialized jax.export (a "
            "flatbuffer) holds as constants; export with --format timm instead."
        )
    (batch,) = jax.export.symbolic_shape("b")
    image_size = loaded.preprocessing.image_size  # What inference feeds.
    images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.uint8)
    # On one device: no sharding, so the artifact runs wherever it is loaded.
    return jax.export.export(jax.jit(lambda x: serve(variables, x)), platforms=tuple(platforms))(
        images
    )


def write_saved_model(loaded: runs.LoadedRun, directory: str, dtype: str = "float32") -> str:
    """A TF SavedModel (`jax2tf`) whose `serving_default` maps uint8 images to `logits`.

    The weights are TF variables (no 2 GiB graph limit); the batch dimension is free.

    Returns:
      The absolute directory written.

    Raises:
      ConfigError: TensorFlow is not installed.
    """
    try:
        import tensorflow as tf
        from jax.experimental import jax2tf
    except ImportError:
        raise ConfigError(
            "--saved_model needs TensorFlow, which is not installed; pip install tensorflow-cpu "
            "(or drop --saved_model: the jax_export file needs only jax)."
        ) from None
    directory = os.path.abspath(os.path.expanduser(directory))
    serve, variables = serving_function(loaded, dtype)
    image_size = loaded.preprocessing.image_size  # What inference feeds.
    module = tf.Module()
    module.weights = tf.nest.map_structure(tf.Variable, variables)
    converted = jax2tf.convert(serve, polymorphic_shapes=[None, "(b, ...)"], with_gradient=False)

    @tf.function(
        input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.uint8, "images")],
        autograph=False,
    )
    def serving_default(images):
        return {"logits": converted(module.weights, images)}

    module.serving_default = serving_default
    tf.saved_model.save(module, directory, signatures={"serving_default": serving_default})
    return directory


def metadata(loaded: runs.LoadedRun, fmt: str, model: str) -> dict[str, Any]:
    """What the JSON beside an export holds: model, classes, preprocessing, source run and step."""
    prep = loaded.preprocessing
    mean, std = list(prep.mean), list(prep.std)
    return {
        "format": fmt,
        "model": model,
        "num_classes": int(loaded.model.num_classes),
        "class_names": runs.class_names(loaded),
        "preprocessing": {
            "mean": [m / 255 for m in mean],  # On x / 255, as timm / torchvision normalise.
            "std": [s / 255 for s in std],
            "mean_uint8": mean,  # On uint8 x, as jaxres (and the jax_export artifact) do.
            "std_uint8": std,
            "image_size": prep.image_size,
            "crop_ratio": prep.crop_ratio,  # timm's crop_pct: resize to size / ratio.
            "interpolation": prep.interpolation,
            "jpeg_dct": prep.dct,  # "accurate": PIL's JPEG decoding (libjpeg ISLOW); "fast": IFAST.
            "channel_order": "RGB",
        },
        "source_run": loaded.run,
        "step": int(loaded.step),
    }


def export(
    run: str,
    fmt: str,
    output: str,
    checkpoint: str | int = "latest",
    dtype: str = "float32",
    platforms: Sequence[str] = PLATFORMS,
    saved_model: str | None = None,
) -> dict[str, Any]:
    """Exports one checkpoint of a run; writes `output` and its `.json` beside it.

    Args:
      run: the run directory.
      fmt: one of `FORMATS`.
      output: the file to write: `.safetensors` / `.pth` / `.pt` / `.bin` for timm and
        torchvision, any name for jax_export.
      checkpoint: "latest", "best" or a step.
      dtype, platforms: compute dtype and platforms of a jax_export.
      saved_model: with jax_export, also write a TF SavedModel to this directory.

    Returns:
      The metadata written beside it, plus "files": the paths written.

    Raises:
      ConfigError: unknown format, a model without a twin, a bad output name.
      CheckpointError: no such run or checkpoint.
    """
    if fmt not in FORMATS:
        raise ConfigError(unknown_name("export format", fmt, FORMATS))
    output = os.path.abspath(os.path.expanduser(output))
    stem, suffix = os.path.splitext(output)
    if fmt in LIBRARIES and suffix not in STATE_DICT_SUFFIXES:
        raise ConfigError(
            f"--output {output!r}: a {fmt} state dict is written as "
            f"{' / '.join(STATE_DICT_SUFFIXES)}; e.g. --output model.safetensors."
        )
    if suffix == ".json" or (saved_model and fmt != "jax_export"):
        raise ConfigError(
            f"--output {output!r} / --saved_model: the .json is written beside the export, "
            "and --saved_model goes with --format jax_export."
        )
    if fmt in LIBRARIES:  # Refuse a model without a twin before reading its weights.
        config = runs.read_config(run)
        twin(fmt, config.model.name, runs.model_overrides(config))
    loaded = runs.load(run, checkpoint)
    if fmt in LIBRARIES:
        c = loaded.config
        name, tensors = state_dict(fmt, c.model.name, runs.model_overrides(c), loaded.variables)
        os.makedirs(os.path.dirname(output), exist_ok=True)
        write_state_dict(tensors, output)
    else:
        name = loaded.config.model.name
        exported = serving_export(loaded, dtype, platforms)
        os.makedirs(os.path.dirname(output), exist_ok=True)
        with open(output, "wb") as f:
            f.write(exported.serialize())
    files = [output]
    if saved_model:
        files.append(write_saved_model(loaded, saved_model, dtype))
    meta = metadata(loaded, fmt, name)
    if fmt == "jax_export":
        meta["serving"] = {
            "input": "uint8 RGB images [b, image_size, image_size, 3], resized and cropped only",
            "output": f"float32 logits [b, {meta['num_classes']}]",
            "compute_dtype": dtype,
            "platforms": list(platforms),
            "saved_model": files[1] if saved_model else None,
        }
    with open(stem + ".json", "w") as f:
        json.dump(meta, f, indent=2)
    return dict(meta, files=files + [stem + ".json"])
