"""Training: `TrainState`, the pure `train_step` / `eval_step`, and one readable loop.

    state = jit(init, out_shardings=replicated)(rng)
    loop:  batch = to_global(next(data))          # sharded on the `data` axis
           state, metrics = jit(train_step, donate state)(state, batch)
           every `log_every`: metrics -> writers
           each evaluator of `config.evals` on its period (jaxres/evaluators.py), a checkpoint
           every epoch, every `checkpoint.every` and when the best metric is evaluated

Params are replicated and batches sharded over one `data` mesh axis, so
BatchNorm statistics are over the global batch. Everything a step needs comes
in as arguments.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxres import checkpoint as ckpt_lib
from jaxres import (
    console,
    device_augment,
    evaluators,
    interrupts,
    losses,
    optim,
    parallel,
    periods,
    plots,
    profiler,
    profiling,
    runs,
)
from jaxres import metrics as metrics_lib
from jaxres import dashboard
from jaxres import state as state_lib
from jaxres.data import dali, loader, sources
from jaxres.errors import ConfigError, NonFiniteLossError
from jaxres.state import TrainState


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    *,
    model: nn.Module,
    tx: optax.GradientTransformation,
    config: ml_collections.FrozenConfigDict,
    num_shards: int = 1,
) -> tuple[TrainState, metrics_lib.TrainMetrics]:
    """One optimizer step over `grad_accum_steps` micro-batches (`batch` is [A, B, ...]).

    The loss is the mask-weighted mean over all A * B examples; gradients of
    the micro-batches are summed, so A micro-batches of B equal one batch of
    A * B (BatchNorm statistics aside, which are per micro-batch). The step's
    randomness (erasing, Mixup / CutMix, drop-path) comes from (seed, step,
    micro-batch): a resumed run draws the same. `num_shards` is the number of
    devices the batch is split over (Mixup / CutMix pair rows within one).
    """
    total_weight = jnp.maximum(batch["mask"].sum(), 1.0)
    num_classes, loss_config = config.dataset.num_classes, config.loss
    step_rng = jax.random.fold_in(jax.random.key(config.seed), state.step)
    augment = device_augment.from_config(config.augment)

    def loss_fn(params, batch_stats, micro, rng):
        augment_rng, dropout_rng = jax.random.split(rng)
        images = runs.normalize(micro["image"], config.dataset.mean, config.dataset.std)
        targets = losses.dense_targets(micro["label"], num_classes, loss_config.label_smoothing)
        # Erasing, then Mixup / CutMix within each device's shard (timm's order).
        images, targets, weight = augment(augment_rng, images, targets, micro["mask"], num_shards=num_shards)
        (logits, _), new_vars = model.apply(
            {"params": params, "batch_stats": batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
            rngs={"dropout": dropout_rng},
        )
        per_example = losses.per_example_loss(logits, targets, loss_config.name, loss_config.bce_threshold)
        loss = (per_example * weight).sum() / total_weight
        correct = ((logits.argmax(-1) == micro["label"]) * micro["mask"]).sum()
        return loss, (new_vars.get("batch_stats", {}), correct)

    def micro_step(carry, indexed_micro):
        index, micro = indexed_micro
        grads, batch_stats, loss, correct = carry
        (m_loss, (batch_stats, m_correct)), m_grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, batch_stats, micro, jax.random.fold_in(step_rng, index)
        )
        grads = jax.tree.map(jnp.add, grads, m_grads)
        return (grads, batch_stats, loss + m_loss, correct + m_correct), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    init = (zeros, state.batch_stats, jnp.float32(0), jnp.float32(0))
    if config.grad_accum_steps == 1:  # XLA:CPU runs convolutions in a loop body far slower.
        first = (jnp.int32(0), jax.tree.map(lambda x: x[0], batch))
        (grads, batch_stats, loss, correct), _ = micro_step(init, first)
    else:
        indices = jnp.arange(config.grad_accum_steps, dtype=jnp.int32)
        (grads, batch_stats, loss, correct), _ = jax.lax.scan(micro_step, init, (indices, batch))

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema_params = state.ema_params
    if config.ema_decay:
        decay = config.ema_decay
        ema_params = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema_params, params)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state, ema_params=ema_params
    )
    finite = jnp.isfinite(loss) & jnp.isfinite(optax.global_norm(params))
    metrics = metrics_lib.TrainMetrics.single_from_model_output(
        loss=loss,
        top1=correct / total_weight,
        grad_norm=optax.global_norm(grads),
        finite=finite.astype(jnp.float32),
        skipped=(1.0 - batch["mask"]).sum(),  # Training batches have no padding: mask 0 = undecodable.
    )
    return new_state, metrics


def eval_step(
    variables: dict[str, Any], batch: dict[str, jax.Array], *, model: nn.Module, config: ml_collections.FrozenConfigDict
) -> dict[str, jax.Array]:
    """Masked sums over one batch: count, correct top-1 / top-5 (also per class), loss (cross-entropy,
    no label smoothing). Images [B, H, W, 3], or views [B, K, H, W, 3] whose probabilities are averaged
    (10-crop), as `jaxres.evaluate` does."""
    images = batch["image"]
    views = images.reshape((-1,) + images.shape[-3:])
    logits, _ = model.apply(variables, runs.normalize(views, config.dataset.mean, config.dataset.std), train=False)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    if images.ndim == 5:
        log_probs = metrics_lib.mean_over_views(log_probs.reshape(images.shape[0], images.shape[1], -1))
    return metrics_lib.classification_sums(log_probs, batch["label"], batch["mask"], per_class=True)


def eval_variables(state: TrainState, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The weights evaluation uses: the EMA when enabled."""
    return runs.eval_variables(state.params, state.ema_params, state.batch_stats, config.ema_decay)


