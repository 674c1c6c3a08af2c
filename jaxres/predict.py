"""Top-k predictions for image files, and a grid of predicted vs true labels.

    python scripts/predict.py --workdir runs/demo --top_k 3 digit.jpg FOLDER [--grid out.png]

Images go through the run's evaluation transform (resize, centre crop) and the
same jitted, batch-sharded forward pass as `jaxres.evaluate`. Class names come
from the run's dataset (class numbers when that dataset is not on this
machine). An image's true label is its parent folder's name when that is a
class name (`FOLDER/<class>/<image>` as in image-folder datasets).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxres import runs
from jaxres.data import sources
from jaxres.errors import DataError
from jaxres.evaluate import Ensemble


@dataclasses.dataclass
class Prediction:
    """One image: its path, top-k (class name, probability), true class name or None."""

    path: str
    top: list[tuple[str, float]]
    true: str | None
    ok: bool  # False when the file could not be decoded.


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
    probs, masks = ensemble.probabilities(source, "center", batch_size)
    out = []
    for path, label, p, ok in zip(source.paths, source.labels, probs, masks):
        order = np.argsort(-p)[:top_k]
        out.append(
            Prediction(
                path,
                [(names[i], float(p[i])) for i in order],
                names[label] if label >= 0 else None,
                bool(ok),
            )
        )
    return out


def format_predictions(predictions: Sequence[Prediction]) -> str:
    """One line per image: path, then `class probability` pairs (and the true class when known)."""
    lines = []
    for p in predictions:
        if not p.ok:
            lines.append(f"{p.path}: could not be decoded")
            continue
        top = ", ".join(f"{name} {prob:.3f}" for name, prob in p.top)
        lines.append(f"{p.path}: {top}" + (f"  (true: {p.true})" if p.true is not None else ""))
    return "\n".join(lines)


def draw_grid(
    predictions: Sequence[Prediction], output: str, thumb: int = 128, columns: int = 8
) -> None:
    """Saves a grid of the images, each with its predicted (and, when known, true) label.

    Green: the prediction equals the true label; red: it does not; black: no true label.
    """
    from PIL import Image, ImageDraw

    rows = -(-len(predictions) // columns)
    text_h = 28
    grid = Image.new("RGB", (columns * thumb, rows * (thumb + text_h)), "white")
    draw = ImageDraw.Draw(grid)
    for i, p in enumerate(predictions):
        x, y = (i % columns) * thumb, (i // columns) * (thumb + text_h)
        try:
            with Image.open(p.path) as im:
                im = im.convert("RGB")
                scale = thumb / max(im.size)  # Up or down: 32x32 digits become readable.
                im = im.resize(
                    (max(1, round(im.width * scale)), max(1, round(im.height * scale))),
                    Image.Resampling.BICUBIC,
                )
                grid.paste(im, (x + (thumb - im.width) // 2, y + (thumb - im.height) // 2))
        except OSError:
            pass
        name, prob = p.top[0] if p.ok else ("?", 0.0)
        color = "black" if p.true is None else ("green" if p.true == name else "red")
        draw.text((x + 2, y + thumb), f"pred {name[:14]} {prob:.2f}", fill=color)
        if p.true is not None:
            draw.text((x + 2, y + thumb + 13), f"true {p.true[:14]}", fill="black")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    grid.save(output)
