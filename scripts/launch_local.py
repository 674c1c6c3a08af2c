r"""Start N local processes of one command, as a cluster of N hosts would.

    python scripts/launch_local.py --num_processes 2 -- \
        python scripts/train.py --config configs/demo.py --workdir runs/demo2

Each process gets `--coordinator_address=127.0.0.1:PORT --num_processes=N
--process_id=i` appended and its own log prefix. On a CPU-only machine each
process sees one CPU device unless XLA_FLAGS says otherwise (gloo carries
the collectives). A SIGTERM / SIGINT is forwarded to all of them.

When one process fails (a non-zero exit, kill -9), the launcher names it and
ends the others (SIGTERM, then SIGKILL after GRACE_S seconds), so a dead peer
never leaves the rest waiting; re-running the same command resumes from the last
complete checkpoint. Exit status: the first failure's (128 + N for signal N),
else 0.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

GRACE_S = 10.0  # After a failure: how long the others get to stop before SIGKILL.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pump(stream, prefix: str) -> None:
    for line in iter(stream.readline, b""):
        sys.stdout.write(f"{prefix}{line.decode(errors='replace')}")
        sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_processes", type=int, required=True)
    parser.add_argument("--port", type=int, default=0, help="Coordinator port (default: a free one).")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.num_processes < 1:
        parser.error("give --num_processes N >= 1 and a command after --")
    address = f"127.0.0.1:{args.port or free_port()}"
    procs, pumps = [], []
    for i in range(args.num_processes):
        flags = [f"--coordinator_address={address}", f"--num_processes={args.num_processes}", f"--process_id={i}"]
        proc = subprocess.Popen(command + flags, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=dict(os.environ))
        procs.append(proc)
        pumps.append(threading.Thread(target=_pump, args=(proc.stdout, f"[{i}] "), daemon=True))
        pumps[-1].start()

    def forward(signum, frame):
        for p in procs:
            p.send_signal(signum)

    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    failure = _wait_for_all_or_a_failure(procs)
    if failure is not None:
        i, code = failure
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with status {code}"
        print(f"[launch_local] process {i} {how}; ending the other processes.", flush=True)
        _end(procs)
    codes = [p.wait() for p in procs]
    for t in pumps:
        t.join(timeout=5)
    first = failure[1] if failure is not None else next((c for c in codes if c), 0)
    return 128 - first if first < 0 else first


def _wait_for_all_or_a_failure(procs: list[subprocess.Popen]) -> tuple[int, int] | None:
    """(index, return code) of the first process that fails, or None when all exit 0."""
    while True:
        codes = [p.poll() for p in procs]
        for i, code in enumerate(codes):
            if code not in (None, 0):
                return i, code
        if all(code == 0 for code in codes):
            return None
        time.sleep(0.2)


def _end(procs: list[subprocess.Popen]) -> None:
    """SIGTERM to the running processes, SIGKILL to those still running after GRACE_S."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.time() + GRACE_S
    while any(p.poll() is None for p in procs) and time.time() < deadline:
        time.sleep(0.2)
    for p in procs:
        if p.poll() is None:
            p.kill()


if __name__ == "__main__":
    sys.exit(main())
