"""Benchmarks of the linear probes and of feature extraction (results: benchmarks/probe.md).

    python scripts/benchmark.py --what probe
    python scripts/benchmark.py --what features --model resnet50 --batch_size 32 --steps 5 --warmup 2

`run_probe_benchmark`: a seeded, class-structured synthetic feature matrix of
Caltech-101 shape (102 classes x 30 train images, 2,048 features; 50 test
images per class), our ridge and logistic probes against scikit-learn's
`RidgeClassifier` and `LogisticRegression(lbfgs)`, and our L-BFGS against `optax.lbfgs`
(`OptaxLogisticProbe`), in the same process, one fit
and the whole Caltech-101 protocol sweep (N = 15, 30 x 5 trials x the L2
sweep, chosen on a held-out 20%, refit) run identically by both.

`run_feature_benchmark`: ResNet-50 pre_logits features at 224x224 on the CPU,
images/s of our jitted forward pass vs torchvision (inference_mode,
channels_last, eval) and Keras 3 ResNet50 on the JAX backend, same threads and
batch. Timings exclude compilation and warm-up batches; the machine load
(`os.getloadavg`) is recorded with them since other jobs may share the CPU.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxres import parallel
from jaxres.bench import common
from jaxres.config_transfer import base_transfer_config
from jaxres.transfer import logistic, probe, runner, sampling

CALTECH101_SHAPE = {"num_classes": 102, "dim": 2048, "train_per_class": 30, "test_per_class": 50}


def synthetic_features(
    num_classes: int,
    per_class: int,
    dim: int,
    seed: int = 0,
    latent: int = 128,
    spread: float = 3.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Class-structured, ReLU'd features like pooled CNN ones, seeded.

    Each class has a centre in a `latent`-dimensional space; an example is its
    centre plus isotropic noise (`spread`), mapped to `dim` features by a fixed
    random matrix, plus feature noise, then ReLU. spread = 3 puts a linear probe
    at 30 images per class near 70% top-1: far from both chance and 100%.
    """
    structure = np.random.default_rng(seed)  # Centres and mixing: the "dataset".
    centres = structure.normal(size=(num_classes, latent))
    mix = structure.normal(size=(latent, dim)) / np.sqrt(latent)
    rng = np.random.default_rng([seed, per_class])  # The draw of examples.
    y = np.repeat(np.arange(num_classes), per_class)
    z = centres[y] + spread * rng.normal(size=(len(y), latent))
    x = np.maximum(z @ mix + rng.normal(size=(len(y), dim)), 0.0)
    return x.astype(np.float32), y


def matmul_flops(n: int, d: int, c: int, repeats: int = 20) -> float:
    """Measured FLOP/s of the probe's matmul shape [n, d] x [d, c] (float32, jitted)."""
    x = jnp.asarray(np.random.default_rng(0).random((n, d), np.float32))
    w = jnp.asarray(np.random.default_rng(1).random((d, c), np.float32))
    f = jax.jit(lambda x, w: x @ w)
    f(x, w).block_until_ready()
    t, _ = common.best_time(lambda: f(x, w), repeats)
    return 2 * n * d * c / t


# ------------------------------------------------------------------ optax.lbfgs, the alternative


