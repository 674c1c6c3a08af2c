"""Checkpoints with orbax: asynchronous saves, latest-N + best-N, exact resume.

A checkpoint holds two items:

* `state`: the whole `TrainState` (params, batch stats, optimizer state, EMA,
  step, RNG), restored straight into its shardings;
* `meta` (JSON): the data-iterator position (next batch index), epoch, model
  name / class count / image size, the metrics of that step and the config.

Where a run's starting point comes from, in this order (as big_vision does;
`jaxres.state.restore_or_init`):
1. the newest checkpoint in `workdir/checkpoints` (resume, mid-epoch included);
2. `config.resume_from=RUN[:STEP]`: another run's whole state (branch a run);
3. `config.init_from`: params and batch stats of another run (fine-tuning;
   a head of another shape is re-initialised);
4. scratch.
Reading a run at rest (its config, model and weights) is `jaxres.runs`.

Two preservation policies are OR-ed: the latest `keep_latest` checkpoints and
the best `keep_best` by `checkpoint.best_metric` (any evaluator's key, default
`val_top1`, "max" or "min" better), so a good old checkpoint never deletes the
newest one (the pitfall of `best_fn` + `max_to_keep`). Each step's meta records
the metric and its mode, so `--checkpoint best` picks by the run's own choice.

Faults. orbax writes a step into a temporary directory and renames it when
complete, so a save cut short (kill -9, a full disk) never counts as a step. A
step whose files were damaged afterwards (truncated, deleted) is found by
`damaged_files`, which looks at the step as a whole before orbax reads it: every
metadata file orbax writes, the array store's manifest and the extent of every
stored array. Restoring such a step raises `CheckpointDamaged` naming the step and
the file; `resolve_step(..., "latest")` and `restore_newest_intact` then fall back
to the previous step with one warning, and a damaged step is never reported as a
model/optimizer mismatch. A save that cannot be written (no space, no permission)
is one `CheckpointError` line; earlier steps stay intact.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from typing import Any

import jax
import orbax.checkpoint as ocp
import tensorstore as ts
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from jaxres.errors import CheckpointError
from jaxres.console import log_line

BEST_METRIC = "val_top1"  # What "best" means in runs written before `checkpoint.best_metric`.
# What tensorstore / orbax say when a checkpoint's files are damaged or missing (not a mismatch).
_DAMAGE_MARKERS = ("TensorStore", "tensorstore", "OCDBT", "DATA_LOSS", "NOT_FOUND", "does not exist")


class CheckpointDamaged(CheckpointError):
    """A step whose files are damaged or missing."""


def damage(error: BaseException) -> str | None:
    """One line naming what is damaged when `error` says a checkpoint's files are, else None."""
    text = str(error)
    if not (isinstance(error, OSError) or any(m in text for m in _DAMAGE_MARKERS)):
        return None
    first = _first_line(error, 200)
    arrays = re.findall(r"""['"]path['"]: ?\\?['"]([^'"\\]+?)/?\\?['"]""", text)
    where = f"{arrays[-1]}: " if arrays and not arrays[-1].startswith("/") else ""
    return f"{where}{first[:200]}"


# The items of every jaxres checkpoint step and the files orbax cannot restore without.
_ITEMS = ("state", "meta")
_REQUIRED_FILES = ("state/_METADATA", "meta/metadata")
_SHOWN = 3  # Damaged files named in one message.


