"""jaxres under a real SLURM scheduler: README's srun line and scripts/slurm/train.sbatch run on a
one-node cluster the tests start (tests/slurm_cluster.py; 2 tasks x 1 CPU device, gloo), then
preempted (scancel --signal=TERM, and the batch-shell signal of `--signal=B:TERM@N`), requeued
(scontrol requeue), with a task killed (kill -9) and launched wrongly. Skipped, with the reason, where SLURM is not installed
or not root; `.ci/run` installs it. The same faults under scripts/launch_local.py: test_faults.py.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
import slurm_cluster
from test_cli import FAULTS_CONFIG, REPO, _env, _final, _rows, _train_cmd
from test_faults import _assert_each_step_once, _assert_matches_one_process

from jaxres import checkpoint as ckpt_lib
from jaxres.data import embedded

pytestmark = pytest.mark.xdist_group("slurm")  # One cluster: every test of this file on one worker.
SBATCH = os.path.join(REPO, "scripts", "slurm", "train.sbatch")
JOB_TIMEOUT_S = 300
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory):
    reason = slurm_cluster.unavailable_reason()
    if reason:
        pytest.skip(reason)
    # 4 CPUs (whatever the host has): the 3-task launch below must be scheduled to fail, not wait.
    started = slurm_cluster.SlurmCluster(tmp_path_factory.mktemp("slurm"), cpus=4)
    started.start()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    embedded.write_digits(path)
    return str(path)


def _job_env(cluster) -> dict:
    """One CPU device per task; `python` (as train.sbatch calls it) is this interpreter."""
    env = cluster.env(_env(1))
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    return env


def _srun(cluster, workdir: str, data_dir: str, name: str, *opts: str) -> subprocess.Popen:
    """README's srun line: 2 tasks of `train.py --multihost`, started in the background."""
    cmd = ["srun", f"--job-name={name}", "--ntasks=2", "--kill-on-bad-exit=1", *opts]
    train = _train_cmd(workdir, data_dir, "--multihost", config=FAULTS_CONFIG)  # As test_faults' runs.
    return subprocess.Popen(cmd + train, env=_job_env(cluster), cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)  # fmt: skip


def _sbatch(cluster, workdir: str, data_dir: str, log: str, *opts: str) -> str:
    """scripts/slurm/train.sbatch as the README submits it, on this cluster's one node; its job id."""
    args = _train_cmd(workdir, data_dir, config=FAULTS_CONFIG)[2:]  # The file runs `train.py --multihost`.
    cmd = ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", f"--output={log}", *opts, SBATCH, *args]
    result = subprocess.run(cmd, env=_job_env(cluster), cwd=REPO, capture_output=True, text=True,
                            timeout=60, check=True)  # fmt: skip
    return result.stdout.strip().split(";")[0]


def _job(cluster, job_id: str) -> dict:
    """JobState, ExitCode and Restarts of a job (kept by slurmctld for MinJobAge, 300 s, after it ends)."""
    text = cluster.run("scontrol", "-o", "show", "job", job_id).stdout
    return dict(re.findall(r"\b(JobState|ExitCode|Restarts)=(\S+)", text))


def _job_id(cluster, name: str, timeout: float = 60) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        ids = cluster.run("squeue", "-h", "-n", name, "-o", "%i").stdout.split()
        if ids:
            return ids[0]
        time.sleep(0.2)
    raise AssertionError(f"no job named {name} in the queue")


def _wait_for_step(cluster, workdir: str, step: int, job_id: str, after: int = 0) -> None:
    """Until metrics.jsonl has a row past `step` written after row `after`, while the job runs."""
    deadline = time.time() + JOB_TIMEOUT_S
    while not any(r.get("step", 0) >= step for r in _rows(workdir)[after:]):
        assert _job(cluster, job_id).get("JobState") not in FINAL_STATES, "the job ended before the fault"
        assert time.time() < deadline, f"no step {step} in {JOB_TIMEOUT_S} s"
        time.sleep(0.2)


def _wait_for_end(cluster, job_id: str) -> dict:
    deadline = time.time() + JOB_TIMEOUT_S
    while (job := _job(cluster, job_id)).get("JobState") not in FINAL_STATES:
        assert time.time() < deadline, f"job {job_id} still {job} after {JOB_TIMEOUT_S} s"
        time.sleep(0.5)
    return job


def _saved_step(workdir: str) -> int:
    saved = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    try:
        return saved.latest_step()
    finally:
        saved.close()


def _assert_bit_identical(reference: str, workdir: str) -> None:
    (train_ref, eval_ref), (train_res, eval_res) = _final(reference), _final(workdir)
    assert train_res["step"] == train_ref["step"] == 16
    assert train_res["loss"] == train_ref["loss"] and eval_res["val_top1"] == eval_ref["val_top1"]
    _assert_each_step_once(workdir)


