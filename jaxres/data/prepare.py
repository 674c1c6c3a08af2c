"""Dataset preparation: official archives (or extracted folders) -> array_record.

* ImageNet-1k (`imagenet2012`): the two official tars through the real tfds
  builder (needs TensorFlow: `pip install 'jaxres[prepare]'`), read back by
  `TfdsSource`. `resize_shorter=N` also writes a pre-resized copy
  `data_dir/imagenet2012_resized_N` (our record format) for CPU-starved hosts.
* Caltech-101, Caltech-256, MIT Indoor-67 and any `class/file` image folder:
  written by `write_record_dataset` without TensorFlow, read back by
  `sources.ArrayRecordSource` (record format documented in sources.py).

Every image is checked on the way in: JPEGs in RGB / grey are stored as they
are; CMYK, palette, PNG, GIF ... are re-encoded as RGB JPEG at
`PREPARE_JPEG_QUALITY`; a file that cannot be decoded at all is left out and
named in the metadata (`skipped`). Records are sorted by `class/file`, so the
same images give the same dataset whether they came from the archive or an
extracted folder. Preparing again is a no-op once the metadata file exists.
"""

from __future__ import annotations

import collections
import importlib.util
import io
import json
import logging
import math
import multiprocessing
import os
import shutil
import tarfile
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from jaxres.data import sources, transforms
from jaxres.errors import DataError

log = logging.getLogger(__name__)

PREPARE_JPEG_QUALITY = 95  # Re-encoding non-JPEG / CMYK images (nearly lossless).
RESIZED_JPEG_QUALITY = 90  # Pre-resized copies (`resize_shorter`).
RECORDS_PER_SHARD = 10_000
KEPT_JPEG_COLORSPACES = ("YCbCr", "Gray")  # Stored as they are; everything else re-encoded.


