"""prepare_data: miniature archives in the real formats -> array_record / tfds, read back."""

import io
import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from PIL import Image

from jaxres.data import decode, sources, splits, statistics, transforms
from jaxres.data.prepare import recipes
from jaxres.errors import DataError

REPO = Path(__file__).resolve().parents[1]


def image_bytes(seed: int, size=(48, 36), mode="RGB", fmt="JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 255, (size[1] // 4, size[0] // 4, 3), dtype=np.uint8)
    image = Image.fromarray(array).resize(size, Image.Resampling.BILINEAR)
    image = image.convert(mode) if mode != "RGB" else image
    out = io.BytesIO()
    image.save(out, fmt, quality=90)
    return out.getvalue()


def write_tar(path: Path, members: dict, mode: str = "w") -> Path:
    with tarfile.open(path, mode) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def caltech101_members() -> dict:
    m = {}
    for c, cls in enumerate(["BACKGROUND_Google", "Faces", "accordion"]):
        for i in range(3):
            m[f"101_ObjectCategories/{cls}/image_{i + 1:04d}.jpg"] = image_bytes(10 * c + i)
    m["101_ObjectCategories/Faces/image_0004.jpg"] = image_bytes(40, mode="L")  # Grayscale.
    m["101_ObjectCategories/Faces/image_0005.jpg"] = image_bytes(41, mode="CMYK")
    m["101_ObjectCategories/accordion/image_0004.jpg"] = image_bytes(
        42, fmt="PNG"
    )  # PNG named .jpg.
    m["101_ObjectCategories/accordion/image_0005.jpg"] = b""  # Zero bytes.
    return m


def read_all(source) -> list:
    return [source[i] for i in range(len(source))]


def test_caltech101_archive_zip_and_folder_agree(tmp_path, caplog):
    members = caltech101_members()
    (tmp_path / "a").mkdir()
    write_tar(tmp_path / "a" / "101_ObjectCategories.tar.gz", members, "w:gz")
    out = recipes.prepare_caltech101(tmp_path / "a", tmp_path / "out_a")
    meta = json.loads((out / sources.RECORDS_METADATA).read_text())
    assert meta["class_names"] == ["Faces", "accordion"]  # BACKGROUND_Google dropped.
    assert meta["splits"]["all"]["skipped"] == [
        {"key": "accordion/image_0005.jpg", "reason": "0-byte file"}
    ]
    assert "accordion/image_0005.jpg" in caplog.text
    src = sources.ArrayRecordSource(out, "all")
    records = read_all(src)
    assert [r["key"] for r in records][:3] == [
        "Faces/image_0001.jpg",
        "Faces/image_0002.jpg",
        "Faces/image_0003.jpg",
    ]
    assert list(src.labels) == [r["label"] for r in records] == [0] * 5 + [1] * 4
    assert meta["splits"]["all"]["class_counts"] == [5, 4]
    for r in records:  # Every stored image is a JPEG that decodes to RGB.
        assert r["image"][:2] == b"\xff\xd8" and decode.decode(r["image"]).mode == "RGB"
    # The same images from caltech-101.zip (tar.gz inside) and from an extracted folder.
    (tmp_path / "b").mkdir()
    with zipfile.ZipFile(tmp_path / "b" / "caltech-101.zip", "w") as zf:
        zf.write(
            tmp_path / "a" / "101_ObjectCategories.tar.gz",
            "caltech-101/101_ObjectCategories.tar.gz",
        )
    for name, data in members.items():
        (tmp_path / "c" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "c" / name).write_bytes(data)
    for manual in ("b", "c"):
        other = read_all(
            sources.ArrayRecordSource(
                recipes.prepare_caltech101(tmp_path / manual, tmp_path / f"out_{manual}"), "all"
            )
        )
        assert other == records


def test_prepare_is_idempotent_and_open_source_finds_it(tmp_path):
    (tmp_path / "m").mkdir()
    write_tar(tmp_path / "m" / "101_ObjectCategories.tar.gz", caltech101_members(), "w:gz")
    out = recipes.prepare_caltech101(tmp_path / "m")
    stamp = (out / sources.RECORDS_METADATA).stat().st_mtime_ns
    recipes.prepare_caltech101(tmp_path / "m")
    assert (out / sources.RECORDS_METADATA).stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match="--overwrite"):
        recipes.prepare_caltech101(tmp_path / "m", resize_shorter=20)
    dataset = ml_collections.ConfigDict(
        {"name": "caltech101", "data_dir": str(tmp_path / "m"), "train_split": "all"}
    )
    source = sources.open_source(dataset, "all")
    assert isinstance(source, sources.ArrayRecordSource) and len(source) == 9
    with pytest.raises(DataError, match="no split 'train'"):
        sources.open_source(dataset, "train")


