"""Random-access data sources: every record is `{"image": bytes, "label": int, "key": str}`.

* `ImageFolderSource`: `root/<split>/<class>/<file>` folders (the embedded digits
  dataset, Caltech-style folders, anything a user has on disk).
* `TfdsSource`: a tfds dataset prepared as array_record, read with
  `tfds.data_source` (no TensorFlow at read time; images stay encoded bytes).

`open_source(config.dataset, split)` picks one from `dataset.name`; every
source exposes `class_names`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import ml_collections

from jaxres.errors import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
IMAGE_FOLDER_DONE = ".complete"
EMBEDDED = ("digits",)


class ImageFolderSource:
    """Images in `root/<class>/<file>`; labels follow the sorted class folder names."""

    def __init__(self, root: str | os.PathLike, class_names: Sequence[str] | None = None):
        root = Path(root)
        if not root.is_dir():
            raise DataError(
                f"Image folder {str(root)!r} does not exist; expected {root}/<class>/<image files>. "
                "Check --config.dataset.data_dir and the split name."
            )
        found = sorted(d.name for d in root.iterdir() if d.is_dir())
        self.class_names = list(class_names) if class_names is not None else found
        index = {name: i for i, name in enumerate(self.class_names)}
        self._files: list[tuple[str, int]] = []
        for name in found:
            if name not in index:
                raise DataError(f"Class folder {name!r} in {root} is not one of the dataset's classes.")
            for f in sorted((root / name).iterdir()):
                if f.suffix.lower() in IMAGE_EXTENSIONS:
                    self._files.append((str(f), index[name]))
        if not self._files:
            raise DataError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) under {root}/<class>/.")
        self.root = root

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self._files[index]
        with open(path, "rb") as f:
            return {"image": f.read(), "label": label, "key": os.path.relpath(path, self.root)}

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self._files]


class TfdsSource:
    """A tfds dataset prepared as array_record, images kept as encoded bytes."""

    def __init__(self, name: str, split: str, data_dir: str | None):
        import tensorflow_datasets as tfds

        try:
            builder = tfds.builder(name, data_dir=data_dir)
            self._source = builder.as_data_source(
                split=split, decoders={"image": tfds.decode.SkipDecoding()}
            )
        except Exception as e:  # tfds raises many types for "not prepared"
            raise DataError(
                f"tfds dataset {name!r} split {split!r} is not prepared under data_dir={data_dir!r} "
                f"({type(e).__name__}: {str(e).splitlines()[0][:200]}). Prepare it first: "
                f"python scripts/prepare_data.py --dataset {name} --manual_dir DIR --data_dir DIR"
            ) from None
        self.class_names = list(builder.info.features["label"].names)
        self._split = split

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._source[index]
        key = record.get("file_name", f"{self._split}[{index}]")
        if isinstance(key, bytes):
            key = key.decode()
        return {"image": record["image"], "label": int(record["label"]), "key": str(key)}


def open_source(dataset: ml_collections.ConfigDict, split: str) -> ImageFolderSource | TfdsSource:
    """The source for `split` of `dataset` (`config.dataset`)."""
    if dataset.name in EMBEDDED:
        from jaxres.data import embedded

        root = embedded.write_digits(os.path.expanduser(dataset.data_dir))
        return ImageFolderSource(root / split)
    if dataset.name == "imagefolder":
        if not dataset.data_dir:
            raise DataError("dataset.name='imagefolder' needs --config.dataset.data_dir=DIR (DIR/<split>/<class>/*).")
        root = Path(os.path.expanduser(dataset.data_dir))
        train_root = root / dataset.train_split
        # Label ids come from the train split's class folders, whatever split is read.
        classes = sorted(d.name for d in train_root.iterdir() if d.is_dir()) if train_root.is_dir() else None
        return ImageFolderSource(root / split, classes)
    return TfdsSource(dataset.name, split, os.path.expanduser(dataset.data_dir) if dataset.data_dir else None)
