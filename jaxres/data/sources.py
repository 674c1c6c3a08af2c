"""Random-access data sources: every record is `{"image": bytes, "label": int, "key": str}`.

* `ImageFolderSource`: `root/<class>/<file>` folders (the embedded digits
  dataset, Caltech-style folders, anything a user has on disk).
* `ListFileSource`: an image folder plus a split list file (`train.txt`,
  `val.txt`: one `class/file` path per line), as `prepare_data.py
  --split_lists_only` writes them.
* `ArrayRecordSource`: a dataset written by `prepare_data.py` without
  TensorFlow (Caltech-101/256, Indoor-67, image folders, pre-resized ImageNet):
  `DIR/<name>/jaxres_dataset.json` plus `<split>.array_record-*` shards of
  msgpack records and a `<split>.labels.npy` beside them.
* `TfdsSource`: a tfds dataset prepared as array_record, read with
  `tfds.data_source` (no TensorFlow at read time; images stay encoded bytes).

`open_source(config.dataset, split)` picks one from `dataset.name`: "digits"
is embedded; "imagefolder" is a folder (split sub-folders, or split list
files when `DIR/<split>.txt` exists, or a split that is itself the path of a
`.txt` list, e.g. the ones `scripts/transfer.py` writes into its output); a name whose `data_dir/<name>/` holds
our metadata file is an `ArrayRecordSource`; anything else is a tfds name.
Every source exposes `class_names` and `labels` (one int per record; cheap,
so that protocols can sample N per class without decoding images).

Files that are not images (`notes.txt`, `.DS_Store`, `Thumbs.db`, sub-folders)
in a class folder are left out of `ImageFolderSource`, logged once per folder
and listed in `source.ignored` as (key, reason); a class folder without images
keeps its label and is warned about by name (`source.empty_classes`).

`ArrayRecordSource.skipped` lists what preparation left out, or kept damaged, and why.

Record format of `ArrayRecordSource` (version 1): each record is a msgpack map
`{"image": <encoded bytes>, "label": <int>, "key": <str>}`; shards are
written with `group_size:1` for random access.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections
import msgpack
import numpy as np

from jaxres.data import embedded
from jaxres.errors import DataError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
EMBEDDED = ("digits",)

RECORDS_METADATA = "jaxres_dataset.json"
RECORDS_FORMAT = "jaxres-array-record"
RECORDS_VERSION = 1
LIST_FILE_SUFFIX = ".txt"
IGNORED_SHOWN = 5  # Names quoted in a warning about ignored files.


def not_image_reason(name: str, is_dir: bool = False) -> str | None:
    """Why the file `name` in a class folder is not read as an image, or None when it is one."""
    if is_dir:
        return "a sub-folder (only <class>/<file> is read)"
    suffix = Path(name).suffix.lower()
    if name.startswith("."):
        return "hidden file" if suffix in IMAGE_EXTENSIONS else f"not an image file ({name})"
    if suffix not in IMAGE_EXTENSIONS:
        return f"not an image file ({suffix or 'no extension'})"
    return None


# Warnings already given in this process: a folder read in place is opened by several readers
# (train and val sources, class names, each protocol trial) and is named once.
_WARNED: set[tuple[str, ...]] = set()


def _first_time(*what: str) -> bool:
    """True the first time this process is about to warn about `what`."""
    if what in _WARNED:
        return False
    _WARNED.add(what)
    return True


def warn_ignored(folder: str, entries: Sequence[tuple[str, str]]) -> None:
    """One warning for the files of `folder` left out as not images: how many, and the first few
    (once per process for the same folder and files)."""
    if entries and _first_time(folder, *(key for key, _ in entries)):
        shown = ", ".join(key.rsplit("/", 1)[-1] for key, _ in entries[:IGNORED_SHOWN])
        more = f" and {len(entries) - IGNORED_SHOWN} more" if len(entries) > IGNORED_SHOWN else ""
        log.warning(
            "Ignored %d file(s) that are not images in %s: %s%s.", len(entries), folder, shown, more
        )


def skipped_entries(entries: Sequence[Any]) -> list[dict[str, str]]:
    """A metadata `skipped` list as {"key", "reason"} entries (metadata written before lists keys)."""
    return [
        entry if isinstance(entry, dict) else {"key": str(entry), "reason": "undecodable"}
        for entry in entries
    ]


def encode_record(image: bytes, label: int, key: str) -> bytes:
    """One `ArrayRecordSource` record: a msgpack map of image bytes, label and key."""
    return msgpack.packb({"image": image, "label": int(label), "key": key}, use_bin_type=True)


def decode_record(data: bytes) -> dict[str, Any]:
    """The inverse of `encode_record`."""
    return msgpack.unpackb(data, raw=False)


def shard_paths(directory: Path, split: str, num_shards: int) -> list[Path]:
    """File names of a split's array_record shards."""
    return [
        directory / f"{split}.array_record-{i:05d}-of-{num_shards:05d}" for i in range(num_shards)
    ]


