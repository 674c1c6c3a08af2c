"""The DALI decoder option (extra [dali]), run on DALI's CPU decoders: same crops as the CPU path."""

import json
import logging

import numpy as np
import pytest

from configs import demo
from jaxres import parallel, train
from jaxres.data import dali, embedded, pipeline, transforms
from jaxres.errors import ConfigError
from tests.test_data import jpeg, record

pytest.importorskip("nvidia.dali")

SIZE = 32


def _records(n: int = 8) -> list[dict]:
    shapes = [(96, 64), (64, 96), (120, 120), (200, 48)]
    return [record(jpeg(i, size=shapes[i % 4], cell=16), key=f"img{i}", label=i) for i in range(n)]


def _train_pair(records: list[dict]) -> tuple[dict, list[dict]]:
    """(crop-spec batch from TrainCrops, CPU TrainTransform outputs), the same RNG per example."""
    specs = [dali.TrainCrops()(r, np.random.default_rng(i)) for i, r in enumerate(records)]
    cpu = [transforms.TrainTransform(SIZE)(r, np.random.default_rng(i)) for i, r in enumerate(records)]
    return dali.collate(specs), cpu


def test_train_crops_draw_the_cpu_transforms_boxes_and_flips():
    batch, cpu = _train_pair(_records())
    # The CPU fallback decodes the specs' windows with the CPU code: it must be the CPU transform, bit for bit.
    # (Training's IDCT, `input.train_dct`'s default: what the loader passes for training.)
    fallback = dali.DaliDecoder(SIZE, len(cpu), num_threads=1, dct="fast")._decode_on_cpu(batch)
    np.testing.assert_array_equal(fallback["image"], np.stack([c["image"] for c in cpu]))
    np.testing.assert_array_equal(fallback["label"], [c["label"] for c in cpu])
    assert 0 < batch["flip"].sum() < len(cpu)  # Both flip states are exercised.


def test_dali_decodes_the_same_crops_as_the_cpu_path():
    records = _records()
    batch, _ = _train_pair(records)
    out = dali.DaliDecoder(SIZE, len(records), num_threads=1)(batch)
    # DALI decodes at full size, so compare with the CPU path's full-size decode (DCT-reduced
    # decoding is a CPU-only speed-up that changes fine texture).
    full_size = transforms.TrainTransform(SIZE, decode_reduced=False)
    expected = np.stack([full_size(r, np.random.default_rng(i))["image"] for i, r in enumerate(records)])
    expected = expected.astype(int)
    assert out["image"].shape == expected.shape and out["image"].dtype == np.uint8
    per_image = np.abs(out["image"].astype(int) - expected).mean(axis=(1, 2, 3))
    # Another IDCT and resize filter: a few grey levels apart on smooth images ...
    assert per_image.max() < 6, per_image
    # ... while a wrong box or flip is tens of levels off.
    assert np.abs(out["image"][:, :, ::-1].astype(int) - expected).mean() > 15
    np.testing.assert_array_equal(out["mask"], 1)


def test_eval_crops_match_eval_transform():
    records = _records(4)
    batch = dali.collate([dali.EvalCrops()(r) for r in records])
    out = dali.DaliDecoder(SIZE, 4, num_threads=1)(batch)
    full_size = transforms.EvalTransform(SIZE, decode_reduced=False)
    expected = np.stack([full_size(r)["image"] for r in records]).astype(int)
    assert np.abs(out["image"].astype(int) - expected).mean(axis=(1, 2, 3)).max() < 6


def test_unreadable_and_damaged_images_are_masked_not_fatal(caplog):
    caplog.set_level(logging.WARNING)
    records = _records(4)
    records[1] = record(b"not an image", key="garbage.JPEG")
    good = jpeg(9, size=(96, 64))
    records[2] = record(good[:200] + bytes(len(good) - 200), key="damaged.JPEG")  # Header, then zeros.
    specs = [dali.TrainCrops()(r, np.random.default_rng(i)) for i, r in enumerate(records)]
    assert specs[1]["mask"] == 0 and "garbage.JPEG" in caplog.text
    decoder = dali.DaliDecoder(SIZE, 4, num_threads=1)
    out = decoder(dali.collate(specs))
    assert out["image"].shape == (4, SIZE, SIZE, 3)
    assert out["mask"][1] == 0 and out["mask"][0] == out["mask"][3] == 1
    cpu = transforms.TrainTransform(SIZE)(records[2], np.random.default_rng(2))
    assert out["mask"][2] == cpu["mask"]  # The damaged file gets the CPU decoder's verdict.
    # The pipeline survives the failed batch: the next one decodes on DALI as before.
    good, _ = _train_pair(_records(4))
    np.testing.assert_array_equal(decoder(good)["image"], dali.DaliDecoder(SIZE, 4, num_threads=1)(good)["image"])


def test_pipeline_batches_are_the_same_whatever_the_worker_count():
    source = _records(24)

    def first_batches(workers):
        batches = pipeline.train_batches(
            source, dali.TrainCrops(), global_batch_size=8, seed=3, num_workers=workers, batch_fn=dali.collate
        )
        return [next(batches) for _ in range(2)]

    for a, b in zip(first_batches(0), first_batches(2)):
        np.testing.assert_array_equal(a["window"], b["window"])
        np.testing.assert_array_equal(a["flip"], b["flip"])
        assert [x.tobytes() for x in a["jpeg"]] == [x.tobytes() for x in b["jpeg"]]


def test_training_with_the_dali_decoder(tmp_path):
    data_dir = tmp_path / "digits"
    embedded.write_digits(data_dir)
    config = demo.get_config("smoke")
    config.dataset.data_dir = str(data_dir)
    config.input.decoder = "dali"
    config.input.num_workers = 0
    config.num_epochs = 1
    state = train.train_and_evaluate(config, str(tmp_path / "run"))
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    evals = [r for r in rows if "val_top1" in r]
    assert evals and evals[-1]["val_count"] == config.dataset.val_limit
    assert np.isfinite(evals[-1]["val_loss"]) and int(state.step) == 256 // config.batch_size
    assert all(r["skipped"] == 0 for r in rows if "skipped" in r)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"input.decoder": "nvjpeg"}, "Unknown config.input.decoder 'nvjpeg'"),
        ({"input.decoder": "dali", "augment.color_jitter": 0.4}, "color_jitter runs only on the CPU decoder"),
    ],
)
def test_decoder_config_errors(overrides, message):
    config = demo.get_config("smoke")
    for key, value in overrides.items():
        section, name = key.split(".")
        config[section][name] = value
    with pytest.raises(ConfigError, match=message):
        train.check_config(config, parallel.make_mesh())
