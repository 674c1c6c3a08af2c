"""jaxres.device_augment against timm's Mixup / CutMix / RandomErasing (torch, NCHW)."""

from __future__ import annotations

import functools
import math
import re

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxres import config_base, losses
from jaxres import device_augment as da
from jaxres.errors import ConfigError

torch = pytest.importorskip("torch")
timm_mixup = pytest.importorskip("timm.data.mixup")
timm_erasing = pytest.importorskip("timm.data.random_erasing")

B, C, H, W, K = 8, 3, 32, 40, 10
SMOOTHING = 0.1
BOTH = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "mix_prob": 1.0, "switch_prob": 0.5}
# Some shards not mixed at all; the per-shard and mask tests share one compilation of this.
SOMETIMES = {"mixup_alpha": 0.8, "cutmix_alpha": 1.0, "mix_prob": 0.7, "switch_prob": 0.5}


def _batch(seed: int = 0, batch: int = B) -> tuple[np.ndarray, np.ndarray]:
    """Float32 NHWC images (normalised-like) and int labels."""
    rs = np.random.RandomState(seed)
    return rs.randn(batch, H, W, C).astype(np.float32), rs.randint(0, K, size=batch)


# Everything random is jitted, and compiled as few times as possible: eager dispatch compiles
# each primitive of the Gamma sampler on its own, and one compilation of it takes seconds on CPU.
MIX_STATIC = ("mixup_alpha", "cutmix_alpha", "mix_prob", "switch_prob", "num_shards")


def _params(rng: jax.Array, *, num_shards: int, **kw) -> da.MixParams:
    """The per-shard draws `mix` makes (its documented key derivation), for H x W images."""
    draw = functools.partial(da.sample_params, height=H, width=W, **kw)
    return jax.vmap(draw)(jax.random.split(rng, num_shards))


@functools.partial(jax.jit, static_argnames=MIX_STATIC)
def _mix_and_params(rng, images, targets, mask, **kw):
    """`mix`'s outputs and the draws behind them, in one compilation."""
    return da.mix(rng, images, targets, mask, **kw), _params(rng, **kw)


_erase = jax.jit(da.random_erase, static_argnames=("probability",))


@pytest.mark.parametrize("use_cutmix", [False, True])
def test_mix_with_matches_timm(use_cutmix):
    images, labels = _batch()
    lam = float(np.float32(0.37))
    mixer = timm_mixup.Mixup(
        mixup_alpha=1.0, cutmix_alpha=1.0, label_smoothing=SMOOTHING, num_classes=K
    )
    mixer._params_per_batch = lambda: (lam, use_cutmix)  # Fixed lambda; timm draws the box itself.
    np.random.seed(7)
    x_timm, t_timm = mixer(
        torch.from_numpy(images.transpose(0, 3, 1, 2)).clone(), torch.from_numpy(labels)
    )

    np.random.seed(7)  # The same draws as timm's rand_bbox: centre y, then x.
    cy, cx = np.random.randint(0, H), np.random.randint(0, W)
    box, cut_lam = da.cutmix_box(lam, cy, cx, H, W)
    ours_lam = cut_lam if use_cutmix else jnp.float32(lam)
    x, t = jax.jit(da.mix_with)(
        jnp.asarray(images),
        losses.dense_targets(jnp.asarray(labels), K, SMOOTHING),
        ours_lam,
        box,
        use_cutmix,
    )
    assert np.abs(np.asarray(x) - x_timm.numpy().transpose(0, 2, 3, 1)).max() <= 1e-6
    assert np.abs(np.asarray(t) - t_timm.numpy()).max() <= 1e-6
    if use_cutmix:  # A real box: some pixels copied, most not.
        assert 0 < float(cut_lam) < 1


def test_cutmix_box_matches_timm():
    rs = np.random.RandomState(1)
    lams = np.concatenate([[0.0, 1.0, 0.5, 0.75, 0.999], rs.beta(1.0, 1.0, 300)]).astype(np.float32)
    for i, lam in enumerate(lams):
        height, width = [(32, 40), (224, 224), (7, 5)][i % 3]
        np.random.seed(i)
        (yl, yh, xl, xh), timm_lam = timm_mixup.cutmix_bbox_and_lam((3, height, width), float(lam))
        np.random.seed(i)
        cy, cx = np.random.randint(0, height), np.random.randint(0, width)
        box, ours_lam = da.cutmix_box(lam, cy, cx, height, width)
        assert np.asarray(box).tolist() == [yl, yh, xl, xh], (lam, height, width)
        assert abs(float(ours_lam) - timm_lam) <= 1e-6


