"""Weight import: logits parity with Keras, timm, torchvision and BiT .npz networks.

Each reference network is built from scratch, then its norm scales / shifts, conv
biases and running statistics are randomised, because a fresh network's 1 / 0 norms,
unit statistics and zero biases would hide a mis-mapped tensor. BatchNorm statistics
are those of the test batch (one train-mode pass) plus a random variance offset: it
keeps activations of order 1 without the near-zero variances of a 2-image batch, which
would amplify float32 rounding by ~4x per stage and drown the check.

The network is saved in the source's own format and converted with `jaxres.convert`;
the jaxres float32 forward pass on the CPU, on the same uint8 batch normalised as the
converted config says, must match the source's logits (max abs difference <= 1e-4;
relative to the largest logit for Keras' Caffe-style ResNet50) and pooled features.
Keras references run in float32, PyTorch ones in float64 (see `_torch_outputs`).
Deliberately broken conversions (a transposed kernel, a wrong BatchNorm epsilon) must
fail the same check.

The ResNet-50s run at 64x64 with a batch of 2 and 10 classes; each jaxres model is
compiled once. Needs the `[convert]` extra (torch, torchvision, timm, safetensors,
keras, h5py); the tests of a missing package are skipped.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import os
import subprocess
import sys

os.environ.setdefault("KERAS_BACKEND", "jax")  # Keras 3 reads it at import.
# timm / torchvision load triton, which segfaults when it is loaded after TensorFlow
# (Keras loads TensorFlow, when installed, to write .keras files): load them first.
for _module in ("torch", "torchvision", "timm"):
    with contextlib.suppress(ImportError):
        __import__(_module)

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from jaxres import checkpoint as ckpt_lib
from jaxres import models, parallel, runs
from jaxres import state as state_lib
from jaxres.convert import formats, importer
from jaxres.errors import CheckpointError, ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE, BATCH, CLASSES = 64, 2, 10
ATOL = 1e-4  # Max abs logit difference (inputs of order 1).
RTOL = 1e-4  # Max abs difference over max abs logit (Keras Caffe inputs of order 100).
IMAGES = np.random.default_rng(0).integers(0, 256, (BATCH, SIZE, SIZE, 3), dtype=np.uint8)
VAR_OFFSET = (0.1, 0.5)  # Uniform range added to calibrated running variances.
TORCH_MEAN, TORCH_STD = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])


@dataclasses.dataclass
class Reference:
    """A perturbed source network saved to disk, and its outputs on IMAGES."""

    files: dict[str, str]  # format -> path
    logits: np.ndarray
    pre_logits: np.ndarray
    relative: bool = False  # Judge by RTOL (Keras Caffe-style inputs).


def parity_error(ours: np.ndarray, ref: np.ndarray, relative: bool) -> float:
    """The number the tolerance is checked against: max abs difference (/ max abs ref)."""
    err = float(np.max(np.abs(np.asarray(ours, np.float64) - ref)))
    return err / float(np.max(np.abs(ref))) if relative else err


def tolerance(relative: bool) -> float:
    return RTOL if relative else ATOL


@functools.cache
def _compiled_forward(model):
    """One compiled float32 forward per jaxres model: uint8 -> (logits, pre_logits)."""

    def forward(variables, images, mean, std):
        logits, features = model.apply(variables, runs.normalize(images, mean, std))
        return logits, features["pre_logits"]

    return jax.jit(forward)


def jaxres_outputs(model, variables, mean, std) -> tuple[np.ndarray, np.ndarray]:
    variables = {k: v for k, v in variables.items() if v}  # GN models: no batch_stats.
    out = _compiled_forward(model)(variables, IMAGES, jnp.asarray(mean), jnp.asarray(std))
    return tuple(np.asarray(o) for o in out)


def run_converted(converted: importer.Converted) -> tuple[np.ndarray, np.ndarray]:
    prep = converted.preprocessing(SIZE)
    return jaxres_outputs(converted.module(), converted.variables, prep["mean"], prep["std"])


# --- PyTorch references (timm, torchvision) -----------------------------------------------


def _classifier(model):
    return model.get_classifier() if hasattr(model, "get_classifier") else model.fc  # timm / tv


def _perturb_torch(model, x) -> None:
    """Random norm affine / biases; BatchNorm statistics of `x` (a train-mode pass)."""
    import torch

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.GroupNorm)):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.2)
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.reset_running_stats()
                    m.momentum = None  # Cumulative average: one pass sets the batch statistics.
            elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
                if not m.weight.any():  # Zero-initialised last convs would hide their mapping.
                    torch.nn.init.kaiming_normal_(m.weight, generator=g)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
        classifier = _classifier(model)
        classifier.weight.normal_(0, 2 / classifier.weight.shape[1] ** 0.5, generator=g)
        model.train()
        model(x)
        model.eval()
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                low, high = VAR_OFFSET
                m.running_var.add_(
                    torch.rand(m.running_var.shape, generator=g) * (high - low) + low
                )


def _torch_outputs(model, x) -> tuple[np.ndarray, np.ndarray]:
    """Logits and the classifier's (pooled) input, computed in float64.

    float64 takes the source's own float32 rounding out of the check: BiT's weight
    standardisation amplifies it to ~2e-5 in timm itself, near the 1e-4 tolerance.
    """
    import torch

    model, x = copy.deepcopy(model).double(), x.double()
    pooled = []
    hook = _classifier(model).register_forward_hook(
        lambda m, inputs, out: pooled.append(inputs[0].flatten(1))
    )
    with torch.no_grad():
        logits = model(x)
    hook.remove()
    return logits.numpy(), pooled[0].numpy()


def _torch_reference(directory, model, bit_range: bool, formats=("pth",)) -> Reference:
    import torch

    mean, std = (0.5, 0.5) if bit_range else (TORCH_MEAN, TORCH_STD)
    x = torch.from_numpy(((IMAGES / 255.0 - mean) / std).transpose(0, 3, 1, 2)).float()
    _perturb_torch(model, x)
    logits, pre_logits = _torch_outputs(model, x)
    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    if "pth" in formats:
        files["pth"] = str(directory / "model.pth")
        torch.save(model.state_dict(), files["pth"])
    if "safetensors" in formats:
        from safetensors.torch import save_file

        files["safetensors"] = str(directory / "model.safetensors")
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, files["safetensors"])
    return Reference(files, logits, pre_logits)


def _timm(name: str, directory) -> Reference:
    timm = pytest.importorskip("timm")
    pytest.importorskip("safetensors")
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=CLASSES)
    bit = name.endswith("_bit")
    ref = _torch_reference(directory, model, bit, formats=("pth", "safetensors"))
    if bit:
        ref.files["npz"] = _write_bit_npz(model, directory / "bit.npz")
        # The .npz must be what timm's own BiT loader reads back into the same network.
        check = timm.create_model(name, num_classes=CLASSES)
        check.load_pretrained(ref.files["npz"])
        check.eval()
        np.testing.assert_allclose(_torch_outputs(check, _bit_input())[0], ref.logits, atol=1e-5)
    return ref


def _bit_input():
    import torch

    return torch.from_numpy((IMAGES / 127.5 - 1).transpose(0, 3, 1, 2)).float()


def _write_bit_npz(model, path) -> str:
    """timm resnetv2_*_bit -> the original BiT release .npz layout (HWIO kernels)."""

    def hwio(w):
        return w.detach().permute(2, 3, 1, 0).numpy()

    def vec(w):
        return w.detach().numpy()

    w = {"resnet/root_block/standardized_conv2d/kernel": hwio(model.stem.conv.weight)}
    for i, stage in enumerate(model.stages):
        for j, block in enumerate(stage.blocks):
            unit = f"resnet/block{i + 1}/unit{j + 1:02d}"
            for letter, k in zip("abc", (1, 2, 3)):
                w[f"{unit}/{letter}/standardized_conv2d/kernel"] = hwio(
                    getattr(block, f"conv{k}").weight
                )
                w[f"{unit}/{letter}/group_norm/gamma"] = vec(getattr(block, f"norm{k}").weight)
                w[f"{unit}/{letter}/group_norm/beta"] = vec(getattr(block, f"norm{k}").bias)
            if block.downsample is not None:
                w[f"{unit}/a/proj/standardized_conv2d/kernel"] = hwio(block.downsample.conv.weight)
    w["resnet/group_norm/gamma"], w["resnet/group_norm/beta"] = (
        vec(model.norm.weight),
        vec(model.norm.bias),
    )
    w["resnet/head/conv2d/kernel"] = hwio(model.head.fc.weight)
    w["resnet/head/conv2d/bias"] = vec(model.head.fc.bias)
    np.savez(path, **w)
    return str(path)


def _torchvision_resnet50(directory) -> Reference:
    torch = pytest.importorskip("torch")
    models = pytest.importorskip("torchvision.models")
    torch.manual_seed(0)
    return _torch_reference(directory, models.resnet50(num_classes=CLASSES), bit_range=False)


# --- Keras references -----------------------------------------------------------------------


def _numpy_uniform(key, shape=(), dtype=jnp.float32, minval=0.0, maxval=1.0) -> jax.Array:
    """`jax.random.uniform`'s signature, numpy's values, seeded by the key's bits."""
    bits = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    rng = np.random.default_rng([int(b) for b in np.asarray(bits).ravel()])
    return jnp.asarray(rng.uniform(minval, maxval, shape), dtype)


