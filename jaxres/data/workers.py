"""Batches from grain's worker processes: a clean end, and a bounded failure when a worker dies.

`Batches` wraps the iterator of a grain pipeline (`pipeline.py` builds one) and
adds what grain 0.2.18 lacks at cluster scale, each found by experiment:

* **A dead worker** (SIGKILL, the kernel's OOM killer). grain notices a dead
  worker process when the stream reaches that worker's turn and raises a
  RuntimeError about 1 s later, but hangs for ever when the worker died while
  holding one of grain's cross-process locks (it takes its stop Event's lock on
  every element). So a fetch thread reads grain, and the caller waits at most
  `POLL_S` at a time: when no batch came and a worker process of this iterator
  has exited with a non-zero code, it raises `DataError` naming the worker (pid,
  signal) and the fix. The remaining workers are killed and the dead worker's
  orphaned locks replaced, so closing, and the interpreter's exit, cannot block
  on them. Bound: `DEAD_WORKER_BOUND_S` from the moment the stream needs the
  dead worker's next batch (grain's own check every 1 s or ours every `POLL_S`,
  then at most `FAIL_CLOSE_TIMEOUT_S` to stop the rest). Measured on 2 cores:
  1.1-1.2 s after a SIGKILL at a random moment (batches already buffered
  included), 1.1-2.1 s when the worker died holding grain's lock.
* **Shared memory.** grain hands out batches as `SharedMemoryArray`s (a /dev/shm
  block, unlinked by a thread pool when the array is garbage-collected). Blocks
  still held at interpreter exit (in the queues of an iterator never closed, or
  in the last batch a program still references) are deleted after grain's modules
  are torn down; that fails, and the resource tracker warns "There appear to be N
  leaked shared_memory objects". Batches are therefore copied into ordinary
  arrays in the fetch thread (one copy per batch, overlapped with the caller's
  work: ~3 ms of CPU for 64 x 224 x 224 x 3, about 4% of decoding it), grain's
  reference cycles that hold batches are collected at close, and iterators still
  open at exit are closed by an atexit hook, which runs before module teardown.
* **close()** stops the worker processes now: called when the stream ends, on
  `with`, on garbage collection and at exit; callers that stop early call it.
"""

from __future__ import annotations

import atexit
import gc
import logging
import multiprocessing
import queue
import re
import signal
import threading
import time
import traceback
import weakref
from collections.abc import Iterator
from multiprocessing import sharedctypes, synchronize
from typing import Any, Self

import numpy as np

from jaxres.errors import DataError

log = logging.getLogger(__name__)

POLL_S = 0.5  # The caller checks the workers' health this often while it waits for a batch.
CLOSE_TIMEOUT_S = 30.0  # Longest close() waits for the fetch thread (one batch in flight).
LOCK_PROBE_S = 0.1  # A cross-process lock still held after this long is held by a dead worker.
FAIL_CLOSE_TIMEOUT_S = 1.0  # After a dead worker, the longest wait for the fetch thread.
DEAD_WORKER_BOUND_S = 3.0  # A dead worker's DataError arrives within this (see above).
FIX = (
    "re-run the same command to resume from the last checkpoint; "
    "lower input.num_workers if workers run out of memory."
)
_GRAIN_DEAD_WORKER = re.compile(r"terminated unexpectedly with exit code (-?\d+)")
_CLAIMED: set[int] = set()  # Worker pids owned by some open `Batches`.
_OPEN: weakref.WeakSet[Batches] = weakref.WeakSet()


