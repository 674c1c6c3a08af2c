"""A run at rest: a directory holding `config.json` and `checkpoints/`.

    loaded = runs.load("runs/demo", "best")        # config, model, step, weights (EMA when kept)
    logits, features = loaded.model.apply(loaded.variables, runs.normalize(images, ...), train=False)

Every reader and writer of runs goes through here: training (the checkpoint
meta schema, `resume_from`, `init_from`), evaluation, features, prediction, the
transfer protocols and the weight converter. None of them imports the trainer.

What a run directory holds:

    RUN/config.json          the resolved config (`read_config` lays it over today's defaults)
    RUN/checkpoints/STEP/    orbax: `state` (TrainState, or {"params", "batch_stats"[, "ema_params"]}
                             for written runs) and `meta` (`checkpoint_meta`: step, epoch, data position,
                             model, classes, image size, dataset, config; plus what the writer adds)

Checkpoints are chosen as `latest`, `best` (highest `val_top1`; latest when none
has one) or a step number, parsed once by `parse_checkpoint`. Weights are always
restored to host-agnostic arrays on one local device, so a run trained on 8
devices (or 2 processes) is evaluated, probed or exported on 1.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from jaxres import checkpoint as ckpt_lib
from jaxres import models
from jaxres.config_base import base_config, upgrade_keys
from jaxres.data import preprocessing, sources
from jaxres.errors import CheckpointError, ConfigError, JaxresError
from jaxres.console import log_line

CHECKPOINT_NAMES = ("latest", "best")
CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


def parse_checkpoint(which: str | int) -> str | int:
    """"latest" | "best" | a step number (as text or int) -> "latest", "best" or an int step."""
    if isinstance(which, int) or which in CHECKPOINT_NAMES:
        return which
    try:
        return int(which)
    except (TypeError, ValueError):
        raise ConfigError(
            f"Checkpoint {which!r} is not 'latest', 'best' or a step number; e.g. --checkpoint best."
        ) from None


def parse_run_and_step(text: str) -> tuple[str, str | int]:
    """"RUN" or "RUN:STEP" (STEP: latest | best | a number) -> (RUN, STEP); STEP defaults to latest."""
    run, sep, step = text.rpartition(":")
    if sep and run and (step in CHECKPOINT_NAMES or step.isdigit()):
        return run, parse_checkpoint(step)
    return text, "latest"


def _run_and_checkpoint(run: str, checkpoint: str | int) -> tuple[str, str | int]:
    """`run` ("RUN" or "RUN:STEP") and a `checkpoint` argument -> (RUN, the one step choice)."""
    run_only, in_run = parse_run_and_step(run)
    which = parse_checkpoint(checkpoint)
    if run_only == run:  # No step in `run`.
        return run, which
    if which in ("latest", in_run):
        return run_only, in_run
    raise ConfigError(f"{run!r} names checkpoint {in_run!r} but the checkpoint asked for is {which!r}; give one.")


def run_directory(run: str) -> str:
    """The run's absolute directory (`RUN` or `RUN/checkpoints` both name it)."""
    run = os.path.abspath(os.path.expanduser(run.rstrip("/")))
    return os.path.dirname(run) if os.path.basename(run) == CHECKPOINT_DIR else run


def checkpoint_directory(run: str) -> str:
    """The orbax directory of a run: `RUN/checkpoints` (or `RUN` itself when it has none)."""
    run = run_directory(run)
    candidate = os.path.join(run, CHECKPOINT_DIR)
    if os.path.isdir(candidate):
        return candidate
    if os.path.isdir(run):
        return run
    raise CheckpointError(f"Run directory {run!r} does not exist; pass the --workdir of a training run.")


def read_config(run: str) -> ml_collections.ConfigDict:
    """`RUN/config.json` laid over `base_config()`, so keys added since the run still resolve."""
    path = os.path.join(run_directory(run), CONFIG_FILE)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"No {CONFIG_FILE} in {run!r}; pass the --workdir of a training run "
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
    with config.unlocked():  # A key this version no longer has still reads (and is unused).
        config.update(ml_collections.ConfigDict(upgrade_keys(saved)))
    return config


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    """Writes `workdir/config.json` (the resolved config, sorted keys)."""
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, CONFIG_FILE), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")