def load_train_source(config: ml_collections.ConfigDict) -> Any:
    """The training source, checked against `dataset.num_classes` (evaluators open their own)."""
    train_source = sources.open_source(config.dataset, config.dataset.train_split)
    found = len(train_source.class_names)
    if found != config.dataset.num_classes:
        raise ConfigError(
            f"Dataset {config.dataset.name!r} has {found} classes but config.dataset.num_classes="
            f"{config.dataset.num_classes}; set --config.dataset.num_classes={found}."
        )
    if config.dataset.train_limit:
        train_source = sources.limited(train_source, config.dataset.train_limit)
    return train_source


def _check_finite(scalars: dict[str, float], first_step: int, last_step: int) -> None:
    """Raises when a step since the last check had a non-finite loss or produced non-finite params."""
    if scalars.pop("finite") < 1.0 or not math.isfinite(scalars["loss"]):
        raise NonFiniteLossError(
            f"The loss or the weights became non-finite (mean loss {scalars['loss']}) between steps "
            f"{first_step} and {last_step}; stopped "
            "without saving, so the last checkpoint is the last good state. Lower "
            "--config.optimizer.base_lr, add warmup or --config.optimizer.grad_clip_norm=1."
        )


def check_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> None:
    """Fails early, quoting the numbers, on settings that cannot work."""
    if config.grad_accum_steps < 1 or config.batch_size % config.grad_accum_steps:
        raise ConfigError(
            f"config.batch_size={config.batch_size} is not divisible by config.grad_accum_steps="
            f"{config.grad_accum_steps}."
        )
    parallel.check_batch_size(config.batch_size // config.grad_accum_steps, mesh)
    parallel.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    for name in ("log_every", "checkpoint.every", "optimizer.warmup", "optimizer.head_only"):
        periods.parse(config[name], name)
    evaluators.check(config)
    if periods.parse(config.optimizer.head_only, "optimizer.head_only")[0] and not config.init_from:
        raise ConfigError(
            f"config.optimizer.head_only={config.optimizer.head_only!r} trains only the "
            "head of a fresh model; set --config.init_from=RUN (fine-tuning) or "
            "--config.optimizer.head_only=0."
        )
    if config.augment.repeated_aug < 1:
        raise ConfigError(
            f"config.augment.repeated_aug={config.augment.repeated_aug}: each image is read that many "
            "times in a row; use 1 (off) or more (RSB A1 / A2: 3)."
        )
    dali.check_decoder(config)
    profiler.parse_profile_steps(config.profile_steps)
    device_augment.from_config(config.augment)  # Out-of-range values fail here, named.
    losses.check_loss(config.loss.name, config.loss.bce_threshold)
    runs.build_model(config)  # Unknown model names / fields fail here, before data loading.
    if config.init_from:
        state_lib.check_init_from_head(config)


def make_step_fns(
    config: ml_collections.ConfigDict, model: nn.Module, tx: optax.GradientTransformation, mesh: jax.sharding.Mesh
) -> tuple[Callable, Callable]:
    """`train_step` (state donated, batch [A, B, ...] sharded on B) and `eval_step`, jitted on `mesh`."""
    frozen = ml_collections.FrozenConfigDict(config)
    replicated = parallel.replicated(mesh)
    step_fn = jax.jit(
        functools.partial(train_step, model=model, tx=tx, config=frozen, num_shards=mesh.devices.size),
        in_shardings=(replicated, parallel.batch_sharding(mesh, batch_axis=1)),
        out_shardings=replicated,
        donate_argnums=0,
    )
    eval_fn = jax.jit(
        functools.partial(eval_step, model=model, config=frozen),
        in_shardings=(replicated, parallel.batch_sharding(mesh)),
        out_shardings=replicated,
    )
    return step_fn, eval_fn


def _schedule_and_optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: int, total_steps: int
) -> tuple[optax.Schedule, optax.GradientTransformation]:
    """The learning-rate schedule (logged) and the optimizer, with the head-only warm-up if asked."""
    schedule = optim.make_schedule(config.optimizer, config.batch_size, steps_per_epoch, total_steps)
    tx = optim.make_optimizer(config.optimizer, schedule)
    head_only = periods.to_steps(config.optimizer.head_only, steps_per_epoch, config.batch_size, "optimizer.head_only")
    if head_only:  # The body's schedule starts when it unfreezes.
        body_schedule = optim.make_schedule(config.optimizer, config.batch_size, steps_per_epoch, total_steps - head_only)
        tx = optim.head_only_warmup(tx, optim.make_optimizer(config.optimizer, body_schedule), head_only)
    return schedule, tx