def damaged_files(step_dir: str) -> list[str]:
    """What is damaged or missing in one checkpoint step, as "FILE: why" lines ([] when intact).

    Looks at the step as a whole, reading a few kilobytes, never the arrays: the items'
    directories; orbax's required metadata (`state/_METADATA`, `meta/metadata`) present;
    every JSON file orbax writes (those and `_CHECKPOINT_METADATA`, `state/_sharding`,
    `state/array_metadatas/*`) parsing; the OCDBT manifest readable and the last byte of
    every stored array readable (a truncated or deleted data file). A file that older orbax
    versions did not write (`_sharding`, `array_metadatas`) may be missing.

    Args:
      step_dir: a step directory, e.g. `RUN/checkpoints/16`.
    """
    if "://" in step_dir:  # Remote storage: orbax's own errors name the damage there.
        return []
    missing = [f"{d}/: missing" for d in _ITEMS if not os.path.isdir(os.path.join(step_dir, d))]
    if missing:
        return missing
    here = [rel for rel in _REQUIRED_FILES if os.path.isfile(os.path.join(step_dir, rel))]
    problems = [f"{rel}: missing" for rel in _REQUIRED_FILES if rel not in here]
    metadata = None
    for path in _json_files(step_dir):
        rel = os.path.relpath(path, step_dir)
        try:
            with open(path, "rb") as f:
                parsed = json.loads(f.read())
        except (OSError, ValueError) as e:  # ValueError: bad JSON or UTF-8.
            problems.append(f"{rel}: not valid JSON ({str(e)[:80]})")
            continue
        if rel == os.path.join("state", "_METADATA"):
            metadata = parsed
    if problems or not isinstance(metadata, dict) or not metadata.get("use_ocdbt"):
        return problems
    return _ocdbt_damage(os.path.join(step_dir, "state"))


def _json_files(step_dir: str) -> list[str]:
    """The step's JSON files that exist (orbax writes each as plain JSON)."""
    names = ["_CHECKPOINT_METADATA", "meta/metadata", "state/_METADATA", "state/_sharding"]
    paths = [os.path.join(step_dir, n) for n in names if os.path.isfile(os.path.join(step_dir, n))]
    return paths + sorted(glob.glob(os.path.join(step_dir, "state", "array_metadatas", "*")))


def _ocdbt_damage(state_dir: str) -> list[str]:
    """The OCDBT store's manifest and index, and each array's extent: its last byte read (a
    suffix read; milliseconds for the smoke model's 168 arrays)."""
    if not os.path.isfile(os.path.join(state_dir, "manifest.ocdbt")):
        return ["state/manifest.ocdbt: missing"]
    spec = {"driver": "ocdbt", "base": f"file://{state_dir}/"}
    try:  # A fresh context: no cached manifest from an earlier look.
        store = ts.KvStore.open(spec, context=ts.Context()).result()
        keys = store.list().result()
    except Exception as e:  # noqa: BLE001 - any failure to read the manifest is damage.
        return [f"state/ array index (manifest.ocdbt, d/): unreadable ({_first_line(e)})"]
    if not keys:
        return ["state/manifest.ocdbt: lists no arrays"]
    reads = [(key, store.read(key, byte_range=slice(-1, None))) for key in keys]
    problems = []
    for key, read in reads:
        name = key.decode().split("/")[0]
        try:  # A deleted data file reads as an empty value, a truncated one as an error.
            if len(read.result().value) != 1:
                problems.append(f"state array {name}: data file missing")
        except Exception as e:  # noqa: BLE001 - a truncated data file.
            problems.append(f"state array {name}: data file damaged ({_first_line(e)})")
    return problems