def build_model(config: ml_collections.ConfigDict) -> nn.Module:
    """The model of `config.model`, with the dataset's class count."""
    return models.create_model(
        config.model.name,
        num_classes=config.dataset.num_classes,
        dtype=config.model.dtype,
        **model_overrides(config),
    )


def model_overrides(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The `ResNet` fields the config sets beyond the registered model: `model.overrides`, the
    head keys (`model.head_layer`, `model.head_hidden`), `model.drop_path_rate` (training
    only: it changes no weight, so checkpoints and exports do not depend on it) and
    `model.cpu_conv` (how CPU convolutions run; no weight either)."""
    return dict(
        config.model.overrides.to_dict(),
        head_layer=config.model.head_layer,
        head_hidden=config.model.head_hidden,
        drop_path_rate=config.model.drop_path_rate,
        cpu_conv=config.model.cpu_conv,
    )


def normalize(images: jax.Array, mean: tuple, std: tuple) -> jax.Array:
    """uint8 NHWC -> float32, per channel (x - mean) / std (on device)."""
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return (images.astype(jnp.float32) - mean) / std


def checkpoint_meta(
    config: ml_collections.ConfigDict, step: int, epoch: float, **extra: Any
) -> dict[str, Any]:
    """The JSON saved beside every checkpoint's state; `extra` adds (or overrides) writer keys.

    `data_position` is the next micro-batch index of the training stream (resume).
    """
    meta = {
        "step": step,
        "epoch": epoch,
        "data_position": step * config.grad_accum_steps,
        "model": config.model.name,
        "num_classes": config.dataset.num_classes,
        "image_size": config.dataset.image_size,
        "dataset": config.dataset.name,
        "config_json": config.to_json_best_effort(sort_keys=True),
    }
    meta.update(extra)
    return meta


def check_same_model(meta: dict[str, Any], config: ml_collections.ConfigDict, where: str, fix: str) -> None:
    """CheckpointError when a checkpoint's meta names another model or class count than `config`."""
    if (meta["model"], meta["num_classes"]) != (config.model.name, config.dataset.num_classes):
        raise CheckpointError(
            f"{where} holds a checkpoint of model {meta['model']!r} with {meta['num_classes']} "
            f"classes, not {config.model.name!r} with {config.dataset.num_classes}; {fix}"
        )


def open_checkpoints(run: str) -> ckpt_lib.Checkpointer:
    """A read-only Checkpointer on a run's checkpoints."""
    return ckpt_lib.Checkpointer(checkpoint_directory(run), read_only=True)


def eval_variables(params: Any, ema_params: Any, batch_stats: Any, ema_decay: float) -> dict[str, Any]:
    """The weights evaluation uses: the EMA when the run kept one."""
    use_ema = bool(ema_decay) and bool(ema_params)
    return {"params": ema_params if use_ema else params, "batch_stats": batch_stats or {}}


@dataclasses.dataclass
class LoadedRun:
    """One run's model and weights, ready to apply.

    Attributes:
      run: the run directory.
      step: the checkpoint step the weights come from.
      config: the run's config (its `config.json` over the current defaults).
      model: the rebuilt flax module.
      variables: `{"params", "batch_stats"}` as host arrays (EMA params when kept).
      meta: the checkpoint's meta (see `checkpoint_meta`).
    """

    run: str
    step: int
    config: ml_collections.ConfigDict
    model: nn.Module
    variables: dict[str, Any]
    meta: dict[str, Any]

    @property
    def preprocessing(self) -> preprocessing.Preprocessing:
        """How evaluation and inference see an image (`jaxres.data.preprocessing.of` its config)."""
        return preprocessing.of(self.config)


def load(run: str, checkpoint: str | int = "latest", use_ema: bool = True) -> LoadedRun:
    """Rebuilds a run's model from its config.json and loads the weights of one checkpoint.

    Args:
      run: a run directory (`RUN` or `RUN/checkpoints` both work), or "RUN:STEP" (STEP: latest,
        best or a number: the one spelling of a run and a checkpoint, `parse_run_and_step`).
      checkpoint: "latest", "best" or a step (see `parse_checkpoint`); a STEP in `run` wins
        over the default "latest".
      use_ema: the EMA weights when the run kept them (what evaluation uses); False: the
        trained weights (fine-tuning from the run).

    Raises:
      CheckpointError: no config.json, no such checkpoint, or weights of another model.
      ConfigError: `run` names a step and `checkpoint` another one.
    """
    run, which = _run_and_checkpoint(run, checkpoint)
    run = run_directory(run)
    config = read_config(run)
    model = build_model(config)
    checkpointer = open_checkpoints(run)
    try:
        step = ckpt_lib.resolve_step(checkpointer, which)
        if which == "latest":  # Damage found only while reading: named, and the previous step used.
            read = lambda s: (checkpointer.restore_params(s), checkpointer.restore_meta(s))  # noqa: E731
            older = [s for s in checkpointer.all_steps() if s <= step]
            step, (restored, meta) = ckpt_lib.restore_newest_intact(checkpointer, older, read)
        else:
            restored, meta = checkpointer.restore_params(step), checkpointer.restore_meta(step)
    finally:
        checkpointer.close()
    ema_decay = config.ema_decay if use_ema else 0.0
    variables = eval_variables(restored["params"], restored.get("ema_params"), restored.get("batch_stats"), ema_decay)
    check_variables(variables, model, config.dataset.image_size, f"{run} step {step}")
    return LoadedRun(run=run, step=step, config=config, model=model, variables=variables, meta=meta)


def class_names(loaded: LoadedRun) -> list[str]:
    """The run's class names: those its checkpoint recorded, else its dataset's, else "0".."C-1"."""
    if loaded.meta.get("class_names"):
        return list(loaded.meta["class_names"])
    try:
        return list(sources.open_source(loaded.config.dataset, loaded.config.dataset.train_split).class_names)
    except JaxresError as e:
        log_line(f"Class names unavailable ({str(e)[:120]}...); printing class numbers.")
        return [str(i) for i in range(loaded.config.dataset.num_classes)]


def check_variables(variables: dict[str, Any], model: nn.Module, image_size: int, where: str) -> None:
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
                f"The checkpoint at {where} does not fit model {describe_model(model)}: {key} is {a} there "
                f"but {b} in the model. Is config.json the one this checkpoint was trained with?"
            )


