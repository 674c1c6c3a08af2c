"""Checkpoint evaluation: a whole split, centre or 10-crop, one run or an ensemble.

    python scripts/evaluate.py --workdir runs/demo [--checkpoint best] [--crops 10] \
        [--ensemble runs/a,runs/b] [--split val] [--output results.json]

A *member* is one run directory (a training workdir, or the run-like directory
the weight converter writes: `config.json` + `checkpoints/`): its model is rebuilt
from `RUN/config.json` and its weights come from `Checkpointer.restore_params`
(the EMA weights when the run kept an EMA).

One jitted function maps a batch of uint8 views [B, K, H, W, 3] (K = 1 centre
crop, 2 with the mirror image, 10 for 10-crop: `transforms.TenCropTransform`)
to class probabilities [B, C]:
softmax per view, averaged over the K views and then over the members.
Averaging probabilities (not logits) is the usual 10-crop / ensemble rule
(Krizhevsky et al. 2012, He et al. 2016); it keeps each view's confidence.
Parameters are replicated and the batch sharded over the `data` mesh axis;
the split is padded to whole global batches with masked copies, so every
example is counted exactly once on any number of devices and processes.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxres import checkpoint as ckpt_lib
from jaxres import parallel
from jaxres.config_base import base_config
from jaxres.data import pipeline, sources, transforms
from jaxres.errors import CheckpointError, ConfigError, unknown_name
from jaxres.metrics import log_line, masked_eval_sums

VIEWS = {"center": 1, "flip": 2, "10crop": 10}
CROPS_TO_VIEWS = {1: "center", 10: "10crop"}


@dataclasses.dataclass
class Member:
    """One run's model and weights, ready to evaluate.

    Attributes:
      run: the run directory.
      step: the checkpoint step the weights come from.
      config: the run's config (its `config.json` over the current defaults).
      model: the rebuilt flax module.
      variables: `{"params", "batch_stats"}` as host arrays.
    """

    run: str
    step: int
    config: ml_collections.ConfigDict
    model: nn.Module
    variables: dict[str, Any]


def run_config(run: str) -> ml_collections.ConfigDict:
    """`RUN/config.json` laid over `base_config()`, so keys added since the run still resolve."""
    path = os.path.join(os.path.expanduser(run), "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(
            f"No config.json in {run!r}; pass the --workdir of a training run "
            "(or a directory written by scripts/convert_weights.py)."
        )
    with open(path) as f:
        try:
            saved = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(
                f"{path} is not valid JSON ({e}); restore it from the run's checkpoint meta."
            ) from None
    config = base_config()
    config.update(ml_collections.ConfigDict(saved))
    return config


def load_member(run: str, checkpoint: str | int = "latest") -> Member:
    """Rebuilds a run's model from its config.json and loads its weights.

    Args:
      run: a run directory (`RUN` or `RUN/checkpoints` both work).
      checkpoint: "latest", "best" (highest val_top1; latest when none has one) or a step.

    Returns:
      The member, with EMA weights when the run trained with `ema_decay > 0`.

    Raises:
      CheckpointError: no config.json, no such checkpoint, or weights of another model.
    """
    run = os.path.expanduser(run.rstrip("/"))
    if os.path.basename(run) == "checkpoints":
        run = os.path.dirname(run)
    config = run_config(run)
    from jaxres import train  # Lazy: train imports grain workers and orbax managers.

    model = train.create_model(config)
    checkpointer = ckpt_lib.Checkpointer(ckpt_lib.run_checkpoint_dir(run), read_only=True)
    try:
        step = ckpt_lib.resolve_step(checkpointer, checkpoint)
        restored = checkpointer.restore_params(step)
    finally:
        checkpointer.close()
    use_ema = bool(config.ema_decay) and bool(restored.get("ema_params"))
    variables = {
        "params": restored["ema_params"] if use_ema else restored["params"],
        "batch_stats": restored.get("batch_stats", {}),
    }
    check_variables(variables, model, config.dataset.image_size, f"{run} step {step}")
    return Member(run=run, step=step, config=config, model=model, variables=variables)


def check_variables(
    variables: dict[str, Any], model: nn.Module, image_size: int, where: str
) -> None:
    """Raises CheckpointError naming the first weight whose shape differs from `model`'s."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    expected = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
    want = flax.traverse_util.flatten_dict(flax.core.unfreeze(expected), sep="/")
    got = flax.traverse_util.flatten_dict({k: v for k, v in variables.items() if v}, sep="/")
    for key in sorted(set(want) | set(got)):
        a = tuple(got[key].shape) if key in got else "missing"
        b = tuple(want[key].shape) if key in want else "absent"
        if a != b:
            raise CheckpointError(
                f"The checkpoint at {where} does not fit model {model_name(model)}: {key} is {a} there "
                f"but {b} in the model. Is config.json the one this checkpoint was trained with?"
            )


