"""Tests for jaxres.transfer.export / folder: a fitted probe exported as a run gives the probe's
logits on images (ridge, logistic, MLP; pre_logits and a stage layer), evaluate / predict /
init_from read it like any run, the one-command folder flow, and the errors that name the fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from test_evaluate import make_run, run_config, write_folder
from test_protocols import tiny_protocol

from jaxres import evaluate, evaluators, optim, parallel, predict, runs, train
from jaxres import state as state_lib
from jaxres.checkpoint import Checkpointer
from jaxres.data import loader, sources
from jaxres.errors import CheckpointError, ConfigError, DataError
from jaxres.transfer import export, features, folder, runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = {"ant": 10, "bee": 10, "cat": 10}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    data = str(tmp_path_factory.mktemp("data"))
    write_folder(data, "train", CLASSES, seed=1)
    write_folder(data, "test", {"ant": 4, "bee": 4, "cat": 4}, seed=2)
    run = make_run(str(tmp_path_factory.mktemp("runs") / "run"), run_config(data))
    return run, data


def _images(source, n):
    transform = loader.view_transform(32, 0.8)
    return np.stack([transform(source[i])["image"] for i in range(n)])


@pytest.mark.parametrize("method", ["ridge", "logistic", "mlp"])
@pytest.mark.parametrize("layer", ["pre_logits", "stage2"])
def test_exported_logits_equal_the_probe_on_features(toy, tmp_path, method, layer):
    run, data = toy
    loaded = runs.load(run)
    extractor = features.FeatureExtractor(loaded, layer, mesh=parallel.make_mesh())
    dataset = tiny_protocol(run, data).dataset
    train_source = sources.open_source(dataset, "train")
    x, y, _ = extractor.extract(train_source, 8)
    config = tiny_protocol(run, data).probe
    config.mlp_steps, config.mlp_hidden = 60, 16
    fitted = runner.make_probe(method, config, 0).fit(x, y, num_classes=3)
    out = export.write_probe_run(loaded, extractor, fitted, list(CLASSES), dataset, str(tmp_path / "p"), {})

    exported = runs.load(out)
    assert exported.config.model.head_layer == layer and exported.config.dataset.num_classes == 3
    assert runs.class_names(exported) == list(CLASSES)
    if layer == "stage2":  # Later stages are not part of the exported model.
        assert not any(k.startswith(("stage3", "stage4", "final_norm")) for k in exported.variables["params"])
    test_source = sources.open_source(dataset, "test")
    logits, _, _ = runs.ModelSpec.of(exported).apply(exported.variables, jnp.asarray(_images(test_source, 12)))
    x_test, _, _ = extractor.extract(test_source, 8)
    want = np.asarray(fitted.predict_scores(x_test))
    assert np.abs(np.asarray(logits) - want).max() <= 1e-4


def test_protocol_export_is_a_run_that_evaluate_predict_and_init_from_read(toy, tmp_path, capsys):
    run, data = toy
    config = tiny_protocol(run, data, kind="split", per_class="0")
    config.dataset.val_split = "test"
    config.export.dir = str(tmp_path / "probe")
    results = runner.run_protocol(config, str(tmp_path / "w"))
    info = results["export"]
    assert info["per_class"] == 0 and info["method"] in ("logistic", "ridge") and info["n_test"] == 12
    assert "Exported the" in capsys.readouterr().out

    scored = evaluate.evaluate_run(info["dir"])
    assert scored["count"] == 12 and scored["top1"] == pytest.approx(info["test_top1"])

    found = predict.predict(info["dir"], [os.path.join(data, "test", "bee")], top_k=2)
    assert {p.true for p in found} == {"bee"} and all(p.top[0][0] in CLASSES for p in found)

    # Linear probe, then fine-tune: the first evaluation is the probe's accuracy.
    ft = runs.read_config(info["dir"])
    ft.init_from, ft.eval_batch_size, ft.batch_size = info["dir"], 8, 8
    mesh = parallel.make_mesh()
    model = runs.build_model(ft)
    tx = optim.make_optimizer(ft.optimizer, optim.make_schedule(ft.optimizer, 8, 4, 8))
    target = Checkpointer(str(tmp_path / "ft" / "checkpoints"))
    state = state_lib.restore_or_init(ft, target, model, tx, mesh)
    target.close()
    _, eval_fn = train.make_step_fns(ft, model, tx, mesh)
    start = evaluators.validate(train.eval_variables(state, ft), eval_fn, sources.open_source(ft.dataset, "test"), ft, mesh)
    assert abs(start["val_top1"] - info["test_top1"]) <= 0.005


def test_export_errors_name_the_fix(toy, tmp_path):
    run, data = toy
    config = tiny_protocol(run, data, kind="split", per_class="2,4", trials=1)
    config.dataset.val_split = "test"
    config.export.dir = str(tmp_path / "probe")
    config.export.per_class = 3
    with pytest.raises(ConfigError, match=r"export.per_class=3 is not a setting of this protocol \(2, 4\)"):
        runner.run_protocol(config, str(tmp_path / "w"))
    config.export.per_class = -1
    config.features.layer = "logits"
    with pytest.raises(ConfigError, match="cannot be exported as a head"):
        runner.run_protocol(config, str(tmp_path / "w2"))
    assert not os.path.exists(tmp_path / "w2" / "features")  # Refused before the feature pass.


def test_short_class_fails_before_the_feature_pass(toy, tmp_path):
    run, data = toy
    config = tiny_protocol(run, data, kind="split", per_class="500")
    config.dataset.val_split = "test"
    with pytest.raises(DataError, match="needs 500 train images"):
        runner.run_protocol(config, str(tmp_path))
    assert not os.path.exists(tmp_path / "features")


def test_folder_flow_exports_reports_and_reuses_features(toy, tmp_path, monkeypatch):
    run, data = toy
    images = os.path.join(data, "train")
    out = str(tmp_path / "out")
    results = folder.transfer_folder(images, run, out, head="logistic", val_fraction=0.3)
    assert results["n_test"] == 9 and results["n_train"] == 21
    assert [r["count"] for r in results["per_class"]] == [3, 3, 3]
    for name in ("results.json", "confusion.png", "predictions.png", "train.txt", "val.txt"):
        assert os.path.isfile(os.path.join(out, name))
    assert Image.open(os.path.join(out, "predictions.png")).size[1] > 32
    assert evaluate.evaluate_run(out)["top1"] == pytest.approx(results["test_top1"])

    def no_forward_pass(*args, **kwargs):
        raise AssertionError("features were recomputed")

    monkeypatch.setattr(features.FeatureExtractor, "extract", no_forward_pass)
    ridge = folder.transfer_folder(images, run, out, head="ridge", val_fraction=0.3)
    with open(os.path.join(out, "results.json")) as f:
        assert json.load(f)["method"] == "ridge" == ridge["method"]


def test_folder_flow_errors(toy, tmp_path):
    run, data = toy
    small = tmp_path / "small"
    write_folder(str(small), "all", {"ant": 5, "bee": 1})
    with pytest.raises(DataError, match=r"Class 'bee' .* has 1 image\(s\); a 20% validation split needs at least 3.* add images to it"):
        folder.transfer_folder(str(small / "all"), run, str(tmp_path / "o"))
    write_folder(str(small), "two", {"ant": 5, "bee": 2})
    with pytest.raises(DataError, match=r"Class 'bee' .* has 2 image\(s\).*--val_fraction=0.5"):
        folder.transfer_folder(str(small / "two"), run, str(tmp_path / "o"))
    # The fix the message names works.
    assert folder.transfer_folder(str(small / "two"), run, str(tmp_path / "half"), val_fraction=0.5)["per_class"]

    with pytest.raises(CheckpointError, match="--from .* is not a usable run: No config.json"):
        folder.transfer_folder(os.path.join(data, "train"), str(tmp_path), str(tmp_path / "o"))
    # One batch policy with every entry point: refused with the fix named, never rounded up.
    with pytest.raises(ConfigError, match=r"--batch_size=12 is not divisible by the 8 devices .* --batch_size=16"):
        folder.transfer_folder(os.path.join(data, "train"), run, str(tmp_path / "o"), batch_size=12)
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "transfer.py"), f"--images={data}/train",
         f"--from={tmp_path / 'nowhere'}", f"--output={tmp_path / 'o'}"],
        env=dict(os.environ, XLA_FLAGS=""), cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert [line for line in result.stderr.splitlines() if line.startswith("jaxres error: --from")]


def test_folder_flow_keeps_an_empty_class_folder(toy, tmp_path, caplog):
    """An empty class sub-folder is warned about by name and kept (its label, a row with no
    images), as the README says; the rest is split and probed as usual."""
    run, _ = toy
    root = tmp_path / "with_empty"
    write_folder(str(root), "all", {"ant": 5, "bee": 5, "cat": 5})
    os.makedirs(root / "all" / "dodo")
    results = folder.transfer_folder(str(root / "all"), run, str(tmp_path / "o"))
    rows = {r["class"]: r["count"] for r in results["per_class"]}
    assert rows == {"ant": 1, "bee": 1, "cat": 1, "dodo": 0}
    assert "dodo has no images" in caplog.text