def _keras(name: str, directory) -> Reference:
    keras = pytest.importorskip("keras")
    pytest.importorskip("h5py")
    keras.utils.set_random_seed(0)
    # Keras draws each initial weight eagerly with jax.random.uniform: one threefry program
    # compiled per weight shape, 5-10 s for a ResNet-50 on 2 cores. The weights only need to be
    # random (they are perturbed below anyway), so numpy draws them.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(jax.random, "uniform", _numpy_uniform)
        model = getattr(keras.applications, name)(
            weights=None, input_shape=(SIZE, SIZE, 3), classes=CLASSES, classifier_activation=None
        )
    v2 = name.endswith("V2")
    preprocess = (
        keras.applications.resnet_v2 if v2 else keras.applications.resnet
    ).preprocess_input
    x = preprocess(IMAGES.astype(np.float32))
    rng = np.random.default_rng(0)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.gamma.assign(rng.uniform(0.5, 1.5, layer.gamma.shape))
            layer.beta.assign(rng.normal(0, 0.2, layer.beta.shape))
            layer.momentum = 0.0  # The train-mode pass below sets the batch statistics.
        elif isinstance(layer, keras.layers.Conv2D) and layer.use_bias:
            layer.bias.assign(rng.normal(0, 0.1, layer.bias.shape))
    model(x, training=True)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            offset = rng.uniform(*VAR_OFFSET, layer.moving_variance.shape)
            layer.moving_variance.assign(np.asarray(layer.moving_variance) + offset)
    head = model.get_layer("predictions")
    head.kernel.assign(3 * np.asarray(head.kernel))  # Logits of order 1 to 10.
    pooled, logits = keras.Model(model.input, [model.get_layer("avg_pool").output, model.output])(x)
    directory.mkdir(parents=True, exist_ok=True)
    files = {"weights.h5": str(directory / "model.weights.h5")}
    model.save_weights(files["weights.h5"])
    if not v2:
        files["keras"] = str(directory / "model.keras")
        model.save(files["keras"])
        files["legacy.h5"] = _write_legacy_h5(model, directory / "legacy.h5")
    return Reference(files, np.asarray(logits), np.asarray(pooled), relative=not v2)


