"""Figures people can read (matplotlib, Agg canvas, no pyplot state): training curves, a
labelled confusion matrix, a grid of predictions.

    write_curves(["runs/a", "runs/b"], "curves.png")        # loss, top-1, lr, img/s, MFU, input wait,
                                                            # + a panel per few-shot / probe evaluator
    confusion(labels, predictions, names, title, "confusion.png")
    prediction_grid(predictions, "predictions.png")
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from jaxres.metrics import read_rows

# (title, [(metrics key, label or None)], scale): one panel of curves.png each. Classification
# evaluators (NAME_loss, NAME_top1) join the loss and top-1 panels; `evaluator_panels` adds the rest.
CURVE_PANELS = (
    ("loss", [("loss", "train"), ("val_loss", "val")], 1.0),
    ("top-1", [("top1", "train"), ("val_top1", "val")], 1.0),
    ("learning rate", [("lr", None)], 1.0),
    ("images / s", [("img_per_sec", None)], 1.0),
    ("MFU (%)", [("mfu", None)], 100.0),
    ("input wait (% of step time)", [("input_wait", None)], 100.0),
)
MANY_CLASSES = 20  # Above this, no counts in the cells but a list of the most-confused pairs.
CONFUSED_PAIRS = 25


def _figure(width: float, height: float, layout: str | None = "constrained") -> Any:
    from matplotlib.figure import Figure  # Import when drawing: ~0.5 s.

    return Figure(figsize=(width, height), dpi=100, layout=layout)


def _run_labels(run_dirs: Sequence[str]) -> list[str]:
    """Each run's folder name, or its path when two runs share a folder name."""
    names = [os.path.basename(os.path.normpath(r)) for r in run_dirs]
    return names if len(set(names)) == len(names) else [os.path.normpath(r) for r in run_dirs]


def evaluator_panels(keys: set[str]) -> list[tuple[str, list[tuple[str, str | None]], float]]:
    """The panels of `keys` logged by evaluators: every classification evaluator's loss and top-1
    beside training's, then one panel per few-shot / linear-probe evaluator (NAME/...)."""
    names = sorted((k[: -len("_top1")] for k in keys if k.endswith("_top1") and f"{k[:-5]}_loss" in keys),
                   key=lambda n: (n != "val", n))  # fmt: skip
    panels = [
        ("loss", [("loss", "train")] + [(f"{n}_loss", n) for n in names], 1.0),
        ("top-1", [("top1", "train")] + [(f"{n}_top1", n) for n in names], 1.0),
        *CURVE_PANELS[2:],
    ]
    for family in sorted({k.split("/")[0] for k in keys if "/" in k}):
        series = [(k, k[len(family) + 1 :]) for k in sorted(keys, key=_natural) if k.startswith(family + "/")]
        panels.append((f"{family} (top-1)", series, 1.0))
    return panels


def _natural(key: str) -> list:
    """"a/10shot" after "a/5shot"."""
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", key)]


def write_curves(run_dirs: Sequence[str], output: str) -> str | None:
    """Draws loss, top-1 (train and every classification evaluator), learning rate, img/s, MFU,
    input wait and each few-shot / probe evaluator against steps.

    Args:
      run_dirs: runs whose `metrics.jsonl` is read; several are overlaid, one colour each.
      output: the PNG to write (its folder is created).

    Returns:
      `output`, or None when no run has a metrics row (nothing is written).
    """
    runs = [(label, read_rows(r)) for label, r in zip(_run_labels(run_dirs), run_dirs, strict=True)]
    if not any(rows for _, rows in runs):
        return None
    # Fixed margins, not the constrained layout: half the drawing time (0.7 -> 0.4 s on 2 cores),
    # and this figure is drawn at the end of every training run.
    panels = evaluator_panels({k for _, rows in runs for r in rows for k in r})
    rows_of_panels = math.ceil(len(panels) / 3)
    fig = _figure(16, 4.5 * rows_of_panels, layout=None)
    fig.subplots_adjust(left=0.05, right=0.98, bottom=0.07 / rows_of_panels * 2, top=1 - 0.09 / rows_of_panels * 2,
                        wspace=0.2, hspace=0.3)  # fmt: skip
    axes = fig.subplots(rows_of_panels, 3).ravel()
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    for ax, (title, series, scale) in zip(axes, panels):
        drawn = False
        for run_index, (label, rows) in enumerate(runs):
            for series_index, (key, split) in enumerate(series):
                # One run: a colour per series; several: a colour per run (series by their labels).
                colour = run_index if len(runs) > 1 else series_index
                points = [
                    (r["step"], scale * r[key])
                    for r in rows
                    if isinstance(r.get(key), (int, float))
                ]
                if points:
                    steps, values = zip(*points, strict=True)
                    val = split not in (None, "train")  # An evaluator's points: one per evaluation.
                    ax.plot(steps, values, color=f"C{colour % 10}", linestyle="--" if val else "-",
                            marker="o" if val else None, markersize=4, label=f"{label} {split or ''}".strip())  # fmt: skip
                    drawn = True
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if not drawn:
            ax.text(
                0.5,
                0.5,
                "not logged",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="grey",
            )
        elif len(series) > 1 or len(runs) > 1:
            ax.legend(fontsize=8)
    fig.suptitle("Training curves: " + ", ".join(label for label, _ in runs))
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output)
    return output


