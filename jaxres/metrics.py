"""Training metrics (clu), and the one writer: metrics.jsonl and TensorBoard (the console:
`jaxres.console`; what TensorBoard shows: `jaxres.dashboard`).

Only process 0 writes. Metric names carry their split as a prefix where it
is not training (`val_top1`, `val_top5`, `val_loss`); TensorBoard groups them
(`train/loss`, `val/top1`, `time/mfu`).
"""

# No `from __future__ import annotations`: clu reads the metric classes from annotations.

import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics

from jaxres import dashboard
from jaxres.dashboard import EventFile  # noqa: F401 - its home before jaxres.dashboard.


@flax.struct.dataclass
class TrainMetrics(clu_metrics.Collection):
    """Averaged over the steps between two log lines, accumulated on device."""

    loss: clu_metrics.Average.from_output("loss")
    top1: clu_metrics.Average.from_output("top1")
    grad_norm: clu_metrics.Average.from_output("grad_norm")
    skipped: clu_metrics.Average.from_output("skipped")  # Undecodable images per step (logged with their keys).
    # 1 when the loss and the updated params are finite; the loop stops on anything less.
    finite: clu_metrics.Average.from_output("finite")


def masked_eval_sums(scores: jax.Array, labels: jax.Array, mask: jax.Array, loss: jax.Array,
                     per_class: bool = False) -> dict[str, jax.Array]:
    """Sums over the real rows of an evaluation batch (mask 1; padding rows have mask 0).

    Args:
      scores: [B, C] logits or probabilities (only their order matters).
      labels: [B] int labels.
      mask: [B] 1.0 for real examples, 0.0 for padding.
      loss: [B] per-example loss.
      per_class: also `class_count` / `class_correct` ([C] each), for mean per-class accuracy.

    Returns:
      `count`, `correct1`, `correct5` and `loss_sum` (plus the per-class sums).
    """
    top5 = jax.lax.top_k(scores, min(5, scores.shape[-1]))[1]
    correct1 = (top5[:, 0] == labels) * mask
    sums = {
        "count": mask.sum(),
        "correct1": correct1.sum(),
        "correct5": ((top5 == labels[:, None]).any(-1) * mask).sum(),
        "loss_sum": (loss * mask).sum(),
    }
    if per_class:
        in_class = jax.nn.one_hot(labels, scores.shape[-1]) * mask[:, None]
        sums["class_count"] = in_class.sum(0)
        sums["class_correct"] = (in_class * correct1[:, None]).sum(0)
    return sums


def classification_sums(
    log_probs: jax.Array, labels: jax.Array, mask: jax.Array, per_class: bool = False
) -> dict[str, jax.Array]:
    """`masked_eval_sums` with the loss every evaluation reports: -log p(true class).

    `log_probs` are log-softmax of one model's logits (then the loss is the
    cross-entropy training reports), or the log of probabilities averaged over
    views and ensemble members (their negative log-likelihood).
    """
    loss = -jnp.take_along_axis(log_probs, labels[:, None], axis=1)[:, 0]
    return masked_eval_sums(log_probs, labels, mask, loss, per_class)


def mean_over_views(log_probs: jax.Array) -> jax.Array:
    """log of the probabilities averaged over axis 1 (views, ensemble members): [B, K, C] -> [B, C].

    A logsumexp of log-softmaxes, so it never underflows; averaging probabilities (not logits) is
    the 10-crop / ensemble rule (Krizhevsky et al. 2012), which keeps each view's confidence.
    """
    return jax.nn.logsumexp(log_probs, axis=1) - jnp.log(log_probs.shape[1])


def sum_over_batches(
    sums_fn: Callable[[Any, Any], dict[str, jax.Array]], variables: Any, batches: Iterable[Any]
) -> dict[str, np.ndarray]:
    """Adds `sums_fn(variables, batch)` over `batches` on device; returns the totals on the host."""
    total = None
    for batch in batches:
        sums = sums_fn(variables, batch)
        total = sums if total is None else jax.tree.map(jnp.add, total, sums)
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), total)


def summarize_sums(total: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Totals of `masked_eval_sums` -> count, top1, top5, loss (and mean_per_class when summed)."""
    count = float(total["count"])
    summary = {
        "count": int(count),
        "top1": float(total["correct1"]) / count,
        "top5": float(total["correct5"]) / count,
        "loss": float(total["loss_sum"]) / count,
    }
    if "class_count" in total:
        present = total["class_count"] > 0
        summary["mean_per_class"] = float((total["class_correct"][present] / total["class_count"][present]).mean())
    return summary


class MetricWriter:
    """Writes `metrics.jsonl` and TensorBoard events (`jaxres.dashboard`: in the run's folder, or
    `tb/` for a run that started there; `config.json`: `jaxres.runs`)."""

    def __init__(
        self,
        workdir: str,
        enabled: bool | None = None,
        tensorboard: bool = True,
        resume_step: int | None = None,
        eval_names: Sequence[str] | None = None,
    ):
        """Opens the writers (process 0 only, unless `enabled` says otherwise).

        Args:
          resume_step: the step a resumed run restarts from: rows of later steps (logged before
            a crash, to be logged again) are dropped from metrics.jsonl, and TensorBoard
            purges its events after it, so every step appears once.
          eval_names: the evaluators whose keys `NAME_x` become TensorBoard's `NAME/x` (default:
            those of the run's config.json, else `val`).
        """
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.workdir = workdir
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        path = os.path.join(workdir, "metrics.jsonl")
        if resume_step is not None:
            _drop_rows_after(path, resume_step)
        if tensorboard:
            self._tb = dashboard.RunBoard(workdir, eval_names, resume_step, read_rows(workdir))
        self._jsonl = open(path, "a")  # noqa: SIM115 - open for the writer's lifetime.

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        """One JSON line (with `step`) and one TensorBoard scalar per value (each tag once a step)."""
        if not self.enabled:
            return
        row = {"step": int(step)}
        row.update({k: _to_python(v) for k, v in scalars.items()})
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.write(int(step), row)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_rows(workdir: str) -> list[dict[str, Any]]:
    """The rows of `workdir/metrics.jsonl` in order ([] when there is none)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _drop_rows_after(path: str, step: int) -> None:
    """Rewrites metrics.jsonl without the rows of steps after `step` (atomically)."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        with open(path + ".tmp", "w") as f:
            f.writelines(kept)
        os.replace(path + ".tmp", path)


def _to_python(v: Any) -> Any:
    if isinstance(v, (np.ndarray, np.generic, jax.Array)):
        v = np.asarray(v)
        return v.item() if v.size == 1 else v.tolist()
    return v