def _write_legacy_h5(model, path) -> str:
    """The name-keyed layout of the Keras Applications downloads (`layer/layer/var`)."""
    import h5py

    with h5py.File(path, "w") as f:
        for layer in model.layers:
            for weight in layer.weights:
                f[f"{layer.name}/{layer.name}/{weight.name}:0"] = np.asarray(weight)
    return str(path)


BUILDERS = {
    "keras_ResNet50V2": functools.partial(_keras, "ResNet50V2"),
    "keras_ResNet50": functools.partial(_keras, "ResNet50"),
    "timm_resnetv2_50": functools.partial(_timm, "resnetv2_50"),
    "timm_seresnet50": functools.partial(_timm, "seresnet50"),
    "timm_resnetv2_50x1_bit": functools.partial(_timm, "resnetv2_50x1_bit"),
    "timm_resnet50": functools.partial(_timm, "resnet50"),
    "torchvision_resnet50": _torchvision_resnet50,
}


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """Builds each reference network on first use, once per test session."""
    root, built = tmp_path_factory.mktemp("references"), {}

    def get(name: str) -> Reference:
        if name not in built:
            built[name] = BUILDERS[name](root / name)
        return built[name]

    return get


# (source, model, reference, file format)
CASES = [
    ("keras", "ResNet50V2", "keras_ResNet50V2", "weights.h5"),
    ("keras", "ResNet50", "keras_ResNet50", "weights.h5"),
    ("keras", "ResNet50", "keras_ResNet50", "keras"),
    ("keras", "ResNet50", "keras_ResNet50", "legacy.h5"),
    ("timm", "resnetv2_50", "timm_resnetv2_50", "pth"),
    ("timm", "resnetv2_50", "timm_resnetv2_50", "safetensors"),
    ("timm", "seresnet50", "timm_seresnet50", "pth"),
    ("timm", "seresnet50", "timm_seresnet50", "safetensors"),
    ("timm", "resnetv2_50x1_bit", "timm_resnetv2_50x1_bit", "pth"),
    ("timm", "resnetv2_50x1_bit", "timm_resnetv2_50x1_bit", "safetensors"),
    ("timm", "resnet50", "timm_resnet50", "pth"),
    ("torchvision", "resnet50", "torchvision_resnet50", "pth"),
    ("bit_npz", "resnetv2_50x1_bit", "timm_resnetv2_50x1_bit", "npz"),
]


