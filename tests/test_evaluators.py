"""Evaluators during training (`config.evals`, jaxres/evaluators.py) and the period rule."""

from __future__ import annotations

import os
import sys

import pytest

from jaxres import checkpoint as ckpt_lib
from jaxres import config_base, config_transfer, evaluate, metrics, periods, runs, train
from jaxres.errors import ConfigError
from jaxres.transfer import runner

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "configs"))
import demo


def test_periods_spell_steps_epochs_and_examples():
    assert periods.to_steps("500", 100, 32, "x") == periods.to_steps("500st", 100, 32, "x") == 500
    assert periods.to_steps("2ep", 100, 32, "x") == 200
    assert periods.to_steps("0.005ep", 100, 32, "x") == 1  # At least one step.
    assert periods.to_steps("100ex", 100, 32, "x") == 4  # Rounded up to whole steps.
    assert periods.to_steps("0", 100, 32, "x") == 0 and not periods.due(5, 0)
    for bad in ("2 weeks", "1.5", "ep"):
        with pytest.raises(ConfigError, match=r"config.x="):
            periods.parse(bad, "x")


def test_a_bad_evaluator_is_named_before_training(tmp_path):
    config = demo.get_config("smoke")
    config.dataset.data_dir = str(tmp_path)
    config.evals.val.every = "weekly"
    with pytest.raises(ConfigError, match=r"config.evals.val.every='weekly' is not a period"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    config = demo.get_config("smoke")
    config.dataset.data_dir = str(tmp_path)
    config.evals.oops = config_base.classification_eval()
    with config.evals.oops.unlocked():
        config.evals.oops.type = "clasification"
    with pytest.raises(ConfigError, match=r"config.evals.oops.type 'clasification'.*classification"):
        train.train_and_evaluate(config, str(tmp_path / "run"))
    config = demo.get_config("smoke")
    config.checkpoint.best_metric = "v2_top1"
    with pytest.raises(ConfigError, match=r"best_metric='v2_top1' is logged by no evaluator \(val\)"):
        train.train_and_evaluate(config, str(tmp_path / "run"))


PROTOCOL = '''
from jaxres.config_transfer import fewshot_config


def get_config(arg=""):
    c = fewshot_config("digits")
    c.protocol.per_class, c.protocol.trials, c.probe.methods = "3", 2, "ridge"
    return c
'''


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """The smoke run (16 steps, 8 per epoch) with four evaluators on their own periods; best by
    the 5-shot few-shot top-1."""
    data = str(tmp_path_factory.mktemp("data"))
    protocol = tmp_path_factory.mktemp("protocol") / "tiny.py"
    protocol.write_text(PROTOCOL)
    config = demo.get_config("smoke,fewshot")
    config.dataset.data_dir = data
    config.dataset.val_limit = 0  # The whole split: the numbers evaluate.py reports.
    config.evals.fewshot.every = "4"  # Resumed and 2-process runs with it: tests/test_faults.py.
    config.evals.crops = config_base.classification_eval(every="1ep", views="10crop")
    config.evals.probe = config_base.linear_probe_eval(str(protocol), every="0", data_dir=data)
    config.checkpoint.update(every="4", keep_latest=4, keep_best=1, best_metric="fewshot/digits/5shot")
    workdir = str(tmp_path_factory.mktemp("runs") / "run")
    train.train_and_evaluate(config, workdir)
    return workdir, data, config


def _rows_with(workdir: str, key: str) -> dict[int, dict]:
    return {r["step"]: r for r in metrics.read_rows(workdir) if key in r}


def test_each_evaluator_on_its_own_period(trained):
    workdir, _, _ = trained
    assert sorted(_rows_with(workdir, "fewshot/digits/5shot")) == [4, 8, 12, 16]
    assert sorted(_rows_with(workdir, "val_top1")) == [8, 16]
    assert sorted(_rows_with(workdir, "crops_top1")) == [8, 16]
    assert sorted(_rows_with(workdir, "probe/ridge/3")) == [16]  # "0": only at the end.
    for name in ("fewshot", "val", "crops", "probe"):  # Each one's wall time.
        assert all(r[f"{name}_eval_s"] > 0 for r in _rows_with(workdir, f"{name}_eval_s").values())


def test_classification_equals_evaluate_py(trained):
    """The default `val` is today's validation: the numbers scripts/evaluate.py reports on that
    checkpoint, centre crop and 10-crop."""
    workdir, _, _ = trained
    final = _rows_with(workdir, "val_top1")[16]
    for crops, prefix in ((1, "val"), (10, "crops")):
        reference = evaluate.evaluate_run(workdir, 16, crops=crops)
        assert final[f"{prefix}_count"] == reference["count"] == 359
        for key in ("top1", "top5", "mean_per_class"):
            assert final[f"{prefix}_{key}"] == pytest.approx(reference[key], abs=1e-6), (prefix, key)
        assert final[f"{prefix}_loss"] == pytest.approx(reference["loss"], rel=1e-5)


def test_fewshot_equals_linear_probe_py(trained, tmp_path):
    """The last few-shot value is what scripts/linear_probe.py reports on that checkpoint."""
    workdir, data, config = trained
    protocol = config_transfer.fewshot_config("digits")
    protocol.dataset.data_dir = data
    protocol.protocol.per_class, protocol.protocol.trials = config.evals.fewshot.shots, config.evals.fewshot.trials
    protocol.probe.methods = "ridge"
    protocol.model.checkpoint, protocol.model.step = workdir, "16"
    summary = runner.run_protocol(protocol, str(tmp_path))["summary"]["ridge"]
    final = _rows_with(workdir, "fewshot/digits/5shot")[16]
    assert final["fewshot/digits/1shot"] == summary["1"]["top1_mean"]
    assert final["fewshot/digits/5shot"] == summary["5"]["top1_mean"]


def test_best_checkpoint_by_any_metric(trained):
    workdir, _, _ = trained
    values = {s: r["fewshot/digits/5shot"] for s, r in _rows_with(workdir, "fewshot/digits/5shot").items()}
    checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    best = checkpointer.best_step()
    assert checkpointer.restore_meta(best)["best"] == {"metric": "fewshot/digits/5shot", "mode": "max"}
    checkpointer.close()
    assert values[best] == max(values.values())
    assert runs.load(workdir, "best").step == best


def test_curves_show_every_evaluator(trained):
    from jaxres import plots

    workdir, _, _ = trained
    keys = {k for r in metrics.read_rows(workdir) for k in r}
    panels = {title: [key for key, _ in series] for title, series, _ in plots.evaluator_panels(keys)}
    assert panels["top-1"] == ["top1", "val_top1", "crops_top1"]
    assert panels["fewshot (top-1)"] == ["fewshot/digits/1shot", "fewshot/digits/5shot"]
    assert panels["probe (top-1)"] == ["probe/ridge/3"]
    assert os.path.getsize(os.path.join(workdir, "curves.png")) > 10_000
