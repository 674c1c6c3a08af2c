"""RandAugment (jaxres/data/randaugment.py) against timm's: ops, magnitudes, parsing, determinism."""

import io
import math
import pickle
import random

import numpy as np
import pytest
from PIL import Image

from jaxres.data import randaugment as ra
from jaxres.data import transforms
from jaxres.errors import ConfigError

timm_aa = pytest.importorskip("timm.data.auto_augment")

FILL = ra.IMAGENET_FILL
RESAMPLES = ra.RANDOM_RESAMPLE
SPECS = [
    "rand-m9-mstd0.5-inc1",
    "rand-m7-mstd0.5",
    "rand-m9-n3-mstd101-p1-inc1",
    "rand-m15-mmax20-p0.7",
    "rand",
]


def natural_image(seed: int = 0, size: tuple[int, int] = (80, 64)) -> np.ndarray:
    """A smooth random colour field plus pixel noise, uint8 HxWx3 (non-square: 64x80)."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 255, (h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(base).resize((w, h), Image.Resampling.BICUBIC), np.float32)
    return np.clip(field + rng.normal(0, 10, field.shape), 0, 255).astype(np.uint8)


def timm_hparams() -> dict:
    """The aa_params timm's `transforms_imagenet_train` passes (224 crop, interpolation "random")."""
    return {"translate_const": int(224 * 0.45), "img_mean": FILL}


def max_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16)).max())


# ------------------------------------------------------------------ ops: same arguments, same pixels


def op_cases():
    """(timm op name, jaxres args after the image, timm args after the image) for every op in both lists."""
    geometric = {
        "Rotate": [-27.0, 13.5],
        "ShearX": [-0.3, 0.17],
        "ShearY": [0.3, -0.11],
        "TranslateXRel": [-0.45, 0.2],
        "TranslateYRel": [0.45, -0.31],
    }
    plain = {
        "Posterize": [1, 2, 4, 8],  # 0 bits: test_posterize_to_zero_bits_is_black.
        "Solarize": [0, 100, 256],
        "SolarizeAdd": [0, 60, 110],
        "Color": [0.1, 1.0, 1.9],
        "Contrast": [0.1, 0.55, 1.9],
        "Brightness": [0.1, 1.45, 1.9],
        "Sharpness": [0.1, 0.7, 1.9],
    }
    names = set(ra.RAND_TRANSFORMS) | set(ra.RAND_INCREASING_TRANSFORMS)
    for name in sorted(names):
        base = name.removesuffix("Increasing")
        if name in ("AutoContrast", "Equalize", "Invert"):
            yield name, (), ()
        for value in plain.get(base, []):
            yield name, (value,), (value,)
        for value in geometric.get(name, []):
            for resample in RESAMPLES:
                yield (
                    name,
                    (value, FILL, resample),
                    (value,),
                    {"fillcolor": FILL, "resample": resample},
                )


@pytest.mark.parametrize("case", list(op_cases()), ids=lambda c: f"{c[0]}{c[1][:1]}{c[1][2:]}")
def test_every_op_matches_timm(case):
    name, ours_args, timm_args, *kwargs = case
    img = Image.fromarray(natural_image())
    ours = ra.OPS[name].fn(img, *ours_args)
    theirs = timm_aa.NAME_TO_OP[name](img, *timm_args, **(kwargs[0] if kwargs else {}))
    # Same PIL calls with the same arguments: identical, not just within one grey level.
    assert ours.size == theirs.size and ours.mode == theirs.mode == "RGB"
    assert max_diff(ours, theirs) == 0


def test_posterize_to_zero_bits_is_black():
    """timm asks for 0 bits (Posterize below level 2.5, PosterizeIncreasing at 10); Pillow 13 refuses
    it, so timm raises there. Ours gives black, as older Pillow did (mask ~255 clears every bit)."""
    img = Image.fromarray(natural_image())
    assert not np.asarray(ra.posterize(img, 0)).any()
    assert ra.posterize(img, 0).size == img.size
    try:
        theirs = timm_aa.posterize(img, 0)
    except ValueError:
        return
    assert max_diff(ra.posterize(img, 0), theirs) == 0