@functools.partial(jax.jit, static_argnames=("num_classes", "max_iter", "memory"))
def optax_logistic_path(
    x, y, fit_mask, hold_mask, mu, sigma, l2s, theta, tol, *, num_classes, max_iter, memory=10
):
    """`logistic.logistic_path` (sweep + refit, same arguments and result) by `optax.lbfgs`.

    The same objective, standardisation, start, penalty order, warm start from the previous
    penalty's solution (not its curvature memory: optax's state holds no penalty to shift)
    and stopping rule (max |grad F| <= tol); optax's zoom line search evaluates value and
    gradient (two [N, D] x [D, C] matmuls) at every trial step.
    """
    import optax

    z = logistic.design_matrix(x, mu, sigma)
    onehot = jax.nn.one_hot(y, num_classes)
    pen = jnp.ones((z.shape[1], 1)).at[-1].set(0.0)

    def fit(theta, mask, l2):
        w = mask / jnp.maximum(mask.sum(), 1.0)

        def loss(theta):
            logp = jax.nn.log_softmax(z @ theta)
            return -(w * (onehot * logp).sum(-1)).sum() + 0.5 * l2 * jnp.vdot(pen * theta, theta)

        opt = optax.lbfgs(memory_size=memory)
        value_and_grad = optax.value_and_grad_from_state(loss)

        def step(carry):
            theta, state, k = carry
            value, grad = value_and_grad(theta, state=state)
            updates, state = opt.update(grad, state, theta, value=value, grad=grad, value_fn=loss)
            return optax.apply_updates(theta, updates), state, k + 1

        def more(carry):
            _, state, k = carry
            grad_max = jnp.max(jnp.abs(optax.tree_utils.tree_get(state, "grad")))
            return (k == 0) | ((k < max_iter) & (grad_max > tol))

        theta, state, k = jax.lax.while_loop(more, step, (theta, opt.init(theta), jnp.int32(0)))
        return theta, k, jnp.max(jnp.abs(optax.tree_utils.tree_get(state, "grad")))

    def one(theta, l2):
        theta, k, _ = fit(theta, fit_mask, l2)
        top1 = probe.accuracy(z @ theta, y, hold_mask, num_classes)["top1"]
        return theta, {"theta": theta, "holdout_top1": top1, "iterations": k}

    _, path = jax.lax.scan(one, theta, l2s)
    best = jnp.argmax(path["holdout_top1"])
    theta, k, grad_max = fit(path["theta"][best], fit_mask + hold_mask, l2s[best])
    path.update(best=best, final={"theta": theta, "iterations": k, "grad_max": grad_max})
    return path


class OptaxLogisticProbe(logistic.LogisticProbe):
    """`logistic.LogisticProbe` fitted by `optax.lbfgs` (`optax_logistic_path`): the yardstick."""

    solver = staticmethod(optax_logistic_path)


def single_fit_comparison(data: dict, l2: float, tol: float, repeats: int) -> dict[str, Any]:
    """One logistic fit at a fixed L2 (ours vs scikit-learn) and one ridge fit, with test accuracy."""
    from sklearn.linear_model import LogisticRegression, RidgeClassifier
    from sklearn.preprocessing import StandardScaler

    (x, y), (xt, yt) = data["train"], data["test"]
    cold, _ = common.timed(lambda: logistic.LogisticProbe(l2s=[l2], tol=tol).fit(x, y))
    warm, ours = common.best_time(lambda: logistic.LogisticProbe(l2s=[l2], tol=tol).fit(x, y), repeats)
    optax_cold, _ = common.timed(lambda: OptaxLogisticProbe(l2s=[l2], tol=tol).fit(x, y))
    optax_warm, opt = common.best_time(lambda: OptaxLogisticProbe(l2s=[l2], tol=tol).fit(x, y), repeats)
    scaler = StandardScaler().fit(x)
    xs, xts = scaler.transform(x), scaler.transform(xt)

    def sk_fit():
        return LogisticRegression(C=1.0 / (l2 * len(x)), tol=tol, max_iter=10_000).fit(xs, y)

    sk_time, sk = common.best_time(sk_fit, repeats)
    ridge_time, ridge = common.best_time(lambda: probe.RidgeProbe(l2s=[1.0]).fit(x, y), repeats)
    skr_time, skr = common.best_time(lambda: RidgeClassifier(alpha=ridge.l2_abs_).fit(x, y), repeats)
    # Two [N, D + 1] x [D + 1, C] matmuls per iteration, two more to start (and two for the
    # refit's start, which finds the fit converged).
    iterations = sum(ours.iterations_)
    flop_bound = (
        (iterations + 2)
        * 2
        * (2 * x.shape[0] * (x.shape[1] + 1) * data["num_classes"])
        / data["flops"]
    )
    return {
        "l2": l2,
        "tol": tol,
        "ours_logistic": {
            "seconds": warm,
            "seconds_with_compile": cold,
            "iterations": iterations,
            "top1": ours.score(xt, yt)["top1"],
            "grad_max": ours.grad_max_,
            "flop_bound_seconds": flop_bound,
        },
        "optax_logistic": {
            "seconds": optax_warm,
            "seconds_with_compile": optax_cold,
            "iterations": sum(opt.iterations_),
            "top1": opt.score(xt, yt)["top1"],
            "grad_max": opt.grad_max_,
        },
        "sklearn_logistic": {
            "seconds": sk_time,
            "iterations": int(sk.n_iter_[0]),
            "top1": float(sk.score(xts, yt)),
        },
        "ours_ridge": {"seconds": ridge_time, "top1": ridge.score(xt, yt)["top1"]},
        "sklearn_ridge": {"seconds": skr_time, "top1": float(skr.score(xt, yt))},
    }


