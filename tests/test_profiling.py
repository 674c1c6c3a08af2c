"""Step-time breakdown, FLOPs and MFU, the profiler window, model_info, the pictures.

One smoke training run (module fixture, with a profile window) feeds the end-to-end checks;
the rest are unit-level.
"""

import contextlib
import glob
import io
import json
import os
import subprocess
import sys
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs import demo
from jaxres import metrics as metrics_lib
from jaxres import flops, model_info, parallel, plots, profiler, profiling, train
from jaxres.errors import ConfigError
from jaxres.models import cpu_conv, create_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The reference counts tests/test_models.py checks the registry against (timm / torchvision).
REFERENCE_PARAMS = {
    "resnet50": 25_557_032,
    "seresnet50": 28_088_024,
    "resnetv2_50": 25_549_352,
    "resnetv2_50x1_bit": 25_549_352,
}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """The smoke config trained with a profile window over steps 3..4; (workdir, console text)."""
    workdir = str(tmp_path_factory.mktemp("run"))
    config = demo.get_config("smoke")
    config.dataset.data_dir = str(tmp_path_factory.mktemp("data"))
    config.profile_steps = "3:4"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        train.train_and_evaluate(config, workdir)
    return workdir, out.getvalue()


# ------------------------------------------------------------------------------- FLOPs


def test_resnet50_flops_match_the_published_count_and_xla():
    """4.1 G multiply-adds = 8.2 GFLOPs at 224 (He et al.; torchvision 4.09 GMACs), counted
    from the jaxpr and, independently, by XLA's cost analysis (lowered only, no compile)."""
    model = create_model("resnet50", num_classes=1000)
    cost = flops.model_cost(model, 224)
    assert cost.forward_flops == pytest.approx(8.2e9, rel=0.05)
    assert cost.train_flops == 3 * cost.forward_flops
    for backend in cpu_conv.BACKENDS:  # The count is the model's, whichever kernels run it.
        assert flops.model_cost(model.clone(cpu_conv=backend), 224).forward_flops == cost.forward_flops
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    xla_model = model.clone(cpu_conv="xla")  # oneDNN's convs are custom calls XLA cannot count.
    lowered = jax.jit(lambda v, x: xla_model.apply(v, x, train=False)[0]).lower(cost.variables, x)
    xla = flops.xla_flops(lowered)
    assert xla == pytest.approx(8.2e9, rel=0.05)
    assert xla == pytest.approx(cost.forward_flops, rel=0.05)  # XLA skips the zero-padding taps.
    stages = [cost.groups[f"stage{s}"][1] for s in range(1, 5)]
    assert sum(stages) + cost.groups["stem"][1] + cost.groups["head"][1] == cost.forward_flops


def test_scan_bodies_count_once_per_trip():
    def f(x, w):
        return jax.lax.scan(lambda c, _: (c @ w, None), x, None, length=5)[0]

    counts = flops.count_flops(f, jnp.ones((2, 8)), jnp.ones((8, 8)))
    assert sum(counts.values()) == 5 * 2 * 2 * 8 * 8


# ---------------------------------------------------------------------------- model_info


@pytest.mark.parametrize("name, expected", sorted(REFERENCE_PARAMS.items()))
def test_model_info_parameter_counts_equal_the_registry(name, expected):
    info = model_info.summarize(create_model(name, num_classes=1000), 224, xla=False)
    assert info["params"] == expected
    assert sum(p for p, _ in info["groups"].values()) == expected
    assert list(info["groups"])[:5] == ["stem", "stage1", "stage2", "stage3", "stage4"]
    assert list(info["layers"]) == [
        "stem",
        "stage1",
        "stage2",
        "stage3",
        "stage4",
        "pre_logits",
        "logits",
    ]
    assert info["layers"]["stage4"] == (7, 7, 2048) and info["layers"]["logits"] == (1000,)
    text = model_info.format_summary(name, info, "float32")
    assert f"{expected:,}" in text and "named layers" in text


