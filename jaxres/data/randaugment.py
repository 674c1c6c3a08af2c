"""RandAugment on the host (grain workers), with timm's semantics and PIL ops.

    spec = parse("rand-m9-mstd0.5-inc1")          # ConfigError on a bad string
    augment = RandAugment(spec)
    image = augment(image, rng)                    # uint8 HxWx3 -> uint8 HxWx3

What it does, as timm 1.0's `rand_augment_transform(spec, aa_params)` built by
`transforms_imagenet_train` (timm/data/auto_augment.py, transforms_factory.py):

* `num_layers` ops are chosen uniformly, with replacement, from timm's list
  (`_RAND_TRANSFORMS`, or `_RAND_INCREASING_TRANSFORMS` with `inc1`; same
  names, same order); each is applied with probability `prob` (timm skips an
  op when `random() > prob`).
* The magnitude of each applied op is `m`, or with `mstd` > 0 a Gaussian
  draw around `m` with std `mstd`, or with `mstd` inf (or > 100) uniform in
  [0, m]; then clipped to [0, mmax] (timm's `AugmentOp`).
* Magnitude -> op argument exactly as timm's `LEVEL_TO_ARG` (level / 10 scaled
  to the op's range), including the random sign of Rotate, ShearX/Y,
  TranslateX/YRel and the *Increasing enhancements.
* Geometric ops fill with timm's `img_mean` for the ImageNet mean,
  (124, 116, 104), and resample bilinear or bicubic chosen at random per op
  (timm's train default `interpolation="random"`). TranslateX/YRel move by up
  to 45% of the side: `translate_pct` is not among the `aa_params` that
  `transforms_imagenet_train` passes for `rand` policies, so timm's default
  0.45 of `_translate_rel_level_to_arg` applies (`translate_const` is only
  used by the absolute translations, which RandAugment does not list).
* The ops are timm's PIL calls (`Image.rotate`, `Image.transform` AFFINE,
  `ImageOps`, `ImageEnhance`, `Image.point`), so with the same arguments the
  pixels are identical (tests/test_randaugment.py). The image is converted to
  PIL once per image (and not at all when every chosen op is skipped).

Deviations. Every random draw comes from the example's `np.random.Generator`
(grain's `random_map` rng), never from python's `random` or numpy's global
state as in timm, so augmentation is deterministic and resumable; the draws
are made in timm's order (op choice, then per op: apply?, magnitude, sign,
resampling). The spec parser is stricter than timm's, which silently ignores
sections without a digit: any unknown, repeated or malformed section, `inc`
other than 0/1, `p` outside [0, 1], a transform set (`t...`) and the old
weight index `w` raise `ConfigError`. timm 1.0 removed `w` (its parser
asserts on it; its note says `w0` is not `tweights`), so jaxres refuses every
`w` value rather than guess an old timm's weights. `mstdinf` is accepted as a
spelling of uniform sampling (timm needs e.g. `mstd101`). `mmax0` means the
default 10, as in timm (`magnitude_max or 10`). Posterize to 0 bits (timm's
Posterize below level 2.5, PosterizeIncreasing at level 10) gives a black
image, as older Pillow did; with Pillow 13 (installed here) timm raises
ValueError there instead (`ImageOps.posterize` wants 1-8 bits).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from jaxres.config_base import IMAGENET_MEAN
from jaxres.errors import ConfigError

LEVEL_DENOM = 10.0  # timm `_LEVEL_DENOM`: magnitude m is the fraction m / 10 of an op's range.
TRANSLATE_PCT = 0.45  # timm's `translate_pct` default for TranslateX/YRel (fraction of the side).
# timm `img_mean` (transforms_imagenet_train): round(255 * mean); IMAGENET_MEAN is already x255.
IMAGENET_FILL = tuple(min(255, round(x)) for x in IMAGENET_MEAN)
# timm `_RANDOM_INTERPOLATION`, drawn per geometric op.
RANDOM_RESAMPLE = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)
KEY = "config.augment.randaugment"
EXAMPLE = "rand-m9-mstd0.5-inc1"

Fill = tuple[int, int, int]

# ------------------------------------------------------------------ ops (timm's PIL calls)


def _affine(
    img: Image.Image, matrix: tuple[float, ...], fill: Fill, resample: Image.Resampling
) -> Image.Image:
    return img.transform(
        img.size, Image.Transform.AFFINE, matrix, resample=resample, fillcolor=fill
    )


def shear_x(img: Image.Image, factor: float, fill: Fill, resample: Image.Resampling) -> Image.Image:
    """Horizontal shear: output (x, y) samples input (x + factor * y, y)."""
    return _affine(img, (1, factor, 0, 0, 1, 0), fill, resample)


def shear_y(img: Image.Image, factor: float, fill: Fill, resample: Image.Resampling) -> Image.Image:
    """Vertical shear: output (x, y) samples input (x, factor * x + y)."""
    return _affine(img, (1, 0, 0, factor, 1, 0), fill, resample)


def translate_x_rel(
    img: Image.Image, pct: float, fill: Fill, resample: Image.Resampling
) -> Image.Image:
    """Shift by `pct` of the width (positive: content moves left, as timm)."""
    return _affine(img, (1, 0, pct * img.size[0], 0, 1, 0), fill, resample)


def translate_y_rel(
    img: Image.Image, pct: float, fill: Fill, resample: Image.Resampling
) -> Image.Image:
    """Shift by `pct` of the height (positive: content moves up, as timm)."""
    return _affine(img, (1, 0, 0, 0, 1, pct * img.size[1]), fill, resample)


def rotate(img: Image.Image, degrees: float, fill: Fill, resample: Image.Resampling) -> Image.Image:
    """Rotation about the centre, counter-clockwise, same size, corners filled."""
    return img.rotate(degrees, resample=resample, fillcolor=fill)


def auto_contrast(img: Image.Image) -> Image.Image:
    """Stretches each channel to [0, 255] (`ImageOps.autocontrast`)."""
    return ImageOps.autocontrast(img)


def equalize(img: Image.Image) -> Image.Image:
    """Histogram equalisation per channel (`ImageOps.equalize`)."""
    return ImageOps.equalize(img)


def invert(img: Image.Image) -> Image.Image:
    """255 - x."""
    return ImageOps.invert(img)


def solarize(img: Image.Image, threshold: int) -> Image.Image:
    """Inverts the values >= `threshold` (256: no change)."""
    return ImageOps.solarize(img, threshold)


def solarize_add(img: Image.Image, add: int, threshold: int = 128) -> Image.Image:
    """Adds `add` (saturating at 255) to the values below `threshold`."""
    levels = np.arange(256)
    lut = np.where(levels < threshold, np.minimum(255, levels + add), levels).tolist()
    return img.point(lut * len(img.getbands()))


def posterize(img: Image.Image, bits: int) -> Image.Image:
    """Keeps the `bits` most significant bits of each value (8 or more: no change; 0: black).

    Pillow 13 (installed here) refuses `bits=0`, which timm's Posterize (level
    < 2.5) and PosterizeIncreasing (level 10) ask for; older Pillow gave black
    (its mask ~(2**8 - 1) clears every bit).
    """
    if bits <= 0:
        return Image.new(img.mode, img.size)
    return img if bits >= 8 else ImageOps.posterize(img, bits)


def color(img: Image.Image, factor: float) -> Image.Image:
    """Saturation blend: 0 grey, 1 unchanged (`ImageEnhance.Color`)."""
    return ImageEnhance.Color(img).enhance(factor)


def contrast(img: Image.Image, factor: float) -> Image.Image:
    """Blend with the mean grey level: 0 flat grey, 1 unchanged (`ImageEnhance.Contrast`)."""
    return ImageEnhance.Contrast(img).enhance(factor)


def brightness(img: Image.Image, factor: float) -> Image.Image:
    """Blend with black: 0 black, 1 unchanged (`ImageEnhance.Brightness`)."""
    return ImageEnhance.Brightness(img).enhance(factor)


def sharpness(img: Image.Image, factor: float) -> Image.Image:
    """Blend with a smoothed copy: 0 smoothed, 1 unchanged (`ImageEnhance.Sharpness`)."""
    return ImageEnhance.Sharpness(img).enhance(factor)


# ------------------------------------------------------------------ magnitude -> argument (timm LEVEL_TO_ARG)


def _signed(value: float, negate: bool) -> float:
    return -value if negate else value


def rotate_arg(level: float, negate: bool) -> float:
    """Degrees in [-30, 30]."""
    return _signed((level / LEVEL_DENOM) * 30.0, negate)


def enhance_arg(level: float, negate: bool) -> float:
    """Enhancement factor in [0.1, 1.9], rising with the level (not signed)."""
    return (level / LEVEL_DENOM) * 1.8 + 0.1


def enhance_increasing_arg(level: float, negate: bool) -> float:
    """Enhancement factor 1 -/+ 0.9 * level / 10, at least 0.1: further from 1 as the level rises."""
    return max(0.1, 1.0 + _signed((level / LEVEL_DENOM) * 0.9, negate))


def shear_arg(level: float, negate: bool) -> float:
    """Shear factor in [-0.3, 0.3]."""
    return _signed((level / LEVEL_DENOM) * 0.3, negate)


def translate_rel_arg(level: float, negate: bool) -> float:
    """Fraction of the side in [-0.45, 0.45]."""
    return _signed((level / LEVEL_DENOM) * TRANSLATE_PCT, negate)


def posterize_arg(level: float, negate: bool) -> int:
    """Bits kept in [0, 4]: fewer bits (a stronger change) at lower levels."""
    return int((level / LEVEL_DENOM) * 4)


def posterize_increasing_arg(level: float, negate: bool) -> int:
    """Bits kept in [4, 0]: fewer bits at higher levels."""
    return 4 - posterize_arg(level, negate)


def solarize_arg(level: float, negate: bool) -> int:
    """Threshold in [0, 256]: a stronger change at lower levels."""
    return min(256, int((level / LEVEL_DENOM) * 256))


def solarize_increasing_arg(level: float, negate: bool) -> int:
    """Threshold in [256, 0]: a stronger change at higher levels."""
    return 256 - solarize_arg(level, negate)


def solarize_add_arg(level: float, negate: bool) -> int:
    """Amount added in [0, 110]."""
    return min(128, int((level / LEVEL_DENOM) * 110))


@dataclasses.dataclass(frozen=True)
class Op:
    """One RandAugment op: its PIL function and how a magnitude becomes its argument.

    `fn(img, arg)` (or `fn(img)` when `level_to_arg` is None), with `fill` and
    `resample` as well when `geometric`. `signed`: the argument's sign is drawn
    at random (timm `_randomly_negate`).
    """

    fn: Callable[..., Image.Image]
    level_to_arg: Callable[[float, bool], Any] | None = None
    signed: bool = False
    geometric: bool = False


OPS: dict[str, Op] = {
    "AutoContrast": Op(auto_contrast),
    "Equalize": Op(equalize),
    "Invert": Op(invert),
    "Rotate": Op(rotate, rotate_arg, signed=True, geometric=True),
    "Posterize": Op(posterize, posterize_arg),
    "PosterizeIncreasing": Op(posterize, posterize_increasing_arg),
    "Solarize": Op(solarize, solarize_arg),
    "SolarizeIncreasing": Op(solarize, solarize_increasing_arg),
    "SolarizeAdd": Op(solarize_add, solarize_add_arg),
    "Color": Op(color, enhance_arg),
    "ColorIncreasing": Op(color, enhance_increasing_arg, signed=True),
    "Contrast": Op(contrast, enhance_arg),
    "ContrastIncreasing": Op(contrast, enhance_increasing_arg, signed=True),
    "Brightness": Op(brightness, enhance_arg),
    "BrightnessIncreasing": Op(brightness, enhance_increasing_arg, signed=True),
    "Sharpness": Op(sharpness, enhance_arg),
    "SharpnessIncreasing": Op(sharpness, enhance_increasing_arg, signed=True),
    "ShearX": Op(shear_x, shear_arg, signed=True, geometric=True),
    "ShearY": Op(shear_y, shear_arg, signed=True, geometric=True),
    "TranslateXRel": Op(translate_x_rel, translate_rel_arg, signed=True, geometric=True),
    "TranslateYRel": Op(translate_y_rel, translate_rel_arg, signed=True, geometric=True),
}

# timm `_RAND_TRANSFORMS` and `_RAND_INCREASING_TRANSFORMS` (same order: choices index them).
RAND_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel",
)  # fmt: skip
RAND_INCREASING_TRANSFORMS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)  # fmt: skip

# ------------------------------------------------------------------ the spec string


@dataclasses.dataclass(frozen=True)
class RandAugmentSpec:
    """A parsed timm RandAugment string (defaults as timm's)."""

    magnitude: int = 10  # m
    num_layers: int = 2  # n
    magnitude_std: float = 0.0  # mstd; inf = uniform in [0, m]
    magnitude_max: int = 10  # mmax
    increasing: bool = False  # inc
    prob: float = 0.5  # p

    @property
    def op_names(self) -> tuple[str, ...]:
        """The ops to choose from, in timm's order."""
        return RAND_INCREASING_TRANSFORMS if self.increasing else RAND_TRANSFORMS


_SECTION = re.compile(r"([a-z]+)(\d[\d.]*|inf)")
_FIELDS = {"m": "magnitude", "n": "num_layers", "mstd": "magnitude_std", "mmax": "magnitude_max",
           "inc": "increasing", "p": "prob"}  # fmt: skip


def _error(spec: str, problem: str) -> ConfigError:
    return ConfigError(
        f"{KEY}={spec!r}: {problem}; set --{KEY} to a timm RandAugment string such as "
        f"{EXAMPLE!r} (keys m, n, mstd, mmax, inc, p), or '' for off."
    )


def parse(spec: str) -> RandAugmentSpec:
    """The `RandAugmentSpec` of a timm string such as "rand-m9-mstd0.5-inc1"; ConfigError if malformed."""
    first, *sections = spec.split("-")
    if first != "rand":
        raise _error(spec, f"it must start with 'rand', not {first!r}")
    values: dict[str, Any] = {}
    for section in sections:
        if section.startswith("w"):
            raise _error(
                spec, f"{section!r}: timm 1.0 removed the weight index 'w', so jaxres refuses it"
            )
        if section.startswith("t"):
            raise _error(spec, f"{section!r}: transform sets ('t...') are not supported")
        match = _SECTION.fullmatch(section)
        if match is None or match.group(1) not in _FIELDS:
            raise _error(spec, f"unknown section {section!r}")
        key, text = match.groups()
        if key in values:
            raise _error(spec, f"{key!r} is given twice")
        real = key in ("mstd", "p")
        try:
            values[key] = float(text) if real else int(text)
        except ValueError:
            raise _error(
                spec, f"{section!r}: {key} takes {'a number' if real else 'an integer'}"
            ) from None
    if values.get("inc", 0) not in (0, 1):
        raise _error(spec, "inc must be 0 or 1")
    if not 0 <= values.get("p", 0.5) <= 1:
        raise _error(spec, "p must be in [0, 1]")
    if values.get("mstd", 0) > 100:  # timm: uniform sampling for mstd > 100.
        values["mstd"] = math.inf
    if values.get("mmax") == 0:  # timm: `magnitude_max or 10`.
        del values["mmax"]
    if "inc" in values:
        values["inc"] = bool(values["inc"])
    return RandAugmentSpec(**{_FIELDS[k]: v for k, v in values.items()})


# ------------------------------------------------------------------ the transform


def sample_magnitude(spec: RandAugmentSpec, rng: np.random.Generator) -> float:
    """One op's magnitude: m, or N(m, mstd), or U(0, m) for mstd inf; clipped to [0, mmax] (timm AugmentOp)."""
    magnitude = float(spec.magnitude)
    if spec.magnitude_std == math.inf:
        magnitude = rng.uniform(0, magnitude)
    elif spec.magnitude_std > 0:
        magnitude = rng.normal(magnitude, spec.magnitude_std)
    return max(0.0, min(float(magnitude), float(spec.magnitude_max)))


class RandAugment:
    """timm's RandAugment on uint8 HxWx3 arrays, every draw from the caller's rng (picklable)."""

    def __init__(self, spec: RandAugmentSpec | str, fill: Fill = IMAGENET_FILL):
        self.spec = parse(spec) if isinstance(spec, str) else spec
        self.fill = tuple(fill)

    def __call__(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The augmented copy of `image` (or `image` itself when every chosen op is skipped)."""
        spec, names = self.spec, self.spec.op_names
        # timm: np.random.choice(ops, n) (uniform, with replacement), before any op runs.
        chosen = rng.integers(0, len(names), size=spec.num_layers)
        img = None
        for index in chosen:
            if spec.prob < 1.0 and rng.random() > spec.prob:
                continue
            # Drawn for every applied op, as timm does, so draws line up with timm's one for one.
            magnitude = sample_magnitude(spec, rng)
            img = self.apply(
                OPS[names[index]], Image.fromarray(image) if img is None else img, magnitude, rng
            )
        # np.array, not asarray: PIL's buffer is read-only and callers may write in place.
        return image if img is None else np.array(img)

    def apply(
        self, op: Op, img: Image.Image, magnitude: float, rng: np.random.Generator
    ) -> Image.Image:
        """`op` at `magnitude` on `img`, its sign and resampling drawn from `rng` when it has them."""
        if op.level_to_arg is None:
            return op.fn(img)
        arg = op.level_to_arg(magnitude, op.signed and rng.random() > 0.5)
        if not op.geometric:
            return op.fn(img, arg)
        resample = RANDOM_RESAMPLE[rng.integers(len(RANDOM_RESAMPLE))]
        return op.fn(img, arg, self.fill, resample)

    def __repr__(self) -> str:
        return f"RandAugment({self.spec}, fill={self.fill})"
