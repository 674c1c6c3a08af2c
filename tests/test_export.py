"""Weight export: jaxres runs -> timm / torchvision / jax.export, each with round-trip parity.

Each run is a jaxres model with perturbed weights, as the import tests perturb theirs:
norm scales in [0.5, 1.5], norm and conv / dense biases random, BatchNorm statistics
those of the test batch (one train-mode pass) plus a random variance offset, and a head
that gives logits of order 1. It is written with `runs.write_run` and exported:

* timm / torchvision: loaded with `load_state_dict(strict=True)` into
  `timm.create_model(name, pretrained=False)` / `torchvision.models.NAME()`; its float64
  logits must equal jaxres' float32 ones within 1e-4, and importing the export must
  give back the run's weights bit for bit.
* jax_export (through scripts/export_weights.py): a fresh process that never imports
  jaxres loads the artifact and must give jaxres' logits within 1e-5 at two batch sizes.

64x64 images, 10 classes; a resnet18 / resnetv2_18 each, one SE-ResNet-50 and one BiT
R50x1 (GroupNorm + weight standardisation). Needs the `[convert]` extra for the PyTorch
twins (skipped without it).
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
import textwrap

import flax
import jax
import numpy as np
import pytest

from jaxres import models, runs
from jaxres.config_base import IMAGENET_MEAN, IMAGENET_STD, base_config
from jaxres.convert import exporter, formats, importer
from jaxres.errors import CheckpointError, ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE, CLASSES = 64, 10
ATOL = 1e-4  # timm / torchvision logits (float64) vs jaxres (float32).
EXPORT_ATOL = 1e-5  # The jax_export artifact vs jaxres, both float32 on this CPU.
IMAGES = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
VAR_OFFSET = (0.1, 0.5)


def _perturbed_variables(model: models.ResNet, mean, std) -> dict:
    """Random weights (numpy: jitting a ResNet-50's init takes 20 s here), norm affine and
    biases; a head of order-1 logits; BatchNorm statistics of IMAGES."""
    x = runs.normalize(IMAGES, mean, std)
    shapes = jax.eval_shape(model.init, jax.random.key(0), x[:1])["params"]
    rng = np.random.default_rng(1)
    flat = {}
    for (*module, var), leaf in flax.traverse_util.flatten_dict(shapes).items():
        kind, shape = formats.module_kind("/".join(module)), leaf.shape
        if kind == "norm" and var == "scale":
            value = rng.uniform(0.5, 1.5, shape)
        elif kind == "norm":
            value = rng.normal(0, 0.2, shape)
        elif var == "bias":
            value = rng.normal(0, 0.1, shape)
        elif module == ["head"]:
            value = rng.normal(0, 2 / shape[0] ** 0.5, shape)
        else:  # He init: fan_out for convs (as jaxres and torchvision), fan_in for SE layers.
            fan = shape[-1] * np.prod(shape[:-2]) if kind == "conv" else shape[0]
            value = rng.normal(0, (2 / fan) ** 0.5, shape)
        flat[(*module, var)] = value.astype(np.float32)
    variables = {"params": flax.traverse_util.unflatten_dict(flat)}
    if model.norm == "batch":  # Momentum 0: the running statistics become the batch's.
        calibrate = functools.partial(
            model.clone(norm_momentum=0.0).apply, train=True, mutable=["batch_stats"]
        )
        _, state = jax.jit(calibrate)({**variables, "batch_stats": {}}, x)
        stats = flax.traverse_util.flatten_dict(jax.tree.map(np.asarray, state["batch_stats"]))
        for key in [k for k in stats if k[-1] == "var"]:
            stats[key] = stats[key] + rng.uniform(*VAR_OFFSET, stats[key].shape).astype(np.float32)
        variables["batch_stats"] = flax.traverse_util.unflatten_dict(stats)
    return variables


@functools.cache
def _forward(model: models.ResNet):
    return jax.jit(
        lambda v, images, mean, std: model.apply(v, runs.normalize(images, mean, std))[0]
    )


class Run:
    """A written run and its jaxres logits on IMAGES."""

    def __init__(self, directory, name: str):
        mean, std = ((127.5,) * 3,) * 2 if name.endswith("_bit") else (IMAGENET_MEAN, IMAGENET_STD)
        config = base_config()
        config.model.name, config.model.dtype = name, "float32"
        config.dataset.num_classes, config.dataset.image_size = CLASSES, SIZE
        config.dataset.mean, config.dataset.std = mean, std
        model = runs.build_model(config)
        self.variables = _perturbed_variables(model, mean, std)
        names = [f"class {i}" for i in range(CLASSES)]
        self.path = runs.write_run(str(directory), config, self.variables, class_names=names)
        self.logits = np.asarray(_forward(model)(self.variables, IMAGES, mean, std))
        self.mean, self.std = np.array(mean) / 255, np.array(std) / 255
        assert np.abs(self.logits).max() > 0.5  # Logits of order 1, so the tolerance can fail.


@pytest.fixture(scope="module")
def make_run(tmp_path_factory):
    built = {}

    def get(name: str) -> Run:
        if name not in built:
            built[name] = Run(tmp_path_factory.mktemp("runs") / name, name)
        return built[name]

    return get


def _twin_logits(library: str, name: str, path: str, run: Run) -> np.ndarray:
    """The exported file loaded strictly into the library's model; float64 logits on IMAGES."""
    torch = pytest.importorskip("torch")
    if library == "timm":
        model = pytest.importorskip("timm").create_model(
            name, pretrained=False, num_classes=CLASSES
        )
    else:
        model = getattr(pytest.importorskip("torchvision.models"), name)(num_classes=CLASSES)
    if path.endswith(".safetensors"):
        state = pytest.importorskip("safetensors.torch").load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    x = torch.from_numpy(((IMAGES / 255.0 - run.mean) / run.std).transpose(0, 3, 1, 2))
    with torch.no_grad():
        return model.double().eval()(x).numpy()


CASES = [
    ("timm", "resnet18", "safetensors"),
    ("torchvision", "resnet18", "pth"),
    ("timm", "resnetv2_18", "pth"),
    ("timm", "seresnet50", "safetensors"),
    ("timm", "resnetv2_50x1_bit", "safetensors"),
]


@pytest.mark.parametrize("library, name, suffix", CASES, ids=["-".join(c) for c in CASES])
def test_state_dict_round_trip(make_run, tmp_path, library, name, suffix):
    pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    run = make_run(name)
    output = str(tmp_path / f"{name}.{suffix}")
    meta = exporter.export(run.path, library, output)
    assert meta["model"] == name and meta["step"] == 0 and meta["num_classes"] == CLASSES

    err = float(np.abs(_twin_logits(library, name, output, run) - run.logits).max())
    print(f"\nexport parity {library} {name} .{suffix}: max |logit diff| {err:.2e}")
    assert err <= ATOL

    # import(export(run)) is the run, bit for bit.
    back = importer.convert(library, name, output)
    got = flax.traverse_util.flatten_dict(back.variables)
    want = flax.traverse_util.flatten_dict({k: v for k, v in run.variables.items() if v})
    assert set(got) == set(want)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg="/".join(key))

    with open(tmp_path / f"{name}.json") as f:
        written = json.load(f)
    prep = written["preprocessing"]
    assert written["class_names"][3] == "class 3" and written["format"] == library
    assert prep["image_size"] == SIZE and prep["crop_ratio"] == 0.875
    np.testing.assert_allclose(prep["mean"], run.mean)
    np.testing.assert_allclose(prep["std_uint8"], run.std * 255)