def test_missing_archive_names_expected_files(tmp_path):
    with pytest.raises(DataError, match="101_ObjectCategories.tar.gz, caltech-101.zip"):
        recipes.prepare_caltech101(tmp_path)
    with pytest.raises(DataError, match="ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar"):
        recipes.prepare_imagenet2012(tmp_path, tmp_path / "tfds")
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "prepare_data.py"),
            "--dataset=caltech256",
            f"--manual_dir={tmp_path}",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "jaxres error" in result.stderr and "256_ObjectCategories.tar" in result.stderr


def test_caltech256_clutter_dropped_by_default(tmp_path):
    members = {}
    for c, cls in enumerate(["001.ak47", "002.american-flag", "257.clutter"]):
        for i in range(2):
            members[f"256_ObjectCategories/{cls}/{c + 1:03d}_{i + 1:04d}.jpg"] = image_bytes(
                c * 5 + i
            )
    members["256_ObjectCategories/198.spider/RENAME2"] = b"not an image"
    write_tar(tmp_path / "256_ObjectCategories.tar", members)
    out = recipes.prepare_caltech256(tmp_path, tmp_path / "default")
    assert sources.ArrayRecordSource(out, "all").class_names == ["001.ak47", "002.american-flag"]
    out = recipes.prepare_caltech256(tmp_path, tmp_path / "kept", keep_clutter=True)
    source = sources.ArrayRecordSource(out, "all")
    assert source.class_names[-1] == "257.clutter" and list(source.labels) == [0, 0, 1, 1, 2, 2]


def test_indoor67_official_lists(tmp_path):
    members, train, test = {}, [], []
    for c, cls in enumerate(["airport_inside", "bakery"]):
        for i in range(5):
            key = f"{cls}/{cls}_{i:04d}.jpg"
            members[f"Images/{key}"] = image_bytes(c * 10 + i)
            (test if i == 0 else train).append(key)
    write_tar(tmp_path / "indoorCVPR_09.tar", members)
    with pytest.raises(DataError, match="TrainImages.txt"):
        recipes.prepare_indoor67(tmp_path)
    (tmp_path / "TrainImages.txt").write_text("\n".join(train) + "\n")
    (tmp_path / "TestImages.txt").write_text("\n".join(test) + "\n")
    out = recipes.prepare_indoor67(tmp_path)
    train_src, test_src = (
        sources.ArrayRecordSource(out, "train"),
        sources.ArrayRecordSource(out, "test"),
    )
    assert sorted(r["key"] for r in read_all(train_src)) == sorted(train)
    assert [r["key"] for r in read_all(test_src)] == test and list(test_src.labels) == [0, 1]


def make_image_folder(root: Path, per_class=(6, 4)) -> Path:
    for c, n in enumerate(per_class):
        (root / f"class{c}").mkdir(parents=True)
        for i in range(n):
            (root / f"class{c}" / f"{i}.jpg").write_bytes(image_bytes(100 * c + i))
    return root


def test_imagefolder_stratified_split_and_lists(tmp_path):
    root = make_image_folder(tmp_path / "photos")
    out = recipes.prepare_imagefolder(root, tmp_path / "data", "mine", val_fraction=0.5, seed=3)
    val = sources.ArrayRecordSource(out, "val")
    assert np.bincount(val.labels).tolist() == [3, 2]  # Half of every class.
    assert len(sources.ArrayRecordSource(out, "train")) == 5
    with pytest.raises(DataError, match="not a prepared dataset"):  # Would replace the images.
        recipes.prepare_imagefolder(root, tmp_path, "photos")
    assert len(sources.ImageFolderSource(root)) == 10
    written = splits.write_split_lists(root, 0.5, seed=3)
    assert sorted(written) == ["train", "val"]
    # The list files give the same split as the records, and open_source reads them.
    dataset = ml_collections.ConfigDict(
        {"name": "imagefolder", "data_dir": str(root), "train_split": "train"}
    )
    listed = sources.open_source(dataset, "val")
    assert isinstance(listed, sources.ListFileSource)
    assert [r["key"] for r in read_all(listed)] == [r["key"] for r in read_all(val)]
    val_text = written["val"].read_text()
    assert splits.write_split_lists(root, 0.5, seed=3)["val"].read_text() == val_text
    assert splits.write_split_lists(root, 0.5, seed=4)["val"].read_text() != val_text


# ------------------------------------------------------------------ ImageNet through the real tfds builder

SYNSETS = ("n01440764", "n01443537")  # The first two ImageNet classes.


