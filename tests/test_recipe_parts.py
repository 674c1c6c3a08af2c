"""Parts of timm's "ResNet strikes back" recipes: stochastic depth, BCE / soft-target losses, LAMB.

* Stochastic depth (`ResNet.drop_path_rate`): identity at eval, per-example 0 or
  branch / keep in training with the expectation kept, timm's linear per-block ramp
  (compared with timm's built blocks), no new parameters, and training-only for the
  exporter and checkpoints.
* Losses (`jaxres.losses`) against timm `SoftTargetCrossEntropy` / `BinaryCrossEntropy`
  (torch, float32) within 1e-6, including the A1 targets (Mixup smoothed 0.1, threshold 0.2).
* LAMB (`optimizer.name = "lamb"`) against `timm.optim.Lamb` built by `create_optimizer_v2`
  (its no-decay groups, max_grad_norm 1.0) over 5 steps, and the decay mask against timm's
  grouping of a real resnet18.

The timm / torch comparisons are skipped when the `[convert]` extra is not installed.
"""

from __future__ import annotations

import functools
import importlib.util

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxres import losses, models, optim, parallel, runs
from jaxres.config_base import base_config
from jaxres.convert import exporter
from jaxres.errors import ConfigError
from jaxres.models.resnet import ResidualBlock, ResNet

needs_timm = pytest.mark.skipif(
    importlib.util.find_spec("timm") is None or importlib.util.find_spec("torch") is None,
    reason="needs timm and torch (the [convert] extra)",
)

# A small v1.5 net: 4 blocks, BatchNorm, 16x16 inputs; cheap to apply many times on CPU.
TINY = {
    "stage_sizes": (2, 2),
    "widths": (8, 16),
    "block": "basic",
    "stem_width": 8,
    "preact": False,
}


def _tiny(rate: float) -> ResNet:
    return ResNet(num_classes=5, drop_path_rate=rate, **TINY)


def _images(n: int = 6, size: int = 16) -> jax.Array:
    return jax.random.normal(jax.random.key(1), (n, size, size, 3))


# --- Stochastic depth ---------------------------------------------------------------------------


def test_drop_path_adds_no_parameters_and_is_identity_at_eval():
    x = _images()
    plain, dropped = _tiny(0.0), _tiny(0.5)
    # Jitted, here and below: run eagerly, every op would be compiled on its own (seconds).
    variables = parallel.run_once(plain.init, jax.random.key(0), x)
    dropped_structure = jax.tree.structure(jax.eval_shape(dropped.init, jax.random.key(0), x))
    assert dropped_structure == jax.tree.structure(variables)
    want = jax.jit(plain.apply)(variables, x)[0]
    apply_dropped = jax.jit(dropped.apply)
    for seed in (0, 1):  # Eval ignores the rng (and needs none).
        got = apply_dropped(variables, x, rngs={"dropout": jax.random.key(seed)})[0]
        np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(apply_dropped(variables, x)[0], want)


def test_train_mode_drop_path_needs_a_dropout_rng():
    x = _images()
    model = _tiny(0.2)
    variables = parallel.run_once(model.init, jax.random.key(0), x)
    # Traced only: the errors come from tracing, and eager applies compile op by op.
    train_apply = functools.partial(
        jax.eval_shape, functools.partial(model.apply, train=True, mutable=["batch_stats"])
    )
    with pytest.raises(ValueError, match=r'rngs=\{"dropout": key\}'):
        train_apply(variables, x)
    with pytest.raises(ValueError, match="dropout"):  # Not silently the "params" stream.
        train_apply(variables, x, rngs={"params": jax.random.key(0)})
    train_apply(variables, x, rngs={"dropout": jax.random.key(0)})
    rate_0 = functools.partial(_tiny(0.0).apply, train=True, mutable=["batch_stats"])
    jax.eval_shape(rate_0, variables, x)  # No rng needed.


def test_drop_path_rate_out_of_range_is_a_config_error():
    with pytest.raises(ConfigError, match=r"config\.model\.drop_path_rate.*\[0, 1\)"):
        models.create_model("resnet18", drop_path_rate=1.0)


def _block(rate: float) -> ResidualBlock:
    # Pre-activation, no projection: the output is exactly branch + input.
    return ResidualBlock(
        width=8,
        strides=1,
        block="basic",
        preact=True,
        conv=functools.partial(nn.Conv, use_bias=False),
        norm=functools.partial(nn.GroupNorm, num_groups=2),
        act=nn.relu,
        drop_path=rate,
    )


