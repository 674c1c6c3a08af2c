"""Probes on frozen features, in JAX: the shared base and the closed-form ridge probe.

Every probe (`RidgeProbe` here, `logistic.LogisticProbe`, `mlp_head.MLPProbe`) is a
`Probe` and has the same interface::

    probe = RidgeProbe().fit(x_train, y_train)          # picks L2 on a held-out part, refits
    probe.predict(x_test); probe.score(x_test, y_test)  # {"top1", "mean_per_class"}

and work on a feature matrix whose rows are sharded over the `data` mesh axis
(`shard_rows`): every sum over examples is a masked sum, so padding rows
(mask 0) and held-out rows (a second mask) never need slicing, and XLA inserts
the cross-device reductions.

Choosing the regularisation: `fit` holds out `holdout` of each class's train
examples (class-balanced, seeded), fits the whole L2 sweep on the rest, keeps
the L2 with the best held-out top-1 (ties: the strongest), then refits on every
train example. With one example per class
nothing can be held out and `fallback_l2` is used.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxres import parallel
from jaxres.errors import ConfigError

# Relative ridge penalties (multiples of the mean eigenvalue of the centred Gram matrix).
RIDGE_L2S = tuple(10.0**e for e in np.arange(-4.0, 2.01, 0.5))


def fit_mesh(mesh: jax.sharding.Mesh | None = None) -> jax.sharding.Mesh:
    """The mesh probes fit on: `mesh` (default: every device), but a single device on CPU.

    Every device of a mesh runs the replicated parts of a fit (the eigendecomposition,
    the L-BFGS recursion). GPUs do that side by side; CPU devices share the host's
    cores, so there each extra device repeats the work (the ridge sweep ran 2.1x
    slower on 2 CPU devices than on 1) and the sharded matmuls gain nothing.
    """
    mesh = mesh if mesh is not None else parallel.make_mesh()
    if mesh.devices.size > 1 and mesh.devices.flat[0].platform == "cpu":
        return parallel.make_mesh(jax.local_devices()[:1])
    return mesh


def shard_rows(x: Any, mesh: jax.sharding.Mesh | None = None) -> tuple[jax.Array, jax.Array]:
    """Pads rows to a multiple of the mesh size and shards them over `data`.

    Args:
      x: [N, ...] host array (the same on every process).
      mesh: default: `fit_mesh()`.

    Returns:
      `(x_padded, mask)`: the sharded [N', ...] array and a float32 [N'] mask (0 on padding).
    """
    mesh = mesh if mesh is not None else fit_mesh()
    x = np.asarray(x)
    n = len(x)
    padded = -(-n // mesh.devices.size) * mesh.devices.size
    x = np.concatenate([x, np.zeros((padded - n,) + x.shape[1:], x.dtype)])
    mask = (np.arange(padded) < n).astype(np.float32)
    sharding = parallel.batch_sharding(mesh)
    return parallel.place(x, sharding), parallel.place(mask, sharding)


def pad_like(values: Any, x: jax.Array) -> jax.Array:
    """Host per-row values (labels, masks), zero-padded to `x`'s rows and placed like them."""
    values = np.asarray(values)
    values = np.concatenate(
        [values, np.zeros((x.shape[0] - len(values),) + values.shape[1:], values.dtype)]
    )
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding) and len(sharding.spec) > 0:
        return parallel.place(values, NamedSharding(sharding.mesh, P(sharding.spec[0])))
    return jnp.asarray(values)


def class_balanced_holdout(
    labels: np.ndarray, mask: np.ndarray, fraction: float, seed: int
) -> np.ndarray:
    """Boolean [N]: `round(fraction * n_c)` (at least 1) examples of each class with n_c >= 2, seeded."""
    rng = np.random.default_rng(seed)
    hold = np.zeros(len(labels), bool)
    valid = np.asarray(mask) > 0
    for c in np.unique(labels[valid]):
        idx = np.flatnonzero((labels == c) & valid)
        if len(idx) < 2 or fraction <= 0:
            continue
        k = min(len(idx) - 1, max(1, round(fraction * len(idx))))
        hold[rng.choice(idx, k, replace=False)] = True
    return hold