@pytest.mark.parametrize(
    "source, model, reference, fmt", CASES, ids=[f"{c[0]}-{c[1]}-{c[3]}" for c in CASES]
)
def test_logits_and_features_match_source(references, source, model, reference, fmt):
    ref = references(reference)
    converted = importer.convert(source, model, ref.files[fmt])
    assert converted.num_classes == CLASSES
    logits, pre_logits = run_converted(converted)
    err = parity_error(logits, ref.logits, ref.relative)
    print(
        f"\nparity {source} {model} .{fmt}: logits error {err:.2e}, "
        f"max |logit| {np.abs(ref.logits).max():.2f}"
    )
    assert np.abs(ref.logits).max() > 0.5  # Logits of order 1, so ATOL can fail.
    assert err <= tolerance(ref.relative)
    assert parity_error(pre_logits, ref.pre_logits, ref.relative) <= tolerance(ref.relative)


def test_transposed_kernel_is_caught(references):
    ref = references("timm_resnetv2_50")
    converted = importer.convert("timm", "resnetv2_50", ref.files["pth"])
    conv = converted.variables["params"]["stage2_block1"]["conv2"]
    conv["kernel"] = conv["kernel"].transpose(1, 0, 2, 3)  # OIHW -> HWIO with H and W swapped.
    logits, _ = run_converted(converted)
    err = parity_error(logits, ref.logits, False)
    print(f"\ntransposed 3x3 kernel: logits error {err:.2e}")
    assert err > 100 * ATOL


def test_wrong_batchnorm_epsilon_is_caught(references):
    ref = references("keras_ResNet50V2")
    converted = importer.convert("keras", "ResNet50V2", ref.files["weights.h5"])
    prep = converted.preprocessing(SIZE)
    # Keras' own BatchNormalization default (1e-3) instead of the Applications' 1.001e-5.
    model = converted.module().clone(norm_eps=1e-3)
    logits, _ = jaxres_outputs(model, converted.variables, prep["mean"], prep["std"])
    err = parity_error(logits, ref.logits, False)
    print(f"\nBatchNorm epsilon 1e-3: logits error {err:.2e}")
    assert err > 3 * ATOL


