"""Faults at cluster scale, data side: dead grain workers, clean exits, odd files in image folders.

The worker-process tests run a small script in a subprocess with a hard timeout,
so a hang fails the test instead of blocking the suite.
"""

import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path

import ml_collections
import numpy as np
import pytest
from PIL import Image

from jaxres import config_base
from jaxres.data import decode, loader, pipeline, sources, transforms, workers
from jaxres.data.prepare import recipes, records
from jaxres.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
# A dead worker's DataError reaches the caller within this many seconds of the kill
# (measured ~1.1 s: the buffered batches, then POLL_S or grain's own 1 s check).
DEAD_WORKER_BOUND_S = 5.0
SUBPROCESS_TIMEOUT_S = 90


def jpeg(seed: int, size=(96, 72)) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (size[1] // 8, size[0] // 8, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(small).resize(size, Image.Resampling.BICUBIC).save(out, "JPEG", quality=90)
    return out.getvalue()


def truncated_jpeg(seed: int = 7) -> bytes:
    data = jpeg(seed, (256, 192))
    return data[: len(data) * 2 // 3]


# ------------------------------------------------------------------ worker processes (items 5, 9)

SCRIPT_HEAD = """
import io, json, multiprocessing, os, signal, sys, time
import numpy as np
from PIL import Image
from jaxres.data import decode, pipeline, transforms
from jaxres.errors import DataError

def jpeg(seed):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (9, 12, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(small).resize((96, 72)).save(out, "JPEG")
    return out.getvalue()

SOURCE = [{"image": jpeg(i), "label": i, "key": f"k{i}"} for i in range(24)]

def train(transform=None):
    return pipeline.train_batches(
        SOURCE, transform or transforms.TrainTransform(32), global_batch_size=4, seed=0, num_workers=2
    )

def workers_of(batches, n=2):
    deadline = time.time() + 30
    while len(multiprocessing.active_children()) < n and time.time() < deadline:
        next(batches)
    return sorted(p.pid for p in multiprocessing.active_children())

def report(**fields):
    print("REPORT " + json.dumps(fields), flush=True)
"""


def run_script(tmp_path: Path, body: str) -> tuple[dict, str]:
    """Runs SCRIPT_HEAD + `body` under `__main__`; returns (its REPORT fields, its stderr)."""
    script = tmp_path / "script.py"
    script.write_text(SCRIPT_HEAD + 'if __name__ == "__main__":\n' + textwrap.indent(body, "    "))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, str(script)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT_S,  # A hang fails the test (TimeoutExpired).
        check=False,
    )
    lines = [line for line in result.stdout.splitlines() if line.startswith("REPORT ")]
    assert result.returncode == 0 and lines, result.stdout[-2000:] + result.stderr[-4000:]
    fields = {}
    for line in lines:
        fields.update(json.loads(line[len("REPORT ") :]))
    return fields, result.stderr


def assert_gone(pids: list[int], wait_s: float = 10.0) -> None:
    """Every pid has exited (a zombie left for init to reap counts as exited)."""
    deadline = time.time() + wait_s
    alive = pids
    while alive and time.time() < deadline:
        alive = [pid for pid in pids if _running(pid)]
        time.sleep(0.1)
    assert not alive, f"processes still running after the script exited: {alive}"


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


def test_killed_worker_raises_data_error_within_bound(tmp_path):
    body = """
batches = train()
pids = workers_of(batches)
next(batches)
os.kill(pids[0], signal.SIGKILL)
start = time.monotonic()
try:
    while True:
        next(batches)
except DataError as e:
    report(error=str(e), seconds=time.monotonic() - start, victim=pids[0], workers=pids)
children = [c for c in multiprocessing.active_children()]
report(children_after=[c.pid for c in children])
"""
    fields, _ = run_script(tmp_path, body)
    assert f"worker process {fields['victim']}" in fields["error"]
    assert "killed by SIGKILL" in fields["error"] and "re-run the same command" in fields["error"]
    assert "input.num_workers" in fields["error"]
    assert fields["seconds"] < DEAD_WORKER_BOUND_S, fields
    assert fields["children_after"] == []  # The other worker was stopped with the pipeline.
    assert_gone(fields["workers"])


def test_worker_dying_while_holding_a_lock_does_not_hang(tmp_path):
    # grain alone blocks for ever here: the parent waits on the dead worker's stop-Event lock.
    body = """
import gc
from multiprocessing import synchronize

class DiesHoldingItsLocks:
    def __init__(self):
        self.inner = transforms.TrainTransform(32)
    def __call__(self, record, rng):
        if record["key"] == "k13":
            for event in [o for o in gc.get_objects() if isinstance(o, synchronize.Event)]:
                event._cond.acquire()
            with open(DEATH, "w") as f:
                f.write(repr(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        return self.inner(record, rng)

batches = train(DiesHoldingItsLocks())
try:
    for _ in range(100):
        next(batches)
    report(error=None)
except DataError as e:
    report(error=str(e), seconds=time.time() - float(open(DEATH).read()))
report(children_after=[c.pid for c in multiprocessing.active_children()])
"""
    death = tmp_path / "death"
    fields, _ = run_script(tmp_path, f"DEATH = {str(death)!r}\n" + body)  # It must also exit.
    assert fields["error"] and "killed by SIGKILL" in fields["error"]
    assert fields["seconds"] < DEAD_WORKER_BOUND_S, fields
    assert fields["children_after"] == []


def test_runs_with_workers_exit_cleanly(tmp_path):
    body = """
import gc, psutil
gc.disable()  # As when the program exits before the cyclic collector happens to run.
seen = set()
train_batches = train()
for _ in range(3):
    next(train_batches)  # Left open: closed at exit, before grain's modules are torn down.
seen.update(c.pid for c in psutil.Process().children(recursive=True))
evaluation = pipeline.eval_batches(
    SOURCE, transforms.EvalTransform(32), global_batch_size=8, num_workers=2
)
last = [b for b in evaluation][-1]  # Exhausted: closes itself; the last batch is kept.
seen.update(c.pid for c in psutil.Process().children(recursive=True))
with pipeline.eval_batches(
    SOURCE, transforms.EvalTransform(32), global_batch_size=4, num_workers=2
) as early:
    next(early)
    seen.update(c.pid for c in psutil.Process().children(recursive=True))
report(
    batch_type=type(last["image"]).__name__,
    eval_children=[p.pid for p in multiprocessing.active_children()],
    seen=sorted(seen),
)
"""
    fields, stderr = run_script(tmp_path, body)
    assert "leaked shared_memory" not in stderr and "Exception ignored" not in stderr, stderr[-3000:]
    assert fields["batch_type"] == "ndarray"  # Not grain's SharedMemoryArray.
    assert len(fields["eval_children"]) == 2  # Only the training workers, still open then.
    assert_gone(fields["seen"])


def test_an_error_in_a_worker_passes_through_unchanged(tmp_path):
    (tmp_path / "a").mkdir()
    for i in range(3):
        (tmp_path / "a" / f"{i}.jpg").write_bytes(jpeg(i))
    (tmp_path / "val.txt").write_text("a/0.jpg\na/1.jpg\na/2.jpg\na/gone.jpg\n")
    source = sources.ListFileSource(tmp_path, tmp_path / "val.txt")
    batches = pipeline.eval_batches(
        source, transforms.EvalTransform(32), global_batch_size=2, num_workers=2
    )
    with pytest.raises(sources.DataError, match="gone.jpg is in a split list but missing"):
        list(batches)
    assert batches._done and not batches._failed  # Closed, and not taken for a dead worker.


def test_closing_loader_generators_closes_the_pipeline(monkeypatch):
    made = []
    real = pipeline.train_batches
    monkeypatch.setattr(
        pipeline, "train_batches", lambda *a, **k: made.append(real(*a, **k)) or made[-1]
    )
    config = _train_config()
    config.batch_size, config.grad_accum_steps = 4, 2
    source = [{"image": jpeg(i), "label": i, "key": str(i)} for i in range(8)]
    micro = loader.train_micro_batches(config, source, 0)
    assert next(micro)["image"].shape == (2, 2, 32, 32, 3)
    micro.close()
    assert made[0]._done  # Closed now, not left to garbage collection.


# ------------------------------------------------------------------ image folders (item 6)


def _train_config(**input_overrides) -> ml_collections.ConfigDict:
    config = config_base.base_config()
    config.dataset.image_size = 32
    config.input.update(num_workers=0, **input_overrides)
    return config


def make_folder(root: Path) -> Path:
    """cat: 2 images + notes.txt + .DS_Store; dog: 1 image + Thumbs.db + a sub-folder; empty: none."""
    for name in ("cat", "dog", "empty"):
        (root / name).mkdir(parents=True)
    (root / "cat" / "a.jpg").write_bytes(jpeg(1))
    (root / "cat" / "b.jpg").write_bytes(jpeg(2))
    (root / "cat" / "notes.txt").write_text("not an image")
    (root / "cat" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (root / "dog" / "c.jpg").write_bytes(jpeg(3))
    (root / "dog" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (root / "dog" / "extra").mkdir()
    return root


def test_image_folder_source_names_what_it_ignores(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    source = sources.ImageFolderSource(make_folder(tmp_path / "photos"))
    assert source.class_names == ["cat", "dog", "empty"] and len(source) == 3
    assert source.ignored == [
        ("cat/.DS_Store", "not an image file (.DS_Store)"),
        ("cat/notes.txt", "not an image file (.txt)"),
        ("dog/Thumbs.db", "not an image file (.db)"),
        ("dog/extra", "a sub-folder (only <class>/<file> is read)"),
    ]
    ignored_warnings = [r.getMessage() for r in caplog.records if "not images" in r.getMessage()]
    assert len(ignored_warnings) == 2  # One per folder, naming the files.
    assert "2 file(s)" in ignored_warnings[0] and "notes.txt" in ignored_warnings[0]
    assert source.empty_classes == ["empty"]
    assert "empty has no images; its label 2 is kept" in caplog.text

    caplog.clear()  # Read again in place (class names, another split, a probe trial): named once.
    again = sources.ImageFolderSource(tmp_path / "photos")
    assert again.ignored == source.ignored and again.empty_classes == ["empty"]
    assert "not images" not in caplog.text and "has no images" not in caplog.text


@pytest.mark.parametrize("truncated", ["keep", "skip"])
def test_prepare_imagefolder_lists_skipped_files_with_reasons(tmp_path, caplog, truncated):
    caplog.set_level(logging.WARNING)
    root = make_folder(tmp_path / "photos")
    (root / "dog" / "cut.jpg").write_bytes(truncated_jpeg())
    (root / "dog" / "zero.jpg").write_bytes(b"")
    out = recipes.prepare_imagefolder(root, tmp_path / "data", "pets", truncated=truncated)
    meta = sources.read_metadata(out)
    assert meta["class_names"] == ["cat", "dog", "empty"]  # The empty class keeps label 2.
    assert "empty has no images" in caplog.text
    assert {e["key"] for e in meta["skipped"]} == {
        "cat/.DS_Store",
        "cat/notes.txt",
        "dog/Thumbs.db",
        "dog/extra",
    }
    assert {"key": "cat/notes.txt", "reason": "not an image file (.txt)"} in meta["skipped"]
    cut_reason = "truncated, kept as decoded" if truncated == "keep" else "truncated"
    assert meta["splits"]["train"]["skipped"] == [
        {"key": "dog/cut.jpg", "reason": cut_reason},
        {"key": "dog/zero.jpg", "reason": "0-byte file"},
    ]
    source = sources.ArrayRecordSource(out, "train")
    keys = [source[i]["key"] for i in range(len(source))]
    assert ("dog/cut.jpg" in keys) == (truncated == "keep") and "dog/zero.jpg" not in keys
    assert "dog/cut.jpg" in caplog.text  # Named either way.
    assert source.skipped == meta["skipped"] + meta["splits"]["train"]["skipped"]


def test_archive_recipes_list_non_image_members(tmp_path):
    members = {}
    for c, cls in enumerate(["Faces", "accordion"]):
        for i in range(2):
            members[f"101_ObjectCategories/{cls}/image_{i + 1:04d}.jpg"] = jpeg(10 * c + i)
    members["101_ObjectCategories/Faces/notes.txt"] = b"hello"
    members["101_ObjectCategories/only_text/README"] = b"no images here"
    with tarfile.open(tmp_path / "101_ObjectCategories.tar.gz", "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    out = recipes.prepare_caltech101(tmp_path, tmp_path / "out")
    meta = sources.read_metadata(out)
    assert meta["class_names"] == ["Faces", "accordion"]  # A folder without images is no class.
    assert meta["skipped"] == [
        {"key": "Faces/notes.txt", "reason": "not an image file (.txt)"},
        {"key": "only_text/README", "reason": "not an image file (no extension)"},
    ]


def test_metadata_written_before_reasons_still_reads(tmp_path):
    entries = [("a/0.jpg", 0, lambda: jpeg(0)), ("a/1.jpg", 0, lambda: b"")]
    out = tmp_path / "old"
    options = {"resize_shorter": None, "jpeg_quality": records.PREPARE_JPEG_QUALITY}
    records.write_record_dataset(out, {"train": records.RecordList(entries)}, ["a"], source="t")
    meta = sources.read_metadata(out)
    meta.pop("skipped")
    meta["options"] = options  # As written before `truncated` existed.
    meta["splits"]["train"]["skipped"] = ["a/1.jpg"]
    (out / sources.RECORDS_METADATA).write_text(json.dumps(meta))
    assert sources.ArrayRecordSource(out, "train").skipped == [
        {"key": "a/1.jpg", "reason": "undecodable"}
    ]
    # Preparing it again with the default options is still a no-op, not an --overwrite error.
    records.write_record_dataset(out, {"train": records.RecordList(entries)}, ["a"], source="t")
    assert sources.read_metadata(out)["splits"]["train"]["skipped"] == ["a/1.jpg"]


@pytest.mark.parametrize("backend", ["fast", "pil_only"])
def test_truncated_jpeg_keep_decodes_skip_masks(backend, monkeypatch, caplog):
    if backend == "pil_only":
        monkeypatch.setattr(decode.jpeg_crop, "available", lambda: False)
        monkeypatch.setattr(decode, "simplejpeg", None)
    caplog.set_level(logging.WARNING)
    record = {"image": truncated_jpeg(), "label": 3, "key": "cut/file.jpg"}
    assert decode.jpeg_truncated(record["image"]) and not decode.jpeg_truncated(jpeg(7))
    for truncated, mask in (("keep", 1), ("skip", 0)):
        caplog.clear()
        outs = [
            transforms.EvalTransform(32, truncated=truncated)(record),
            transforms.TenCropTransform(32, truncated=truncated)(record),
        ]
        # Crops in the intact top part too: the outcome must not depend on the window.
        outs += [
            transforms.TrainTransform(32, 0.01, truncated=truncated)(
                record, np.random.default_rng(seed)
            )
            for seed in range(8)
        ]
        assert [o["mask"] for o in outs] == [mask] * len(outs)
        assert caplog.text.count("cut/file.jpg") == len(outs)  # Named every time.
        if truncated == "skip":
            assert "truncated file (input.truncated=skip)" in caplog.text


def test_truncated_option_reaches_every_transform_and_rejects_unknown_values():
    assert loader.train_transform(_train_config(truncated="skip")).truncated == "skip"
    assert loader.view_transform(32, 0.875, "10crop", truncated="skip").truncated == "skip"
    assert loader.view_transform(32, 0.875, "flip", truncated="skip").centre.truncated == "skip"
    # The DALI path's grain transforms mask a truncated JPEG in the worker with "skip".
    crops = loader.train_transform(_train_config(decoder="dali", truncated="skip"))
    record = {"image": truncated_jpeg(), "label": 3, "key": "cut.jpg"}
    assert crops(record, np.random.default_rng(0))["mask"] == 0
    assert loader.view_transform(32, 0.875, decoder="dali")(record)["mask"] == 1
    for make in (
        lambda: loader.train_transform(_train_config(truncated="drop")),
        lambda: loader.view_transform(32, 0.875, truncated="drop"),
        lambda: transforms.EvalTransform(32, truncated="drop"),
        lambda: records.write_record_dataset("unused", {}, [], source="t", truncated="drop"),
    ):
        with pytest.raises(ConfigError, match="keep / skip"):
            make()


def test_prepare_data_script_has_a_truncated_flag(tmp_path):
    root = tmp_path / "photos"
    (root / "a").mkdir(parents=True)
    (root / "a" / "ok.jpg").write_bytes(jpeg(0))
    (root / "a" / "cut.jpg").write_bytes(truncated_jpeg())
    command = [
        sys.executable,
        str(REPO / "scripts" / "prepare_data.py"),
        "--dataset=imagefolder",
        f"--manual_dir={root}",
        f"--data_dir={tmp_path / 'data'}",
        "--name=mini",
        "--num_workers=0",
        "--truncated=skip",
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    meta = sources.read_metadata(tmp_path / "data" / "mini")
    assert meta["options"]["truncated"] == "skip" and meta["splits"]["train"]["num_examples"] == 1
    assert meta["splits"]["train"]["skipped"] == [{"key": "a/cut.jpg", "reason": "truncated"}]


def test_batches_pass_through_without_workers():
    batches = pipeline.train_batches(
        [{"image": jpeg(i), "label": i, "key": str(i)} for i in range(4)],
        transforms.TrainTransform(32),
        global_batch_size=2,
        seed=0,
    )
    assert isinstance(batches, workers.Batches)
    with batches:
        assert next(batches)["image"].shape == (2, 32, 32, 3)
    with pytest.raises(StopIteration):
        next(batches)