@functools.partial(jax.jit, static_argnames="num_classes")
def accuracy(
    scores: jax.Array, labels: jax.Array, mask: jax.Array, num_classes: int
) -> dict[str, jax.Array]:
    """Masked top-1 and mean per-class accuracy (over classes present in the mask)."""
    correct = (scores.argmax(-1) == labels) * mask
    in_class = jax.nn.one_hot(labels, num_classes) * mask[:, None]
    count, hits = in_class.sum(0), (in_class * correct[:, None]).sum(0)
    per_class = jnp.where(count > 0, hits / jnp.maximum(count, 1), 0.0)
    return {
        "top1": correct.sum() / jnp.maximum(mask.sum(), 1),
        "mean_per_class": per_class.sum() / jnp.maximum((count > 0).sum(), 1),
    }


def host_mask(mask: Any, n: int) -> np.ndarray:
    """The first n entries of a row mask (host or sharded device array); all ones when None."""
    if mask is None:
        return np.ones(n, np.float32)
    if isinstance(mask, jax.Array):
        mask = parallel.gather_rows(mask)
    return np.asarray(mask, np.float32)[:n]


class Probe:
    """What every probe offers: fit, class scores, predictions, accuracy and its head's parameters.

    Subclasses fit (`fit` sets `num_classes`, `l2_`, `l2_source_`, `sweep_`) and score
    (`predict_scores`, `head_params`); `predict` and `score` are shared.
    """

    name = "probe"
    hidden = 0  # Hidden units of the head it exports (0: linear; see `head_params`).
    num_classes: int

    def fit(self, x: Any, y: Any, mask: Any = None, num_classes: int | None = None) -> Probe:
        """Fits on the rows of `x` [N, D] with labels `y` [N] where `mask` (default all) is 1."""
        raise NotImplementedError

    def predict_scores(self, x: Any) -> jax.Array:
        """Class scores [N, C] (same row sharding as `x`)."""
        raise NotImplementedError

    def head_params(self) -> dict[str, dict[str, np.ndarray]]:
        """The fitted head on raw features as float32 numpy ({"head": {"kernel", "bias"}}, ...)."""
        raise NotImplementedError

    def predict(self, x: Any) -> np.ndarray:
        """Predicted class ids [N] on the host."""
        return parallel.gather_rows(self.predict_scores(x).argmax(-1))

    def score(self, x: Any, y: Any, mask: Any = None) -> dict[str, float]:
        """`{"top1", "mean_per_class"}` on the rows of `x` where `mask` (default all) is 1."""
        x = x if isinstance(x, jax.Array) else jnp.asarray(x, jnp.float32)
        y_host = np.asarray(y, np.int32)
        mask_host = host_mask(mask, len(y_host))
        metrics = accuracy(
            self.predict_scores(x), pad_like(y_host, x), pad_like(mask_host, x), self.num_classes
        )
        return {k: float(v) for k, v in metrics.items()}