def _first_line(error: BaseException, limit: int = 160) -> str:
    """An error's first line without TensorStore's spec dump."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return re.split(r" \[tensorstore_spec|\. See full TensorStore", first)[0][:limit]


# A replicated array is saved by all its replicas, each writing a slice of it (orbax's replica
# parallelism), only when a slice would hold at least this much: slicing the many small arrays
# (norms, biases, small kernels) costs an eager slice per shape and replica on the first save
# (1.6 s of a smoke run's 16 steps on 2 CPU cores, against 0.2 s for each later save) and
# saves nothing; ResNet-50's large kernels still go in parallel.
REPLICA_PARALLEL_MIN_BYTES = 1 << 20


def _type_handlers() -> Any:
    """orbax's standard type handlers (its own list), with `REPLICA_PARALLEL_MIN_BYTES` for
    jax.Arrays; their handler otherwise as orbax's default one, array-metadata store included
    (orbax has no public name for it)."""
    default = ocp.type_handlers.get_type_handler
    arrays = ocp.type_handlers.ArrayHandler(
        min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES,
        array_metadata_store=getattr(default(jax.Array), "_array_metadata_store", None),
    )
    handlers = [(t, arrays if t is jax.Array else default(t)) for t in ocp.type_handlers.supported_types()]
    return ocp.type_handlers.create_type_handler_registry(*handlers)


class Checkpointer:
    """Saves and restores `TrainState`s under `directory` (a run's `checkpoints/`)."""

    def __init__(
        self,
        directory: str,
        keep_latest: int = 2,
        keep_best: int = 1,
        read_only: bool = False,
        best_metric: str = BEST_METRIC,
        best_mode: str = "max",
    ):
        self.directory = os.path.abspath(directory)
        self.best = {"metric": best_metric, "mode": best_mode}
        sign = 1.0 if best_mode == "max" else -1.0
        preservation = policies.AnyPreservationPolicy(
            [
                policies.LatestN(n=keep_latest),
                policies.BestN(
                    get_metric_fn=lambda m: sign * m[best_metric],
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preservation,
            save_interval_steps=0 if read_only else 1,  # read_only sets 0 anyway, with a warning.
            create=not read_only,
            read_only=read_only,
            enable_async_checkpointing=not read_only,
        )
        self._damage: dict[int, list[str]] = {}
        if not read_only:
            self._remove_unfinished_saves()
        ignore_closed_loop_callbacks()
        with _without_read_only_notice():
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=options,
                item_handlers={
                    "state": ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handlers()),
                    "meta": ocp.JsonCheckpointHandler(),
                },
            )

    def _remove_unfinished_saves(self) -> None:
        """Removes `STEP.orbax-checkpoint-tmp-*` folders: a save cut short (kill -9, a second
        Ctrl-C) is never a step, and orbax alone would leave it for good (its own clean-up runs
        in a thread that nothing waits for). Process 0 removes them, as it renames finished saves."""
        pattern = os.path.join(glob.escape(self.directory), "*.orbax-checkpoint-tmp*")
        unfinished = sorted(glob.glob(pattern))
        if unfinished and jax.process_index() == 0:
            names = ", ".join(os.path.basename(p) for p in unfinished)
            log_line(f"Removing unfinished checkpoint save(s) in {self.directory}: {names} (cut short).")
            for path in unfinished:
                shutil.rmtree(path, ignore_errors=True)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def damaged_files(self, step: int) -> list[str]:
        """`damaged_files` of one kept step (looked at once per step and Checkpointer)."""
        if step not in self._damage:
            self._damage[step] = damaged_files(os.path.join(self.directory, str(step)))
        return self._damage[step]

    def check_intact(self, step: int) -> None:
        """Raises CheckpointDamaged naming the step and its damaged files, if any."""
        files = self.damaged_files(step)
        if files:
            more = f" (and {len(files) - _SHOWN} more)" if len(files) > _SHOWN else ""
            shown = "; ".join(files[:_SHOWN])
            raise CheckpointDamaged(f"step {step} in {self.directory}: {shown}{more}")

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def best_step(self) -> int | None:
        """The intact kept step best by the metric its meta names (`val_top1` in older runs; None
        when no step has the metric)."""
        best, best_value = None, None
        for step in self.all_steps():
            try:
                self.check_intact(step)
                meta = self.restore_meta(step)
            except CheckpointDamaged as e:
                log_line(f"Warning: checkpoint {e}; skipped.")
                continue
            choice = meta.get("best", {"metric": BEST_METRIC, "mode": "max"})
            value = meta.get("metrics", {}).get(choice["metric"])
            if value is None:
                continue
            value = value if choice["mode"] == "max" else -value
            if best_value is None or value > best_value:
                best, best_value = step, value
        return best

    def save(self, step: int, state: Any, meta: dict[str, Any], metrics: dict[str, float] | None = None) -> None:
        """Starts an asynchronous save; `metrics` (with the best metric) feed best-N."""
        meta = dict(meta, metrics=metrics or {}, best=self.best)
        with self._writing(step):
            self._manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)),
                metrics=metrics if metrics and self.best["metric"] in metrics else None,
                force=True,
            )

    @contextlib.contextmanager
    def _writing(self, step: int | None) -> Iterator[None]:
        """A save that cannot be written (asynchronous ones surface later) as one CheckpointError."""
        try:
            yield
        except OSError as e:
            which = f"step {step}" if step is not None else "the last step"
            raise CheckpointError(
                f"Could not write checkpoint {which} to {self.directory} ({e.strerror or e}); "
                "earlier checkpoints are intact. Free space or fix permissions there (or use another "
                "--workdir), then re-run the same command to resume."
            ) from None

    def restore_meta(self, step: int) -> dict[str, Any]:
        self.check_intact(step)
        try:
            return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        except Exception as e:  # noqa: BLE001 - unreadable JSON or a missing file: damaged.
            raise CheckpointDamaged(f"step {step} in {self.directory}: meta ({str(e).splitlines()[0][:200]})") from None

    def restore(self, step: int, abstract_state: Any) -> Any:
        """Restores `state` at `step` into the shapes and shardings of `abstract_state`.

        Raises:
          CheckpointDamaged: the step's files are damaged or missing.
          CheckpointError: the checkpoint is of another model or optimizer.
        """
        self.check_intact(step)  # Before orbax: a damaged step is never taken for a mismatch.
        try:
            restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.PyTreeRestore(abstract_state, restore_args)),
            )
        except Exception as e:  # noqa: BLE001 - sorted below into damage and mismatch.
            self._raise_if_damaged(step, e)
            if not isinstance(e, (ValueError, KeyError, TypeError)):
                raise
            raise CheckpointError(
                f"The checkpoint at {self.directory} step {step} does not match this model/optimizer "
                f"({str(e).splitlines()[0][:300]}). Use a new --workdir, or the config the run was "
                "started with (see its config.json)."
            ) from None
        return restored["state"]

    def _raise_if_damaged(self, step: int, error: BaseException) -> None:
        what = damage(error)
        if what is not None:
            raise CheckpointDamaged(f"step {step} in {self.directory}: {what}") from None

    def restore_params(self, step: int) -> dict[str, Any]:
        """Params and batch stats only, as host-agnostic arrays (for `init_from`, evaluation)."""
        self.check_intact(step)
        try:
            return self._restore_params(step)
        except CheckpointError:
            raise
        except Exception as e:  # noqa: BLE001 - damaged files are named; anything else is a bug.
            self._raise_if_damaged(step, e)
            raise

    def _restore_params(self, step: int) -> dict[str, Any]:
        metadata = self._manager.item_metadata(step)["state"]
        tree = metadata.tree if hasattr(metadata, "tree") else metadata
        wanted = {k: tree[k] for k in ("params", "batch_stats", "ema_params") if k in tree and tree[k]}
        abstract = jax.tree.map(
            lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=_single_device()), wanted
        )
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract)
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.PyTreeRestore(abstract, restore_args, partial_restore=True)),
        )
        return restored["state"]

    def set_aside_after(self, step: int) -> list[int]:
        """Renames the steps newer than `step` (damaged ones) to `STEP.damaged-N`, out of orbax's sight,
        so that a resumed run can write those steps again; returns them."""
        newer = [s for s in self.all_steps() if s > step]
        if newer and jax.process_index() == 0:
            for s in newer:
                path, n = os.path.join(self.directory, str(s)), 0
                while os.path.exists(f"{path}.damaged-{n}"):
                    n += 1
                os.replace(path, f"{path}.damaged-{n}")
                log_line(f"Moved damaged checkpoint step {s} to {path}.damaged-{n}.")
        if newer:
            multihost_utils.sync_global_devices("jaxres_set_aside_damaged_checkpoints")
            self._manager.reload()
            self._damage = {s: d for s, d in self._damage.items() if s <= step}
        return newer

    def wait(self) -> None:
        """Blocks until every pending asynchronous save is on disk."""
        with self._writing(None):
            self._manager.wait_until_finished()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._manager.close()


