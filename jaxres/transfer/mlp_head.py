"""A one-hidden-layer MLP head on frozen features, with the linear probes' interface.

    head = MLPProbe().fit(x_train, y_train)             # picks the step count on a held-out part
    head.predict(x_test); head.score(x_test, y_test)     # {"top1", "mean_per_class"}
    head.head_params()                                   # numpy, standardisation folded in

Why: a linear probe can only separate classes the frozen features already separate
linearly. A small MLP head is the usual next step of a transfer protocol (between the
linear probe and fine-tuning the backbone): it is still trained on cached features, in
seconds to a minute, but can carve non-linear class regions. Whether that wins depends on
the features: see "MLP head vs logistic probe" in benchmarks/probe.md.

The model, on standardised features z = (x - mu) / sigma (mean / std of all train rows,
held-out ones included as in the logistic probe, which is label-free; sigma = 1 for
constant features: `probe.standardise_stats`):

    h = relu(z W1 + b1)                  W1 [D, H], He-normal; b1 = 0
    h~ = dropout(h, rate)                training only (inverted: kept units scaled by 1 / (1 - rate))
    logits = h~ W2 + b2                  W2 [H, C] = 0, b2 = 0: the logits start uniform

Loss: the masked mean over rows of the softmax cross-entropy with label smoothing eps,
    L = sum_i m_i CE(softmax(logits_i), (1 - eps) onehot(y_i) + eps / C) / sum_i m_i,
where m_i is 0 on padding and held-out rows, so those never need slicing (as in `probe`);
rows with m_i = 0 are also zeroed before use, so non-finite padding cannot leak in
through 0 * inf. Optimiser: AdamW, decoupled weight decay on the kernels only.

Steps: one jitted `lax.fori_loop` over the steps (`train_head`); the step count is traced,
so the held-out run and the refit share one executable. Full-batch when the train rows fit in
`batch_size`; otherwise each step takes `batch_size` distinct train rows drawn uniformly
by Gumbel top-k (masked rows get -inf, so they are never drawn) with the key
fold_in(batch_key, step); the dropout key is fold_in(dropout_key, step). A seed fixes the
init, the batches and the dropout masks, hence the fit. A step costs two [B, D] x [D, H]
matmuls (the forward pass and the hidden kernel's gradient; no gradient flows to the
features), which dominate: D = 2,048, H = 512, B = 1,024 is 4.3 GFLOP a step.

Choosing the step count replaces the linear probes' L2 sweep: `fit` holds out `holdout`
of each class's train rows (`probe.class_balanced_holdout`, seeded), trains `max_steps`
on the rest while the same loop records the held-out top-1 every `eval_every` steps,
takes the step count with the best held-out top-1 (ties: the earliest, the least
fitted), then retrains from a fresh init (the same seed: the same init, batch and dropout
keys) on every train row for that many steps (the linear probes likewise refit at the
chosen L2). With one example per class nothing is held out and `max_steps` is used.
Weight decay stays fixed: `l2_ = weight_decay`, `l2_source_ = "fixed"`.

Export: `head_params()` folds the standardisation into the first layer,
    W1' = W1 / sigma[:, None],   b1' = b1 - (mu / sigma) W1,
so relu(x W1' + b1') W2 + b2 equals `predict_scores(x)` on raw features.
"""

from __future__ import annotations

import functools
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxres.errors import ConfigError, NonFiniteLossError
from jaxres.transfer import probe


def init_params(key: jax.Array, dim: int, hidden: int, num_classes: int) -> dict[str, Any]:
    """The head's parameters in standardised-feature space.

    Args:
      key: PRNG key of the init.
      dim, hidden, num_classes: D, H, C.

    Returns:
      `{"head_hidden": {"kernel": [D, H], "bias": [H]}, "head": {"kernel": [H, C], "bias": [C]}}`:
      He-normal hidden kernel (ReLU), zero biases, zero head kernel (uniform first logits).
    """
    return {
        "head_hidden": {
            "kernel": jax.nn.initializers.he_normal()(key, (dim, hidden), jnp.float32),
            "bias": jnp.zeros(hidden, jnp.float32),
        },
        "head": {
            "kernel": jnp.zeros((hidden, num_classes), jnp.float32),
            "bias": jnp.zeros(num_classes, jnp.float32),
        },
    }


