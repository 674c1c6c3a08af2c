"""Tests for jaxres.runs: a run restores anywhere (another device count, another process),
`resume_from` branches a run exactly, one val-loss definition for training and evaluate,
checkpoint names parsed once with a one-line error."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from test_train import smoke_config

from jaxres import evaluate, parallel, runs, train
from jaxres.errors import CheckpointError, ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def metric_rows(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """A smoke run on the 8 fake devices: 16 steps, checkpoints at 4, 8, 12, 16 all kept,
    validated on the whole val split (as scripts/evaluate.py reads it)."""
    workdir = str(tmp_path_factory.mktemp("runs") / "a")
    config = smoke_config(data_dir, **{"checkpoint.keep_latest": 4}, **{"dataset.val_limit": 0})
    state = train.train_and_evaluate(config, workdir)
    return workdir, config, parallel.fetch(state.params)


def test_parse_checkpoint_and_run_step():
    assert runs.parse_checkpoint("best") == "best" and runs.parse_checkpoint("12") == 12
    with pytest.raises(ConfigError, match="'bestest' is not 'latest', 'best' or a step number"):
        runs.parse_checkpoint("bestest")
    assert runs.parse_run_and_step("runs/a:8") == ("runs/a", 8)
    assert runs.parse_run_and_step("runs/a:best") == ("runs/a", "best")
    assert runs.parse_run_and_step("runs/a") == ("runs/a", "latest")


def test_resume_from_branches_a_run_exactly(trained, data_dir, tmp_path):
    """A new workdir started from step 8 of run A ends bit-identical to A (same data, same steps)."""
    workdir_a, _, params_a = trained
    branch = smoke_config(data_dir, resume_from=f"{workdir_a}:8", **{"dataset.val_limit": 0})
    state = train.train_and_evaluate(branch, str(tmp_path / "b"))
    assert int(state.step) == 16
    rows = metric_rows(str(tmp_path / "b"))
    assert min(r["step"] for r in rows) > 8  # Nothing before the branch point was re-trained.
    for a, b in zip(np.asarray(params_a["head"]["kernel"]), np.asarray(parallel.fetch(state.params)["head"]["kernel"])):
        np.testing.assert_array_equal(a, b)

    other = smoke_config(data_dir, resume_from=workdir_a, **{"model.name": "resnetv2_18"})
    with pytest.raises(CheckpointError, match="resume_from needs a run of the same model"):
        train.train_and_evaluate(other, str(tmp_path / "c"))


def test_training_and_evaluate_report_one_val_loss(trained):
    """evaluate's loss (-log of the averaged probability) is training's val cross-entropy."""
    workdir, _, _ = trained
    rows = metric_rows(workdir)
    logged = next(r for r in rows if r["step"] == 16 and "val_loss" in r)
    result = evaluate.evaluate_run(workdir, checkpoint=16)
    assert result["count"] == logged["val_count"]
    assert result["top1"] == pytest.approx(logged["val_top1"])
    assert result["loss"] == pytest.approx(logged["val_loss"], rel=1e-5)


def test_a_run_from_8_devices_restores_on_1_and_resumes_on_2(trained, data_dir):
    """Evaluate in another process with one CPU device; resume training on 2 of the devices."""
    workdir, _, _ = trained
    here = evaluate.evaluate_run(workdir, checkpoint="latest")
    env = dict(os.environ, XLA_FLAGS="", JAX_NUM_CPU_DEVICES="1", JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "evaluate.py"), f"--workdir={workdir}", "--compilation_cache="],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(result.stderr.splitlines()) < 10, result.stderr[-3000:]  # No orbax sharding errors.
    there = json.loads(result.stdout[result.stdout.index("{") :])
    assert there["count"] == here["count"] and there["top1"] == pytest.approx(here["top1"])
    assert there["loss"] == pytest.approx(here["loss"], rel=1e-4)

    longer = smoke_config(data_dir, **{"checkpoint.keep_latest": 4}, num_epochs=3, **{"dataset.val_limit": 0})
    state = train.train_and_evaluate(longer, workdir, devices=jax.devices()[:2])
    assert int(state.step) == 24


def test_load_errors_name_the_fix(tmp_path):
    with pytest.raises(CheckpointError, match="No config.json"):
        runs.load(str(tmp_path))
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "predict.py"), f"--workdir={tmp_path}",
         "--checkpoint=bestest", "x.jpg"],
        env=dict(os.environ, XLA_FLAGS=""), cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "jaxres error: Checkpoint 'bestest' is not 'latest', 'best' or a step number" in result.stderr


def test_a_run_written_before_the_config_sections_moved_still_loads(trained, tmp_path):
    """config.json of a run from before `input.*`, host `augment.*` and `loss.*`: every old key
    is read at its new place, and the run evaluates as before."""
    import shutil

    from jaxres import cli
    from jaxres.config_base import MOVED_KEYS
    from jaxres.data import preprocessing

    workdir, _, _ = trained
    old = str(tmp_path / "old")
    shutil.copytree(workdir, old)
    with open(os.path.join(old, "config.json")) as f:
        saved = json.load(f)
    values = {"dataset.decoder": "cpu", "dataset.decode_reduced": False, "dataset.truncated": "skip",
              "dataset.num_workers": 0, "dataset.crop_min_area": 0.3, "dataset.flip": False,
              "dataset.color_jitter": 0.2, "dataset.randaugment": "rand-m5", "dataset.repeated_aug": 2,
              "optimizer.loss": "bce", "optimizer.label_smoothing": 0.05, "optimizer.bce_threshold": 0.2,
              "log_every_steps": 7, "checkpoint_every_steps": 30, "keep_latest": 3, "keep_best": 2,
              "eval_every_epochs": 2, "optimizer.warmup_epochs": 0.5, "optimizer.head_only_steps": 0}  # fmt: skip
    # What each reads as at its new place: numbers of steps / epochs become periods.
    expected = dict(values, log_every_steps="7", checkpoint_every_steps="30", eval_every_epochs="2ep",
                    **{"optimizer.warmup_epochs": "0.5ep", "optimizer.head_only_steps": "0"})  # fmt: skip
    assert set(values) == set(MOVED_KEYS)

    def parent(tree, dotted):
        *parents, key = dotted.split(".")
        for p in parents:
            tree = tree[p]
        return tree, key

    for old_key, new_key in MOVED_KEYS.items():  # Written as the old version wrote them.
        section, key = parent(saved, new_key)
        section.pop(key)
        section, key = parent(saved, old_key)
        section[key] = values[old_key]
    for emptied in ("augment", "checkpoint", "loss", "input"):
        if not saved[emptied]:
            saved.pop(emptied)
    saved["evals"]["val"].pop("every", None)
    with open(os.path.join(old, "config.json"), "w") as f:
        json.dump(saved, f)

    config = runs.read_config(old)
    for old_key, new_key in MOVED_KEYS.items():
        section, name = parent(config, new_key)
        assert section[name] == expected[old_key], new_key
        section, name = parent(config, old_key)
        assert name not in section
    assert not preprocessing.of(config).decode_reduced
    assert evaluate.evaluate_run(old)["count"] == evaluate.evaluate_run(workdir)["count"]
    # An old command line still runs, reading each moved key at its new place.
    argv = ["train.py", "--config.dataset.num_workers=0", "--config.optimizer.loss", "bce", "--config.seed=1",
            "--config.eval_every_epochs=2", "--config.log_every_steps=5"]  # fmt: skip
    assert cli.moved_config_keys(argv) == [
        "train.py", "--config.input.num_workers=0", "--config.loss.name=bce", "--config.seed=1",
        "--config.evals.val.every=2ep", "--config.log_every=5",
    ]  # fmt: skip
