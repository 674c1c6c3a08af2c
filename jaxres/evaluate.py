"""Checkpoint evaluation: a whole split, centre or 10-crop, one run or an ensemble.

    python scripts/evaluate.py --workdir runs/demo [--checkpoint best] [--crops 10] \
        [--ensemble runs/a,runs/b] [--split val] [--output results.json]

A *member* is one run (`jaxres.runs.load`: a training workdir, or a run the
weight converter wrote), with the EMA weights when it kept one.

One jitted function maps a batch of uint8 views [B, K, H, W, 3] (K = 1 centre
crop, 2 with the mirror image, 10 for 10-crop: `jaxres.data.preprocessing`)
to the log of class probabilities [B, C]: softmax per view, averaged over the K
views and then over the members (computed as a logsumexp of log-softmaxes, so it
never underflows). Averaging probabilities (not logits) is the usual 10-crop /
ensemble rule (Krizhevsky et al. 2012, He et al. 2016); it keeps each view's
confidence. The loss is -log of the averaged probability of the true class: for
one member and one view exactly the cross-entropy training reports as val_loss.
Parameters are replicated and the batch sharded over the `data` mesh axis;
the split is padded to whole global batches with masked copies, so every
example is counted exactly once on any number of devices and processes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxres import console, metrics, parallel, runs
from jaxres.console import log_line
from jaxres.data import preprocessing, sources
from jaxres.errors import ConfigError

CROPS_TO_VIEWS = {1: "center", 10: "10crop"}


def view_log_probs(spec: runs.ModelSpec, variables: dict[str, Any], images: jax.Array) -> jax.Array:
    """Log-softmax of every view: uint8 [B, K, H, W, 3] (or [B, H, W, 3]) -> [B, K, C] float32."""
    logits, _, k = spec.apply(variables, images)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return log_probs.reshape(-1, k, log_probs.shape[-1])


def _ensemble_log_probs(variables: tuple, images: jax.Array, *, specs: tuple[runs.ModelSpec, ...]) -> jax.Array:
    """log of the probabilities averaged over every view of every member: [B, C]."""
    log_probs = jnp.concatenate([view_log_probs(s, v, images) for s, v in zip(specs, variables)], axis=1)
    return metrics.mean_over_views(log_probs)


def _eval_sums(variables: tuple, batch: dict[str, jax.Array], *, specs: tuple[runs.ModelSpec, ...]) -> dict:
    """Masked sums over a batch, from the averaged probabilities (so loss = ensemble NLL)."""
    log_probs = _ensemble_log_probs(variables, batch["image"], specs=specs)
    return metrics.classification_sums(log_probs, batch["label"], batch["mask"], per_class=True)


class Ensemble:
    """One or more runs evaluated together on a mesh (params replicated, batch sharded)."""

    def __init__(self, members: Sequence[runs.LoadedRun], mesh: jax.sharding.Mesh | None = None):
        self.members = tuple(members)
        self.mesh = mesh if mesh is not None else parallel.make_mesh()
        first = self.members[0].config
        for m in self.members[1:]:
            for key, value in (
                ("num_classes", lambda d: d.num_classes),
                ("eval_image_size", preprocessing.eval_image_size),
            ):
                if value(m.config.dataset) != value(first.dataset):
                    raise ConfigError(
                        f"Ensemble members disagree on dataset.{key}: {self.members[0].run} has "
                        f"{value(first.dataset)}, {m.run} has {value(m.config.dataset)}; ensemble runs of one task."
                    )
        self.preprocessing = self.members[0].preprocessing  # The first member's, as its pixels.
        replicated, data = parallel.replicated(self.mesh), parallel.batch_sharding(self.mesh)
        self.variables = parallel.replicate(tuple(m.variables for m in self.members), self.mesh)
        specs = tuple(runs.ModelSpec.of(m) for m in self.members)
        self.log_probs_fn = jax.jit(
            functools.partial(_ensemble_log_probs, specs=specs),
            in_shardings=(replicated, data),
            out_shardings=data,
        )
        self.sums_fn = jax.jit(
            functools.partial(_eval_sums, specs=specs),
            in_shardings=(replicated, {"image": data, "label": data, "mask": data}),
            out_shardings=replicated,
        )

    def batches(self, source: Any, views: str, batch_size: int, num_workers: int = 0, name: str = "eval_batch_size"):
        """(number of batches, iterator of global device batches) over `source`, padded + masked;
        `name`: where `batch_size` came from, for the error when it does not divide."""
        return self.preprocessing.device_batches(source, views, batch_size, self.mesh, num_workers, name)

    def probabilities(self, source: Any, views: str, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """Per-example probabilities [N, C] and masks [N] (0: undecodable), in source order."""
        num, batches = self.batches(source, views, batch_size)
        probs, masks = [], []
        for batch in console.progress_bar(batches, num, "predict"):
            probs.append(np.exp(parallel.gather_rows(self.log_probs_fn(self.variables, batch["image"]))))
            masks.append(parallel.gather_rows(batch["mask"]))
        return np.concatenate(probs)[: len(source)], np.concatenate(masks)[: len(source)]

    def score(
        self, source: Any, views: str, batch_size: int, num_workers: int = 0, name: str = "eval_batch_size"
    ) -> dict[str, Any]:
        """count, top-1, top-5, mean per-class accuracy and loss over every example of `source`."""
        num, batches = self.batches(source, views, batch_size, num_workers, name)
        total = metrics.sum_over_batches(self.sums_fn, self.variables, console.progress_bar(batches, num, "eval"))
        return metrics.summarize_sums(total)


def evaluate_runs(
    run_dirs: Sequence[str],
    *,
    checkpoint: str | int = "latest",
    split: str | None = None,
    crops: int = 1,
    data_dir: str | None = None,
    batch_size: int | None = None,
    devices: Sequence[jax.Device] | None = None,
) -> dict[str, Any]:
    """Evaluates one run, or the ensemble of several, on a whole split.

    Args:
      run_dirs: run directories; more than one averages their probabilities.
      checkpoint: "latest", "best" or a step (the same for every member).
      split: the split to read (default: the first run's `dataset.val_split`).
      crops: 1 (centre crop) or 10 (10-crop, softmax averaged).
      data_dir: overrides the first run's `dataset.data_dir`.
      batch_size: global batch, the script's `--batch_size` (default: the first run's
        `eval_batch_size`); a size that does not divide over the devices is named as given.
      devices: devices of the mesh (default: all).

    Returns:
      A JSON-ready dict: count, top1, top5, mean_per_class, loss, plus what was evaluated.
    """
    if crops not in CROPS_TO_VIEWS:
        raise ConfigError(f"--crops={crops} is not supported; use 1 (centre crop) or 10 (10-crop).")
    members = [runs.load(run, checkpoint) for run in run_dirs]
    ensemble = Ensemble(members, parallel.make_mesh(devices))
    dataset = members[0].config.dataset
    if data_dir:
        dataset.data_dir = data_dir
    split = split or dataset.val_split
    source = sources.open_source(dataset, split)  # The whole split: no val_limit here.
    name = "--batch_size" if batch_size else "eval_batch_size"
    batch_size = batch_size or members[0].config.eval_batch_size
    num_workers = members[0].config.input.num_workers
    result = ensemble.score(source, CROPS_TO_VIEWS[crops], batch_size, num_workers, name)
    log_line(
        f"{split}: {result['count']} of {len(source)} images counted | top-1 {result['top1']:.4f} | "
        f"top-5 {result['top5']:.4f} | mean per-class {result['mean_per_class']:.4f} | loss {result['loss']:.4f}"
    )
    return dict(
        result,
        split=split,
        dataset=dataset.name,
        crops=crops,
        members=[{"run": m.run, "step": m.step, "model": m.config.model.name} for m in members],
    )


def evaluate_run(run: str, checkpoint: str | int = "latest", **kwargs: Any) -> dict[str, Any]:
    """`evaluate_runs` for one run; the result also has the checkpoint `step`."""
    result = evaluate_runs([run], checkpoint=checkpoint, **kwargs)
    return dict(result, step=result["members"][0]["step"])