def forward(
    params: dict[str, Any], z: jax.Array, dropout_key: jax.Array | None = None, rate: float = 0.0
) -> jax.Array:
    """Logits [N, C] of standardised rows `z` [N, D]; dropout on the hidden layer when keyed."""
    h = jax.nn.relu(z @ params["head_hidden"]["kernel"] + params["head_hidden"]["bias"])
    if dropout_key is not None:
        keep = jax.random.bernoulli(dropout_key, 1.0 - rate, h.shape)
        h = jnp.where(keep, h / (1.0 - rate), 0.0)
    return h @ params["head"]["kernel"] + params["head"]["bias"]


def _masked_loss(params, z, y, w, dropout_key, rate, smoothing, num_classes):
    """Mean label-smoothed cross-entropy over the rows with weight w > 0."""
    logits = forward(params, z, dropout_key, rate)
    targets = optax.smooth_labels(jax.nn.one_hot(y, num_classes), smoothing)
    ce = jnp.where(w > 0, optax.softmax_cross_entropy(logits, targets), 0.0)
    return jnp.sum(ce * w) / jnp.maximum(w.sum(), 1.0)


def eval_steps(max_steps: int, eval_every: int) -> list[int]:
    """The step counts at which `train_head` records the held-out top-1 (max_steps always last)."""
    return [min(k * eval_every, max_steps) for k in range(1, -(-max_steps // eval_every) + 1)]


@functools.partial(
    jax.jit,
    static_argnames=("hidden", "num_classes", "max_steps", "eval_every", "batch_size"),
)
def train_head(
    x: jax.Array,
    y: jax.Array,
    train_mask: jax.Array,
    hold_mask: jax.Array,
    mu: jax.Array,
    sigma: jax.Array,
    key: jax.Array,
    steps: jax.Array,
    *,
    hidden: int,
    num_classes: int,
    max_steps: int,
    eval_every: int,
    batch_size: int | None,
    dropout: float | jax.Array,
    learning_rate: float | jax.Array,
    weight_decay: float | jax.Array,
    label_smoothing: float | jax.Array,
) -> dict[str, Any]:
    """Initialises the head from `key` and trains it `steps` (<= max_steps) AdamW steps.

    Args:
      x: [N, D] features (rows may be sharded); y: [N] labels.
      train_mask / hold_mask: [N] row weights of the loss / of the held-out top-1 (0 elsewhere).
      mu, sigma: [D] standardisation; key: PRNG key (init, dropout, batches).
      steps: int32 scalar, traced: the sweep and the refit share one executable.
      batch_size: rows per step drawn from the train rows, or None for full-batch.
      dropout, learning_rate, weight_decay, label_smoothing: traced, so changing them does
        not recompile.

    Returns:
      `{"params", "holdout_top1": [K] top-1 after each of `eval_steps(max_steps, eval_every)`
      (not recorded, -1, when hold_mask is empty or past `steps`), "first_bad_step": the first
      step whose loss was non-finite, or -1}`.
    """
    init_key, dropout_key, batch_key = jax.random.split(key, 3)
    valid = (train_mask + hold_mask) > 0
    z = jnp.where(valid[:, None], (x.astype(jnp.float32) - mu) / sigma, 0.0)
    params = init_params(init_key, x.shape[1], hidden, num_classes)
    decay = jax.tree.map(lambda p: p.ndim > 1, params)  # Kernels only, not biases.
    tx = optax.adamw(learning_rate, weight_decay=weight_decay, mask=decay)
    record = hold_mask.sum() > 0
    grad_fn = jax.value_and_grad(_masked_loss)

    def held_out_top1(params):
        return probe.accuracy(forward(params, z), y, hold_mask, num_classes)["top1"]

    def step(i, carry):
        params, opt_state, curve, first_bad = carry
        if batch_size is None:
            zb, yb, wb = z, y, train_mask
        else:  # Gumbel top-k: `batch_size` distinct rows, uniform over the train rows.
            gumbel = jax.random.gumbel(jax.random.fold_in(batch_key, i), train_mask.shape)
            _, rows = jax.lax.top_k(jnp.where(train_mask > 0, gumbel, -jnp.inf), batch_size)
            zb, yb, wb = z[rows], y[rows], train_mask[rows]
        loss, grads = grad_fn(
            params,
            zb,
            yb,
            wb,
            jax.random.fold_in(dropout_key, i),
            dropout,
            label_smoothing,
            num_classes,
        )
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        first_bad = jnp.where((first_bad < 0) & ~jnp.isfinite(loss), i, first_bad)
        done = i + 1
        at_eval = record & ((done % eval_every == 0) | (done == max_steps))
        curve = jax.lax.cond(
            at_eval,
            lambda c: c.at[i // eval_every].set(held_out_top1(params)),
            lambda c: c,
            curve,
        )
        return params, opt_state, curve, first_bad

    curve = -jnp.ones(len(eval_steps(max_steps, eval_every)), jnp.float32)
    carry = (params, tx.init(params), curve, jnp.int32(-1))
    params, _, curve, first_bad = jax.lax.fori_loop(0, steps, step, carry)
    return {"params": params, "holdout_top1": curve, "first_bad_step": first_bad}


@jax.jit
def _zero_masked_rows(x, mask):
    """float32 x with the rows of weight 0 set to 0 (padding may hold anything, even NaN)."""
    return jnp.where(mask[:, None] > 0, x.astype(jnp.float32), 0.0)


@jax.jit
def _standardised_logits(x, mu, sigma, params):
    return forward(params, (x.astype(jnp.float32) - mu) / sigma)


def _check(name: str, value: Any, ok: bool, expected: str, example: str) -> None:
    if not ok:
        raise ConfigError(f"MLPProbe: {name} must be {expected}, got {value!r}; e.g. {example}.")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(value)


class MLPProbe(probe.Probe):
    """A ReLU MLP head (one hidden layer, dropout, AdamW), early-stopped on a held-out part.

    Same interface as every `probe.Probe` (`fit`, `predict_scores`, `predict`, `score`,
    `l2_`, `l2_source_`, `sweep_`, `num_classes`); `sweep_` maps step counts to held-out
    top-1 and `steps_` is the chosen one. See the module docstring for the method.
    """

    name = "mlp"

    def __init__(
        self,
        hidden: int = 512,
        dropout: float = 0.5,
        learning_rate: float = 1e-3,
        weight_decay: float = 1e-4,
        label_smoothing: float = 0.1,
        max_steps: int = 500,
        eval_every: int = 10,
        batch_size: int = 1024,
        holdout: float = 0.2,
        seed: int = 0,
    ):
        _check("hidden", hidden, _is_int(hidden) and hidden >= 1, "an integer >= 1", "hidden=512")
        _check("dropout", dropout, _is_real(dropout) and 0 <= dropout < 1, "in [0, 1)", "0.5")
        _check(
            "learning_rate",
            learning_rate,
            _is_real(learning_rate) and learning_rate > 0,
            "a positive number",
            "learning_rate=1e-3",
        )
        _check(
            "weight_decay",
            weight_decay,
            _is_real(weight_decay) and weight_decay >= 0,
            "a number >= 0",
            "weight_decay=1e-4",
        )
        _check(
            "label_smoothing",
            label_smoothing,
            _is_real(label_smoothing) and 0 <= label_smoothing < 1,
            "in [0, 1)",
            "label_smoothing=0.1",
        )
        for name, value, example in (
            ("max_steps", max_steps, 500),
            ("eval_every", eval_every, 10),
            ("batch_size", batch_size, 1024),
        ):
            _check(
                name, value, _is_int(value) and value >= 1, "an integer >= 1", f"{name}={example}"
            )
        _check("holdout", holdout, _is_real(holdout) and 0 <= holdout < 1, "in [0, 1)", "0.2")
        _check("seed", seed, _is_int(seed), "an integer", "seed=0")
        self.hidden, self.dropout = int(hidden), float(dropout)
        self.learning_rate, self.weight_decay = float(learning_rate), float(weight_decay)
        self.label_smoothing = float(label_smoothing)
        self.max_steps, self.eval_every = int(max_steps), int(eval_every)
        self.batch_size, self.holdout, self.seed = int(batch_size), float(holdout), int(seed)
        self.sweep_: dict[int, float] = {}

    def fit(self, x: Any, y: Any, mask: Any = None, num_classes: int | None = None) -> MLPProbe:
        """Fits on the rows of `x` [N, D] with labels `y` [N] where `mask` (default all) is 1.

        `x` may be a host array or a (row-sharded) jax.Array; `y` and `mask` are host arrays
        of its first len(y) rows, padded like `x`. Rows of mask 0 may hold anything.

        Returns:
          self, with `steps_`, `sweep_` ({steps: held-out top-1}), `holdout_top1_` (None when
          nothing was held out), `l2_`, `l2_source_`, `mu_`, `sigma_`, `params_`.
        """
        y_host = np.asarray(y, np.int32)
        mask_host = probe.host_mask(mask, len(y_host))
        self.num_classes = int(num_classes or y_host[mask_host > 0].max() + 1)
        x = x if isinstance(x, jax.Array) else jnp.asarray(x, jnp.float32)
        labels, weights = probe.pad_like(y_host, x), probe.pad_like(mask_host, x)
        x = _zero_masked_rows(x, weights)
        self.mu_, self.sigma_ = probe.standardise_stats(x, weights)
        # Full-batch or not is decided once, on all train rows: the sweep and refit agree.
        batch = None if (mask_host > 0).sum() <= self.batch_size else self.batch_size
        hold = probe.class_balanced_holdout(y_host, mask_host, self.holdout, self.seed)
        self.sweep_, self.holdout_top1_, self.steps_ = {}, None, self.max_steps
        if hold.any():
            hold_mask = probe.pad_like(mask_host * hold, x)
            out = self._train(x, labels, weights - hold_mask, hold_mask, self.max_steps, batch)
            curve = np.asarray(out["holdout_top1"]).tolist()
            self.sweep_ = dict(zip(eval_steps(self.max_steps, self.eval_every), curve))
            self.holdout_top1_ = max(curve)
            self.steps_ = min(s for s, acc in self.sweep_.items() if acc == self.holdout_top1_)
        out = self._train(x, labels, weights, jnp.zeros_like(weights), self.steps_, batch)
        self.params_ = out["params"]
        self.l2_, self.l2_source_ = self.weight_decay, "fixed"
        return self

    def _train(self, x, labels, train_mask, hold_mask, steps, batch) -> dict[str, Any]:
        out = train_head(
            x,
            labels,
            train_mask,
            hold_mask,
            self.mu_,
            self.sigma_,
            jax.random.key(self.seed),
            jnp.int32(steps),
            hidden=self.hidden,
            num_classes=self.num_classes,
            max_steps=self.max_steps,
            eval_every=self.eval_every,
            batch_size=batch,
            dropout=self.dropout,
            learning_rate=self.learning_rate,
            weight_decay=self.weight_decay,
            label_smoothing=self.label_smoothing,
        )
        bad = int(out["first_bad_step"])
        if bad >= 0:
            raise NonFiniteLossError(
                f"MLPProbe: the training loss turned non-finite at step {bad + 1} of {steps} "
                f"(learning_rate={self.learning_rate}); lower learning_rate or check the "
                "features for inf / NaN."
            )
        return out

    def predict_scores(self, x: Any) -> jax.Array:
        """Logits [N, C] (no dropout; same row sharding as `x`)."""
        x = x if isinstance(x, jax.Array) else jnp.asarray(x, jnp.float32)
        return _standardised_logits(x, self.mu_, self.sigma_, self.params_)

    def head_params(self) -> dict[str, dict[str, np.ndarray]]:
        """The fitted head as float32 numpy, standardisation folded into the first layer.

        Returns:
          `{"head_hidden": {"kernel": W1 / sigma[:, None] [D, H], "bias": b1 - (mu / sigma) W1
          [H]}, "head": {"kernel": W2 [H, C], "bias": b2 [C]}}`: relu(x W1' + b1') W2 + b2
          equals `predict_scores(x)`.
        """
        params = jax.device_get(self.params_)
        mu, sigma = (np.asarray(jax.device_get(v), np.float64) for v in (self.mu_, self.sigma_))
        w1 = np.asarray(params["head_hidden"]["kernel"], np.float64)
        b1 = np.asarray(params["head_hidden"]["bias"], np.float64)
        return {
            "head_hidden": {
                "kernel": (w1 / sigma[:, None]).astype(np.float32),
                "bias": (b1 - (mu / sigma) @ w1).astype(np.float32),
            },
            "head": {k: np.asarray(v, np.float32) for k, v in params["head"].items()},
        }