class Batches(Iterator[Any]):
    """An iterator over a grain pipeline's batches that can be closed, and fails fast.

    Args:
      iterator: the grain iterator (of an `mp_prefetch`ed dataset when `num_workers`).
      num_workers: its worker processes; 0 reads in the calling thread, as grain does.
      name: the pipeline's name in messages ("training", "evaluation").
    """

    def __init__(self, iterator: Iterator[Any], num_workers: int = 0, name: str = "input"):
        self._it, self._num_workers, self._name = iterator, num_workers, name
        self._workers: dict[int, Any] = {}  # pid -> multiprocessing.Process (grain's).
        self._known = {p.pid for p in multiprocessing.active_children()}
        self._results: queue.Queue = queue.Queue(maxsize=1)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._done = False  # Exhausted, failed or closed: raise StopIteration from now on.
        self._failed = False  # A worker died; the fetch thread may be stuck in grain for good.
        _OPEN.add(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def __next__(self) -> Any:
        if self._done:
            raise StopIteration
        if not self._num_workers:
            try:
                return next(self._it)
            except BaseException:
                self.close()
                raise
        if self._thread is None:
            self._thread = threading.Thread(
                target=_fetch,
                args=(self._it, self._results, self._stop),
                daemon=True,  # Never joined at exit: a wedged grain cannot block it.
                name=f"jaxres-{self._name}-batches",
            )
            self._thread.start()
        while True:
            self._adopt_workers()
            try:
                ok, item = self._results.get(timeout=POLL_S)
            except queue.Empty:
                dead = self._dead_worker()
                if dead is not None:
                    self._fail_dead_worker(self._dead_worker_error(*dead))
                continue
            if ok:
                return item
            error = self._translate(item)
            if error is not item:
                self._fail_dead_worker(error)
            self.close()  # Exhausted, or an error from the pipeline: pass it on.
            raise item

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Stops the worker processes and releases their shared memory (idempotent).

        Args:
          timeout: longest wait for a batch the fetch thread is still reading.
        """
        if getattr(self, "_it", None) is None:
            return
        it, thread, self._it = self._it, self._thread, None
        self._done = True
        self._stop.set()
        if thread is None:
            _close_quietly(it)  # No fetch thread: nothing else touches the grain iterator.
        else:
            _drain(self._results)  # Unblocks a fetch thread waiting to hand over a batch.
            thread.join(timeout)  # The thread closes grain once its batch is done.
            if thread.is_alive() and not self._failed:
                log.warning(
                    "The %s input pipeline's fetch thread is still reading after %.0f s; "
                    "leaving it to finish.", self._name, timeout
                )
            _drain(self._results)
            # grain leaves reference cycles: the StopIteration of an exhausted worker holds
            # the frame that holds that worker's last batch (in shared memory). Free them now,
            # while grain can still release the memory, not at interpreter exit, when it cannot.
            gc.collect()
            _wait_for_unlinks()
        _CLAIMED.difference_update(self._workers)
        _OPEN.discard(self)

    # ------------------------------------------------------------------ internals

    def _adopt_workers(self) -> None:
        """Remembers the worker processes this iterator's grain started (they start lazily)."""
        if len(self._workers) >= self._num_workers:
            return
        for process in multiprocessing.active_children():
            pid = process.pid
            if pid not in self._known and pid not in _CLAIMED:
                self._workers[pid] = process
                _CLAIMED.add(pid)
            self._known.add(pid)

    def _dead_worker(self) -> tuple[int, int] | None:
        """(pid, exit code) of a worker of this iterator that exited with an error, if any."""
        for pid, process in self._workers.items():
            code = process.exitcode
            if code:  # None: running; 0: a clean exit, which only close() causes.
                return pid, code
        return None

    def _dead_worker_error(self, pid: int | None, code: int) -> DataError:
        how = f"killed by {_signal_name(-code)}" if code < 0 else f"exit code {code}"
        worker = "process" if pid is None else f"process {pid}"
        return DataError(
            f"A grain worker {worker} of the {self._name} input pipeline died ({how}); {FIX}"
        )

    def _translate(self, error: BaseException) -> BaseException:
        """A DataError when a worker died (grain raised RuntimeError); else `error` itself."""
        dead = self._dead_worker()
        if dead is not None:
            return self._dead_worker_error(*dead)
        found = _GRAIN_DEAD_WORKER.search(str(error)) if isinstance(error, RuntimeError) else None
        if found:  # The worker died before this iterator saw it start.
            return self._dead_worker_error(None, int(found.group(1)))
        return error

    def _fail_dead_worker(self, error: DataError) -> None:
        self._failed = True
        self._abandon_workers()
        self.close(FAIL_CLOSE_TIMEOUT_S)
        raise error from None

    def _abandon_workers(self) -> None:
        """Kills the live workers and frees the locks the dead ones held, so close() cannot block."""
        for process in self._workers.values():
            if process.exitcode is None:
                process.kill()
            process.join(FAIL_CLOSE_TIMEOUT_S)
        for process in self._workers.values():
            try:
                _free_orphaned_locks(process)
            except Exception as e:  # noqa: BLE001 - best effort: grain's internals may differ.
                log.debug("Could not free the locks of worker %s: %s", process.pid, e)


def _fetch(it: Iterator[Any], results: queue.Queue, stop: threading.Event) -> None:
    """The fetch thread: reads batches ahead (one), copies them out of shared memory, closes grain."""
    try:
        while not stop.is_set():
            try:
                item = (True, own_arrays(next(it)))
            except BaseException as e:  # noqa: BLE001 - handed to the caller.
                _release_locals(e)
                item = (False, e)
            while not stop.is_set():
                try:
                    results.put(item, timeout=POLL_S)
                    break
                except queue.Full:
                    pass
            if not item[0]:
                break
    finally:
        _close_quietly(it)


def own_arrays(tree: Any) -> Any:
    """`tree` with every numpy array subclass (grain's SharedMemoryArray) copied to a plain array."""
    if isinstance(tree, dict):
        return {k: own_arrays(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(own_arrays(v) for v in tree)
    if isinstance(tree, np.ndarray) and type(tree) is not np.ndarray:
        return np.array(tree)  # Its shared memory is released now, while grain is alive.
    return tree


def _free_orphaned_locks(process: Any) -> None:
    """Replaces the grain cross-process locks that a dead worker `process` still holds.

    grain 0.2.18 gives each worker a multiprocessing Event (the worker takes its
    lock on every element) and a synchronized Value, kept on the iterator that
    holds the `process`. A lock whose holder is dead is never released, and
    every later `close()` of that iterator (grain's own at exit included) would
    block on it: such an Event or Value is replaced by a fresh one. A thread
    already blocked on the old lock stays blocked (a daemon thread).
    """
    if process.exitcode is None:
        return
    context = multiprocessing.get_context("spawn")
    for owner in gc.get_referrers(process):
        if not isinstance(owner, dict):
            continue
        for key, value in list(owner.items()):
            if isinstance(value, synchronize.Event):
                lock = value._cond  # The Event's lock (private in multiprocessing).
            elif isinstance(value, sharedctypes.SynchronizedBase):
                lock = value.get_lock()
            else:
                continue
            if lock.acquire(timeout=LOCK_PROBE_S):  # A live holder keeps it for microseconds.
                lock.release()
            elif isinstance(value, synchronize.Event):
                owner[key] = context.Event()
            else:
                raw = value.get_obj()
                owner[key] = context.Value(type(raw), raw.value)


def _release_locals(error: BaseException) -> None:
    """Clears the local variables of grain's frames that `error` passed through.

    grain re-raises stored errors (`raise err`), so such an error and its frames
    form a reference cycle, and a producer frame in it holds a batch in shared
    memory. The caller may keep the error (a traceback printed at exit): without
    the locals it holds no shared memory.
    """
    traceback.clear_frames(error.__traceback__)


def _wait_for_unlinks() -> None:
    """Waits for the shared memory blocks grain unlinks in its background thread.

    A freed batch queues its unlink there; at interpreter exit multiprocessing
    stops that pool early and the queued blocks are reported as leaked.
    """
    from grain._src.python.ipc import shared_memory_array  # grain 0.2.x internals.

    pool = getattr(shared_memory_array.SharedMemoryArray, "_del_thread_pool", None)
    if pool is not None:  # One thread, first in first out: done = every earlier unlink done.
        pool.apply_async(int).wait(FAIL_CLOSE_TIMEOUT_S)


def _drain(results: queue.Queue) -> None:
    while True:
        try:
            results.get_nowait()
        except queue.Empty:
            return


def _close_quietly(it: Any) -> None:
    close = getattr(it, "close", None)
    if close is None:
        return
    try:
        close()
    except Exception as e:  # noqa: BLE001 - closing after a failure: the failure is what matters.
        log.debug("Closing the grain iterator: %s", e)


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


@atexit.register
def _close_open_iterators() -> None:
    """Closes iterators still open at exit; atexit runs before grain's modules are torn down."""
    deadline = time.monotonic() + CLOSE_TIMEOUT_S
    for batches in list(_OPEN):
        if time.monotonic() < deadline:
            batches.close()
