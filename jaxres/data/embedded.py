"""The embedded default dataset: scikit-learn's bundled handwritten digits.

1,797 8x8 grey images of the digits 0-9 ship inside scikit-learn, so the demo
needs no download. They are written once as a JPEG image folder (upscaled to
32x32, RGB) with a fixed, stratified 80/20 train/val split, and from then on
read through exactly the same image-folder source and grain pipeline as any
other folder dataset.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from jaxres.errors import DataError

DIGITS_IMAGE_SIZE = 32
DIGITS_VAL_FRACTION = 0.2
DIGITS_SPLIT_SEED = 0
DONE_MARKER = ".complete"  # Written last: the folder is complete.


def stratified_split(labels: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean mask of validation examples: `val_fraction` of each class, seeded."""
    rng = np.random.default_rng(seed)
    is_val = np.zeros(len(labels), bool)
    for label in np.unique(labels):
        idx = np.flatnonzero(labels == label)
        rng.shuffle(idx)
        is_val[idx[: round(len(idx) * val_fraction)]] = True
    return is_val


def write_digits(root: str | os.PathLike) -> Path:
    """Writes the digits image folder under `root` (idempotent); returns its path.

    Layout: `root/digits/{train,val}/<digit>/<index>.jpg`.
    """
    out = Path(root) / "digits"
    if (out / DONE_MARKER).exists():
        return out
    # Intended: data_dir is where datasets are written (the demo's default: ~/.cache/jaxres), and
    # the embedded one is written there on first use. Said, since it may create data_dir itself.
    from jaxres.console import log_line

    log_line(f"Writing the embedded digits dataset (1,797 images, first use) to {out}.")
    try:
        return _write(out)
    except OSError as e:
        raise DataError(
            f"Cannot write the embedded digits dataset to {out} ({e.strerror or e}); pass a writable "
            "--config.dataset.data_dir (the demo's default is ~/.cache/jaxres)."
        ) from None


def _write(out: Path) -> Path:
    from sklearn.datasets import load_digits  # Only needed once, to write the files.

    digits = load_digits()
    images = (digits.images / 16.0 * 255.0).round().astype(np.uint8)
    is_val = stratified_split(digits.target, DIGITS_VAL_FRACTION, DIGITS_SPLIT_SEED)
    # Written aside, then renamed: concurrent processes (multi-process runs) never see a partial folder.
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    for index, (image, label, val) in enumerate(zip(images, digits.target, is_val)):
        folder = tmp / ("val" if val else "train") / str(label)
        folder.mkdir(parents=True, exist_ok=True)
        big = Image.fromarray(image, "L").resize(
            (DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE), Image.Resampling.BICUBIC
        )
        big.convert("RGB").save(folder / f"{index:04d}.jpg", quality=95)
    (tmp / DONE_MARKER).write_text("ok\n")
    try:
        tmp.rename(out)
    except OSError:  # Another process finished first.
        shutil.rmtree(tmp)
    return out