def read_metadata(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The metadata of a prepared record dataset, or None when `directory` holds none."""
    path = Path(directory) / RECORDS_METADATA
    if not path.is_file():
        return None
    meta = json.loads(path.read_text())
    if meta.get("format") != RECORDS_FORMAT or meta.get("version", 0) > RECORDS_VERSION:
        raise DataError(
            f"{path} is format {meta.get('format')!r} version {meta.get('version')}; this jaxres reads "
            f"{RECORDS_FORMAT!r} up to version {RECORDS_VERSION}. Upgrade jaxres or re-run prepare_data.py."
        )
    return meta


class ImageFolderSource:
    """Images in `root/<class>/<file>`; labels follow the sorted class folder names."""

    def __init__(self, root: str | os.PathLike, class_names: Sequence[str] | None = None):
        root = Path(root)
        if not root.is_dir():
            raise DataError(
                f"Image folder {str(root)!r} does not exist; expected {root}/<class>/<image files>. "
                "Check --config.dataset.data_dir and the split name."
            )
        found = class_folders(root)
        self.class_names = list(class_names) if class_names is not None else found
        index = {name: i for i, name in enumerate(self.class_names)}
        self._files: list[tuple[str, int]] = []
        self.ignored: list[tuple[str, str]] = []  # (class/file, reason): not read as images.
        self.empty_classes: list[str] = []  # Class folders without images (labels kept).
        for name in found:
            if name not in index:
                raise DataError(
                    f"Class folder {name!r} in {root} is not one of the dataset's classes."
                )
            count = len(self._files)
            ignored = []
            # scandir: is_dir() comes with the listing, no stat per file (ImageNet: 1.3M files).
            for f in sorted(os.scandir(root / name), key=lambda f: f.name):
                reason = not_image_reason(f.name, f.is_dir())
                if reason is None:
                    self._files.append((str(root / name / f.name), index[name]))
                else:
                    ignored.append((f"{name}/{f.name}", reason))
            warn_ignored(str(root / name), ignored)
            self.ignored += ignored
            if len(self._files) == count:
                self.empty_classes.append(name)
        if not self._files:
            raise DataError(f"No images ({', '.join(IMAGE_EXTENSIONS)}) under {root}/<class>/.")
        for name in self.empty_classes:
            if not _first_time(str(root / name), "empty"):
                continue
            log.warning(
                "Class folder %s has no images; its label %d is kept (class_names unchanged).",
                root / name, index[name],
            )
        self.root = root

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        path, label = self._files[index]
        with open(path, "rb") as f:
            return {"image": f.read(), "label": label, "key": self._key(path)}

    def _key(self, path: str) -> str:
        return os.path.relpath(path, self.root).replace(os.sep, "/")

    @property
    def keys(self) -> list[str]:
        """Every record's key (`class/file`), without reading the images."""
        return [self._key(path) for path, _ in self._files]

    @property
    def labels(self) -> np.ndarray:
        return np.array([label for _, label in self._files], np.int32)


def class_folders(root: str | os.PathLike) -> list[str]:
    """Sorted names of the class sub-folders of `root`."""
    return sorted(d.name for d in Path(root).iterdir() if d.is_dir() and not d.name.startswith("."))


def read_list_file(path: str | os.PathLike) -> list[str]:
    """The `class/file` paths of a split list file (blank lines and `#` comments ignored)."""
    lines = Path(path).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]


