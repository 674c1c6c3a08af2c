"""The device mesh, shardings, multi-process start-up and host -> global arrays.

One mesh axis, `data`: parameters are replicated, batches are sharded on their
batch axis. `jax.jit` with these shardings makes BatchNorm statistics global
(XLA inserts the all-reduce), with no `pmap`, `axis_name` or `pmean`.
"""

from __future__ import annotations

import collections
import itertools
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxres.errors import ConfigError

DATA_AXIS = "data"
# More CPU devices than this would force every batch size to divide by a large count.
MAX_CPU_DEVICES = 8


def use_one_cpu_device_per_core(max_devices: int = MAX_CPU_DEVICES) -> int | None:
    """Splits the host CPU into one XLA device per core (at most `max_devices`).

    One XLA:CPU program keeps only about 1.5 of 2 cores busy; the same program
    data-parallel over one device per core keeps both busy (measured on 2 cores:
    ResNet-50 features 23 -> 31-33 img/s, ResNetV2-50 training 3.3-3.8 -> 4.2-4.5 img/s).
    With jaxres's oneDNN convolutions installed (`models.onednn.installed()`) it sets one
    device instead: oneDNN's kernels use every core within each conv, and one device was
    measured faster than the split (ResNet-18 @112 train step, interleaved, 2 cores: 13.8 vs
    4.3 img/s, benchmarks/README.md). It only changes the CPU backend, so GPU hosts are
    unaffected. Leaves an
    explicit choice alone (`JAX_NUM_CPU_DEVICES`, or XLA_FLAGS
    `--xla_force_host_platform_device_count`) and does nothing once a backend
    has started. Must run before the first JAX computation.

    Returns:
      The number of CPU devices set, or None if it left the setting alone.
    """
    if "JAX_NUM_CPU_DEVICES" in os.environ or "xla_force_host_platform_device_count" in os.environ.get(
        "XLA_FLAGS", ""
    ):
        return None
    from jaxres.models import onednn  # A file check; the models package is not needed before.

    count = 1 if onednn.installed() else max(1, min(len(os.sched_getaffinity(0)), max_devices))
    try:
        jax.config.update("jax_num_cpu_devices", count)
    except RuntimeError:  # A backend is already running: too late, keep what it has.
        return None
    return count


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    auto: bool = False,
    heartbeat_timeout_seconds: int = 100,
) -> None:
    """Starts multi-process JAX when asked to; a no-op for a single process.

    Args:
      coordinator_address: "host:port" of process 0 (generic schedulers).
      num_processes: total number of processes.
      process_id: this process's index.
      auto: call `jax.distributed.initialize()` with no arguments, so that JAX
        detects the cluster itself (SLURM, Open MPI, Cloud TPU, ...).
      heartbeat_timeout_seconds: a process silent this long is declared dead and the
        others are stopped (a hung collective is bounded by it).
    """
    explicit = coordinator_address is not None
    if not (explicit or auto):
        return
    if explicit and (num_processes is None or process_id is None):
        raise ConfigError(
            "--coordinator_address needs --num_processes and --process_id too "
            "(or use --multihost to let JAX detect a SLURM/MPI cluster)."
        )
    if not explicit and (num_processes is not None or process_id is not None):
        # jax.distributed would take them over the scheduler's own count: a count that differs
        # from the tasks started leaves every process waiting for the missing ones.
        raise ConfigError(
            "--multihost takes the process count and index from the cluster (SLURM: srun -n N): "
            "drop --num_processes / --process_id, or give them with --coordinator_address instead."
        )
    # CPU devices of different processes talk through gloo (the default refuses
    # cross-process collectives); GPU backends ignore this setting. It must be set
    # before anything touches a backend, so no `jax.default_backend()` check here.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if explicit:
        jax.distributed.initialize(
            coordinator_address, num_processes, process_id, heartbeat_timeout_seconds=heartbeat_timeout_seconds
        )
    else:
        try:
            jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_seconds)
        except ValueError as e:  # JAX detected no cluster: it cannot tell where process 0 is.
            if "coordinator_address" not in str(e):
                raise
            raise ConfigError(_no_cluster_message()) from None