def ignore_closed_loop_callbacks() -> None:
    """Drops the reports of orbax reads abandoned after a failed restore.

    orbax restores in a fresh asyncio loop; when one array read fails (a damaged file, an array
    of another shape), it closes the loop while the other reads are in flight. Each of those
    then fails to call back into the closed loop (TensorStore's `call_soon_threadsafe`: "Event
    loop is closed"), and each unfinished read coroutine raises when it is collected; Python
    reports both through `sys.unraisablehook`, a traceback per array (115-164 for one damaged
    step). The failure itself is raised and reported once; only these reports are dropped,
    everything else goes to the previous hook. Installed once per process.
    """
    previous = sys.unraisablehook
    if getattr(previous, "_jaxres_closed_loop_filter", False):
        return

    def hook(unraisable: Any) -> None:
        if not _abandoned_read(unraisable):
            previous(unraisable)

    hook._jaxres_closed_loop_filter = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


def _abandoned_read(unraisable: Any) -> bool:
    """A closed loop's callback, or an orbax coroutine collected unfinished."""
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return True
    code = getattr(unraisable.object, "cr_code", None)  # Coroutines only.
    return code is not None and f"{os.sep}orbax{os.sep}checkpoint{os.sep}" in code.co_filename


@contextlib.contextmanager
def _without_read_only_notice() -> Iterator[None]:
    """Drops orbax's "Given directory is read only" warning, logged by every read-only manager
    (every command that reads a run) although read-only is what was asked for."""

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Given directory is read only")

    logger = logging.getLogger("absl")
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


