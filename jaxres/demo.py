"""The `make demo` flow as a library: train, evaluate the best checkpoint, probe, tabulate."""

from __future__ import annotations

import os
import time
from typing import Any

import ml_collections
import numpy as np

from jaxres import runs, train


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
    """Trains (or resumes) `config` in `workdir`; returns the result rows for the table."""
    rows = []
    start = time.time()
    train.train_and_evaluate(config, workdir)
    rows.append(dict(train_row(config, workdir), seconds=time.time() - start))

    from jaxres import evaluate

    start = time.time()
    result = evaluate.evaluate_run(workdir, checkpoint="best")
    rows.append(
        {
            "what": f"evaluate best checkpoint (step {result['step']})",
            "top1": result["top1"],
            "top5": result["top5"],
            "count": result["count"],
            "seconds": time.time() - start,
        }
    )

    start = time.time()
    exported = os.path.join(workdir, "probe")
    probe = demo_probe(workdir, export_dir=exported)
    rows.append(dict(probe, seconds=time.time() - start))
    rows.append(classify_with_export(exported, config))
    return rows


def demo_probe(
    workdir: str,
    data_dir: str | None = None,
    checkpoint: str = "best",
    method: str = "logistic",
    export_dir: str = "",
) -> dict[str, Any]:
    """A linear probe on a run's pre_logits features: fit on its train split, score on its val split.

    For `make demo`'s results table (the digits demo: under 30 s on 2 cores; features
    cached in `workdir/features`, so a second call skips the forward passes). With
    `export_dir`, the probe on the backbone is written there as a run.

    Returns:
      One row: what, top1, mean_per_class, count (val images), train, l2, l2_source.
    """
    from jaxres import config_transfer
    from jaxres.transfer import export, features, probe, runner

    config = config_transfer.base_transfer_config()
    config.dataset = runs.read_config(workdir).dataset
    if data_dir:
        config.dataset.data_dir = data_dir
    member = runs.load(workdir, checkpoint)
    extractor = features.FeatureExtractor(member)
    (train_x, train_y), (test_x, test_y), names = runner.load_data(
        config, config_transfer.lists(config), extractor, os.path.join(workdir, "features")
    )
    row, _, fitted = runner.fit_and_score(
        method,
        config.probe,
        0,
        (train_x, train_y),
        (test_x, test_y),
        len(names),
        probe.fit_mesh(),
    )
    if export_dir:
        info = {"method": method, "l2": row["l2"], "holdout_top1": row["holdout_top1"],
                "test_top1": row["top1"], "n_train": len(train_y), "n_test": len(test_y)}  # fmt: skip
        export.write_probe_run(member, extractor, fitted, names, config.dataset, export_dir, info, overwrite=True)
    return {
        "what": f"linear probe ({method}, pre_logits, {len(train_y)} train)",
        "top1": row["top1"],
        "mean_per_class": row["mean_per_class"],
        "count": len(test_y),
        "train": len(train_y),
        "l2": row["l2"],
        "l2_source": row["l2_source"],
    }


def train_row(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """The training row: model, epochs and the run's MFU (median over its log steps), with the
    step-time breakdown beneath."""
    from jaxres import flops, profiling

    length = f"{config.num_steps} steps" if config.num_steps else f"{config.num_epochs:g} epochs"
    what = f"train {config.model.name}, {length}"
    timing = profiling.run_timing(workdir)
    if "mfu" not in timing:
        return {"what": what}
    peak = flops.device_peak(config.model.dtype)
    detail = (
        f"  (median step {timing['step_s']:.3f} s: data {timing['data_s']:.3f} s, device "
        f"{timing['device_s']:.3f} s, input wait {100 * timing['input_wait']:.0f}%; MFU against {peak.label})"
    )
    return {"what": f"{what}, MFU {100 * timing['mfu']:.1f}% of {peak.short}", "details": [detail]}


def classify_with_export(exported: str, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The exported probe (a run) on the first validation image of every class: predicted vs true."""
    from jaxres import predict
    from jaxres.data import sources

    start = time.time()
    val = sources.open_source(config.dataset, config.dataset.val_split)
    firsts = [val.keys[int(np.flatnonzero(val.labels == c)[0])] for c in range(len(val.class_names))]
    found = predict.predict(exported, [os.path.join(val.root, k) for k in firsts], top_k=1)
    lines = [f"  {os.path.relpath(p.path, val.root.parent)}: predicted {p.top[0][0]} ({p.top[0][1]:.2f}), "
             f"true {p.true}" for p in found]  # fmt: skip
    return {
        "what": "exported probe on one val image per class",
        "top1": float(np.mean([p.top[0][0] == p.true for p in found])),
        "count": len(found),
        "seconds": time.time() - start,
        "details": [f"  (the probe + backbone as a run: {exported})", *lines],
    }


def format_table(rows: list[dict[str, Any]], total_seconds: float) -> str:
    """A plain-text table: what, top-1, top-5, images, seconds."""
    header = f"{'what':<52} {'top-1':>7} {'top-5':>7} {'images':>7} {'seconds':>8}"
    lines = ["", "jaxres demo results (digits, 10 classes, chance = 0.100)", header, "-" * len(header)]
    for r in rows:
        top1 = f"{r['top1']:.3f}" if "top1" in r else ""
        top5 = f"{r['top5']:.3f}" if "top5" in r else ""
        count = str(r.get("count", ""))
        lines.append(f"{r['what']:<52} {top1:>7} {top5:>7} {count:>7} {r['seconds']:>8.1f}")
        lines += r.get("details", [])
    lines.append(f"{'total':<52} {'':>7} {'':>7} {'':>7} {total_seconds:>8.1f}")
    return "\n".join(lines)
