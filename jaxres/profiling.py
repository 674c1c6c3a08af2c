"""The training step's clock: where a step's time goes, throughput, ETA, MFU, input-bound warning.

**Step-time breakdown** (`StepTimer`), with no host sync added to ordinary steps:

* `data_s`: host seconds per step spent in `next(batches)` (perf_counter around the call only);
* `device_s`: one step's device time, sampled at each log step: from the end of the step
  before it (waited for while the log step is already queued behind it, so the device never
  idles for it) to the end of the log step (whose metrics the log line fetches anyway);
* `step_s`: wall seconds per step between two log steps (evaluation and checkpoints left
  out by `paused()`, the log line too; compilation happens before the loop);
* `input_wait`: the fraction of that wall time the device sat idle for want of input,
  `min(data time, wall - steps x device_s) / wall`. While the device has work queued, the
  host's wait in `next()` overlaps it and does not count;
* `img_per_sec`: training images per `step_s`; `eta_s`: the steps left at the wall time per
  step since the previous log step, evaluation and checkpoints included (what the rest of
  the run will take).

**MFU** = achieved model FLOP/s / the device peak (`jaxres.flops`: counted model FLOPs, a
datasheet peak or, on a CPU, the host's measured sgemm). One clock: the progress line, the
metrics rows and the curves all read this one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxres.console import log_line
from jaxres import flops
from jaxres.flops import ModelCost, Peak, device_peak, model_cost, xla_flops
from jaxres.metrics import read_rows

# Warn when the input pipeline blocked the step more than this fraction of the time, summed
# over at least INPUT_WARN_AFTER log intervals (the first, start-up, one excluded); then the
# sums start again, and the next warning waits INPUT_WARN_EVERY log lines.
INPUT_WARN_FRACTION = 0.10
INPUT_WARN_AFTER = 3
INPUT_WARN_EVERY = 50
# The breakdown keys of a metrics row; the progress line formats them as one phrase.
TIMING_KEYS = ("step_s", "data_s", "device_s", "input_wait", "tflops_per_device", "mfu")


class StepTimer:
    """Step-time breakdown, TFLOP/s and MFU between log steps (see the module docstring).

    Args:
      flops_per_step: model FLOPs of one optimizer step (train FLOPs per image x global batch).
      peak: of one device.
      num_devices: over which the step runs (all processes).
      images_per_step: the global batch (for `img_per_sec`).
    """

    def __init__(self, flops_per_step: float, peak: Peak, num_devices: int, images_per_step: int = 0):
        self.flops_per_step, self.peak, self.num_devices = flops_per_step, peak, num_devices
        self.images_per_step = images_per_step
        self._raised = False  # The peak was raised to a step's rate (said once).
        self.intervals = 0  # Summaries so far.
        self._since: float | None = None  # The previous summary (or the first step): for the ETA.
        self._previous: Any = None  # The last step's metrics.
        self._last_warning: int | None = None
        self._blocked = self._wall = 0.0  # Sums over the intervals the warning judges.
        self._judged = 0
        self._reset()

    def _reset(self) -> None:
        self._start: float | None = None  # The interval starts at its first next().
        self._steps, self._data, self._device, self._paused = 0, 0.0, None, 0.0

    def next_batch(self, batches: Iterator) -> Any:
        """`next(batches)`, timed on the host (no device sync)."""
        start = time.perf_counter()
        if self._start is None:
            self._start = start
        if self._since is None:
            self._since = start
        batch = next(batches)
        self._data += time.perf_counter() - start
        self._steps += 1
        return batch

    def step(self, step_fn: Callable, state: Any, batch: Any, sample: bool) -> Any:
        """`(state, metrics) = step_fn(state, batch)`; with `sample` (log steps only), this step's
        device time: from the end of the step queued before it to its own end."""
        start = time.perf_counter()
        out = step_fn(state, batch)
        if sample:
            if self._previous is not None:  # Waits while this step is queued behind it: no bubble.
                jax.block_until_ready(self._previous)
                start = time.perf_counter()
            jax.block_until_ready(out[1])  # Its metrics: the log line fetches them anyway.
            self._device = time.perf_counter() - start
        self._previous = out[1]  # A reference, not a sync (the state itself is donated).
        return out

    @contextlib.contextmanager
    def paused(self, state: Any) -> Iterator[None]:
        """Leaves evaluation and checkpointing out of the step time: waits for the queued steps
        (which those wait for anyway: they read the state), then stops the clock."""
        jax.block_until_ready(state)
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._start is not None:
                self._paused += time.perf_counter() - start

    def summary(self, steps_left: int = 0) -> dict[str, float]:
        """The breakdown since the previous summary, and the ETA of `steps_left` more steps;
        starts a new interval."""
        now = time.perf_counter()
        wall = max(1e-9, now - (self._start if self._start is not None else now) - self._paused)
        steps = max(1, self._steps)
        device = min(self._device if self._device is not None else wall / steps, wall / steps)
        blocked = min(self._data, max(0.0, wall - steps * device))
        achieved = self.flops_per_step * steps / wall / self.num_devices
        everything = now - (self._since if self._since is not None else now)  # Pauses included.
        self._since = now
        out = {
            "img_per_sec": self.images_per_step * steps / wall,
            "eta_s": steps_left * everything / steps,
            "step_s": wall / steps,
            "data_s": self._data / steps,
            "device_s": device,
            "input_wait": blocked / wall,
            "tflops_per_device": achieved / 1e12,
        }
        if self.peak.flops and achieved > self.peak.flops:
            self._raise_peak(achieved)
        if self.peak.flops:
            out["mfu"] = achieved / self.peak.flops
        self.intervals += 1
        if self.intervals > 1:  # The first interval holds the pipeline's start-up.
            self._blocked, self._wall, self._judged = (
                self._blocked + blocked,
                self._wall + wall,
                self._judged + 1,
            )
        self._reset()
        return out

    def _raise_peak(self, achieved: float) -> None:
        """The step ran faster than the reference: a utilisation above 100 % is never true, so
        the reference becomes the step's own rate (kept for this host when it is a measured
        sgemm), said once."""
        if not self._raised:
            log_line(
                f"MFU reference raised: the step ran at {achieved / 1e9:.3g} GFLOP/s per device, above "
                f"the {self.peak.label}; MFU is measured against the fastest step rate from here on."
            )
        self._raised = True
        if self.peak.short == "sgemm":
            flops.record_host_rate(achieved * jax.local_device_count())
        label = f"{self.peak.label}, raised to the measured step rate {achieved / 1e9:.3g} GFLOP/s per device"
        self.peak = dataclasses.replace(self.peak, flops=achieved, label=label)

    def input_warning(self, timing: dict[str, float], config: ml_collections.ConfigDict) -> str | None:
        """A warning line when the input blocked the step more than `INPUT_WARN_FRACTION` of the
        time over the last `INPUT_WARN_AFTER` or more log intervals (see the constants)."""
        if self._judged < INPUT_WARN_AFTER:
            return None
        if (
            self._last_warning is not None
            and self.intervals - self._last_warning < INPUT_WARN_EVERY
        ):
            return None
        fraction, judged = self._blocked / self._wall, self._judged
        self._blocked = self._wall = 0.0
        self._judged = 0
        if fraction <= INPUT_WARN_FRACTION:
            return None
        self._last_warning = self.intervals
        return input_bound_message(fraction, judged, timing, config)

    def format(self, timing: dict[str, float]) -> str:
        """The breakdown as one phrase of the progress line."""
        rate = timing["tflops_per_device"]
        rate_text = (
            f"{rate:.3g} TFLOP/s/device" if rate >= 1 else f"{1000 * rate:.3g} GFLOP/s/device"
        )
        text = (
            f"step {timing['step_s']:.3g} s: data {timing['data_s']:.2g} s, device {timing['device_s']:.3g} s, "
            f"input wait {100 * timing['input_wait']:.0f}% | {rate_text}"
        )
        if "mfu" in timing:
            text += f", MFU {100 * timing['mfu']:.1f}% of {self.peak.short}"
        return text


def input_bound_message(
    fraction: float, intervals: int, timing: dict[str, float], config: ml_collections.ConfigDict
) -> str:
    """The input-bound warning (`fraction` of the time over `intervals` log intervals; `timing`:
    the last one), naming the fixes that apply to a run of `config`."""
    dataset = config.dataset
    workers = f"now {config.input.num_workers}; this host has {os.cpu_count()} cores"
    fixes = [f"more decode workers (--config.input.num_workers, {workers})"]
    if not dataset.name.endswith("_resized_256"):
        fixes.append(
            "pre-resized JPEGs (scripts/prepare_data.py --resize_shorter 256, then "
            f"--config.dataset.name={dataset.name}_resized_256)"
        )
    if config.input.decoder != "dali":
        fixes.append(
            "the DALI GPU decoder (pip install -e '.[dali]'; --config.input.decoder=dali)"
        )
    now = f"now data {timing['data_s']:.2g} s of {timing['step_s']:.3g} s per step"
    return (
        f"WARNING: input-bound: the step waited for the input pipeline {100 * fraction:.0f}% of the "
        f"time over the last {intervals} log intervals ({now}). Feed it faster: {'; '.join(fixes)}."
    )


def run_timing(workdir: str) -> dict[str, float]:
    """Medians of a run's logged breakdown (`TIMING_KEYS`) over its log steps, the first one
    (start-up) left out when there are others; {} for a run that logged none."""
    rows = [r for r in read_rows(workdir) if "step_s" in r]
    rows = rows[1:] if len(rows) > 1 else rows
    keys = [k for k in TIMING_KEYS if rows and all(k in r for r in rows)]
    return {k: float(np.median([r[k] for r in rows])) for k in keys}


def training_timer(
    model: Any, config: ml_collections.ConfigDict, num_devices: int
) -> tuple[StepTimer, ModelCost]:
    """The timer of a training run (its model FLOPs per step, its devices' peak) and the count."""
    cost = model_cost(model, config.dataset.image_size)
    peak = device_peak(config.model.dtype)
    timer = StepTimer(cost.train_flops * config.batch_size, peak, num_devices, config.batch_size)
    return timer, cost


def compile_and_describe(
    step_fn: Callable,
    state: Any,
    batches: Iterator,
    timer: StepTimer,
    cost: ModelCost,
    config: ml_collections.ConfigDict,
) -> Iterator:
    """Compiles the train step on the first batch (the loop's first call then finds it cached)
    and logs once what a step costs: parameters, FLOPs, XLA's check, memory, the MFU peak.

    Returns:
      `batches`, first batch included.
    """
    first = next(batches)
    start = time.perf_counter()
    compiled = step_fn.lower(state, first).compile()
    compile_s = time.perf_counter() - start
    per_image = cost.forward_flops / 1e9
    line = (
        f"{config.model.name} at {config.dataset.image_size}px: {cost.params / 1e6:.2f} M parameters, "
        f"{per_image:.3g} GFLOPs/image forward ({per_image / 2:.3g} G multiply-adds, counted), train step "
        f"3x = {3 * per_image:.3g} GFLOPs/image"
    )
    # oneDNN's convolutions are custom calls, which XLA's cost analysis cannot count.
    convs_hidden = jax.default_backend() == "cpu" and config.model.cpu_conv == "onednn"
    xla = None if convs_hidden else xla_flops(compiled)
    if xla:  # One device's share of the global batch.
        xla_per_image = xla * timer.num_devices / config.batch_size / 1e9
        line += f" (XLA cost analysis of the compiled step: {xla_per_image:.3g}, {xla_per_image / per_image:.2f}x forward)"
    memory = _memory_analysis(compiled)
    if memory is not None:
        per_device = config.batch_size // timer.num_devices
        line += (
            f"; XLA temp buffers (activations, gradients, workspace) {memory.temp_size_in_bytes / 2**30:.3g} GiB "
            f"per device at {per_device} images/device"
        )
    log_line(f"{line}; compiled in {compile_s:.1f} s; MFU against {timer.peak.label}.")
    return itertools.chain([first], batches)


def _memory_analysis(compiled: Any) -> Any:
    try:
        return compiled.memory_analysis()
    except (NotImplementedError, RuntimeError):
        return None