def _reference_mix(images, targets, mask, params, num_shards):
    """numpy: row i of shard s mixes with row (per - 1 - i) of the same shard only."""
    out_x, out_t, out_m = images.copy(), targets.copy(), mask.copy()
    per = len(images) // num_shards
    rows, cols = np.arange(H)[:, None], np.arange(W)[None, :]
    for s in range(num_shards):
        lam, cut = float(params.lam[s]), bool(params.use_cutmix[s])
        yl, yh, xl, xh = np.asarray(params.box[s])
        inside = (rows >= yl) & (rows < yh) & (cols >= xl) & (cols < xh)
        weight = np.where(inside, 0.0, 1.0) if cut else np.full((H, W), lam)
        for i in range(per):
            a, b = s * per + i, s * per + per - 1 - i
            out_x[a] = images[a] * weight[..., None] + images[b] * (1 - weight[..., None])
            out_t[a] = targets[a] * lam + targets[b] * (1 - lam)
            out_m[a] = mask[a] * mask[b] if lam < 1 else mask[a]
    return out_x, out_t, out_m


def test_mix_is_per_shard():
    images, labels = _batch(1, 16)
    targets = np.asarray(losses.dense_targets(jnp.asarray(labels), K, SMOOTHING))
    mask = np.ones(16, np.float32)
    mask[[2, 9]] = 0.0
    kinds = set()
    for seed in range(5):
        rng = jax.random.key(seed)
        (x, t, m), params = _mix_and_params(
            rng,
            jnp.asarray(images),
            jnp.asarray(targets),
            jnp.asarray(mask),
            num_shards=4,
            **SOMETIMES,
        )
        lam, cut = np.asarray(params.lam), np.asarray(params.use_cutmix)
        kinds.update(np.where(lam == 1, "none", np.where(cut, "cutmix", "mixup")).tolist())
        ref_x, ref_t, ref_m = _reference_mix(images, targets, mask, params, 4)
        np.testing.assert_allclose(np.asarray(x), ref_x, atol=1e-6)
        np.testing.assert_allclose(np.asarray(t), ref_t, atol=1e-6)
        np.testing.assert_array_equal(np.asarray(m), ref_m)
    assert kinds == {"none", "cutmix", "mixup"}  # Every case was exercised.


def test_sharded_equals_unsharded_and_stays_local():
    """`DeviceAugment` (erase, then mix) as the train step will run it: batch-sharded on 8 devices."""
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()), ("data",))
    data, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    images, labels = _batch(2, 16)
    targets = losses.dense_targets(jnp.asarray(labels), K, SMOOTHING)
    mask = jnp.ones(16).at[5].set(0.0)
    rng = jax.random.key(3)
    k_erase, k_mix = jax.random.split(rng)  # DeviceAugment's documented order: erase, then mix.
    erased = _erase(k_erase, jnp.asarray(images), probability=1.0)
    expected, params = _mix_and_params(k_mix, erased, targets, mask, num_shards=8, **BOTH)
    ref = _reference_mix(np.asarray(erased), np.asarray(targets), np.asarray(mask), params, 8)

    fn = functools.partial(da.DeviceAugment(random_erasing=1.0, **BOTH), num_shards=8)
    sharded = jax.jit(
        fn, in_shardings=(replicated, data, data, data), out_shardings=(data, data, data)
    )
    args = (rng, *(jax.device_put(a, data) for a in (jnp.asarray(images), targets, mask)))
    compiled = sharded.lower(*args).compile()
    got = compiled(*args)
    for g, e, r in zip(got, expected, ref):
        assert g.sharding.is_equivalent_to(data, g.ndim)
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), atol=1e-6)
        np.testing.assert_allclose(np.asarray(g), r, atol=1e-6)
    hlo = compiled.as_text()
    for collective in ("all-gather(", "all-to-all(", "collective-permute(", "reduce-scatter("):
        assert collective not in hlo, collective
    # The only collectives: the scalar "any lane still rejecting" flags of the Beta sampler's
    # while loops (its lanes, one per shard, are spread over the devices).
    reduces = re.findall(r"= (\S+) all-reduce\(", hlo)
    assert set(reduces) <= {"pred[]"}, reduces


