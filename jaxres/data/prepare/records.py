"""The array_record dataset writer: record sources -> an `ArrayRecordSource` dataset.

Read back by `sources.ArrayRecordSource` (record format documented in sources.py).

Every image is checked on the way in: JPEGs in RGB / grey are stored as they
are; CMYK, palette, PNG, GIF ... are re-encoded as RGB JPEG at
`PREPARE_JPEG_QUALITY`; a file that cannot be decoded at all is left out. A
truncated file follows `truncated`: "keep" stores what decodes (re-encoded),
"skip" leaves it out. Writing the same dataset again is a no-op once its
metadata file exists.

The metadata names every file left out or kept damaged, as `{"key", "reason"}`
entries: `splits[<split>]["skipped"]` for the split's images (reasons such as
"0-byte file", "truncated", "truncated, kept as decoded"), and the
dataset-level `skipped` for files found while walking the input that are not
images at all (".txt", ".DS_Store", ...), passed in as `ignored`. Metadata
written before lists plain keys; `sources.skipped_entries` reads both.
"""

from __future__ import annotations

import collections
import io
import json
import logging
import math
import multiprocessing
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from jaxres.data import decode, sources, transforms
from jaxres.errors import DataError

log = logging.getLogger(__name__)

PREPARE_JPEG_QUALITY = 95  # Re-encoding non-JPEG / CMYK images (nearly lossless).
RESIZED_JPEG_QUALITY = 90  # Pre-resized copies (`resize_shorter`).
RECORDS_PER_SHARD = 10_000


class RecordList:
    """A random-access list of records built from (key, label, reader) triples."""

    def __init__(self, entries: Sequence[tuple[str, int, Callable[[], bytes]]]):
        self._entries = list(entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> dict[str, Any]:
        key, label, read = self._entries[index]
        return {"image": read(), "label": label, "key": key}


TRUNCATED_KEPT = "truncated, kept as decoded"
TRUNCATED_SKIPPED = "truncated"


def check_image(
    image_bytes: bytes,
    resize_shorter: int | None = None,
    quality: int = PREPARE_JPEG_QUALITY,
    key: str = "?",
    truncated: str = "keep",
) -> tuple[bytes | None, str]:
    """(the bytes to store or None to leave the image out, why: "" when nothing is wrong).

    A complete RGB / grey JPEG that needs no resizing is kept byte for byte;
    anything else (CMYK, PNG, GIF, truncated, or larger than `resize_shorter`)
    is decoded and re-encoded as an RGB JPEG at `quality`. A truncated file is
    re-encoded as far as it decodes with `truncated="keep"`, left out with "skip".
    """
    try:
        header = Image.open(io.BytesIO(image_bytes))  # Reads the header only.
    except Exception as e:  # noqa: BLE001 - zero bytes, garbage: reported by the caller.
        return None, decode.undecodable_reason(image_bytes, e)
    size = header.size
    shrink = bool(resize_shorter) and min(size) > resize_shorter
    if header.format == "JPEG" and header.mode in ("RGB", "L") and not shrink:
        try:
            header.load()  # The whole file must decode, or it is re-encoded below.
            return image_bytes, ""
        except Exception as e:  # noqa: BLE001
            log.debug("%s does not decode fully (%s); re-encoding what does.", key, e)
    target = transforms.shorter_side_size(*size, resize_shorter) if shrink else None
    draft = None
    if target is not None:
        scale = decode.dct_scale((0, 0, *size), target)
        draft = (math.ceil(size[0] / scale), math.ceil(size[1] / scale)) if scale > 1 else None
    try:
        image = decode.pil_open(image_bytes, key, draft, truncated)
    except decode.TruncatedImageError:
        return None, TRUNCATED_SKIPPED
    except Exception as e:  # noqa: BLE001 - undecodable: reported by the caller.
        return None, decode.undecodable_reason(image_bytes, e)
    note = TRUNCATED_KEPT if image.info.get(decode.TRUNCATED_INFO) else ""
    if target is not None:
        image = image.resize(target, Image.Resampling.BICUBIC)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue(), note


def _check_task(args: tuple[bytes, int | None, int, str, str]) -> tuple[bytes | None, str]:
    return check_image(*args)


def _map(fn: Callable, items: Iterable, num_workers: int) -> Iterable:
    """`map` in order, over `num_workers` spawned processes (0 = in this process)."""
    if num_workers <= 0:
        yield from map(fn, items)
        return
    # spawn, not fork: the parent may hold TensorFlow / tfds threads.
    with multiprocessing.get_context("spawn").Pool(num_workers) as pool:
        yield from pool.imap(fn, items, chunksize=8)


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

    # Imported here, not at the top: the spawned workers import this module and need no JAX.
    from jaxres.console import progress_bar

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
            yield (
                record["image"],
                options["resize_shorter"],
                options["jpeg_quality"],
                record["key"],
                options["truncated"],
            )

    labels, skipped = [], []
    results = _map(_check_task, tasks(), num_workers)
    for i, (data, reason) in enumerate(
        progress_bar(results, n, f"{directory.name}/{split}", unit="img")
    ):
        key, label = pending.popleft()
        if reason:
            skipped.append({"key": key, "reason": reason})
        if data is None:
            log.warning("Skipping image %s: %s", key, reason)
            continue
        if reason:
            log.warning("Keeping image %s: %s", key, reason)
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
    truncated: str = "keep",
    ignored: Sequence[tuple[str, str]] = (),
) -> dict[str, Any]:
    """Writes `splits` ({name: record source}) as an `ArrayRecordSource` dataset in `directory`.

    Idempotent: when `directory` already holds a dataset written with the same
    options it is left alone (pass `overwrite=True` to write it again). The
    dataset is written to `directory.tmp` and renamed at the end, so an
    interrupted run never leaves a half dataset behind.

    Args:
      truncated: "keep" (store what decodes) or "skip" a truncated image; named either way.
      ignored: (key, reason) of input files that are not images, listed in `skipped`.

    Returns:
      The metadata (also saved as `directory/jaxres_dataset.json`).
    """
    directory = Path(directory)
    options = {
        "resize_shorter": resize_shorter,
        "jpeg_quality": jpeg_quality,
        "truncated": decode.check_truncated(truncated),
    }
    existing = sources.read_metadata(directory)
    if existing is None and directory.exists() and any(directory.iterdir()):
        # Never replace a folder we did not write (it may be the user's images).
        raise DataError(
            f"{directory} exists and is not a prepared dataset; pick another --data_dir or --name, "
            "or remove that folder."
        )
    if existing is not None and not overwrite:
        # Datasets written before `truncated` existed were written as "keep".
        if {"truncated": "keep", **existing.get("options", {})} != options or sorted(
            existing["splits"]
        ) != sorted(splits):
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
        "skipped": [{"key": key, "reason": reason} for key, reason in ignored],
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
