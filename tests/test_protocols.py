"""Tests for jaxres.protocols and scripts/linear_probe.py: class-balanced, seeded, disjoint
sampling; one-line errors for short or empty classes; a whole protocol run end to end
(results.json / .csv / confusion.png); the demo probe on a briefly trained run.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image
from test_evaluate import make_run, run_config, write_folder

from jaxres import config_transfer, demo, train
from jaxres.errors import ConfigError, DataError
from jaxres.transfer import runner, sampling

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["a", "b", "c", "d"]


def test_pool_trials_are_balanced_seeded_disjoint_and_nested():
    labels = np.repeat(np.arange(4), [40, 35, 60, 31])
    trials = sampling.sample_pool_trials(labels, NAMES, [15, 30], 50, True, trials=3, seed=7)
    assert [(t.per_class, t.trial, t.seed) for t in trials] == [
        (n, t, 7 + t) for n in (15, 30) for t in range(3)
    ]
    for t in trials:
        assert np.bincount(labels[t.train], minlength=4).tolist() == [t.per_class] * 4
        assert np.bincount(labels[t.test], minlength=4).tolist() == [
            min(50, n - t.per_class) for n in (40, 35, 60, 31)
        ]
        assert not set(t.train) & set(t.test)
    assert set(trials[0].train) <= set(trials[3].train)  # Trial 0 at N=15 inside trial 0 at N=30.
    assert not np.array_equal(trials[0].train, trials[1].train)
    again = sampling.sample_pool_trials(labels, NAMES, [15, 30], 50, True, trials=3, seed=7)
    for a, b in zip(trials, again):
        np.testing.assert_array_equal(a.train, b.train)
        np.testing.assert_array_equal(a.test, b.test)


def test_split_trials_sample_train_and_keep_the_whole_test_split():
    labels = np.repeat(np.arange(4), 12)
    trials = sampling.sample_split_trials(labels, 30, NAMES, [1, 5, 0], trials=3, seed=0)
    assert [t.per_class for t in trials] == [1, 1, 1, 5, 5, 5, 0]  # N = 0: all train, one trial.
    for t in trials:
        expected = t.per_class or 12
        assert np.bincount(labels[t.train]).tolist() == [expected] * 4
        np.testing.assert_array_equal(t.test, np.arange(30))


def test_short_and_empty_classes_are_one_line_data_errors():
    labels = np.repeat(np.arange(4), [40, 35, 60, 31])
    with pytest.raises(
        DataError,
        match=r"Class 'd' has 31 images in the pool but the protocol needs 31 train \+ at least 1 test",
    ):
        sampling.sample_pool_trials(labels, NAMES, [31], 50, True, 1, 0)
    with pytest.raises(
        DataError,
        match=r"Class 'b' has 35 images .* needs 15 train \+ 25 test \(1 more classes are short\)",
    ):
        sampling.sample_pool_trials(labels, NAMES, [10, 15], 25, False, 1, 0)
    with pytest.raises(DataError, match=r"Class 'e' has no images .*exclude_classes=e"):
        sampling.sample_split_trials(labels, 10, NAMES + ["e"], [5], 1, 0)


def tiny_protocol(run: str, data_dir: str, **protocol) -> ml_collections.ConfigDict:
    c = config_transfer.base_transfer_config()
    c.model.checkpoint = run
    c.dataset.name, c.dataset.data_dir = "imagefolder", data_dir
    c.eval_batch_size = 8
    c.protocol.update(protocol)
    c.probe.logistic_l2s = "1e-1,1e-2"
    c.probe.ridge_l2s = "1e-2,1"
    return c


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    data = str(tmp_path_factory.mktemp("data"))
    write_folder(data, "train", {"ant": 12, "bee": 12, "cat": 12}, seed=1)
    write_folder(data, "test", {"ant": 5, "bee": 4, "cat": 3}, seed=2)
    run = make_run(str(tmp_path_factory.mktemp("runs") / "run"), run_config(data))
    return run, data


def test_pool_protocol_end_to_end(toy, tmp_path, capsys):
    run, data = toy
    config = tiny_protocol(
        run,
        data,
        kind="pool",
        pool_splits="train,test",
        per_class="2,4",
        test_per_class=5,
        trials=2,
    )
    results = runner.run_protocol(config, str(tmp_path))
    assert set(results["summary"]) == {"logistic", "ridge"}
    s = results["summary"]["logistic"]["4"]
    assert s["trials"] == 2 and 0 <= s["top1_mean"] <= 1 and s["top1_std"] >= 0
    top1 = [
        r["top1"] for r in results["trials"] if r["method"] == "logistic" and r["per_class"] == 4
    ]
    assert s["top1_mean"] == pytest.approx(np.mean(top1)) and s["top1_std"] == pytest.approx(
        np.std(top1, ddof=1)
    )
    assert all(r["n_train"] == 3 * r["per_class"] and r["n_test"] == 15 for r in results["trials"])
    with open(tmp_path / "results.json") as f:
        saved = json.load(f)
    assert saved["summary"] == results["summary"] and saved["model"]["step"] == 3
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 2 and {r["method"] for r in rows} == {"logistic", "ridge"}
    assert Image.open(tmp_path / "confusion.png").size[0] > 3
    table = capsys.readouterr().out
    assert "train/class" in table and "mean per-class (%)" in table and "±" in table
    assert os.listdir(tmp_path / "features")  # Cached.


def test_linear_probe_script_reports_a_short_class_in_one_line(toy, tmp_path):
    run, data = toy
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "scripts", "linear_probe.py"),
            f"--config={os.path.join(REPO, 'configs', 'transfer', 'fewshot.py')}:imagefolder",
            f"--workdir={tmp_path}",
            f"--config.model.checkpoint={run}",
            f"--config.dataset.data_dir={data}",
            "--config.eval_batch_size=8",
        ],
        check=False,
        capture_output=True,
        text=True,
        env=dict(os.environ, XLA_FLAGS=""),
        cwd=REPO,
    )
    assert result.returncode == 2, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("jaxres error")]
    assert len(errors) == 1
    assert "Class 'ant' has 12 images" in errors[0] and "needs 25 train images" in errors[0]


def test_bad_protocol_settings_are_config_errors(toy, tmp_path):
    run, data = toy
    with pytest.raises(ConfigError, match="Unknown class in config.protocol.exclude_classes 'dog'"):
        runner.run_protocol(
            tiny_protocol(run, data, exclude_classes="dog", per_class="2"), str(tmp_path)
        )
    with pytest.raises(ConfigError, match="Unknown config.protocol.kind 'poool'"):
        runner.run_protocol(tiny_protocol(run, data, kind="poool"), str(tmp_path))
    with pytest.raises(ConfigError, match="model.checkpoint"):
        runner.run_protocol(tiny_protocol("", data), str(tmp_path))


def test_transfer_configs_load():
    import importlib.util

    for name in ("caltech101", "caltech256", "indoor67", "fewshot"):
        spec = importlib.util.spec_from_file_location(
            name, os.path.join(REPO, "configs", "transfer", f"{name}.py")
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config()
        assert set(config) == set(config_transfer.base_transfer_config())
        assert config_transfer.lists(config).per_class


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """configs/demo.py:smoke trained once (about 20 s on 2 cores)."""
    sys.path.insert(0, os.path.join(REPO, "configs"))
    import demo

    config = demo.get_config("smoke")
    config.dataset.data_dir = str(tmp_path_factory.mktemp("cache"))
    workdir = str(tmp_path_factory.mktemp("smoke"))
    train.train_and_evaluate(config, workdir)
    return workdir


def test_demo_probe_beats_chance_on_a_trained_run(smoke_run):
    row = demo.demo_probe(smoke_run)
    assert row["train"] == 1438 and row["count"] == 359  # The whole digits train / val splits.
    assert row["top1"] > 0.3 and "logistic" in row["what"]  # Chance is 0.1.
    assert os.listdir(os.path.join(smoke_run, "features"))
    assert demo.demo_probe(smoke_run, method="ridge")["top1"] > 0.3
