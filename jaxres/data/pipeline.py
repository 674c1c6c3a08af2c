"""grain input pipelines: deterministic, resumable, sharded per process.

Training reads one endless stream of examples: the source shuffled with a new
seed every epoch (`MapDataset.shuffle` reseeds per pass over the data), each
example augmented with an RNG derived from its stream index. Batch `b` of the
global stream holds examples `[b * B, (b + 1) * B)`; process `p` of `P` loads
rows `[p * B/P, (p + 1) * B/P)` of it. So:

* a batch is a pure function of (seed, batch index): the same whatever the
  number of worker processes, and the same global batch whatever the number
  of hosts;
* the iterator position is one integer, the next batch index, stored in the
  checkpoint; resuming starts the stream there (`dataset[position:]`).

Repeated augmentation (`augment.repeated_aug = K`, Hoffer et al. 2020, timm's
`RepeatAugSampler`): the shuffled stream holds each record K times in a row,
each copy augmented with its own stream index's RNG, so the copies usually sit
in the same global batch (BatchNorm and the loss see them together, on any
number of processes; the processes' rows stay disjoint positions of one
stream). As timm, an epoch stays `len(source)` stream positions: one pass over
the shuffled records spans K epochs, and each record appears exactly K times in it.

Evaluation pads the split to a whole number of global batches with masked
examples, so every example is counted exactly once on any number of hosts.

A record that cannot be decoded arrives with `mask = 0` (see decode.py);
training batches have no padding, so their rows with mask 0 are the
undecodable records, counted correctly across grain worker processes.

Worker processes (`num_workers > 0`) receive the source and the transform by
pickling: both must be picklable (sources open files lazily), and a script
that starts them needs the usual `if __name__ == "__main__":` guard.

Both functions return a `workers.Batches`: close it (or use `with`) when
stopping early, so the worker processes end now; evaluation batches close
themselves when exhausted. A worker process that dies raises `DataError`
within a bound instead of hanging, and no shared memory outlives the program
(see workers.py).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

import grain
import numpy as np
from absl import flags

from jaxres.data import decode, workers

# Examples -> one batch; grain's default stacks every field.
BatchFn = Callable[[Sequence[Any]], Any]


def _process_rows(
    ds: grain.MapDataset,
    global_batch_size: int,
    process_index: int,
    process_count: int,
    batch_fn: BatchFn | None = None,
) -> grain.MapDataset:
    """Batches of this process's rows of each global batch."""
    local = global_batch_size // process_count
    return ds.batch(local, drop_remainder=True, batch_fn=batch_fn)[process_index::process_count]


def _iterate(ds: grain.MapDataset, num_workers: int, name: str) -> workers.Batches:
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=4, prefetch_buffer_size=8))
    if num_workers > 0:
        if not flags.FLAGS.is_parsed():
            # grain's workers read absl flags; a library caller (a notebook) parsed none.
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return workers.Batches(iter(it), num_workers, name)


class RepeatEach(grain.MapDataset):
    """Each element of `parent` `times` times in a row: element `i` is `parent[i // times]`."""

    def __init__(self, parent: grain.MapDataset, times: int):
        super().__init__(parent)
        self._times = times

    def __len__(self) -> int:
        return min(len(self._parent) * self._times, sys.maxsize)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[index // self._times]

    def __str__(self) -> str:
        return f"RepeatEach(times={self._times})"


def train_dataset(
    source: Any,
    transform: Callable[[dict, np.random.Generator], dict],
    *,
    global_batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    batch_fn: BatchFn | None = None,
    repeated_aug: int = 1,
) -> grain.MapDataset:
    """An endless, random-access dataset of this process's training batches.

    `repeated_aug` > 1: each record that many times in a row of the stream (see above).
    """
    ds = grain.MapDataset.source(source).shuffle(seed=seed).repeat(None)
    if repeated_aug > 1:
        ds = RepeatEach(ds, repeated_aug)
    ds = ds.random_map(transform, seed=seed + 1)
    return _process_rows(ds, global_batch_size, process_index, process_count, batch_fn)


def train_batches(
    source: Any,
    transform: Callable[[dict, np.random.Generator], dict],
    *,
    global_batch_size: int,
    seed: int,
    start: int = 0,
    num_workers: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    batch_fn: BatchFn | None = None,
    repeated_aug: int = 1,
) -> workers.Batches:
    """This process's training batches from batch index `start` on (endless; close it when done)."""
    ds = train_dataset(
        source,
        transform,
        global_batch_size=global_batch_size,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        batch_fn=batch_fn,
        repeated_aug=repeated_aug,
    )
    return _iterate(ds[start:], num_workers, "training")


class _Padded:
    """The split followed by masked placeholder records (a tiny black JPEG), up to `length`.

    Padding never re-reads a real record: a damaged first file is decoded (and logged) once.
    """

    def __init__(self, source: Any, length: int):
        self._source, self._length = source, length

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> tuple[dict[str, Any], bool]:
        if index < len(self._source):
            return self._source[index], True
        return {"image": decode.PLACEHOLDER_JPEG, "label": 0, "key": "padding"}, False


class _MaskPadding:
    def __init__(self, transform: Callable[[dict], dict]):
        self.transform = transform

    def __call__(self, item: tuple[dict[str, Any], bool]) -> dict[str, Any]:
        record, real = item
        example = self.transform(record)
        if not real:
            example["mask"] = np.float32(0)
        return example


def num_eval_batches(num_examples: int, global_batch_size: int) -> int:
    """Global batches needed to cover every example once."""
    return max(1, math.ceil(num_examples / global_batch_size))


def eval_batches(
    source: Any,
    transform: Callable[[dict], dict],
    *,
    global_batch_size: int,
    num_workers: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    batch_fn: BatchFn | None = None,
) -> workers.Batches:
    """This process's evaluation batches, padded and masked: every example counts once."""
    padded_len = num_eval_batches(len(source), global_batch_size) * global_batch_size
    ds = grain.MapDataset.source(_Padded(source, padded_len)).map(_MaskPadding(transform))
    ds = _process_rows(ds, global_batch_size, process_index, process_count, batch_fn)
    return _iterate(ds, num_workers, "evaluation")
