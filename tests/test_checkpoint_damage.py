"""A damaged newest checkpoint, file by file: every file orbax writes for a step, truncated to
half or deleted. Each damaged step is found before orbax reads it (`checkpoint.damaged_files`),
every reader falls back to the newest intact step with one warning naming the step and the
file, and a damaged step is never reported as a model/optimizer mismatch. Array data files
halved everywhere, full disk, Ctrl-C: tests/test_faults_local.py."""

from __future__ import annotations

import gc
import glob
import os
import shutil
import subprocess
import sys
import types

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_cli import REPO, _env
from test_train import smoke_config

from jaxres import checkpoint as ckpt_lib
from jaxres import runs, train
from jaxres.data import embedded
from jaxres.errors import CheckpointError


def _largest(pattern: str) -> str:
    return max(glob.glob(pattern), key=os.path.getsize)


# (what to damage, relative to the step directory or a glob, the name the warning gives).
FILES = [
    ("state/_sharding", "state/_sharding"),
    ("state/_METADATA", "state/_METADATA"),
    ("state/array_metadatas/process_0", "state/array_metadatas/process_0"),
    ("state/manifest.ocdbt", "state/"),
    ("_CHECKPOINT_METADATA", "_CHECKPOINT_METADATA"),
    ("meta/metadata", "meta/"),
    ("state/d/*", "state/ array index"),  # The OCDBT index nodes the manifest points to.
    ("state/ocdbt.process_0/d/*", "state array "),  # The largest array data file.
]
# Deleting these loses nothing orbax needs (older orbax versions did not write them): intact.
HARMLESS_WHEN_DELETED = {
    "state/_sharding",
    "state/array_metadatas/process_0",
    "_CHECKPOINT_METADATA",
}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(workdir, data_dir) of one smoke run keeping steps 4, 8, 12, 16."""
    data_dir = tmp_path_factory.mktemp("data")
    embedded.write_digits(data_dir)
    workdir = str(tmp_path_factory.mktemp("trained") / "run")
    train.train_and_evaluate(smoke_config(data_dir, **{"checkpoint.keep_latest": 4}), workdir)
    return workdir, str(data_dir)


def _copy(trained, tmp_path) -> str:
    run = str(tmp_path / "run")
    shutil.copytree(trained[0], run)
    return run


def _damage(run: str, rel: str, how: str, step: int = 16) -> str:
    """Truncates (to half) or deletes one file or folder of `step`; returns its path."""
    path = os.path.join(run, "checkpoints", str(step), rel)
    path = _largest(path) if "*" in path else path
    if how == "delete":
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    else:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    return path


def _warnings(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("Warning: checkpoint")]


def _abstract_state(checkpoints: str, step: int):
    """The saved state's shapes on one device, read from orbax's metadata (what a resume restores)."""
    tree = (
        ocp.PyTreeCheckpointer()
        .metadata(os.path.join(checkpoints, str(step), "state"))
        .item_metadata.tree
    )
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)


@pytest.mark.parametrize("how", ["truncate", "delete"])
@pytest.mark.parametrize("rel, named", FILES)
def test_each_damaged_file_falls_back_to_the_newest_intact_step(
    trained, tmp_path, capsys, rel, named, how
):
    run = _copy(trained, tmp_path)
    checkpoints = os.path.join(run, "checkpoints")
    abstract = _abstract_state(checkpoints, 12)
    _damage(run, rel, how)
    found = ckpt_lib.damaged_files(os.path.join(checkpoints, "16"))
    if how == "delete" and rel in HARMLESS_WHEN_DELETED:
        assert found == [] and runs.load(run, "latest").step == 16
        return
    assert found and found[0].startswith(named), found
    capsys.readouterr()

    # evaluate / predict / features / export: runs.load.
    assert runs.load(run, "latest").step == 12
    out = capsys.readouterr().out
    assert len(_warnings(out)) == 1 and "Traceback" not in out, out
    assert _warnings(out)[0].startswith(f"Warning: checkpoint step 16 in {checkpoints}: {named}")

    # init_from / resume_from=RUN: the resolver; a resume: the whole state, as train restores it.
    checkpointer = ckpt_lib.Checkpointer(checkpoints, read_only=True)
    try:
        assert ckpt_lib.resolve_step(checkpointer, "latest") == 12
        assert ckpt_lib.resolve_step(checkpointer, "best") == 8  # The other evaluated step.
        with pytest.raises(ckpt_lib.CheckpointDamaged, match=f"step 16 in .*: {named}"):
            ckpt_lib.resolve_step(checkpointer, 16)
        step, _ = ckpt_lib.restore_newest_intact(
            checkpointer, checkpointer.all_steps(), lambda s: checkpointer.restore(s, abstract)
        )
    finally:
        checkpointer.close()
    assert step == 12
    out = capsys.readouterr().out
    assert "does not match" not in out and "Event loop is closed" not in out


def test_a_deleted_state_folder(trained, tmp_path):
    run = _copy(trained, tmp_path)
    _damage(run, "state", "delete")
    assert ckpt_lib.damaged_files(os.path.join(run, "checkpoints", "16")) == ["state/: missing"]
    assert runs.load(run, "latest").step == 12


def test_a_real_mismatch_stays_its_own_error(trained, monkeypatch):
    reported = []  # What Python would print as "Exception ignored in: <coroutine ...>".
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    checkpoints = os.path.join(trained[0], "checkpoints")
    abstract = _abstract_state(checkpoints, 16)
    kernel = abstract["params"]["head"]["kernel"]
    abstract["params"]["head"]["kernel"] = jax.ShapeDtypeStruct(
        (7, 7), kernel.dtype, sharding=kernel.sharding
    )
    checkpointer = ckpt_lib.Checkpointer(checkpoints, read_only=True)
    try:
        with pytest.raises(CheckpointError, match="does not match this model/optimizer") as raised:
            ckpt_lib.restore_newest_intact(
                checkpointer, [16], lambda s: checkpointer.restore(s, abstract)
            )
    finally:
        checkpointer.close()
    assert not isinstance(raised.value, ckpt_lib.CheckpointDamaged)
    assert "\n" not in str(raised.value)
    del raised
    gc.collect()  # The reads orbax abandoned are collected: nothing reported.
    assert reported == [], [str(r.exc_value)[:200] for r in reported]


def test_resume_init_from_and_resume_from_skip_a_damaged_step(trained, tmp_path, capsys):
    """The training entry points, end to end, with the newest step's `_METADATA` gone (a resume
    used to exit 2 with "does not match this model/optimizer ... use a new --workdir")."""
    run = _copy(trained, tmp_path)
    _damage(run, "state/_METADATA", "delete")
    capsys.readouterr()
    branch = smoke_config(trained[1], num_steps=1, resume_from=run)
    assert int(train.train_and_evaluate(branch, str(tmp_path / "branch")).step) == 12
    finetune = smoke_config(trained[1], num_steps=1, init_from=run)
    assert int(train.train_and_evaluate(finetune, str(tmp_path / "finetune")).step) == 1
    out = capsys.readouterr().out
    assert len(_warnings(out)) == 2 and f"Initialised from {run} step 12" in out, out

    state = train.train_and_evaluate(smoke_config(trained[1], **{"checkpoint.keep_latest": 4}), run)  # Resumes at 12.
    out = capsys.readouterr().out
    assert int(state.step) == 16 and "Resuming from" in out and "step 12." in out
    assert len(_warnings(out)) == 1 and "Moved damaged checkpoint step 16" in out


def test_evaluate_cli_prints_one_warning_and_no_orbax_notices(trained, tmp_path):
    run = _copy(trained, tmp_path)
    _damage(run, "state/_sharding", "truncate")  # Used to end in an "Invalid JSON" traceback.
    cmd = [
        sys.executable,
        os.path.join(REPO, "scripts", "evaluate.py"),
        "--workdir",
        run,
        "--checkpoint",
        "latest",
    ]
    result = subprocess.run(
        cmd, env=_env(1), cwd=REPO, capture_output=True, text=True, timeout=300, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-3000:]
    assert len(_warnings(output)) == 1 and '"step": 12' in output
    assert "Traceback" not in output and "read only" not in output and "Event loop" not in output, (
        output
    )


def test_reads_abandoned_after_a_failure_print_nothing():
    """The source of the "Event loop is closed" tracebacks, reproduced: a TensorStore read
    awaited in an asyncio loop that is closed (as orbax closes it after a failed read) before
    the read finishes."""
    script = (
        "import asyncio, time\n"
        "import tensorstore as ts\n"
        "from jaxres import checkpoint\n"
        "checkpoint.ignore_closed_loop_callbacks()\n"
        "promise, future = ts.Promise.new()\n"
        "async def main():\n"
        "    async def read():\n"
        "        await future\n"
        "    pending = asyncio.ensure_future(read())\n"
        "    await asyncio.sleep(0.01)\n"
        "    raise ValueError('one read failed')\n"
        "loop = asyncio.new_event_loop()\n"
        "try:\n"
        "    loop.run_until_complete(main())\n"
        "except ValueError:\n"
        "    pass\n"
        "loop.close()\n"
        "promise.set_result(1)\n"
        "time.sleep(0.2)\n"
        "print('done')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0 and result.stdout == "done\n", result.stderr
    assert "Event loop is closed" not in result.stderr and "Traceback" not in result.stderr


def _readme_snippet(containing: str) -> str:
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    blocks = readme.split("```python\n")[1:]
    return next(b.split("```")[0] for b in blocks if containing in b)


def test_the_readme_plain_orbax_restore_on_another_device_count_equals_runs_load(trained, tmp_path):
    """The README's orbax-only snippet, run on 1 device against a run trained on 8."""
    snippet = _readme_snippet("PyTreeCheckpointHandler().metadata")
    step_dir = os.path.join(trained[0], "checkpoints", "16")
    script = snippet.replace('"runs/x/checkpoints/16"', repr(step_dir)) + (
        "import numpy as np\n"
        "flat = jax.tree_util.tree_flatten_with_path({'params': params, 'batch_stats': batch_stats})[0]\n"
        f"np.savez({str(tmp_path / 'w.npz')!r}, "
        "**{jax.tree_util.keystr(k): np.asarray(v) for k, v in flat})\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], env=_env(1), cwd=REPO, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "devices are different" not in result.stderr and "WARNING" not in result.stderr, (
        result.stderr
    )
    saved = np.load(tmp_path / "w.npz")
    loaded = runs.load(trained[0], 16).variables
    flat = jax.tree_util.tree_flatten_with_path(loaded)[0]
    assert sorted(saved.files) == sorted(jax.tree_util.keystr(k) for k, _ in flat)
    for key, value in flat:
        np.testing.assert_array_equal(saved[jax.tree_util.keystr(key)], np.asarray(value))


def test_only_reads_orbax_abandoned_are_dropped(monkeypatch):
    """The filter behind the two tests above, case by case: a closed loop's callback and an
    orbax coroutine collected unfinished are dropped; any other report goes through."""
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    ckpt_lib.ignore_closed_loop_callbacks()
    ckpt_lib.ignore_closed_loop_callbacks()  # Installed once.

    def coroutine_from(filename: str):
        namespace = {}
        exec(compile("async def read():\n    pass\n", filename, "exec"), namespace)  # noqa: S102
        return namespace["read"]()

    orbax_file = os.path.join(os.sep, "site-packages", "orbax", "checkpoint", "_src", "x.py")
    cases = [
        (RuntimeError("Event loop is closed"), None, False),
        (
            Exception("Encountered error while reading array index"),
            coroutine_from(orbax_file),
            False,
        ),
        (Exception("mine"), coroutine_from(os.path.join(os.sep, "app", "mine.py")), True),
        (RuntimeError("something else"), None, True),
    ]
    for error, obj, shown in cases:
        before = len(reported)
        sys.unraisablehook(types.SimpleNamespace(exc_value=error, object=obj))
        assert (len(reported) == before + 1) == shown, error
        if obj is not None:
            obj.close()