def model_name(model: nn.Module) -> str:
    """A short description for messages: block type, stage sizes and class count."""
    return f"({model.block}, stages {tuple(model.stage_sizes)}, {model.num_classes} classes)"


def view_transform(image_size: int, crop_ratio: float, views: str) -> Callable[[dict], dict]:
    """The host transform for `views`: "center", "flip" (centre + mirror) or "10crop"."""
    if views not in VIEWS:
        raise ConfigError(unknown_name("views", views, VIEWS))
    if views == "10crop":
        return transforms.TenCropTransform(image_size, crop_ratio)
    centre = transforms.EvalTransform(image_size, crop_ratio)
    return centre if views == "center" else CentreAndMirror(centre)


class CentreAndMirror:
    """The centre crop and its mirror image, stacked [2, H, W, 3] (a grain map callable)."""

    def __init__(self, centre: Callable[[dict], dict]):
        self.centre = centre

    def __call__(self, record: dict[str, Any]) -> dict[str, Any]:
        example = self.centre(record)
        example["image"] = np.stack(
            [example["image"], np.ascontiguousarray(example["image"][:, ::-1])]
        )
        return example


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What a jitted forward pass closes over: the module and its input normalisation."""

    model: nn.Module
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, member: Member) -> ModelSpec:
        return cls(
            member.model, tuple(member.config.dataset.mean), tuple(member.config.dataset.std)
        )

    def apply(
        self, variables: dict[str, Any], images: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array], int]:
        """uint8 views [B, K, H, W, 3] (or [B, H, W, 3]) -> (logits, features) of all B * K views, and K."""
        from jaxres.train import normalize  # Lazy: train pulls in the whole trainer.

        if images.ndim == 4:
            images = images[:, None]
        b, k = images.shape[:2]
        x = normalize(images.reshape((b * k,) + images.shape[2:]), self.mean, self.std)
        logits, features = self.model.apply(variables, x, train=False)
        return logits, features, k


def member_probs(spec: ModelSpec, variables: dict[str, Any], images: jax.Array) -> jax.Array:
    """Softmax averaged over views: uint8 [B, K, H, W, 3] (or [B, H, W, 3]) -> [B, C] float32."""
    logits, _, k = spec.apply(variables, images)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    return probs.reshape(-1, k, probs.shape[-1]).mean(axis=1)


def _ensemble_probs(
    variables: tuple, images: jax.Array, *, specs: tuple[ModelSpec, ...]
) -> jax.Array:
    probs = [member_probs(s, v, images) for s, v in zip(specs, variables)]
    return sum(probs) / len(probs)


def _eval_sums(
    variables: tuple, batch: dict[str, jax.Array], *, specs: tuple[ModelSpec, ...]
) -> dict:
    """Masked sums over a batch, from the averaged probabilities (so loss = ensemble NLL)."""
    probs = _ensemble_probs(variables, batch["image"], specs=specs)
    labels = batch["label"]
    p_true = jnp.take_along_axis(probs, labels[:, None], axis=1)[:, 0]
    loss = -jnp.log(jnp.maximum(p_true, 1e-12))
    return masked_eval_sums(probs, labels, batch["mask"], loss, per_class=True)


class Ensemble:
    """One or more members evaluated together on a mesh (params replicated, batch sharded)."""

    def __init__(self, members: Sequence[Member], mesh: jax.sharding.Mesh | None = None):
        self.members = tuple(members)
        self.mesh = mesh if mesh is not None else parallel.make_mesh()
        first = self.members[0].config
        for m in self.members[1:]:
            for key in ("num_classes", "image_size"):
                if m.config.dataset[key] != first.dataset[key]:
                    raise ConfigError(
                        f"Ensemble members disagree on dataset.{key}: {self.members[0].run} has "
                        f"{first.dataset[key]}, {m.run} has {m.config.dataset[key]}; ensemble runs of one task."
                    )
        self.image_size = first.dataset.image_size
        self.crop_ratio = first.dataset.eval_crop_ratio
        replicated, data = parallel.replicated(self.mesh), parallel.batch_sharding(self.mesh)
        self.variables = parallel.replicate(tuple(m.variables for m in self.members), self.mesh)
        specs = tuple(ModelSpec.of(m) for m in self.members)
        self.probs_fn = jax.jit(
            functools.partial(_ensemble_probs, specs=specs),
            in_shardings=(replicated, data),
            out_shardings=data,
        )
        self.sums_fn = jax.jit(
            functools.partial(_eval_sums, specs=specs),
            in_shardings=(replicated, {"image": data, "label": data, "mask": data}),
            out_shardings=replicated,
        )

    def batches(self, source: Any, views: str, batch_size: int, num_workers: int = 0):
        """(number of batches, iterator of global device batches) over `source`, padded + masked."""
        parallel.check_batch_size(batch_size, self.mesh, "eval_batch_size")
        batches = pipeline.eval_batches(
            source,
            view_transform(self.image_size, self.crop_ratio, views),
            global_batch_size=batch_size,
            num_workers=num_workers,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
        num = pipeline.num_eval_batches(len(source), batch_size)
        return num, (b for _, b in zip(range(num), parallel.prefetch_to_device(batches, self.mesh)))

    def probabilities(
        self, source: Any, views: str = "center", batch_size: int = 64
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per-example probabilities [N, C] and masks [N] (0: undecodable), in source order."""
        num, batches = self.batches(source, views, batch_size)
        probs, masks = [], []
        for batch in progress(batches, num, "predict"):
            probs.append(parallel.gather_rows(self.probs_fn(self.variables, batch["image"])))
            masks.append(parallel.gather_rows(batch["mask"]))
        return np.concatenate(probs)[: len(source)], np.concatenate(masks)[: len(source)]

    def evaluate(
        self, source: Any, views: str = "center", batch_size: int = 64, num_workers: int = 0
    ) -> dict[str, Any]:
        """top-1, top-5, mean per-class accuracy and loss over every example of `source`."""
        num, batches = self.batches(source, views, batch_size, num_workers)
        total = None
        for batch in progress(batches, num, "eval"):
            sums = self.sums_fn(self.variables, batch)
            total = sums if total is None else jax.tree.map(jnp.add, total, sums)
        total = parallel.fetch(total)
        count = float(total["count"])
        present = total["class_count"] > 0
        per_class = total["class_correct"][present] / total["class_count"][present]
        return {
            "count": int(count),
            "top1": float(total["correct1"]) / count,
            "top5": float(total["correct5"]) / count,
            "mean_per_class": float(per_class.mean()),
            "loss": float(total["loss_sum"]) / count,
        }