def test_mask_and_unmixed_shards():
    images, labels = _batch(3, 16)
    targets = losses.dense_targets(jnp.asarray(labels), K, SMOOTHING)
    mask = jnp.ones(16).at[jnp.array([0, 4])].set(0.0)  # The first rows of shards 0 and 1 (of 4).
    lams = []
    for seed in range(5):
        (x, t, m), params = _mix_and_params(
            jax.random.key(100 + seed),
            jnp.asarray(images),
            targets,
            mask,
            num_shards=4,
            **SOMETIMES,
        )
        lam = np.asarray(params.lam)
        lams.extend(lam[:2])
        x, t, m = (np.asarray(a).reshape(4, 4, *a.shape[1:]) for a in (x, t, m))
        for s in range(2):
            # Row 3 mixes with row 0: both lose their weight; rows 1, 2 mix with each other.
            expected = [0.0, 1.0, 1.0, 0.0] if lam[s] < 1 else [0.0, 1.0, 1.0, 1.0]
            np.testing.assert_array_equal(m[s], expected)
            if lam[s] == 1:  # Not mixed: untouched.
                np.testing.assert_array_equal(x[s], images.reshape(4, 4, H, W, C)[s])
                np.testing.assert_array_equal(t[s], np.asarray(targets).reshape(4, 4, K)[s])
    assert min(lams) < 1 and max(lams) == 1  # Both cases seen.


def test_noop_when_alphas_zero():
    images, labels = _batch()
    args = (jnp.asarray(images), losses.dense_targets(jnp.asarray(labels), K), jnp.ones(B))
    kw = {
        "mixup_alpha": 0.0,
        "cutmix_alpha": 0.0,
        "mix_prob": 1.0,
        "switch_prob": 0.5,
        "num_shards": 2,
    }
    out = da.mix(jax.random.key(0), *args, **kw)
    assert all(o is a for o, a in zip(out, args))
    jaxpr = jax.make_jaxpr(functools.partial(da.mix, **kw))(jax.random.key(0), *args)
    assert not jaxpr.eqns  # Nothing computed.
    assert da.random_erase(jax.random.key(0), args[0], probability=0.0) is args[0]


def test_lambda_statistics_and_switch_prob():
    alpha = 0.3
    p = jax.jit(_params, static_argnames=MIX_STATIC)(
        jax.random.key(5),
        num_shards=8000,
        mixup_alpha=alpha,
        cutmix_alpha=1.0,
        mix_prob=0.6,
        switch_prob=0.25,
    )
    lam, cut = np.asarray(p.lam), np.asarray(p.use_cutmix)
    mixed = (lam < 1) | cut  # A CutMix box can round to nothing (lam corrected to 1).
    assert abs(mixed.mean() - 0.6) < 0.02
    assert abs(cut[mixed].mean() - 0.25) < 0.02
    # Mixup: lam ~ Beta(alpha, alpha): mean 1/2, variance 1 / (4 (2 alpha + 1)).
    mixup = lam[mixed & ~cut]
    assert abs(mixup.mean() - 0.5) < 0.02
    assert abs(mixup.var() - 1 / (4 * (2 * alpha + 1))) < 0.01
    # CutMix: the box-corrected lambda is biased up by boxes clipped at the borders; as timm's.
    np.random.seed(0)
    timm_lam = [
        timm_mixup.cutmix_bbox_and_lam((C, H, W), np.random.beta(1.0, 1.0))[1] for _ in range(4000)
    ]
    assert abs(lam[cut].mean() - np.mean(timm_lam)) < 0.02
    assert abs(lam[cut].var() - np.var(timm_lam)) < 0.01


class _ScriptedRandom:
    """Stands in for the `random` module in timm's random_erasing: replays our uniform draws."""

    def __init__(self, u_area, u_aspect, u_top, u_left):
        self.uniforms = [float(v) for pair in zip(u_area, u_aspect) for v in pair]
        self.ints = [float(u_top), float(u_left)]

    def random(self):
        return 0.0  # Gate: erase.

    def uniform(self, a, b):
        return a + (b - a) * self.uniforms.pop(0)

    def randint(self, a, b):
        return a + math.floor(self.ints.pop(0) * (b - a + 1))


