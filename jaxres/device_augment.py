"""Batch augmentation on the device, inside the jitted train step: timm `Mixup` / CutMix and
`RandomErasing`, as pure JAX functions of an explicit PRNG key.

Order in the train step (as in timm, where erasing runs per sample in the loader and Mixup on
the collated batch): normalise the uint8 images (`runs.normalize`), then `random_erase` (it
fills with N(0, 1) noise, which only means "noise" on normalised images), then `mix`, then the
model. The loss must take the dense mixed targets (soft cross-entropy); `DeviceAugment.__call__`
does erase-then-mix in that order.

`mix` — timm `Mixup(mode="batch", correct_lam=True)`:

* In timm every GPU mixes its own local batch with its flipped self (`x.flip(0)`), drawing its
  own lambda. Here the global batch [B, ...] is reshaped to [num_shards, B / num_shards, ...]
  and flipped on axis 1, so each contiguous slice (the per-device shard under the "data"
  batch sharding when `num_shards` is the data-axis size, or a multiple of it) is mixed only
  with itself, with its own lambda, and XLA moves no image data between devices (the only
  collectives are scalar "still rejecting" flags of the Gamma sampler's loop, whose per-shard
  lanes are spread over the devices).
* Per shard, as timm `_params_per_batch`: with probability `mix_prob` mix (else lambda = 1);
  when both alphas are > 0 CutMix with probability `switch_prob`, else Mixup;
  lambda ~ Beta(alpha, alpha) of the chosen method. CutMix draws its box exactly as timm
  `rand_bbox` (cut ratio sqrt(1 - lambda), integer centre uniform over the image, box clipped
  at the borders) and corrects lambda to 1 - box_area / (H * W) (`cutmix_bbox_and_lam`).
* Targets are dense [B, K] rows (`jaxres.losses.dense_targets`: timm's smoothing off = s / K,
  on = 1 - s + off, which is `optax.smooth_labels`), mixed as lam * y + (1 - lam) * y_flipped
  (timm `mixup_target`). A mixed row's mask becomes mask * mask_flipped: half of its image and
  target come from the flipped row, so if that one was undecodable (mask 0) the row carries no
  loss weight either. Rows of a shard that was not mixed keep their mask.

Differences from timm, and why:

* Random numbers come from `jax.random`, not numpy: same distributions, different streams.
  Beta(a, a) is drawn as sigmoid(log G1 - log G2), G ~ Gamma(a) (exact, and stable for small
  alphas where G underflows in float32).
* Lambda and the box are computed in float32 (timm: float64). `int(H * sqrt(1 - lam))` can
  differ by one pixel when H * sqrt(1 - lam) lies within float32 rounding of an integer; the
  corrected lambda then follows the box, so images and targets stay consistent.
* The box is applied with iota comparisons (a per-pixel weight of 0 or 1) and Mixup with the
  same weighted sum, one fused elementwise pass; no dynamic slicing, so shapes stay static.
* Integer images (e.g. uint8 before normalisation; mixing commutes with the affine
  normalisation) are blended in float32 and rounded, as timm's `FastCollateMixup`.
* Only mode "batch" (per shard); no `cutmix_minmax`, no "pair" / "elem" modes, no multi-label.

`random_erase` — timm `RandomErasing(probability, mode="pixel", max_count=1)` per image:
with probability p, up to 10 attempts of area fraction ~ U(min_area, max_area) and
log-aspect ~ U(log min_aspect, log max_aspect), h = round(sqrt(area * aspect)),
w = round(sqrt(area / aspect)) (round half to even, as Python's `round`), accepted when
w < W and h < H; the top-left corner is uniform over the positions where the box fits; the box
is filled with N(0, 1) noise per pixel and channel. All attempts are drawn at once and the
first valid one wins, which has the distribution of timm's loop (no attempt valid: no erasing).
Also float32 geometry (rounding may differ from timm's float64 at exact .5 ties) and
`jax.random` streams; no `num_splits`, `const` / `rand` modes or `max_count` > 1.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

from jaxres.errors import ConfigError

# timm RandomErasing defaults.
ERASE_MIN_AREA = 0.02
ERASE_MAX_AREA = 1 / 3
ERASE_MIN_ASPECT = 0.3
ERASE_ATTEMPTS = 10


class MixParams(NamedTuple):
    """One shard's mixing draw (a pytree, so `jax.vmap` gives one per shard).

    `lam` is the weight of the original rows (1 = not mixed; CutMix: already corrected to the
    clipped box area); `box` is (y_low, y_high, x_low, x_high), half-open, all 0 for Mixup.
    """

    lam: jax.Array  # float32 []
    use_cutmix: jax.Array  # bool []
    box: jax.Array  # int32 [4]


def _check(key: str, value: Any, low: float, high: float) -> float:
    """`value` as a float in [low, high], else a ConfigError naming `config.augment.<key>`."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not (low <= number <= high and math.isfinite(number)):  # Also refuses NaN.
        valid = f"[{low:g}, {high:g}]" if math.isfinite(high) else f">= {low:g} (finite)"
        raise ConfigError(f"config.augment.{key}={value!r} is out of range; valid: {valid}.")
    return number