def _sklearn_probe(
    method: str, x, y, xt, yt, l2s, holdout_mask, tol, warm: bool = True
) -> dict[str, float]:
    """scikit-learn doing what our probe does: sweep on the held-out part, refit, score.

    `warm`: logistic fits start from the previous penalty's solution (as ours do); False is
    the plain `LogisticRegression(C=...).fit` per penalty.
    """
    from sklearn.linear_model import LogisticRegression, RidgeClassifier
    from sklearn.preprocessing import StandardScaler

    fit = ~holdout_mask
    if method == "logistic":
        scaler = StandardScaler().fit(x)
        x, xt = scaler.transform(x), scaler.transform(xt)
        model = LogisticRegression(tol=tol, max_iter=10_000, warm_start=warm)
        accs = {}
        for l2 in sorted(l2s, reverse=True):  # Strong to weak, warm-started, as ours.
            model.set_params(C=1.0 / (l2 * fit.sum())).fit(x[fit], y[fit])
            accs[l2] = model.score(x[holdout_mask], y[holdout_mask])
        best = max(l2s, key=lambda v: (accs[v], -l2s.index(v)))
        model.set_params(C=1.0 / (best * len(x))).fit(x, y)
    else:
        xc = x[fit] - x[fit].mean(0)
        scale = np.sum(xc.astype(np.float64) ** 2) / x.shape[1]
        accs = {
            a: RidgeClassifier(alpha=a * scale)
            .fit(x[fit], y[fit])
            .score(x[holdout_mask], y[holdout_mask])
            for a in l2s
        }
        best = max(l2s, key=lambda v: (accs[v], -l2s.index(v)))
        xa = x - x.mean(0)
        model = RidgeClassifier(alpha=best * np.sum(xa.astype(np.float64) ** 2) / x.shape[1]).fit(
            x, y
        )
    return {"top1": float(model.score(xt, yt)), "l2": best}


