"""What every benchmark shares: one timing loop and one description of the machine.

Timing: `timed` is the one place a call is timed to completion (JAX results are blocked
on, so async dispatch is never what is measured); `interleaved_times` repeats it, calling
several implementations in turn (A, B, C, A, B, C, ...) so that load from other jobs on a
shared host hits them alike; `call_times` and `best_time` are its one-runner forms.

Machine: a CPU figure depends on the CPU model, AVX-512 or not, the cores this process may
use, the measured sgemm rate and the load; `cpu_details` and `load_average` give them for
every benchmark's results.
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable
from typing import Any

import jax

from jaxres import flops
from jaxres.errors import ConfigError


def block(result: Any) -> Any:
    """Waits for the JAX arrays in `result` (any pytree; other leaves, e.g. torch tensors, pass)."""
    if isinstance(result, (jax.Array, list, tuple, dict)) or hasattr(result, "block_until_ready"):
        jax.block_until_ready(result)
    return result


def timed(run: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call of `run`, its JAX results waited for."""
    start = time.perf_counter()
    result = block(run())
    return time.perf_counter() - start, result


def interleaved_times(
    runners: dict[str, Callable[[], Any]], reps: int, warmup: int = 1
) -> dict[str, list[float]]:
    """Seconds of each call of each runner, the runners called in turn (A, B, C, A, B, C, ...).

    Args:
      runners: name -> a callable whose result holds what to wait for.
      reps: timed calls of each runner.
      warmup: untimed calls of each runner first (after compilation: compile before).
    """
    for run in runners.values():
        for _ in range(warmup):
            block(run())
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(reps):
        for name, run in runners.items():
            times[name].append(timed(run)[0])
    return times


def call_times(run: Callable[[], Any], reps: int, warmup: int = 0) -> list[float]:
    """Seconds of each of `reps` calls of `run`, after `warmup` untimed calls."""
    return interleaved_times({"run": run}, reps, warmup)["run"]


def best_time(run: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """Least seconds over `repeats` calls (the least disturbed by other jobs) and the last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        seconds, result = timed(run)
        best = min(best, seconds)
    return best, result


_CPU_DETAILS: dict[str, Any] = {}


def cpu_details() -> dict[str, Any]:
    """What a CPU figure depends on: CPU model, AVX-512 yes/no, cores, measured sgemm GFLOP/s.

    The sgemm rate (`flops.host_sgemm_flops`, 0.15 s on 2 cores) is measured once per
    process; on a shared host it also tells how contended the cores were.
    """
    if not _CPU_DETAILS:
        model, cpu_flags = flops.cpuinfo()
        _CPU_DETAILS.update(
            cpu_model=model,
            avx512=any(flag.startswith("avx512") for flag in cpu_flags),
            cores=flops.cpu_cores(),
            sgemm_gflops=round(flops.host_sgemm_flops() / 1e9, 1),
        )
    return dict(_CPU_DETAILS)


def load_average() -> str:
    """/proc/loadavg's 1, 5 and 15 minute figures, or "" where there is none."""
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return ""


def machine() -> dict[str, Any]:
    """`cpu_details` and the load average now."""
    return {**cpu_details(), "loadavg": load_average()}


def require_extra(module: str, extra: str, what: str) -> None:
    """Raises the one-line error naming the extra to install when `module` is missing."""
    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"{what} needs {module}, which is not installed: pip install -e '.[{extra}]'."
        )
