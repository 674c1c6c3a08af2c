"""Transfer results: mean +- std over trials, the printed table, results.json / .csv, confusion.png."""

from __future__ import annotations

import csv
import json
import os
from typing import Any

import numpy as np

from jaxres import plots
from jaxres.console import log_line


def summarise(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean and sample std (ddof=1; 0 for one trial) of top1 and mean_per_class."""
    out = {}
    for key in ("top1", "mean_per_class"):
        values = np.asarray([r[key] for r in rows])
        out[f"{key}_mean"] = float(values.mean())
        out[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    out["trials"] = len(rows)
    return out


def results_dict(config, member, extractor, names, methods, rows) -> dict[str, Any]:
    summary = {
        method: {
            str(n): summarise([r for r in rows if r["method"] == method and r["per_class"] == n])
            for n in sorted({r["per_class"] for r in rows if r["method"] == method})
        }
        for method in methods
    }
    return {
        "protocol": config.protocol.to_dict(),
        "dataset": {"name": config.dataset.name, "num_classes": len(names)},
        "model": {
            "run": os.path.abspath(member.run),
            "step": member.step,
            "name": member.config.model.name,
        },
        "features": {
            "layer": extractor.layer,
            "views": extractor.views,
            "image_size": extractor.image_size,
        },
        "probe": config.probe.to_dict(),
        "summary": summary,
        "trials": rows,
    }


def table(results: dict[str, Any]) -> str:
    """The results as published tables print them: a row per N, mean +- std over trials."""
    title = (
        f"{results['dataset']['name']} linear probe ({results['dataset']['num_classes']} classes), "
        f"{results['model']['name']} step {results['model']['step']}, {results['features']['layer']}"
    )
    lines = [
        title,
        f"{'probe':<10}{'train/class':>12}{'trials':>8}{'top-1 (%)':>16}{'mean per-class (%)':>22}",
    ]
    for method, by_n in results["summary"].items():
        for n, s in by_n.items():
            lines.append(
                f"{method:<10}{'all' if n == '0' else n:>12}{s['trials']:>8}"
                f"{100 * s['top1_mean']:>10.1f} ± {100 * s['top1_std']:<4.1f}"
                f"{100 * s['mean_per_class_mean']:>16.1f} ± {100 * s['mean_per_class_std']:<4.1f}"
            )
    return "\n".join(lines)


def write_outputs(
    workdir: str, results: dict[str, Any], rows: list[dict], shown: tuple, names: list[str]
) -> None:
    """results.json, results.csv (one row per trial and probe), confusion.png; prints the table.

    Args:
      shown: (row, labels, predictions) of the trial the confusion matrix shows (the
        representative one: `runner.run_trials`).
    """
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    row, labels, predictions = shown
    mean = np.mean([r["top1"] for r in rows if (r["method"], r["per_class"]) == (row["method"], row["per_class"])])
    title = (
        f"{row['method']} probe, N={row['per_class'] or 'all'} per class, trial {row['trial']}: top-1 "
        f"{100 * row['top1']:.1f}% (the trial closest to the mean over trials, {100 * mean:.1f}%)"
    )
    plots.confusion(labels, predictions, names, title, os.path.join(workdir, "confusion.png"))
    log_line(table(results))
