"""Faults of a one-process run, each reproduced: Ctrl-C (a second one aborts), kill -9 mid-run
(metrics logged once), a damaged newest checkpoint, a full disk at save time, fractional
epochs. A file of its own so that the two test workers share the fault tests
(multi-process ones: tests/test_faults.py)."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys

import numpy as np
import orbax.checkpoint as ocp
import pytest
from test_cli import _env, _rows, _run, _train_cmd
from test_faults import REPO, _assert_each_step_once, _wait_for_step
from test_train import smoke_config

from jaxres import checkpoint as ckpt_lib
from jaxres import evaluate, optim, parallel, runs, train
from jaxres import state as state_lib
from jaxres.data import embedded
from jaxres.errors import CheckpointError


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    embedded.write_digits(path)
    return str(path)


def test_ctrl_c_saves_then_a_second_aborts(data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    proc = subprocess.Popen(_train_cmd(workdir, data_dir), env=_env(2), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
    _wait_for_step(workdir, 4, [proc])
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "Traceback" not in output, output[-3000:]
    assert "SIGINT: saved step" in output

    # A second Ctrl-C before the save: the handler ends the process at once.
    script = (
        "import os, signal, time\n"
        "from jaxres.interrupts import Preemption\n"
        "p = Preemption()\n"
        "os.kill(os.getpid(), signal.SIGINT); time.sleep(0.2)\n"
        "assert p.should_stop(1, 1)\n"
        "os.kill(os.getpid(), signal.SIGINT); time.sleep(5)\n"
        "print('not aborted')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True,
                            timeout=60, check=False)  # fmt: skip
    output = result.stdout + result.stderr
    proc = result
    assert proc.returncode == 130 and "Second Ctrl-C: stopping now, without saving." in output


def test_kill_9_then_resume_logs_every_step_once(data_dir, tmp_path):
    """Steps logged after the last checkpoint are logged again on resume: only once in the end."""
    workdir = str(tmp_path / "run")
    cmd = _train_cmd(workdir, data_dir, "--config.checkpoint.every=100", "--config.evals.val.every=2ep")
    proc = subprocess.Popen(cmd, env=_env(2), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_step(workdir, 12, [proc])  # The only checkpoint so far: step 8 (end of epoch 1).
    proc.kill()
    proc.wait()
    before = [r["step"] for r in _rows(workdir) if "loss" in r]
    assert max(before) >= 12
    _run(cmd, _env(2))
    _assert_each_step_once(workdir)
    assert [r["step"] for r in _rows(workdir) if "loss" in r] == [2, 4, 6, 8, 10, 12, 14, 16]


@pytest.fixture()
def trained_run(data_dir, tmp_path):
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(smoke_config(data_dir, **{"checkpoint.keep_latest": 4}), workdir)
    return workdir


def _damage(workdir: str, step: int) -> None:
    """Truncates every array data file of `step` to half its size (as a disk or copy error would)."""
    state = os.path.join(workdir, "checkpoints", str(step), "state")
    for folder, _, names in os.walk(state):
        if os.path.basename(folder) == "d":
            for name in names:
                path = os.path.join(folder, name)
                with open(path, "r+b") as f:
                    f.truncate(os.path.getsize(path) // 2)


def test_damaged_newest_checkpoint_falls_back_with_a_warning(data_dir, trained_run, capsys, tmp_path):
    _damage(trained_run, 16)
    result = evaluate.evaluate_run(trained_run, checkpoint="latest")
    assert result["step"] == 12
    out = capsys.readouterr().out
    assert "Warning: checkpoint step 16 in" in out and "trying the previous one" in out

    # init_from reads the run as evaluation does: the same fallback; RUN:STEP picks a step.
    for init_from, step in ((trained_run, 12), (f"{trained_run}:8", 8)):
        five = smoke_config(data_dir, init_from=init_from, **{"dataset.num_classes": 5})
        model = runs.build_model(five)
        tx = optim.make_optimizer(five.optimizer, optim.make_schedule(five.optimizer, 32, 8, 16))
        target = ckpt_lib.Checkpointer(str(tmp_path / f"five{step}" / "checkpoints"))
        fine = state_lib.restore_or_init(five, target, model, tx, parallel.make_mesh())
        target.close()
        want = runs.load(trained_run, step, use_ema=False).variables["params"]["stem_conv"]["kernel"]
        np.testing.assert_array_equal(parallel.fetch(fine.params)["stem_conv"]["kernel"], want)
        assert f"Initialised from {trained_run} step {step}" in capsys.readouterr().out

    longer = smoke_config(data_dir, **{"checkpoint.keep_latest": 4}, num_epochs=3)
    state = train.train_and_evaluate(longer, trained_run)  # Resumes from 12, not from scratch.
    assert int(state.step) == 24
    assert "Resuming from" in capsys.readouterr().out

    for step in (12, 16, 20, 24):
        if os.path.isdir(os.path.join(trained_run, "checkpoints", str(step))):
            _damage(trained_run, step)
    with pytest.raises(CheckpointError, match="Every checkpoint in .* is damaged"):
        evaluate.evaluate_run(trained_run, checkpoint="latest")


def test_a_full_disk_at_save_time_is_one_line_and_keeps_earlier_checkpoints(data_dir, tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    real_save = ocp.CheckpointManager.save

    def save_until_full(self, step, *args, **kwargs):
        if step > 8:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save_until_full)
    with pytest.raises(CheckpointError, match=r"Could not write checkpoint step 12 to .* \(No space left on device\)"):
        train.train_and_evaluate(smoke_config(data_dir, **{"checkpoint.keep_latest": 4}), workdir)
    saved = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    assert saved.all_steps() == [4, 8]  # Intact, and nothing half-written counted.
    saved.close()
    monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
    assert int(train.train_and_evaluate(smoke_config(data_dir), workdir).step) == 16


@pytest.mark.parametrize("overrides, steps", [({"num_epochs": 0.5}, 4), ({"num_steps": 3}, 3)])
def test_fractional_epochs_and_num_steps(data_dir, tmp_path, overrides, steps):
    state = train.train_and_evaluate(smoke_config(data_dir, **overrides), str(tmp_path / "run"))
    assert int(state.step) == steps