def timm_posterize(img, bits, **kwargs):
    """timm's posterize, with the black result of older Pillow at 0 bits (see the test above)."""
    return Image.new(img.mode, img.size) if bits == 0 else timm_aa.posterize(img, bits, **kwargs)


def test_op_table_covers_timm_lists_in_order():
    assert list(ra.RAND_TRANSFORMS) == timm_aa._RAND_TRANSFORMS
    assert list(ra.RAND_INCREASING_TRANSFORMS) == timm_aa._RAND_INCREASING_TRANSFORMS
    for name in ra.RAND_TRANSFORMS + ra.RAND_INCREASING_TRANSFORMS:
        assert (ra.OPS[name].level_to_arg is None) == (timm_aa.LEVEL_TO_ARG[name] is None), name


class FixedRandom:
    """Stands in for timm's `random` module: `random()` always returns `value`."""

    def __init__(self, value: float):
        self.value = value

    def random(self) -> float:
        return self.value


@pytest.mark.parametrize("name", sorted(set(ra.RAND_TRANSFORMS + ra.RAND_INCREASING_TRANSFORMS)))
def test_level_to_arg_matches_timm(name, monkeypatch):
    """Every magnitude on a fine grid, with timm's random sign forced each way."""
    op = ra.OPS[name]
    if op.level_to_arg is None:
        return
    for negate in (False, True):
        # timm negates when random.random() > 0.5.
        monkeypatch.setattr(timm_aa, "random", FixedRandom(1.0 if negate else 0.0))
        for level in np.linspace(0, 20, 401):
            (expected,) = timm_aa.LEVEL_TO_ARG[name](float(level), timm_hparams())
            ours = op.level_to_arg(float(level), negate)
            assert ours == expected and type(ours) is type(expected), (name, level, negate)


# ------------------------------------------------------------------ the whole transform, draw for draw


class RecordingRng:
    """A `np.random.Generator` that logs every draw, so timm can replay the same decisions."""

    def __init__(self, seed: int):
        self._rng, self.log = np.random.default_rng(seed), []

    def _record(self, kind, value):
        self.log.append((kind, value))
        return value

    def random(self):
        return self._record("random", self._rng.random())

    def normal(self, loc, scale):
        return self._record("normal", self._rng.normal(loc, scale))

    def uniform(self, low, high):
        return self._record("uniform", self._rng.uniform(low, high))

    def integers(self, low, high=None, size=None):
        return self._record("integers", self._rng.integers(low, high, size=size))


class Replay:
    """Stands in for timm's `random` module (and `np.random.choice`), returning the logged draws."""

    def __init__(self, log):
        self._log = iter(log)

    def _next(self, kind):
        logged, value = next(self._log)
        assert logged == kind, (logged, kind)
        return value

    def random(self):
        return self._next("random")

    def gauss(self, mu, sigma):
        return self._next("normal")

    def uniform(self, a, b):
        return self._next("uniform")

    def choice(self, seq):  # timm `_interpolation`: random.choice(resamples).
        return seq[self._next("integers")]

    def np_choice(
        self, ops, n, replace=True, p=None
    ):  # timm `RandAugment`: np.random.choice(ops, n).
        assert replace and p is None
        return [ops[i] for i in self._next("integers")]

    def done(self):
        assert next(self._log, None) is None


