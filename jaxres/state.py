"""The training state and where a run starts from: resume, branch, fine-tune or scratch.

    state = state.restore_or_init(config, checkpointer, model, tx, mesh)

In this order (as big_vision's `train.py` documents it):
1. the newest intact checkpoint in the workdir (resume, mid-epoch included);
2. `config.resume_from=RUN[:STEP]`: that run's whole state at STEP (branch a run);
3. `config.init_from=RUN[:STEP]`: its params and batch stats through `runs.load` (the same
   damaged-checkpoint fallback as every reader), a fresh optimizer (fine-tune);
4. scratch: `fresh_state`, params replicated over the mesh.
The trainer (`jaxres.train`) only steps the state this returns.
"""

from __future__ import annotations

import functools
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax

from jaxres import checkpoint as ckpt_lib
from jaxres import parallel, runs
from jaxres.errors import CheckpointError, ConfigError
from jaxres.console import log_line


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training; saved whole in checkpoints."""

    step: jax.Array
    params: Any
    batch_stats: Any
    opt_state: Any
    ema_params: Any  # {} when EMA is off.


def init_state(
    model: nn.Module, tx: optax.GradientTransformation, config: ml_collections.ConfigDict, rng: jax.Array
) -> TrainState:
    """A fresh TrainState (jitted with replicated out_shardings by the caller)."""
    init_rng = jax.random.split(rng)[0]  # As when the state also kept an RNG: inits stay unchanged.
    size = config.dataset.image_size
    variables = model.init(init_rng, jnp.zeros((1, size, size, 3), jnp.float32), train=False)
    params = variables["params"]
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=variables.get("batch_stats", {}),
        opt_state=tx.init(params),
        ema_params=params if config.ema_decay else {},
    )


def fresh_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    config: ml_collections.ConfigDict,
    rng: jax.Array,
    mesh: jax.sharding.Mesh,
) -> TrainState:
    """`init_state`, compiled for a run-once program and replicated over `mesh`."""
    init = functools.partial(init_state, model, tx, config)
    return parallel.run_once(init, rng, out_shardings=parallel.replicated(mesh))


def restore_or_init(
    config: ml_collections.ConfigDict,
    checkpointer: ckpt_lib.Checkpointer,
    model: nn.Module,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
) -> TrainState:
    """The starting state, in the order of this module's docstring."""
    rng = jax.random.key(config.seed)
    init_fn = functools.partial(init_state, model, tx, config)
    abstract = jax.eval_shape(init_fn, rng)
    shardings = jax.tree.map(lambda _: parallel.replicated(mesh), abstract)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    steps = checkpointer.all_steps()
    if steps:  # The newest intact step: a damaged one is named and skipped.
        fix = "use another --workdir (or --config.init_from=THAT_RUN to fine-tune from it)."
        restore = functools.partial(
            _restore_state, checkpointer, abstract=abstract, config=config, where="The workdir", fix=fix
        )
        step, state = ckpt_lib.restore_newest_intact(checkpointer, steps, restore)
        checkpointer.set_aside_after(step)  # Damaged newer steps: training writes them anew.
        return state
    if config.resume_from:
        run, which = runs.parse_run_and_step(config.resume_from)
        source = runs.open_checkpoints(run)
        try:
            step = ckpt_lib.resolve_step(source, which)
            fix = "resume_from needs a run of the same model.name and dataset.num_classes."
            return _restore_state(source, step, abstract, config, f"resume_from={config.resume_from!r}", fix)
        finally:
            source.close()
    state = fresh_state(model, tx, config, rng, mesh)
    if config.init_from:
        state = load_init_from(config.init_from, state, mesh, config.init_fresh_head)
    return state


def _restore_state(
    checkpointer: ckpt_lib.Checkpointer,
    step: int,
    abstract: TrainState,
    config: ml_collections.ConfigDict,
    where: str,
    fix: str,
) -> TrainState:
    """The whole TrainState at `step`, into this mesh's shardings (any device or process count)."""
    runs.check_same_model(checkpointer.restore_meta(step), config, where, fix)
    log_line(f"Resuming from {checkpointer.directory} step {step}.")
    return checkpointer.restore(step, abstract)


def load_init_from(
    run: str, state: TrainState, mesh: jax.sharding.Mesh, fresh_head: bool = False
) -> TrainState:
    """`state` with another run's params / batch stats copied in (`run` is "RUN[:STEP]").

    The run is read as every reader reads one (`runs.load`: a damaged newest step falls back
    to the previous one), its trained weights (not the EMA). A head of another shape (or any
    head, with `fresh_head`) stays fresh.
    """
    loaded = runs.load(run, use_ema=False)
    extra = [
        jax.tree_util.keystr(p)
        for p, _ in jax.tree_util.tree_leaves_with_path(loaded.variables["params"])
        if _lookup(state.params, p) is None and "head" not in jax.tree_util.keystr(p)
    ]
    if extra:  # E.g. conv biases of a Keras import that this model config lacks.
        raise CheckpointError(
            f"init_from={run!r} has weights this model lacks, e.g. {', '.join(extra[:3])}; use the "
            f"model.name and model.overrides of {loaded.run}/config.json."
        )
    fresh = []

    def merge(path, new, old_tree):
        key = jax.tree_util.keystr(path)
        old = None if fresh_head and "head" in key else _lookup(old_tree, path)
        if old is not None and old.shape == new.shape:
            return jnp.asarray(old, new.dtype)
        if old is not None and "head" not in key:
            raise CheckpointError(
                f"init_from={run!r}: {key} has shape {old.shape} there but {new.shape} here; "
                "only the classifier head may differ. Is it the same model?"
            )
        fresh.append(key)
        return new

    params = jax.tree_util.tree_map_with_path(lambda p, x: merge(p, x, loaded.variables["params"]), state.params)
    stats = jax.tree_util.tree_map_with_path(
        lambda p, x: merge(p, x, loaded.variables["batch_stats"]), state.batch_stats
    )
    if len(fresh) == len(jax.tree.leaves(state.params)) + len(jax.tree.leaves(state.batch_stats)):
        raise CheckpointError(f"init_from={run!r} shares no parameter with model; is it the same architecture?")
    log_line(f"Initialised from {loaded.run} step {loaded.step}; fresh: {', '.join(fresh) or 'none'}.")
    # `parallel.replicate`, not `device_put`: each process fills only its own devices.
    return state.replace(params=parallel.replicate(params, mesh), batch_stats=parallel.replicate(stats, mesh))


def _lookup(tree: Any, path: tuple) -> Any:
    for entry in path:
        key = getattr(entry, "key", None)
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def check_init_from_head(config: ml_collections.ConfigDict) -> None:
    """An exported probe (`model.head_layer` / `head_hidden`) is fine-tuned with the same head."""
    run, _ = runs.parse_run_and_step(config.init_from)
    source = runs.read_config(run).model
    for key in ("head_layer", "head_hidden"):
        if source[key] != config.model[key] and not config.init_fresh_head:
            raise ConfigError(
                f"init_from={config.init_from!r} has model.{key}={source[key]!r}, this config "
                f"{config.model[key]!r}; set --config.model.{key}={source[key]} to fine-tune its head "
                "(or --config.init_fresh_head=true for a new one)."
            )