def _check_mix(
    mixup_alpha: float, cutmix_alpha: float, mix_prob: float, switch_prob: float
) -> None:
    _check("mixup_alpha", mixup_alpha, 0.0, math.inf)
    _check("cutmix_alpha", cutmix_alpha, 0.0, math.inf)
    _check("mix_prob", mix_prob, 0.0, 1.0)
    _check("switch_prob", switch_prob, 0.0, 1.0)


def cutmix_box(
    lam: jax.Array, cy: jax.Array, cx: jax.Array, height: int, width: int
) -> tuple[jax.Array, jax.Array]:
    """timm `rand_bbox` for a given centre (cy, cx), plus `cutmix_bbox_and_lam`'s correction.

    Returns (box int32 [4] = (y_low, y_high, x_low, x_high), lam = 1 - box_area / (H * W)).
    """
    ratio = jnp.sqrt(jnp.maximum(1.0 - jnp.asarray(lam, jnp.float32), 0.0))
    # int() of a non-negative float truncates: floor.
    cut_h = jnp.floor(height * ratio).astype(jnp.int32)
    cut_w = jnp.floor(width * ratio).astype(jnp.int32)
    cy, cx = jnp.asarray(cy, jnp.int32), jnp.asarray(cx, jnp.int32)
    y_low = jnp.clip(cy - cut_h // 2, 0, height)
    y_high = jnp.clip(cy + (cut_h + 1) // 2, 0, height)
    x_low = jnp.clip(cx - cut_w // 2, 0, width)
    x_high = jnp.clip(cx + (cut_w + 1) // 2, 0, width)
    area = (y_high - y_low) * (x_high - x_low)
    corrected = 1.0 - area.astype(jnp.float32) / float(height * width)
    return jnp.stack([y_low, y_high, x_low, x_high]), corrected


def sample_params(
    rng: jax.Array,
    *,
    mixup_alpha: float,
    cutmix_alpha: float,
    mix_prob: float,
    switch_prob: float,
    height: int,
    width: int,
) -> MixParams:
    """One shard's draw, as timm `Mixup._params_per_batch` followed by `cutmix_bbox_and_lam`."""
    if not (mixup_alpha > 0 or cutmix_alpha > 0):
        raise ValueError("sample_params needs mixup_alpha > 0 or cutmix_alpha > 0.")
    k_mix, k_switch, k_lam, k_cy, k_cx = jax.random.split(rng, 5)
    do_mix = jax.random.uniform(k_mix) < mix_prob
    # One code path for the three cases: with one method off the switch is certain (u < 0 never,
    # u < 1 always, u in [0, 1)), so the alpha of the off method is never used.
    switch = switch_prob if mixup_alpha > 0 and cutmix_alpha > 0 else float(cutmix_alpha > 0)
    use_cutmix = jax.random.uniform(k_switch) < switch
    alpha = jnp.where(use_cutmix, cutmix_alpha, mixup_alpha)
    # Beta(a, a) = G1 / (G1 + G2) with G ~ Gamma(a), from log-gammas (small alphas underflow G to
    # 0): one sampler call (one rejection loop) instead of jax.random.beta's two.
    log_g = jax.random.loggamma(k_lam, alpha, (2,))
    lam = jnp.where(do_mix, jax.nn.sigmoid(log_g[0] - log_g[1]), 1.0).astype(jnp.float32)
    use_cutmix = use_cutmix & do_mix
    cy = jax.random.randint(k_cy, (), 0, height)
    cx = jax.random.randint(k_cx, (), 0, width)
    box, cut_lam = cutmix_box(lam, cy, cx, height, width)
    return MixParams(
        lam=jnp.where(use_cutmix, cut_lam, lam),
        use_cutmix=use_cutmix,
        box=jnp.where(use_cutmix, box, 0),
    )


def mix_with(
    images: jax.Array, targets: jax.Array, lam: jax.Array, box: jax.Array, use_cutmix: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Mixes one shard (images [b, H, W, C], targets [b, K]) with its flipped self.

    CutMix (`use_cutmix`): pixels inside `box` come from the flipped rows; Mixup:
    lam * x + (1 - lam) * x_flipped. Targets: lam * y + (1 - lam) * y_flipped (CutMix: `lam`
    must be the box-corrected one, as `sample_params` returns). Images keep their dtype.
    """
    height, width = images.shape[-3], images.shape[-2]
    y_low, y_high, x_low, x_high = box[0], box[1], box[2], box[3]
    rows = jax.lax.broadcasted_iota(jnp.int32, (height, 1), 0)
    cols = jax.lax.broadcasted_iota(jnp.int32, (1, width), 1)
    inside = (rows >= y_low) & (rows < y_high) & (cols >= x_low) & (cols < x_high)
    lam = jnp.asarray(lam, jnp.float32)
    # One per-pixel weight of the original rows serves both methods: 0 / 1 for CutMix (then the
    # weighted sum is an exact copy of either source), lam everywhere for Mixup.
    weight = jnp.where(use_cutmix, (~inside).astype(jnp.float32), lam)[..., None]
    x = images.astype(jnp.float32)
    mixed = x * weight + x[::-1] * (1.0 - weight)
    if jnp.issubdtype(images.dtype, jnp.integer):
        mixed = jnp.round(mixed)  # As timm FastCollateMixup (np.rint) for uint8 batches.
    lam_t = lam.astype(targets.dtype)
    mixed_targets = targets * lam_t + targets[::-1] * (1 - lam_t)
    return mixed.astype(images.dtype), mixed_targets


def mix(
    rng: jax.Array,
    images: jax.Array,
    targets: jax.Array,
    mask: jax.Array,
    *,
    mixup_alpha: float,
    cutmix_alpha: float,
    mix_prob: float,
    switch_prob: float,
    num_shards: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """timm `Mixup(mode="batch")` on each of `num_shards` contiguous slices of the batch.

    images [B, H, W, C], targets dense [B, K] (`losses.dense_targets`), mask [B] (0 = no loss weight).
    Returns (images in their dtype, mixed targets, mask; a mixed row's mask is
    mask * mask_flipped). Both alphas 0 (or mix_prob 0): the inputs, untouched, at no cost.
    Use num_shards = the size of the "data" mesh axis (or a multiple) to keep mixing local.
    Shard s draws `sample_params(jax.random.split(rng, num_shards)[s], ...)`.
    """
    _check_mix(mixup_alpha, cutmix_alpha, mix_prob, switch_prob)
    if not (mixup_alpha > 0 or cutmix_alpha > 0) or mix_prob == 0:
        return images, targets, mask
    batch = images.shape[0]
    if num_shards < 1 or batch % num_shards:
        raise ValueError(
            f"mix: batch size {batch} does not split into num_shards={num_shards} equal slices."
        )
    per_shard = batch // num_shards

    def shard(a: jax.Array) -> jax.Array:
        return a.reshape(num_shards, per_shard, *a.shape[1:])

    draw = functools.partial(
        sample_params,
        mixup_alpha=mixup_alpha,
        cutmix_alpha=cutmix_alpha,
        mix_prob=mix_prob,
        switch_prob=switch_prob,
        height=images.shape[1],
        width=images.shape[2],
    )
    params = jax.vmap(draw)(jax.random.split(rng, num_shards))
    out_images, out_targets = jax.vmap(mix_with)(
        shard(images), shard(targets), params.lam, params.box, params.use_cutmix
    )
    m = shard(mask)
    out_mask = jnp.where((params.lam < 1)[:, None], m * m[:, ::-1], m)
    return (
        out_images.reshape(images.shape),
        out_targets.reshape(targets.shape),
        out_mask.reshape(mask.shape),
    )


def erase_boxes(
    u_area: jax.Array,
    u_log_aspect: jax.Array,
    u_top: jax.Array,
    u_left: jax.Array,
    height: int,
    width: int,
    *,
    min_area: float = ERASE_MIN_AREA,
    max_area: float = ERASE_MAX_AREA,
    min_aspect: float = ERASE_MIN_ASPECT,
    max_aspect: float | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """timm `RandomErasing._erase`'s geometry from uniform [0, 1) draws.

    u_area, u_log_aspect [..., attempts]; u_top, u_left [...]. Returns (top, left, h, w, found)
    of the first attempt with w < W and h < H; `found` False when none fits (no erasing).
    """
    log_lo, log_hi = math.log(min_aspect), math.log(max_aspect or 1 / min_aspect)
    target_area = (min_area + (max_area - min_area) * u_area) * float(height * width)
    aspect = jnp.exp(log_lo + (log_hi - log_lo) * u_log_aspect)
    # jnp.round rounds half to even, as Python's round() in timm.
    hs = jnp.round(jnp.sqrt(target_area * aspect)).astype(jnp.int32)
    ws = jnp.round(jnp.sqrt(target_area / aspect)).astype(jnp.int32)
    valid = (ws < width) & (hs < height)
    first = jnp.argmax(valid, axis=-1)[..., None]  # argmax: the first True.
    h = jnp.take_along_axis(hs, first, axis=-1)[..., 0]
    w = jnp.take_along_axis(ws, first, axis=-1)[..., 0]
    # random.randint(0, H - h) is inclusive: H - h + 1 positions.
    top = jnp.floor(u_top * (height - h + 1)).astype(jnp.int32)
    left = jnp.floor(u_left * (width - w + 1)).astype(jnp.int32)
    return top, left, h, w, valid.any(axis=-1)


def random_erase(
    rng: jax.Array,
    images: jax.Array,
    *,
    probability: float,
    min_area: float = ERASE_MIN_AREA,
    max_area: float = ERASE_MAX_AREA,
    min_aspect: float = ERASE_MIN_ASPECT,
    max_aspect: float | None = None,
    attempts: int = ERASE_ATTEMPTS,
) -> jax.Array:
    """timm `RandomErasing(probability, mode="pixel", max_count=1)` on normalised float images
    [B, H, W, C]: per image, with `probability`, one box of N(0, 1) noise. Apply before `mix`.

    probability 0: the input, untouched. Draws are batch-shaped, so under a batch sharding
    each device generates only its own rows (partitionable threefry).
    """
    probability = _check("random_erasing", probability, 0.0, 1.0)
    if probability == 0:
        return images
    if not jnp.issubdtype(images.dtype, jnp.floating):
        raise TypeError(f"random_erase needs normalised float images, got {images.dtype}.")
    batch, height, width = images.shape[:3]
    k_gate, k_area, k_aspect, k_top, k_left, k_noise = jax.random.split(rng, 6)
    top, left, h, w, found = erase_boxes(
        jax.random.uniform(k_area, (batch, attempts)),
        jax.random.uniform(k_aspect, (batch, attempts)),
        jax.random.uniform(k_top, (batch,)),
        jax.random.uniform(k_left, (batch,)),
        height,
        width,
        min_area=min_area,
        max_area=max_area,
        min_aspect=min_aspect,
        max_aspect=max_aspect,
    )
    erase = found & (jax.random.uniform(k_gate, (batch,)) < probability)

    def col(a: jax.Array) -> jax.Array:  # [B] -> [B, 1, 1] against the row / column iotas.
        return a[:, None, None]

    rows = jax.lax.broadcasted_iota(jnp.int32, (1, height, 1), 1)
    cols = jax.lax.broadcasted_iota(jnp.int32, (1, 1, width), 2)
    inside = (
        col(erase)
        & (rows >= col(top))
        & (rows < col(top + h))
        & (cols >= col(left))
        & (cols < col(left + w))
    )
    noise = jax.random.normal(k_noise, images.shape, jnp.float32).astype(images.dtype)
    return jnp.where(inside[..., None], noise, images)


@dataclasses.dataclass(frozen=True)
class DeviceAugment:
    """Validated `config.augment` values; calling it erases, then mixes (timm's order)."""

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    switch_prob: float = 0.5
    random_erasing: float = 0.0

    def __post_init__(self) -> None:
        _check_mix(self.mixup_alpha, self.cutmix_alpha, self.mix_prob, self.switch_prob)
        _check("random_erasing", self.random_erasing, 0.0, 1.0)
        for field in dataclasses.fields(self):  # ints or numpy scalars from a config: floats.
            object.__setattr__(self, field.name, float(getattr(self, field.name)))

    @property
    def mixes(self) -> bool:
        """Whether `mix` changes anything (else the targets may stay int labels)."""
        return (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.mix_prob > 0

    @property
    def erases(self) -> bool:
        return self.random_erasing > 0

    def __call__(
        self,
        rng: jax.Array,
        images: jax.Array,
        targets: jax.Array,
        mask: jax.Array,
        *,
        num_shards: int,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """`random_erase` then `mix` on normalised images; see those for the arguments."""
        k_erase, k_mix = jax.random.split(rng)
        images = random_erase(k_erase, images, probability=self.random_erasing)
        return mix(
            k_mix,
            images,
            targets,
            mask,
            mixup_alpha=self.mixup_alpha,
            cutmix_alpha=self.cutmix_alpha,
            mix_prob=self.mix_prob,
            switch_prob=self.switch_prob,
            num_shards=num_shards,
        )


def from_config(augment: ml_collections.ConfigDict) -> DeviceAugment:
    """`config.augment` as a `DeviceAugment`; ConfigError names a bad key, value and range."""
    return DeviceAugment(
        mixup_alpha=augment.mixup_alpha,
        cutmix_alpha=augment.cutmix_alpha,
        mix_prob=augment.mix_prob,
        switch_prob=augment.switch_prob,
        random_erasing=augment.random_erasing,
    )