def test_erase_boxes_match_timm(monkeypatch):
    height, width, n = 12, 16, 64  # Small: many attempts fail (w >= W or h >= H).
    rs = np.random.RandomState(4)
    u_area, u_aspect = rs.rand(n, 10).astype(np.float32), rs.rand(n, 10).astype(np.float32)
    u_top, u_left = rs.rand(n).astype(np.float32), rs.rand(n).astype(np.float32)
    # Large, tall boxes (h >= H) for the first attempts of half the rows, all attempts of 8 rows.
    for i in range(n // 2):
        tall = slice(None) if i < 8 else slice(0, i % 10)
        u_area[i, tall], u_aspect[i, tall] = 0.95, 0.98
    top, left, h, w, found = (
        np.asarray(a) for a in da.erase_boxes(u_area, u_aspect, u_top, u_left, height, width)
    )
    assert found.any() and not found.all()
    monkeypatch.setattr(timm_erasing, "_get_pixels", lambda *a, **k: torch.full(a[2], float("nan")))
    eraser = timm_erasing.RandomErasing(probability=1.0, mode="pixel", device="cpu")
    for i in range(n):
        monkeypatch.setattr(
            timm_erasing, "random", _ScriptedRandom(u_area[i], u_aspect[i], u_top[i], u_left[i])
        )
        img = torch.zeros(3, height, width)
        eraser(img)
        erased = np.isnan(img[0].numpy())
        assert erased.any() == found[i]
        if found[i]:
            rows, cols = np.nonzero(erased)
            assert (
                rows.min(),
                cols.min(),
                rows.max() + 1 - rows.min(),
                cols.max() + 1 - cols.min(),
            ) == (top[i], left[i], h[i], w[i]), i


def test_random_erase():
    n, height, width = 16, H, W  # The sharding test's shape: its compilation is reused.
    images = jnp.full((n, height, width, C), 100.0, jnp.float32)  # Never a N(0, 1) draw.
    rng = jax.random.key(9)
    out = np.asarray(_erase(rng, images, probability=1.0))
    np.testing.assert_array_equal(out, np.asarray(_erase(rng, images, probability=1.0)))
    assert not np.array_equal(out, np.asarray(_erase(jax.random.key(10), images, probability=1.0)))
    changed = out != 100.0
    assert (changed == changed[..., :1]).all()  # All channels of a pixel.
    area = height * width
    for i in range(n):
        rows, cols = np.nonzero(changed[i, ..., 0])
        assert len(rows), i  # Every image erased.
        h, w = rows.max() + 1 - rows.min(), cols.max() + 1 - cols.min()
        assert changed[i, ..., 0].sum() == h * w  # One filled rectangle, nothing else touched.
        # h = round(sqrt(A r)), w = round(sqrt(A / r)): A and r within these rounding bounds.
        assert (h - 0.5) * (w - 0.5) <= area / 3 and (h + 0.5) * (w + 0.5) >= 0.02 * area
        assert (h - 0.5) / (w + 0.5) <= 1 / 0.3 and (h + 0.5) / (w - 0.5) >= 0.3
    noise = out[changed]
    assert abs(noise.mean()) < 0.05 and abs(noise.std() - 1) < 0.05
    small = jnp.full((200, 8, 8, 1), 100.0, jnp.float32)
    half = np.asarray(_erase(rng, small, probability=0.5)) != 100.0
    assert 0.4 < half.any(axis=(1, 2, 3)).mean() < 0.6


def test_from_config():
    config = config_base.base_config()
    aug = da.from_config(config.augment)
    assert not aug.mixes and not aug.erases
    for key, value, valid in [
        ("mix_prob", 1.5, "[0, 1]"),
        ("switch_prob", -0.1, "[0, 1]"),
        ("mixup_alpha", -1.0, ">= 0"),
        ("cutmix_alpha", float("nan"), ">= 0"),
        ("random_erasing", "high", "[0, 1]"),
    ]:
        bad = ml_collections.ConfigDict({**config.augment.to_dict(), key: value})
        with pytest.raises(
            ConfigError, match=rf"config\.augment\.{key}=.*{value!r}.*valid: {re.escape(valid)}"
        ):
            da.from_config(bad)

    images, labels = _batch(6)
    args = (jnp.asarray(images), losses.dense_targets(jnp.asarray(labels), K), jnp.ones(B))
    assert all(
        o is a for o, a in zip(aug(jax.random.key(0), *args, num_shards=2), args)
    )  # Defaults: off.
    aug = da.from_config(
        ml_collections.ConfigDict(
            {**config.augment.to_dict(), "cutmix_alpha": 1, "random_erasing": 0.25}
        )
    )
    assert (
        aug.mixes and aug.erases and aug.cutmix_alpha == 1.0 and isinstance(aug.cutmix_alpha, float)
    )