def progress(iterable: Any, total: int, desc: str) -> Any:
    """A progress bar on process 0 when stderr is a terminal (tqdm ships with tensorflow-datasets)."""
    from tqdm import tqdm

    disable = None if jax.process_index() == 0 else True  # None: off when not a TTY.
    return tqdm(iterable, total=total, desc=desc, unit="batch", disable=disable, leave=False)


def evaluate_runs(
    runs: Sequence[str],
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
      runs: run directories; more than one averages their probabilities.
      checkpoint: "latest", "best" or a step (the same for every member).
      split: the split to read (default: the first run's `dataset.val_split`).
      crops: 1 (centre crop) or 10 (10-crop, softmax averaged).
      data_dir: overrides the first run's `dataset.data_dir`.
      batch_size: global batch (default: the run's `eval_batch_size`).
      devices: devices of the mesh (default: all).

    Returns:
      A JSON-ready dict: count, top1, top5, mean_per_class, loss, plus what was evaluated.
    """
    if crops not in CROPS_TO_VIEWS:
        raise ConfigError(f"--crops={crops} is not supported; use 1 (centre crop) or 10 (10-crop).")
    members = [load_member(run, checkpoint) for run in runs]
    ensemble = Ensemble(members, parallel.make_mesh(devices))
    dataset = members[0].config.dataset
    if data_dir:
        dataset.data_dir = data_dir
    split = split or dataset.val_split
    source = sources.open_source(dataset, split)  # The whole split: no val_limit here.
    batch_size = batch_size or members[0].config.eval_batch_size
    metrics = ensemble.evaluate(source, CROPS_TO_VIEWS[crops], batch_size, dataset.num_workers)
    log_line(
        f"{split}: {metrics['count']} of {len(source)} images counted | top-1 {metrics['top1']:.4f} | "
        f"top-5 {metrics['top5']:.4f} | mean per-class {metrics['mean_per_class']:.4f} | loss {metrics['loss']:.4f}"
    )
    return dict(
        metrics,
        split=split,
        dataset=dataset.name,
        crops=crops,
        members=[
            {"run": os.path.abspath(m.run), "step": m.step, "model": m.config.model.name}
            for m in members
        ],
    )


def evaluate_run(run: str, checkpoint: str | int = "latest", **kwargs: Any) -> dict[str, Any]:
    """`evaluate_runs` for one run; the result also has the checkpoint `step`."""
    result = evaluate_runs([run], checkpoint=checkpoint, **kwargs)
    return dict(result, step=result["members"][0]["step"])