def make_imagenet_tars(manual_dir: Path) -> None:
    manual_dir.mkdir(parents=True, exist_ok=True)
    inner = {}
    for s, synset in enumerate(SYNSETS):
        files = {f"{synset}_{i}.JPEG": image_bytes(s * 10 + i, size=(80, 60)) for i in range(3)}
        if s == 0:
            files[f"{synset}_3.JPEG"] = image_bytes(7, size=(80, 60), mode="CMYK")
            files[f"{synset}_4.JPEG"] = image_bytes(8, size=(80, 60), fmt="PNG")
        inner[f"{synset}.tar"] = write_tar(manual_dir / f"{synset}.tar", files).read_bytes()
        (manual_dir / f"{synset}.tar").unlink()
    write_tar(manual_dir / "ILSVRC2012_img_train.tar", inner)
    val = {
        f"ILSVRC2012_val_{i:08d}.JPEG": image_bytes(
            50 + i, size=(80, 60), mode="L" if i == 2 else "RGB"
        )
        for i in range(1, 5)
    }
    write_tar(manual_dir / "ILSVRC2012_img_val.tar", val)


def test_imagenet2012_through_tfds_builder(tmp_path):
    pytest.importorskip(
        "tensorflow", reason="preparing imagenet2012 needs the [prepare] extra (tensorflow-cpu)"
    )
    make_imagenet_tars(tmp_path / "manual")
    data_dir = tmp_path / "tfds"
    out = recipes.prepare_imagenet2012(
        tmp_path / "manual", data_dir, resize_shorter=40, jpeg_quality=90
    )
    train = sources.TfdsSource("imagenet2012", "train", str(data_dir))
    assert (
        len(train) == 8
        and len(train.class_names) == 1000
        and train.class_names[:2] == list(SYNSETS)
    )
    by_key = {r["key"]: r for r in read_all(train)}
    assert by_key["n01443537_1.JPEG"]["label"] == 1 and by_key["n01440764_3.JPEG"]["label"] == 0
    assert sorted(train.labels.tolist()) == [0] * 5 + [1] * 3
    for r in by_key.values():  # CMYK and PNG arrive as JPEGs that decode to RGB.
        out_example = transforms.TrainTransform(32)(r, np.random.default_rng(0))
        assert out_example["mask"] == 1 and out_example["image"].shape == (32, 32, 3)
    validation = sources.TfdsSource("imagenet2012", "validation", str(data_dir))
    # tfds labels validation images by sorted file order: the first 4 official labels.
    expected = ["n01751748", "n09193705", "n02105855", "n04263257"]
    got = {r["key"]: validation.class_names[r["label"]] for r in read_all(validation)}
    assert [got[f"ILSVRC2012_val_{i:08d}.JPEG"] for i in range(1, 5)] == expected
    # The resized copy: same records, shorter side 40, readable through open_source.
    dataset = ml_collections.ConfigDict(
        {"name": out.name, "data_dir": str(data_dir), "train_split": "train"}
    )
    resized = sources.open_source(dataset, "train")
    assert (
        isinstance(resized, sources.ArrayRecordSource) and resized.class_names == train.class_names
    )
    assert sorted(resized.labels.tolist()) == sorted(train.labels.tolist())
    assert all(min(decode.decode(r["image"]).size) == 40 for r in read_all(resized))
    recipes.prepare_imagenet2012(
        tmp_path / "manual", data_dir, resize_shorter=40, jpeg_quality=90
    )  # Idempotent.


def test_dataset_statistics_of_solid_colours(tmp_path):
    for c, colour in enumerate([(200, 40, 40), (40, 40, 200)]):
        (tmp_path / f"c{c}").mkdir()
        for i in range(2 + c):
            out = io.BytesIO()
            Image.new("RGB", (32, 24), colour).save(out, "JPEG", quality=95)
            (tmp_path / f"c{c}" / f"{i}.jpg").write_bytes(out.getvalue())
    stats = statistics.dataset_statistics(sources.ImageFolderSource(tmp_path), max_images=0)
    assert stats["class_counts"] == {"c0": 2, "c1": 3} and stats["images_used"] == 5
    # 2 red and 3 blue images: mean (2 * 200 + 3 * 40) / 5 = 104 red, std sqrt(0.24) * 160 = 78.4.
    np.testing.assert_allclose(stats["mean"], [104, 40, 136], atol=2)
    np.testing.assert_allclose(stats["std"], [78.4, 0, 78.4], atol=2)
    sample = statistics.dataset_statistics(
        sources.ImageFolderSource(tmp_path), max_images=2, seed=1
    )
    assert sample["images_used"] == 2
