"""Throughput benchmarks of the real train and inference steps on synthetic, on-device data.

Timing rules: compile first (timed separately), run `warmup` steps, then time
each of `steps` steps to completion (`block_until_ready`; async dispatch is
never timed) and report the median. Each run appends one JSON line to
`benchmarks/results.jsonl` with the device, versions, date and exact command.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import statistics
import sys
from typing import Any

import jax
import numpy as np

from jaxres import config_base, optim, parallel, runs, train
from jaxres import state as state_lib
from jaxres.bench import common
from jaxres.data import loader

_REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS = os.path.join(_REPO, "benchmarks", "results.jsonl")


def device_name(framework: str = "jax") -> str:
    """E.g. "NVIDIA H100 80GB HBM3", or "cpu: <processor> x N cores[, M jax devices]" (marked as CPU)."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        cpu = f"cpu: {platform.processor() or platform.machine()} x {os.cpu_count()} cores"
        split = framework == "jax" and jax.device_count() > 1
        return f"{cpu}, {jax.device_count()} jax devices" if split else cpu
    return device.device_kind


def peak_memory_gb() -> float:
    """Peak device memory; on CPU the process's peak RSS (host memory)."""
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        return stats["peak_bytes_in_use"] / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def bench_config(model: str, batch_size: int, dtype: str, image_size: int, num_classes: int):
    """The base config with `model`, its dtype, batch (train and eval), image size and classes."""
    c = config_base.base_config()
    c.model.name, c.model.dtype = model, dtype
    c.batch_size = c.eval_batch_size = batch_size
    c.dataset.image_size, c.dataset.num_classes = image_size, num_classes
    return c


def synthetic_batch(batch_size: int, image_size: int, num_classes: int, leading: tuple = ()) -> dict[str, np.ndarray]:
    """A seeded random host batch {"image" uint8, "label", "mask"}; `leading`: e.g. (1,) micro-batches."""
    rng = np.random.default_rng(0)
    return {
        "image": rng.integers(0, 256, (*leading, batch_size, image_size, image_size, 3), dtype=np.uint8),
        "label": rng.integers(0, num_classes, (*leading, batch_size), dtype=np.int32),
        "mask": np.ones((*leading, batch_size), np.float32),
    }


def train_setup(config) -> tuple:
    """Mesh, a fresh replicated TrainState and the jitted train / eval steps of `config`."""
    mesh = parallel.make_mesh()
    net = runs.build_model(config)
    schedule = optim.make_schedule(config.optimizer, config.batch_size, 1000, 100000)
    tx = optim.make_optimizer(config.optimizer, schedule)
    state = state_lib.fresh_state(net, tx, config, jax.random.key(0), mesh)
    return (mesh, state, *train.make_step_fns(config, net, tx, mesh))


def bench_jax(what: str, model: str, batch_size: int, dtype: str, steps: int, warmup: int,
              image_size: int = 224, num_classes: int = 1000) -> dict[str, Any]:
    """jaxres `train_step` (what="train") or the eval forward pass (what="infer")."""
    config = bench_config(model, batch_size, dtype, image_size, num_classes)
    mesh, state, step_fn, eval_fn = train_setup(config)
    if what == "train":
        batch = parallel.to_global(synthetic_batch(batch_size, image_size, num_classes, (1,)), mesh, batch_axis=1)
        compile_s, compiled = common.timed(lambda: step_fn.lower(state, batch).compile())
        holder = [state]

        def run():
            holder[0], _ = compiled(holder[0], batch)
            return holder[0].step
    else:
        batch = parallel.to_global(synthetic_batch(batch_size, image_size, num_classes), mesh)
        variables = runs.eval_variables(
            state.params, state.ema_params, state.batch_stats, config.ema_decay
        )
        compile_s, compiled = common.timed(lambda: eval_fn.lower(variables, batch).compile())

        def run():
            return compiled(variables, batch)

    times = common.call_times(run, steps, warmup)
    return result_row(what, "jax", model, batch_size, dtype, times, compile_s)


