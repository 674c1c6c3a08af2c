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
the best `keep_best` by `val_top1`, so a good old checkpoint never deletes the
newest one (the pitfall of `best_fn` + `max_to_keep`).

Faults. orbax writes a step into a temporary directory and renames it when
complete, so a save cut short (kill -9, a full disk) never counts as a step. A
step whose files were damaged afterwards (truncated, deleted) raises
`CheckpointDamaged` naming the step and the array or file; `restore_newest_intact`
then falls back to the previous step with a warning. A save that cannot be written
(no space, no permission) is one `CheckpointError` line; earlier steps stay intact.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Iterator
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from jaxres.errors import CheckpointError
from jaxres.console import log_line

BEST_METRIC = "val_top1"
# What tensorstore / orbax say when a checkpoint's files are damaged or missing (not a mismatch).
_DAMAGE_MARKERS = ("TensorStore", "tensorstore", "OCDBT", "DATA_LOSS", "NOT_FOUND", "does not exist")


class CheckpointDamaged(CheckpointError):
    """A step whose files are damaged or missing."""


def damage(error: BaseException) -> str | None:
    """One line naming what is damaged when `error` says a checkpoint's files are, else None."""
    text = str(error)
    if not (isinstance(error, OSError) or any(m in text for m in _DAMAGE_MARKERS)):
        return None
    first = re.split(r" \[tensorstore_spec|\. See full TensorStore", text.strip().splitlines()[0])[0]
    arrays = re.findall(r"""['"]path['"]: ?\\?['"]([^'"\\]+?)/?\\?['"]""", text)
    where = f"{arrays[-1]}: " if arrays and not arrays[-1].startswith("/") else ""
    return f"{where}{first[:200]}"


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

    def __init__(self, directory: str, keep_latest: int = 2, keep_best: int = 1, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        preservation = policies.AnyPreservationPolicy(
            [
                policies.LatestN(n=keep_latest),
                policies.BestN(
                    get_metric_fn=lambda m: m[BEST_METRIC],
                    n=keep_best,
                    keep_checkpoints_without_metrics=False,
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preservation,
            create=not read_only,
            read_only=read_only,
            enable_async_checkpointing=not read_only,
        )
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={
                "state": ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handlers()),
                "meta": ocp.JsonCheckpointHandler(),
            },
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def best_step(self) -> int | None:
        """The kept step with the highest `val_top1` (None when no step has one)."""
        best, best_value = None, None
        for step in self.all_steps():
            value = self.restore_meta(step).get("metrics", {}).get(BEST_METRIC)
            if value is not None and (best_value is None or value > best_value):
                best, best_value = step, value
        return best

    def save(self, step: int, state: Any, meta: dict[str, Any], metrics: dict[str, float] | None = None) -> None:
        """Starts an asynchronous save; `metrics` (with `val_top1`) feed best-N."""
        meta = dict(meta, metrics=metrics or {})
        with self._writing(step):
            self._manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)),
                metrics=metrics if metrics and BEST_METRIC in metrics else None,
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


def _single_device() -> jax.sharding.Sharding:
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


def resolve_step(checkpointer: Checkpointer, which: str | int) -> int:
    """`"latest"`, `"best"` or a step number -> an existing step, or a clear error."""
    steps = checkpointer.all_steps()
    if not steps:
        raise CheckpointError(
            f"No checkpoint in {checkpointer.directory}. Train first "
            "(python scripts/train.py --config ... --workdir RUN) or check the path."
        )
    if which == "latest":
        return steps[-1]
    if which == "best":
        best = checkpointer.best_step()
        return best if best is not None else steps[-1]
    step = int(which)
    if step not in steps:
        raise CheckpointError(f"No checkpoint at step {step} in {checkpointer.directory}; kept steps: {steps}.")
    return step


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