def test_script_round_trip_restores_and_matches(references, tmp_path):
    ref = references("keras_ResNet50")
    names = tmp_path / "classes.txt"
    names.write_text("\n".join(f"flower {i}" for i in range(CLASSES)) + "\n")
    run = tmp_path / "run"
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "convert_weights.py"), "--source=keras",
           "--model=ResNet50", f"--input={ref.files['weights.h5']}", f"--output={run}",
           f"--class_names={names}", f"--image_size={SIZE}"]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    done = subprocess.run(
        cmd, check=False, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]

    with open(run / "config.json") as f:
        config = ml_collections.ConfigDict(json.load(f))
    assert config.dataset.num_classes == CLASSES and config.model.overrides.stride_in_1x1
    checkpointer = ckpt_lib.Checkpointer(runs.checkpoint_directory(str(run)), read_only=True)
    variables = checkpointer.restore_params(0)
    meta = checkpointer.restore_meta(0)
    checkpointer.close()
    assert meta["dataset"] == "imported" and meta["model"] == "resnet50"
    assert meta["class_names"][3] == "flower 3" and meta["source"]["format"] == "keras"
    assert meta["preprocessing"]["mode"] == "caffe"
    logits, _ = jaxres_outputs(
        runs.build_model(config), variables, config.dataset.mean, config.dataset.std
    )
    assert parity_error(logits, ref.logits, relative=True) <= RTOL


def test_saved_groupnorm_run_restores_and_initialises_training(references, tmp_path):
    ref = references("timm_resnetv2_50x1_bit")
    converted = importer.convert("bit_npz", "resnetv2_50x1_bit", ref.files["npz"])
    run = importer.save_run(converted, str(tmp_path / "bit"), image_size=SIZE)
    checkpointer = ckpt_lib.Checkpointer(runs.checkpoint_directory(run), read_only=True)
    restored = checkpointer.restore_params(0)
    checkpointer.close()
    assert not restored.get("batch_stats")
    logits, _ = jaxres_outputs(converted.module(), restored, (127.5,) * 3, (127.5,) * 3)
    assert parity_error(logits, ref.logits, False) <= ATOL

    # Fine-tuning with init_from: a 5-class model takes every weight but the head.
    model = converted.module().clone(num_classes=5)
    x = jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    params = jax.tree.map(lambda a: jnp.full(a.shape, 0.5, a.dtype), shapes)  # "Fresh" weights.
    state = state_lib.TrainState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats={}, opt_state={}, ema_params={},
    )  # fmt: skip
    state = state_lib.load_init_from(run, state, parallel.make_mesh())
    got = flax.traverse_util.flatten_dict(jax.device_get(state.params))
    want = flax.traverse_util.flatten_dict(converted.variables["params"])
    for key, value in got.items():
        if key[0] == "head":  # Another shape: stays fresh.
            assert value.shape[-1] == 5 and np.all(value == 0.5)
        else:
            np.testing.assert_array_equal(value, want[key], err_msg=str(key))
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        importer.save_run(converted, run, image_size=SIZE)


# --- Clear errors -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "source, model, reference, fmt, message",
    [
        (
            "torchvision",
            "resnet101",
            "torchvision_resnet50",
            "pth",
            r"no tensor 'layer3\.6\.conv1\.weight'",
        ),
        ("timm", "resnetv2_50", "torchvision_resnet50", "pth", r"no tensor 'stem\.conv\.weight'"),
        (
            "timm",
            "seresnet50",
            "torchvision_resnet50",
            "pth",
            r"no tensor 'layer1\.0\.se\.fc1\.weight' for jaxres stage1_block1/se/fc1/kernel \(256",
        ),
        (
            "timm",
            "resnetv2_50x1_bit",
            "timm_resnetv2_50",
            "pth",
            r"fit no jaxres weight.*running_mean",
        ),
        ("timm", "resnetv2_50", "timm_resnetv2_50x1_bit", "pth", r"no tensor .*running_mean"),
        (
            "keras",
            "ResNet50",
            "keras_ResNet50V2",
            "weights.h5",
            r"no tensor 'conv2_block1_1_conv/bias' \(layers/conv2d_1/vars/1\)",
        ),
        ("keras", "ResNet50V2", "keras_ResNet50", "keras", r"Keras model 'resnet50'"),
        ("bit_npz", "resnetv2_101x1_bit", "timm_resnetv2_50x1_bit", "npz", r"resnet/block3/unit07"),
    ],
)
def test_file_of_another_architecture_names_the_key(
    references, source, model, reference, fmt, message
):
    with pytest.raises(CheckpointError, match=message):
        importer.convert(source, model, references(reference).files[fmt])


