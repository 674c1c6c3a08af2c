"""Every `scripts/benchmark.py --what` kind at the smallest sizes, so none breaks silently.

Each test calls what the script calls for its kind (tiny model, 1 step, 16-px images); the
figures are not checked, only that every kind runs and returns its fields. One test runs the
script itself. Kinds that need an optional extra skip with one line when it is missing.
"""

import json
import os
import subprocess
import sys

import pytest

from jaxres.bench import common
from jaxres.models import cpu_conv

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"model": "resnetv2_tiny", "batch_size": 8, "dtype": "float32", "image_size": 16}


def _extra(module: str, extra: str) -> None:
    try:
        __import__(module)
    except ImportError:
        pytest.skip(f"needs {module} (extra [{extra}])")


@pytest.mark.parametrize("what", ["train", "infer"])
def test_train_and_infer(what):
    from jaxres.bench import steps

    row = steps.bench_jax(what, TINY["model"], 8, "float32", steps=1, warmup=0, image_size=16)
    assert row["what"] == what and row["img_per_sec"] > 0 and row["steps"] == 1
    assert row["cpu_model"] and row["cores"] >= 1 and row["sgemm_gflops"] > 0  # common.machine
    assert "| date |" in steps.render_markdown()  # The recorded table still renders.


def test_train_torch_reference():
    _extra("torchvision", "convert")
    from jaxres.bench import torch_ref

    row = torch_ref.bench_torch("train", "resnet18", 2, "float32", 1, 0, False, image_size=16)
    assert row["framework"] == "torch" and row["img_per_sec"] > 0


def test_e2e():
    from jaxres.bench import steps

    row = steps.bench_e2e(TINY["model"], 8, "float32", steps=1, warmup=0, num_workers=0,
                          image_size=16, num_images=16)
    assert row["img_per_sec"] > 0 and row["e2e_over_synthetic"] > 0


def test_input():
    from jaxres.bench import input as bench_input

    result = bench_input.run_input_benchmark(8, 16, 4, repeats=1, with_tf=False)
    assert result["per_core"]["train: ours"] > 0 and result["all_cores"]
    assert "| per core (1 CPU) | images/s |" in bench_input.format_markdown(result)


def test_idct():
    from jaxres.bench import idct

    result = idct.run_idct_benchmark(4, 16, repeats=1)
    assert result["ms_per_image"]["eval transform: accurate"] > 0
    assert result["pixels_vs_pil"]["eval transform output 16x16: accurate"]["max"] == 0
    assert "| eval transform |" in idct.format_markdown(result)


def test_script(tmp_path):
    """The script itself, its cheapest kind: flags, dispatch, the JSON row on stdout."""
    cmd = [sys.executable, os.path.join(REPO, "scripts", "benchmark.py"), "--what", "infer",
           "--model", TINY["model"], "--batch_size", "8", "--image_size", "16", "--steps", "1",
           "--warmup", "0", "--dtype", "float32", "--norecord"]
    result = subprocess.run(cmd, check=False, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout[result.stdout.index("{"):])["what"] == "infer"


def test_probe():
    """Ours vs scikit-learn, one fit and the protocol sweep (it once raised ValueError)."""
    from jaxres.bench import probe as bench_probe

    probe = bench_probe.run_probe_benchmark(num_classes=4, dim=16)
    assert probe["shape"]["num_classes"] == 4 and len(probe["single_fit"]) == 2
    assert set(probe["sweep"]) >= {"logistic/ours", "logistic/sklearn", "ridge/ours"}
    assert all(0 <= t["top1"] <= 1 for t in probe["sweep"]["logistic/ours"]["trials"])


def test_features():
    from jaxres.bench import probe as bench_probe

    # Keras's ResNet50 (16 s to build here) is left out; torchvision's takes a second.
    result = bench_probe.run_feature_benchmark(
        TINY["model"], 8, 16, steps=1, warmup=0, frameworks=("jaxres", "torchvision")
    )
    assert result["jaxres"]["img_per_sec"] > 0 and "keras_jax" not in result
    # A number, or the one line naming the extra.
    assert "img_per_sec" in result["torchvision"] or "pip install" in result["torchvision"]["skipped"]


def test_ops():
    _extra("torch", "convert")
    from jaxres.bench import op_profile

    # The per-conv profile needs only the shapes (no torch model without the whole step).
    result = op_profile.run_op_profile(TINY["model"], 16, 8, reps=1, jax_impls=("xla 1dev",),
                                       whole_step=False, log=lambda _: None)
    assert result["shapes"] and "optimizer update" in result["categories"]
    assert "torch / xla 1dev" in op_profile.format_markdown(result)
    rows = op_profile.train_step_ab(TINY["model"], 16, 8, steps=1, warmup=0)
    assert [r["conv"] for r in rows] == list(cpu_conv.BACKENDS)


def test_timing_loop_interleaves():
    calls = []
    times = common.interleaved_times(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, reps=2, warmup=1
    )
    assert calls == ["a", "b", "a", "b", "a", "b"] and [len(t) for t in times.values()] == [2, 2]
    assert common.best_time(lambda: 7, 2)[1] == 7
