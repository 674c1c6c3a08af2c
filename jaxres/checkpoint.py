"""Checkpoints with orbax: asynchronous saves, latest-N + best-N, exact resume.

A checkpoint holds two items:

* `state`: the whole `TrainState` (params, batch stats, optimizer state, EMA,
  step, RNG), restored straight into its shardings;
* `meta` (JSON): the data-iterator position (next batch index), epoch, model
  name / class count / image size, the metrics of that step and the config.

Where a run's starting point comes from, in this order (as big_vision does;
`jaxres.train.restore_or_init`):
1. the newest checkpoint in `workdir/checkpoints` (resume, mid-epoch included);
2. `config.resume_from=RUN[:STEP]`: another run's whole state (branch a run);
3. `config.init_from`: params and batch stats of another run (fine-tuning;
   a head of another shape is re-initialised);
4. scratch.
Reading a run at rest (its config, model and weights) is `jaxres.runs`.

Two preservation policies are OR-ed: the latest `keep_latest` checkpoints and
the best `keep_best` by `val_top1`, so a good old checkpoint never deletes the
newest one (the pitfall of `best_fn` + `max_to_keep`).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from jaxres.errors import CheckpointError

BEST_METRIC = "val_top1"


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
            item_handlers={"state": ocp.PyTreeCheckpointHandler(), "meta": ocp.JsonCheckpointHandler()},
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
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.PyTreeSave(state), meta=ocp.args.JsonSave(meta)),
            metrics=metrics if metrics and BEST_METRIC in metrics else None,
            force=True,
        )

    def restore_meta(self, step: int) -> dict[str, Any]:
        return self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract_state: Any) -> Any:
        """Restores `state` at `step` into the shapes and shardings of `abstract_state`."""
        try:
            restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.PyTreeRestore(abstract_state, restore_args)),
            )
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"The checkpoint at {self.directory} step {step} does not match this model/optimizer "
                f"({str(e).splitlines()[0][:300]}). Use a new --workdir, or the config the run was "
                "started with (see its config.json)."
            ) from None
        return restored["state"]

    def restore_params(self, step: int) -> dict[str, Any]:
        """Params and batch stats only, as host-agnostic arrays (for `init_from`, evaluation)."""
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

    def wait(self) -> None:
        """Blocks until every pending asynchronous save is on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
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
