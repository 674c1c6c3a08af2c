"""Transfer protocols: N images per class x seeded trials, few-shot, official splits.

    python scripts/linear_probe.py --config configs/transfer/caltech101.py --workdir W \
        --config.model.checkpoint=runs/r50

Two kinds of protocol (`config.protocol.kind`):

* "pool": the listed splits are pooled; each trial draws N train images per
  class and up to (or exactly) `test_per_class` test images per class from the
  rest (Caltech-101 / Caltech-256 style, Fei-Fei et al. 2004, Griffin et al. 2007);
* "split": N train images per class drawn from the train split (N = 0: all of
  it) and the whole test split as test set (few-shot; Indoor-67's official lists).

Every trial's seed is `protocol.seed + trial` (recorded in the results); the same
trial index draws the same per-class permutation for every N, so a trial's
15-image train set is inside its 30-image one. Features are extracted once per
split (cached, `jaxres.features`), then every N x trial x probe runs on them;
results are mean +- sample std over trials of top-1 and mean per-class accuracy.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxres import evaluate, features, parallel, probe
from jaxres.config_base import base_config
from jaxres.data import sources
from jaxres.errors import ConfigError, DataError, unknown_name
from jaxres.metrics import log_line

KINDS = ("pool", "split")


def base_transfer_config() -> ml_collections.ConfigDict:
    """Every key of a transfer / linear-probe config, with defaults; configs/transfer/*.py start here."""
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict()
    c.model.checkpoint = ""  # A run directory (training run or imported weights).
    c.model.step = "latest"  # "latest", "best" or a step number.

    c.dataset = (
        base_config().dataset
    )  # name, data_dir, ... as for training (read with open_source).
    c.dataset.name = "digits"
    c.dataset.data_dir = "~/.cache/jaxres"
    c.dataset.val_split = "test"

    c.features = ml_collections.ConfigDict()
    c.features.layer = features.DEFAULT_LAYER
    c.features.pool = True  # Global-average-pool spatial layers.
    c.features.views = "center"  # center | flip | 10crop (averaged).
    c.features.image_size = 0  # 0: the checkpoint's image_size.
    c.features.crop_ratio = 0.0  # 0: the checkpoint's eval_crop_ratio.
    c.features.batch_size = 64
    c.features.cache_dir = ""  # "": WORKDIR/features.

    c.protocol = ml_collections.ConfigDict()
    c.protocol.kind = "split"  # pool | split (see jaxres/protocols.py).
    c.protocol.per_class = "0"  # Comma-separated train images per class; 0 = all (split kind).
    c.protocol.test_per_class = 0  # pool kind: test images per class.
    c.protocol.test_at_most = True  # pool kind: "up to" test_per_class (the rest when fewer).
    c.protocol.trials = 1
    c.protocol.seed = 0
    c.protocol.pool_splits = "all"  # pool kind: the splits pooled (prepare_data.py writes "all").
    c.protocol.train_split = "train"  # split kind.
    c.protocol.test_split = "test"  # split kind.
    c.protocol.exclude_classes = ""  # Comma-separated class names left out (e.g. clutter).

    c.probe = ml_collections.ConfigDict()
    c.probe.methods = "logistic,ridge"  # The first one draws the confusion matrix.
    c.probe.logistic_l2s = ""  # Comma-separated; "": jaxres.probe.LOGISTIC_L2S.
    c.probe.ridge_l2s = ""  # Relative penalties; "": jaxres.probe.RIDGE_L2S.
    c.probe.holdout = 0.2  # Fraction of each class's train images that picks the L2.
    c.probe.tol = 1e-4  # Logistic: max |gradient| at convergence (scikit-learn's default).
    c.probe.max_iter = 1000
    return c


def parse_list(text: str | int, kind: type = int, name: str = "value") -> list:
    """ "15,30" -> [15, 30] (an int passes through)."""
    if isinstance(text, (int, float)):
        return [kind(text)]
    try:
        return [kind(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ConfigError(
            f"config.{name}={text!r}: expected comma-separated {kind.__name__}s, e.g. '15,30'."
        ) from None


@dataclasses.dataclass
class Trial:
    """One draw: indices into the pool (pool kind) or the train / test splits (split kind)."""

    per_class: int
    trial: int
    seed: int
    train: np.ndarray
    test: np.ndarray


def check_class_counts(
    labels: np.ndarray, class_names: Sequence[str], needed: int, what: str, where: str
) -> None:
    """DataError naming the first class with no images, or fewer than `needed`."""
    counts = np.bincount(labels, minlength=len(class_names))
    empty, short = np.flatnonzero(counts == 0), np.flatnonzero(counts < max(needed, 1))
    if len(empty):
        c = empty[0]
        raise DataError(
            f"Class {class_names[c]!r} has no images in {where}; add images, delete its folder, or "
            f"leave it out with --config.protocol.exclude_classes={class_names[c]}."
        )
    if len(short):
        c = short[0]
        more = f" ({len(short) - 1} more classes are short)" if len(short) > 1 else ""
        raise DataError(
            f"Class {class_names[c]!r} has {counts[c]} images in {where} but the protocol needs {what}{more}; "
            "lower --config.protocol.per_class (or test_per_class), or exclude it with --config.protocol.exclude_classes."
        )


def _classes(labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
    return [np.flatnonzero(labels == c) for c in range(num_classes)]


def sample_pool_trials(
    labels: np.ndarray,
    class_names: Sequence[str],
    per_class: Sequence[int],
    test_per_class: int,
    test_at_most: bool,
    trials: int,
    seed: int,
    where: str = "the pool",
) -> list[Trial]:
    """Per class and trial: N train and (up to) `test_per_class` test images, disjoint, seeded."""
    min_test = 1 if test_at_most else test_per_class
    need = max(per_class) + min_test
    check_class_counts(
        labels,
        class_names,
        need,
        f"{max(per_class)} train + {'at least 1' if test_at_most else test_per_class} test",
        where,
    )
    by_class = _classes(labels, len(class_names))
    out = []
    for n in per_class:
        for t in range(trials):
            rng = np.random.default_rng(seed + t)
            train, test = [], []
            for idx in by_class:
                perm = rng.permutation(idx)
                train.append(perm[:n])
                test.append(perm[n : n + test_per_class])
            out.append(
                Trial(n, t, seed + t, np.sort(np.concatenate(train)), np.sort(np.concatenate(test)))
            )
    return out


def sample_split_trials(
    train_labels: np.ndarray,
    num_test: int,
    class_names: Sequence[str],
    per_class: Sequence[int],
    trials: int,
    seed: int,
    where: str = "the train split",
) -> list[Trial]:
    """Per trial: N train images per class from the train split (0 = all, one trial); all test images."""
    check_class_counts(
        train_labels, class_names, max(per_class), f"{max(per_class)} train images", where
    )
    by_class = _classes(train_labels, len(class_names))
    out = []
    for n in per_class:
        for t in range(trials if n else 1):
            rng = np.random.default_rng(seed + t)
            train = np.concatenate([rng.permutation(idx)[:n] if n else idx for idx in by_class])
            out.append(Trial(n, t, seed + t, np.sort(train), np.arange(num_test)))
    return out


def make_probe(
    method: str, probe_config: ml_collections.ConfigDict, seed: int
) -> probe.LinearProbe:
    """A probe from `config.probe` (`method` is "logistic" or "ridge")."""
    if method not in probe.PROBES:
        raise ConfigError(unknown_name("config.probe.methods entry", method, probe.PROBES))
    l2s = parse_list(probe_config[f"{method}_l2s"], float, f"probe.{method}_l2s") or None
    if method == "ridge":
        return probe.RidgeProbe(l2s, holdout=probe_config.holdout, seed=seed)
    return probe.LogisticProbe(
        l2s,
        holdout=probe_config.holdout,
        seed=seed,
        tol=probe_config.tol,
        max_iter=probe_config.max_iter,
    )


def fit_and_score(
    method: str,
    probe_config: ml_collections.ConfigDict,
    seed: int,
    train: tuple,
    test: tuple,
    num_classes: int,
    mesh: jax.sharding.Mesh,
) -> tuple[dict[str, Any], np.ndarray]:
    """Fits one probe on (x, y) `train`, scores it on `test`; returns (row, test predictions)."""
    start = time.perf_counter()
    x_train, train_mask = probe.shard_rows(train[0], mesh)
    model = make_probe(method, probe_config, seed).fit(x_train, train[1], train_mask, num_classes)
    x_test, test_mask = probe.shard_rows(test[0], mesh)
    scores = model.score(x_test, test[1], test_mask)
    predictions = model.predict(x_test)[: len(test[1])]
    row = dict(
        scores, l2=model.l2_, l2_source=model.l2_source_, seconds=time.perf_counter() - start
    )
    return row, predictions


def summarise(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean and sample std (ddof=1; 0 for one trial) of top1 and mean_per_class."""
    out = {}
    for key in ("top1", "mean_per_class"):
        values = np.asarray([r[key] for r in rows])
        out[f"{key}_mean"] = float(values.mean())
        out[f"{key}_std"] = float(values.std(ddof=1)) if len(values) > 1 else 0.0
    out["trials"] = len(rows)
    return out


def _split_features(config, extractor, split: str, cache_dir: str):
    source = sources.open_source(config.dataset, split)
    name = {
        "name": config.dataset.name,
        "data_dir": os.path.abspath(os.path.expanduser(config.dataset.data_dir)),
        "split": split,
    }
    x, y, mask = features.cached_features(
        extractor, source, name, cache_dir, config.features.batch_size
    )
    return x, y.astype(np.int64), mask, list(source.class_names)


def _keep_classes(class_names: list[str], exclude: str) -> list[int]:
    excluded = set(parse_list(exclude, str, "protocol.exclude_classes"))
    for name in excluded:
        if name not in class_names:
            raise ConfigError(
                unknown_name("class in config.protocol.exclude_classes", name, class_names)
            )
    return [i for i, n in enumerate(class_names) if n not in excluded]


def _relabel(x, y, mask, keep: list[int], num_classes: int):
    """Drops undecodable images and excluded classes; class ids become positions in `keep`."""
    new_id = np.full(num_classes, -1)
    new_id[keep] = np.arange(len(keep))
    valid = (mask > 0) & (new_id[y] >= 0)
    return x[valid], new_id[y[valid]]


def load_data(
    config: ml_collections.ConfigDict, extractor: features.FeatureExtractor, cache_dir: str
):
    """The protocol's features: (pool or train, test or None, class names)."""
    p = config.protocol
    if p.kind not in KINDS:
        raise ConfigError(unknown_name("config.protocol.kind", p.kind, KINDS))
    splits = (
        parse_list(p.pool_splits, str, "protocol.pool_splits")
        if p.kind == "pool"
        else [p.train_split, p.test_split]
    )
    loaded = [_split_features(config, extractor, s, cache_dir) for s in splits]
    class_names = loaded[0][3]
    keep = _keep_classes(class_names, p.exclude_classes)
    parts = [_relabel(x, y, m, keep, len(class_names)) for x, y, m, _ in loaded]
    names = [class_names[i] for i in keep]
    if p.kind == "pool":
        return (
            (np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts])),
            None,
            names,
        )
    return parts[0], parts[1], names


def draw_trials(
    config: ml_collections.ConfigDict,
    train_y: np.ndarray,
    test_y: np.ndarray | None,
    names: list[str],
) -> list[Trial]:
    """The protocol's trials (checked: enough images in every class)."""
    p = config.protocol
    per_class = parse_list(p.per_class, int, "protocol.per_class")
    if not per_class or min(per_class) < 0 or (p.kind == "pool" and min(per_class) < 1):
        raise ConfigError(
            f"config.protocol.per_class={p.per_class!r}: give positive counts, e.g. '15,30'."
        )
    where = f"{config.dataset.name} ({p.pool_splits if p.kind == 'pool' else p.train_split})"
    if p.kind == "pool":
        return sample_pool_trials(
            train_y, names, per_class, p.test_per_class, p.test_at_most, p.trials, p.seed, where
        )
    return sample_split_trials(train_y, len(test_y), names, per_class, p.trials, p.seed, where)


def run_protocol(
    config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh | None = None
) -> dict[str, Any]:
    """Features once (cached), then every N x trial x probe; writes results.json / .csv / confusion.png.

    Args:
      config: a config from configs/transfer/ (keys: `base_transfer_config()`).
      workdir: where results and (by default) the feature cache go.
      mesh: of the feature extraction (default: every device); probes fit on `probe.fit_mesh(mesh)`.

    Returns:
      The results dict written to `workdir/results.json`.
    """
    if not config.model.checkpoint:
        raise ConfigError(
            "Set --config.model.checkpoint=RUN (a training run or an imported model directory)."
        )
    mesh = mesh if mesh is not None else parallel.make_mesh()
    step = config.model.step if config.model.step in ("latest", "best") else int(config.model.step)
    member = evaluate.load_member(config.model.checkpoint, step)
    f = config.features
    extractor = features.FeatureExtractor(
        member, f.layer, f.pool, f.views, f.image_size or None, f.crop_ratio or None, mesh
    )
    cache_dir = f.cache_dir or os.path.join(workdir, "features")
    (train_x, train_y), test, names = load_data(config, extractor, cache_dir)
    trials = draw_trials(config, train_y, None if test is None else test[1], names)
    methods = parse_list(config.probe.methods, str, "probe.methods")
    rows, best = [], None
    for trial in trials:
        test_x, test_y = (train_x, train_y) if test is None else test
        for method in methods:
            row, predictions = fit_and_score(
                method,
                config.probe,
                trial.seed,
                (train_x[trial.train], train_y[trial.train]),
                (test_x[trial.test], test_y[trial.test]),
                len(names),
                probe.fit_mesh(mesh),
            )
            row.update(
                method=method,
                per_class=trial.per_class,
                trial=trial.trial,
                seed=trial.seed,
                n_train=len(trial.train),
                n_test=len(trial.test),
            )
            rows.append(row)
            log_line(
                f"{method} N={trial.per_class} trial {trial.trial}: top-1 {row['top1']:.4f} "
                f"mean per-class {row['mean_per_class']:.4f} (l2 {row['l2']:.3g}, {row['seconds']:.1f} s)"
            )
            if method == methods[0] and (
                best is None
                or (row["per_class"], row["top1"]) > (best[0]["per_class"], best[0]["top1"])
            ):
                best = (row, test_y[trial.test], predictions)
    results = _results(config, member, extractor, names, methods, rows)
    if jax.process_index() == 0:
        write_outputs(workdir, results, rows, best, names)
    return results


def _results(config, member, extractor, names, methods, rows) -> dict[str, Any]:
    summary = {
        method: {
            str(n): summarise([r for r in rows if r["method"] == method and r["per_class"] == n])
            for n in sorted({r["per_class"] for r in rows if r["method"] == method})
        }
        for method in methods
    }
    return {
        "protocol": config.protocol.to_dict(),
        "dataset": {"name": config.dataset.name, "num_classes": len(names)},
        "model": {
            "run": os.path.abspath(member.run),
            "step": member.step,
            "name": member.config.model.name,
        },
        "features": {
            "layer": extractor.layer,
            "views": extractor.views,
            "image_size": extractor.image_size,
        },
        "probe": config.probe.to_dict(),
        "summary": summary,
        "trials": rows,
    }


def table(results: dict[str, Any]) -> str:
    """The results as published tables print them: a row per N, mean +- std over trials."""
    title = (
        f"{results['dataset']['name']} linear probe ({results['dataset']['num_classes']} classes), "
        f"{results['model']['name']} step {results['model']['step']}, {results['features']['layer']}"
    )
    lines = [
        title,
        f"{'probe':<10}{'train/class':>12}{'trials':>8}{'top-1 (%)':>16}{'mean per-class (%)':>22}",
    ]
    for method, by_n in results["summary"].items():
        for n, s in by_n.items():
            lines.append(
                f"{method:<10}{'all' if n == '0' else n:>12}{s['trials']:>8}"
                f"{100 * s['top1_mean']:>10.1f} ± {100 * s['top1_std']:<4.1f}"
                f"{100 * s['mean_per_class_mean']:>16.1f} ± {100 * s['mean_per_class_std']:<4.1f}"
            )
    return "\n".join(lines)


def write_outputs(
    workdir: str, results: dict[str, Any], rows: list[dict], best: tuple, names: list[str]
) -> None:
    """results.json, results.csv (one row per trial and probe), confusion.png; prints the table."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f, indent=2)
    with open(os.path.join(workdir, "results.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    row, labels, predictions = best
    title = (
        f"{row['method']} N={row['per_class']} trial {row['trial']}: top-1 {100 * row['top1']:.1f}%"
    )
    confusion_image(labels, predictions, names, title).save(os.path.join(workdir, "confusion.png"))
    log_line(table(results))


def confusion_image(labels: np.ndarray, predictions: np.ndarray, names: Sequence[str], title: str):
    """A row-normalised confusion matrix as a PIL image (rows: true class, columns: predicted)."""
    from PIL import Image, ImageDraw

    c = len(names)
    counts = np.zeros((c, c))
    np.add.at(counts, (labels, predictions), 1)
    rates = counts / np.maximum(counts.sum(1, keepdims=True), 1)
    cell = max(2, min(24, 720 // c))
    label_w = 110 if c <= 40 else 0
    top = 24
    heat = (255 * (1 - rates)).astype(np.uint8)  # White = 0, black = every image.
    heat = np.kron(heat, np.ones((cell, cell), np.uint8))
    image = Image.new("RGB", (label_w + heat.shape[1] + 8, top + heat.shape[0] + 8), "white")
    image.paste(Image.fromarray(heat, "L").convert("RGB"), (label_w, top))
    draw = ImageDraw.Draw(image)
    draw.text((4, 4), title + "  (rows: true, columns: predicted)", fill="black")
    if label_w:
        for i, name in enumerate(names):
            draw.text((2, top + i * cell + max(0, cell - 11) // 2), str(name)[:16], fill="black")
    return image


def demo_probe(
    workdir: str, data_dir: str | None = None, checkpoint: str = "best", method: str = "logistic"
) -> dict[str, Any]:
    """A linear probe on a run's pre_logits features: fit on its train split, score on its val split.

    For `make demo`'s results table (the digits demo: under 30 s on 2 cores; features
    cached in `workdir/features`, so a second call skips the forward passes).

    Returns:
      One row: what, top1, mean_per_class, count (val images), train, l2, l2_source.
    """
    config = base_transfer_config()
    config.dataset = evaluate.run_config(workdir).dataset
    if data_dir:
        config.dataset.data_dir = data_dir
    config.protocol.train_split, config.protocol.test_split = (
        config.dataset.train_split,
        config.dataset.val_split,
    )
    member = evaluate.load_member(workdir, checkpoint)
    extractor = features.FeatureExtractor(member)
    (train_x, train_y), (test_x, test_y), names = load_data(
        config, extractor, os.path.join(workdir, "features")
    )
    row, _ = fit_and_score(
        method,
        config.probe,
        0,
        (train_x, train_y),
        (test_x, test_y),
        len(names),
        probe.fit_mesh(),
    )
    return {
        "what": f"linear probe ({method}, pre_logits, {len(train_y)} train)",
        "top1": row["top1"],
        "mean_per_class": row["mean_per_class"],
        "count": len(test_y),
        "train": len(train_y),
        "l2": row["l2"],
        "l2_source": row["l2_source"],
    }
