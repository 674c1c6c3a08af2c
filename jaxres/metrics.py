"""Training metrics (clu), and the one writer: metrics.jsonl, TensorBoard, console.

Only process 0 writes. Metric names carry their split as a prefix where it
is not training (`val_top1`, `val_top5`, `val_loss`).
"""

# No `from __future__ import annotations`: clu reads the metric classes from annotations.

import json
import os
import time
from typing import Any, Mapping

import flax
import jax
import ml_collections
import numpy as np
from clu import metrics as clu_metrics


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


class MetricWriter:
    """Writes `metrics.jsonl`, TensorBoard events under `tb/` and `config.json`."""

    def __init__(self, workdir: str, enabled: bool | None = None, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.workdir = workdir
        self._jsonl = None
        self._tb = None
        if not self.enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
        if tensorboard:
            from tensorboardX import SummaryWriter  # No TensorFlow needed.

            self._tb = SummaryWriter(os.path.join(workdir, "tb"), flush_secs=30)

    def write_config(self, config: ml_collections.ConfigDict) -> None:
        if self.enabled:
            with open(os.path.join(self.workdir, "config.json"), "w") as f:
                f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")

    def write(self, step: int, scalars: Mapping[str, Any]) -> None:
        """One JSON line (with `step`) and one TensorBoard scalar per value."""
        if not self.enabled:
            return
        row = {"step": int(step)}
        row.update({k: _to_python(v) for k, v in scalars.items()})
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k.replace("_", "/", 1) if k.startswith("val_") else k, v, step)

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _to_python(v: Any) -> Any:
    if isinstance(v, (np.ndarray, np.generic, jax.Array)):
        v = np.asarray(v)
        return v.item() if v.size == 1 else v.tolist()
    return v


class Progress:
    """Images/s since the last report and an ETA, printed as one console line."""

    def __init__(self, total_steps: int, start_step: int, images_per_step: int, steps_per_epoch: int):
        self.total_steps = total_steps
        self.images_per_step = images_per_step
        self.steps_per_epoch = steps_per_epoch
        self._last_step = start_step
        self._last_time = time.perf_counter()

    def update(self, step: int) -> dict[str, float]:
        """Throughput since the previous call (the clock excludes nothing: honest)."""
        now = time.perf_counter()
        steps = max(1, step - self._last_step)
        seconds = max(1e-9, now - self._last_time)
        self._last_step, self._last_time = step, now
        img_per_sec = steps * self.images_per_step / seconds
        eta = (self.total_steps - step) * seconds / steps
        return {"img_per_sec": img_per_sec, "eta_s": eta}

    def line(self, step: int, scalars: Mapping[str, Any]) -> str:
        epoch = step / self.steps_per_epoch
        eta = scalars.get("eta_s", 0.0)
        parts = [f"step {step}/{self.total_steps}", f"epoch {epoch:.2f}"]
        parts += [f"{k} {v:.4g}" for k, v in scalars.items() if k not in ("eta_s", "epoch") and isinstance(v, float)]
        parts.append(f"ETA {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}")
        return " | ".join(parts)


def log_line(text: str) -> None:
    """Console output from process 0 only."""
    if jax.process_index() == 0:
        print(text, flush=True)