def _one_saved_line(output: str, reason: str = "SIGTERM") -> int:
    """The step of the one `SIGTERM: saved step N` line (process 0 logs it for every task)."""
    lines = [line for line in output.splitlines() if ": saved step " in line]
    assert len(lines) == 1 and lines[0].startswith(f"{reason}: saved step "), output[-3000:]
    return int(re.search(r"saved step (\d+)", lines[0]).group(1))


@pytest.fixture(scope="module")
def srun_run(cluster, data_dir, tmp_path_factory):
    """(workdir, output, seconds) of one uninterrupted `srun --ntasks=2 ... --multihost` smoke run."""
    workdir = str(tmp_path_factory.mktemp("srun") / "run")
    start = time.time()
    proc = _srun(cluster, workdir, data_dir, "reference")
    output, _ = proc.communicate(timeout=JOB_TIMEOUT_S)
    assert proc.returncode == 0, output[-3000:]
    return workdir, output, time.time() - start


def test_srun_two_tasks_match_one_process(srun_run, one_process_reference):
    """jax.distributed.initialize() finds both tasks from SLURM's environment alone; the run
    equals the 1-process, 2-device one up to the all-reduce order (as under launch_local)."""
    workdir, output, seconds = srun_run
    assert "2 devices, 2 process(es)" in output
    _assert_matches_one_process(one_process_reference[0], workdir)
    print(f"srun --ntasks=2 smoke run: {seconds:.0f} s")


def test_preempted_twice_then_requeued_resumes_bit_identical(cluster, srun_run, data_dir, tmp_path):
    """One run preempted twice, then requeued, each time resuming from the step it saved:
    1. srun job, `scancel --signal=TERM` (what `--signal=TERM@N` delivers): every task gets SIGTERM,
       all save the same step (one line), srun exits 0;
    2. resubmitted with train.sbatch, then `scancel --batch --signal=TERM` (what the file's
       `--signal=B:TERM@N` delivers: the batch shell only): the script passes it on to the tasks,
       they save, the job ends COMPLETED with exit 0;
    3. resubmitted, then `scontrol requeue` (a node failure or preemption does the same): the tasks
       get SIGTERM and save, the job starts again on its own (after cred_expire), resumes (same
       command, same workdir) and ends bit-identical to the uninterrupted srun run, each step
       logged once; the log keeps every attempt (--open-mode=append)."""
    workdir = str(tmp_path / "run")
    proc = _srun(cluster, workdir, data_dir, "preempted")
    job_id = _job_id(cluster, "preempted")
    _wait_for_step(cluster, workdir, 4, job_id)
    signalled = time.time()
    cluster.run("scancel", "--signal=TERM", job_id)
    output, _ = proc.communicate(timeout=120)
    print(f"scancel --signal=TERM -> srun exit {proc.returncode} in {time.time() - signalled:.1f} s")
    assert proc.returncode == 0, output[-3000:]
    assert output.count("SIGTERM: saving at the next step boundary") == 2  # Each task got it.
    first = _one_saved_line(output)
    assert first == _saved_step(workdir) < 16

    batch_signal = ["scancel", "--batch", "--signal=TERM"]
    output, job_id = _sbatch_until(cluster, workdir, data_dir, tmp_path / "batch.out", first, batch_signal)
    job = _job(cluster, job_id)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0" and job["Restarts"] == "0", output[-3000:]
    second = _one_saved_line(output)
    assert first < second == _saved_step(workdir) < 16

    requeue = ["scontrol", "requeue"]
    output, job_id = _sbatch_until(cluster, workdir, data_dir, tmp_path / "requeued.out", second, requeue)
    job = _job(cluster, job_id)
    assert job["JobState"] == "COMPLETED" and job["ExitCode"] == "0:0" and job["Restarts"] == "1", output[-3000:]
    third = _one_saved_line(output)
    assert second < third < 16 and output.count("Resuming from") == 2
    assert output.index(f"step {second}.") < output.index(f"step {third}.")  # Resumed twice, in order.
    _assert_bit_identical(srun_run[0], workdir)


def _sbatch_until(cluster, workdir: str, data_dir: str, log, after: int, fault: list[str]):
    """Submits train.sbatch (resuming from step `after`), runs `fault JOBID` two steps later and
    waits for the job's end; returns (its log, its id)."""
    rows = len(_rows(workdir))
    job_id = _sbatch(cluster, workdir, data_dir, str(log))
    _wait_for_step(cluster, workdir, after + 2, job_id, after=rows)
    signalled = time.time()
    cluster.run(*fault, job_id)
    restarted = None
    while (job := _job(cluster, job_id)).get("JobState") not in FINAL_STATES:
        if restarted is None and job.get("Restarts") == "1" and job.get("JobState") == "RUNNING":
            restarted = time.time() - signalled
        assert time.time() - signalled < JOB_TIMEOUT_S, f"job {job_id} still {job}"
        time.sleep(0.5)
    again = f", running again after {restarted:.0f} s" if restarted else ""
    print(f"{' '.join(fault)} -> {job}{again}, ended after {time.time() - signalled:.0f} s")
    with open(log) as f:
        output = f.read()
    assert f"Resuming from {os.path.join(workdir, 'checkpoints')} step {after}." in output, output[-3000:]
    return output, job_id