def confusion_counts(labels: np.ndarray, predictions: np.ndarray, num_classes: int) -> np.ndarray:
    """[true, predicted] counts."""
    counts = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(counts, (np.asarray(labels), np.asarray(predictions)), 1)
    return counts


def most_confused(counts: np.ndarray, names: Sequence[str], k: int = CONFUSED_PAIRS) -> list[str]:
    """The `k` largest off-diagonal cells: "count  true -> predicted  (share of true)"."""
    off = counts.copy()
    np.fill_diagonal(off, 0)
    totals = np.maximum(counts.sum(1), 1)
    order = np.argsort(-off, axis=None, kind="stable")[:k]
    lines = []
    for t, p in zip(*np.unravel_index(order, off.shape), strict=True):
        if off[t, p]:
            lines.append(
                f"{off[t, p]:>4}  {names[t][:22]} -> {names[p][:22]}  ({off[t, p] / totals[t]:.0%})"
            )
    return lines


def confusion(
    labels: np.ndarray, predictions: np.ndarray, names: Sequence[str], title: str, output: str
) -> str:
    """A row-normalised confusion matrix with both axes labelled, the counts in the cells and a
    colour scale; above `MANY_CLASSES` classes, the most-confused pairs listed beside it.

    Returns:
      `output` (a PNG).
    """
    c = len(names)
    counts = confusion_counts(labels, predictions, c)
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    many = c > MANY_CLASSES
    side = float(np.clip(0.45 * c + 2.5, 5.0, 20.0))  # Inches of the square matrix.
    width = side + 1.2 + (8.0 if many else 0.0)
    fig = _figure(
        width, side, layout=None
    )  # Axes placed in inches; savefig(tight) adds the labels.
    ax = fig.add_axes((0.0, 0.0, side / width, 1.0))
    image = ax.imshow(rates, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    colour_bar = fig.add_axes(((side + 0.25) / width, 0.0, 0.3 / width, 1.0))
    fig.colorbar(image, cax=colour_bar, label="share of the true class's images")
    every = max(1, math.ceil(c / 60))  # At most 60 labels an axis.
    size = float(
        np.clip(0.75 * side * 72 / c * every, 3.0, 10.0)
    )  # Points: what the spacing allows.
    ticks = np.arange(0, c, every)
    ax.set_xticks(ticks, [str(names[i])[:24] for i in ticks], rotation=90, fontsize=size)
    ax.set_yticks(ticks, [str(names[i])[:24] for i in ticks], fontsize=size)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if not many:
        for t, p in zip(*np.nonzero(counts), strict=True):
            ax.text(p, t, str(counts[t, p]), ha="center", va="center", fontsize=min(10.0, size),
                    color="white" if rates[t, p] > 0.5 else "black")  # fmt: skip
    total = int(counts.sum())
    ax.set_title(
        f"{title}\n{total} images, top-1 {np.trace(counts) / max(total, 1):.1%} (rows: true, columns: predicted)"
    )
    if many:
        listing = fig.add_axes(((side + 1.8) / width, 0.0, 7.0 / width, 1.0))
        listing.axis("off")
        pairs = most_confused(counts, names) or ["(no mistakes)"]
        listing.text(0.0, 1.0, "Most confused (count, true -> predicted, share of true)\n\n" + "\n".join(pairs),
                     va="top", ha="left", family="monospace", fontsize=float(np.clip(0.6 * side, 9.0, 12.0)),
                     transform=listing.transAxes)  # fmt: skip
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, bbox_inches="tight", pad_inches=0.2)
    return output


def prediction_grid(
    predictions: Sequence[Any], output: str, thumb: int = 128, columns: int = 8
) -> str:
    """Images in a grid with gaps, each titled with its file name and labelled with the predicted
    class and probability (and the true class when known); frame and label green when right,
    red when wrong, black without a true class.

    Args:
      predictions: `jaxres.predict.Prediction`s (path, top, true, ok).
      output: the PNG to write.
      thumb: pixels of each image's longer side.
      columns: images per row.
    """
    from PIL import Image

    columns = max(1, min(columns, len(predictions)))
    rows = max(1, -(-len(predictions) // columns))
    fig = _figure(columns * (thumb / 100 + 0.35), rows * (thumb / 100 + 0.85))
    for i, p in enumerate(predictions):
        ax = fig.add_subplot(rows, columns, i + 1)
        ax.set_xticks([])
        ax.set_yticks([])
        try:
            with Image.open(p.path) as im:
                pixels = np.asarray(im.convert("RGB"))
            small = max(pixels.shape[:2]) < thumb
            ax.imshow(pixels, interpolation="nearest" if small else "antialiased")
        except OSError:
            ax.text(0.5, 0.5, "undecodable", ha="center", va="center", transform=ax.transAxes)
        name, prob = p.top[0] if p.ok else ("?", 0.0)
        colour = "black" if p.true is None else ("green" if p.true == name else "red")
        for spine in ax.spines.values():
            spine.set_edgecolor(colour)
            spine.set_linewidth(2.5)
        ax.set_title(os.path.basename(p.path)[:22], fontsize=7)
        label = f"pred {name[:16]} {prob:.2f}" + ("" if p.true is None else f"\ntrue {p.true[:16]}")
        ax.set_xlabel(label, fontsize=8, color=colour)
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output)
    return output