class LinearProbe(Probe):
    """A linear head with an L2 sweep: the L2 chosen on a class-balanced held-out part of train."""

    name = "linear"
    default_l2s: tuple[float, ...] = ()

    def __init__(
        self,
        l2s: Sequence[float] | None = None,
        holdout: float = 0.2,
        fallback_l2: float | None = None,
        seed: int = 0,
    ):
        self.l2s = tuple(float(v) for v in (l2s if l2s is not None else self.default_l2s))
        if not self.l2s or min(self.l2s) <= 0:
            raise ConfigError(
                f"{self.name} probe: the L2 sweep must be positive values, got {self.l2s}."
            )
        self.holdout = holdout
        self.fallback_l2 = fallback_l2 if fallback_l2 is not None else self.l2s[len(self.l2s) // 2]
        self.seed = seed
        self.sweep_: dict[float, float] = {}

    def fit(self, x: Any, y: Any, mask: Any = None, num_classes: int | None = None) -> LinearProbe:
        """Fits on the rows of `x` [N, D] with labels `y` [N] where `mask` (default all) is 1.

        `x` may be a host array or a (row-sharded) jax.Array; `y` and `mask` are host arrays
        of its first len(y) rows, padded like `x`.
        """
        y_host = np.asarray(y, np.int32)
        mask_host = host_mask(mask, len(y_host))
        self.num_classes = int(num_classes or y_host.max() + 1)
        x = x if isinstance(x, jax.Array) else jnp.asarray(x, jnp.float32)
        labels, weights = pad_like(y_host, x), pad_like(mask_host, x)
        self._prepare(x, weights)
        hold = class_balanced_holdout(y_host, mask_host, self.holdout, self.seed)
        if len(self.l2s) > 1 and hold.any():
            hold_mask = pad_like(mask_host * hold, x)
            accs = np.asarray(self._sweep(x, labels, weights - hold_mask, hold_mask))
            self.sweep_ = dict(zip(self.l2s, accs.tolist()))
            best = max(self.sweep_.values())
            # Ties: the strongest penalty (LogisticProbe's in-graph choice agrees).
            self.l2_ = max(l2 for l2, acc in self.sweep_.items() if acc == best)
            self.l2_source_ = "holdout"
        else:
            self.l2_ = self.l2s[0] if len(self.l2s) == 1 else self.fallback_l2
            self.l2_source_ = "fixed"
        self._fit_one(x, labels, weights, self.l2_)
        return self

    def head_params(self) -> dict[str, dict[str, np.ndarray]]:
        """The fitted scores as a classifier head on raw features: {"head": {"kernel", "bias"}}.

        `x @ kernel + bias` equals `predict_scores(x)`: any standardisation is folded in,
        so `jaxres.transfer.export` can put the head on the backbone as it is.
        """
        kernel, bias = self._affine()
        return {"head": {"kernel": np.asarray(kernel, np.float32), "bias": np.asarray(bias, np.float32)}}

    # Subclasses: statistics of the train rows, the held-out sweep, the final fit, the affine map.
    def _affine(self) -> tuple[jax.Array, jax.Array]:
        raise NotImplementedError

    def _prepare(self, x: jax.Array, mask: jax.Array) -> None:
        pass

    def _sweep(
        self, x: jax.Array, y: jax.Array, fit_mask: jax.Array, hold_mask: jax.Array
    ) -> jax.Array:
        raise NotImplementedError

    def _fit_one(self, x: jax.Array, y: jax.Array, mask: jax.Array, l2: float) -> None:
        raise NotImplementedError


# ----------------------------------------------------------------------------------------------
# Ridge regression to centred one-hot targets.
#
# With weights m_i in {0, 1} (padding and held-out rows get 0), n = sum m_i,
#   mu = sum m_i x_i / n,  Xc = diag(m) (X - mu),  T = one_hot(y),  t = sum m_i T_i / n,
#   Tc = diag(m) (T - t),
# the ridge solution  W(l) = argmin ||Xc W - Tc||^2 + l ||W||^2  is
#   W(l) = (Xc^T Xc + l I)^-1 Xc^T Tc                                  (primal, D x D)
#        = Xc^T (Xc Xc^T + l I)^-1 Tc                                  (dual, N x N)
# (push-through identity), and scores are (x - mu) W + t. Diagonalising the smaller
# Gram matrix once, Xc^T Xc = V diag(s) V^T, gives every l at the cost of a matmul:
#   W(l) = V diag(1 / (s + l)) V^T Xc^T Tc
# and likewise in the dual with Xc Xc^T = U diag(s) U^T:
#   W(l) = (Xc^T U) diag(1 / (s + l)) U^T Tc.
# The final refit at the chosen l is one Cholesky solve of the same system.
# Penalties are relative: l = alpha * trace(Xc^T Xc) / D (the mean eigenvalue), so one
# sweep of alphas suits features of any scale. Centred one-hot targets are
# scikit-learn's RidgeClassifier targets {-1, 1} divided by 2 (same argmax).
# ----------------------------------------------------------------------------------------------


def _centred_problem(x: jax.Array, y: jax.Array, mask: jax.Array, num_classes: int):
    """Xc, mu, Tc, t and the mean eigenvalue trace(Xc^T Xc) / D of the masked rows."""
    n = jnp.maximum(mask.sum(), 1.0)
    x = x.astype(jnp.float32)
    mu = (x * mask[:, None]).sum(0) / n
    xc = (x - mu) * mask[:, None]
    t = jax.nn.one_hot(y, num_classes)
    t_mean = (t * mask[:, None]).sum(0) / n
    tc = (t - t_mean) * mask[:, None]
    return xc, mu, tc, t_mean, jnp.sum(xc * xc) / x.shape[1]


@functools.partial(jax.jit, static_argnames="num_classes")
def ridge_path(
    x: jax.Array, y: jax.Array, mask: jax.Array, alphas: jax.Array, num_classes: int
) -> dict[str, jax.Array]:
    """Ridge weights for every relative penalty in `alphas`, from one eigendecomposition.

    Args:
      x: [N, D] features; y: [N] int labels; mask: [N] 0/1 row weights.
      alphas: [L] penalties relative to the mean eigenvalue of the centred Gram matrix.
      num_classes: C.

    Returns:
      `{"w": [L, D, C], "b": [L, C], "l2": [L] absolute penalties}`.
    """
    xc, mu, tc, t_mean, scale = _centred_problem(x, y, mask, num_classes)
    rows, dim = x.shape
    l2 = alphas * scale
    if dim <= rows:
        s, v = jnp.linalg.eigh(xc.T @ xc)
        left, right = v, v.T @ (xc.T @ tc)  # [D, D], [D, C]
    else:
        s, u = jnp.linalg.eigh(xc @ xc.T)
        left, right = xc.T @ u, u.T @ tc  # [D, N], [N, C]
    inv = 1.0 / (jnp.maximum(s, 0.0)[None, :] + l2[:, None])  # [L, K]
    w = jnp.einsum("dk,lk,kc->ldc", left, inv, right)
    return {"w": w, "b": t_mean[None, :] - jnp.einsum("d,ldc->lc", mu, w), "l2": l2}


@functools.partial(jax.jit, static_argnames="num_classes")
def ridge_solve(
    x: jax.Array, y: jax.Array, mask: jax.Array, alpha: jax.Array, num_classes: int
) -> dict[str, jax.Array]:
    """Ridge weights for one relative penalty by a Cholesky solve (the final refit).

    Returns:
      `{"w": [D, C], "b": [C], "l2": absolute penalty}`.
    """
    xc, mu, tc, t_mean, scale = _centred_problem(x, y, mask, num_classes)
    rows, dim = x.shape
    l2 = alpha * scale
    if dim <= rows:
        factor = jax.scipy.linalg.cho_factor(xc.T @ xc + l2 * jnp.eye(dim))
        w = jax.scipy.linalg.cho_solve(factor, xc.T @ tc)
    else:
        factor = jax.scipy.linalg.cho_factor(xc @ xc.T + l2 * jnp.eye(rows))
        w = xc.T @ jax.scipy.linalg.cho_solve(factor, tc)
    return {"w": w, "b": t_mean - mu @ w, "l2": l2}


@functools.partial(jax.jit, static_argnames="num_classes")
def _ridge_sweep_accuracy(x, y, fit_mask, hold_mask, alphas, num_classes):
    path = ridge_path(x, y, fit_mask, alphas, num_classes)
    scores = jnp.einsum("nd,ldc->lnc", x, path["w"]) + path["b"][:, None, :]
    return jax.vmap(lambda s: accuracy(s, y, hold_mask, num_classes)["top1"])(scores)


class RidgeProbe(LinearProbe):
    """Least squares to centred one-hot targets, closed form; `l2s` are relative penalties."""

    name = "ridge"
    default_l2s = RIDGE_L2S

    def _sweep(self, x, y, fit_mask, hold_mask):
        return _ridge_sweep_accuracy(
            x, y, fit_mask, hold_mask, jnp.asarray(self.l2s, jnp.float32), self.num_classes
        )

    def _fit_one(self, x, y, mask, l2):
        solved = ridge_solve(x, y, mask, jnp.float32(l2), self.num_classes)
        self.w_, self.b_, self.l2_abs_ = solved["w"], solved["b"], float(solved["l2"])

    def predict_scores(self, x):
        x = x if isinstance(x, jax.Array) else jnp.asarray(x, jnp.float32)
        return _affine(x, self.w_, self.b_)

    def _affine(self):
        return self.w_, self.b_


@jax.jit
def _affine(x, w, b):
    return x.astype(jnp.float32) @ w + b


@jax.jit
def standardise_stats(x: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean and std of the masked rows, per feature (std 1 for constant features)."""
    n = jnp.maximum(mask.sum(), 1.0)
    mu = (x * mask[:, None]).sum(0) / n
    var = (((x - mu) ** 2) * mask[:, None]).sum(0) / n
    return mu, jnp.where(var > 1e-12, jnp.sqrt(var), 1.0)
