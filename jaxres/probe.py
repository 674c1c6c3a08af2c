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
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxres import parallel
from jaxres.errors import ConfigError
from jaxres.evaluate import gather_rows

# Relative ridge penalties (multiples of the mean eigenvalue of the centred Gram matrix).
RIDGE_L2S = tuple(10.0 ** e for e in np.arange(-4.0, 2.01, 0.5))
# Logistic penalties on the mean cross-entropy of standardised features.
LOGISTIC_L2S = tuple(10.0 ** e for e in np.arange(0.0, -4.01, -0.5))


def shard_rows(x: Any, mesh: jax.sharding.Mesh | None = None) -> tuple[jax.Array, jax.Array]:
    """Pads rows to a multiple of the mesh size and shards them over `data`.

    Args:
      x: [N, ...] host array (the same on every process).
      mesh: default: every device.

    Returns:
      `(x_padded, mask)`: the sharded [N', ...] array and a float32 [N'] mask (0 on padding).
    """
    mesh = mesh if mesh is not None else parallel.make_mesh()
    x = np.asarray(x)
    n = len(x)
    padded = -(-n // mesh.devices.size) * mesh.devices.size
    x = np.concatenate([x, np.zeros((padded - n,) + x.shape[1:], x.dtype)])
    mask = (np.arange(padded) < n).astype(np.float32)
    sharding = parallel.batch_sharding(mesh)
    return jax.device_put(x, sharding), jax.device_put(mask, sharding)


def pad_like(values: Any, x: jax.Array) -> jax.Array:
    """Host per-row values (labels, masks), zero-padded to `x`'s rows and placed like them."""
    values = np.asarray(values)
    values = np.concatenate([values, np.zeros((x.shape[0] - len(values),) + values.shape[1:], values.dtype)])
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, NamedSharding) and len(sharding.spec) > 0:
        return jax.device_put(values, NamedSharding(sharding.mesh, P(sharding.spec[0])))
    return jnp.asarray(values)