def test_drop_path_drops_whole_examples_and_keeps_the_expectation():
    rate, keep, draws = 0.3, 0.7, 4000
    x = jax.random.normal(jax.random.key(2), (4, 6, 6, 8))
    variables = parallel.run_once(_block(0.0).init, jax.random.key(0), x)
    branch = np.asarray(jax.jit(functools.partial(_block(0.0).apply, train=True))(variables, x) - x)
    assert np.all(np.abs(branch).max(axis=(1, 2, 3)) > 0.1)  # Dropped and kept tell apart.

    block = _block(rate)
    apply = jax.jit(
        jax.vmap(lambda key: block.apply(variables, x, train=True, rngs={"dropout": key}) - x)
    )
    dropped = np.asarray(apply(jax.random.split(jax.random.key(3), draws)))  # [draws, 4, ...]
    # Every example's branch is either gone or scaled by 1 / keep, as a whole.
    zero = np.all(dropped == 0, axis=(2, 3, 4))
    scaled = np.all(np.isclose(dropped, branch / keep, rtol=1e-5, atol=1e-6), axis=(2, 3, 4))
    assert np.all(zero ^ scaled)
    # Each example has its own draw (some draws keep part of the batch), `rate` of them dropped.
    assert np.any(zero.any(axis=1) & ~zero.all(axis=1))
    np.testing.assert_allclose(zero.mean(axis=0), rate, atol=0.03)
    # Expectation kept: the mean over draws approaches the rate-0 branch (5 sigma of the mean).
    sigma = np.sqrt(rate / keep / draws)
    np.testing.assert_allclose(dropped.mean(axis=0), branch, atol=5 * sigma * np.abs(branch).max())
    # At eval the block is the plain one.
    np.testing.assert_array_equal(
        jax.jit(block.apply)(variables, x), jax.jit(_block(0.0).apply)(variables, x)
    )


def _built_block_rates(model: ResNet, image_size: int = 32) -> dict[str, float]:
    """The `drop_path` of every ResidualBlock the model builds, by name, in build order."""
    rates = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, ResidualBlock) and context.method_name == "__call__":
            rates[context.module.name] = context.module.drop_path
        return next_fun(*args, **kwargs)

    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    with nn.intercept_methods(record):
        jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
    return rates


@needs_timm
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnetv2_50"])
def test_block_rates_are_timms_linear_ramp(name):
    import timm

    model = models.create_model(name, num_classes=0, drop_path_rate=0.05)
    rates = _built_block_rates(model)
    assert list(rates) == [
        f"stage{s}_block{b}" for s, n in enumerate(model.stage_sizes, 1) for b in range(1, n + 1)
    ]
    ours = np.array(list(rates.values()))
    np.testing.assert_allclose(ours, np.linspace(0, 0.05, len(ours)), rtol=0, atol=1e-12)
    assert [r for stage in model.block_drop_rates() for r in stage] == list(rates.values())

    net = timm.create_model(name, pretrained=False, num_classes=0, drop_path_rate=0.05)
    stages = (
        [net.layer1, net.layer2, net.layer3, net.layer4]
        if hasattr(net, "layer1")
        else [s.blocks for s in net.stages]
    )
    theirs = [float(getattr(b.drop_path, "drop_prob", 0.0)) for stage in stages for b in stage]
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-9)  # timm's linspace is float32.


