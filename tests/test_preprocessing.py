"""One run, every reader of its pixels: validation during training, evaluate (centre and
10-crop), predict, the feature pass, transfer.py, the probe export and the jax_export input
all see the same pixels, with every non-default preprocessing key set."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image
from test_evaluate import make_run, run_config

from jaxres import evaluate, evaluators, parallel, predict, runs
from jaxres.convert import exporter
from jaxres.data import loader, preprocessing, sources, transforms
from jaxres.transfer import features, folder

SIZE, EVAL_SIZE, CROP = 32, 24, 0.9
MEAN, STD = (100.0, 110.0, 120.0), (50.0, 60.0, 70.0)


def write_images(root: str, split: str, per_class: int = 3) -> None:
    """Images large enough that a DCT-reduced decode would cover the crop (so `decode_reduced`
    changes pixels), with smooth content (so any resampling difference shows)."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(("ant", "bee", "cat")):
        os.makedirs(os.path.join(root, split, name), exist_ok=True)
        for i in range(per_class):
            base = rng.integers(0, 256, (12, 14, 3)).astype(np.uint8)
            image = Image.fromarray(base).resize((230, 190), Image.Resampling.BICUBIC)
            image.save(os.path.join(root, split, name, f"{i}.jpg"), quality=90)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    data = str(tmp_path_factory.mktemp("prep_data"))
    for split in ("train", "val"):
        write_images(data, split)
    config = run_config(data)
    d = config.dataset
    d.image_size, d.eval_image_size, d.eval_crop_ratio = SIZE, EVAL_SIZE, CROP
    d.mean, d.std = MEAN, STD
    config.input.decode_reduced, config.input.truncated = False, "skip"
    config.eval_batch_size = 8
    return make_run(str(tmp_path_factory.mktemp("prep_runs") / "run"), config), data


class _Captured(Exception):
    pass


@pytest.fixture
def capture(monkeypatch):
    """Every `loader.device_eval_batches` call's (transform, decoder, image size), then stop."""
    seen = []

    def spy(source, transform, global_batch_size, mesh, *, decoder="cpu", image_size=0, **_):
        seen.append((transform, decoder, image_size))
        raise _Captured

    monkeypatch.setattr(loader, "device_eval_batches", spy)
    return seen


def expected(source, views: str) -> np.ndarray:
    """The pixels a run with these keys must be evaluated on, built from the transforms directly."""
    if views == "10crop":
        transform = transforms.TenCropTransform(EVAL_SIZE, CROP, decode_reduced=False, truncated="skip")
    else:
        transform = transforms.EvalTransform(EVAL_SIZE, CROP, decode_reduced=False, truncated="skip")
    return np.stack([transform(source[i])["image"] for i in range(len(source))])


def pixels(captured, source) -> np.ndarray:
    transform, decoder, _ = captured
    assert decoder == "cpu"
    return np.stack([transform(source[i])["image"] for i in range(len(source))])


def test_the_keys_change_pixels(run):
    """Else the test below would prove nothing: the reduced decode gives other pixels."""
    _, data = run
    source = sources.ImageFolderSource(os.path.join(data, "val"))
    reduced = transforms.EvalTransform(EVAL_SIZE, CROP, decode_reduced=True, truncated="skip")
    assert not np.array_equal(reduced(source[0])["image"], expected(source, "center")[0])


def test_every_reader_sees_the_same_pixels(run, capture):
    run_dir, data = run
    loaded = runs.load(run_dir)
    val = sources.ImageFolderSource(os.path.join(data, "val"))
    mesh = parallel.make_mesh()
    calls = {
        "validate": lambda: evaluators.validate({}, None, val, loaded.config, mesh),
        "evaluate": lambda: evaluate.evaluate_runs([run_dir]),
        "evaluate 10-crop": lambda: evaluate.evaluate_runs([run_dir], crops=10),
        "predict": lambda: predict.predict(run_dir, [os.path.join(data, "val")]),
        "features": lambda: features.FeatureExtractor(loaded).extract(val, 8),
        "transfer.py": lambda: folder.transfer_folder(os.path.join(data, "val"), run_dir, run_dir + "-t"),
    }
    for name, call in calls.items():
        with pytest.raises(_Captured):
            call()
        views = "10crop" if "10-crop" in name else "center"
        # Each transform applied to the same records (transfer.py reads its own split of them).
        np.testing.assert_array_equal(pixels(capture[-1], val), expected(val, views), err_msg=name)
    assert runs.ModelSpec.of(loaded).mean == MEAN and runs.ModelSpec.of(loaded).std == STD


def test_exports_describe_the_same_preprocessing(run, tmp_path):
    run_dir, _ = run
    loaded = runs.load(run_dir)
    prep = loaded.preprocessing
    meta = exporter.metadata(loaded, "jax_export", loaded.config.model.name)["preprocessing"]
    assert (meta["image_size"], meta["crop_ratio"], meta["mean_uint8"]) == (EVAL_SIZE, CROP, list(MEAN))
    # A run written from features (a probe export) reads back to the features' preprocessing.
    extractor = features.FeatureExtractor(loaded)
    config = run_config(str(tmp_path))  # Another dataset's keys, all defaults.
    preprocessing.write_into(extractor.preprocessing, config)
    assert preprocessing.of(config) == prep
    assert prep == preprocessing.Preprocessing(EVAL_SIZE, CROP, MEAN, STD, "bilinear", "cpu", False, "skip")