class ListFileSource:
    """Images `root/<class>/<file>` named by a list file; the class is the first path part."""

    def __init__(
        self,
        root: str | os.PathLike,
        list_file: str | os.PathLike,
        class_names: Sequence[str] | None = None,
    ):
        self.root = Path(root)
        if not Path(list_file).is_file():
            raise DataError(
                f"Split list {str(list_file)!r} does not exist; write it with prepare_data.py --split_lists_only."
            )
        entries = read_list_file(list_file)
        if not entries:
            raise DataError(f"Split list {list_file} names no images.")
        self.class_names = (
            list(class_names) if class_names is not None else class_folders(self.root)
        )
        index = {name: i for i, name in enumerate(self.class_names)}
        self._files: list[tuple[str, int]] = []
        for entry in entries:
            name = entry.replace("\\", "/").split("/")[0]
            if name not in index:
                raise DataError(
                    f"{list_file}: {entry!r} is in class {name!r}, not a class folder of {self.root}."
                )
            self._files.append((entry, index[name]))

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, index: int) -> dict[str, Any]:
        entry, label = self._files[index]
        try:
            with open(self.root / entry, "rb") as f:
                image = f.read()
        except FileNotFoundError:
            raise DataError(
                f"{self.root / entry} is in a split list but missing on disk."
            ) from None
        return {"image": image, "label": label, "key": entry}

    @property
    def labels(self) -> np.ndarray:
        return np.array([label for _, label in self._files], np.int32)


class ArrayRecordSource:
    """A split of a dataset written by `prepare_data.py` (no TensorFlow needed)."""

    def __init__(self, directory: str | os.PathLike, split: str):
        self.directory = Path(directory)
        meta = read_metadata(self.directory)
        if meta is None:
            raise DataError(
                f"{self.directory} has no {RECORDS_METADATA}; prepare it with scripts/prepare_data.py."
            )
        if split not in meta["splits"]:
            raise DataError(
                f"Dataset {meta['name']!r} has no split {split!r}; it has {', '.join(sorted(meta['splits']))}. "
                "Set --config.dataset.train_split / val_split."
            )
        info = meta["splits"][split]
        self.metadata, self._split = meta, split
        self.class_names = list(meta["class_names"])
        self._paths = [str(self.directory / f) for f in info["files"]]
        self._labels_path = self.directory / info["labels_file"]
        self._num_examples = int(info["num_examples"])
        self._reader = None  # Opened lazily, so that the source pickles into grain workers.

    def _source(self) -> Any:
        if self._reader is None:
            from array_record.python.array_record_data_source import ArrayRecordDataSource

            self._reader = ArrayRecordDataSource(self._paths)
        return self._reader

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__, _reader=None)

    def __len__(self) -> int:
        return self._num_examples

    def __getitem__(self, index: int) -> dict[str, Any]:
        return decode_record(self._source()[int(index)])

    @property
    def labels(self) -> np.ndarray:
        return np.load(self._labels_path)

    @property
    def skipped(self) -> list[dict[str, str]]:
        """{"key", "reason"} of the files left out (or kept damaged) when the dataset was written.

        The dataset's files that are not images come first, then this split's images.
        """
        split = self.metadata["splits"][self._split]
        return skipped_entries(self.metadata.get("skipped", [])) + skipped_entries(
            split.get("skipped", [])
        )


def _not_prepared(name: str, data_dir: str | None) -> str:
    """One line: `name` is not prepared (by prepare_data.py or tfds) under `data_dir`; the fix."""
    from jaxres.data.prepare import recipes  # Only on this error path.

    where = f"--config.dataset.data_dir={data_dir}" if data_dir else "tfds's default data_dir"
    if name in recipes.DATASETS:
        fix = (
            f"prepare it once: python scripts/prepare_data.py --dataset {name} --manual_dir ARCHIVES "
            "--data_dir DIR, then pass --config.dataset.data_dir=DIR"
        )
    else:
        fix = f"prepare it with tfds (tfds build {name} --data_dir DIR) or pass the data_dir holding it"
    return f"Dataset {name!r} is not prepared under {where}; {fix}."