def _single_device() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def resolve_step(checkpointer: Checkpointer, which: str | int) -> int:
    """`"latest"`, `"best"` or a step number -> an existing, intact step, or a clear error.

    "latest" and "best" skip damaged steps (`newest_intact_step`): the single place where
    every reader of a run (`jaxres.runs.load`, `init_from`, `resume_from`) falls back.
    """
    steps = checkpointer.all_steps()
    if not steps:
        raise CheckpointError(
            f"No checkpoint in {checkpointer.directory}. Train first "
            "(python scripts/train.py --config ... --workdir RUN) or check the path."
        )
    if which == "latest":
        return newest_intact_step(checkpointer, steps)
    if which == "best":
        best = checkpointer.best_step()
        return best if best is not None else newest_intact_step(checkpointer, steps)
    step = int(which)
    if step not in steps:
        raise CheckpointError(f"No checkpoint at step {step} in {checkpointer.directory}; kept steps: {steps}.")
    checkpointer.check_intact(step)  # The step asked for by number: no fallback, one line.
    return step


def newest_intact_step(checkpointer: Checkpointer, steps: list[int]) -> int:
    """The newest of `steps` that `damaged_files` finds intact; one warning per newer damaged step.

    Raises:
      CheckpointError: every step is damaged.
    """
    return restore_newest_intact(checkpointer, steps, checkpointer.check_intact)[0]


def restore_newest_intact(checkpointer: Checkpointer, steps: list[int], restore: Callable[[int], Any]) -> tuple[int, Any]:
    """`restore(step)` for the newest of `steps` that is intact; warns about each damaged one.

    Returns:
      (the step restored, what `restore` returned).

    Raises:
      CheckpointError: every step is damaged (one line naming the newest damage).
    """
    damaged = []
    for step in sorted(steps, reverse=True):
        try:
            return step, restore(step)
        except CheckpointDamaged as e:
            damaged.append(str(e))
            log_line(f"Warning: checkpoint {e}; trying the previous one.")
    raise CheckpointError(
        f"Every checkpoint in {checkpointer.directory} is damaged (newest: {damaged[0] if damaged else 'none'}); "
        "restore the directory from a copy, or move it away to start from scratch."
    )
