"""Tests for jaxres.predict and scripts/predict.py: CSV / JSON output, undecodable files named
once and flagged, exit status 1 when nothing could be decoded, one-line errors.

The script runs in a subprocess with XLA_FLAGS="" (the CPU split the script chooses: 2 devices
on 2 cores); `predict.predict` in-process runs on the 8 fake devices of conftest.py, where a
one-file batch is padded with 7 copies of that file.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from test_evaluate import make_run, run_config, write_folder

from jaxres import predict
from jaxres.data import transforms
from jaxres.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ("ant", "bee", "cat")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(run, data root): val/<class>/*.jpg plus val/bee/garbage.jpg, bad/{empty,junk}.jpg."""
    root = str(tmp_path_factory.mktemp("data"))
    write_folder(root, "train", {n: 1 for n in CLASSES}, seed=1)  # Class names for the run.
    write_folder(root, "val", {"ant": 2, "bee": 2, "cat": 1}, seed=2)
    with open(os.path.join(root, "val", "bee", "garbage.jpg"), "wb") as f:
        f.write(b"\xff\xd8" + bytes(range(256)) * 2)
    os.makedirs(os.path.join(root, "bad"))
    open(os.path.join(root, "bad", "empty.jpg"), "wb").close()
    with open(os.path.join(root, "bad", "junk.jpg"), "wb") as f:
        f.write(b"not an image " * 20)
    run = make_run(str(tmp_path_factory.mktemp("runs") / "run"), run_config(root))
    return run, root


def script(run: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "scripts", "predict.py"), f"--workdir={run}", *args],
        check=False,
        capture_output=True,
        text=True,
        env=dict(os.environ, XLA_FLAGS=""),
        cwd=REPO,
        timeout=120,
    )


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("jaxres error")]


def test_csv_output_and_undecodable_files_named_once(setup, tmp_path):
    run, root = setup
    empty, garbage = os.path.join(root, "bad", "empty.jpg"), os.path.join(root, "val", "bee", "garbage.jpg")
    out = tmp_path / "out" / "preds.csv"
    # The empty file first: the padded last batch repeats the first file.
    result = script(run, "--top_k=2", f"--output={out}", empty, os.path.join(root, "val"))
    assert result.returncode == 0, result.stderr
    both = result.stdout + result.stderr
    for path in (empty, garbage):
        assert both.count(path) == 1
        assert f"could not decode {path} (" in result.stderr
    assert "Skipping undecodable" not in both and not error_lines(result)
    assert len([line for line in result.stdout.splitlines() if "(true: " in line]) == 5

    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    with open(out, newline="") as f:
        header = next(csv.reader(f))
    assert header == ["file", "top1_class", "top1_prob", "top2_class", "top2_prob", "true_class", "decoded"]
    assert len(rows) == 7 and rows[0]["file"] == empty
    flags = {r["file"]: r["decoded"] for r in rows}
    assert flags[empty] == flags[garbage] == "false"
    assert sum(v == "true" for v in flags.values()) == 5
    for r in rows:
        parent = os.path.basename(os.path.dirname(r["file"]))
        assert r["true_class"] == (parent if parent in CLASSES else "")
        if r["decoded"] == "false":
            assert r["top1_class"] == r["top1_prob"] == r["top2_class"] == r["top2_prob"] == ""
            continue
        probs = [float(r["top1_prob"]), float(r["top2_prob"])]
        assert {r["top1_class"], r["top2_class"]} <= set(CLASSES)
        assert r["top1_class"] != r["top2_class"] and probs[0] >= probs[1] > 0
        assert sum(probs) <= 1 + 1e-5


def test_nothing_decoded_exits_1_with_one_line(setup, tmp_path):
    run, root = setup
    out = tmp_path / "preds.json"
    result = script(run, f"--output={out}", os.path.join(root, "bad"))
    assert result.returncode == 1 and result.stdout.strip() == ""
    errors = error_lines(result)
    assert len(errors) == 1 and "None of the 2 input files could be decoded" in errors[0]
    for name in ("empty.jpg", "junk.jpg"):
        assert (result.stdout + result.stderr).count(name) == 1
    assert not out.exists()


def test_wrong_output_extension_is_one_line(setup, tmp_path):
    run, root = setup
    result = script(run, f"--output={tmp_path / 'preds.txt'}", os.path.join(root, "val", "cat"))
    errors = error_lines(result)
    assert result.returncode == 2 and len(errors) == 1
    assert "'.txt'" in errors[0] and ".csv or .json" in errors[0]
    with pytest.raises(ConfigError, match="has extension '.xlsx'; use .csv or .json"):
        predict.write_predictions([], str(tmp_path / "p.xlsx"))


def test_json_output_warnings_held_back_on_8_devices(setup, tmp_path, caplog):
    run, root = setup
    caplog.set_level(logging.WARNING)
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 128, 3), np.uint8)).save(
        buffer, "JPEG", quality=95
    )
    cut = tmp_path / "cat" / "cut.jpg"  # Truncated: decodes as far as its data goes.
    cut.parent.mkdir()
    cut.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) * 2 // 3])
    empty = os.path.join(root, "bad", "empty.jpg")
    # Batch 8 on 8 devices: 6 padding copies of cut.jpg, then 7 of empty.jpg.
    out = predict.predict(run, [str(cut), os.path.join(root, "val", "ant", "000.jpg")], top_k=3)
    out += predict.predict(run, [empty], top_k=3)
    assert [p.ok for p in out] == [True, True, False]
    assert caplog.text.count("cut.jpg") == 1 and "empty.jpg" not in caplog.text
    assert predict.undecodable_lines(out) == [f"could not decode {empty} (0-byte file)"]
    assert "could not" not in predict.format_predictions(out)
    path = tmp_path / "preds.json"
    predict.write_predictions(out, str(path))
    rows = json.loads(path.read_text())
    assert [set(r) for r in rows] == [{"file", "top", "true", "decoded"}] * 3
    assert [r["file"] for r in rows] == [p.path for p in out]
    assert [r["true"] for r in rows] == ["cat", "ant", None]
    assert [r["decoded"] for r in rows] == [True, True, False] and rows[2]["top"] == []
    for r in rows[:2]:
        probs = [t["prob"] for t in r["top"]]
        assert {t["class"] for t in r["top"]} == set(CLASSES) and probs == sorted(probs, reverse=True)
        assert sum(probs) <= 1 + 1e-5
    # Outside predict the transforms still name every undecodable record (training logs them).
    caplog.clear()
    transforms.EvalTransform(32)({"image": b"", "label": 0, "key": empty})
    assert caplog.text.count("empty.jpg") == 1 and "0-byte file" in caplog.text
