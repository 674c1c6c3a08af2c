"""TensorBoard as the run's dashboard (`jaxres.dashboard`), read back with TensorBoard's own
EventAccumulator / EventMultiplexer: a demo-size run, then the results of evaluate.py,
linear_probe.py and predict.py --grid logged into it.
"""

import contextlib
import glob
import io
import os
import re

import numpy as np
import pytest

from configs import demo
from configs.transfer import fewshot
from jaxres import config_base, dashboard, evaluate, predict, train
from jaxres import metrics as metrics_lib
from jaxres.transfer import runner

pea = pytest.importorskip("tensorboard.backend.event_processing.plugin_event_accumulator",
                          reason="tensorboard is not installed (make venv-full installs it)")  # fmt: skip
from tensorboard.backend.event_processing import plugin_event_multiplexer
from tensorboard.plugins.custom_scalar import layout_pb2
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.util import tensor_util

TRAINING_TAGS = {
    "train/loss", "train/top1", "train/grad_norm", "train/lr", "train/epoch",
    "val/top1", "val/top5", "val/loss", "val/mean_per_class", "val/best_top1", "fewshot/digits/2shot",
    "time/img_per_sec", "time/eta_s", "time/step_s", "time/data_s", "time/device_s",
    "time/input_wait", "time/tflops_per_device", "time/mfu", "time/val_eval_s", "time/fewshot_eval_s",
}  # fmt: skip


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A smoke run (16 steps, val at 8 and 16, few-shot at 16) run twice (the second restores and has
    nothing left to do), evaluated centre (twice) and 10-crop, probed, and predicted with a grid."""
    root = tmp_path_factory.mktemp("runs")
    workdir, data_dir = str(root / "demo"), str(tmp_path_factory.mktemp("data"))
    config = demo.get_config("smoke")
    config.dataset.data_dir = data_dir
    config.evals.fewshot = config_base.fewshot_eval("digits", every="2ep", shots="2", trials=1)
    with contextlib.redirect_stdout(io.StringIO()):
        train.train_and_evaluate(config, workdir)
        train.train_and_evaluate(config, workdir)
        for crops in (1, 1, 10):
            dashboard.log_evaluation(evaluate.evaluate_runs([workdir], crops=crops))
        probe = fewshot.get_config("digits")
        probe.dataset.data_dir = data_dir
        probe.model.checkpoint = workdir
        probe.protocol.per_class, probe.protocol.trials = "2", 1
        runner.run_protocol(probe, str(tmp_path_factory.mktemp("probe")))
        grid = str(root / "predictions.png")
        predict.draw_grid(
            predict.predict(workdir, [os.path.join(data_dir, "digits", "val", "7")]), grid
        )
        predict.log_grid(workdir, "latest", grid)
    accumulator = pea.EventAccumulator(workdir, size_guidance={pea.TENSORS: 0})
    accumulator.Reload()
    return workdir, accumulator


def _series(accumulator, tag: str) -> list[tuple[int, float]]:
    return [
        (e.step, float(tensor_util.make_ndarray(e.tensor_proto))) for e in accumulator.Tensors(tag)
    ]


def test_tags_are_grouped_each_once_per_step_and_constants_not_plotted(demo_run):
    workdir, acc = demo_run
    scalars = set(acc.PluginTagToContent("scalars"))
    assert TRAINING_TAGS <= scalars
    results = scalars - TRAINING_TAGS
    assert {
        "evaluate/center/top1",
        "evaluate/10crop/top1",
        "probe/digits/ridge_2shot/top1",
    } <= results
    assert all(re.match(r"^(evaluate|probe)/", t) for t in results), results
    assert "val/count" not in scalars and "train/skipped" not in scalars  # Constant: run/summary.
    for tag in scalars:
        steps = [s for s, _ in _series(acc, tag)]
        assert len(steps) == len(set(steps)), (tag, steps)
    assert [s for s, _ in _series(acc, "train/loss")] == [2, 4, 6, 8, 10, 12, 14, 16]
    rows = metrics_lib.read_rows(workdir)
    evals = [(r["step"], r["val_top1"]) for r in rows if "val_top1" in r]
    assert np.allclose(_series(acc, "val/top1"), evals)
    best = [(s, max(v for _, v in evals[: i + 1])) for i, (s, _) in enumerate(evals)]
    assert np.allclose(_series(acc, "val/best_top1"), best)
    center = [r for r in _series(acc, "evaluate/center/top1")]
    assert len(center) == 1 and center[0][0] == 16  # Evaluated twice, logged once.
    assert "label smoothing" in acc.SummaryMetadata("val/loss").summary_description
    assert "sgemm" in acc.SummaryMetadata("time/mfu").summary_description


def test_a_folder_of_runs_names_each_by_its_folder(demo_run):
    workdir, _ = demo_run
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(os.path.dirname(workdir))
    assert sorted(multiplexer.Runs()) == ["demo"]  # Not demo/tb.
    assert glob.glob(os.path.join(workdir, "plugins")) == []  # No profile window asked for.


def test_config_as_hparams_and_text_notes_and_summary(demo_run):
    _, acc = demo_run
    content = acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    hparams = hparams_metadata.parse_session_start_info_plugin_data(content).hparams
    assert hparams["model.name"].string_value == "resnetv2_tiny"
    assert hparams["loss.label_smoothing"].number_value == pytest.approx(0.1)
    assert hparams["evals.fewshot.shots"].string_value == "2"
    texts = {t: tensor_util.make_ndarray(acc.Tensors(t)[-1].tensor_proto).item().decode()
             for t in acc.PluginTagToContent("text")}  # fmt: skip
    assert {
        "run/config",
        "run/notes",
        "run/summary",
        "evaluate/center",
        "evaluate/10crop",
        "probe/digits",
    } <= set(texts)
    assert "| model.name | resnetv2_tiny |" in texts["run/config"]
    assert "without label smoothing" in texts["run/notes"] and "sgemm" in texts["run/notes"]
    assert (
        "`val/count` = 100" in texts["run/summary"]
        and "`train/skipped` = 0" in texts["run/summary"]
    )
    assert "ridge" in texts["probe/digits"]
    for tag in ("run/config", "run/notes", "run/summary"):  # The second call logged nothing new.
        assert len(acc.Tensors(tag)) == 1


def test_train_and_val_share_charts_in_the_custom_scalars_layout(demo_run):
    _, acc = demo_run
    [event] = acc.Tensors("custom_scalars__config__")
    layout = layout_pb2.Layout.FromString(tensor_util.make_ndarray(event.tensor_proto).item())
    charts = {c.title: list(c.multiline.tag) for cat in layout.category for c in cat.chart}
    loss = next(c for title, c in charts.items() if title.startswith("loss"))
    assert all(any(re.search(r, t) for r in loss) for t in ("train/loss", "val/loss"))
    assert any(re.search(r, "fewshot/digits/2shot") for r in charts["few-shot and probes"])


def test_pictures_are_images(demo_run):
    workdir, acc = demo_run
    from PIL import Image

    images = set(acc.PluginTagToContent("images"))
    assert images == {"pictures/curves", "pictures/predictions", "pictures/probe_confusion_digits"}
    for tag in images:
        [event] = acc.Tensors(tag)  # Once: the second training call replaced its own.
        width, height, png = tensor_util.make_ndarray(event.tensor_proto)
        assert event.step == 16
        with Image.open(io.BytesIO(png)) as im:
            assert (im.width, im.height) == (int(width), int(height))
    with open(os.path.join(workdir, "curves.png"), "rb") as f:
        assert (
            tensor_util.make_ndarray(acc.Tensors("pictures/curves")[0].tensor_proto)[2] == f.read()
        )


def test_tags_of_evaluators_timing_and_few_shot_keys():
    names = ("val", "minival")
    expected = {
        "loss": "train/loss", "lr": "train/lr", "mfu": "time/mfu", "img_per_sec": "time/img_per_sec",
        "val_top1": "val/top1", "minival_loss": "minival/loss", "minival_eval_s": "time/minival_eval_s",
        "val_eval_s": "time/val_eval_s", "fewshot/digits/5shot": "fewshot/digits/5shot",
    }  # fmt: skip
    assert {key: dashboard.tag_for(key, names) for key in expected} == expected


def test_a_constant_series_is_plotted_once_it_changes_and_old_runs_keep_tb(tmp_path):
    old = tmp_path / "old"
    dashboard.EventFile(str(old / "tb")).close()  # A run from before: its events in tb/.
    assert dashboard.logdir(str(old)) == str(old / "tb")
    writer = metrics_lib.MetricWriter(str(old), enabled=True)
    for step, skipped in ((2, 0.0), (4, 0.0), (6, 1.5), (8, 0.0)):
        writer.write(step, {"loss": 1.0, "skipped": skipped})
    writer.close()
    assert glob.glob(str(old / "events.out.tfevents.*")) == []
    acc = pea.EventAccumulator(str(old / "tb"))
    acc.Reload()
    assert _series(acc, "train/skipped") == [(4, 0.0), (6, 1.5), (8, 0.0)]
    assert np.isclose(_series(acc, "train/loss")[0][1], 1.0)


def test_a_resumed_run_shows_each_step_once_and_keeps_its_best(tmp_path):
    """Killed after step 12 (not closed), resumed from the checkpoint of step 8: TensorBoard drops
    the first session's steps 10 and 12, and the best so far carries over from metrics.jsonl."""
    first = metrics_lib.MetricWriter(str(tmp_path), enabled=True, resume_step=0)
    for step in (2, 4, 6, 8, 10, 12):
        first.write(
            step, {"loss": 10.0 - step} | ({"val_top1": 0.9 - step / 100} if step % 4 == 0 else {})
        )
    second = metrics_lib.MetricWriter(str(tmp_path), enabled=True, resume_step=8)
    for step in (10, 12, 14, 16):
        second.write(step, {"loss": 20.0 - step} | ({"val_top1": 0.5} if step % 4 == 0 else {}))
    second.close()
    acc = pea.EventAccumulator(str(tmp_path))
    acc.Reload()
    assert _series(acc, "train/loss") == [
        (2, 8.0),
        (4, 6.0),
        (6, 4.0),
        (8, 2.0),
        (10, 10.0),
        (12, 8.0),
        (14, 6.0),
        (16, 4.0),
    ]
    assert np.allclose(
        _series(acc, "val/best_top1"), [(4, 0.86), (8, 0.86), (12, 0.86), (16, 0.86)]
    )
    assert [e.step for e in acc.Tensors("run/notes")] == [2, 10] and [
        e.step for e in acc.Tensors("run/summary")
    ] == [16]