def protocol_sweep(
    pool: tuple[np.ndarray, np.ndarray], method: str, backend: str, tol: float
) -> dict[str, Any]:
    """The Caltech-101 protocol (N = 15, 30 x 5 trials x L2 sweep), `backend` "ours", "optax"
    (logistic only: `OptaxLogisticProbe`), "sklearn" (warm-started along the sweep) or
    "sklearn_cold"."""
    x, y = pool
    names = [str(c) for c in range(int(y.max()) + 1)]
    trials = sampling.sample_pool_trials(y, names, [15, 30], 50, True, trials=5, seed=0)
    l2s = list(logistic.LOGISTIC_L2S if method == "logistic" else probe.RIDGE_L2S)
    config = base_transfer_config().probe
    config.tol = tol
    mesh = probe.fit_mesh()
    start, rows = time.perf_counter(), []
    for trial in trials:
        train, test = (x[trial.train], y[trial.train]), (x[trial.test], y[trial.test])
        if backend == "ours":
            row, _, _ = runner.fit_and_score(
                method, config, trial.seed, train, test, len(names), mesh
            )
        elif backend == "optax":  # runner.fit_and_score's steps, with optax's solver.
            rows_x, rows_mask = probe.shard_rows(train[0], mesh)
            fitted = OptaxLogisticProbe(
                holdout=config.holdout, seed=trial.seed, tol=tol, max_iter=config.max_iter
            ).fit(rows_x, train[1], rows_mask, len(names))
            row = dict(fitted.score(*probe.shard_rows(test[0], mesh)[:1], test[1]), l2=fitted.l2_)
        else:
            hold = probe.class_balanced_holdout(
                train[1], np.ones(len(train[1])), config.holdout, trial.seed
            )
            row = _sklearn_probe(method, *train, *test, l2s, hold, tol, warm=backend == "sklearn")
        rows.append(
            {
                "per_class": trial.per_class,
                "trial": trial.trial,
                "top1": row["top1"],
                "l2": row["l2"],
            }
        )
    seconds = time.perf_counter() - start
    means = {n: float(np.mean([r["top1"] for r in rows if r["per_class"] == n])) for n in (15, 30)}
    return {
        "seconds": seconds,
        "fits": len(trials) * (len(l2s) + 1),
        "top1_mean": means,
        "trials": rows,
    }


def run_probe_benchmark(
    seed: int = 0, repeats: int = 3, sweep: bool = True, num_classes: int = 102, dim: int = 2048
) -> dict[str, Any]:
    """Fit time and test accuracy, ours vs scikit-learn (see the module docstring).

    Args:
      seed: of the synthetic features.
      num_classes, dim: of the synthetic features (default: Caltech-101's classes and
        ResNet-50's 2,048 features; 30 train and 50 test images per class either way).
      repeats: timed repetitions of each single fit (the minimum is kept).
      sweep: also time the whole Caltech-101 protocol sweep (minutes with scikit-learn).

    Returns:
      A JSON-ready dict of timings, iterations, accuracies, the measured matmul FLOP/s and the load.
    """
    shape = dict(CALTECH101_SHAPE, num_classes=num_classes, dim=dim)
    c, d = shape["num_classes"], shape["dim"]
    data = {
        "num_classes": c,
        "train": synthetic_features(c, shape["train_per_class"], d, seed),
        "test": synthetic_features(c, shape["test_per_class"], d, seed),
    }
    data["flops"] = matmul_flops(c * shape["train_per_class"], d, c)
    out = {
        "shape": shape,
        "devices": str(jax.devices()[0].device_kind),
        "cpus": os.cpu_count(),
        "load_before": common.load_average(),
        "matmul_gflops": data["flops"] / 1e9,
    }
    out["single_fit"] = [
        single_fit_comparison(data, l2, tol, repeats) for l2, tol in ((1e-3, 1e-4), (1e-3, 1e-6))
    ]
    if sweep:
        pool = synthetic_features(
            c, 80, d, seed
        )  # 30 train + 50 test per class, re-drawn per trial.
        runs = [
            ("logistic", "ours"),
            ("logistic", "ours"),
            ("logistic", "optax"),
            ("logistic", "optax"),
            ("logistic", "sklearn"),
            ("logistic", "sklearn_cold"),
            ("ridge", "ours"),
            ("ridge", "ours"),
            ("ridge", "sklearn"),
        ]
        out["sweep"] = {}
        for m, b in runs:  # The second "ours" run finds its functions compiled.
            key = f"{m}/{b}" + ("_compiled" if f"{m}/{b}" in out["sweep"] else "")
            out["sweep"][key] = protocol_sweep(pool, m, b, 1e-4)
    out["load_after"] = common.load_average()
    return out


# ------------------------------------------------------------------------- feature extraction


def _time_batches(run: Callable[[], Any], batch: int, steps: int, warmup: int) -> float:
    """Images/s of `run` (one batch a call) over `steps` calls after `warmup`."""
    return batch * steps / sum(common.call_times(run, steps, warmup))