def test_unlayout_inverts_layout():
    rng = np.random.default_rng(0)
    for kind, shape, as_conv in [
        ("conv", (3, 3, 4, 5), False),
        ("dense", (4, 5), False),
        ("dense", (4, 5), True),
    ]:
        a = rng.normal(size=shape).astype(np.float32)
        torch_side = formats.torch_unlayout(a, kind, "kernel", as_conv)
        assert torch_side.ndim == (4 if kind == "conv" or as_conv else 2)
        np.testing.assert_array_equal(formats.torch_layout(torch_side, kind, "kernel"), a)


# The loaders run in a fresh interpreter (-I: no PYTHONPATH, no script directory on the path).
LOADER_HEAD = "import sys\nimport numpy as np\n"
LOADER_TAIL = textwrap.dedent(
    """
    images = np.load("images.npy")
    for n in (1, len(images)):
        np.save(f"logits_{n}.npy", np.asarray(call(images[:n])))
    assert "jaxres" not in sys.modules, "the artifact pulled in jaxres"
    """
)


def _run(cmd: list[str], cwd) -> subprocess.CompletedProcess:
    """A fresh CPU process with one device and no PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env = dict(env, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.run(
        cmd, check=False, capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


@pytest.fixture(scope="module")
def served(make_run, tmp_path_factory):
    """scripts/export_weights.py --format jax_export (and --saved_model when TF is installed)."""
    run, directory = make_run("resnet18"), tmp_path_factory.mktemp("serve")
    output = directory / "resnet18.bin"
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "export_weights.py"),
           f"--workdir={run.path}", "--format=jax_export", f"--output={output}",
           "--checkpoint=best", "--compilation_cache="]  # fmt: skip
    if importlib.util.find_spec("tensorflow"):
        cmd.append(f"--saved_model={directory / 'saved_model'}")
    done = _run(cmd, ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    np.save(directory / "images.npy", IMAGES)
    return run, directory


def _check_loader(served, loader: str, name: str) -> None:
    """Runs `loader` (which must not import jaxres) and checks its logits at batch 1 and 3."""
    run, directory = served
    (directory / "load.py").write_text(LOADER_HEAD + textwrap.dedent(loader) + LOADER_TAIL)
    done = _run([sys.executable, "-I", "load.py"], directory)
    assert done.returncode == 0, done.stderr[-2000:]
    for n in (1, len(IMAGES)):
        err = float(np.abs(np.load(directory / f"logits_{n}.npy") - run.logits[:n]).max())
        print(f"\n{name} parity resnet18 batch {n}: max |logit diff| {err:.2e}")
        assert err <= EXPORT_ATOL


def test_jax_export_runs_without_jaxres(served):
    _check_loader(
        served,
        """
        import jax
        exported = jax.export.deserialize(bytearray(open("resnet18.bin", "rb").read()))
        call = exported.call
        """,
        "jax_export",
    )
    with open(served[1] / "resnet18.json") as f:
        meta = json.load(f)
    assert meta["format"] == "jax_export" and meta["serving"]["compute_dtype"] == "float32"
    assert meta["preprocessing"]["mean_uint8"][0] == IMAGENET_MEAN[0]


def test_saved_model_runs_without_jaxres(served):
    if not importlib.util.find_spec("tensorflow"):
        pytest.skip("TensorFlow is not installed: no SavedModel was written.")
    _check_loader(
        served,
        """
        import tensorflow as tf
        model = tf.saved_model.load("saved_model")
        def call(images):
            return model.signatures["serving_default"](images=tf.constant(images))["logits"]
        """,
        "saved_model",
    )


# --- Clear errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "library, name, overrides, message",
    [
        (
            "timm",
            "resnet18",
            {"stem_type": "cifar"},
            r"model\.overrides\.stem_type='cifar' \(resnet18: 'default'\)",
        ),
        ("timm", "resnetv2_50", {"norm": "group"}, r"model\.overrides\.norm='group'"),
        ("torchvision", "resnet50", importer.KERAS_V1, r"model\.overrides\.stride_in_1x1=True"),
        ("timm", "resnetv2_50", importer.KERAS_V2, r"model\.overrides\.stride_block='last'"),
        ("torchvision", "resnetv2_50", {}, r"no torchvision twin.*preact=True"),
        ("timm", "seresnetv2_50", {}, r"no timm twin.*se_ratio"),
        ("timm", "resnetv2_tiny", {}, r"stem_type='cifar'"),
        ("onnx", "resnet18", {}, r"Unknown export library 'onnx'"),
    ],
)
def test_models_without_a_twin_are_refused(library, name, overrides, message):
    with pytest.raises(ConfigError, match=message):
        exporter.twin(library, name, overrides)


def test_training_only_options_and_aliases_export():
    assert exporter.twin("timm", "resnet50", {"zero_init_last": False}) == "resnet50"
    assert exporter.twin("timm", "se_resnet50") == "seresnet50"
    assert exporter.twin("timm", "resnet50", {"se_ratio": 1 / 16}) == "seresnet50"


def test_bad_format_output_and_checkpoint_are_user_errors(make_run, tmp_path):
    run = make_run("resnet18")
    with pytest.raises(ConfigError, match=r"Unknown export format 'onnx'.*jax_export"):
        exporter.export(run.path, "onnx", str(tmp_path / "m.onnx"))
    with pytest.raises(ConfigError, match=r"e\.g\. --output model\.safetensors"):
        exporter.export(run.path, "timm", str(tmp_path / "m.npz"))
    with pytest.raises(CheckpointError, match="No checkpoint at step 7"):
        exporter.export(run.path, "timm", str(tmp_path / "m.pth"), checkpoint=7)
    with pytest.raises(CheckpointError, match="No config.json"):
        exporter.export(str(tmp_path / "nowhere"), "timm", str(tmp_path / "m.pth"))


def test_script_reports_one_line(tmp_path):
    (tmp_path / "run").mkdir()
    config = base_config()
    config.model.name = "resnetv2_tiny"
    runs.write_config(str(tmp_path / "run"), config)
    cmd = [sys.executable, os.path.join(ROOT, "scripts", "export_weights.py"),
           f"--workdir={tmp_path / 'run'}", "--format=timm", f"--output={tmp_path / 'm.pth'}"]  # fmt: skip
    done = _run(cmd, ROOT)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("jaxres error: Model 'resnetv2_tiny' has no timm twin"), (
        done.stderr[-2000:]
    )
