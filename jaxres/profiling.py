"""Where a training step's time goes, how far it is from the hardware, and a profiler window.

**Step-time breakdown** (`StepTimer`), with no host sync added to ordinary steps:

* `data_s`: host seconds per step spent in `next(batches)` (perf_counter around the call only);
* `device_s`: one step's device time, sampled at each log step: from the end of the step
  before it (waited for while the log step is already queued behind it, so the device never
  idles for it) to the end of the log step (whose metrics the log line fetches anyway);
* `step_s`: wall seconds per step between two log steps (evaluation and checkpoints left
  out by `paused()`, the log line too; compilation happens before the loop);
* `input_wait`: the fraction of that wall time the device sat idle for want of input,
  `min(data time, wall - steps x device_s) / wall`. While the device has work queued, the
  host's wait in `next()` overlaps it and does not count.

**FLOPs** are *counted* from the model's jaxpr: 2 x the multiply-adds of every convolution
and matmul, the convention of published figures (ResNet-50 at 224: 4.1 G multiply-adds =
8.2 GFLOPs forward). A train step is 3x the forward pass (the backward pass computes two
products per forward one: input and weight gradients). XLA's cost analysis of the compiled
step checks the count: it adds elementwise ops and skips the taps that land on zero padding
(ResNet-50 at 224: 7.94 GFLOPs forward, 23.7 for forward + backward, 2.98x).

**MFU** = achieved model FLOP/s / peak: `PEAK_TFLOPS` for known accelerators (dense, no
sparsity); on a CPU the *measured* sgemm rate of the host (numpy float32 2048 x 2048 matmul,
all cores), which is not a datasheet peak. A device missing from the table logs TFLOP/s only.

**Profiler window**: `config.profile_steps="START:END"` traces those steps with
`jax.profiler` into `WORKDIR/tb/plugins/profile/<time>/` (TensorBoard's Profile tab reads
`*.xplane.pb`; `perfetto_trace.json.gz` opens in https://ui.perfetto.dev).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import itertools
import math
import os
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.extend import core as jex_core

from jaxres.errors import ConfigError
from jaxres.metrics import log_line, read_rows

# Dense peak TFLOP/s per device (no structured sparsity), first regex matching
# `jax.Device.device_kind` wins: (pattern, bfloat16 / float16, float32, name). float32 on
# NVIDIA GPUs is TF32 on the tensor cores, which XLA uses for float32 convolutions and
# matmuls at the default precision; TPUs run float32 matmuls as bfloat16 passes.
PEAK_TFLOPS = (
    (r"H100 PCIe", 756.0, 378.0, "H100 PCIe"),
    (r"H100|H200", 989.0, 494.0, "H100 / H200 SXM"),
    (r"B200", 2250.0, 1100.0, "B200"),
    (r"A100", 312.0, 156.0, "A100"),
    (r"L40S", 362.0, 183.0, "L40S"),
    (r"\bL4\b", 121.0, 60.0, "L4"),
    (r"TPU v4", 275.0, 275.0, "TPU v4"),
    (r"TPU v5 ?lite|TPU v5e", 197.0, 197.0, "TPU v5e"),
    (r"TPU v5", 459.0, 459.0, "TPU v5p"),
    (r"TPU v6", 918.0, 918.0, "TPU v6e"),
)
# The host's sgemm is timed on n x n float32 matrices, n doubled from the first size until one
# product takes SGEMM_MIN_SECONDS (enough for BLAS to reach its rate: on 2 AVX2 cores one
# 1024 product takes 11 ms at 188-191 GFLOP/s, as fast as 2048's 191) or n reaches the last size.
SGEMM_SIZES = (1024, 2048, 4096)
SGEMM_MIN_SECONDS = 0.01
# Warn when the input pipeline blocked the step more than this fraction of the time, summed
# over at least INPUT_WARN_AFTER log intervals (the first, start-up, one excluded); then the
# sums start again, and the next warning waits INPUT_WARN_EVERY log lines.
INPUT_WARN_FRACTION = 0.10
INPUT_WARN_AFTER = 3
INPUT_WARN_EVERY = 50
# The breakdown keys of a metrics row; the progress line formats them as one phrase.
TIMING_KEYS = ("step_s", "data_s", "device_s", "input_wait", "tflops_per_device", "mfu")


# ---------------------------------------------------------------- FLOPs, parameters, peak


def count_flops(fn: Callable, *args: Any) -> dict[str, int]:
    """FLOPs (2 x multiply-adds) of every convolution and matmul in `fn(*args)`, by name scope.

    Traced only (`jax.make_jaxpr`, abstract args welcome): nothing is computed. The keys are
    the flax module paths (e.g. "ResNet/ResNet._stages/stage1_block1/conv1"). A convolution
    counts every tap, zero padding included, as published counts do.
    """
    counts: dict[str, int] = {}
    _walk(jax.make_jaxpr(fn)(*args).jaxpr, 1, counts)
    return counts


def _walk(jaxpr: Any, times: int, counts: dict[str, int], scope: str = "") -> None:
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        # A sub-jaxpr's names are relative to its call (a custom_vjp conv inside a flax module).
        key = "/".join(part for part in (scope, str(eqn.source_info.name_stack)) if part)
        flops = (
            _conv_flops(eqn)
            if name == "conv_general_dilated"
            else _dot_flops(eqn)
            if name == "dot_general"
            else 0
        )
        if flops:
            counts[key] = counts.get(key, 0) + flops * times
        subs = jex_core.jaxprs_in_params(eqn.params)
        if name == "cond":  # One branch runs: count the dearest.
            branches = [_walk_total(sub) for sub in subs]
            counts["cond"] = counts.get("cond", 0) + max(branches, default=0) * times
            continue
        for sub in subs:  # while loops: one trip (their count is not static).
            _walk(sub, times * (eqn.params["length"] if name == "scan" else 1), counts, key)


def _walk_total(jaxpr: Any) -> int:
    counts: dict[str, int] = {}
    _walk(jaxpr, 1, counts)
    return sum(counts.values())


def _conv_flops(eqn: Any) -> int:
    kernel = eqn.invars[1].aval.shape
    taps = math.prod(
        kernel[d] for d in eqn.params["dimension_numbers"].rhs_spec[1:]
    )  # in x spatial
    return 2 * math.prod(eqn.outvars[0].aval.shape) * taps


def _dot_flops(eqn: Any) -> int:
    (contracting, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval.shape
    return 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[d] for d in contracting)


def layer_group(path: str) -> str:
    """ "stem", "stageN", "head" or the path's own name ("final_norm"), from a module path."""
    for part in path.split("/"):
        match = re.match(r"(stem|stage\d+|head)(_|$)", part)
        if match:
            return match.group(1)
    return path.split("/")[-1] or "other"