@pytest.mark.parametrize("spec", SPECS)
def test_randaugment_equals_timm_given_the_same_draws(spec, monkeypatch):
    """timm's RandAugment fed our draws (op choice, apply, magnitude, sign, resampling) gives our pixels."""
    ours = ra.RandAugment(spec)
    theirs = timm_aa.rand_augment_transform(spec, timm_hparams())
    for op in theirs.ops:
        if op.name.startswith("Posterize"):
            op.aug_fn = timm_posterize
    image = natural_image(1)
    applied, chosen = 0, set()
    for seed in range(100):
        rng = RecordingRng(seed)
        out = ours(image, rng)
        chosen |= {ours.spec.op_names[i] for i in rng.log[0][1]}
        replay = Replay(rng.log)
        monkeypatch.setattr(timm_aa, "random", replay)
        monkeypatch.setattr(timm_aa.np.random, "choice", replay.np_choice)
        expected = np.asarray(theirs(Image.fromarray(image)))
        monkeypatch.undo()
        replay.done()
        np.testing.assert_array_equal(out, expected, err_msg=f"{spec} seed {seed}")
        applied += not np.array_equal(out, image)
    assert applied > 30
    assert chosen == set(ours.spec.op_names)  # Every op of the list was drawn (and half applied).


# ------------------------------------------------------------------ parsing


@pytest.mark.parametrize("spec", SPECS + ["rand-m0-n0", "rand-mmax0-m12"])
def test_parse_matches_timm(spec):
    parsed = ra.parse(spec)
    theirs = timm_aa.rand_augment_transform(spec, timm_hparams())
    assert parsed.num_layers == theirs.num_layers
    assert theirs.choice_weights is None
    assert list(parsed.op_names) == [op.name for op in theirs.ops]
    for op in theirs.ops:
        assert parsed.magnitude == op.magnitude
        assert parsed.magnitude_std == op.magnitude_std
        assert parsed.magnitude_max == (op.magnitude_max or 10)
        assert parsed.prob == op.prob
        assert op.kwargs == {"fillcolor": FILL, "resample": RESAMPLES}
    assert pickle.loads(pickle.dumps(parsed)) == parsed


def test_parse_fields():
    assert ra.parse("rand-m9-mstd0.5-inc1") == ra.RandAugmentSpec(9, 2, 0.5, 10, True, 0.5)
    assert ra.parse("rand-mstdinf").magnitude_std == math.inf
    assert ra.parse("rand-mstd101").magnitude_std == math.inf


@pytest.mark.parametrize(
    "spec, part",
    [
        ("rnd-m9", "'rnd'"),
        ("rand-m9-foo", "'foo'"),
        ("rand-m9.5", "'m9.5'"),
        ("rand-m9-m8", "'m'"),
        ("rand-p1.5", "p must be"),
        ("rand-inc2", "inc must be"),
        ("rand-m9-w0", "'w0'"),
        ("rand-w1", "'w1'"),
        ("rand-tweights", "'tweights'"),
        ("rand--m9", "''"),
        ("rand-mstd", "'mstd'"),
    ],
)
def test_parse_refuses_bad_strings(spec, part):
    with pytest.raises(ConfigError) as error:
        ra.parse(spec)
    message = str(error.value)
    assert (
        "config.augment.randaugment" in message
        and part in message
        and "rand-m9-mstd0.5-inc1" in message
    )
    assert "\n" not in message


def test_bad_string_fails_when_the_transform_is_built():
    with pytest.raises(ConfigError, match="config.augment.randaugment"):
        transforms.TrainTransform(32, randaugment="rand-x9")


def test_dali_decoder_refuses_randaugment():
    from jaxres.config_base import base_config
    from jaxres.data import loader

    config = base_config()
    config.input.decoder, config.augment.randaugment = "dali", "rand-m9-mstd0.5-inc1"
    with pytest.raises(ConfigError, match="decoder=cpu"):
        loader.train_transform(config)
    config.input.decoder = "cpu"
    assert loader.train_transform(config).randaugment.spec == ra.parse("rand-m9-mstd0.5-inc1")


# ------------------------------------------------------------------ magnitudes and determinism


