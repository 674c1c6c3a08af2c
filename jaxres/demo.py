"""The `make demo` flow as a library: train, evaluate the best checkpoint, probe, tabulate."""

from __future__ import annotations

import time
from typing import Any

import ml_collections

from jaxres import train


def run(config: ml_collections.ConfigDict, workdir: str) -> list[dict[str, Any]]:
    """Trains (or resumes) `config` in `workdir`; returns the result rows for the table."""
    rows = []
    start = time.time()
    train.train_and_evaluate(config, workdir)
    rows.append({"what": f"train {config.model.name}, {config.num_epochs} epochs", "seconds": time.time() - start})

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

    from jaxres.transfer import runner

    start = time.time()
    probe = runner.demo_probe(workdir)
    rows.append(dict(probe, seconds=time.time() - start))
    return rows


def format_table(rows: list[dict[str, Any]], total_seconds: float) -> str:
    """A plain-text table: what, top-1, top-5, images, seconds."""
    header = f"{'what':<52} {'top-1':>7} {'top-5':>7} {'images':>7} {'seconds':>8}"
    lines = ["", "jaxres demo results (digits, 10 classes, chance = 0.100)", header, "-" * len(header)]
    for r in rows:
        top1 = f"{r['top1']:.3f}" if "top1" in r else ""
        top5 = f"{r['top5']:.3f}" if "top5" in r else ""
        count = str(r.get("count", ""))
        lines.append(f"{r['what']:<52} {top1:>7} {top5:>7} {count:>7} {r['seconds']:>8.1f}")
    lines.append(f"{'total':<52} {'':>7} {'':>7} {'':>7} {total_seconds:>8.1f}")
    return "\n".join(lines)
