"""Tests for jaxres.probe: the ridge sweep against separate solves, both probes against
scikit-learn on the same features, L2 selection on a held-out part, sharded rows.
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression, RidgeClassifier
from sklearn.preprocessing import StandardScaler

from jaxres import parallel
from jaxres.errors import ConfigError
from jaxres.transfer import logistic, probe


def blobs(
    n_per_class: int, num_classes: int = 6, dim: int = 24, spread: float = 1.6, seed: int = 0
):
    """Class-structured features: Gaussian clusters, ReLU'd like pooled CNN features."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim))
    y = np.repeat(np.arange(num_classes), n_per_class)
    x = np.maximum(centres[y] + spread * rng.normal(size=(len(y), dim)), 0) * 3.0
    return x.astype(np.float32), y


def centred_solve(x, y, num_classes, l2):
    """Reference ridge in float64: (Xc^T Xc + l I)^-1 Xc^T Tc with np.linalg.solve."""
    x = x.astype(np.float64)
    xc = x - x.mean(0)
    t = np.eye(num_classes)[y]
    tc = t - t.mean(0)
    return np.linalg.solve(xc.T @ xc + l2 * np.eye(x.shape[1]), xc.T @ tc)


@pytest.mark.parametrize(
    "n_per_class, dim", [(20, 24), (4, 40)]
)  # Primal (D <= N) and dual (N < D).
def test_ridge_sweep_equals_separate_solves(n_per_class, dim):
    x, y = blobs(n_per_class, dim=dim)
    alphas = np.array([1e-2, 1e-1, 1.0, 10.0], np.float32)
    path = probe.ridge_path(x, y, np.ones(len(y), np.float32), alphas, num_classes=6)
    xc = x.astype(np.float64) - x.mean(0)
    np.testing.assert_allclose(np.asarray(path["l2"]), alphas * np.sum(xc * xc) / dim, rtol=1e-4)
    for i, l2 in enumerate(np.asarray(path["l2"], np.float64)):
        w = centred_solve(x, y, 6, l2)
        np.testing.assert_allclose(
            np.asarray(path["w"][i]), w, rtol=2e-3, atol=2e-3 * np.abs(w).max()
        )
        b = np.eye(6)[y].mean(0) - x.mean(0) @ w
        np.testing.assert_allclose(np.asarray(path["b"][i]), b, atol=2e-3)


def test_ridge_refit_solve_equals_the_path():
    x, y = blobs(20)
    mask = np.ones(len(y), np.float32)
    path = probe.ridge_path(x, y, mask, np.array([0.3], np.float32), num_classes=6)
    solved = probe.ridge_solve(x, y, mask, np.float32(0.3), num_classes=6)
    np.testing.assert_allclose(
        np.asarray(solved["w"]), np.asarray(path["w"][0]), rtol=1e-3, atol=1e-5
    )
    np.testing.assert_allclose(np.asarray(solved["b"]), np.asarray(path["b"][0]), atol=1e-4)


def test_logistic_warm_started_sweep_equals_separate_fits():
    # The penalty switch shifts the L-BFGS memory (y_k += (l' - l) P s_k); fits must not depend on it.
    x, y = blobs(20)
    mask = np.ones(len(y), np.float32)
    hold = probe.class_balanced_holdout(y, mask, 0.25, 0).astype(np.float32)
    mu, sigma = probe.standardise_stats(x, mask)
    start = np.zeros((x.shape[1] + 1, 6), np.float32)

    def path(l2s, fit=mask - hold, held=hold):
        return logistic.logistic_path(
            x,
            y,
            fit,
            held,
            mu,
            sigma,
            np.asarray(l2s, np.float32),
            start,
            np.float32(1e-6),
            num_classes=6,
            max_iter=1000,
        )

    l2s = [1.0, 1e-1, 1e-2]
    swept = path(l2s)

    def centred(
        theta,
    ):  # Softmax ignores a constant added to every class's bias: compare without it.
        theta = np.asarray(theta)
        return np.concatenate([theta[:-1], theta[-1:] - theta[-1].mean()])

    for i, l2 in enumerate(l2s):
        alone = path([l2])
        np.testing.assert_allclose(
            centred(swept["theta"][i]), centred(alone["theta"][0]), atol=2e-4
        )
        assert float(swept["holdout_top1"][i]) == pytest.approx(float(alone["holdout_top1"][0]))
    best = int(swept["best"])
    assert swept["holdout_top1"][best] == max(swept["holdout_top1"])
    # The refit (all rows, from the sweep's solution) equals a cold fit on all rows.
    cold = path([l2s[best]], fit=mask, held=np.zeros_like(mask))["final"]
    assert float(swept["final"]["grad_max"]) <= 1e-6
    np.testing.assert_allclose(centred(swept["final"]["theta"]), centred(cold["theta"]), atol=2e-4)