class RecordList:
    """A random-access list of records built from (key, label, reader) triples."""

    def __init__(self, entries: Sequence[tuple[str, int, Callable[[], bytes]]]):
        self._entries = list(entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        key, label, read = self._entries[index]
        return {"image": read(), "label": label, "key": key}


def normalize_image(
    image_bytes: bytes,
    resize_shorter: int | None = None,
    quality: int = PREPARE_JPEG_QUALITY,
    key: str = "?",
) -> bytes | None:
    """The bytes to store for one image, or None when it cannot be decoded at all.

    A complete RGB / grey JPEG that needs no resizing is kept byte for byte;
    anything else (CMYK, PNG, GIF, truncated, or larger than `resize_shorter`)
    is decoded and re-encoded as an RGB JPEG at `quality`.
    """
    try:
        header = Image.open(io.BytesIO(image_bytes))  # Reads the header only.
    except Exception:  # noqa: BLE001 - zero bytes, garbage: reported by the caller.
        return None
    size = header.size
    shrink = bool(resize_shorter) and min(size) > resize_shorter
    if header.format == "JPEG" and header.mode in ("RGB", "L") and not shrink:
        try:
            header.load()  # The whole file must decode, or it is re-encoded below.
            return image_bytes
        except Exception as e:  # noqa: BLE001
            log.debug("%s does not decode fully (%s); re-encoding what does.", key, e)
    target = transforms.shorter_side_size(*size, resize_shorter) if shrink else None
    draft = None
    if target is not None:
        scale = transforms.dct_scale((0, 0, *size), target)
        draft = (math.ceil(size[0] / scale), math.ceil(size[1] / scale)) if scale > 1 else None
    try:
        image = transforms.pil_open(image_bytes, key, draft)
    except Exception:  # noqa: BLE001 - undecodable: reported by the caller.
        return None
    if target is not None:
        image = image.resize(target, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def _normalize_task(args: tuple[bytes, int | None, int, str]) -> bytes | None:
    return normalize_image(*args)


def _map(fn: Callable, items: Iterable, num_workers: int) -> Iterable:
    """`map` in order, over `num_workers` spawned processes (0 = in this process)."""
    if num_workers <= 0:
        yield from map(fn, items)
        return
    # spawn, not fork: the parent may hold TensorFlow / tfds threads.
    with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
        yield from pool.imap(fn, items, chunksize=8)


def _progress(iterable: Iterable, total: int, desc: str) -> Iterable:
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit="img", mininterval=2.0)


def _write_split(
    directory: Path,
    split: str,
    source: Any,
    num_classes: int,
    options: dict[str, Any],
    num_workers: int,
) -> dict[str, Any]:
    """Writes one split's shards and labels; returns its metadata entry."""
    from array_record.python.array_record_module import ArrayRecordWriter

    n = len(source)
    if n == 0:
        raise DataError(f"Split {split!r} of {directory.name} has no images.")
    paths = sources.shard_paths(directory, split, max(1, math.ceil(n / RECORDS_PER_SHARD)))
    writers = [
        ArrayRecordWriter(str(p), "group_size:1") for p in paths
    ]  # group_size 1: random access.
    pending: collections.deque = collections.deque()

    def tasks():
        for i in range(n):
            record = source[i]
            pending.append((record["key"], int(record["label"])))  # Read before its result arrives.
            yield record["image"], options["resize_shorter"], options["jpeg_quality"], record["key"]

    labels, skipped = [], []
    results = _map(_normalize_task, tasks(), num_workers)
    for i, data in enumerate(_progress(results, n, f"{directory.name}/{split}")):
        key, label = pending.popleft()
        if data is None:
            log.warning("Skipping undecodable image %s", key)
            skipped.append(key)
            continue
        writers[i * len(paths) // n].write(sources.encode_record(data, label, key))
        labels.append(label)
    for writer in writers:
        writer.close()
    labels_file = f"{split}.labels.npy"
    np.save(directory / labels_file, np.array(labels, np.int32))
    return {
        "num_examples": len(labels),
        "files": [p.name for p in paths],
        "labels_file": labels_file,
        "class_counts": np.bincount(np.array(labels, np.int64), minlength=num_classes).tolist(),
        "skipped": skipped,
    }


def write_record_dataset(
    directory: str | os.PathLike,
    splits: dict[str, Any],
    class_names: Sequence[str],
    *,
    source: str,
    resize_shorter: int | None = None,
    jpeg_quality: int = PREPARE_JPEG_QUALITY,
    num_workers: int = 0,
    notes: str = "",
    overwrite: bool = False,
) -> dict[str, Any]:
    """Writes `splits` ({name: record source}) as an `ArrayRecordSource` dataset in `directory`.

    Idempotent: when `directory` already holds a dataset written with the same
    options it is left alone (pass `overwrite=True` to write it again). The
    dataset is written to `directory.tmp` and renamed at the end, so an
    interrupted run never leaves a half dataset behind.

    Returns:
      The metadata (also saved as `directory/jaxres_dataset.json`).
    """
    directory = Path(directory)
    options = {"resize_shorter": resize_shorter, "jpeg_quality": jpeg_quality}
    existing = sources.read_metadata(directory)
    if existing is None and directory.exists() and any(directory.iterdir()):
        # Never replace a folder we did not write (it may be the user's images).
        raise DataError(
            f"{directory} exists and is not a prepared dataset; pick another --data_dir or --name, "
            "or remove that folder."
        )
    if existing is not None and not overwrite:
        if existing.get("options") != options or sorted(existing["splits"]) != sorted(splits):
            raise DataError(
                f"{directory} was prepared with options {existing.get('options')} and splits "
                f"{sorted(existing['splits'])}; add --overwrite to write it again with {options}."
            )
        log.info("%s is already prepared; nothing to do.", directory)
        return existing
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {
        "format": sources.RECORDS_FORMAT,
        "version": sources.RECORDS_VERSION,
        "name": directory.name,
        "source": source,
        "notes": notes,
        "options": options,
        "class_names": list(class_names),
        "splits": {},
    }
    for split, split_source in splits.items():
        meta["splits"][split] = _write_split(
            tmp, split, split_source, len(class_names), options, num_workers
        )
    (tmp / sources.RECORDS_METADATA).write_text(json.dumps(meta, indent=1) + "\n")
    if directory.exists():
        shutil.rmtree(directory)
    tmp.rename(directory)
    summary = ", ".join(f"{k} {v['num_examples']}" for k, v in meta["splits"].items())
    log.info("Wrote %s: %d classes, %s images.", directory, len(class_names), summary)
    return meta


# --------------------------------------------------------------------------- archives


def _member_reader(tar: tarfile.TarFile, member: tarfile.TarInfo) -> Callable[[], bytes]:
    return lambda: tar.extractfile(member).read()


def _tar_files(tar_path: Path | None = None, fileobj: Any = None) -> dict[str, Callable[[], bytes]]:
    """Files of a tar by member name: read on demand from a plain tar, held in memory from a stream."""
    files: dict[str, Callable[[], bytes]] = {}
    if fileobj is None and tarfile.is_tarfile(tar_path) and not _is_compressed(tar_path):
        tar = tarfile.open(tar_path, "r:")  # noqa: SIM115 - stays open: members are read on demand.
        for member in tar.getmembers():
            if member.isfile():
                files[_clean(member.name)] = _member_reader(tar, member)
        return files
    # A compressed tar cannot seek cheaply: stream it once and keep the images (Caltech-101: 130 MB).
    with tarfile.open(tar_path, "r|*", fileobj=fileobj) as tar:
        for member in tar:
            if member.isfile() and member.name.lower().endswith(sources.IMAGE_EXTENSIONS):
                data = tar.extractfile(member).read()
                files[_clean(member.name)] = lambda data=data: data
    return files


def _is_compressed(path: Path) -> bool:
    with open(path, "rb") as f:
        magic = f.read(3)
    return magic[:2] == b"\x1f\x8b" or magic == b"BZh" or magic[:2] == b"\xfd7"


def _clean(name: str) -> str:
    name = name.replace("\\", "/")
    while name.startswith("./"):
        name = name[2:]
    return name


def _folder_files(root: Path) -> dict[str, Callable[[], bytes]]:
    """Files under `root` by path relative to root's parent (so the folder name stays in the path)."""
    files = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            files[path.relative_to(root.parent).as_posix()] = path.read_bytes
    return files


def _zip_files(zip_path: Path, inner_archive: str) -> dict[str, Callable[[], bytes]]:
    """Files of a tar.gz held inside a zip (as `caltech-101.zip` holds `101_ObjectCategories.tar.gz`)."""
    with zipfile.ZipFile(zip_path) as zf:
        inner = [n for n in zf.namelist() if n.endswith(inner_archive) and "__MACOSX" not in n]
        if not inner:
            raise DataError(
                f"{zip_path} holds no {inner_archive}; is it the archive the dataset's authors distribute?"
            )
        with zf.open(inner[0]) as f:
            return _tar_files(fileobj=f)


def _find_input(manual_dir: Path, candidates: Sequence[str], dataset: str) -> Path:
    """The first of `candidates` (archives or folders) present in `manual_dir`."""
    for name in candidates:
        if (manual_dir / name).exists():
            return manual_dir / name
    if manual_dir.name in candidates and manual_dir.is_dir():
        return manual_dir
    raise DataError(
        f"No {dataset} data in {manual_dir}: expected one of {', '.join(candidates)} there "
        "(the archives as the dataset's authors distribute them, or the extracted folder). "
        "Download it and pass its folder as --manual_dir."
    )


def _input_files(path: Path, inner_archive: str = "") -> dict[str, Callable[[], bytes]]:
    if path.is_dir():
        return _folder_files(path)
    if path.suffix == ".zip":
        return _zip_files(path, inner_archive)
    return _tar_files(path)


def _class_files(
    files: dict[str, Any], root_name: str, exclude: Sequence[str] = ()
) -> dict[str, dict[str, Any]]:
    """{class: {file: reader}} for image paths `.../root_name/<class>/<file>` (deeper paths ignored)."""
    classes: dict[str, dict[str, Any]] = {}
    for name, read in files.items():
        parts = name.split("/")
        if root_name not in parts[:-2] or not name.lower().endswith(sources.IMAGE_EXTENSIONS):
            continue
        rest = parts[parts.index(root_name) + 1 :]
        if len(rest) == 2 and rest[0] not in exclude and not rest[1].startswith("."):
            classes.setdefault(rest[0], {})[rest[1]] = read
    if not classes:
        raise DataError(
            f"Found no {root_name}/<class>/<image> files; is this the right archive or folder?"
        )
    return classes


def _records(
    classes: dict[str, dict[str, Any]],
    class_names: Sequence[str],
    keep: Callable[[str], bool] = lambda k: True,
) -> RecordList:
    """Records sorted by `class/file` (labels = positions in `class_names`)."""
    entries = []
    for label, name in enumerate(class_names):
        for file_name in sorted(classes.get(name, {})):
            key = f"{name}/{file_name}"
            if keep(key):
                entries.append((key, label, classes[name][file_name]))
    return RecordList(entries)


# --------------------------------------------------------------------------- datasets

CALTECH101_ARCHIVES = ("101_ObjectCategories.tar.gz", "caltech-101.zip", "101_ObjectCategories")
CALTECH101_DROPPED = ("BACKGROUND_Google",)
CALTECH256_ARCHIVES = ("256_ObjectCategories.tar", "256_ObjectCategories")
CALTECH256_CLUTTER = "257.clutter"
INDOOR67_ARCHIVES = ("indoorCVPR_09.tar", "Images")
INDOOR67_LISTS = {"train": "TrainImages.txt", "test": "TestImages.txt"}
IMAGENET_TARS = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


def prepare_caltech101(
    manual_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None, **options: Any
) -> Path:
    """Caltech-101: 101 object classes (BACKGROUND_Google dropped), every image, one split "all".

    The transfer protocols sample N train images per class from "all".
    """
    manual_dir = Path(manual_dir)
    found = _find_input(manual_dir, CALTECH101_ARCHIVES, "Caltech-101")
    classes = _class_files(
        _input_files(found, "101_ObjectCategories.tar.gz"),
        "101_ObjectCategories",
        CALTECH101_DROPPED,
    )
    names = sorted(classes)
    out = Path(data_dir or manual_dir) / "caltech101"
    notes = f"{len(names)} classes; dropped {', '.join(CALTECH101_DROPPED)} (standard protocol)."
    write_record_dataset(
        out, {"all": _records(classes, names)}, names, source=str(found), notes=notes, **options
    )
    return out


def prepare_caltech256(
    manual_dir: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    keep_clutter: bool = False,
    **options: Any,
) -> Path:
    """Caltech-256: 256 object classes (257.clutter dropped unless `keep_clutter`), one split "all"."""
    manual_dir = Path(manual_dir)
    found = _find_input(manual_dir, CALTECH256_ARCHIVES, "Caltech-256")
    dropped = () if keep_clutter else (CALTECH256_CLUTTER,)
    classes = _class_files(_input_files(found), "256_ObjectCategories", dropped)
    names = sorted(classes)
    out = Path(data_dir or manual_dir) / "caltech256"
    notes = f"{len(names)} classes; " + (
        "kept 257.clutter." if keep_clutter else "dropped 257.clutter (standard protocol)."
    )
    write_record_dataset(
        out, {"all": _records(classes, names)}, names, source=str(found), notes=notes, **options
    )
    return out


def prepare_indoor67(
    manual_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None, **options: Any
) -> Path:
    """MIT Indoor-67 with the official 80/20 lists: splits "train" (5,360) and "test" (1,340)."""
    manual_dir = Path(manual_dir)
    found = _find_input(manual_dir, INDOOR67_ARCHIVES, "MIT Indoor-67")
    lists = {}
    for split, file_name in INDOOR67_LISTS.items():
        path = manual_dir / file_name
        if not path.is_file():
            raise DataError(
                f"MIT Indoor-67 needs the official split list {path} (with {', '.join(INDOOR67_LISTS.values())})."
            )
        lists[split] = set(sources.read_list_file(path))
    classes = _class_files(_input_files(found), "Images")
    names = sorted({key.split("/")[0] for keys in lists.values() for key in keys})
    present = {f"{c}/{f}" for c, files in classes.items() for f in files}
    for split, keys in lists.items():
        missing = sorted(keys - present)
        if missing:
            raise DataError(
                f"{len(missing)} images of {INDOOR67_LISTS[split]} are not in {found} (e.g. {missing[0]}); "
                "is it the complete indoorCVPR_09.tar?"
            )
    splits = {split: _records(classes, names, keys.__contains__) for split, keys in lists.items()}
    out = Path(data_dir or manual_dir) / "indoor67"
    write_record_dataset(
        out,
        splits,
        names,
        source=str(found),
        notes="Official TrainImages / TestImages lists.",
        **options,
    )
    return out


def prepare_imagefolder(
    manual_dir: str | os.PathLike,
    data_dir: str | os.PathLike | None,
    name: str,
    val_fraction: float = 0.0,
    seed: int = 0,
    **options: Any,
) -> Path:
    """`manual_dir/<class>/<file>` -> dataset `name`: split "train" (+ "val", stratified, seeded).

    With `val_fraction=0` and split lists `manual_dir/train.txt` (+ `val.txt`)
    present, those lists give the splits; otherwise every image is "train".
    """
    from jaxres.data import splits as splits_lib

    if not name:
        raise DataError(
            "--dataset imagefolder needs --name NAME (the dataset's name in config.dataset.name)."
        )
    manual_dir = Path(manual_dir)
    folder = sources.ImageFolderSource(manual_dir)
    labels = np.asarray(folder.labels)
    if val_fraction > 0:
        is_val = splits_lib.stratified_split(labels, val_fraction, seed)
        parts = {
            "train": sources.Subset(folder, np.flatnonzero(~is_val)),
            "val": sources.Subset(folder, np.flatnonzero(is_val)),
        }
    elif (manual_dir / "train.txt").is_file():
        parts = {
            s: sources.ListFileSource(manual_dir, p, folder.class_names)
            for s, p in splits_lib.list_files(manual_dir).items()
        }
    else:
        parts = {"train": folder}
    out = Path(data_dir or manual_dir.parent) / name
    notes = f"Image folder; val_fraction={val_fraction}, seed={seed}."
    write_record_dataset(
        out, parts, folder.class_names, source=str(manual_dir), notes=notes, **options
    )
    return out


def prepare_imagenet2012(
    manual_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    resize_shorter: int | None = None,
    jpeg_quality: int = RESIZED_JPEG_QUALITY,
    num_workers: int = 0,
    overwrite: bool = False,
) -> Path:
    """ImageNet-1k from the two official tars via the tfds builder (array_record); optional resized copy.

    Returns:
      The tfds data_dir, or the resized dataset's folder when `resize_shorter`.
    """
    manual_dir = Path(manual_dir)
    missing = [t for t in IMAGENET_TARS if not (manual_dir / t).is_file()]
    if missing:
        raise DataError(
            f"{manual_dir} lacks {', '.join(missing)}; ImageNet needs both official tars "
            f"({', '.join(IMAGENET_TARS)}) in --manual_dir."
        )
    if importlib.util.find_spec("tensorflow") is None:  # The tfds builder writes through TF.
        raise DataError("Preparing imagenet2012 needs TensorFlow: pip install 'jaxres[prepare]'.")
    import tensorflow_datasets as tfds

    builder = tfds.builder("imagenet2012", data_dir=str(data_dir), file_format="array_record")
    config = tfds.download.DownloadConfig(manual_dir=str(manual_dir), try_download_gcs=False)
    builder.download_and_prepare(download_config=config)  # A no-op when already prepared.
    if not resize_shorter:
        return Path(data_dir)
    splits = {
        s: sources.TfdsSource("imagenet2012", s, str(data_dir)) for s in ("train", "validation")
    }
    out = Path(data_dir) / f"imagenet2012_resized_{resize_shorter}"
    write_record_dataset(
        out,
        splits,
        splits["train"].class_names,
        source=f"tfds imagenet2012 in {data_dir}",
        notes=f"Shorter side resized to {resize_shorter} (bicubic, antialiased; smaller images kept), JPEG q{jpeg_quality}.",
        resize_shorter=resize_shorter,
        jpeg_quality=jpeg_quality,
        num_workers=num_workers,
        overwrite=overwrite,
    )
    return out


DATASETS = {
    "imagenet2012": prepare_imagenet2012,
    "caltech101": prepare_caltech101,
    "caltech256": prepare_caltech256,
    "indoor67": prepare_indoor67,
    "imagefolder": prepare_imagefolder,
}


def dataset_statistics(source: Any, max_images: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Per-channel pixel mean / std (uint8 units) over a seeded sample, and the class counts.

    Args:
      source: any record source (`sources.open_source`).
      max_images: decode at most this many images (sampled without replacement; 0 = all).
      seed: the sample's seed.
    """
    n = len(source)
    count = n if max_images <= 0 else min(n, max_images)
    indices = np.sort(np.random.default_rng(seed).permutation(n)[:count])
    total, total_sq, pixels, undecodable = np.zeros(3), np.zeros(3), 0, []
    for i in _progress(indices, count, "statistics"):
        record = source[int(i)]
        try:
            array = np.asarray(
                transforms.decode(record["image"], record["key"]), np.float64
            ).reshape(-1, 3)
        except Exception:  # noqa: BLE001 - listed in the result.
            undecodable.append(record["key"])
            continue
        total += array.sum(0)
        total_sq += np.square(array).sum(0)
        pixels += len(array)
    mean = total / max(pixels, 1)
    std = np.sqrt(np.maximum(total_sq / max(pixels, 1) - np.square(mean), 0))
    counts = np.bincount(np.asarray(source.labels, np.int64), minlength=len(source.class_names))
    return {
        "num_examples": n,
        "images_used": count - len(undecodable),
        "undecodable": undecodable,
        "mean": [round(float(m), 3) for m in mean],
        "std": [round(float(s), 3) for s in std],
        "class_counts": dict(zip(source.class_names, counts.tolist())),
    }
