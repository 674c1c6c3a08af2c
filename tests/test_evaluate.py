"""Tests for jaxres.evaluate / predict / features: every example counted on 8 fake devices,
10-crop and ensemble averaging against hand computations, run loading (EMA, converter-style
directories, mismatched checkpoints), the feature cache and predictions.

Runs are built directly (init + a random head, saved with `Checkpointer`): no training.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from jaxres import checkpoint as ckpt_lib
from jaxres import evaluate, parallel, predict, runs
from jaxres.config_base import base_config
from jaxres.data import loader, sources, transforms
from jaxres.errors import CheckpointError, ConfigError
from jaxres.transfer import features

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("ant", "bee", "cat")


def write_folder(root, split: str, counts: dict[str, int], size=(40, 36), seed=0) -> str:
    """An image folder root/split/<class>/*.jpg of random class-tinted images."""
    rng = np.random.default_rng(seed)
    for c, (name, n) in enumerate(counts.items()):
        folder = os.path.join(root, split, name)
        os.makedirs(folder, exist_ok=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (size[1], size[0], 3))
            pixels[..., c % 3] = np.clip(pixels[..., c % 3] + 80, 0, 255)
            Image.fromarray(pixels.astype(np.uint8)).save(
                os.path.join(folder, f"{i:03d}.jpg"), quality=95
            )
    return root


def run_config(data_dir: str, num_classes: int = 3, model: str = "resnetv2_tiny"):
    c = base_config()
    c.model.name, c.model.dtype = model, "float32"
    c.dataset.name, c.dataset.data_dir = "imagefolder", data_dir
    c.dataset.train_split, c.dataset.val_split = "train", "val"
    c.dataset.num_classes, c.dataset.image_size = num_classes, 32
    c.dataset.eval_crop_ratio = 0.8  # 40 -> 32: the 10 crops differ.
    c.input.num_workers = 0
    c.eval_batch_size = 8
    return c


def make_run(root: str, config, seed: int = 0, step: int = 3, ema: bool = False) -> str:
    """A run directory (config.json + checkpoints/) holding init weights with a random head.

    Saved as a plain {"params", "batch_stats"[, "ema_params"]} dict, as the weight converter does.
    """
    os.makedirs(root, exist_ok=True)
    model = runs.build_model(config)
    size = config.dataset.image_size
    init = functools.partial(model.init, train=False)
    variables = parallel.run_once(init, jax.random.key(seed), jnp.zeros((1, size, size, 3)))
    params = jax.tree.map(np.asarray, dict(variables["params"]))
    rng = np.random.default_rng(seed)
    params["head"] = {
        "kernel": rng.normal(0, 0.5, params["head"]["kernel"].shape).astype(np.float32),
        "bias": np.zeros_like(params["head"]["bias"]),
    }
    state = {
        "params": params,
        "batch_stats": jax.tree.map(np.asarray, dict(variables.get("batch_stats", {}))),
    }
    if ema:
        config.ema_decay = 0.99
        state["ema_params"] = jax.tree.map(lambda p: p * 0.5, params)
    with open(os.path.join(root, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    checkpointer = ckpt_lib.Checkpointer(os.path.join(root, "checkpoints"))
    checkpointer.save(
        step, state, {"model": config.model.name, "num_classes": config.dataset.num_classes}
    )
    checkpointer.close()
    return root


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    write_folder(root, "train", {n: 4 for n in CLASSES}, seed=1)
    return write_folder(
        root, "val", {"ant": 7, "bee": 8, "cat": 6}, seed=2
    )  # 21: not a multiple of 8.


@pytest.fixture(scope="module")
def run_dirs(data, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return [make_run(str(root / f"run{s}"), run_config(data), seed=s) for s in (0, 1)]


def reference(member: runs.LoadedRun, images: np.ndarray) -> np.ndarray:
    """Softmax of the model on a stack of uint8 images, one device, no sharding."""
    x = runs.normalize(jnp.asarray(images), member.config.dataset.mean, member.config.dataset.std)
    logits, _ = member.model.apply(member.variables, x, train=False)
    return np.asarray(jax.nn.softmax(logits, -1))


def test_evaluate_counts_every_example_on_8_devices(run_dirs, data):
    assert jax.device_count() == 8
    results = evaluate.evaluate_runs([run_dirs[0]], split="val")
    source = sources.ImageFolderSource(os.path.join(data, "val"), list(CLASSES))
    member = runs.load(run_dirs[0])
    transform = transforms.EvalTransform(32, 0.8)
    examples = [transform(source[i]) for i in range(len(source))]
    probs = reference(member, np.stack([e["image"] for e in examples]))
    labels = np.array([e["label"] for e in examples])
    assert results["count"] == len(source) == 21
    assert results["top1"] == pytest.approx(np.mean(probs.argmax(1) == labels), abs=1e-6)
    assert results["loss"] == pytest.approx(
        -np.mean(np.log(probs[np.arange(21), labels])), rel=1e-4
    )
    per_class = [np.mean(probs[labels == c].argmax(1) == c) for c in range(3)]
    assert results["mean_per_class"] == pytest.approx(np.mean(per_class), abs=1e-6)
    assert results["top5"] == 1.0  # 3 classes.


def test_ten_crop_is_the_average_of_ten_softmaxes(run_dirs, data):
    member = runs.load(run_dirs[0])
    source = sources.ImageFolderSource(os.path.join(data, "val"), list(CLASSES))
    probs, mask = evaluate.Ensemble([member]).probabilities(source, "10crop", batch_size=8)
    transform = loader.view_transform(32, 0.8, "10crop")
    for i in (0, 20):
        crops = transform(source[i])["image"]  # [10, 32, 32, 3]: corners, centre, then mirrors.
        assert crops.shape == (10, 32, 32, 3)
        np.testing.assert_array_equal(crops[5:], crops[:5, :, ::-1])
        assert not np.array_equal(crops[0], crops[3])  # 40x44 -> 32x32: the corners differ.
        by_hand = np.mean([reference(member, crop[None])[0] for crop in crops], axis=0)
        np.testing.assert_allclose(probs[i], by_hand, atol=1e-5)
    assert mask.sum() == len(source)
    centre, _ = evaluate.Ensemble([member]).probabilities(source, "center", batch_size=8)
    assert not np.allclose(centre, probs)
    flip, _ = evaluate.Ensemble([member]).probabilities(source, "flip", batch_size=8)
    one = transforms.EvalTransform(32, 0.8)(source[3])["image"]
    np.testing.assert_allclose(
        flip[3], reference(member, np.stack([one, one[:, ::-1]])).mean(0), atol=1e-5
    )


def test_ensemble_averages_member_probabilities(run_dirs, data):
    members = [runs.load(r) for r in run_dirs]
    source = sources.ImageFolderSource(os.path.join(data, "val"), list(CLASSES))
    single = [evaluate.Ensemble([m]).probabilities(source, "center", 8)[0] for m in members]
    both, _ = evaluate.Ensemble(members).probabilities(source, "center", 8)
    np.testing.assert_allclose(both, (single[0] + single[1]) / 2, atol=1e-6)
    assert not np.allclose(single[0], single[1])
    results = evaluate.evaluate_runs(run_dirs, split="val")
    labels = np.asarray(source.labels)
    assert results["top1"] == pytest.approx(np.mean(both.argmax(1) == labels), abs=1e-6)
    assert [m["run"] for m in results["members"]] == [os.path.abspath(r) for r in run_dirs]


def test_ema_weights_are_used_when_the_run_kept_an_ema(data, tmp_path):
    run = make_run(str(tmp_path / "ema"), run_config(data), ema=True)
    member = runs.load(run)
    kernel = member.variables["params"]["head"]["kernel"]
    plain = runs.load(make_run(str(tmp_path / "plain"), run_config(data)))
    np.testing.assert_allclose(kernel, plain.variables["params"]["head"]["kernel"] * 0.5, rtol=1e-6)


def test_checkpoint_of_another_model_is_a_one_line_error(run_dirs, tmp_path):
    import shutil

    bad = str(tmp_path / "bad")
    shutil.copytree(run_dirs[0], bad)
    path = os.path.join(bad, "config.json")
    with open(path) as f:
        config = json.load(f)
    config["model"]["name"] = "resnetv2_18"
    with open(path, "w") as f:
        json.dump(config, f)
    with pytest.raises(CheckpointError, match=r"does not fit model .*Is config.json the one"):
        runs.load(bad)
    with pytest.raises(CheckpointError, match="No checkpoint at step 99"):
        runs.load(run_dirs[0], 99)
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "scripts", "evaluate.py"),
            f"--workdir={tmp_path / 'nowhere'}",
        ],
        check=False,
        capture_output=True,
        text=True,
        env=dict(os.environ, XLA_FLAGS=""),
    )
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("jaxres error")]
    assert len(errors) == 1 and "No config.json" in errors[0]


def test_best_checkpoint_is_the_highest_val_top1(data, tmp_path):
    run = make_run(str(tmp_path / "r"), run_config(data), step=1)
    checkpointer = ckpt_lib.Checkpointer(
        os.path.join(run, "checkpoints"), keep_latest=3, keep_best=3
    )
    member = runs.load(run)
    for step, top1 in ((2, 0.9), (3, 0.5)):
        checkpointer.save(
            step,
            {"params": member.variables["params"], "batch_stats": member.variables["batch_stats"]},
            {"model": "resnetv2_tiny"},
            {"val_top1": top1},
        )
    checkpointer.close()
    assert runs.load(run, "best").step == 2
    assert runs.load(run, "latest").step == 3


def test_predict_top_k_true_labels_and_grid(run_dirs, data, tmp_path):
    out = predict.predict(
        run_dirs[0],
        [os.path.join(data, "val", "bee"), os.path.join(data, "val", "ant", "000.jpg")],
        top_k=2,
    )
    assert len(out) == 9 and all(p.ok for p in out)
    assert [p.true for p in out] == ["bee"] * 8 + ["ant"]
    for p in out:
        assert (
            len(p.top) == 2 and p.top[0][1] >= p.top[1][1] and {n for n, _ in p.top} <= set(CLASSES)
        )
    text = predict.format_predictions(out)
    assert text.count("\n") == 8 and "(true: ant)" in text
    grid = tmp_path / "grid.png"
    predict.draw_grid(out, str(grid), thumb=64, columns=4)
    width, height = Image.open(grid).size  # 4 columns, 3 rows of 64 px images with gaps and labels.
    assert width > 4 * 64 and height > 3 * 64


def test_feature_cache_reused_and_invalidated(run_dirs, data, tmp_path, monkeypatch):
    calls = []
    original = features.FeatureExtractor.extract
    monkeypatch.setattr(
        features.FeatureExtractor,
        "extract",
        lambda self, *a, **k: calls.append(self.layer) or original(self, *a, **k),
    )
    source = sources.ImageFolderSource(os.path.join(data, "val"), list(CLASSES))
    name = {"name": "toy", "split": "val"}
    member = runs.load(run_dirs[0])

    def get(extractor):
        return features.cached_features(
            extractor, source, name, str(tmp_path), batch_size=8, chunk_rows=8
        )

    x, y, mask = get(features.FeatureExtractor(member))
    assert (
        x.shape == (21, 128)
        and y.tolist() == list(source.labels)
        and mask.all()
        and len(calls) == 1
    )
    x2, y2, _ = get(features.FeatureExtractor(member))
    assert len(calls) == 1  # Second run: no forward pass.
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    get(features.FeatureExtractor(member, layer="stage3"))  # Another layer.
    get(features.FeatureExtractor(member, views="flip"))  # Other preprocessing.
    get(features.FeatureExtractor(runs.load(run_dirs[1])))  # Other checkpoint.
    assert len(calls) == 4
    stage3, _, _ = get(features.FeatureExtractor(member, layer="stage3"))
    assert stage3.shape == (21, 64) and len(calls) == 4
    chunks = [
        f
        for d in os.listdir(tmp_path)
        for f in os.listdir(tmp_path / d)
        if f.startswith("features-")
    ]
    assert len(chunks) >= 4 * 3  # 21 rows in chunks of 8 rows per cache.


def test_spatial_layer_unpooled_and_unknown_layer_error(run_dirs, data):
    member = runs.load(run_dirs[0])
    source = sources.ImageFolderSource(os.path.join(data, "val"), list(CLASSES))
    x, _, _ = features.FeatureExtractor(member, layer="stage4", pool=False).extract(source, 8)
    assert x.shape == (21, 4, 4, 128)
    with pytest.raises(
        ConfigError, match=r"Unknown feature layer 'stage9'.*Valid: logits, pre_logits, stage1"
    ):
        features.FeatureExtractor(member, layer="stage9")