def test_ridge_agrees_with_sklearn_ridge_classifier():
    x, y = blobs(30)
    x_test, y_test = blobs(40, seed=1)
    ours = probe.RidgeProbe(l2s=[0.3]).fit(x, y)
    # RidgeClassifier regresses {-1, 1} targets = 2 x centred one-hot: same argmax at alpha = l2.
    theirs = RidgeClassifier(alpha=ours.l2_abs_).fit(x, y)
    agree = np.mean(ours.predict(x_test) == theirs.predict(x_test))
    assert agree >= 0.995
    assert abs(ours.score(x_test, y_test)["top1"] - theirs.score(x_test, y_test)) <= 0.005


def test_logistic_agrees_with_sklearn_logistic_regression():
    x, y = blobs(30)
    x_test, y_test = blobs(40, seed=1)
    l2 = 1e-2
    ours = logistic.LogisticProbe(l2s=[l2], tol=1e-6).fit(x, y)
    scaler = StandardScaler().fit(x)
    theirs = LogisticRegression(C=1.0 / (l2 * len(x)), tol=1e-8, max_iter=5000).fit(
        scaler.transform(x), y
    )
    # Same strongly convex objective, both converged: probabilities within 1e-2, accuracy within 1 point.
    ours_probs = np.asarray(jax.nn.softmax(ours.predict_scores(x_test)))
    np.testing.assert_allclose(
        ours_probs, theirs.predict_proba(scaler.transform(x_test)), atol=1e-2
    )
    assert (
        abs(ours.score(x_test, y_test)["top1"] - theirs.score(scaler.transform(x_test), y_test))
        <= 0.01
    )
    assert ours.grad_max_ <= 1e-6 and ours.iterations_[-1] < ours.max_iter


def test_penalty_is_chosen_on_a_class_balanced_holdout():
    x, y = blobs(20)
    hold = probe.class_balanced_holdout(y, np.ones(len(y)), 0.25, seed=3)
    assert np.bincount(y[hold]).tolist() == [5] * 6
    np.testing.assert_array_equal(
        hold, probe.class_balanced_holdout(y, np.ones(len(y)), 0.25, seed=3)
    )
    assert not np.array_equal(hold, probe.class_balanced_holdout(y, np.ones(len(y)), 0.25, seed=4))
    for cls in (probe.RidgeProbe, logistic.LogisticProbe):
        p = cls().fit(x, y)
        assert p.l2_source_ == "holdout" and set(p.sweep_) == set(p.l2s) and p.l2_ in p.l2s
        assert p.sweep_[p.l2_] == max(p.sweep_.values())
    one_shot = logistic.LogisticProbe().fit(
        x[::20], y[::20]
    )  # One image per class: nothing to hold out.
    assert one_shot.l2_source_ == "fixed" and one_shot.l2_ == one_shot.fallback_l2


@pytest.mark.parametrize("cls", [probe.RidgeProbe, logistic.LogisticProbe])
def test_row_sharded_fit_equals_single_device_fit(cls):
    x, y = blobs(17)  # 102 rows: padded to 104 over 8 devices.
    x_test, y_test = blobs(10, seed=1)
    mesh = parallel.make_mesh()
    assert mesh.devices.size == 8
    xs, mask = probe.shard_rows(x, mesh)
    assert xs.shape[0] == 104 and float(mask.sum()) == 102
    assert len(xs.sharding.device_set) == 8
    sharded = cls().fit(xs, y, mask)
    # Host arrays go to `fit_mesh()`: on CPU one device (replicated work is not repeated per device).
    assert probe.fit_mesh().devices.size == 1 and probe.fit_mesh(mesh).devices.size == 1
    single = cls().fit(x, y)
    assert sharded.l2_ == single.l2_
    xt, mt = probe.shard_rows(x_test, mesh)
    np.testing.assert_allclose(
        np.asarray(sharded.predict_scores(xt))[:60],
        np.asarray(single.predict_scores(x_test)),
        atol=1e-3,
    )
    assert sharded.score(xt, y_test, mt) == pytest.approx(single.score(x_test, y_test), abs=1e-6)


def test_bad_sweep_is_a_config_error():
    with pytest.raises(ConfigError, match="must be positive"):
        logistic.LogisticProbe(l2s=[0.1, 0.0])