def test_shape_mismatch_and_unused_tensors_name_the_key(references, tmp_path):
    safetensors = pytest.importorskip("safetensors.numpy")
    state = safetensors.load_file(references("timm_seresnet50").files["safetensors"])
    bad = dict(
        state, **{"layer1.0.conv2.weight": state["layer1.0.conv2.weight"][:, :, :1, :1].copy()}
    )
    safetensors.save_file(bad, str(tmp_path / "shape.safetensors"))
    with pytest.raises(
        CheckpointError,
        match=r"'layer1\.0\.conv2\.weight' has shape \(64, 64, 1, 1\).*\(3, 3, 64, 64\)",
    ):
        importer.convert("timm", "seresnet50", str(tmp_path / "shape.safetensors"))
    extra = dict(state, **{"extra.weight": np.zeros(3, np.float32)})
    safetensors.save_file(extra, str(tmp_path / "extra.safetensors"))
    with pytest.raises(CheckpointError, match=r"1 tensor\(s\) .* 'extra\.weight'"):
        importer.convert("timm", "seresnet50", str(tmp_path / "extra.safetensors"))


def test_bad_names_and_paths_are_user_errors(tmp_path):
    with pytest.raises(ConfigError, match="Unknown weights source 'onnx'"):
        importer.architecture("onnx", "resnet50")
    with pytest.raises(ConfigError, match="Did you mean 'resnet50'"):
        importer.architecture("torchvision", "resnet5O")
    with pytest.raises(ConfigError, match="ResNet50V2"):
        importer.architecture("keras", "ResNet50V3")
    with pytest.raises(CheckpointError, match="does not exist"):
        importer.convert("timm", "resnet50", str(tmp_path / "missing.pth"))
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match="not a readable .npz"):
        importer.convert("bit_npz", "resnetv2_50x1_bit", str(tmp_path / "junk.npz"))


@pytest.mark.parametrize(
    "model, overrides, expected",
    [("resnetv2_50", importer.KERAS_V2, 25_613_800), ("resnet50", importer.KERAS_V1, 25_636_712)],
)
def test_keras_layouts_match_keras_parameter_counts(model, overrides, expected):
    # Keras count_params() of ResNet50V2 / ResNet50 (1000 classes), moving statistics included.
    module = models.create_model(model, 1000, **overrides)
    x = jax.ShapeDtypeStruct((1, SIZE, SIZE, 3), jnp.float32)
    variables = jax.eval_shape(module.init, jax.random.key(0), x)
    assert sum(int(np.prod(v.shape)) for v in jax.tree.leaves(variables)) == expected


def test_layout_options_are_validated():
    with pytest.raises(ConfigError, match="Unknown ResNet conv_bias 'some'"):
        models.create_model("resnet50", conv_bias="some")
    with pytest.raises(ConfigError, match="Did you mean 'last'"):
        models.create_model("resnetv2_50", stride_block="lst")


def test_a_missing_reader_names_the_extra(monkeypatch, tmp_path):
    """Without the [convert] extra (torch absent), reading a .pth says what to install."""
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now raises ImportError.
    path = tmp_path / "weights.pth"
    path.write_bytes(b"not read")
    with pytest.raises(ConfigError, match=r"needs 'torch'.*pip install -e '\.\[convert\]'"):
        formats.read_torch(str(path))