def _no_cluster_message() -> str:
    """What to do when --multihost runs where JAX detects no cluster.

    JAX reads a SLURM job *step* (SLURM_STEP_NODELIST, SLURM_PROCID..., set by srun), Open MPI,
    Kubernetes or a Cloud TPU; without one, `jax.distributed.initialize()` raises a bare
    ValueError. An sbatch script that runs train.py without srun is in a job but not in a step.
    """
    if "SLURM_JOB_ID" in os.environ:
        return (
            f"--multihost in SLURM job {os.environ['SLURM_JOB_ID']} but outside a job step: start "
            "train.py with srun (one task per process), as scripts/slurm/train.sbatch does."
        )
    return (
        "--multihost found no cluster to join (no SLURM job step, Open MPI, Kubernetes or Cloud "
        "TPU): start it under srun (scripts/slurm/train.sbatch), or give --coordinator_address, "
        "--num_processes and --process_id (scripts/launch_local.py for processes on one machine)."
    )


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D `data` mesh over `devices` (default: every device of every process)."""
    devices = list(devices) if devices is not None else jax.devices()
    return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding of parameters and optimizer state: a full copy on every device."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, batch_axis: int = 0) -> NamedSharding:
    """Sharding of a batch along `batch_axis` over the `data` mesh axis."""
    return NamedSharding(mesh, P(*([None] * batch_axis), DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh, name: str = "batch_size") -> int:
    """Returns the per-process batch size after checking that everything divides.

    The one batch policy of every entry point (training, evaluation, features, transfer):
    a batch that does not divide over the devices is refused, never rounded.

    Args:
      name: the config key the size came from, or the flag (`--batch_size`) the user gave.

    Raises:
      ConfigError: quoting the batch size, device count and process count.
    """
    num_devices = mesh.devices.size
    num_processes = jax.process_count()
    setting, flag = (name, name) if name.startswith("--") else (f"config.{name}", f"--config.{name}")
    if global_batch_size <= 0 or global_batch_size % num_devices:
        raise ConfigError(
            f"{setting}={global_batch_size} is not divisible by the {num_devices} devices "
            f"({num_processes} process(es)); use a multiple of {num_devices}, "
            f"e.g. {flag}={max(1, round(global_batch_size / num_devices)) * num_devices}"
            + (" (or set JAX_NUM_CPU_DEVICES)." if mesh.devices.flat[0].platform == "cpu" else ".")
        )
    return process_batch_size(global_batch_size)


def process_batch_size(global_batch_size: int) -> int:
    """The rows of each global batch that this process loads (every process loads as many)."""
    return global_batch_size // jax.process_count()


def to_global(batch: Any, mesh: Mesh, batch_axis: int = 0) -> Any:
    """Assembles each process's slice of a batch (numpy) into global `jax.Array`s.

    Every process passes the rows it loaded; process p's rows become rows
    [p * n, (p + 1) * n) of the global batch, sharded over the `data` axis.
    """
    sharding = batch_sharding(mesh, batch_axis)
    num_processes = jax.process_count()

    def _one(x: np.ndarray) -> jax.Array:
        global_shape = list(x.shape)
        global_shape[batch_axis] *= num_processes
        return jax.make_array_from_process_local_data(sharding, x, tuple(global_shape))

    return jax.tree.map(_one, batch)


def prefetch_to_device(
    batches: Iterable[Any], mesh: Mesh, size: int = 2, batch_axis: int = 0
) -> Iterator[Any]:
    """Keeps `size` batches in flight to the devices (transfers are asynchronous)."""
    queue = collections.deque()
    iterator = iter(batches)
    for batch in itertools.islice(iterator, size):
        queue.append(to_global(batch, mesh, batch_axis))
    while queue:
        yield queue.popleft()
        for batch in itertools.islice(iterator, 1):
            queue.append(to_global(batch, mesh, batch_axis))


def fetch(tree: Any) -> Any:
    """Brings (replicated or fully addressable) arrays to host numpy."""
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def place(x: Any, sharding: jax.sharding.Sharding) -> jax.Array:
    """A host value (the same on every process) as a global array with `sharding`.

    Each process fills its own devices' shards; `jax.device_put` of a committed
    single-device array onto other hosts' devices is a cross-host transfer that the CPU
    backend refuses.
    """
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def replicate(tree: Any, mesh: jax.sharding.Mesh) -> Any:
    """Host (or single-device) arrays -> a copy on every device of `mesh`, any number of processes."""
    sharding = replicated(mesh)
    return jax.tree.map(lambda x: place(x, sharding), tree)


def gather_rows(x: jax.Array) -> np.ndarray:
    """A batch-sharded global array -> host numpy with every row, on every process."""
    if jax.process_count() == 1:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# A program that runs once (a fresh state, a model's initial weights): on CPU, compiling it
# without XLA's backend (LLVM) optimisations is 2.5-3x faster (2-core AVX2: ResNet-50's fresh
# state compile 21 s -> 8 s, run 0.8 s -> 3.5 s; the smoke model 4.9 s -> 1.5 s), nearly all of
# it the threefry random-number code of the initialisers. Other platforms keep their defaults
# (not measured there).
_CPU_RUN_ONCE_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def run_once(fn: Callable[..., Any], *args: Any, out_shardings: Any = None) -> Any:
    """`fn(*args)` jitted, compiled for a program run once (see above), and run.

    Args:
      fn: a jax-traceable function, e.g. `functools.partial(model.init, train=False)`.
      *args: its arguments (arrays; static ones go into `fn` with functools.partial).
      out_shardings: as `jax.jit`'s; None leaves the outputs where jit puts them.
    """
    jitted = jax.jit(fn) if out_shardings is None else jax.jit(fn, out_shardings=out_shardings)
    lowered = jitted.lower(*args)
    on_cpu = jax.default_backend() == "cpu"
    return lowered.compile(_CPU_RUN_ONCE_COMPILER_OPTIONS if on_cpu else None)(*args)
