"""Evaluation decodes JPEGs to PIL's pixels exactly (libjpeg's accurate IDCT, fancy chroma
upsampling), on every JPEG path: the crop window (`jpeg_crop`), the whole image (simplejpeg)
and DCT-scaled decoding (against `Image.draft`); the IDCT key reaches the feature-cache key,
and a run saved before the key existed still loads."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from jaxres import runs
from jaxres.config_base import base_config
from jaxres.data import decode, jpeg_crop, preprocessing, transforms
from jaxres.errors import ConfigError
from jaxres.transfer import features

# Odd sizes: partial iMCUs at the right and bottom edges.
WIDTH, HEIGHT = 203, 157
CHROMA = {"4:2:0": 2, "4:2:2": 1, "4:4:4": 0}  # PIL's `subsampling` values.
BOXES = [(0, 0, WIDTH, HEIGHT), (37.4, 21.2, 120, 100), (96, 50, 60, 80), (150.5, 117, 52, 40)]


def jpeg(chroma: str = "4:2:0", grey: bool = False) -> bytes:
    """A JPEG with smooth colour fields plus noise (strong chroma edges, as in photos)."""
    rng = np.random.default_rng(len(chroma) + grey)
    base = rng.integers(0, 256, (HEIGHT // 12 + 1, WIDTH // 12 + 1, 3), dtype=np.uint8)
    field = np.asarray(Image.fromarray(base).resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC))
    noisy = np.clip(field + rng.normal(0, 12, field.shape), 0, 255).astype(np.uint8)
    image = Image.fromarray(noisy)
    out = io.BytesIO()
    if grey:
        image.convert("L").save(out, "JPEG", quality=92)
    else:
        image.save(out, "JPEG", quality=92, subsampling=CHROMA[chroma])
    return out.getvalue()


JPEGS = {**{c: jpeg(c) for c in CHROMA}, "grey": jpeg(grey=True)}


def pil_pixels(data: bytes, scale: int = 1) -> np.ndarray:
    """What timm / torchvision see: `Image.open(...).convert("RGB")` (after `draft` at 1/scale)."""
    image = Image.open(io.BytesIO(data))
    if scale > 1:
        image.draft("RGB", (image.size[0] // scale, image.size[1] // scale))
        assert image.size == (math.ceil(WIDTH / scale), math.ceil(HEIGHT / scale))
    return np.asarray(image.convert("RGB"))


def decoded(
    data: bytes, path: str, box: decode.Box, scale: int, dct: str
) -> tuple[np.ndarray, tuple[int, int]]:
    """(pixels `decode_for_crop` decodes through `path` at 1/scale, their top-left corner)."""
    fn = {"window": decode._decode_window, "whole": decode._decode_whole}[path]
    out_size = (int(box[2] // scale), int(box[3] // scale))  # The crop covers it at 1/scale.
    array, (left, top, _, _) = fn(data, lambda w, h: box, lambda b: out_size, True, dct == "fast")
    x0, y0 = round(box[0] / scale - left), round(box[1] / scale - top)
    return array, (x0, y0)


@pytest.mark.parametrize("kind", list(JPEGS))
@pytest.mark.parametrize("path", ["window", "whole"])
def test_accurate_decoding_gives_pils_pixels(kind, path):
    data = JPEGS[kind]
    reference = pil_pixels(data)
    for box in BOXES if path == "window" else BOXES[:1]:
        array, (x0, y0) = decoded(data, path, box, 1, "accurate")
        expected = reference[y0 : y0 + array.shape[0], x0 : x0 + array.shape[1]]
        np.testing.assert_array_equal(array, expected, err_msg=f"{kind} {path} {box}")
        # The crop covers the box: what the resize reads is all PIL's.
        assert array.shape[1] >= box[2] and array.shape[0] >= box[3] - 1
        fast, _ = decoded(data, path, box, 1, "fast")
        assert np.abs(fast.astype(int) - expected).max() > 0  # Else this test proves nothing.


@pytest.mark.parametrize("kind", ["4:2:0", "4:4:4", "grey"])
@pytest.mark.parametrize("scale", [2, 4, 8])
@pytest.mark.parametrize("path", ["window", "whole"])
def test_dct_scaled_decoding_gives_pils_draft_pixels(kind, scale, path):
    data = JPEGS[kind]
    reference = pil_pixels(data, scale)
    box = BOXES[1] if path == "window" else BOXES[0]
    array, (x0, y0) = decoded(data, path, box, scale, "accurate")
    assert array.shape[0] < HEIGHT / scale + 1  # Really decoded at 1/scale.
    expected = reference[y0 : y0 + array.shape[0], x0 : x0 + array.shape[1]]
    np.testing.assert_array_equal(array, expected, err_msg=f"{kind} 1/{scale} {path}")


@pytest.mark.parametrize("kind", ["4:2:0", "4:2:2", "grey"])
@pytest.mark.parametrize("window", [True, False])
def test_eval_transforms_see_pils_pixels(kind, window, monkeypatch):
    """Centre crop and 10-crop output: PIL's decoded pixels through the same crop + resize."""
    if not window:  # The whole-image path (simplejpeg), as without TurboJPEG 3.
        monkeypatch.setattr(jpeg_crop, "available", lambda: False)
    record = {"image": JPEGS[kind], "label": 0, "key": kind}
    reference = pil_pixels(JPEGS[kind])
    centre = transforms.EvalTransform(64, 0.875, decode_reduced=False)
    box = transforms.center_crop_box(WIDTH, HEIGHT, 0.875)
    expected = transforms.crop_resize(reference, box, (64, 64))
    np.testing.assert_array_equal(centre(record)["image"], expected)
    fast = transforms.EvalTransform(64, 0.875, decode_reduced=False, dct="fast")
    assert not np.array_equal(fast(record)["image"], expected)
    ten = transforms.TenCropTransform(48, 0.875, decode_reduced=False)(record)["image"]
    resized = transforms.crop_resize(
        reference, (0, 0, WIDTH, HEIGHT), transforms.shorter_side_size(WIDTH, HEIGHT, 55)
    )
    np.testing.assert_array_equal(ten[0], resized[:48, :48])


def test_the_idct_is_part_of_the_preprocessing_and_the_cache_key():
    config = base_config()
    accurate = preprocessing.of(config)
    assert accurate.dct == "accurate" and accurate.description()["dct"] == "accurate"
    config.input.eval_dct = "fast"
    fast = preprocessing.of(config)
    key = lambda p: features.cache_key(dict(views="center", **p.description()))
    assert key(fast) != key(accurate)
    preprocessing.write_into(fast, written := base_config())
    assert preprocessing.of(written) == fast
    for bad in (
        lambda: fast.__class__(**dict(fast.description(), dct="islow")).views_transform(),
        lambda: transforms.TrainTransform(32, dct="slow"),
    ):
        with pytest.raises(ConfigError, match=r"accurate / fast"):
            bad()


def test_a_run_saved_before_the_key_evaluates_accurately(tmp_path):
    """Its config.json has no `input.eval_dct` / `train_dct`: the defaults apply (accurate)."""
    saved = json.loads(base_config().to_json_best_effort())
    for key in ("eval_dct", "train_dct"):
        saved["input"].pop(key)
    (tmp_path / runs.CONFIG_FILE).write_text(json.dumps(saved))
    config = runs.read_config(str(tmp_path))
    assert preprocessing.of(config).dct == "accurate"
    assert config.input.train_dct == base_config().input.train_dct