class TfdsSource:
    """A tfds dataset prepared as array_record, images kept as encoded bytes."""

    def __init__(self, name: str, split: str, data_dir: str | None):
        import tensorflow_datasets as tfds

        try:
            builder = tfds.builder(name, data_dir=data_dir)
            if not builder.is_prepared():  # tfds would say something about file formats.
                raise DataError(_not_prepared(name, data_dir))
            self._source = builder.as_data_source(
                split=split, decoders={"image": tfds.decode.SkipDecoding()}
            )
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - tfds raises many types for "not prepared".
            cause = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
            raise DataError(f"{_not_prepared(name, data_dir)} (tfds: {cause})") from None
        self.class_names = list(builder.info.features["label"].names)
        self._split = split
        self._labels_cache = Path(builder.data_dir) / f"jaxres_labels_{split.replace('/', '_')}.npy"

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        record = self._source[index]
        key = record.get("file_name", f"{self._split}[{index}]")
        if isinstance(key, bytes):
            key = key.decode()
        return {"image": record["image"], "label": int(record["label"]), "key": str(key)}

    @property
    def labels(self) -> np.ndarray:
        """Every record's label; read once (a full pass over the split), then cached beside it."""
        if self._labels_cache.is_file():
            return np.load(self._labels_cache)
        log.info(
            "Reading the labels of %d records once; cached as %s", len(self), self._labels_cache
        )
        labels = np.array([int(self._source[i]["label"]) for i in range(len(self))], np.int32)
        try:
            np.save(self._labels_cache, labels)
        except OSError:  # A read-only data_dir: still correct, just not cached.
            pass
        return labels


def _image_folder(
    dataset: ml_collections.ConfigDict, split: str
) -> ImageFolderSource | ListFileSource:
    if not dataset.data_dir:
        raise DataError(
            "dataset.name='imagefolder' needs --config.dataset.data_dir=DIR (DIR/<split>/<class>/*)."
        )
    root = Path(os.path.expanduser(dataset.data_dir))
    list_file = root / f"{split}{LIST_FILE_SUFFIX}"
    if split.endswith(LIST_FILE_SUFFIX):  # A split list kept elsewhere (scripts/transfer.py's).
        list_file = Path(os.path.expanduser(split))
    if list_file.is_file():  # DIR/<class>/* with DIR/train.txt, DIR/val.txt.
        return ListFileSource(root, list_file)
    train_root = root / dataset.train_split
    # Label ids come from the train split's class folders, whatever split is read.
    classes = class_folders(train_root) if train_root.is_dir() else None
    return ImageFolderSource(root / split, classes)


class Subset:
    """Records `indices` of `source`, in that order; keeps the source's `class_names`."""

    def __init__(self, source: Any, indices: Sequence[int]):
        self._source, self._indices = source, np.asarray(indices)
        self.class_names = getattr(source, "class_names", None)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self._source[int(self._indices[index])]

    @property
    def labels(self) -> np.ndarray:
        return np.asarray(self._source.labels)[self._indices]


class Concat:
    """The records of several sources one after another (one forward pass over two splits);
    the first source's `class_names`."""

    def __init__(self, *parts: Any):
        self._parts = parts
        self._starts = np.cumsum([0] + [len(p) for p in parts])
        self.class_names = getattr(parts[0], "class_names", None)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> dict[str, Any]:
        part = int(np.searchsorted(self._starts, index, side="right")) - 1
        return self._parts[part][index - int(self._starts[part])]

    @property
    def labels(self) -> np.ndarray:
        return np.concatenate([np.asarray(p.labels) for p in self._parts])


def limited(source: Any, limit: int) -> Subset:
    """A fixed random subset of `limit` records (smoke runs); sources are often sorted by class."""
    return Subset(source, np.sort(np.random.default_rng(0).permutation(len(source))[:limit]))


def open_source(
    dataset: ml_collections.ConfigDict, split: str
) -> ImageFolderSource | ListFileSource | ArrayRecordSource | TfdsSource:
    """The source for `split` of `dataset` (`config.dataset`)."""
    if dataset.name in EMBEDDED:
        root = embedded.write_digits(os.path.expanduser(dataset.data_dir))
        return ImageFolderSource(root / split)
    if dataset.name == "imagefolder":
        return _image_folder(dataset, split)
    data_dir = os.path.expanduser(dataset.data_dir) if dataset.data_dir else None
    if data_dir and (Path(data_dir) / dataset.name / RECORDS_METADATA).is_file():
        return ArrayRecordSource(Path(data_dir) / dataset.name, split)
    return TfdsSource(dataset.name, split, data_dir)
