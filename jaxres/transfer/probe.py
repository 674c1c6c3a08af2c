"""Linear probes on frozen features, in JAX: closed-form ridge and L-BFGS logistic regression.

Both probes have the same interface::

    probe = LogisticProbe().fit(x_train, y_train)      # picks L2 on a held-out part, refits
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
# Logistic penalties on the mean cross-entropy of standardised features.
LOGISTIC_L2S = tuple(10.0**e for e in np.arange(0.0, -4.01, -0.5))


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


def _host_mask(mask: Any, n: int) -> np.ndarray:
    """The first n entries of a row mask (host or sharded device array); all ones when None."""
    if mask is None:
        return np.ones(n, np.float32)
    if isinstance(mask, jax.Array):
        mask = parallel.gather_rows(mask)
    return np.asarray(mask, np.float32)[:n]


class LinearProbe:
    """Shared fit / predict / score: L2 chosen on a class-balanced held-out part of train."""

    name = "linear"
    default_l2s: tuple[float, ...] = ()
    hidden = 0  # Hidden units of the head it exports (0: linear; see `head_params`).

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
        mask_host = _host_mask(mask, len(y_host))
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

    def predict_scores(self, x: Any) -> jax.Array:
        """Class scores [N, C] (same row sharding as `x`)."""
        raise NotImplementedError

    def head_params(self) -> dict[str, dict[str, np.ndarray]]:
        """The fitted scores as a classifier head on raw features: {"head": {"kernel", "bias"}}.

        `x @ kernel + bias` equals `predict_scores(x)`: any standardisation is folded in,
        so `jaxres.transfer.export` can put the head on the backbone as it is.
        """
        kernel, bias = self._affine()
        return {"head": {"kernel": np.asarray(kernel, np.float32), "bias": np.asarray(bias, np.float32)}}

    def _affine(self) -> tuple[jax.Array, jax.Array]:
        raise NotImplementedError

    def predict(self, x: Any) -> np.ndarray:
        """Predicted class ids [N] on the host."""
        return parallel.gather_rows(self.predict_scores(x).argmax(-1))

    def score(self, x: Any, y: Any, mask: Any = None) -> dict[str, float]:
        """`{"top1", "mean_per_class"}` on the rows of `x` where `mask` (default all) is 1."""
        x = x if isinstance(x, jax.Array) else jnp.asarray(x, jnp.float32)
        y_host = np.asarray(y, np.int32)
        mask_host = _host_mask(mask, len(y_host))
        metrics = accuracy(
            self.predict_scores(x), pad_like(y_host, x), pad_like(mask_host, x), self.num_classes
        )
        return {k: float(v) for k, v in metrics.items()}

    # Subclasses: statistics of the train rows, the held-out sweep, the final fit.
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


# ----------------------------------------------------------------------------------------------
# Multinomial logistic regression, L2, on standardised features.
#
#   z_i = [(x_i - mu) / sigma, 1]   (train-row mean / std, sigma = 1 for constant features; the
#                                    trailing 1 makes the bias the last row of theta [D + 1, C])
#   F(theta) = f(theta) + (l / 2) ||P theta||^2,   f(theta) = sum_i w_i CE(softmax(z_i theta), y_i)
# with w_i = m_i / sum m (so f is the mean cross-entropy) and P the projection that drops the
# bias row (bias not penalised): scikit-learn's objective with C = 1 / (l n).
#   grad F = Z^T (W (S - Y)) + l P theta       (S: softmax rows, Y: one-hot rows, W = diag(w))
# F is smooth and strongly convex in the penalised rows, so L-BFGS converges; we stop when
# max |grad F| <= tol (scipy's `gtol` test, which scikit-learn's lbfgs solver uses).
#
# Why our own L-BFGS rather than a generic one: for a linear model the loss along a search
# direction d only needs the logits Z d. One iteration is
#   1. d = -H g        (two-loop recursion over the last `memory` pairs s_k, y_k)
#   2. u = Z d         (matmul 1)
#   3. line search on phi(t) = F(theta + t d): logits + t u give phi, phi' and
#                        phi'' = sum_i w_i Var_{softmax}(u_i) + l ||P d||^2 in O(N C), no matmul;
#                        safeguarded 1-D Newton until |phi'(t)| <= 0.1 |phi'(0)| (strong Wolfe)
#   4. g' = Z^T (W (S' - Y)) + l P theta'   (matmul 2)
# so an iteration costs exactly two [N, D] x [D, C] matmuls, however many line-search
# steps it takes. Z^T is materialised once per call: XLA:CPU runs Z^T-contracting dots from a
# transposed copy ~2.5x faster.
# The sweep runs from the strongest penalty to the weakest. Changing l to l' leaves the data
# gradient, the logits and the memory's s_k unchanged and shifts every y_k (a difference of
# gradients) by exactly (l' - l) P s_k: the next fit starts from the previous solution with its
# curvature memory intact, at the cost of no matmul (warm start). The refit on all train rows
# follows in the same jitted call, from the sweep's solution at the chosen penalty, with a
# fresh memory and the logits and data gradient recomputed for the new rows (two matmuls).
# ----------------------------------------------------------------------------------------------


@jax.jit
def _standardise_stats(x, mask):
    n = jnp.maximum(mask.sum(), 1.0)
    mu = (x * mask[:, None]).sum(0) / n
    var = (((x - mu) ** 2) * mask[:, None]).sum(0) / n
    return mu, jnp.where(var > 1e-12, jnp.sqrt(var), 1.0)


def _design(x, mu, sigma):
    """Z = [standardised x, 1]."""
    z = (x.astype(jnp.float32) - mu) / sigma
    return jnp.concatenate([z, jnp.ones((z.shape[0], 1), z.dtype)], axis=1)


def _two_loop(g, memory_s, memory_y, rho, head):
    """-H g, the L-BFGS direction from the ring buffer of (s, y) pairs (rho = 0: empty slot)."""
    m = rho.shape[0]

    def backward(i, carry):
        q, alphas = carry
        k = (head - 1 - i) % m
        a = rho[k] * jnp.vdot(memory_s[k], q)
        return q - a * memory_y[k], alphas.at[k].set(a)

    q, alphas = jax.lax.fori_loop(0, m, backward, (g, jnp.zeros(m)))
    last = (head - 1) % m
    yy = jnp.vdot(memory_y[last], memory_y[last])
    gamma = jnp.where(rho[last] > 0, 1.0 / jnp.maximum(rho[last] * yy, 1e-30), 1.0)

    def forward(i, r):
        k = (head - m + i) % m
        b = rho[k] * jnp.vdot(memory_y[k], r)
        return r + memory_s[k] * (alphas[k] - b)

    return -jax.lax.fori_loop(0, m, forward, gamma * q)


def _line_search(logits, u, onehot, w, theta, d, pen, l2, max_steps: int = 10):
    """Step t along d minimising phi(t) = F(theta + t d), from the logits: no matmul."""
    yu = (onehot * u).sum(-1)
    pd, pdd = jnp.vdot(pen * theta, d), jnp.vdot(pen * d, d)
    reg0 = 0.5 * jnp.vdot(pen * theta, theta)

    def phi(t):
        logp = jax.nn.log_softmax(logits + t * u)
        prob = jnp.exp(logp)
        mean_u = (prob * u).sum(-1)
        value = -(w * (onehot * logp).sum(-1)).sum() + l2 * (reg0 + t * pd + 0.5 * t * t * pdd)
        slope = (w * (mean_u - yu)).sum() + l2 * (pd + t * pdd)
        curve = (w * ((prob * u * u).sum(-1) - mean_u**2)).sum() + l2 * pdd
        return value, slope, curve

    value0, slope0, _ = phi(0.0)

    def more(c):
        t, _, _, value, slope, _, k = c
        wolfe = (value <= value0 + 1e-4 * t * slope0) & (jnp.abs(slope) <= 0.1 * jnp.abs(slope0))
        return (k < max_steps) & ~wolfe

    def step(c):
        t, lo, hi, _, slope, curve, k = c
        lo, hi = jnp.where(slope < 0, t, lo), jnp.where(slope >= 0, t, hi)
        newton = t - slope / jnp.maximum(curve, 1e-30)
        fallback = jnp.where(jnp.isfinite(hi), 0.5 * (lo + hi), 2.0 * t)
        t = jnp.where((newton > lo) & (newton < hi), newton, fallback)
        return (t, lo, hi, *phi(t), k + 1)

    t, lo, _, value, _, _, _ = jax.lax.while_loop(more, step, (1.0, 0.0, jnp.inf, *phi(1.0), 0))
    # Convexity: every t in [0, argmin] decreases F, so lo is a safe fallback.
    return jnp.where(value <= value0, t, lo)


def _lbfgs(state, l2, z, zt, onehot, w, pen, tol, max_iter):
    """L-BFGS iterations on F at penalty l2 until max |grad F| <= tol; `state` as in `logistic_path`."""

    def grad(s):
        return s["gdata"] + l2 * pen * s["theta"]

    def more(s):
        return (s["iters"] < max_iter) & (jnp.max(jnp.abs(grad(s))) > tol) & ~s["stalled"]

    def step(s):
        g = grad(s)
        d = _two_loop(g, s["mem_s"], s["mem_y"], s["rho"], s["head"])
        d = jnp.where(
            jnp.vdot(g, d) < 0, d, -g
        )  # Not a descent direction (rare): steepest descent.
        u = z @ d
        t = _line_search(s["logits"], u, onehot, w, s["theta"], d, pen, l2)
        logits = s["logits"] + t * u
        gdata = zt @ ((jax.nn.softmax(logits) - onehot) * w[:, None])
        new = dict(
            s,
            theta=s["theta"] + t * d,
            logits=logits,
            gdata=gdata,
            iters=s["iters"] + 1,
            stalled=t <= 0,
        )
        step_s, step_y = t * d, grad(new) - g
        sy = jnp.vdot(step_s, step_y)
        keep = sy > 1e-10 * jnp.vdot(step_y, step_y)  # Curvature condition (always, if l2 > 0).
        h = s["head"]
        new["mem_s"] = s["mem_s"].at[h].set(jnp.where(keep, step_s, s["mem_s"][h]))
        new["mem_y"] = s["mem_y"].at[h].set(jnp.where(keep, step_y, s["mem_y"][h]))
        new["rho"] = (
            s["rho"].at[h].set(jnp.where(keep, 1.0 / jnp.where(keep, sy, 1.0), s["rho"][h]))
        )
        new["head"] = jnp.where(keep, (h + 1) % s["rho"].shape[0], h)
        return new

    return jax.lax.while_loop(more, step, state)


@functools.partial(jax.jit, static_argnames=("num_classes", "max_iter", "memory"))
def logistic_path(
    x, y, fit_mask, hold_mask, mu, sigma, l2s, theta, tol, *, num_classes, max_iter, memory=10
):
    """The held-out sweep and the refit in one call.

    Fits every penalty of `l2s` in the order given on the `fit_mask` rows, each fit warm-started
    (solution and L-BFGS memory) from the previous one, scores each on the `hold_mask` rows, then
    refits on `fit_mask + hold_mask` at the penalty with the best held-out top-1 (ties: the
    first), starting from its sweep solution and keeping the memory.

    Args:
      x: [N, D] features; y: [N] labels; fit_mask / hold_mask: [N] 0/1 rows.
      mu, sigma: standardisation; l2s: [L] penalties, strongest first; theta: [D + 1, C] start.
      tol: max |gradient| at convergence; max_iter: per fit; memory: L-BFGS pairs.

    Returns:
      `{"theta": [L, D + 1, C], "holdout_top1": [L], "iterations": [L], "best": index into l2s,
      "final": {"theta", "iterations", "grad_max"}}`.
    """
    z = _design(x, mu, sigma)
    zt = z.T
    onehot = jax.nn.one_hot(y, num_classes)
    pen = jnp.ones((z.shape[1], 1)).at[-1].set(0.0)

    def start(theta, mask, state):
        # New data weights: the logits and data gradient are recomputed (two matmuls).
        w = mask / jnp.maximum(mask.sum(), 1.0)
        logits = z @ theta
        gdata = zt @ ((jax.nn.softmax(logits) - onehot) * w[:, None])
        return w, dict(state, theta=theta, logits=logits, gdata=gdata)

    def with_penalty(state, l2, previous):
        # The same s_k under a new penalty: y_k shifts by (l2 - previous) P s_k, rho_k follows.
        mem_y = state["mem_y"] + (l2 - previous) * pen * state["mem_s"]
        sy = jnp.einsum("kdc,kdc->k", state["mem_s"], mem_y)
        rho = jnp.where((state["rho"] > 0) & (sy > 0), 1.0 / jnp.where(sy > 0, sy, 1.0), 0.0)
        return dict(state, mem_y=mem_y, rho=rho, iters=jnp.int32(0), stalled=jnp.bool_(False))

    empty = {
        "mem_s": jnp.zeros((memory,) + theta.shape),
        "mem_y": jnp.zeros((memory,) + theta.shape),
        "rho": jnp.zeros(memory),
        "head": jnp.int32(0),
        "iters": jnp.int32(0),
        "stalled": jnp.bool_(False),
    }
    w, state = start(theta, fit_mask, empty)

    def one(carry, l2):
        state, previous = carry
        state = _lbfgs(with_penalty(state, l2, previous), l2, z, zt, onehot, w, pen, tol, max_iter)
        top1 = accuracy(state["logits"], y, hold_mask, num_classes)["top1"]
        return (state, l2), {
            "theta": state["theta"],
            "holdout_top1": top1,
            "iterations": state["iters"],
        }

    _, path = jax.lax.scan(one, (state, l2s[0]), l2s)
    best = jnp.argmax(path["holdout_top1"])
    # New rows: a fresh memory (pairs of the fit part would steer the refit's first steps).
    w, state = start(path["theta"][best], fit_mask + hold_mask, empty)
    state = _lbfgs(
        with_penalty(state, l2s[best], l2s[best]), l2s[best], z, zt, onehot, w, pen, tol, max_iter
    )
    grad_max = jnp.max(jnp.abs(state["gdata"] + l2s[best] * pen * state["theta"]))
    path.update(
        best=best,
        final={"theta": state["theta"], "iterations": state["iters"], "grad_max": grad_max},
    )
    return path


class LogisticProbe(LinearProbe):
    """Multinomial logistic regression (L2, standardised features, full-batch L-BFGS)."""

    name = "logistic"
    default_l2s = LOGISTIC_L2S

    def __init__(
        self, l2s=None, holdout=0.2, fallback_l2=None, seed=0, tol=1e-4, max_iter=1000, memory=10
    ):
        super().__init__(l2s, holdout, fallback_l2, seed)
        self.tol, self.max_iter, self.memory = float(tol), int(max_iter), int(memory)
        self.iterations_: list[int] = []  # Per fit: the sweep (strongest first), then the refit.

    def _prepare(self, x, mask):
        self.mu_, self.sigma_ = _standardise_stats(x.astype(jnp.float32), mask)
        self.iterations_ = []
        self._refit: tuple[float, dict] | None = None

    def _path(self, x, y, fit_mask, hold_mask, l2s):
        path = logistic_path(
            x,
            y,
            fit_mask,
            hold_mask,
            self.mu_,
            self.sigma_,
            jnp.asarray(l2s, jnp.float32),
            jnp.zeros((x.shape[1] + 1, self.num_classes)),
            jnp.float32(self.tol),
            num_classes=self.num_classes,
            max_iter=self.max_iter,
            memory=self.memory,
        )
        self.iterations_ = np.asarray(path["iterations"]).tolist() + [
            int(path["final"]["iterations"])
        ]
        return path

    def _sweep(self, x, y, fit_mask, hold_mask):
        # Strongest first: warm starts move towards less penalty; the refit happens in the same call.
        order = sorted(self.l2s, reverse=True)
        path = self._path(x, y, fit_mask, hold_mask, order)
        self._refit = (order[int(path["best"])], path["final"])
        accs = dict(zip(order, np.asarray(path["holdout_top1"]).tolist()))
        return np.asarray([accs[l2] for l2 in self.l2s])

    def _fit_one(self, x, y, mask, l2):
        if self._refit is None or self._refit[0] != l2:  # No sweep ran: fit this penalty alone.
            self._refit = (l2, self._path(x, y, mask, jnp.zeros_like(mask), [l2])["final"])
        final = self._refit[1]
        self.params_ = {"w": final["theta"][:-1], "b": final["theta"][-1]}
        self.grad_max_ = float(final["grad_max"])
        self._refit = None

    def predict_scores(self, x):
        x = x if isinstance(x, jax.Array) else jnp.asarray(x, jnp.float32)
        return _standardised_affine(x, self.mu_, self.sigma_, self.params_["w"], self.params_["b"])

    def _affine(self):
        # ((x - mu) / sigma) w + b  ==  x (w / sigma) + (b - (mu / sigma) w).
        w, b = self.params_["w"], self.params_["b"]
        return w / self.sigma_[:, None], b - (self.mu_ / self.sigma_) @ w


@jax.jit
def _standardised_affine(x, mu, sigma, w, b):
    return ((x.astype(jnp.float32) - mu) / sigma) @ w + b


PROBES = {"ridge": RidgeProbe, "logistic": LogisticProbe}
