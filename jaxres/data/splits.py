"""Train / validation splits of image folders: stratified, seeded, saved as list files.

A list file (`train.txt`, `val.txt`) holds one `class/file` path per line,
relative to the image folder it sits in; `sources.ListFileSource` reads it and
`open_source` uses it when `dataset.name="imagefolder"` and
`DIR/<split>.txt` exists.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from jaxres.data.embedded import stratified_split
from jaxres.data.sources import LIST_FILE_SUFFIX, ImageFolderSource
from jaxres.errors import DataError

__all__ = ["list_files", "stratified_split", "write_split_lists"]

SPLIT_NAMES = ("train", "val", "test")


def list_files(root: str | os.PathLike) -> dict[str, Path]:
    """The split list files present in `root` ({split: path})."""
    root = Path(root)
    return {
        s: root / f"{s}{LIST_FILE_SUFFIX}"
        for s in SPLIT_NAMES
        if (root / f"{s}{LIST_FILE_SUFFIX}").is_file()
    }


def write_split_lists(
    root: str | os.PathLike, val_fraction: float, seed: int = 0
) -> dict[str, Path]:
    """Writes `root/train.txt` and `root/val.txt`: `val_fraction` of every class to val, seeded.

    Args:
      root: an image folder `root/<class>/<file>`.
      val_fraction: the share of each class's images that goes to val (rounded per class).
      seed: the split's seed; the same seed and files give the same lists.

    Returns:
      {"train": path, "val": path}.
    """
    if not 0 < val_fraction < 1:
        raise DataError(f"--val_fraction={val_fraction} must be in (0, 1).")
    root = Path(root)
    folder = ImageFolderSource(root)
    keys = folder.keys
    is_val = stratified_split(np.asarray(folder.labels), val_fraction, seed)
    written = {}
    for split, chosen in (("train", ~is_val), ("val", is_val)):
        path = root / f"{split}{LIST_FILE_SUFFIX}"
        path.write_text("".join(f"{k}\n" for k, c in zip(keys, chosen) if c))
        written[split] = path
    return written
