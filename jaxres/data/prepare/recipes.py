"""Dataset recipes: one `prepare_*` function per dataset, and `DATASETS` by name.

* ImageNet-1k (`imagenet2012`): the two official tars through the real tfds
  builder (needs TensorFlow: `pip install 'jaxres[prepare]'`), read back by
  `TfdsSource`. `resize_shorter=N` also writes a pre-resized copy
  `data_dir/imagenet2012_resized_N` (our record format) for CPU-starved hosts.
* Caltech-101, Caltech-256, MIT Indoor-67 and any `class/file` image folder:
  read by `archives`, written by `records.write_record_dataset` without
  TensorFlow, read back by `sources.ArrayRecordSource`.

Records are sorted by `class/file`, so the same images give the same dataset
whether they came from the archive or an extracted folder. Preparing again is
a no-op once the metadata file exists.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxres.data import sources
from jaxres.data.prepare import archives, records
from jaxres.errors import DataError


def _records(
    classes: dict[str, dict[str, Any]],
    class_names: Sequence[str],
    keep: Callable[[str], bool] = lambda k: True,
) -> records.RecordList:
    """Records sorted by `class/file` (labels = positions in `class_names`)."""
    entries = []
    for label, name in enumerate(class_names):
        for file_name in sorted(classes.get(name, {})):
            key = f"{name}/{file_name}"
            if keep(key):
                entries.append((key, label, classes[name][file_name]))
    return records.RecordList(entries)


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
    found = archives.find_input(manual_dir, CALTECH101_ARCHIVES, "Caltech-101")
    classes, ignored = archives.class_files(
        archives.input_files(found, "101_ObjectCategories.tar.gz"),
        "101_ObjectCategories",
        CALTECH101_DROPPED,
    )
    notes = f"{len(classes)} classes; dropped {', '.join(CALTECH101_DROPPED)} (standard protocol)."
    out = Path(data_dir or manual_dir) / "caltech101"
    return _write_one_split(out, classes, found, notes, ignored, options)


def prepare_caltech256(
    manual_dir: str | os.PathLike,
    data_dir: str | os.PathLike | None = None,
    keep_clutter: bool = False,
    **options: Any,
) -> Path:
    """Caltech-256: 256 object classes (257.clutter dropped unless `keep_clutter`), one split "all"."""
    manual_dir = Path(manual_dir)
    found = archives.find_input(manual_dir, CALTECH256_ARCHIVES, "Caltech-256")
    dropped = () if keep_clutter else (CALTECH256_CLUTTER,)
    classes, ignored = archives.class_files(
        archives.input_files(found), "256_ObjectCategories", dropped
    )
    notes = f"{len(classes)} classes; " + (
        "kept 257.clutter." if keep_clutter else "dropped 257.clutter (standard protocol)."
    )
    out = Path(data_dir or manual_dir) / "caltech256"
    return _write_one_split(out, classes, found, notes, ignored, options)


def _write_one_split(
    out: Path, classes: dict[str, Any], found: Path, notes: str, ignored: Any, options: dict[str, Any]
) -> Path:
    """Writes every image of `classes` as the one split "all" (the Caltech protocols sample from it)."""
    names = sorted(classes)
    records.write_record_dataset(
        out, {"all": _records(classes, names)}, names, source=str(found), notes=notes, ignored=ignored, **options
    )
    return out


def prepare_indoor67(
    manual_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None, **options: Any
) -> Path:
    """MIT Indoor-67 with the official 80/20 lists: splits "train" (5,360) and "test" (1,340)."""
    manual_dir = Path(manual_dir)
    found = archives.find_input(manual_dir, INDOOR67_ARCHIVES, "MIT Indoor-67")
    lists = {}
    for split, file_name in INDOOR67_LISTS.items():
        path = manual_dir / file_name
        if not path.is_file():
            raise DataError(
                f"MIT Indoor-67 needs the official split list {path} (with {', '.join(INDOOR67_LISTS.values())})."
            )
        lists[split] = set(sources.read_list_file(path))
    classes, ignored = archives.class_files(archives.input_files(found), "Images")
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
    records.write_record_dataset(
        out,
        splits,
        names,
        source=str(found),
        notes="Official TrainImages / TestImages lists.",
        ignored=ignored,
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
    Files that are not images are listed in `skipped`; a class folder without
    images keeps its label (and is warned about).
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
    if folder.empty_classes:
        notes += f" Class folders without images (labels kept): {', '.join(folder.empty_classes)}."
    records.write_record_dataset(
        out,
        parts,
        folder.class_names,
        source=str(manual_dir),
        notes=notes,
        ignored=folder.ignored,
        **options,
    )
    return out


def prepare_imagenet2012(
    manual_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    resize_shorter: int | None = None,
    jpeg_quality: int = records.RESIZED_JPEG_QUALITY,
    num_workers: int = 0,
    overwrite: bool = False,
    truncated: str = "keep",
) -> Path:
    """ImageNet-1k from the two official tars via the tfds builder (array_record); optional resized copy.

    `truncated` ("keep" / "skip") applies to the resized copy; the tfds builder decodes with TensorFlow.

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
    records.write_record_dataset(
        out,
        splits,
        splits["train"].class_names,
        source=f"tfds imagenet2012 in {data_dir}",
        notes=f"Shorter side resized to {resize_shorter} (bicubic, antialiased; smaller images kept), JPEG q{jpeg_quality}.",
        resize_shorter=resize_shorter,
        jpeg_quality=jpeg_quality,
        num_workers=num_workers,
        overwrite=overwrite,
        truncated=truncated,
    )
    return out


DATASETS = {
    "imagenet2012": prepare_imagenet2012,
    "caltech101": prepare_caltech101,
    "caltech256": prepare_caltech256,
    "indoor67": prepare_indoor67,
    "imagefolder": prepare_imagefolder,
}
