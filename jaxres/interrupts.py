"""Stopping a run cleanly: SIGTERM and Ctrl-C turn into a save at the next step boundary.

    preemption = Preemption()              # in train_and_evaluate
    if preemption.should_stop(step, every): save(step); break
    preemption.restore()

The handlers only set a flag; the loop reads it between steps, so a signal never
lands inside a jitted step or an orbax save. With several processes the flag is
agreed through a collective at log steps: a signal that reaches one host only
(one preempted VM) still makes every process save the same step and exit 0.
A second Ctrl-C aborts at once, without saving (exit 130).

A process that dies (kill -9, a crashed host) breaks the next collective of the
others: `exit_if_a_peer_is_lost` turns that error into one line naming the lost
process and exit 3 right away, instead of a traceback followed by jax.distributed's
shutdown waiting for the dead process (about 100 s, then an abort). Re-running the
same command resumes every process from the last complete checkpoint.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)
ABORT_EXIT_CODE = 130  # 128 + SIGINT, as a shell reports an interrupted program.
PEER_LOST_EXIT_CODE = 3
# What a collective says when the process at the other end is gone (gloo on CPU, NCCL / the
# coordination service elsewhere).
_PEER_LOST_MARKERS = ("Connection closed by peer", "Connection reset by peer", "Gloo", "heartbeat", "UNAVAILABLE")
LIVE_NODES_TIMEOUT_S = 30.0


class Preemption:
    """Turns SIGTERM / SIGINT into a flag the training loop reads at step boundaries."""

    def __init__(self):
        self.requested: str | None = None  # The signal's name once one arrived.
        self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.requested and signum == signal.SIGINT:
            print("Second Ctrl-C: stopping now, without saving.", file=sys.stderr, flush=True)
            os._exit(ABORT_EXIT_CODE)
        self.requested = name  # Printed by whichever process got it (one preempted host, say).
        print(f"{name}: saving at the next step boundary, then stopping (Ctrl-C again: stop now).",
              file=sys.stderr, flush=True)  # fmt: skip

    def should_stop(self, step: int, every: int) -> bool:
        """Agreed by all processes, so that every one saves at the same step.

        With several processes agreeing costs a collective and a host sync, so
        they compare flags only every `every` steps (the log steps).
        """
        if jax.process_count() == 1:
            return self.requested is not None
        if step % every:
            return False
        return bool(multihost_utils.process_allgather(np.int32(self.requested is not None)).max())

    def reason(self) -> str:
        """What stopped the run: this process's signal, or a peer's."""
        return self.requested or "a signal to another process"

    def restore(self) -> None:
        """Puts the previous handlers back."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def exit_if_a_peer_is_lost() -> Iterator[None]:
    """Ends this process with one line and exit 3 when a collective failed because a peer died."""
    try:
        yield
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1 or not any(m in str(e) for m in _PEER_LOST_MARKERS):
            raise
        cause = str(e).strip().splitlines()[0][:160]
        print(
            f"jaxres error: lost {_lost_processes()} ({cause}); process {jax.process_index()} stops too. "
            "Re-run the same command on every host to resume from the last complete checkpoint.",
            file=sys.stderr,
            flush=True,
        )
        os._exit(PEER_LOST_EXIT_CODE)  # Not sys.exit: jax.distributed's shutdown would wait for the dead.


def _lost_processes() -> str:
    """Which process is gone: the other one of two, else what the coordination service says."""
    count, me = jax.process_count(), jax.process_index()
    if count == 2:
        return f"process {1 - me} of 2"
    found: list[int] = []

    def ask() -> None:  # Returns once the service has noticed the missing heartbeats.
        from jax._src import distributed

        live = distributed.global_state.client.get_live_nodes(list(range(count)))
        found.extend(p for p in range(count) if p not in live)

    thread = threading.Thread(target=ask, daemon=True)
    thread.start()
    thread.join(LIVE_NODES_TIMEOUT_S)
    return f"process(es) {', '.join(map(str, found))} of {count}" if found else f"another of the {count} processes"