def test_model_info_script_with_xla_and_for_a_run(smoke_run):
    """The CLI on a run directory: its model at its image size, XLA's check and memory."""
    workdir, _ = smoke_run
    result = subprocess.run(
        [sys.executable, "scripts/model_info.py", "--workdir", workdir, "--batch_size", "8"],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "resnetv2_tiny at 32x32" in out and "stage4" in out and "XLA cost analysis" in out
    assert "MiB per example" in out and "pre_logits 128" in out


# ------------------------------------------------------------------------ breakdown, MFU


def test_metrics_rows_and_progress_line_carry_the_breakdown(smoke_run):
    workdir, console = smoke_run
    rows = [r for r in metrics_lib.read_rows(workdir) if "loss" in r]
    assert len(rows) == 8
    for r in rows:
        assert set(profiling.TIMING_KEYS) <= set(r)  # mfu too: the CPU's peak is measured.
        assert 0 <= r["input_wait"] <= 1 and 0 < r["device_s"] <= r["step_s"] + 1e-9
        assert r["data_s"] >= 0 and r["mfu"] > 0 and r["tflops_per_device"] > 0
    assert "GFLOPs/image forward" in console and "measured sgemm of this host" in console
    progress = [line for line in console.splitlines() if line.startswith("step 4/16")]
    assert (
        progress and "input wait" in progress[0] and "MFU" in progress[0] and "data" in progress[0]
    )
    timing = profiling.run_timing(workdir)
    assert set(timing) == set(profiling.TIMING_KEYS)


def test_profile_window_writes_a_trace(smoke_run):
    workdir, console = smoke_run
    traces = glob.glob(os.path.join(workdir, "plugins", "profile", "*", "*.xplane.pb"))  # Beside the events.
    assert len(traces) == 1 and os.path.getsize(traces[0]) > 0
    assert glob.glob(os.path.join(os.path.dirname(traces[0]), "perfetto_trace.json.gz"))
    assert "Profiled step 3..4" in console


def test_curves_png_written_and_opens(smoke_run, tmp_path):
    workdir, console = smoke_run
    with Image.open(os.path.join(workdir, "curves.png")) as im:
        assert im.size == (1600, 900)
    assert "Training curves:" in console
    both = plots.write_curves(
        [workdir, workdir + "/"], str(tmp_path / "both.png")
    )  # Same name: paths.
    with Image.open(both) as im:
        im.load()
    assert plots.write_curves([str(tmp_path)], str(tmp_path / "none.png")) is None


def test_plot_metrics_script_overlays_runs(smoke_run, tmp_path):
    workdir, _ = smoke_run
    out = tmp_path / "c.png"
    result = subprocess.run(
        [sys.executable, "scripts/plot_metrics.py", f"--output={out}", workdir, workdir],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert Image.open(out).size == (1600, 900)


@pytest.mark.parametrize("text", ["5", "4:2", "0:3", "a:b", "3:4:5"])
def test_a_bad_profile_window_is_one_line_naming_the_format(text):
    config = demo.get_config("smoke")
    config.profile_steps = text
    with pytest.raises(ConfigError, match="START:END"):
        train.check_config(config, parallel.make_mesh(jax.devices()[:1]))


def test_profile_steps_parse():
    assert profiler.parse_profile_steps("") is None
    assert profiler.parse_profile_steps("3:4") == (3, 4)
    assert profiler.parse_profile_steps(" 7 : 7 ") == (7, 7)


def test_peak_table_and_the_cpu_sgemm():
    assert flops.peak_for_kind("NVIDIA H100 80GB HBM3", "bfloat16").flops == 989e12
    assert flops.peak_for_kind("NVIDIA H200", "bfloat16").flops == 989e12
    assert flops.peak_for_kind("NVIDIA H100 PCIe", "bfloat16").flops == 756e12
    assert flops.peak_for_kind("NVIDIA A100-SXM4-80GB", "bfloat16").flops == 312e12
    assert flops.peak_for_kind("NVIDIA A100-SXM4-80GB", "float32").flops == 156e12
    assert flops.peak_for_kind("NVIDIA L40S", "bfloat16").flops == 362e12  # Not the L4.
    assert flops.peak_for_kind("Unknown GPU", "bfloat16").flops is None
    peak = flops.device_peak("float32")  # CPU: the measured sgemm, split over the devices.
    assert "measured sgemm" in peak.label and peak.short == "sgemm"
    assert peak.flops == pytest.approx(flops.host_peak_flops() / jax.local_device_count())
    assert flops.host_peak_flops() >= flops.host_sgemm_flops()  # The best, not only today's reading.
    assert 1e9 < flops.host_sgemm_flops() < 1e14


@flax.struct.dataclass
class _ToyState:
    step: jax.Array
    w: jax.Array


def _heavy_step(state, batch):
    """~0.2 s of device work (matmuls) per step on these CPUs; TrainMetrics like the real step."""
    w = state.w
    for _ in range(6):
        w = jnp.tanh(w @ w / w.shape[0]) + batch.mean()
    metrics = metrics_lib.TrainMetrics.single_from_model_output(
        loss=w.mean(), top1=jnp.float32(0.5), grad_norm=jnp.float32(1.0), finite=jnp.float32(1.0),
        skipped=jnp.float32(0.0),
    )  # fmt: skip
    return state.replace(step=state.step + 1, w=w), metrics


class _NoPreemption:
    def should_stop(self, step, every):
        return False


class _NoCheckpoints:
    def save(self, *args):
        pass

    def latest_step(self):
        return None

    def wait(self):
        pass


def test_the_breakdown_adds_no_host_sync_between_log_steps(tmp_path):
    """The real loop (`train._Loop`) on a step with ~0.2 s of device work: every step is
    dispatched while the previous one still runs, so nothing waited for it (a
    `float(metrics)` per step would make it ready), except the one after a log line."""
    config = demo.get_config("smoke")
    config.log_every, config.evals.val.every, config.checkpoint.every = "4", "100ep", "1000"
    jitted = jax.jit(_heavy_step)
    state = _ToyState(step=np.int32(0), w=jnp.ones((1024, 1024)))
    _, warm = jitted(state, np.zeros(4, np.float32))
    jax.block_until_ready(warm.merge(warm))  # Compile the step and the eager metric sums first.
    ready_at_dispatch, previous = {}, [None]

    def step_fn(s, batch):
        step = len(ready_at_dispatch) + 1
        ready_at_dispatch[step] = previous[0] is None or previous[0].is_ready()
        s, m = jitted(s, batch)
        previous[0] = s.w
        return s, m

    timer = profiling.StepTimer(1e9, flops.Peak(1e12, "test", "peak"), 1)
    writer = metrics_lib.MetricWriter(str(tmp_path), enabled=True, tensorboard=False)
    loop = train._Loop(config, _NoCheckpoints(), writer, lambda s: 0.1, 100, 8, 0, timer)
    batches = iter([np.zeros(4, np.float32)] * 8)
    window = profiler.ProfileWindow("", "")
    with contextlib.redirect_stdout(io.StringIO()):
        loop.run(state, batches, step_fn, [], _NoPreemption(), window)  # No evaluators.
    writer.close()
    # Step 5 follows the log of step 4, which waited for it; every other step goes in behind
    # a step still running, log steps too (they are timed from the end of the one before).
    assert [ready_at_dispatch[s] for s in (2, 3, 4, 6, 7, 8)] == [False] * 6, ready_at_dispatch
    rows = [r for r in metrics_lib.read_rows(str(tmp_path)) if "step_s" in r]
    assert [r["step"] for r in rows] == [4, 8]
    # One step's device time, from the end of the step before: about the wall time per step
    # (the device is the bottleneck here), not the 4 steps the log line waited for.
    assert all(0.4 * r["step_s"] < r["device_s"] <= r["step_s"] for r in rows), rows


def _slow_batches(seconds: float):
    while True:
        time.sleep(seconds)
        yield np.zeros(4, np.float32)


def test_an_input_bound_run_warns_naming_the_fixes():
    """A pipeline that takes 40 ms a batch feeding a ~free step: the step waits nearly all the
    time; from the fourth log interval (the first is start-up) a warning names the fixes."""
    step_fn = jax.jit(lambda s, b: (s + b.sum(), {"loss": s}))
    config = demo.get_config("")
    timer = profiling.StepTimer(1e9, flops.Peak(None, "unknown", "peak"), 1)
    batches, state, warnings = _slow_batches(0.04), jnp.zeros(()), []
    # Compiled before timing: on a loaded host the compile could outweigh the first waits.
    jax.block_until_ready(step_fn(state, np.zeros(4, np.float32)))
    for interval in range(5):
        for i in range(2):
            state, _ = timer.step(step_fn, state, timer.next_batch(batches), sample=i == 1)
        timing = timer.summary()
        assert timing["input_wait"] > 0.5 and "mfu" not in timing  # No peak: TFLOP/s only.
        warnings.append(timer.input_warning(timing, config))
    assert warnings[:3] == [None, None, None] and warnings[4] is None  # Then quiet for a while.
    text = warnings[3]
    assert text.startswith("WARNING: input-bound") and "input.num_workers" in text
    assert "--resize_shorter 256" in text and "input.decoder=dali" in text


def test_a_fed_run_does_not_warn():
    step_fn = jax.jit(lambda s, b: (s + b.sum(), {"loss": s}))
    timer = profiling.StepTimer(1e9, flops.Peak(1e12, "test", "peak"), 1)
    batches, state = iter([np.zeros(4, np.float32)] * 100), jnp.zeros(())
    for _ in range(6):
        for i in range(4):
            state, _ = timer.step(step_fn, state, timer.next_batch(batches), sample=i == 3)
        timing = timer.summary()
        assert timer.input_warning(timing, demo.get_config("")) is None
    assert "MFU" in timer.format(timing)


# ------------------------------------------------------------------------------ pictures


def test_confusion_matrix_is_labelled_and_lists_pairs_for_many_classes(tmp_path):
    rng = np.random.default_rng(0)
    for classes in (5, 40):
        names = [f"class_{i}" for i in range(classes)]
        labels = rng.integers(0, classes, 400)
        predictions = np.where(rng.random(400) < 0.7, labels, rng.integers(0, classes, 400))
        path = plots.confusion(
            labels, predictions, names, "test", str(tmp_path / f"c{classes}.png")
        )
        with Image.open(path) as im:
            assert im.size[0] > 400 and im.size[1] > 400
    counts = plots.confusion_counts(np.array([0, 0, 1, 1, 1]), np.array([0, 1, 0, 0, 1]), 2)
    assert counts.tolist() == [[1, 1], [2, 1]]
    pairs = plots.most_confused(counts, ["a", "b"])
    assert pairs[0].split() == ["2", "b", "->", "a", "(67%)"] and len(pairs) == 2


def test_one_clock_gives_throughput_without_pauses_and_an_eta_with_them():
    """img/s counts training time only (evaluation paused out); the ETA counts everything."""
    step_fn = jax.jit(lambda s, b: (s + b.sum(), {"loss": s}))
    timer = profiling.StepTimer(1e9, flops.Peak(None, "unknown", "peak"), 1, images_per_step=32)
    batches, state = _slow_batches(0.02), jnp.zeros(())
    jax.block_until_ready(step_fn(state, np.zeros(4, np.float32)))
    start = time.perf_counter()
    for i in range(4):
        state, _ = timer.step(step_fn, state, timer.next_batch(batches), sample=i == 3)
    with timer.paused(state):
        time.sleep(0.2)  # An evaluation.
    timing = timer.summary(steps_left=8)
    elapsed = time.perf_counter() - start
    assert timing["img_per_sec"] == pytest.approx(32 / timing["step_s"])
    assert 4 * timing["step_s"] <= elapsed - 0.2  # The pause is not step time...
    assert timing["eta_s"] >= 8 * (timing["step_s"] + 0.2 / 4)  # ...but the rest of the run has them too.


def _tensorboard_scalars(logdir: str) -> list[tuple[int, str, float]]:
    """(step, tag, value) of every scalar in the event files of `logdir`, read as TensorBoard
    reads them (TFRecord framing: length, its CRC, the Event proto, its CRC)."""
    import glob
    import struct

    from tensorboardX.proto import event_pb2

    out = []
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        offset = 0
        while offset + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            # jaxres writes scalars as TensorFlow 2 does (a float tensor); older runs, simple_value.
            out += [(event.step, v.tag, v.tensor.float_val[0] if v.tensor.float_val else v.simple_value)
                    for v in event.summary.value if v.HasField("simple_value") or v.tensor.float_val]  # fmt: skip
    return out


def test_tensorboard_has_every_logged_step_before_close_and_each_tag_once(tmp_path):
    """A kill -9 after a write loses nothing (flushed at every write); a log step and an
    evaluation at one step both carry `epoch`, written once."""
    writer = metrics_lib.MetricWriter(str(tmp_path), enabled=True)
    writer.write(4, {"loss": 1.5, "epoch": 0.5})
    writer.write(4, {"val_top1": 0.25, "epoch": 0.5})  # The evaluation at the same step.
    writer.write(8, {"loss": 1.0, "epoch": 1.0})
    scalars = _tensorboard_scalars(str(tmp_path))  # Not closed: as after kill -9.
    assert sorted(scalars) == [(4, "train/epoch", 0.5), (4, "train/loss", 1.5), (4, "val/best_top1", 0.25),
                               (4, "val/top1", 0.25), (8, "train/epoch", 1.0), (8, "train/loss", 1.0)]  # fmt: skip
    writer.close()


def test_a_loaded_start_up_cannot_lower_the_cpu_reference(tmp_path, monkeypatch):
    """The CPU's MFU reference is the best sgemm kept for this host: measured again while two
    busy processes load both cores, it stays at the quiet reading (or a better one)."""
    monkeypatch.setattr(flops, "SGEMM_RECORD", str(tmp_path / "sgemm.json"))
    flops.host_sgemm.cache_clear()
    flops.host_peak_flops.cache_clear()
    quiet = flops.host_peak_flops()
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        time.sleep(0.5)
        flops.host_sgemm.cache_clear()
        flops.host_peak_flops.cache_clear()
        loaded_now, reference = flops.host_sgemm_flops(), flops.host_peak_flops()
    finally:
        for p in busy:
            p.kill()
            p.wait()
        flops.host_sgemm.cache_clear()
        flops.host_peak_flops.cache_clear()
    assert reference == max(quiet, loaded_now) >= quiet
    assert json.load(open(tmp_path / "sgemm.json")) == {flops._host_key(): reference}


def test_mfu_is_never_above_100_percent(tmp_path, monkeypatch, capsys):
    """A step faster than the reference raises the reference (kept for the host) and says so once."""
    monkeypatch.setattr(flops, "SGEMM_RECORD", str(tmp_path / "sgemm.json"))
    step_fn = jax.jit(lambda s, b: (s + b.sum(), {"loss": s}))
    timer = profiling.StepTimer(1e12, flops.Peak(1e6, "a tiny reference", "sgemm"), 1)
    batches, state = _slow_batches(0.0), jnp.zeros(())
    jax.block_until_ready(step_fn(state, np.zeros(4, np.float32)))
    mfus = []
    for _ in range(3):
        for i in range(2):
            state, _ = timer.step(step_fn, state, timer.next_batch(batches), sample=i == 1)
        mfus.append(timer.summary()["mfu"])
    assert all(0 < m <= 1.0 for m in mfus) and mfus[0] == 1.0, mfus
    assert capsys.readouterr().out.count("MFU reference raised") == 1
    assert "raised to the measured step rate" in timer.peak.label
    kept = json.load(open(tmp_path / "sgemm.json"))[flops._host_key()]  # The host's rate: all devices.
    assert kept == pytest.approx(timer.peak.flops * jax.local_device_count())