def class_balanced_holdout(labels: np.ndarray, mask: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Boolean [N]: `round(fraction * n_c)` (at least 1) examples of each class with n_c >= 2, seeded."""
    rng = np.random.default_rng(seed)
    hold = np.zeros(len(labels), bool)
    valid = np.asarray(mask) > 0
    for c in np.unique(labels[valid]):
        idx = np.flatnonzero((labels == c) & valid)
        if len(idx) < 2 or fraction <= 0:
            continue
        k = min(len(idx) - 1, max(1, int(round(fraction * len(idx)))))
        hold[rng.choice(idx, k, replace=False)] = True
    return hold


@functools.partial(jax.jit, static_argnames="num_classes")
def accuracy(scores: jax.Array, labels: jax.Array, mask: jax.Array, num_classes: int) -> dict[str, jax.Array]:
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
        mask = gather_rows(mask)
    return np.asarray(mask, np.float32)[:n]


class LinearProbe:
    """Shared fit / predict / score: L2 chosen on a class-balanced held-out part of train."""

    name = "linear"
    default_l2s: tuple[float, ...] = ()

    def __init__(self, l2s: Sequence[float] | None = None, holdout: float = 0.2, fallback_l2: float | None = None, seed: int = 0):
        self.l2s = tuple(float(v) for v in (l2s if l2s is not None else self.default_l2s))
        if not self.l2s or min(self.l2s) <= 0:
            raise ConfigError(f"{self.name} probe: the L2 sweep must be positive values, got {self.l2s}.")
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
            self.l2_ = max(l2 for l2, acc in self.sweep_.items() if acc == best)  # Ties: the strongest.
            self.l2_source_ = "holdout"
        else:
            self.l2_, self.l2_source_ = (self.l2s[0] if len(self.l2s) == 1 else self.fallback_l2), "fixed"
        self._fit_one(x, labels, weights, self.l2_)
        return self

    def predict_scores(self, x: Any) -> jax.Array:
        """Class scores [N, C] (same row sharding as `x`)."""
        raise NotImplementedError

    def predict(self, x: Any) -> np.ndarray:
        """Predicted class ids [N] on the host."""
        return gather_rows(self.predict_scores(x).argmax(-1))

    def score(self, x: Any, y: Any, mask: Any = None) -> dict[str, float]:
        """`{"top1", "mean_per_class"}` on the rows of `x` where `mask` (default all) is 1."""
        x = x if isinstance(x, jax.Array) else jnp.asarray(x, jnp.float32)
        y_host = np.asarray(y, np.int32)
        mask_host = _host_mask(mask, len(y_host))
        metrics = accuracy(self.predict_scores(x), pad_like(y_host, x), pad_like(mask_host, x), self.num_classes)
        return {k: float(v) for k, v in metrics.items()}

    # Subclasses: statistics of the train rows, the held-out sweep, the final fit.
    def _prepare(self, x: jax.Array, mask: jax.Array) -> None:
        pass

    def _sweep(self, x: jax.Array, y: jax.Array, fit_mask: jax.Array, hold_mask: jax.Array) -> jax.Array:
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
def ridge_path(x: jax.Array, y: jax.Array, mask: jax.Array, alphas: jax.Array, num_classes: int) -> dict[str, jax.Array]:
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
def ridge_solve(x: jax.Array, y: jax.Array, mask: jax.Array, alpha: jax.Array, num_classes: int) -> dict[str, jax.Array]:
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
        return _ridge_sweep_accuracy(x, y, fit_mask, hold_mask, jnp.asarray(self.l2s, jnp.float32), self.num_classes)

    def _fit_one(self, x, y, mask, l2):
        solved = ridge_solve(x, y, mask, jnp.float32(l2), self.num_classes)
        self.w_, self.b_, self.l2_abs_ = solved["w"], solved["b"], float(solved["l2"])

    def predict_scores(self, x):
        x = x if isinstance(x, jax.Array) else jnp.asarray(x, jnp.float32)
        return _affine(x, self.w_, self.b_)


@jax.jit
def _affine(x, w, b):
    return x.astype(jnp.float32) @ w + b


# ----------------------------------------------------------------------------------------------
# Multinomial logistic regression, L2, on standardised features.
#
#   z_i = (x_i - mu) / sigma        (mean / std of the train rows; sigma = 1 for constant features)
#   L(W, b) = sum_i m_i CE(softmax(z_i W + b), y_i) / n  +  (l / 2) ||W||^2     (b not penalised)
# which is scikit-learn's objective with C = 1 / (l n). L is smooth and strongly convex
# in W, so full-batch L-BFGS (optax.lbfgs, zoom line search satisfying the strong Wolfe
# conditions) converges; it stops when max_j |dL/dtheta_j| <= tol, scipy's `gtol` test
# that scikit-learn's lbfgs solver uses, or after max_iter iterations. One iteration is
# one value-and-gradient (two [N, D] x [D, C] matmuls) when the line search accepts the
# first step, as it does after the first few (`_project` keeps both matmuls fast on
# XLA:CPU). The sweep runs from the strongest penalty
# to the weakest, each fit starting from the previous solution (warm start); every fit
# is one call of the same compiled function (one compilation per data shape); the
# final refit starts from the held-out sweep's solution at the chosen penalty.
# ----------------------------------------------------------------------------------------------


@jax.custom_vjp
def _project(z: jax.Array, zt: jax.Array, w: jax.Array) -> jax.Array:
    """z @ w, differentiated w.r.t. w only, through the pre-transposed zt.

    XLA:CPU runs z^T @ g (contracting z's rows) about 2.5x slower than the same
    product from a materialised transpose, and autodiff would build z^T @ g at
    every gradient; transposing once per fit puts an evaluation at two fast matmuls.
    """
    return z @ w


def _project_fwd(z, zt, w):
    return z @ w, zt


def _project_bwd(zt, g):
    return None, None, zt @ g


_project.defvjp(_project_fwd, _project_bwd)


def _logistic_loss(params, z, zt, onehot, mask, l2):
    logits = _project(z, zt, params["w"]) + params["b"]
    ce = jax.nn.logsumexp(logits, axis=-1) - (logits * onehot).sum(-1)
    return (ce * mask).sum() / jnp.maximum(mask.sum(), 1.0) + 0.5 * l2 * jnp.sum(params["w"] ** 2)


def lbfgs_minimize(fun, params, tol: float, max_iter: int, memory: int = 10):
    """Minimises `fun(params)` with optax L-BFGS until max |grad| <= tol.

    Returns:
      (params, iterations, max |grad|, evaluations): the last counts value-and-gradient
      evaluations (one at the start, then one per line-search step).
    """
    opt = optax.lbfgs(memory_size=memory)
    value_and_grad = optax.value_and_grad_from_state(fun)

    def step(carry):
        params, state, evaluations = carry
        value, grad = value_and_grad(params, state=state)
        updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=fun)
        evaluations = evaluations + otu.tree_get(state, "num_linesearch_steps")
        return optax.apply_updates(params, updates), state, evaluations

    def grad_max(state):
        return jnp.max(jnp.stack([jnp.max(jnp.abs(g)) for g in jax.tree.leaves(otu.tree_get(state, "grad"))]))

    def more(carry):
        count = otu.tree_get(carry[1], "count")
        return (count == 0) | ((count < max_iter) & (grad_max(carry[1]) > tol))

    params, state, evaluations = jax.lax.while_loop(more, step, (params, opt.init(params), jnp.int32(1)))
    return params, otu.tree_get(state, "count"), grad_max(state), evaluations


@jax.jit
def _standardise_stats(x, mask):
    n = jnp.maximum(mask.sum(), 1.0)
    mu = (x * mask[:, None]).sum(0) / n
    var = (((x - mu) ** 2) * mask[:, None]).sum(0) / n
    return mu, jnp.where(var > 1e-12, jnp.sqrt(var), 1.0)


@functools.partial(jax.jit, static_argnames=("num_classes", "tol", "max_iter", "memory"))
def logistic_fit(x, y, mask, mu, sigma, l2, init, *, num_classes, tol, max_iter, memory=10):
    """Minimises the L2-penalised mean cross-entropy on the rows where `mask` is 1, from `init`.

    Returns:
      (params {"w": [D, C], "b": [C]}, iterations, max |gradient|, value-and-gradient evaluations).
    """
    z = (x.astype(jnp.float32) - mu) / sigma
    onehot = jax.nn.one_hot(y, num_classes)
    loss = functools.partial(_logistic_loss, z=z, zt=z.T, onehot=onehot, mask=mask, l2=l2)
    return lbfgs_minimize(loss, init, tol, max_iter, memory)


@functools.partial(jax.jit, static_argnames="num_classes")
def _logistic_top1(x, y, mask, mu, sigma, params, num_classes):
    return accuracy(_standardised_affine(x, mu, sigma, params["w"], params["b"]), y, mask, num_classes)["top1"]


class LogisticProbe(LinearProbe):
    """Multinomial logistic regression (L2, standardised features, full-batch L-BFGS)."""

    name = "logistic"
    default_l2s = LOGISTIC_L2S

    def __init__(self, l2s=None, holdout=0.2, fallback_l2=None, seed=0, tol=1e-4, max_iter=1000, memory=10):
        super().__init__(l2s, holdout, fallback_l2, seed)
        self.tol, self.max_iter, self.memory = float(tol), int(max_iter), int(memory)
        self.iterations_: list[int] = []  # Per fit (sweep, then the final refit).
        self.evaluations_: list[int] = []

    def _prepare(self, x, mask):
        self.mu_, self.sigma_ = _standardise_stats(x.astype(jnp.float32), mask)
        self.iterations_, self.evaluations_ = [], []
        self._init = {"w": jnp.zeros((x.shape[1], self.num_classes)), "b": jnp.zeros((self.num_classes,))}
        self._sweep_params: dict[float, Any] = {}

    def _fit(self, x, y, mask, l2, init):
        params, iterations, grad_max, evaluations = logistic_fit(
            x, y, mask, self.mu_, self.sigma_, jnp.float32(l2), init,
            num_classes=self.num_classes, tol=self.tol, max_iter=self.max_iter, memory=self.memory,
        )
        self.iterations_.append(int(iterations))
        self.evaluations_.append(int(evaluations))
        return params, float(grad_max)

    def _sweep(self, x, y, fit_mask, hold_mask):
        # Strongest penalty first: each fit starts from the previous solution (warm start).
        params, accs = self._init, {}
        for l2 in sorted(self.l2s, reverse=True):
            params, _ = self._fit(x, y, fit_mask, l2, params)
            self._sweep_params[l2] = params
            accs[l2] = _logistic_top1(x, y, hold_mask, self.mu_, self.sigma_, params, self.num_classes)
        return jnp.stack([accs[l2] for l2 in self.l2s])

    def _fit_one(self, x, y, mask, l2):
        init = self._sweep_params.get(l2, self._init)  # The held-out sweep's solution is close.
        self.params_, self.grad_max_ = self._fit(x, y, mask, l2, init)
        self._sweep_params = {}

    def predict_scores(self, x):
        x = x if isinstance(x, jax.Array) else jnp.asarray(x, jnp.float32)
        return _standardised_affine(x, self.mu_, self.sigma_, self.params_["w"], self.params_["b"])


@jax.jit
def _standardised_affine(x, mu, sigma, w, b):
    return ((x.astype(jnp.float32) - mu) / sigma) @ w + b


PROBES = {"ridge": RidgeProbe, "logistic": LogisticProbe}
