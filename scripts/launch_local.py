"""Start N local processes of one command, as a cluster of N hosts would.

    python scripts/launch_local.py --num_processes 2 -- \
        python scripts/train.py --config configs/demo.py --workdir runs/demo2

Each process gets `--coordinator_address=127.0.0.1:PORT --num_processes=N
--process_id=i` appended and its own log prefix. On a CPU-only machine each
process sees one CPU device unless XLA_FLAGS says otherwise (gloo carries
the collectives). Exit status: the first non-zero one of the processes; a
SIGTERM / SIGINT is forwarded to all of them.
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading


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
    codes = [p.wait() for p in procs]
    for t in pumps:
        t.join(timeout=5)
    return next((c for c in codes if c), 0)


if __name__ == "__main__":
    sys.exit(main())