def test_drop_path_is_training_only_for_exports_and_checkpoints(tmp_path):
    assert exporter.twin("timm", "resnet50", {"drop_path_rate": 0.05}) == "resnet50"
    config = base_config()
    config.model.name, config.model.dtype, config.model.drop_path_rate = "resnet18", "float32", 0.05
    config.dataset.num_classes, config.dataset.image_size = 10, 32
    assert runs.model_overrides(config)["drop_path_rate"] == 0.05
    model = runs.build_model(config)
    assert model.drop_path_rate == 0.05
    assert (
        exporter.twin("torchvision", config.model.name, runs.model_overrides(config)) == "resnet18"
    )

    init = functools.partial(model.init, train=False)
    variables = parallel.run_once(init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
    run = runs.write_run(str(tmp_path / "run"), config, jax.tree.map(np.asarray, variables))
    loaded = runs.load(run)  # Shapes checked against a model built with the rate.
    assert loaded.model.drop_path_rate == 0.05
    other = base_config()
    other.model.name, other.dataset.num_classes = "resnet18", 10  # Another rate: the same model.
    runs.check_same_model(loaded.meta, other, "init_from", "use another run.")
    if importlib.util.find_spec("safetensors") is not None:
        written = exporter.export(run, "timm", str(tmp_path / "r18.safetensors"))
        assert written["model"] == "resnet18"


# --- Losses -------------------------------------------------------------------------------------

B, K = 8, 10


def _logits_and_labels() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.normal(0, 3, (B, K)).astype(np.float32), rng.integers(0, K, B)


def test_dense_targets_and_loss_dispatch():
    logits, labels = _logits_and_labels()
    targets = np.asarray(losses.dense_targets(labels, K, 0.1))
    assert targets.dtype == np.float32
    np.testing.assert_allclose(targets.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(targets[np.arange(B), labels], 0.9 + 0.01, rtol=1e-6)
    assert np.isclose(targets.min(), 0.01)
    for kind, fn in (
        ("softmax", losses.softmax_cross_entropy),
        ("bce", losses.binary_cross_entropy),
    ):
        got = losses.per_example_loss(jnp.asarray(logits, jnp.bfloat16), targets, kind)
        assert got.shape == (B,) and got.dtype == jnp.float32
        np.testing.assert_array_equal(
            losses.per_example_loss(logits, targets, kind), fn(logits, targets)
        )
    with pytest.raises(ConfigError, match=r"config\.loss\.name 'bse'.*Did you mean 'bce'"):
        losses.per_example_loss(logits, targets, "bse")
    with pytest.raises(ConfigError, match=r"config\.loss\.bce_threshold=0\.2.*name='bce'"):
        losses.per_example_loss(logits, targets, "softmax", 0.2)


@needs_timm
def test_losses_match_timm():
    import torch
    from timm.data.mixup import mixup_target
    from timm.loss import BinaryCrossEntropy, SoftTargetCrossEntropy

    logits, labels = _logits_and_labels()
    x, y = torch.from_numpy(logits), torch.from_numpy(labels)

    def close(ours, theirs):
        np.testing.assert_allclose(np.mean(np.asarray(ours)), float(theirs), rtol=1e-6, atol=1e-6)

    # Soft targets (label-smoothed one-hot): timm's mean == the mean of ours, row by row too.
    smooth = mixup_target(y, K, lam=1.0, smoothing=0.1)
    np.testing.assert_allclose(
        losses.dense_targets(labels, K, 0.1), smooth.numpy(), rtol=1e-7, atol=1e-8
    )
    ce = SoftTargetCrossEntropy()
    per_row = [float(ce(x[i : i + 1], smooth[i : i + 1])) for i in range(B)]
    ours = losses.softmax_cross_entropy(logits, smooth.numpy())
    np.testing.assert_allclose(ours, per_row, rtol=1e-6, atol=1e-6)
    close(ours, ce(x, smooth))

    # BCE on integer targets, smoothed by timm itself.
    close(
        losses.binary_cross_entropy(logits, losses.dense_targets(labels, K, 0.1)),
        BinaryCrossEntropy(smoothing=0.1)(x, y),
    )
    # The A1 targets: Mixup (lam 0.7) of 0.1-smoothed labels, binarised above 0.2.
    mixed = mixup_target(y, K, lam=0.7, smoothing=0.1)
    ours_mixed = 0.7 * losses.dense_targets(labels, K, 0.1) + 0.3 * losses.dense_targets(
        labels[::-1], K, 0.1
    )
    np.testing.assert_allclose(ours_mixed, mixed.numpy(), rtol=1e-6, atol=1e-7)
    a1 = losses.per_example_loss(logits, mixed.numpy(), "bce", 0.2)
    close(a1, BinaryCrossEntropy(target_threshold=0.2)(x, mixed))
    # The threshold really binarises (the soft-target loss differs).
    assert not np.allclose(a1, losses.binary_cross_entropy(logits, mixed.numpy()))
    close(losses.binary_cross_entropy(logits, mixed.numpy()), BinaryCrossEntropy()(x, mixed))


# --- LAMB ---------------------------------------------------------------------------------------


def _lamb_config(weight_decay: float = 0.02, clip: float = 1.0):
    opt = base_config().optimizer
    opt.name, opt.weight_decay, opt.grad_clip_norm = "lamb", weight_decay, clip
    return opt


@needs_timm
def test_lamb_matches_timm():
    import torch
    from timm.optim import Lamb, create_optimizer_v2

    rng = np.random.default_rng(0)
    params = {
        "dense": {"kernel": rng.normal(0, 0.5, (4, 3)), "bias": rng.normal(0, 0.1, 3)},
        "norm": {"scale": rng.uniform(0.5, 1.5, 3)},
        "zero": {"kernel": np.zeros((3, 3, 2, 2))},  # ||w|| = 0 at the first step: ratio 1.
    }
    params = jax.tree.map(lambda a: a.astype(np.float32), params)
    # Gradients of global norm about 0.3 .. 3: clipping at 1.0 acts on some steps only.
    scales = [3.0, 0.3, 2.0, 0.5, 1.5]
    grads = [
        jax.tree.map(lambda a, s=s: (s * rng.normal(0, 0.5, a.shape)).astype(np.float32), params)
        for s in scales
    ]
    lr = lambda step: 0.01 * (step + 1) / 5  # A schedule, to check step alignment.

    flat = flax.traverse_util.flatten_dict(params, sep=".")
    net = torch.nn.ModuleDict(
        {
            module: torch.nn.ParameterDict(
                {
                    var: torch.nn.Parameter(torch.from_numpy(flat[f"{module}.{var}"].copy()))
                    for var in vars_
                }
            )
            for module, vars_ in {
                "dense": ["kernel", "bias"],
                "norm": ["scale"],
                "zero": ["kernel"],
            }.items()
        }
    )
    opt = create_optimizer_v2(net, "lamb", lr=lr(0), weight_decay=0.02)
    assert isinstance(opt, Lamb) and opt.defaults["max_grad_norm"] == 1.0
    named = dict(net.named_parameters())
    groups = {
        g["weight_decay"]: {n for n, p in named.items() if any(p is q for q in g["params"])}
        for g in opt.param_groups
    }
    assert groups == {0.02: {"dense.kernel", "zero.kernel"}, 0.0: {"dense.bias", "norm.scale"}}
    for step, g in enumerate(grads):
        for group in opt.param_groups:
            group["lr"] = lr(step)
        gflat = flax.traverse_util.flatten_dict(g, sep=".")
        for n, p in named.items():
            p.grad = torch.from_numpy(gflat[n].copy())
        opt.step()

    tx = optim.make_optimizer(_lamb_config(), lr)
    ours, state = jax.tree.map(jnp.asarray, params), None
    state = tx.init(ours)
    update = jax.jit(tx.update)
    for g in grads:
        updates, state = update(g, state, ours)
        ours = optax.apply_updates(ours, updates)
    for n, p in named.items():
        start = flat[n]
        theirs, got = (
            p.detach().numpy(),
            np.asarray(flax.traverse_util.flatten_dict(ours, sep=".")[n]),
        )
        # The residue is float32 rounding: optax forms 1 - 0.999**t in float32 (1.3e-5 off at
        # t = 1), timm in Python floats; run in float64, the two agree to 1e-16.
        diff = np.linalg.norm(got - theirs)
        assert diff <= 1e-5 * np.linalg.norm(theirs), n
        # Relative to the distance travelled too (a stricter test; float32 rounding of weights
        # of order 1 alone is ~1e-7, hence 1e-4 here).
        assert diff <= 1e-4 * np.linalg.norm(theirs - start), n


def test_lamb_trust_ratio_and_decay_only_on_kernels():
    params = {"conv": {"kernel": jnp.full((3, 3, 2, 2), 2.0)}, "norm": {"scale": jnp.full(2, 2.0)}}
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)
    tx = optim.make_optimizer(_lamb_config(clip=0.0), lambda _: 1.0)
    updates, _ = tx.update(grads, tx.init(params), params)
    # Kernel: the update is rescaled to ||w||; the norm scale keeps Adam's unit step.
    np.testing.assert_allclose(
        np.linalg.norm(updates["conv"]["kernel"]),
        np.linalg.norm(params["conv"]["kernel"]),
        rtol=1e-5,
    )
    np.testing.assert_allclose(updates["norm"]["scale"], -1.0, rtol=1e-3)
    # Without weight decay timm has no decay group, hence no trust ratio anywhere.
    tx = optim.make_optimizer(_lamb_config(weight_decay=0.0, clip=0.0), lambda _: 1.0)
    updates, _ = tx.update(grads, tx.init(params), params)
    np.testing.assert_allclose(updates["conv"]["kernel"], -1.0, rtol=1e-3)


@needs_timm
def test_decay_mask_is_timms_grouping_for_resnet18():
    import timm
    from timm.optim import param_groups_weight_decay

    model = models.create_model("resnet18")
    shapes = jax.eval_shape(
        functools.partial(model.init, train=False),
        jax.random.key(0),
        jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32),
    )["params"]
    mask = flax.traverse_util.flatten_dict(optim.decay_mask(shapes), sep="/")
    for path, decayed in mask.items():
        module, var = path.rsplit("/", 1)
        assert decayed == (var == "kernel"), path
        if "norm" in module.rsplit("/", 1)[-1] or var == "bias":
            assert not decayed, path
    sizes = flax.traverse_util.flatten_dict(
        jax.tree.map(lambda s: int(np.prod(s.shape)), shapes), sep="/"
    )
    decayed = sum(sizes[p] for p, d in mask.items() if d)
    kept = sum(sizes[p] for p, d in mask.items() if not d)
    groups = param_groups_weight_decay(
        timm.create_model("resnet18", pretrained=False), weight_decay=0.02
    )
    numel = {g["weight_decay"]: sum(p.numel() for p in g["params"]) for g in groups}
    assert (decayed, kept) == (numel[0.02], numel[0.0])
    assert sum(1 for d in mask.values() if d) == len(
        next(g for g in groups if g["weight_decay"])["params"]
    )


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_grad_clip_norm_applies_to_every_optimizer(name):
    opt = base_config().optimizer
    opt.name, opt.grad_clip_norm = name, 0.0
    params = {"conv": {"kernel": jnp.ones((3, 3, 2, 2))}, "norm": {"scale": jnp.ones(2)}}
    grads = jax.tree.map(
        lambda p: jnp.arange(p.size, dtype=jnp.float32).reshape(p.shape) + 1.0, params
    )
    norm = float(optax.global_norm(grads))
    assert norm > 1.0
    unclipped = optim.make_optimizer(opt, lambda _: 0.1)
    opt.grad_clip_norm = 1.0
    clipped = optim.make_optimizer(opt, lambda _: 0.1)
    got, _ = clipped.update(grads, clipped.init(params), params)
    want, _ = unclipped.update(
        jax.tree.map(lambda g: g / norm, grads), unclipped.init(params), params
    )
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got, want)


