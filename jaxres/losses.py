"""Classification losses on dense targets, per example, as timm computes them.

The train step turns labels into dense targets [B, K] (`dense_targets`, or the mixed
targets of Mixup / CutMix), then takes one loss per example, which it weights by the
batch mask and averages:

* "softmax": cross-entropy of the softmax, `sum_k -t_k log softmax(z)_k` (timm
  `SoftTargetCrossEntropy`; with `dense_targets` it is `LabelSmoothingCrossEntropy`).
* "bce": per-class sigmoid binary cross-entropy averaged over the K classes (timm
  `BinaryCrossEntropy`, "ResNet strikes back" A1-A3). With a threshold > 0 the targets
  become 1 above it and 0 elsewhere first (timm `target_threshold`; RSB A1 uses 0.2 on
  Mixup / CutMix targets smoothed by 0.1). timm's reduction "mean" over all B * K
  elements is the batch mean of these per-example values.

Everything is computed in float32, whatever the logits' dtype.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from jaxres.errors import ConfigError, unknown_name

LOSSES = ("softmax", "bce")


def dense_targets(labels: jax.Array, num_classes: int, smoothing: float = 0.0) -> jax.Array:
    """Integer labels [B] -> smoothed one-hot targets [B, K] in float32.

    timm's convention (`mixup_target`, `BinaryCrossEntropy`): every class gets
    `smoothing / K` and the true class `1 - smoothing + smoothing / K`, so rows sum to 1.
    """
    off = smoothing / num_classes
    on = 1.0 - smoothing + off
    return jnp.where(jax.nn.one_hot(labels, num_classes, dtype=jnp.bool_), on, off).astype(
        jnp.float32
    )


def softmax_cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy [B] of logits [B, K] against dense targets [B, K]."""
    return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets.astype(jnp.float32))


def binary_cross_entropy(
    logits: jax.Array, targets: jax.Array, threshold: float = 0.0
) -> jax.Array:
    """Per-example sigmoid binary cross-entropy [B]: the mean over the K classes.

    Args:
      logits: [B, K].
      targets: dense targets [B, K] in [0, 1].
      threshold: > 0 binarises the targets, `targets > threshold` (timm
        `target_threshold`); 0 keeps them soft.
    """
    targets = targets.astype(jnp.float32)
    if threshold > 0:
        targets = (targets > threshold).astype(jnp.float32)
    per_class = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), targets)
    return jnp.mean(per_class, axis=-1)


def per_example_loss(
    logits: jax.Array, targets: jax.Array, kind: str, threshold: float = 0.0
) -> jax.Array:
    """The loss `config.loss.name` names, per example [B].

    Args:
      logits: [B, K].
      targets: dense targets [B, K] (`dense_targets` or mixed ones).
      kind: "softmax" or "bce" (`config.loss.name`).
      threshold: `config.loss.bce_threshold`; only "bce" uses it (0 = off).

    Raises:
      ConfigError: an unknown `kind`, or a threshold with the softmax loss.
    """
    check_loss(kind, threshold)
    if kind == "softmax":
        return softmax_cross_entropy(logits, targets)
    return binary_cross_entropy(logits, targets, threshold)


def check_loss(kind: str, threshold: float = 0.0) -> None:
    """ConfigError for an unknown `config.loss.name` or a threshold the loss ignores."""
    if kind not in LOSSES:
        raise ConfigError(unknown_name("config.loss.name", kind, LOSSES))
    if kind == "softmax" and threshold:
        raise ConfigError(
            f"config.loss.bce_threshold={threshold} applies to the bce loss only; set "
            "config.loss.name='bce' or config.loss.bce_threshold=0."
        )
