"""Faults a cluster run meets, each reproduced with several processes: SIGTERM (preemption)
then resume, 2 processes = 1, a dead peer, one host preempted, the launcher ending the rest.
One-process faults (Ctrl-C, kill -9, damaged checkpoint, full disk, fractional epochs):
tests/test_faults_local.py; data-side faults: tests/test_faults_data.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from test_cli import FAULTS_CONFIG, _env, _final, _rows, _run, _train_cmd

from jaxres import checkpoint as ckpt_lib
from jaxres.data import embedded

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER = [sys.executable, os.path.join(REPO, "scripts", "launch_local.py")]
DEAD_PEER_BOUND_S = 60  # The survivor must stop by itself within this.


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    embedded.write_digits(path)
    return str(path)


def _process_cmd(workdir: str, data_dir: str, port: int, i: int) -> list[str]:
    return _train_cmd(workdir, data_dir, config=FAULTS_CONFIG) + [
        f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}",
    ]  # fmt: skip


def _start_two(workdir: str, data_dir: str) -> list[subprocess.Popen]:
    port = 20000 + (os.getpid() + int(time.time())) % 20000
    return [
        subprocess.Popen(_process_cmd(workdir, data_dir, port, i), env=_env(1), cwd=REPO,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip
        for i in range(2)
    ]


def _wait_for_step(workdir: str, step: int, procs, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not any(r.get("step", 0) >= step for r in _rows(workdir)):
        assert all(p.poll() is None for p in procs) and time.time() < deadline, "ended before the fault"
        time.sleep(0.1)


def _assert_each_step_once(workdir: str) -> None:
    train_steps = [r["step"] for r in _rows(workdir) if "loss" in r]
    assert train_steps == sorted(set(train_steps)), train_steps


def test_sigterm_then_resume_matches_uninterrupted(one_process_reference, tmp_path):
    # The later runs load the reference run's compiled steps from the tests' persistent cache
    # (conftest.py): the bit-exact comparison below also checks that cached executables compute the same.
    reference, data_dir = one_process_reference
    assert os.listdir(os.environ["JAX_COMPILATION_CACHE_DIR"]), "the compilation cache stayed empty"

    workdir = str(tmp_path / "preempted")
    proc = subprocess.Popen(_train_cmd(workdir, data_dir, config=FAULTS_CONFIG), env=_env(2), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not any(r.get("step", 0) >= 4 for r in _rows(workdir)):
        assert proc.poll() is None and time.time() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output[-3000:]
    assert "SIGTERM: saved step" in output
    stopped_at = max(r["step"] for r in _rows(workdir))
    assert stopped_at < 16, "SIGTERM did not stop the run early"

    resumed = _run(_train_cmd(workdir, data_dir, config=FAULTS_CONFIG), _env(2))
    assert "Resuming from" in resumed.stdout
    (train_ref, eval_ref), (train_res, eval_res) = _final(reference), _final(workdir)
    assert train_res["step"] == train_ref["step"] == 16
    assert train_res["loss"] == train_ref["loss"]  # Bit-exact: same batches, same steps, same RNG.
    assert eval_res["val_top1"] == eval_ref["val_top1"]
    # The evaluators kept their periods across the restart, each step once, with the same values.
    assert _evaluations(workdir) == _evaluations(reference)


def test_two_processes_match_one(one_process_reference, two_process_reference):
    """2 processes x 1 CPU device (gloo) vs 1 process x 2 devices, same global batches.

    Only the reduction order differs (gloo all-reduce vs in-process), so the
    losses agree to 1e-4 relative and val top-1 to one image in 100.
    """
    two, output = two_process_reference
    assert "2 devices, 2 process(es)" in output
    _assert_matches_one_process(one_process_reference[0], two)


def _assert_matches_one_process(one: str, two: str) -> None:
    """The 2-process run in workdir `two` equals the 1-process run in `one` up to reduction order."""
    one_rows = [r for r in _rows(one) if "loss" in r]
    two_rows = [r for r in _rows(two) if "loss" in r]
    assert [r["step"] for r in one_rows] == [r["step"] for r in two_rows]
    for a, b in zip(one_rows, two_rows):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
    assert abs(_final(one)[1]["val_top1"] - _final(two)[1]["val_top1"]) <= 0.01
    one_evals, two_evals = _evaluations(one), _evaluations(two)
    assert [(step, sorted(m)) for step, m in one_evals] == [(step, sorted(m)) for step, m in two_evals]
    for (_, a), (_, b) in zip(one_evals, two_evals):  # 1 test image of 359 is 0.0028.
        assert all(abs(a[k] - b[k]) <= 0.01 for k in a)


def _evaluations(workdir: str) -> list[tuple[int, dict]]:
    """(step, {key: value}) of every evaluator row (wall times left out)."""
    return [
        (r["step"], {k: v for k, v in r.items() if k.startswith(("val_", "fewshot/")) and not k.endswith("_eval_s")})
        for r in _rows(workdir)
        if "val_top1" in r or any(k.startswith("fewshot/") for k in r)
    ]


def test_launcher_names_a_failed_process_and_ends_the_rest(tmp_path):
    """Process 1 kills itself; process 0 would sleep for 10 minutes: the launcher ends it."""
    script = tmp_path / "worker.py"
    script.write_text(
        "import os, signal, sys, time\n"
        "if '--process_id=1' in sys.argv: os.kill(os.getpid(), signal.SIGKILL)\n"
        "time.sleep(600)\n"
    )
    start = time.time()
    result = subprocess.run(LAUNCHER + ["--num_processes", "2", "--", sys.executable, str(script)],
                            capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert result.returncode == 128 + signal.SIGKILL and time.time() - start < 30
    assert "[launch_local] process 1 was killed by SIGKILL; ending the other processes." in result.stdout


def test_one_host_preempted_then_a_dead_peer_and_the_rerun_matches(data_dir, two_process_reference, tmp_path):
    """Two faults of one 2-process run, each then resumed (one run, so three 2-process starts):
    1. one host preempted (SIGTERM to process 1 only): both processes save the same step, exit 0;
    2. resumed by hand, then process 1 killed (kill -9): the survivor stops by itself (exit 3)
       within DEAD_PEER_BOUND_S, naming the lost process;
    3. rerun with the launcher: it resumes and ends bit-identical to the uninterrupted reference,
       each step logged once."""
    workdir = str(tmp_path / "run")
    procs = _start_two(workdir, data_dir)
    _wait_for_step(workdir, 4, procs)
    procs[1].send_signal(signal.SIGTERM)  # Only one of the two hosts is preempted.
    outputs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    saved = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    stopped_at = saved.latest_step()
    saved.close()
    assert "SIGTERM: saving at the next step boundary" in outputs[1]
    assert f"a signal to another process: saved step {stopped_at}" in outputs[0]
    assert stopped_at < 16

    procs = _start_two(workdir, data_dir)
    _wait_for_step(workdir, stopped_at + 2, procs)
    procs[1].kill()
    killed_at = time.time()
    output, _ = procs[0].communicate(timeout=DEAD_PEER_BOUND_S + 30)
    detected_s = time.time() - killed_at
    procs[1].wait()
    assert "Resuming from" in output
    assert procs[0].returncode == 3, output[-3000:]
    assert detected_s <= DEAD_PEER_BOUND_S
    assert [line for line in output.splitlines() if line.startswith("jaxres error: lost process 1 of 2")]

    result = _run(LAUNCHER + ["--num_processes", "2", "--"] + _train_cmd(workdir, data_dir, config=FAULTS_CONFIG), _env(1))
    assert "Resuming from" in result.stdout
    (train_ref, eval_ref), (train_res, eval_res) = _final(two_process_reference[0]), _final(workdir)
    assert train_res["step"] == train_ref["step"] == 16
    assert train_res["loss"] == train_ref["loss"] and eval_res["val_top1"] == eval_ref["val_top1"]
    assert _evaluations(workdir) == _evaluations(two_process_reference[0])
    _assert_each_step_once(workdir)