def result_row(what: str, framework: str, model: str, batch_size: int, dtype: str,
               times: list[float], compile_s: float, **extra: Any) -> dict[str, Any]:
    """One results.jsonl row: img/s at the median of `times` (s/step), device, versions, command.

    `extra` adds keys (e.g. the torch version, the e2e worker count).
    """
    median = statistics.median(times)
    return {
        "what": what,
        "framework": framework,
        "model": model,
        "device": device_name(framework),
        "batch_size": batch_size,
        "dtype": dtype,
        "img_per_sec": batch_size / median,
        "step_ms_median": median * 1000,
        "step_ms_min": min(times) * 1000,
        "steps": len(times),
        "compile_s": compile_s,
        "peak_mem_gb": peak_memory_gb(),
        "jax": jax.__version__,
        "date": datetime.date.today().isoformat(),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        # CPU rows: what the figure depends on (GPU rows name their device already).
        **(common.machine() if jax.devices()[0].platform == "cpu" else {}),
        **extra,
    }


def append_result(row: dict[str, Any], path: str = RESULTS) -> None:
    """Appends `row` as one JSON line to `path` (default: benchmarks/results.jsonl)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def _shown_command(row: dict[str, Any]) -> str:
    """The command as typed, prefixed by the XLA_FLAGS it ran under."""
    flags = row.get("xla_flags", "").strip()
    return f"XLA_FLAGS='{flags}' {row['command']}" if flags else row["command"]


def _variant(row: dict[str, Any]) -> str:
    """The " (conv=cpu_conv)" cell suffix of the interleaved conv A/B rows of `--what ops`, else ""."""
    return f" (conv={row['conv']})" if "conv" in row else ""


def render_markdown(path: str = RESULTS) -> str:
    """The results table, newest first, one row per JSON line."""
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    lines = [
        "| date | what | framework | model | device | batch | dtype | img/s | compile s | peak GB | command |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reversed(rows):
        lines.append(
            f"| {r['date']} | {r['what']} | {r.get('framework', 'jax')}{_variant(r)} | {r['model']} | {r['device']} | "
            f"{r['batch_size']} | {r['dtype']} | {r['img_per_sec']:,.1f} | {r.get('compile_s', 0):.1f} | "
            f"{r.get('peak_mem_gb', 0):.2f} | `{_shown_command(r)}` |"
        )
    return "\n".join(lines)


def bench_e2e(model: str, batch_size: int, dtype: str, steps: int, warmup: int, num_workers: int,
              dataset: str = "", data_dir: str = "", image_size: int = 224,
              decoder: str = "cpu", num_images: int = 1024) -> dict[str, Any]:
    """Training from JPEG records through the grain pipeline vs the same step on synthetic data.

    With no `dataset`, `num_images` ImageNet-like JPEGs (500x375, q90) are written as
    records first. The ratio `e2e_over_synthetic` says whether the host keeps
    the device fed (1.0 = the input pipeline costs nothing).
    """
    import tempfile

    from jaxres.data import sources

    config = bench_config(model, batch_size, dtype, image_size, 1000)
    config.input.num_workers = num_workers
    config.input.decoder = decoder
    if dataset:
        config.dataset.name, config.dataset.data_dir = dataset, data_dir
        source = sources.open_source(config.dataset, config.dataset.train_split)
    else:
        from pathlib import Path

        from jaxres.bench import input as bench_input

        tmp = tempfile.mkdtemp(prefix="jaxres_e2e_")
        source = bench_input.write_records(Path(tmp) / "e2e", bench_input.make_jpegs(num_images))
    mesh, state, step_fn, _ = train_setup(config)
    synthetic = parallel.to_global(synthetic_batch(batch_size, image_size, 1000, (1,)), mesh, batch_axis=1)
    micro_batches = loader.train_micro_batches(config, source, 0)
    batches = parallel.prefetch_to_device(micro_batches, mesh, batch_axis=1)
    holder = [state]

    def run(batch):
        holder[0], _ = step_fn(holder[0], batch)
        return holder[0].step

    synthetic_times = common.call_times(lambda: run(synthetic), steps, warmup)
    # The real pipeline, timed over the whole window: host and device overlap, so a
    # per-step median would hide a stall; the window mean does not.
    common.call_times(lambda: run(next(batches)), 0, warmup)
    window, _ = common.timed(lambda: [run(next(batches)) for _ in range(steps)][-1])
    e2e_step = window / steps
    row = result_row("e2e", "jax", model, batch_size, dtype, [e2e_step], 0.0,
                     num_workers=num_workers, decoder=decoder,
                     dataset=dataset or "synthetic JPEG records (500x375 q90)")
    row["synthetic_img_per_sec"] = batch_size / statistics.median(synthetic_times)
    row["e2e_over_synthetic"] = row["img_per_sec"] / row["synthetic_img_per_sec"]
    return row
