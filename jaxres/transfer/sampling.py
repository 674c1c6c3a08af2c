"""Transfer protocol draws: N images per class x seeded trials, few-shot, official splits.

Two kinds of protocol (`config.protocol.kind`):

* "pool": the listed splits are pooled; each trial draws N train images per
  class and up to (or exactly) `test_per_class` test images per class from the
  rest (Caltech-101 / Caltech-256 style, Fei-Fei et al. 2004, Griffin et al. 2007);
* "split": N train images per class drawn from `dataset.train_split` (N = 0: all
  of it) and the whole `dataset.val_split` as test set (few-shot; Indoor-67's
  official lists).

Every trial's seed is `protocol.seed + trial` (recorded in the results); the same
trial index draws the same per-class permutation for every N, so a trial's
15-image train set is inside its 30-image one.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import ml_collections
import numpy as np

from jaxres.errors import DataError

KINDS = ("pool", "split")


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


def draw_trials(
    config: ml_collections.ConfigDict,
    per_class: Sequence[int],
    train_y: np.ndarray,
    test_y: np.ndarray | None,
    names: list[str],
) -> list[Trial]:
    """The protocol's trials at each of `per_class` (`config_transfer.lists(config).per_class`),
    checked: enough images in every class."""
    p = config.protocol
    where = f"{config.dataset.name} ({p.pool_splits if p.kind == 'pool' else config.dataset.train_split})"
    if p.kind == "pool":
        return sample_pool_trials(
            train_y, names, per_class, p.test_per_class, p.test_at_most, p.trials, p.seed, where
        )
    return sample_split_trials(train_y, len(test_y), names, per_class, p.trials, p.seed, where)
