"""One command from a folder of images to a classifier: split, features, head, export, report.

    python scripts/transfer.py --images DIR --from RUN --output OUT [--val_fraction 0.2] \
        [--head logistic|ridge|mlp]

`DIR/<class>/<images>` is split per class (stratified, seeded; the lists are written
to `OUT/train.txt` and `OUT/val.txt`), or `DIR/train` + `DIR/val` (or `DIR/test`)
are used as they are. The run's features of `--layer` are computed once and cached
in `OUT/features` (a second call with another head skips the forward passes), the
head is fitted with its penalty sweep (or early stopping, MLP) on the train part,
scored on the validation part and exported into `OUT` as a run
(`jaxres.transfer.export`). `OUT` also gets the report (`jaxres.transfer.report`):
`results.json` (overall and per-class accuracy), `confusion.png` and `predictions.png`
(validation images, mistakes first). `--batch_size` (default: the run's
eval_batch_size) must divide over the devices, as every entry point's batch.
"""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxres import parallel, runs
from jaxres.config_base import base_config
from jaxres.config_transfer import DEFAULT_LAYER, base_transfer_config
from jaxres.data import embedded, sources
from jaxres.errors import CheckpointError, ConfigError, DataError
from jaxres.transfer import export, features, probe, report, runner

HEADS = ("logistic", "ridge", "mlp")


def split_dataset(images: str, output: str, val_fraction: float, seed: int) -> ml_collections.ConfigDict:
    """The dataset config of the folder: its own train / val(test) folders, or a stratified split.

    The split is written as list files `OUT/train.txt` / `OUT/val.txt` (`class/file`
    paths), which the dataset config names, so the exported run reads the same split.
    """
    root = Path(os.path.expanduser(images)).absolute()
    if not root.is_dir():
        raise DataError(f"--images {images!r} is not a folder; give DIR with DIR/<class>/<images>.")
    dataset = base_config().dataset
    dataset.name, dataset.data_dir = "imagefolder", str(root)
    held_out = next((s for s in ("val", "test") if (root / s).is_dir()), None)
    if (root / "train").is_dir() and held_out:
        dataset.train_split, dataset.val_split = "train", held_out
        return dataset
    if not 0 < val_fraction < 1:
        raise ConfigError(f"--val_fraction={val_fraction} must be in (0, 1).")
    folder = sources.ImageFolderSource(root)
    check_split_counts(folder.labels, folder.class_names, val_fraction, str(root))
    is_val = embedded.stratified_split(folder.labels, val_fraction, seed)
    os.makedirs(output, exist_ok=True)
    for split, chosen in (("train", ~is_val), ("val", is_val)):
        path = Path(output).absolute() / f"{split}{sources.LIST_FILE_SUFFIX}"
        path.write_text("".join(f"{k}\n" for k, c in zip(folder.keys, chosen) if c))
        dataset[f"{split}_split"] = str(path)
    return dataset


def check_split_counts(labels: np.ndarray, class_names: list[str], val_fraction: float, where: str) -> None:
    """DataError naming the first class that cannot give both a train and a validation image.

    An empty class folder is kept (its label stays, so class ids match the folder's; the
    source warns about it by name): it has nothing to split.
    """
    counts = np.bincount(labels, minlength=len(class_names))
    val = np.round(counts * val_fraction)
    short = np.flatnonzero((counts > 0) & ((val < 1) | (counts - val < 1)))
    if len(short):
        c = short[0]
        need = next(n for n in range(2, 10_000) if 1 <= round(n * val_fraction) <= n - 1)
        more = f" ({len(short) - 1} more classes are short)" if len(short) > 1 else ""
        if counts[c] == 1:  # No fraction splits one image.
            fix = f"add images to it (at least {need} for a {val_fraction:.0%} split), or move the folder out"
        else:
            fix = f"add images, or use --val_fraction=0.5 (it splits {counts[c]} images)"
        raise DataError(
            f"Class {class_names[c]!r} in {where} has {counts[c]} image(s); a {val_fraction:.0%} validation "
            f"split needs at least {need} per class{more}. Fix: {fix}."
        )


def _features(extractor, dataset, split: str, cache_dir: str, batch_size: int):
    source = sources.open_source(dataset, split)
    name = {"name": "imagefolder", "data_dir": dataset.data_dir, "split": split}
    if split.endswith(sources.LIST_FILE_SUFFIX):  # Another seed or fraction: other images, same path.
        name["list_sha256"] = hashlib.sha256(Path(split).read_bytes()).hexdigest()
    x, y, mask = features.cached_features(extractor, source, name, cache_dir, batch_size)
    return source, x[mask > 0], y[mask > 0].astype(np.int64), mask


def transfer_folder(
    images: str,
    from_run: str,
    output: str,
    *,
    head: str = "logistic",
    val_fraction: float = 0.2,
    checkpoint: str | int = "latest",
    layer: str = DEFAULT_LAYER,
    seed: int = 0,
    batch_size: int = 0,
    mesh: jax.sharding.Mesh | None = None,
) -> dict[str, Any]:
    """Fits a `head` on `from_run`'s features of the images in `images`; exports it as a run in `output`.

    Returns:
      The results written to `output/results.json`.
    """
    if head not in HEADS:
        raise ConfigError(f"--head={head!r}: use one of {', '.join(HEADS)}.")
    try:
        loaded = runs.load(from_run, checkpoint)
    except CheckpointError as e:
        raise CheckpointError(f"--from {from_run!r} is not a usable run: {e}") from None
    output = os.path.abspath(os.path.expanduser(output))
    dataset = split_dataset(images, output, val_fraction, seed)
    mesh = mesh if mesh is not None else parallel.make_mesh()
    extractor = features.FeatureExtractor(loaded, layer, mesh=mesh)
    export.check_exportable(extractor)
    batch_size = batch_size or loaded.config.eval_batch_size
    parallel.check_batch_size(batch_size, mesh, "--batch_size")
    start = time.perf_counter()
    cache = os.path.join(output, "features")
    _, x_train, y_train, _ = _features(extractor, dataset, dataset.train_split, cache, batch_size)
    val_source, x_val, y_val, val_mask = _features(extractor, dataset, dataset.val_split, cache, batch_size)
    feature_seconds = time.perf_counter() - start
    names = list(val_source.class_names)
    row, predictions, fitted = runner.fit_and_score(
        head, base_transfer_config().probe, seed, (x_train, y_train), (x_val, y_val), len(names), probe.fit_mesh(mesh)
    )
    info = {
        "method": head, "l2": row["l2"], "l2_source": row["l2_source"], "holdout_top1": row["holdout_top1"],
        "test_top1": row["top1"], "test_mean_per_class": row["mean_per_class"], "n_train": len(y_train),
        "n_test": len(y_val), "images": dataset.data_dir,
    }  # fmt: skip
    export.write_probe_run(loaded, extractor, fitted, names, dataset, output, info, overwrite=True)
    results = dict(
        info,
        run=output,
        backbone=loaded.run,
        layer=layer,
        per_class=report.per_class_accuracy(y_val, predictions, names),
        seconds={"features": feature_seconds, "head": row["seconds"]},
    )
    if jax.process_index() == 0:
        report.write_folder_report(
            output, results, y_val, predictions, fitted, x_val, val_source, val_mask, names
        )
    return results