def total_training_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    """`num_steps` when set, else `num_epochs` (fractions allowed) of steps; at least 1."""
    if config.num_steps:
        return int(config.num_steps)
    return max(1, int(config.num_epochs * steps_per_epoch))


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, devices: list[jax.Device] | None = None
) -> TrainState:
    """Trains (or resumes) the run in `workdir`; returns the final state.

    Args:
      config: a config from `configs/` (see `jaxres.config_base` for the keys).
      workdir: where config.json, metrics.jsonl, TensorBoard's events and checkpoints/ go.
      devices: the devices to use (default: all of every process).
    """
    mesh = parallel.make_mesh(devices)
    check_config(config, mesh)
    train_source = load_train_source(config)
    steps_per_epoch = max(1, len(train_source) // config.batch_size)
    total_steps = total_training_steps(config, steps_per_epoch)
    model = runs.build_model(config)
    schedule, tx = _schedule_and_optimizer(config, steps_per_epoch, total_steps)
    step_fn, eval_fn = make_step_fns(config, model, tx, mesh)

    if jax.process_index() == 0:
        runs.write_config(workdir, config)
    c = config.checkpoint
    checkpointer = ckpt_lib.Checkpointer(
        f"{workdir}/checkpoints", c.keep_latest, c.keep_best, best_metric=c.best_metric, best_mode=c.best_mode
    )
    preemption = interrupts.Preemption()
    writer = None
    try:
        state = state_lib.restore_or_init(config, checkpointer, model, tx, mesh)
        start = int(state.step)
        # Steps logged after the restored checkpoint (a crash, kill -9) are logged again: drop them.
        writer = metrics_lib.MetricWriter(workdir, resume_step=start)
        evals = evaluators.build(config, model, eval_fn, eval_variables(state, config), mesh, steps_per_epoch)
        console.log_line(
            f"{config.model.name}: {len(train_source)} train images, {steps_per_epoch} steps/epoch, steps "
            f"{start}..{total_steps}, {mesh.devices.size} devices, {jax.process_count()} process(es); "
            f"evaluators: {', '.join(f'{e.name} every {e.every or total_steps} steps' for e in evals)}."
        )
        batches = parallel.prefetch_to_device(
            loader.train_micro_batches(config, train_source, start * config.grad_accum_steps), mesh, batch_axis=1
        )

        timer, cost = profiling.training_timer(model, config, mesh.devices.size)
        if start < total_steps:  # Compiled here, found cached by the loop; one line says what a step costs.
            batches = profiling.compile_and_describe(step_fn, state, batches, timer, cost, config)
        loop = _Loop(config, checkpointer, writer, schedule, steps_per_epoch, total_steps, start, timer)
        window = profiler.ProfileWindow(config.profile_steps, dashboard.logdir(workdir))
        # Before `finally`: closing would wait for the dead.
        with interrupts.exit_if_a_peer_is_lost(), contextlib.closing(window):
            state = loop.run(state, batches, step_fn, evals, preemption, window)
    finally:
        preemption.restore()
        checkpointer.close()
        if writer is not None:
            writer.close()
    curves = os.path.join(workdir, "curves.png")
    if jax.process_index() == 0 and plots.write_curves([workdir], curves):
        console.log_line(f"Training curves: {curves}")
        dashboard.log_results(workdir, "curves", int(state.step), images={"pictures/curves": curves})
    return state


class _Loop:
    """The steps of one `train_and_evaluate` call: log, evaluate, save, stop when asked."""

    def __init__(
        self, config, checkpointer, writer, schedule, steps_per_epoch: int, total_steps: int, start: int, timer
    ):
        # Jitted: evaluated eagerly, each of the schedule's jnp ops would be compiled on its own.
        self.config, self.checkpointer, self.writer, self.schedule = config, checkpointer, writer, jax.jit(schedule)
        self.steps_per_epoch, self.total_steps = steps_per_epoch, total_steps
        every = functools.partial(periods.to_steps, steps_per_epoch=steps_per_epoch, batch_size=config.batch_size)
        self.log_every = every(config.log_every, name="log_every")
        self.checkpoint_every = every(config.checkpoint.every, name="checkpoint.every")
        self.timer = timer  # profiling.StepTimer: the one clock (input wait, device time, MFU, ETA).
        self.pending, self.pending_from = None, start

    def run(
        self, state: TrainState, batches: Iterator, step_fn: Callable, evals: list, preemption, window
    ) -> TrainState:
        """Steps from the state's step to `total_steps` (or to a signal); returns the last state."""
        c = self.config
        if int(state.step) == 0 and c.init_from:  # Fine-tuning: step 0 is the weights it starts from.
            with self.timer.paused(state):
                self.evaluate(evals, 0, True, state)
        for step in range(int(state.step) + 1, self.total_steps + 1):
            last = step == self.total_steps
            log_step = periods.due(step, self.log_every) or last
            batch = self.timer.next_batch(batches)  # Host time waiting for input; no device sync.
            window.before_step(step, state)
            state, step_metrics = self.timer.step(step_fn, state, batch, sample=log_step)
            window.after_step(step, step_metrics)
            self.pending = step_metrics if self.pending is None else self.pending.merge(step_metrics)
            if log_step:
                self.log(step)
            evaluating = any(e.due(step, last) for e in evals)
            saving = periods.due(step, self.checkpoint_every) or step % self.steps_per_epoch == 0 or last
            if evaluating or saving:
                with self.timer.paused(state):  # Evaluation and saving are not step time.
                    eval_metrics = self.evaluate(evals, step, last, state) if evaluating else {}
                    if saving or c.checkpoint.best_metric in eval_metrics:
                        self.save(step, state, eval_metrics)
            if preemption.should_stop(step, max(1, self.log_every)) and step < self.total_steps:
                if self.checkpointer.latest_step() != step:
                    self.save(step, state)
                self.checkpointer.wait()
                reason = preemption.reason()
                console.log_line(f"{reason}: saved step {step}; re-run the same command to resume.")
                break
        return state

    def evaluate(self, evals: list, step: int, last: bool, state: TrainState) -> dict[str, float]:
        """The evaluators due at `step` -> metrics.jsonl, TensorBoard, the console; their metrics."""
        eval_metrics = evaluators.run_due(evals, step, last, eval_variables(state, self.config))
        self.writer.write(step, dict(eval_metrics, epoch=step / self.steps_per_epoch))
        return eval_metrics

    def log(self, step: int) -> None:
        """Train metrics since the last log step -> metrics.jsonl, TensorBoard, the console."""
        timing = self.timer.summary(self.total_steps - step)  # First: the log's own time is not a step's.
        scalars = {k: float(v) for k, v in self.pending.compute().items()}
        _check_finite(scalars, self.pending_from, step)
        lr = float(self.schedule(step - 1))
        scalars.update(epoch=step / self.steps_per_epoch, lr=lr, **timing)
        self.writer.write(step, scalars)
        shown = {k: v for k, v in scalars.items() if k not in profiling.TIMING_KEYS}  # + img/s, ETA.
        line = console.progress_line(step, self.total_steps, self.steps_per_epoch, shown, self.timer.format(timing))
        console.log_line(line)
        warning = self.timer.input_warning(timing, self.config)
        if warning:
            console.log_line(warning)
        self.pending, self.pending_from = None, step

    def save(self, step: int, state: TrainState, eval_metrics: dict | None = None) -> None:
        """An asynchronous checkpoint of `state`; never one of a state that went non-finite."""
        if self.pending is not None:
            _check_finite({k: float(v) for k, v in self.pending.compute().items()}, self.pending_from, step)
        meta = runs.checkpoint_meta(self.config, step, step / self.steps_per_epoch)
        self.checkpointer.save(step, state, meta, eval_metrics)