def network_order(name: str) -> tuple[int, int]:
    """Sort key of layer / group names in the order data flows: stem, stage1.., final_norm,
    pre_logits, head, logits."""
    match = re.fullmatch(r"stage(\d+)", name)
    if match:
        return 1, int(match.group(1))
    order = ("stem", "", "final_norm", "pre_logits", "head", "logits")
    return (order.index(name) if name in order else len(order)), 0


@dataclasses.dataclass(frozen=True)
class ModelCost:
    """Parameters and counted forward FLOPs per image of a model at one image size.

    Attributes:
      params: parameter count (batch statistics excluded).
      forward_flops: per image, counted (see `count_flops`).
      groups: "stem" / "stageN" / "final_norm" / "head" -> (params, forward FLOPs per image).
      variables: the abstract variables (shapes only) the count was made with.
    """

    params: int
    forward_flops: int
    groups: dict[str, tuple[int, int]]
    variables: Any

    @property
    def train_flops(self) -> int:
        """Per image: forward + backward = 3x forward (the model FLOPs MFU is quoted in)."""
        return 3 * self.forward_flops


def model_cost(model: Any, image_size: int) -> ModelCost:
    """Counts `model`'s parameters and forward FLOPs per image (traced, nothing computed)."""
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
    groups: dict[str, list[int]] = {}
    for key, tree in variables["params"].items():
        size = sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))
        groups.setdefault(layer_group(key), [0, 0])[0] += size
    flops = count_flops(functools.partial(model.apply, train=False), variables, x)
    for path, value in flops.items():
        groups.setdefault(layer_group(path), [0, 0])[1] += value
    return ModelCost(
        params=sum(p for p, _ in groups.values()),
        forward_flops=sum(flops.values()),
        groups={k: tuple(groups[k]) for k in sorted(groups, key=network_order)},
        variables=variables,
    )


def xla_flops(stage: Any) -> float | None:
    """The "flops" of XLA's cost analysis of a `Lowered` or `Compiled` (None where unsupported).

    A compiled multi-device program is one device's share: multiply by the device count.
    """
    try:
        cost = stage.cost_analysis()
    except (NotImplementedError, RuntimeError):
        return None
    if isinstance(cost, (list, tuple)):  # Older JAX: one dict per program.
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


@dataclasses.dataclass(frozen=True)
class Peak:
    """A device's peak FLOP/s for MFU (None: unknown device) and where the figure comes from."""

    flops: float | None
    label: str
    short: str  # For tables: "sgemm" or "peak".


