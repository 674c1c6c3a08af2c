"""What a run prints: one-line logs from process 0, progress bars, the training progress line.

Every module prints through here, so a multi-process run prints once and a
log without a terminal still shows a long loop moving.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import jax


def progress_line(
    step: int, total_steps: int, steps_per_epoch: int, scalars: Mapping[str, Any], extra: str = ""
) -> str:
    """`step N/M | epoch | name value ... | extra | ETA h:mm:ss` (`extra`: preformatted;
    `scalars["eta_s"]` gives the ETA)."""
    epoch = step / steps_per_epoch
    eta = scalars.get("eta_s", 0.0)
    parts = [f"step {step}/{total_steps}", f"epoch {epoch:.2f}"]
    parts += [f"{k} {v:.4g}" for k, v in scalars.items() if k not in ("eta_s", "epoch") and isinstance(v, float)]
    parts += [extra] if extra else []
    parts.append(f"ETA {int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}")
    return " | ".join(parts)


def log_line(text: str) -> None:
    """Console output from process 0 only."""
    if jax.process_index() == 0:
        print(text, flush=True)


PROGRESS_LINE_SECONDS = 15.0  # Without a terminal: one progress line this often.


def progress_bar(iterable: Iterable, total: int, desc: str, unit: str = "batch") -> Iterator:
    """Progress of a long loop on process 0: a tqdm bar on a terminal, else a line every 15 s.

    Logs and CI capture stderr without a terminal, where a bar does not draw; the
    periodic lines keep a long evaluation or feature pass from looking hung.
    """
    if jax.process_index() != 0:
        yield from iterable
        return
    if sys.stderr.isatty():
        from tqdm import tqdm

        yield from tqdm(iterable, total=total, desc=desc, unit=unit, leave=False, mininterval=1.0)
        return
    start = last = time.perf_counter()
    for done, item in enumerate(iterable, 1):
        yield item
        now = time.perf_counter()
        if now - last >= PROGRESS_LINE_SECONDS and done < total:
            last = now
            print(f"{desc}: {done} of {total} ({100 * done // max(total, 1)}%), {now - start:.0f} s",
                  file=sys.stderr, flush=True)