def jax_features_speed(model_name: str, batch: int, size: int, steps: int, warmup: int) -> float:
    """img/s of `jaxres.transfer.features.FeatureExtractor`'s jitted pre_logits pass, all devices.

    float32, uint8 input normalised on device, the batch sharded over the mesh, exactly
    as `scripts/linear_probe.py` runs it (on CPU, one device per core: see
    `parallel.use_one_cpu_device_per_core`).
    """
    from jaxres import config_base, models, runs
    from jaxres.transfer.features import FeatureExtractor

    config = config_base.base_config()
    config.model.name, config.dataset.image_size = model_name, size
    model = models.create_model(model_name, num_classes=1000, dtype="float32")
    variables = parallel.run_once(
        functools.partial(model.init, train=False), jax.random.key(0), jnp.zeros((1, size, size, 3))
    )
    loaded = runs.LoadedRun(
        run="", step=0, config=config, model=model, variables=jax.device_get(variables), meta={}
    )
    extractor = FeatureExtractor(loaded)
    images = parallel.place(
        np.random.default_rng(0).integers(0, 256, (batch, size, size, 3), np.uint8),
        parallel.batch_sharding(extractor.mesh),
    )
    run = lambda: extractor.fn(extractor.variables, images).block_until_ready()
    return _time_batches(run, batch, steps, warmup)


def torch_features_speed(batch: int, size: int, steps: int, warmup: int, threads: int) -> float:
    """img/s of torchvision resnet50 without its fc (inference_mode, channels_last, eval)."""
    import torch
    import torchvision

    torch.set_num_threads(threads)
    model = torchvision.models.resnet50(weights=None)
    model.fc = torch.nn.Identity()
    model = model.eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, size, size).to(memory_format=torch.channels_last)
    with torch.inference_mode():
        return _time_batches(lambda: model(x), batch, steps, warmup)


def keras_features_speed(batch: int, size: int, steps: int, warmup: int) -> float:
    """img/s of Keras 3 ResNet50 (no top, average pooling) on the JAX backend, `predict_on_batch`."""
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    if keras.backend.backend() != "jax":
        raise RuntimeError(
            f"Keras was imported with the {keras.backend.backend()} backend; run in a fresh process."
        )
    model = keras.applications.ResNet50(
        weights=None, include_top=False, pooling="avg", input_shape=(size, size, 3)
    )
    x = np.random.default_rng(0).random((batch, size, size, 3), np.float32)
    return _time_batches(lambda: model.predict_on_batch(x), batch, steps, warmup)


def run_feature_benchmark(
    model: str = "resnet50",
    batch_size: int = 32,
    image_size: int = 224,
    steps: int = 5,
    warmup: int = 2,
    frameworks: Sequence[str] = ("jaxres", "torchvision", "keras_jax"),
) -> dict[str, Any]:
    """ResNet-50 feature extraction img/s: jaxres vs torchvision vs Keras 3 (JAX backend), one process.

    A framework that is not installed gets a note instead of a number; `frameworks` picks
    which run.
    """
    threads = os.cpu_count() or 1
    out = {
        "model": model,
        "batch_size": batch_size,
        "image_size": image_size,
        "steps": steps,
        "threads": threads,
        "jax_devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "load_before": common.load_average(),
    }
    runs = {
        "jaxres": lambda: jax_features_speed(model, batch_size, image_size, steps, warmup),
        "torchvision": lambda: torch_features_speed(batch_size, image_size, steps, warmup, threads),
        "keras_jax": lambda: keras_features_speed(batch_size, image_size, steps, warmup),
    }
    for name, run in runs.items():
        if name not in frameworks:
            continue
        try:
            out[name] = {"img_per_sec": run()}
        except ImportError as e:
            out[name] = {
                "skipped": f"not installed ({e.name}); pip install torch==2.14.1 torchvision==0.29.1 keras"
            }
    out["load_after"] = common.load_average()
    return out
