"""Transfer results, the protocol's and the folder flow's: tables, results.json, pictures.

A protocol (`runner.run_protocol`): mean +- std over trials, the printed table,
results.json / .csv, confusion.png, and all of it in the backbone run's TensorBoard. A folder (`folder.transfer_folder`): per-class
accuracy, the printed table, results.json, confusion.png, predictions.png.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any

import jax
import numpy as np

from jaxres import dashboard, plots, predict
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
    """results.json, results.csv (one row per trial and probe), confusion.png; prints the table
    and logs the results to the backbone run's TensorBoard (`dashboard.log_probe`).

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
    confusion_png = plots.confusion(labels, predictions, names, title, os.path.join(workdir, "confusion.png"))
    log_line(table(results))
    dashboard.log_probe(results, table(results), confusion_png)


# ---------------------------------------------------------------- the folder flow (scripts/transfer.py)

GRID_IMAGES = 32  # Validation images in predictions.png.


def per_class_accuracy(labels: np.ndarray, predictions: np.ndarray, names: list[str]) -> list[dict[str, Any]]:
    """One row per class: its validation images, how many were right, the accuracy."""
    rows = []
    for c, name in enumerate(names):
        mine = labels == c
        correct = int((predictions[mine] == c).sum())
        rows.append({"class": name, "count": int(mine.sum()), "correct": correct,
                     "accuracy": correct / max(int(mine.sum()), 1)})  # fmt: skip
    return rows


def folder_table(results: dict[str, Any]) -> str:
    """The printed report of `folder.transfer_folder`: overall, then per class (worst first)."""
    summary = (
        f"{results['method']} head on {results['layer']} of {results['backbone']}: validation top-1 "
        f"{results['test_top1']:.4f}, mean per-class {results['test_mean_per_class']:.4f} "
        f"({results['n_train']} train / {results['n_test']} validation images; features "
        f"{results['seconds']['features']:.1f} s, head {results['seconds']['head']:.1f} s)"
    )
    lines = [summary, f"{'class':<24}{'images':>8}{'correct':>9}{'accuracy':>10}"]
    for r in sorted(results["per_class"], key=lambda r: (r["accuracy"], r["class"])):
        lines.append(f"{r['class'][:23]:<24}{r['count']:>8}{r['correct']:>9}{r['accuracy']:>10.3f}")
    return "\n".join(lines)


def write_folder_report(
    output, results, labels, predictions, fitted, x_val, val_source, val_mask, names
) -> None:
    """`folder.transfer_folder`'s report into `output`: results.json, confusion.png and
    predictions.png (validation images, mistakes first); prints `folder_table`."""
    with open(os.path.join(output, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    title = f"{results['method']} head: validation top-1 {100 * results['test_top1']:.1f}%"
    plots.confusion(labels, predictions, names, title, os.path.join(output, "confusion.png"))
    scores = np.asarray(jax.nn.softmax(jax.device_get(fitted.predict_scores(x_val))[: len(labels)], axis=-1))
    decoded = np.flatnonzero(val_mask > 0)  # Rows of x_val -> records of the source.
    order = sorted(range(len(labels)), key=lambda i: (predictions[i] == labels[i], i))[:GRID_IMAGES]
    shown = []
    for i in order:
        record = val_source[int(decoded[i])]
        path = os.path.join(val_source.root, record["key"])
        top = [(names[c], float(scores[i, c])) for c in np.argsort(-scores[i])[:3]]
        shown.append(predict.Prediction(path, top, names[labels[i]], True))
    predict.draw_grid(shown, os.path.join(output, "predictions.png"))
    log_line(folder_table(results) + f"\nWrote {output}: results.json, confusion.png, predictions.png; the "
             f"classifier is a run:\n  python scripts/predict.py --workdir {output} IMAGE...")  # fmt: skip