def test_a_killed_task_ends_the_job_at_once_with_one_line(cluster, data_dir, tmp_path):
    """kill -9 of one task of a train.sbatch job: the other's next collective fails, it names the
    lost task in one line (exit 3); srun --kill-on-bad-exit ends the step; the job FAILED with the
    killed task's 137, not requeued (a task failure is not a node failure: resubmit); the
    checkpoints written before stay intact."""
    workdir, log = str(tmp_path / "run"), str(tmp_path / "job.out")
    job_id = _sbatch(cluster, workdir, data_dir, log)
    _wait_for_step(cluster, workdir, 6, job_id)
    listed = cluster.run("scontrol", "listpids", job_id).stdout.splitlines()[1:]  # PID JOBID STEPID LOCALID GLOBALID
    (pid,) = [int(f[0]) for f in map(str.split, listed) if f[2] == "0" and f[4] == "1" and _is_train(f[0])]
    os.kill(pid, signal.SIGKILL)
    killed = time.time()
    job = _wait_for_end(cluster, job_id)
    ended_s = time.time() - killed
    print(f"kill -9 of task 1 -> {job} in {ended_s:.1f} s")
    with open(log) as f:
        output = f.read()
    assert job["JobState"] == "FAILED" and job["ExitCode"] == "137:0" and job["Restarts"] == "0", output[-3000:]
    assert ended_s < 60
    assert "lost process 1 of 2" in _one_error_line(output) and "task 0: Exited with exit code 3" in output
    assert 4 <= _saved_step(workdir) < 16


def _is_train(pid: str) -> bool:
    """Whether the process is a train.py task (listpids also lists the step's slurmstepd helpers)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"train.py" in f.read()
    except OSError:
        return False


def _one_error_line(output: str) -> str:
    """The jaxres error every task printed (the same line from each), of which there is one."""
    errors = {line for line in output.splitlines() if line.startswith("jaxres error:")}
    assert len(errors) == 1 and "Traceback" not in output, output[-3000:]
    return errors.pop()


def test_multihost_outside_a_cluster_is_one_line(data_dir, tmp_path):
    """No SLURM at all (this test needs no cluster): one line naming srun and the explicit flags."""
    env = {k: v for k, v in _env(1).items() if not k.startswith(("SLURM_", "OMPI_"))}
    result = subprocess.run(_train_cmd(str(tmp_path / "w"), data_dir, "--multihost"), env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert result.returncode == 2
    assert "found no cluster to join" in _one_error_line(result.stderr)


def test_multihost_in_a_batch_script_without_srun_is_one_line(cluster, data_dir, tmp_path):
    """An sbatch script that forgets srun: in a job but in no job step, JAX would find no cluster."""
    log = str(tmp_path / "job.out")
    wrap = " ".join(_train_cmd(str(tmp_path / "w"), data_dir, "--multihost"))
    result = cluster.run("sbatch", "--parsable", "--ntasks=2", f"--output={log}", f"--wrap={wrap}")
    job = _wait_for_end(cluster, result.stdout.strip())
    with open(log) as f:
        output = f.read()
    assert job["JobState"] == "FAILED" and job["ExitCode"] == "2:0", output[-3000:]
    assert "outside a job step: start train.py with srun" in _one_error_line(output)


@pytest.mark.parametrize(
    "tasks, extra, message",
    [
        (3, (), "not divisible by the 3 devices (3 process(es))"),  # 3 tasks, a batch of 32.
        (2, ("--num_processes=4",), "--multihost takes the process count and index from the cluster"),
    ],
)
def test_mismatched_task_counts_are_one_line(cluster, data_dir, tmp_path, tasks, extra, message):
    """Task counts that do not fit: the tasks stop with the same one line, no hang. srun's status
    is 2, or 143 when --kill-on-bad-exit ended a task before it reached the check itself."""
    cmd = ["srun", f"--ntasks={tasks}", "--kill-on-bad-exit=1"]
    cmd += _train_cmd(str(tmp_path / "w"), data_dir, "--multihost", *extra)
    start = time.time()
    result = subprocess.run(cmd, env=_job_env(cluster), cwd=REPO, capture_output=True, text=True,
                            timeout=JOB_TIMEOUT_S, check=False)  # fmt: skip
    output = result.stdout + result.stderr
    print(f"srun --ntasks={tasks} {' '.join(extra)}: exit {result.returncode} in {time.time() - start:.0f} s")
    assert result.returncode in (2, 128 + signal.SIGTERM), output[-3000:]
    assert message in _one_error_line(output)


def test_readme_shows_the_tested_sbatch_file():
    """README's SLURM recipe is this file, verbatim (no cluster needed)."""
    with open(SBATCH) as f, open(os.path.join(REPO, "README.md")) as readme:
        assert f"```bash\n{f.read()}```" in readme.read()