@pytest.mark.parametrize(
    "spec", ["rand-m9-mstd0.5", "rand-m9-mstd3", "rand-m8-mstd101", "rand-m12-mmax15-mstd2"]
)
def test_magnitude_distribution_matches_timm(spec, monkeypatch):
    """Our magnitudes against timm AugmentOp's (python `random`, seeded): mean, spread, clipping."""
    n = 20000
    rng = np.random.default_rng(0)
    parsed = ra.parse(spec)
    ours = np.array([ra.sample_magnitude(parsed, rng) for _ in range(n)])
    op = timm_aa.rand_augment_transform(spec, timm_hparams()).ops[3]  # Rotate
    seen = []
    monkeypatch.setattr(op, "level_fn", lambda level, hparams: seen.append(level) or (0.0,))
    monkeypatch.setattr(op, "aug_fn", lambda img, *args, **kwargs: img)
    op.prob = 1.0
    monkeypatch.setattr(
        timm_aa, "random", random.Random(0)
    )  # Seeded, without touching the global one.
    for _ in range(n):
        op(None)
    theirs = np.array(seen)
    assert ours.min() >= 0 and ours.max() <= parsed.magnitude_max
    assert abs(ours.mean() - theirs.mean()) < 0.05
    assert abs(ours.std() - theirs.std()) < 0.05
    top = parsed.magnitude_max
    assert abs((ours == top).mean() - (theirs == top).mean()) < 0.01
    assert abs((ours == 0).mean() - (theirs == 0).mean()) < 0.01
    np.testing.assert_allclose(
        np.quantile(ours, [0.1, 0.5, 0.9]), np.quantile(theirs, [0.1, 0.5, 0.9]), atol=0.1
    )


def test_same_seed_same_output_different_seed_different():
    augment = ra.RandAugment("rand-m9-mstd0.5-inc1")
    image = natural_image(2)
    runs = [augment(image, np.random.default_rng(s)) for s in (7, 7, 8)]
    np.testing.assert_array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])
    outputs = {augment(image, np.random.default_rng(s)).tobytes() for s in range(20)}
    assert len(outputs) > 15


def jpeg(seed: int) -> bytes:
    out = io.BytesIO()
    Image.fromarray(natural_image(seed, (96, 72))).save(out, "JPEG", quality=90)
    return out.getvalue()


def test_train_transform_with_randaugment_and_pickle():
    transform = transforms.TrainTransform(32, randaugment="rand-m9-mstd0.5-inc1")
    record = {"image": jpeg(3), "label": 5, "key": "k"}
    out = transform(record, np.random.default_rng(1))
    assert out["image"].shape == (32, 32, 3) and out["image"].dtype == np.uint8 and out["mask"] == 1
    copy = pickle.loads(pickle.dumps(transform))
    for seed in range(5):
        a = transform(record, np.random.default_rng(seed))["image"]
        np.testing.assert_array_equal(copy(record, np.random.default_rng(seed))["image"], a)
    plain = transforms.TrainTransform(32)
    differs = [
        not np.array_equal(
            transform(record, np.random.default_rng(s))["image"],
            plain(record, np.random.default_rng(s))["image"],
        )
        for s in range(10)
    ]
    assert any(differs)


def test_grain_same_seed_and_index_same_image():
    """grain's random_map rng: the same (seed, index) gives the same image, in any access order."""
    import grain

    records = [{"image": jpeg(i), "label": i, "key": str(i)} for i in range(6)]
    transform = transforms.TrainTransform(32, randaugment="rand-m9-mstd0.5-inc1")

    def dataset(seed):
        return grain.MapDataset.source(records).random_map(transform, seed=seed)

    first = [dataset(1)[i]["image"] for i in range(6)]
    backwards = [dataset(1)[i]["image"] for i in reversed(range(6))][::-1]
    for a, b in zip(first, backwards):
        np.testing.assert_array_equal(a, b)
    other = [dataset(2)[i]["image"] for i in range(6)]
    assert any(not np.array_equal(a, b) for a, b in zip(first, other))
