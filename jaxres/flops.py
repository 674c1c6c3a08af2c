"""FLOPs of a model and peak FLOP/s of a device: what MFU is measured against.

**FLOPs** are *counted* from the model's jaxpr: 2 x the multiply-adds of every convolution
and matmul, the convention of published figures (ResNet-50 at 224: 4.1 G multiply-adds =
8.2 GFLOPs forward). A train step is 3x the forward pass (the backward pass computes two
products per forward one: input and weight gradients). XLA's cost analysis of the compiled
step checks the count: it adds elementwise ops and skips the taps that land on zero padding
(ResNet-50 at 224: 7.94 GFLOPs forward, 23.7 for forward + backward, 2.98x).

**Peaks**: `PEAK_TFLOPS` for known accelerators (dense, no sparsity); on a CPU the
*measured* sgemm rate of the host (numpy float32 matmul, all cores), which is not a
datasheet peak. A device missing from the table logs TFLOP/s only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import platform
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jex_core

from jaxres.config_base import CACHE_DIR

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
# The best rate per kind of host (`record_host_rate`): a reference that load cannot lower.
SGEMM_RECORD = os.path.join(os.path.expanduser(CACHE_DIR), "sgemm.json")


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
        if name == "cond":  # One branch runs: count the dearest, under this equation's scope
            # (a conv's CPU kernel and its XLA twin are branches of `lax.platform_dependent`).
            if subs:
                dearest = max(subs, key=_walk_total)
                _walk(dearest, times, counts, key)
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


def layer_sort_key(name: str) -> tuple[int, int]:
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
        groups={k: tuple(groups[k]) for k in sorted(groups, key=layer_sort_key)},
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
    """FLOP/s of this host's float32 matmul measured now (`host_sgemm`): on a busy host, less
    than the host can do (benchmarks record it as a measure of contention)."""
    return host_sgemm()[0]


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    return cpuinfo()[0]


def cpuinfo() -> tuple[str, set[str]]:
    """(CPU model name, CPU flags) from /proc/cpuinfo; elsewhere what `platform` knows, no flags."""
    model, cpu_flags = platform.processor() or platform.machine() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    cpu_flags = set(line.split(":", 1)[1].split())
                if cpu_flags and line.startswith("model name"):
                    break
    except OSError:  # Not Linux: the model from `platform`, flags unknown.
        pass
    return model, cpu_flags


def cpu_cores() -> int:
    """CPUs this process may run on (its affinity), else the machine's count."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _host_key() -> str:
    """What a CPU's sgemm rate depends on: the CPU model, the cores this process may use, the
    BLAS kernel choice (`OPENBLAS_CORETYPE`) and numpy's version."""
    return f"{cpu_model()} | {cpu_cores()} cores | OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '')} | numpy {np.__version__}"


def _read_record() -> dict[str, float]:
    try:
        with open(SGEMM_RECORD) as f:
            return {k: float(v) for k, v in json.load(f).items()}
    except (OSError, ValueError, AttributeError):
        return {}


def record_host_rate(flops_per_s: float) -> float:
    """Keeps `flops_per_s` as this host's best float32 rate when it beats the recorded one
    (`SGEMM_RECORD`); returns the best. A read-only cache directory keeps the best in memory."""
    record = _read_record()
    key = _host_key()
    if flops_per_s > record.get(key, 0.0):
        record[key] = flops_per_s
        with contextlib.suppress(OSError):
            os.makedirs(os.path.dirname(SGEMM_RECORD), exist_ok=True)
            tmp = f"{SGEMM_RECORD}.{os.getpid()}.tmp"
            with open(tmp, "w") as f:
                json.dump(record, f, indent=1, sort_keys=True)
            os.replace(tmp, SGEMM_RECORD)
    return max(flops_per_s, record.get(key, 0.0))


@functools.cache
def host_peak_flops() -> float:
    """The MFU reference of a CPU host: the best sgemm rate ever measured on this kind of host
    (`record_host_rate`), never a lower one measured now while other work loads the cores.
    One numpy sgemm timed at start-up under load read 47-239 GFLOP/s on one machine, and MFU
    against the low readings was 110-365 %."""
    return record_host_rate(host_sgemm_flops())


def device_peak(dtype: str) -> Peak:
    """The peak FLOP/s of one local device for a model computing in `dtype`."""
    device = jax.local_devices()[0]
    if device.platform == "cpu":
        sgemm, n = host_peak_flops(), host_sgemm()[1]
        per_device = sgemm / jax.local_device_count()
        return Peak(
            per_device,
            f"best measured sgemm of this host, {sgemm / 1e9:.0f} GFLOP/s (numpy float32 {n}x{n}, "
            f"kept in {SGEMM_RECORD}) over {jax.local_device_count()} CPU device(s), not a datasheet peak",
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
    return Peak(None, f"no peak known for {device_kind!r} (jaxres.flops.PEAK_TFLOPS)", "peak")