@functools.cache
def host_sgemm(repeats: int = 10) -> tuple[float, int]:
    """(FLOP/s, n) of a float32 n x n matmul on this host: numpy's BLAS on all cores, best of
    `repeats`, n from `SGEMM_SIZES` (see there). Measured once per process (0.15 s on 2 cores)."""
    for n in SGEMM_SIZES:
        a = np.random.default_rng(0).random((n, n), np.float32)
        a @ a  # Warm-up: the BLAS threads start.
        best = math.inf
        for _ in range(repeats):
            start = time.perf_counter()
            a @ a
            best = min(best, time.perf_counter() - start)
        if best >= SGEMM_MIN_SECONDS:
            break
    return 2 * n**3 / best, n


def host_sgemm_flops() -> float:
    """FLOP/s of this host's float32 matmul (`host_sgemm`)."""
    return host_sgemm()[0]


def device_peak(dtype: str) -> Peak:
    """The peak FLOP/s of one local device for a model computing in `dtype`."""
    device = jax.local_devices()[0]
    if device.platform == "cpu":
        sgemm, n = host_sgemm()
        per_device = sgemm / jax.local_device_count()
        return Peak(
            per_device,
            f"measured sgemm of this host, {sgemm / 1e9:.0f} GFLOP/s (numpy float32 {n}x{n}) over "
            f"{jax.local_device_count()} CPU device(s), not a datasheet peak",
            "sgemm",
        )
    return peak_for_kind(device.device_kind, dtype, device.platform)


def peak_for_kind(device_kind: str, dtype: str, platform: str = "gpu") -> Peak:
    """The `PEAK_TFLOPS` entry of an accelerator (`jax.Device.device_kind`) for `dtype`."""
    for pattern, half, single, name in PEAK_TFLOPS:
        if re.search(pattern, device_kind):
            tflops = single if dtype == "float32" else half
            kind = "tf32" if dtype == "float32" and platform == "gpu" else dtype
            return Peak(
                tflops * 1e12, f"{name} {kind} dense peak, {tflops:g} TFLOP/s per device", "peak"
            )
    return Peak(None, f"no peak known for {device_kind!r} (jaxres.profiling.PEAK_TFLOPS)", "peak")


# ------------------------------------------------------------------------ step-time breakdown


class StepTimer:
    """Step-time breakdown, TFLOP/s and MFU between log steps (see the module docstring).

    Args:
      flops_per_step: model FLOPs of one optimizer step (train FLOPs per image x global batch).
      peak: of one device.
      num_devices: over which the step runs (all processes).
    """

    def __init__(self, flops_per_step: float, peak: Peak, num_devices: int):
        self.flops_per_step, self.peak, self.num_devices = flops_per_step, peak, num_devices
        self.intervals = 0  # Summaries so far.
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

    def summary(self) -> dict[str, float]:
        """The breakdown since the previous summary; starts a new interval."""
        now = time.perf_counter()
        wall = max(1e-9, now - (self._start if self._start is not None else now) - self._paused)
        steps = max(1, self._steps)
        device = min(self._device if self._device is not None else wall / steps, wall / steps)
        blocked = min(self._data, max(0.0, wall - steps * device))
        achieved = self.flops_per_step * steps / wall / self.num_devices
        out = {
            "step_s": wall / steps,
            "data_s": self._data / steps,
            "device_s": device,
            "input_wait": blocked / wall,
            "tflops_per_device": achieved / 1e12,
        }
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

    def input_warning(
        self, timing: dict[str, float], dataset: ml_collections.ConfigDict
    ) -> str | None:
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
        return input_bound_message(fraction, judged, timing, dataset)

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
    fraction: float, intervals: int, timing: dict[str, float], dataset: ml_collections.ConfigDict
) -> str:
    """The input-bound warning (`fraction` of the time over `intervals` log intervals; `timing`:
    the last one), naming the fixes that apply to `dataset`."""
    workers = f"now {dataset.num_workers}; this host has {os.cpu_count()} cores"
    fixes = [f"more decode workers (--config.dataset.num_workers, {workers})"]
    if not dataset.name.endswith("_resized_256"):
        fixes.append(
            "pre-resized JPEGs (scripts/prepare_data.py --resize_shorter 256, then "
            f"--config.dataset.name={dataset.name}_resized_256)"
        )
    if dataset.decoder != "dali":
        fixes.append(
            "the DALI GPU decoder (pip install -e '.[dali]'; --config.dataset.decoder=dali)"
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
    timer = StepTimer(
        cost.train_flops * config.batch_size, device_peak(config.model.dtype), num_devices
    )
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
    xla = xla_flops(compiled)
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


# ---------------------------------------------------------------------------- profiler window


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
            f"Profiled step {self.first}{last}: {where} (TensorBoard: pip install tensorboard "
            f"tensorboard-plugin-profile; tensorboard --logdir {self.logdir}, Profile tab. Perfetto: "
            "open its perfetto_trace.json.gz in https://ui.perfetto.dev)."
        )
