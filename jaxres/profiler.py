"""The profiler window: `config.profile_steps="START:END"` traces those steps with
`jax.profiler` into `WORKDIR/plugins/profile/<time>/`, beside the run's events (`WORKDIR/tb/...`
for a run started before Dec 2026: `jaxres.dashboard.logdir`). TensorBoard's Profile tab reads
`*.xplane.pb`; `perfetto_trace.json.gz` opens in https://ui.perfetto.dev.
"""

from __future__ import annotations

import glob
import os
import re
from typing import Any

import jax

from jaxres.console import log_line
from jaxres.errors import ConfigError


def parse_profile_steps(text: str) -> tuple[int, int] | None:
    """`config.profile_steps`: "" -> None, "START:END" -> (START, END), 1 <= START <= END."""
    if not text:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(text))
    if not match or not 1 <= int(match.group(1)) <= int(match.group(2)):
        raise ConfigError(
            f"config.profile_steps={text!r} is not START:END (steps, 1 <= START <= END, e.g. "
            "--config.profile_steps=10:15); '' turns profiling off."
        )
    return int(match.group(1)), int(match.group(2))


class ProfileWindow:
    """Traces steps START..END of `config.profile_steps` with `jax.profiler` into `logdir`.

    `close()` (e.g. `contextlib.closing` around the loop) stops a trace still running.
    """

    def __init__(self, profile_steps: str, logdir: str):
        self.window = parse_profile_steps(profile_steps)
        self.logdir = logdir
        self.active = False
        self.first: int | None = None

    def close(self) -> None:
        """Stops a trace still running (a run that ended or stopped before END)."""
        if self.active:
            self._stop(None)

    def before_step(self, step: int, state: Any) -> None:
        """Starts the trace at START (or at the first step of a run resumed inside the window)."""
        if (
            self.window
            and not self.active
            and self.first is None
            and self.window[0] <= step <= self.window[1]
        ):
            jax.block_until_ready(state)  # Earlier steps stay out of the trace.
            jax.profiler.start_trace(self.logdir, create_perfetto_trace=True)
            self.active, self.first = True, step

    def after_step(self, step: int, outputs: Any) -> None:
        """Stops the trace once step END has finished."""
        if self.active and step >= self.window[1]:
            jax.block_until_ready(outputs)
            self._stop(step)

    def _stop(self, step: int | None) -> None:
        jax.profiler.stop_trace()
        self.active = False
        traces = sorted(
            glob.glob(os.path.join(self.logdir, "plugins", "profile", "*")), key=os.path.getmtime
        )
        where = traces[-1] if traces else self.logdir
        last = f"..{step}" if step is not None and step != self.first else ""
        log_line(
            f"Profiled step {self.first}{last}: {where} (TensorBoard: pip install -e '.[tensorboard]'; "
            f"tensorboard --logdir {self.logdir}, Profile tab. Perfetto: "
            "open its perfetto_trace.json.gz in https://ui.perfetto.dev)."
        )
