"""Transparent huge pages for the host memory XLA:CPU allocates (a restart of the script).

XLA:CPU allocates each execution's temporary buffers with glibc's `malloc`, which maps a
fresh region for every large allocation and unmaps it on free: a ResNet-18 @112 train step
(batch 32) maps and unmaps 273 MB per step and takes 67,000 page faults on first touch,
about a fifth of the step's CPU time in the kernel. glibc >= 2.35 can ask for transparent
huge pages on the regions it maps (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, which calls
`madvise(MADV_HUGEPAGE)`; the kernel's `transparent_hugepage/enabled` must be `madvise` or
`always`): then a step takes about 250 faults, and the CPU train step ran 1.3-1.4x faster
(benchmarks/README.md). PyTorch's CPU allocator does the same for its large tensors.

glibc reads its tunables once, when the process starts, so `restart_with_huge_pages` (called
by every script through `cli.parse_flags`, before any JAX computation) restarts the script in
place with the tunable added (`os.execve`: same PID and arguments, the environment plus the
tunable). It does nothing when the tunable is already set, when the kernel has transparent
huge pages off or always on, off Linux, or with `JAXRES_HUGE_PAGES=0`. `make` exports the
tunable, so the tests' and the demo's scripts start with it and never restart.
"""

from __future__ import annotations

import os
import sys

ENV_SWITCH = "JAXRES_HUGE_PAGES"
TUNABLE = "glibc.malloc.hugetlb=1"
_THP_MODE = "/sys/kernel/mm/transparent_hugepage/enabled"


def thp_mode(path: str = _THP_MODE) -> str | None:
    """The kernel's transparent-huge-page mode ("always", "madvise", "never"), None if unknown."""
    try:
        with open(path) as f:
            text = f.read()
    except OSError:
        return None
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else None


def with_tunable(environ: dict[str, str]) -> dict[str, str] | None:
    """`environ` with the huge-page tunable added, or None when no restart is wanted."""
    if environ.get(ENV_SWITCH, "1") == "0" or "glibc.malloc.hugetlb" in environ.get(
        "GLIBC_TUNABLES", ""
    ):
        return None
    if not sys.platform.startswith("linux") or thp_mode() != "madvise":
        return None
    env = dict(environ)
    env["GLIBC_TUNABLES"] = ":".join(filter(None, [environ.get("GLIBC_TUNABLES"), TUNABLE]))
    return env


def restart_with_huge_pages() -> None:
    """Restarts this script with glibc's huge-page tunable (module docstring); else returns."""
    env = with_tunable(dict(os.environ))
    # Only a script run as the program restarts, never a test runner or a notebook.
    if env is None or not getattr(sys, "orig_argv", None) or "pytest" in sys.modules:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, list(sys.orig_argv), env)
    except OSError:  # An odd interpreter path: run on without huge pages.
        return
