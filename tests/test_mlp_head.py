"""Tests for jaxres.transfer.mlp_head: a non-linear problem a linear probe cannot solve, the
folded export, padding and sharded rows, determinism, the step count chosen on the held-out
curve, argument checks. A skipped benchmark against the logistic probe (benchmarks/probe.md).
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxres import parallel
from jaxres.errors import ConfigError, NonFiniteLossError
from jaxres.transfer import logistic, mlp_head, probe

SMALL = {"hidden": 64, "learning_rate": 1e-2, "max_steps": 200, "eval_every": 10}


def rings(n_per_class: int, seed: int = 0, noise_dims: int = 2):
    """3 concentric rings in 2-D (radii 0-1, 1.5-2.5, 3-4) plus Gaussian noise dimensions,
    shifted and scaled so the standardisation matters: no linear probe separates them."""
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(3), n_per_class)
    radius = rng.uniform(0, 1, len(y)) + 1.5 * y
    angle = rng.uniform(0, 2 * np.pi, len(y))
    x = np.concatenate(
        [
            np.stack([radius * np.cos(angle), radius * np.sin(angle)], 1),
            rng.normal(size=(len(y), noise_dims)),
        ],
        1,
    )
    return (x * 4.0 + 10.0).astype(np.float32), y


@pytest.fixture(scope="module")
def fitted():
    x, y = rings(60)
    return mlp_head.MLPProbe(**SMALL).fit(x, y), rings(100, seed=1)


def test_learns_rings_that_a_linear_probe_cannot(fitted):
    head, (x_test, y_test) = fitted
    x, y = rings(60)
    linear = logistic.LogisticProbe().fit(x, y).score(x_test, y_test)["top1"]
    mlp = head.score(x_test, y_test)["top1"]
    assert linear < 0.6 and mlp > 0.9, (linear, mlp)
    assert np.mean(head.predict(x_test) == y_test) == pytest.approx(mlp)


def test_head_params_reproduce_predict_scores(fitted):
    head, (x_test, _) = fitted
    params = head.head_params()
    assert params["head_hidden"]["kernel"].shape == (4, head.hidden)
    assert params["head"]["kernel"].shape == (head.hidden, 3)
    assert all(v.dtype == np.float32 for layer in params.values() for v in layer.values())
    hidden = np.maximum(x_test @ params["head_hidden"]["kernel"] + params["head_hidden"]["bias"], 0)
    logits = hidden @ params["head"]["kernel"] + params["head"]["bias"]
    np.testing.assert_allclose(logits, np.asarray(head.predict_scores(x_test)), atol=1e-4)


# Tests reuse the shapes and static arguments of `fitted` (180 rows, full-batch) where they can:
# each new combination compiles the training loop again (seconds on 2 busy cores).


@pytest.mark.parametrize("batch_size", [1024, 32])  # Full-batch; mini-batches of 32 rows.
def test_padding_rows_and_their_labels_do_not_change_the_fit(batch_size):
    x, y = rings(60)
    pad = 10  # The last 10 of 180 rows are padding.
    mask = (np.arange(len(y)) < len(y) - pad).astype(np.float32)
    y = y[:-pad]
    clean_x = np.where(mask[:, None] > 0, x, 0.0).astype(np.float32)
    dirty_x = x.copy()
    dirty_x[-pad:] = np.random.default_rng(5).normal(size=(pad, x.shape[1])) * 1e30
    dirty_x[-1, 0], dirty_x[-2, 3] = np.nan, np.inf
    kwargs = {**SMALL, "batch_size": batch_size}
    clean = mlp_head.MLPProbe(**kwargs).fit(clean_x, np.r_[y, np.zeros(pad, int)], mask)
    dirty = mlp_head.MLPProbe(**kwargs).fit(dirty_x, np.r_[y, np.full(pad, 7)], mask)
    assert dirty.num_classes == 3 and dirty.sweep_ == clean.sweep_
    assert dirty.steps_ == clean.steps_
    np.testing.assert_array_equal(
        np.asarray(dirty.predict_scores(x)), np.asarray(clean.predict_scores(x))
    )


def test_row_sharded_fit_matches_host_fit(fitted):
    single, (x_test, y_test) = fitted
    x, y = rings(60)  # 180 rows: padded to 184 over 8 devices.
    mesh = parallel.make_mesh()
    assert mesh.devices.size == 8
    xs, mask = probe.shard_rows(x, mesh)
    assert xs.shape[0] == 184 and len(xs.sharding.device_set) == 8
    xt, mt = probe.shard_rows(x_test, mesh)
    # Cross-device sums round differently, and 200 Adam steps amplify it (~2% of the logits here):
    # compare at a fixed step count within that, then the held-out curves to one example.
    fixed = [mlp_head.MLPProbe(**SMALL, holdout=0.0).fit(*args) for args in ((xs, y, mask), (x, y))]
    assert [p.steps_ for p in fixed] == [200, 200]
    scores = fixed[0].predict_scores(xt)
    assert len(scores.sharding.device_set) == 8  # Rows stay sharded like the input.
    reference = np.asarray(fixed[1].predict_scores(x_test))
    np.testing.assert_allclose(
        np.asarray(scores)[: len(y_test)], reference, atol=0.05 * np.abs(reference).max()
    )
    assert fixed[0].score(xt, y_test, mt)["top1"] == pytest.approx(
        fixed[1].score(x_test, y_test)["top1"], abs=3 / len(y_test)
    )
    sharded = mlp_head.MLPProbe(**SMALL).fit(xs, y, mask)
    assert list(sharded.sweep_) == list(single.sweep_)
    for steps, acc in single.sweep_.items():  # 36 held-out rows.
        assert sharded.sweep_[steps] == pytest.approx(acc, abs=1.01 / 36)


def test_deterministic_for_a_seed():
    x, y = rings(60)
    kwargs = {**SMALL, "batch_size": 32}  # Mini-batches: batch keys as well as dropout keys.
    first = mlp_head.MLPProbe(**kwargs, seed=3).fit(x, y)
    again = mlp_head.MLPProbe(**kwargs, seed=3).fit(x, y)
    other = mlp_head.MLPProbe(**kwargs, seed=4).fit(x, y)
    assert first.sweep_ == again.sweep_ and first.steps_ == again.steps_
    for u, v in zip(jax.tree.leaves(first.head_params()), jax.tree.leaves(again.head_params())):
        np.testing.assert_array_equal(u, v)
    assert not np.array_equal(
        first.head_params()["head_hidden"]["kernel"], other.head_params()["head_hidden"]["kernel"]
    )


def test_steps_are_chosen_on_the_held_out_curve(fitted):
    head, _ = fitted
    x, y = rings(60)
    y = y.astype(np.int32)  # As `fit` passes them: the same compiled loop.
    assert list(head.sweep_) == mlp_head.eval_steps(200, 10) == list(range(10, 201, 10))
    assert mlp_head.eval_steps(25, 10) == [10, 20, 25]
    best = max(head.sweep_.values())
    assert head.holdout_top1_ == best
    assert head.steps_ == min(s for s, acc in head.sweep_.items() if acc == best)  # Earliest.
    assert (head.l2_, head.l2_source_) == (head.weight_decay, "fixed")
    # The recorded curve is the held-out top-1 of a head trained on the other rows for that long.
    ones = np.ones(len(y), np.float32)
    hold = probe.class_balanced_holdout(y, ones, head.holdout, head.seed).astype(np.float32)
    assert hold.sum() == 36  # 20% of 60 per class.
    hyper = {
        "hidden": 64,
        "num_classes": 3,
        "max_steps": 200,
        "eval_every": 10,
        "batch_size": None,
        "dropout": head.dropout,
        "learning_rate": head.learning_rate,
        "weight_decay": head.weight_decay,
        "label_smoothing": head.label_smoothing,
    }

    def train(train_mask, hold_mask, steps):
        return mlp_head.train_head(
            x,
            y,
            train_mask,
            hold_mask,
            head.mu_,
            head.sigma_,
            jax.random.key(0),
            jnp.int32(steps),
            **hyper,
        )

    for steps in (30, head.steps_):
        params = train(ones - hold, np.zeros_like(ones), steps)["params"]
        scores = mlp_head.forward(params, (x - head.mu_) / head.sigma_)
        top1 = probe.accuracy(scores, y, hold, 3)["top1"]
        assert float(top1) == pytest.approx(head.sweep_[steps], abs=1e-6)
    # The final head: a fresh init trained on every train row for the chosen steps.
    refit = train(ones, np.zeros_like(ones), head.steps_)["params"]
    np.testing.assert_allclose(
        np.asarray(mlp_head.forward(refit, (x - head.mu_) / head.sigma_)),
        np.asarray(head.predict_scores(x)),
        atol=1e-5,
    )


def test_one_example_per_class_trains_max_steps():
    x, y = rings(60)
    one_each = np.zeros(len(y), np.float32)
    one_each[::60] = 1  # Rows 0, 60, 120: one per class; the rest are masked out.
    one_shot = mlp_head.MLPProbe(**SMALL).fit(x, y, one_each)
    assert one_shot.steps_ == 200 and one_shot.sweep_ == {} and one_shot.holdout_top1_ is None
    assert one_shot.l2_source_ == "fixed"
    assert (one_shot.predict(x[::60]) == [0, 1, 2]).all()


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"hidden": 0}, "hidden"),
        ({"hidden": 2.5}, "hidden"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"weight_decay": -1e-4}, "weight_decay"),
        ({"label_smoothing": 1.0}, "label_smoothing"),
        ({"max_steps": 0}, "max_steps"),
        ({"eval_every": True}, "eval_every"),
        ({"batch_size": -8}, "batch_size"),
        ({"holdout": 1.0}, "holdout"),
        ({"seed": 0.5}, "seed"),
    ],
)
def test_bad_arguments_are_config_errors(kwargs, name):
    with pytest.raises(ConfigError, match=f"MLPProbe: {name} must be .* got .*; e.g."):
        mlp_head.MLPProbe(**kwargs)


def test_a_diverging_fit_names_the_step():
    x, y = rings(60)
    with pytest.raises(NonFiniteLossError, match="non-finite at step"):
        mlp_head.MLPProbe(**{**SMALL, "learning_rate": 1e30}).fit(x, y)


@pytest.mark.skip(reason="benchmark")
def test_benchmark_against_the_logistic_probe(seeds=(0, 1, 2)):
    """MLP head vs logistic probe on Caltech-101-shaped synthetic features (benchmarks/probe.md).

    JAX_PLATFORMS=cpu .venv/bin/python -c "import tests.test_mlp_head as t; \
        t.test_benchmark_against_the_logistic_probe()"
    """
    from jaxres.bench.common import load_average
    from jaxres.bench.probe import CALTECH101_SHAPE, synthetic_features

    c, d = CALTECH101_SHAPE["num_classes"], CALTECH101_SHAPE["dim"]
    print(jax.devices()[0].device_kind, len(jax.devices()), "devices;", "load average", load_average())
    print("| seed | logistic top-1 | logistic fit s | MLP top-1 | MLP fit s | MLP steps |")
    for seed in seeds:
        x, y = synthetic_features(c, CALTECH101_SHAPE["train_per_class"], d, seed)
        xt, yt = synthetic_features(c, CALTECH101_SHAPE["test_per_class"], d, seed)
        row = [seed]
        for make in (logistic.LogisticProbe, mlp_head.MLPProbe):
            start = time.perf_counter()
            fitted = make().fit(x, y)
            seconds = time.perf_counter() - start
            row += [f"{fitted.score(xt, yt)['top1']:.2%}", f"{seconds:.1f}"]
        row.append(fitted.steps_)
        print("| " + " | ".join(str(v) for v in row) + " |", flush=True)
    print("load average", load_average())