def test_optimizer_state_trees_are_unchanged():
    """Checkpoints of earlier runs hold these state trees: sgd stays one flat chain, unclipped
    lars / adamw stay unwrapped."""
    opt = base_config().optimizer
    params = {"conv": {"kernel": jnp.ones((3, 3, 2, 2))}, "norm": {"scale": jnp.ones(2)}}
    decay = optax.add_decayed_weights(opt.weight_decay, mask=optim.decay_mask)
    schedule = optax.constant_schedule(0.1)
    sgd = optax.sgd(schedule, momentum=opt.momentum, nesterov=opt.nesterov)
    structure = lambda tx: jax.tree.structure(tx.init(params))
    assert structure(optim.make_optimizer(opt, schedule)) == structure(optax.chain(decay, sgd))
    opt.grad_clip_norm = 1.0
    clip = optax.clip_by_global_norm(1.0)
    assert structure(optim.make_optimizer(opt, schedule)) == structure(
        optax.chain(clip, decay, sgd)
    )
    opt.name, opt.grad_clip_norm = "adamw", 0.0
    assert structure(optim.make_optimizer(opt, 0.1)) == structure(
        optax.adamw(0.1, mask=optim.decay_mask)
    )


def test_unknown_optimizer_lists_lamb():
    opt = base_config().optimizer
    opt.name = "lamd"
    with pytest.raises(
        ConfigError,
        match=r"config\.optimizer\.name 'lamd'.*Did you mean 'lamb'.*adamw, lamb, lars, sgd",
    ):
        optim.make_optimizer(opt, lambda _: 0.1)
