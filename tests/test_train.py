"""Trainer: sharding equivalence, accumulation, eval coverage, checkpoints, user errors."""

import glob
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import demo
from jaxres import checkpoint as ckpt_lib
from jaxres import evaluate, evaluators, optim, parallel, runs, train
from jaxres import state as state_lib
from jaxres.data import sources, transforms
from jaxres.errors import CheckpointError, ConfigError, DataError, NonFiniteLossError


def smoke_config(data_dir, **overrides) -> ml_collections.ConfigDict:
    config = demo.get_config("smoke")
    config.dataset.data_dir = str(data_dir)
    config.update_from_flattened_dict(overrides)
    return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("data")


def _setup(config, devices):
    mesh = parallel.make_mesh(devices)
    model = runs.build_model(config)
    schedule = optim.make_schedule(config.optimizer, config.batch_size, 8, 16)
    tx = optim.make_optimizer(config.optimizer, schedule)
    state = state_lib.fresh_state(model, tx, config, jax.random.key(0), mesh)
    step_fn, eval_fn = train.make_step_fns(config, model, tx, mesh)
    return mesh, state, step_fn, eval_fn


def _fixed_batches(num_steps, accum, batch, size=32, num_classes=10):
    rng = np.random.default_rng(0)
    return [
        {
            "image": rng.integers(0, 256, (accum, batch // accum, size, size, 3), dtype=np.uint8),
            "label": rng.integers(0, num_classes, (accum, batch // accum), dtype=np.int32),
            "mask": np.ones((accum, batch // accum), np.float32),
        }
        for _ in range(num_steps)
    ]


def _run_steps(config, devices, batches):
    mesh, state, step_fn, _ = _setup(config, devices)
    losses = []
    for batch in batches:
        state, metrics = step_fn(state, parallel.to_global(batch, mesh, batch_axis=1))
        losses.append(float(metrics.compute()["loss"]))
    return losses, parallel.fetch(state.params), parallel.fetch(state.batch_stats)


def test_run_once_computes_fn_and_places_its_outputs():
    """The run-once compile (backend level 0 on CPU) changes how fast XLA compiles, not the result."""
    x = jnp.arange(12.0).reshape(3, 4)
    np.testing.assert_array_equal(parallel.run_once(lambda a, b: a @ b.T + 1, x, x), x @ x.T + 1)
    mesh = parallel.make_mesh()
    out = parallel.run_once(lambda a: a * 2, x, out_shardings=parallel.replicated(mesh))
    assert out.sharding.is_fully_replicated and len(out.sharding.device_set) == 8
    np.testing.assert_array_equal(out, x * 2)


def test_eight_devices_match_one(data_dir):
    """BatchNorm over the global batch: 8-way sharding changes only round-off (atol 2e-5)."""
    assert jax.device_count() == 8
    config = smoke_config(data_dir, **{"optimizer.warmup": "0"})
    batches = _fixed_batches(3, 1, 32)
    loss1, params1, stats1 = _run_steps(config, jax.devices()[:1], batches)
    loss8, params8, stats8 = _run_steps(config, jax.devices(), batches)
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)
    # The weights really move, so the comparison is not of constants (zero-init head: ln 10 first).
    assert abs(loss1[-1] - loss1[0]) > 1e-3
    for a, b in zip(jax.tree.leaves((params1, stats1)), jax.tree.leaves((params8, stats8))):
        np.testing.assert_allclose(b, a, atol=2e-5, rtol=1e-4)


def test_grad_accumulation_equals_one_big_batch(data_dir):
    """With GroupNorm (no batch statistics) 4 micro-batches of 8 == one batch of 32."""
    overrides = {"model.overrides": ml_collections.ConfigDict({"norm": "group", "norm_groups": 8})}
    big = smoke_config(data_dir, **overrides)
    accum = smoke_config(data_dir, grad_accum_steps=4, **overrides)
    batches = _fixed_batches(2, 4, 32)
    merged = [jax.tree.map(lambda x: x.reshape(1, -1, *x.shape[2:]), b) for b in batches]
    loss_big, params_big, _ = _run_steps(big, jax.devices(), merged)
    loss_acc, params_acc, _ = _run_steps(accum, jax.devices(), batches)
    np.testing.assert_allclose(loss_acc, loss_big, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(params_big), jax.tree.leaves(params_acc)):
        np.testing.assert_allclose(b, a, atol=2e-5, rtol=1e-4)


def test_eval_counts_every_example(data_dir):
    """37 images, global eval batch 16 on 8 devices: 3 batches, 11 padded rows masked out."""
    config = smoke_config(data_dir, eval_batch_size=16, **{"dataset.val_limit": 37})
    mesh, state, _, eval_fn = _setup(config, jax.devices())
    val_source = sources.limited(sources.open_source(config.dataset, config.dataset.val_split), 37)
    variables = train.eval_variables(state, config)
    result = evaluators.validate(variables, eval_fn, val_source, config, mesh)
    assert result["val_count"] == 37
    # The same top-1 by hand, one image at a time on one device.
    model = runs.build_model(config)
    transform = transforms.EvalTransform(config.dataset.image_size, config.dataset.eval_crop_ratio)
    examples = [transform(val_source[i]) for i in range(37)]
    images = runs.normalize(
        jnp.stack([e["image"] for e in examples]), config.dataset.mean, config.dataset.std
    )
    logits, _ = model.apply(parallel.fetch(variables), images, train=False)
    labels = np.array([e["label"] for e in examples])
    assert result["val_top1"] == pytest.approx(float((np.argmax(logits, -1) == labels).mean()))


def test_train_resume_and_checkpoint_policy(data_dir, tmp_path):
    """A finished run keeps latest and best; re-running resumes and does nothing more."""
    config = smoke_config(data_dir, **{"checkpoint.keep_latest": 1, "checkpoint.keep_best": 1})
    workdir = str(tmp_path / "run")
    state = train.train_and_evaluate(config, workdir)
    assert int(state.step) == 16
    checkpointer = ckpt_lib.Checkpointer(f"{workdir}/checkpoints", read_only=True)
    steps = checkpointer.all_steps()
    assert 16 in steps and checkpointer.best_step() in steps
    rows = [json.loads(line) for line in open(f"{workdir}/metrics.jsonl")]
    evals = [r for r in rows if "val_top1" in r]
    assert [r["step"] for r in evals] == [8, 16] and all(r["val_count"] == 100 for r in evals)
    assert {"step", "epoch", "loss", "lr", "img_per_sec"} <= set(rows[0])
    assert glob.glob(f"{workdir}/events.out.tfevents.*") and os.path.exists(f"{workdir}/config.json")
    resumed = train.train_and_evaluate(config, workdir)
    assert int(resumed.step) == 16
    np.testing.assert_array_equal(
        parallel.fetch(resumed.params)["head"]["kernel"],
        parallel.fetch(state.params)["head"]["kernel"],
    )

    # init_from: a 5-class model takes every weight but the head from this run.
    five = smoke_config(data_dir, init_from=workdir, **{"dataset.num_classes": 5})
    mesh = parallel.make_mesh()
    model = runs.build_model(five)
    tx = optim.make_optimizer(five.optimizer, optim.make_schedule(five.optimizer, 32, 8, 16))
    target = ckpt_lib.Checkpointer(str(tmp_path / "five" / "checkpoints"))
    fine = state_lib.restore_or_init(five, target, model, tx, mesh)
    target.close()
    source = parallel.fetch(state.params)
    np.testing.assert_array_equal(
        parallel.fetch(fine.params)["stem_conv"]["kernel"], source["stem_conv"]["kernel"]
    )
    assert fine.params["head"]["kernel"].shape[-1] == 5

    # Fine-tuning evaluates at step 0, before the first update: the weights it starts from.
    same = smoke_config(data_dir, init_from=workdir, num_steps=1)
    train.train_and_evaluate(same, str(tmp_path / "ft"))
    start = [json.loads(line) for line in open(tmp_path / "ft" / "metrics.jsonl")][0]
    assert start["step"] == 0 and (start["val_top1"], start["val_loss"]) == (evals[-1]["val_top1"], evals[-1]["val_loss"])

    # A workdir holding another model's checkpoint is refused with the fix.
    other = smoke_config(data_dir, **{"model.name": "resnetv2_18"})
    with pytest.raises(CheckpointError, match="another --workdir"):
        train.train_and_evaluate(other, workdir)


def test_non_finite_loss_stops_and_keeps_good_checkpoints(data_dir, tmp_path):
    config = smoke_config(data_dir, log_every="4", **{"checkpoint.every": "1"})
    config.optimizer.base_lr = 1e12
    config.optimizer.warmup = "0"
    workdir = str(tmp_path / "nan")
    with pytest.raises(NonFiniteLossError, match="between steps"):
        train.train_and_evaluate(config, workdir)
    checkpointer = ckpt_lib.Checkpointer(f"{workdir}/checkpoints", read_only=True)
    for step in checkpointer.all_steps():
        params = checkpointer.restore_params(step)["params"]
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(params)), step


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        ({"model.name": "resnet5"}, ConfigError, "Did you mean 'resnet50'"),
        ({"batch_size": 30}, ConfigError, "not divisible by the 8 devices"),
        ({"dataset.num_classes": 7}, ConfigError, "num_classes=10"),
        ({"augment.repeated_aug": 0}, ConfigError, "repeated_aug=0"),
        ({"augment.randaugment": "rand-x9"}, ConfigError, "config.augment.randaugment"),
        ({"augment.mix_prob": 1.5}, ConfigError, "config.augment.mix_prob"),
        ({"loss.name": "hinge"}, ConfigError, "config.loss.name"),
        (
            {"dataset.name": "imagefolder", "dataset.data_dir": "/nonexistent"},
            DataError,
            "does not exist",
        ),
        (
            {"dataset.name": "imagenet2012", "dataset.data_dir": "/nonexistent"},
            DataError,
            "prepare_data.py",
        ),
    ],
)
def test_user_errors(data_dir, tmp_path, overrides, error, message):
    with pytest.raises(error, match=message):
        train.train_and_evaluate(smoke_config(data_dir, **overrides), str(tmp_path / "w"))


def test_ema_tracks_params_and_is_evaluated(data_dir):
    config = smoke_config(data_dir, ema_decay=0.9, **{"optimizer.warmup": "0"})
    mesh, state, step_fn, _ = _setup(config, jax.devices())
    p0 = parallel.fetch(state.params)
    batch = parallel.to_global(_fixed_batches(1, 1, 32)[0], mesh, batch_axis=1)
    state, _ = step_fn(state, batch)
    p1, e1 = parallel.fetch(state.params), parallel.fetch(state.ema_params)
    for a, b, e in zip(jax.tree.leaves(p0), jax.tree.leaves(p1), jax.tree.leaves(e1)):
        np.testing.assert_allclose(e, 0.9 * a + 0.1 * b, rtol=1e-5, atol=1e-7)
    assert train.eval_variables(state, config)["params"] is state.ema_params
    assert not np.allclose(p1["stem_conv"]["kernel"], p0["stem_conv"]["kernel"])


def test_head_only_warmup_freezes_the_body_then_starts_it_fresh():
    import optax

    params = {
        "head": {"kernel": jnp.ones((3, 2))},
        "stage1_block1": {"conv1": {"kernel": jnp.ones((3, 3))}},
    }
    grads = jax.tree.map(jnp.ones_like, params)
    tx = optim.head_only_warmup(optax.sgd(0.1, momentum=0.9), optax.sgd(0.1, momentum=0.9), steps=2)
    state = tx.init(params)
    update = jax.jit(tx.update)
    for step in range(3):
        updates, state = update(grads, state, params)
        body = np.asarray(updates["stage1_block1"]["conv1"]["kernel"])
        head = np.asarray(updates["head"]["kernel"])
        assert np.all(head != 0)
        if step < 2:
            assert np.all(body == 0)
        else:  # The first body step: momentum starts empty, as a fresh optimizer's.
            np.testing.assert_allclose(body, -0.1)
    assert head[0, 0] == pytest.approx(-0.1 * (1 + 0.9 + 0.81))  # The head kept its momentum.


def test_head_only_needs_init_from(data_dir):
    config = smoke_config(data_dir, **{"optimizer.head_only": "5"})
    with pytest.raises(
        ConfigError, match="head_only='5' trains only the head of a fresh model"
    ):
        train.check_config(config, parallel.make_mesh())


# Every "ResNet strikes back" option at once (configs/imagenet_rsb.py), on the smoke run.
RSB_OPTIONS = {
    "augment.randaugment": "rand-m9-mstd0.5-inc1",
    "augment.repeated_aug": 2,
    "dataset.eval_image_size": 40,
    "augment.mixup_alpha": 0.2,
    "augment.cutmix_alpha": 1.0,
    "augment.random_erasing": 0.25,
    "model.drop_path_rate": 0.1,
    "optimizer.name": "lamb",
    "optimizer.base_lr": 0.005,
    "optimizer.weight_decay": 0.02,
    "optimizer.grad_clip_norm": 1.0,
    "loss.name": "bce",
    "loss.bce_threshold": 0.2,
    "loss.label_smoothing": 0.1,
}


def test_device_augmentation_and_drop_path_draw_from_the_step(data_dir):
    """The step's randomness is a function of (seed, step): the same step twice gives the same loss,
    another step (same weights, same batch) another one; with the options off the step is deterministic."""
    config = smoke_config(data_dir, **RSB_OPTIONS)
    config.model.overrides.head_zero_init = False  # Logits that depend on the images.
    mesh, state, step_fn, _ = _setup(config, jax.devices())
    batch = parallel.to_global(_fixed_batches(1, 1, 32)[0], mesh, batch_axis=1)

    def loss_at(step):
        copy = jax.tree.map(jnp.copy, state).replace(step=jnp.int32(step))
        return float(step_fn(copy, batch)[1].compute()["loss"])

    assert loss_at(3) == loss_at(3) != loss_at(4)
    # BCE over 10 classes with a near-zero head starts at ln 2 per class, not the softmax's ln 10.
    assert loss_at(0) == pytest.approx(np.log(2), abs=0.05)


def test_every_recipe_option_resumes_mid_epoch_bit_exact(data_dir, tmp_path):
    """RandAugment, repeated augmentation, erasing, Mixup / CutMix, drop-path, BCE and LAMB, with
    two micro-batches a step: a run branched at step 2 (mid-epoch) ends bit-identical."""
    options = dict(
        num_steps=4, **{"checkpoint.every": "2", "checkpoint.keep_latest": 4}, grad_accum_steps=2, **RSB_OPTIONS
    )
    options["dataset.val_limit"] = 0  # The whole split, as evaluate.py reads it.
    first = str(tmp_path / "first")
    full = train.train_and_evaluate(smoke_config(data_dir, **options), first)
    branch = smoke_config(data_dir, resume_from=f"{first}:2", **options)
    branched = train.train_and_evaluate(branch, str(tmp_path / "branch"))
    assert int(branched.step) == int(full.step) == 4
    for a, b in zip(jax.tree.leaves(parallel.fetch(full)), jax.tree.leaves(parallel.fetch(branched))):
        np.testing.assert_array_equal(a, b)
    rows = [json.loads(line) for line in open(f"{first}/metrics.jsonl")]
    (val,) = [r for r in rows if "val_count" in r]
    # evaluate.py crops at the run's eval_image_size (40) as training's evaluation did.
    result = evaluate.evaluate_run(first, checkpoint="latest")
    assert result["count"] == val["val_count"] == 359
    assert result["top1"] == pytest.approx(val["val_top1"])
