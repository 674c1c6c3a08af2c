"""Transforms (decoding, reduced-size decode, 10-crop, jitter, corrupt files) and grain pipelines."""

import io
import logging

import numpy as np
import pytest
from PIL import Image, ImageFile

from jaxres.data import decode, pipeline, sources, transforms
from jaxres.data.prepare import records

N_EXAMPLES = 20


def jpeg(seed: int, size=(64, 48), mode="RGB", fmt="JPEG", quality=90, cell=8) -> bytes:
    """A smooth random image: noise on a grid of `cell`-pixel cells, bicubic-upsampled."""
    rng = np.random.default_rng(seed)
    small = rng.integers(
        0, 255, (max(1, size[1] // cell), max(1, size[0] // cell), 3), dtype=np.uint8
    )
    image = Image.fromarray(small).resize(size, Image.Resampling.BICUBIC)
    image = image.convert(mode) if mode != "RGB" else image
    out = io.BytesIO()
    image.save(out, fmt, quality=quality)
    return out.getvalue()


def record(data: bytes, key: str = "k", label: int = 3) -> dict:
    return {"image": data, "label": label, "key": key}


@pytest.fixture(scope="module")
def record_source(tmp_path_factory):
    """An ArrayRecordSource of N_EXAMPLES JPEGs whose label is their index."""
    entries = [(f"{i:02d}/img.jpg", i, (lambda i=i: jpeg(i))) for i in range(N_EXAMPLES)]
    directory = tmp_path_factory.mktemp("records") / "tiny"
    records.write_record_dataset(
        directory,
        {"train": records.RecordList(entries)},
        [f"{i:02d}" for i in range(N_EXAMPLES)],
        source="test",
    )
    return sources.ArrayRecordSource(directory, "train")


# ------------------------------------------------------------------ transforms


@pytest.mark.parametrize(
    "data",
    [
        jpeg(1),
        jpeg(2, mode="L"),
        jpeg(3, mode="CMYK"),
        jpeg(4, fmt="PNG"),
        jpeg(5, fmt="GIF"),
        jpeg(6, size=(30, 200)),
    ],
    ids=["rgb", "grey", "cmyk", "png_named_jpeg", "gif", "tall"],
)
@pytest.mark.parametrize("backend", ["fast", "pil_only"])
def test_transforms_decode_every_kind(data, backend, monkeypatch):
    if backend == "pil_only":  # No TurboJPEG, simplejpeg or OpenCV: PIL does everything.
        monkeypatch.setattr(decode.jpeg_crop, "available", lambda: False)
        monkeypatch.setattr(decode, "simplejpeg", None)
        monkeypatch.setattr(transforms, "cv2", None)
    rng = np.random.default_rng(0)
    for transform, shape in [
        (lambda r: transforms.TrainTransform(32, color_jitter=0.4)(r, rng), (32, 32, 3)),
        (transforms.EvalTransform(32), (32, 32, 3)),
        (transforms.TenCropTransform(32), (10, 32, 32, 3)),
    ]:
        out = transform(record(data))
        assert out["image"].shape == shape and out["image"].dtype == np.uint8
        assert out["mask"] == 1 and out["label"] == 3 and out["image"].max() > 0


def test_cmyk_decodes_to_the_right_colours():
    red = Image.new("RGB", (64, 48), (200, 30, 30))
    out = io.BytesIO()
    red.convert("CMYK").save(out, "JPEG", quality=95)
    image = transforms.EvalTransform(32)(record(out.getvalue()))["image"]
    assert np.abs(image.reshape(-1, 3).mean(0) - (200, 30, 30)).max() < 8


@pytest.mark.parametrize(
    "data", [b"", b"garbage, not an image" * 10, b"\xff\xd8\xff\xe0" + b"\x00" * 50]
)
def test_undecodable_records_are_masked_and_named(data, caplog):
    caplog.set_level(logging.WARNING)
    outs = [
        transforms.TrainTransform(32)(record(data, key="bad/file.JPEG"), np.random.default_rng(0)),
        transforms.EvalTransform(32)(record(data, key="bad/file.JPEG")),
        transforms.TenCropTransform(32)(record(data, key="bad/file.JPEG")),
    ]
    assert [o["mask"] for o in outs] == [0, 0, 0]
    assert outs[2]["image"].shape == (10, 32, 32, 3)
    assert caplog.text.count("bad/file.JPEG") == 3


def test_truncated_jpeg_decodes_what_is_there(caplog):
    caplog.set_level(logging.WARNING)
    data = jpeg(7, size=(128, 96))
    out = transforms.EvalTransform(32)(record(data[: len(data) * 2 // 3], key="cut.JPEG"))
    assert out["mask"] == 1 and "cut.JPEG" in caplog.text
    full = transforms.EvalTransform(32)(record(data))["image"]
    assert (
        np.abs(out["image"][:8].astype(int) - full[:8]).mean() < 3
    )  # The top rows came from the data.
    assert np.abs(out["image"][-8:].astype(int) - full[-8:]).mean() > 10  # The rest is fill.
    assert not ImageFile.LOAD_TRUNCATED_IMAGES  # The lenient flag was scoped.


def test_dct_scale_keeps_crop_at_least_output_size():
    assert decode.dct_scale((0, 0, 1000, 900), (224, 224)) == 4
    assert decode.dct_scale((0, 0, 447, 900), (224, 224)) == 1
    assert decode.dct_scale((0, 0, 2000, 2000), (224, 224)) == 8
    assert decode.dct_scale((0, 0, 2000, 2000), (224, 224), reduced=False) == 1


@pytest.mark.parametrize("path", ["window", "whole", "pil"])
def test_reduced_decode_matches_full_decode(path, monkeypatch):
    if path == "window" and not decode.jpeg_crop.available():
        pytest.skip("no TurboJPEG 3 library (pip install turbojpeg)")
    if path != "window":
        monkeypatch.setattr(decode.jpeg_crop, "available", lambda: False)
    if path == "pil":
        monkeypatch.setattr(decode, "simplejpeg", None)
    data = jpeg(8, size=(1024, 768), cell=64)
    box_fn = lambda w, h: transforms.center_crop_box(w, h, 0.875)
    array, box = decode.decode_for_crop(data, box_fn, lambda box: (64, 64))
    # 1/8 scale: the 672-pixel crop is still >= 64 pixels (84) at that scale.
    expected = {"window": (84, 84), "whole": (96, 128), "pil": (96, 128)}[path]
    assert array.shape[:2] == expected and 64 <= box[2] < 85 and 64 <= box[3] < 85
    reduced = transforms.EvalTransform(64)(record(data))["image"].astype(int)
    full = transforms.EvalTransform(64, decode_reduced=False)(record(data))["image"].astype(int)
    assert np.abs(reduced - full).mean() < 3


def test_window_decode_equals_crop_of_whole_decode():
    if not decode.jpeg_crop.available():
        pytest.skip("no TurboJPEG 3 library (pip install turbojpeg)")
    data = jpeg(12, size=(500, 375))
    found = decode.jpeg_crop.header(data)
    assert found[:2] == (500, 375)
    window, box = decode.jpeg_crop.decode_crop(
        data, found[:2], found[2], (37.0, 21.0, 300.0, 250.0)
    )
    whole = decode.jpeg_crop.decode_crop(data, found[:2], found[2], (0.0, 0.0, 500.0, 375.0))[0]
    x, y = int(37 - box[0]), int(21 - box[1])
    same = whole[y : y + window.shape[0], x : x + window.shape[1]]
    # Chroma upsampling treats the window's first / last columns as an image edge.
    np.testing.assert_array_equal(window[:, 1:-1], same[:, 1:-1])
    assert x % found[2] == 0 and box[2:] == (300.0, 250.0)


def test_eval_transform_equals_resize_then_center_crop():
    data = jpeg(9, size=(200, 150), cell=40)
    ours = transforms.EvalTransform(64)(record(data))["image"].astype(int)
    # Reference: the whole image resized to shorter side 73 (64 / 0.875), its central 64x64.
    image = decode.decode(data)
    image = image.resize(transforms.shorter_side_size(*image.size, 73), Image.Resampling.BILINEAR)
    left, top = (image.width - 64) // 2, (image.height - 64) // 2
    image = image.crop((left, top, left + 64, top + 64))
    assert np.abs(ours - np.asarray(image, int)).mean() < 4


def test_ten_crop_layout():
    data = jpeg(10, size=(120, 90), cell=30)
    crops = transforms.TenCropTransform(64)(record(data))["image"]
    for i in range(5):
        np.testing.assert_array_equal(crops[5 + i], crops[i][:, ::-1])
    centre = transforms.EvalTransform(64)(record(data))["image"].astype(int)
    assert np.abs(crops[4].astype(int) - centre).mean() < 4
    assert not np.array_equal(crops[0], crops[3])


def test_train_transform_is_deterministic_per_rng_and_jitter_changes_colours():
    data = jpeg(11, size=(120, 90))
    a = transforms.TrainTransform(32, color_jitter=0.4)(record(data), np.random.default_rng(5))[
        "image"
    ]
    b = transforms.TrainTransform(32, color_jitter=0.4)(record(data), np.random.default_rng(5))[
        "image"
    ]
    plain = transforms.TrainTransform(32)(record(data), np.random.default_rng(5))["image"]
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, plain)
    image = plain.copy()
    np.testing.assert_array_equal(
        transforms.color_jitter(image, 0.0, np.random.default_rng(0)), plain
    )


# ------------------------------------------------------------------ pipelines


def take(iterator, n):
    return [next(iterator) for _ in range(n)]


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for key in ("image", "label", "mask"):
            np.testing.assert_array_equal(x[key], y[key])


def train(source, **kw):
    transform = transforms.TrainTransform(32, color_jitter=0.2)
    return pipeline.train_batches(source, transform, global_batch_size=8, seed=1, **kw)


def test_same_batches_whatever_the_number_of_workers(record_source):
    in_process = take(train(record_source), 6)
    assert_same_batches(take(train(record_source, num_workers=2), 6), in_process)
    # An epoch (20 examples) spans 2.5 batches: each epoch is a new permutation of every label.
    labels = np.concatenate([b["label"] for b in in_process])
    assert sorted(labels[:20]) == list(range(20)) and sorted(labels[20:40]) == list(range(20))
    assert not np.array_equal(labels[:20], labels[20:40])


def test_resume_mid_epoch_gives_the_same_sequence(record_source):
    full = take(train(record_source), 7)
    assert_same_batches(take(train(record_source, start=3), 4), full[3:])


def test_process_slices_concatenate_to_the_global_batch(record_source):
    full = take(train(record_source), 3)
    parts = [take(train(record_source, process_index=p, process_count=2), 3) for p in range(2)]
    for b, (p0, p1) in enumerate(zip(*parts)):
        for key in ("image", "label"):
            np.testing.assert_array_equal(np.concatenate([p0[key], p1[key]]), full[b][key])


def test_repeated_augmentation_repeats_each_image_k_times(record_source):
    """RepeatAugSampler semantics: K copies in a row, each augmented differently; one pass over the
    shuffled records spans K epochs with every image exactly K times; processes get disjoint rows."""
    k = 3  # 20 records -> one pass = 60 positions (7.5 global batches of 8).
    full = take(train(record_source, repeated_aug=k), 8)
    labels = np.concatenate([b["label"] for b in full])[:60]
    images = np.concatenate([b["image"] for b in full])[:60]
    assert np.bincount(labels, minlength=N_EXAMPLES).tolist() == [k] * N_EXAMPLES
    assert (labels.reshape(-1, k) == labels[::k, None]).all()  # K copies in a row.
    for copies in images.reshape(-1, k, *images.shape[1:])[:5]:  # Each copy its own augmentation.
        assert not np.array_equal(copies[0], copies[1]) and not np.array_equal(copies[1], copies[2])
    assert len(set(labels[:20].tolist())) < N_EXAMPLES  # An epoch (20 positions) holds ~20 / K images.
    # Two processes: disjoint halves of every global batch, together the whole stream.
    parts = [take(train(record_source, repeated_aug=k, process_index=p, process_count=2), 3) for p in range(2)]
    for b, (p0, p1) in enumerate(zip(*parts)):
        np.testing.assert_array_equal(np.concatenate([p0["image"], p1["image"]]), full[b]["image"])
    # Resumable like the plain stream.
    assert_same_batches(take(train(record_source, repeated_aug=k, start=4), 2), full[4:6])


@pytest.mark.parametrize("process_count", [1, 2])
def test_eval_covers_every_example_once(record_source, process_count):
    batch_size = 8  # 20 examples -> 3 global batches, 4 padded rows.
    n_batches = pipeline.num_eval_batches(len(record_source), batch_size)
    seen, padded = [], 0
    for p in range(process_count):
        batches = pipeline.eval_batches(
            record_source,
            transforms.EvalTransform(32),
            global_batch_size=batch_size,
            process_index=p,
            process_count=process_count,
        )
        for batch in take(batches, n_batches):
            assert batch["image"].shape == (batch_size // process_count, 32, 32, 3)
            seen += batch["label"][batch["mask"] == 1].tolist()
            padded += int((batch["mask"] == 0).sum())
    assert sorted(seen) == list(range(N_EXAMPLES)) and padded == n_batches * batch_size - N_EXAMPLES


def test_skipped_records_are_counted_in_batches(caplog):
    good = [record(jpeg(i), key=f"ok{i}") for i in range(6)]
    bad = [record(b"", key="broken/zero.JPEG"), record(b"\x00" * 30, key="broken/garbage.JPEG")]
    batches = take(train(good + bad), 1)
    assert int((batches[0]["mask"] == 0).sum()) == 2
    assert "broken/zero.JPEG" in caplog.text and "broken/garbage.JPEG" in caplog.text


def test_list_file_source_and_labels(tmp_path):
    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(2):
            (tmp_path / c / f"{i}.jpg").write_bytes(jpeg(i))
    (tmp_path / "train.txt").write_text("a/0.jpg\nb/1.jpg\n")
    source = sources.ListFileSource(tmp_path, tmp_path / "train.txt")
    assert (
        source.class_names == ["a", "b"]
        and list(source.labels) == [0, 1]
        and source[1]["key"] == "b/1.jpg"
    )
    (tmp_path / "bad.txt").write_text("c/0.jpg\n")
    with pytest.raises(sources.DataError, match="class 'c'"):
        sources.ListFileSource(tmp_path, tmp_path / "bad.txt")
