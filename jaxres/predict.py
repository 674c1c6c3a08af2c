"""Top-k predictions for image files, as text, CSV or JSON, and a grid of predicted vs true labels.

    python scripts/predict.py --workdir runs/demo --top_k 3 digit.jpg FOLDER \
        [--output preds.csv|preds.json] [--grid out.png]

Images go through the run's evaluation transform (resize, centre crop) and the
same jitted, batch-sharded forward pass as `jaxres.evaluate`. Class names come
from the run's dataset (class numbers when that dataset is not on this
machine). An image's true label is its parent folder's name when that is a
class name (`FOLDER/<class>/<image>` as in image-folder datasets).

A file that cannot be decoded gets a `Prediction` with `ok=False`, no top
classes and the reason, and is named once, by `undecodable_lines`: the
decoder's own per-image warning about it is held back (its reason kept).

`write_predictions` writes timm `inference.py`-style results: CSV columns
`file, top1_class, top1_prob, ..., topK_class, topK_prob, true_class, decoded`,
or a JSON list of `{"file", "top": [{"class", "prob"}], "true", "decoded"}`.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxres import runs
from jaxres.data import decode, sources
from jaxres.errors import ConfigError, DataError
from jaxres.evaluate import Ensemble

OUTPUT_FORMATS = (".csv", ".json")
PROB_DIGITS = 6  # Probabilities in CSV / JSON output.
LISTED_FILES = 3  # Undecodable files a "none decoded" message names before "and N more".


@dataclasses.dataclass
class Prediction:
    """One image: its path, top-k (class name, probability), true class name or None."""

    path: str
    top: list[tuple[str, float]]  # Empty when the file could not be decoded.
    true: str | None
    ok: bool  # False when the file could not be decoded.
    error: str = ""  # Why it could not be decoded.


class FileSource:
    """Image files as a random-access source (label -1 when unknown, as `0` on device)."""

    def __init__(self, paths: Sequence[str], class_names: Sequence[str]):
        self.paths = list(paths)
        index = {name: i for i, name in enumerate(class_names)}
        self.labels = [index.get(Path(p).parent.name, -1) for p in self.paths]
        self.class_names = list(class_names)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any]:
        with open(self.paths[i], "rb") as f:
            return {"image": f.read(), "label": max(self.labels[i], 0), "key": self.paths[i]}


def image_paths(inputs: Sequence[str]) -> list[str]:
    """Files as given, folders searched recursively for images (sorted)."""
    paths = []
    for item in inputs:
        p = Path(os.path.expanduser(item))
        if p.is_dir():
            paths += sorted(
                str(f) for f in p.rglob("*") if f.suffix.lower() in sources.IMAGE_EXTENSIONS
            )
        elif p.is_file():
            paths.append(str(p))
        else:
            raise DataError(f"{item!r} is neither an image file nor a folder; check the path.")
    if not paths:
        raise DataError(
            f"No images ({', '.join(sources.IMAGE_EXTENSIONS)}) in {', '.join(inputs)}."
        )
    return paths


def predict(
    run: str,
    inputs: Sequence[str],
    top_k: int = 5,
    checkpoint: str | int = "latest",
    batch_size: int = 0,
) -> list[Prediction]:
    """Top-k class names and probabilities for every image in `inputs` (files or folders).

    A file that cannot be decoded comes back with `ok=False`, no top classes
    and the reason in `error`; the decoder's warnings about it are held back.

    Args:
      run: run directory.
      inputs: image files and folders.
      top_k: how many classes per image.
      checkpoint: "latest", "best" or a step.
      batch_size: global batch (0: the run's eval_batch_size, at most the image count,
        rounded up to a multiple of the device count).
    """
    member = runs.load(run, checkpoint)
    names = runs.class_names(member)
    ensemble = Ensemble([member])
    source = FileSource(image_paths(inputs), names)
    devices = ensemble.mesh.devices.size
    batch_size = batch_size or -(-min(member.config.eval_batch_size, len(source)) // devices) * devices
    warnings = _ImageWarnings(source.paths)
    decode.log.addFilter(warnings)
    try:
        probs, masks = ensemble.probabilities(source, "center", batch_size)
    finally:
        decode.log.removeFilter(warnings)
    out = []
    for path, label, p, ok in zip(source.paths, source.labels, probs, masks):
        top = [(names[i], float(p[i])) for i in np.argsort(-p)[:top_k]] if ok else []
        true = names[label] if label >= 0 else None
        error = "" if ok else warnings.errors.get(path, "no decoder could read it")
        out.append(Prediction(path, top, true, bool(ok), error))
    return out


class _ImageWarnings(logging.Filter):
    """Holds back `decode`'s per-image warnings for `paths` (a filter on its logger).

    Undecodable files are named by `undecodable_lines` instead (the reason kept
    here); a truncated file's warning is let through once. Other keys (e.g. a
    training run in the same process) pass.
    """

    def __init__(self, paths: Sequence[str]):
        super().__init__()
        self.paths = set(paths)
        self.errors: dict[str, str] = {}
        self.shown: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        key = getattr(record, "image_key", None)
        if key not in self.paths:
            return True
        if hasattr(record, "image_error"):
            self.errors.setdefault(key, record.image_error)
            return False
        if key in self.shown:
            return False
        self.shown.add(key)
        return True


def format_predictions(predictions: Sequence[Prediction]) -> str:
    """One line per decoded image: path, then `class probability` pairs (and the true class when known).

    Undecodable images are left out: `undecodable_lines` names them.
    """
    lines = []
    for p in predictions:
        if p.ok:
            top = ", ".join(f"{name} {prob:.3f}" for name, prob in p.top)
            lines.append(f"{p.path}: {top}" + (f"  (true: {p.true})" if p.true is not None else ""))
    return "\n".join(lines)


def undecodable_lines(predictions: Sequence[Prediction]) -> list[str]:
    """`could not decode FILE (reason)`, once for every file that could not be decoded."""
    return [f"could not decode {p.path} ({p.error})" for p in predictions if not p.ok]


def check_decoded(predictions: Sequence[Prediction]) -> None:
    """Raises DataError, naming the files (the first few) and why, when no image could be decoded."""
    if any(p.ok for p in predictions):
        return
    named = [f"{p.path} ({p.error})" for p in predictions[:LISTED_FILES]]
    more = len(predictions) - len(named)
    raise DataError(
        f"None of the {len(predictions)} input files could be decoded: {', '.join(named)}"
        + (f" and {more} more" if more else "")
        + "; pass JPEG, PNG or other image files PIL reads."
    )


def output_format(path: str) -> str:
    """".csv" or ".json" from `path`'s extension; raises ConfigError for any other."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in OUTPUT_FORMATS:
        raise ConfigError(
            f"Prediction output {path!r} has extension {ext or '(none)'!r}; "
            f"use {' or '.join(OUTPUT_FORMATS)}, e.g. --output preds.csv."
        )
    return ext