def describe_model(model: nn.Module) -> str:
    """A short description for messages: block type, stage sizes and class count."""
    return f"({model.block}, stages {tuple(model.stage_sizes)}, {model.num_classes} classes)"


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What a jitted forward pass closes over: the module and its input normalisation (hashable)."""

    model: nn.Module
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def of(cls, loaded: LoadedRun) -> ModelSpec:
        prep = loaded.preprocessing
        return cls(loaded.model, prep.mean, prep.std)

    def apply(
        self, variables: dict[str, Any], images: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array], int]:
        """uint8 views [B, K, H, W, 3] (or [B, H, W, 3]) -> (logits, features) of all B * K views, and K."""
        if images.ndim == 4:
            images = images[:, None]
        b, k = images.shape[:2]
        x = normalize(images.reshape((b * k,) + images.shape[2:]), self.mean, self.std)
        logits, features = self.model.apply(variables, x, train=False)
        return logits, features, k


def write_run(
    output: str,
    config: ml_collections.ConfigDict,
    variables: dict[str, Any],
    overwrite: bool = False,
    **meta: Any,
) -> str:
    """Writes a run (config.json + a step-0 checkpoint of `variables`) for converters and exporters.

    Args:
      output: a new directory (or one without checkpoints).
      config: the full config the run is read back with.
      variables: {"params", "batch_stats"} host arrays.
      overwrite: replace the checkpoints a run already has in `output` (else an error).
      **meta: extra checkpoint meta, e.g. the source file, preprocessing, class names.

    Returns:
      The absolute output directory.
    """
    output = os.path.abspath(os.path.expanduser(output))
    ckpt_dir = os.path.join(output, CHECKPOINT_DIR)
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        if not overwrite:
            raise CheckpointError(f"{output} already holds checkpoints; pass a new output directory.")
        shutil.rmtree(ckpt_dir)
    write_config(output, config)
    checkpointer = ckpt_lib.Checkpointer(ckpt_dir, keep_latest=1, keep_best=1)
    checkpointer.save(0, variables, checkpoint_meta(config, 0, 0.0, **meta))
    checkpointer.close()
    return output
