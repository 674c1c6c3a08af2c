"""A one-node SLURM cluster on this host, started and stopped by the tests.

    cluster = SlurmCluster(tmp_dir)
    cluster.start()                                   # munged, slurmctld, slurmd; waits for `idle`
    subprocess.run(["srun", "-n2", "hostname"], env=cluster.env())
    cluster.stop()                                    # ends its jobs, then the three daemons it started

Everything lives in `root`: slurm.conf, the munge key and socket, state, spool and logs, so a
second test run, or a stale cluster of an earlier one, does not collide with this one (ports
are chosen free, the munge socket and the job ids are this cluster's own). The daemons run in
the foreground (`-D`, `-F`) as children of the tests: they are stopped by PID, never by name.

Needs Debian's `slurm-wlm` and `munge` (`apt-get install slurm-wlm munge`) and root (slurmd
starts each job's tasks as the submitting user). `unavailable_reason()` says, in one line, why a
cluster cannot start here.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("srun", "sbatch", "scancel", "scontrol", "sinfo", "squeue", "sacct")
# The daemons are in /usr/sbin, which a non-login PATH may lack.
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/usr/local/sbin", "/sbin"])
PARTITION = "test"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
CRED_EXPIRE_S = 15


def unavailable_reason() -> str | None:
    """Why a cluster cannot start on this machine (one line), or None when it can."""
    missing = [name for name in DAEMONS + CLIENTS if shutil.which(name, path=_SEARCH_PATH) is None]
    if missing:
        return f"SLURM is not installed (no {', '.join(missing)}): as root, apt-get install slurm-wlm munge"
    if os.geteuid() != 0:
        return "SLURM's slurmd must run as root to start jobs: run the SLURM tests as root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node_name() -> str:
    """This host's short name when it resolves (what a real cluster's node list holds), else localhost.

    jax.distributed reads the coordinator's address from the job's node list, so the name must resolve.
    """
    name = socket.gethostname().split(".")[0]
    try:
        socket.gethostbyname(name)
    except OSError:
        return "localhost"
    return name


class SlurmCluster:
    """munged + slurmctld + slurmd for one node of `cpus` CPUs, every file under `root`."""

    def __init__(self, root: str | os.PathLike, cpus: int = 2):
        self.root = Path(root)
        self.cpus = cpus
        self.node = _node_name()
        self.conf = self.root / "slurm.conf"
        self._procs: dict[str, subprocess.Popen] = {}

    def env(self, base: dict | None = None) -> dict:
        """`base` (default: os.environ) plus what the SLURM clients need to reach this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        return env

    def run(self, *cmd: str, timeout: float = 60, check: bool = True) -> subprocess.CompletedProcess:
        """A SLURM client command against this cluster (its output as text)."""
        return subprocess.run(cmd, env=self.env(), capture_output=True, text=True, timeout=timeout, check=check)

    def start(self) -> None:
        """Writes the configuration, starts the three daemons and waits until the node is idle."""
        self.root.mkdir(parents=True, exist_ok=True)
        for sub in ("state", "spool", "log"):
            (self.root / sub).mkdir(exist_ok=True)
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        self._write_conf()
        try:
            self._start_daemons()
            self._wait_until_idle()
        except BaseException:
            self.stop()
            raise

    def _write_conf(self) -> None:
        r = self.root
        self.conf.write_text(
            "\n".join([
                "ClusterName=jaxrestests",
                f"SlurmctldHost={self.node}(127.0.0.1)",
                f"SlurmctldPort={_free_port()}",
                f"SlurmdPort={_free_port()}",
                "SlurmUser=root",
                "SlurmdUser=root",
                "AuthType=auth/munge",
                "CredType=cred/munge",
                # This cluster's own munged, not the system's; cred_expire is also how long a
                # requeued job waits before it may start again (default 120 s).
                f"AuthInfo=socket={r / 'munge.sock'},cred_expire={CRED_EXPIRE_S}",
                f"StateSaveLocation={r / 'state'}",
                f"SlurmdSpoolDir={r / 'spool'}",
                f"SlurmctldPidFile={r / 'slurmctld.pid'}",
                f"SlurmdPidFile={r / 'slurmd.pid'}",
                f"SlurmctldLogFile={r / 'log' / 'slurmctld.log'}",
                f"SlurmdLogFile={r / 'log' / 'slurmd.log'}",
                # Job ids (and so the coordinator port jax.distributed derives from them) differ
                # between runs of the tests.
                f"FirstJobId={random.randint(1000, 9_000_000)}",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "SelectType=select/cons_tres",
                "SchedulerType=sched/builtin",
                # A requeued job becomes eligible after cred_expire; the next scheduling pass starts
                # it, every sched_interval (default 60 s) when nothing else happens.
                "SchedulerParameters=sched_interval=2",
                "MpiDefault=none",
                "ReturnToService=2",
                "SlurmdParameters=config_overrides",  # CPUs as configured, whatever the host has.
                f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} State=UNKNOWN",
                f"PartitionName={PARTITION} Nodes={self.node} Default=YES MaxTime=INFINITE "
                + "State=UP OverSubscribe=FORCE:4",
                "",
            ])
        )

    def _start_daemons(self) -> None:
        r, conf = self.root, str(self.conf)
        commands = {
            "munged": ["munged", "-F", "--force", f"--socket={r / 'munge.sock'}", f"--key-file={r / 'munge.key'}",
                       f"--pid-file={r / 'munged.pid'}", f"--seed-file={r / 'munged.seed'}",
                       f"--log-file={r / 'log' / 'munged.log'}"],
            "slurmctld": ["slurmctld", "-D", "-f", conf],
            "slurmd": ["slurmd", "-D", "-f", conf, "-N", self.node],
        }  # fmt: skip
        for name, cmd in commands.items():
            with open(r / "log" / f"{name}.out", "w") as out:
                self._procs[name] = subprocess.Popen(
                    [shutil.which(cmd[0], path=_SEARCH_PATH), *cmd[1:]], env=self.env(), stdout=out,
                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                )  # fmt: skip
            if name == "munged":
                self._wait_for(lambda: (r / "munge.sock").exists(), "munged's socket")

    def _wait_until_idle(self) -> None:
        def idle() -> bool:
            result = self.run("sinfo", "-h", "-N", "-o", "%T", check=False, timeout=10)
            return result.returncode == 0 and result.stdout.strip() == "idle"

        self._wait_for(idle, f"node {self.node} idle in sinfo")

    def _wait_for(self, ready, what: str) -> None:
        deadline = time.time() + START_TIMEOUT_S
        while not ready():
            dead = [n for n, p in self._procs.items() if p.poll() is not None]
            if dead or time.time() > deadline:
                why = f"{dead[0]} exited" if dead else f"no {what} after {START_TIMEOUT_S:.0f} s"
                raise RuntimeError(f"test SLURM cluster did not start ({why}); logs: {self.root / 'log'}")
            time.sleep(0.2)

    def cancel_all_jobs(self) -> None:
        """Cancels every job of this cluster and waits until none is left."""
        if self._procs.get("slurmctld") is None or self._procs["slurmctld"].poll() is not None:
            return
        self.run("scancel", f"--partition={PARTITION}", check=False)
        deadline = time.time() + STOP_TIMEOUT_S
        while time.time() < deadline:
            result = self.run("squeue", "-h", "-o", "%i", check=False, timeout=10)
            if result.returncode or not result.stdout.strip():
                return
            time.sleep(0.5)

    def stop(self) -> None:
        """Ends this cluster's jobs, then stops exactly the daemons `start` started (SIGTERM, then SIGKILL)."""
        self.cancel_all_jobs()
        for name in reversed(DAEMONS):  # slurmd, slurmctld, then munged (the others use it until then).
            proc = self._procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