def write_predictions(predictions: Sequence[Prediction], path: str) -> None:
    """Writes `predictions` as CSV or JSON (from `path`'s extension), one row or object per file.

    CSV: `file, top1_class, top1_prob, ..., topK_class, topK_prob, true_class, decoded`
    (K the longest top list; empty cells for an undecodable file and an unknown
    true class; decoded is true / false). JSON: a list of
    `{"file", "top": [{"class", "prob"}, ...], "true" (null when unknown), "decoded"}`.

    Args:
      predictions: from `predict`.
      path: the output file, ending in .csv or .json (its folder is created).
    """
    ext = output_format(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if ext == ".json":
        rows = [
            {
                "file": p.path,
                "top": [{"class": c, "prob": round(prob, PROB_DIGITS)} for c, prob in p.top],
                "true": p.true,
                "decoded": p.ok,
            }
            for p in predictions
        ]
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)
            f.write("\n")
        return
    k = max((len(p.top) for p in predictions), default=0)
    header = ["file"] + [f"top{i}_{col}" for i in range(1, k + 1) for col in ("class", "prob")]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header + ["true_class", "decoded"])
        for p in predictions:
            cells = [x for c, prob in p.top for x in (c, round(prob, PROB_DIGITS))]
            cells += [""] * (2 * k - len(cells))
            writer.writerow([p.path, *cells, "" if p.true is None else p.true, str(p.ok).lower()])


def draw_grid(
    predictions: Sequence[Prediction], output: str, thumb: int = 128, columns: int = 8
) -> None:
    """Saves a grid of the images, each with its file name and predicted (and, when known, true) label.

    Green: the prediction equals the true label; red: it does not; black: no true label.
    """
    from jaxres import plots

    plots.prediction_grid(predictions, output, thumb, columns)


def log_grid(run: str, checkpoint: str | int, grid: str) -> None:
    """The grid as TensorBoard's image `pictures/predictions` in the run's dashboard, at the step
    of the checkpoint that predicted (`jaxres.dashboard.log_results`)."""
    from jaxres import checkpoint as ckpt_lib
    from jaxres import dashboard

    run, which = runs._run_and_checkpoint(run, checkpoint)
    checkpointer = runs.open_checkpoints(run)
    try:
        step = ckpt_lib.resolve_step(checkpointer, which)
    finally:
        checkpointer.close()
    dashboard.log_results(runs.run_directory(run), "predictions", step, images={"pictures/predictions": grid})
