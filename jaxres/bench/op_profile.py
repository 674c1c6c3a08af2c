"""Where a CPU train step goes: every convolution shape of a model, forward and both gradients, JAX vs PyTorch.

For one model / image size / batch, the profile

* takes the model's convolution shapes by tracing its training forward pass
  (`conv_general_dilated` equations of the jaxpr) and its BatchNorm shapes from
  `capture_intermediates`, each with the number of times it occurs;
* times, per distinct shape, the forward conv, the input-gradient conv and the
  weight-gradient conv (each jitted on its own: `jax.vjp` of `lax.conv_general_dilated`,
  so XLA keeps only the gradient asked for) for every JAX implementation in `JAX_IMPLS`,
  and the same three in PyTorch (`F.conv2d`, `aten.convolution_backward` with one output
  mask each, channels_last, all cores); BatchNorm forward + backward and the optimizer
  update of the whole parameter tree are one row each; optionally the whole train step;
* interleaves the implementations call by call (A, B, C, A, B, C, ...) so that load from
  other processes on a shared host hits all of them alike, and reports medians.

The stem conv reads the images, which need no gradient, so its input gradient is not
counted (neither framework computes it in a train step).

Sums are weighted by occurrence; `format_markdown` prints category | ms per
implementation | torch / jax ratio | GFLOP/s. `common.machine()` records what the figures
depend on: CPU model, AVX-512, cores, measured sgemm GFLOP/s, load average.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import statistics
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend import core as jex_core
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxres import parallel
from jaxres.bench import common
from jaxres.models import cpu_conv

_NHWC = ("NHWC", "HWIO", "NHWC")
KINDS = ("forward", "input_grad", "weight_grad")
# JAX implementations timed per conv, "<backend> <devices>": backend "xla" is
# `lax.conv_general_dilated`, "matmul" / "onednn" are `cpu_conv.conv` with that backend (the
# matmul backward / oneDNN's kernels), "matmul-fwd" also times `forward_matmul` as the forward.
# "2dev" shards the batch over one CPU device per core, as the trainer's step does; "1dev" is one
# device (one XLA program on the shared intra-op thread pool).
JAX_IMPLS = ("xla 1dev", "xla 2dev", "matmul 2dev", "onednn 1dev", "onednn 2dev")


@dataclasses.dataclass(frozen=True)
class ConvShape:
    """One convolution of the network: NHWC input, HWIO kernel, stride, symmetric or explicit pads."""

    n: int
    h: int
    w: int
    cin: int
    cout: int
    kh: int
    kw: int
    stride: tuple[int, int]
    pads: tuple[tuple[int, int], tuple[int, int]]

    @property
    def out_hw(self) -> tuple[int, int]:
        return ((self.h + sum(self.pads[0]) - self.kh) // self.stride[0] + 1,
                (self.w + sum(self.pads[1]) - self.kw) // self.stride[1] + 1)

    @property
    def flops(self) -> float:
        """2 x multiply-adds of one of the three convs (forward, input grad and weight grad are equal)."""
        oh, ow = self.out_hw
        return 2.0 * self.n * oh * ow * self.cout * self.cin * self.kh * self.kw

    def label(self) -> str:
        return (f"{self.kh}x{self.kw}/{self.stride[0]} {self.cin}->{self.cout} @{self.h}x{self.w}"
                f" pad {self.pads[0][0]}")


# ---------------------------------------------------------------------------------------------
# Shapes


def _convs_in(jaxpr: Any) -> Iterator[Any]:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "conv_general_dilated":
            yield eqn
        for sub in jex_core.jaxprs_in_params(eqn.params):
            yield from _convs_in(sub)


def model_shapes(model_name: str, image_size: int, batch_size: int) -> tuple[
        collections.Counter[ConvShape], collections.Counter[tuple[int, ...]], Any]:
    """(conv shapes, BatchNorm input shapes, abstract variables) of one training forward pass, fp32."""
    from jaxres import models
    from jaxres.models import batchnorm

    net = models.create_model(model_name, num_classes=1000, dtype="float32")
    x = jax.ShapeDtypeStruct((batch_size, image_size, image_size, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: net.init(jax.random.key(0), x, train=False), x)

    def forward(v, x):
        return net.apply(v, x, train=True, mutable=["batch_stats", "intermediates"],
                         capture_intermediates=lambda m, _: isinstance(m, batchnorm.BatchNorm))

    convs: collections.Counter[ConvShape] = collections.Counter()
    for eqn in _convs_in(jax.make_jaxpr(forward)(variables, x).jaxpr):
        p = eqn.params
        lhs, rhs = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape
        dn = p["dimension_numbers"]
        if dn != lax.conv_dimension_numbers(lhs, rhs, _NHWC):
            raise ValueError(f"not an NHWC/HWIO conv: {dn}")
        if p["feature_group_count"] != 1 or any(d != 1 for d in (*p["lhs_dilation"], *p["rhs_dilation"])):
            raise ValueError("grouped or dilated convs are not profiled")
        convs[ConvShape(*lhs, rhs[3], rhs[0], rhs[1], tuple(p["window_strides"]),
                        tuple(tuple(int(v) for v in pair) for pair in p["padding"]))] += 1
    _, state = jax.eval_shape(forward, variables, x)
    norms: collections.Counter[tuple[int, ...]] = collections.Counter(
        leaf.shape for leaf in jax.tree_util.tree_leaves(state.get("intermediates", {}))
    )
    return convs, norms, variables


# ---------------------------------------------------------------------------------------------
# Timed callables


def _mesh_shardings(n_dev: int) -> tuple[Any, Any]:
    """(batch-sharded, replicated) placements on the first `n_dev` CPU devices."""
    if n_dev == 1:
        device = jax.devices()[0]
        single = jax.sharding.SingleDeviceSharding(device)
        return single, single
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:n_dev]), (parallel.DATA_AXIS,))
    return NamedSharding(mesh, P(parallel.DATA_AXIS)), NamedSharding(mesh, P())


def _conv_fns(backend: str, shape: ConvShape) -> dict[str, Callable[..., jax.Array]]:
    """forward(x, w), input_grad(x, w, g), weight_grad(x, w, g) of one conv, with `backend`."""
    strides, pads = shape.stride, shape.pads
    def conv(x, w):
        return cpu_conv.conv(x, w, strides, pads, dimension_numbers=_NHWC,
                             backend="matmul" if backend == "matmul_fwd" else backend)

    def forward(x, w, g):
        del g
        if backend == "matmul_fwd":
            return forward_matmul(x, w, strides, pads)
        return conv(x, w)

    def input_grad(x, w, g):
        return jax.vjp(lambda x: conv(x, w), x)[1](g)[0]

    def weight_grad(x, w, g):
        return jax.vjp(lambda w: conv(x, w), w)[1](g)[0]

    return {"forward": forward, "input_grad": input_grad, "weight_grad": weight_grad}


def forward_matmul(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: cpu_conv.Pads,
                   precision: Any = None) -> jax.Array:
    """The forward conv as im2col + one matmul (a candidate the profile times, not used by `conv`)."""
    kh, kw, _, co = w.shape
    n, h, wd, _ = x.shape
    oh = (h + sum(pads[0]) - kh) // strides[0] + 1
    ow = (wd + sum(pads[1]) - kw) // strides[1] + 1
    patches = cpu_conv.patch_matrix(x, (kh, kw), strides, pads, (oh, ow))
    y = lax.dot_general(patches, w.reshape(-1, co), (((1,), (0,)), ((), ())), precision=precision)
    return y.reshape(n, oh, ow, co).astype(x.dtype)


def _jax_conv_runner(impl: str, shape: ConvShape, kind: str, data: dict[str, np.ndarray]) -> Callable[[], Any]:
    backend, devices = impl.split()
    backend = {"xla": "xla", "matmul": "matmul", "onednn": "onednn", "matmul-fwd": "matmul_fwd"}[backend]
    batch_sharding, replicated = _mesh_shardings(int(devices[0]))
    x = jax.device_put(data["x"], batch_sharding)
    g = jax.device_put(data["g"], batch_sharding)
    w = jax.device_put(data["w"], replicated)
    fn = jax.jit(_conv_fns(backend, shape)[kind])
    compiled = fn.lower(x, w, g).compile()
    return lambda: compiled(x, w, g)


def _torch_conv_runner(shape: ConvShape, kind: str, data: dict[str, np.ndarray]) -> Callable[[], Any]:
    import torch

    # NHWC numpy -> NCHW tensors in channels_last memory (no copy of the data's order).
    x = torch.from_numpy(data["x"]).permute(0, 3, 1, 2)
    g = torch.from_numpy(data["g"]).permute(0, 3, 1, 2)
    w = torch.from_numpy(np.ascontiguousarray(data["w"].transpose(3, 2, 0, 1))).contiguous(
        memory_format=torch.channels_last)
    (pt, pb), (pl, pr) = shape.pads
    if pt != pb or pl != pr:
        raise ValueError("torch rows need symmetric padding")
    stride, padding = list(shape.stride), [pt, pl]

    if kind == "forward":
        def run():
            return torch.nn.functional.conv2d(x, w, None, stride, padding)
    else:
        mask = [kind == "input_grad", kind == "weight_grad", False]
        index = 0 if kind == "input_grad" else 1

        def run():
            # aten.convolution_backward with one output asked for: what autograd calls,
            # with the real (channels_last) weight, so oneDNN sees the same layouts.
            return torch.ops.aten.convolution_backward(
                g, x, w, None, stride, padding, [1, 1], False, [0, 0], 1, mask)[index]
    return run


def _conv_data(shape: ConvShape, rng: np.random.Generator) -> dict[str, np.ndarray]:
    oh, ow = shape.out_hw
    return {
        "x": rng.standard_normal((shape.n, shape.h, shape.w, shape.cin), np.float32),
        "w": rng.standard_normal((shape.kh, shape.kw, shape.cin, shape.cout), np.float32) * 0.05,
        "g": rng.standard_normal((shape.n, oh, ow, shape.cout), np.float32),
    }


def interleaved(runners: dict[str, Callable[[], Any]], reps: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each runner, called in turn (A, B, C, A, B, C, ...)."""
    return {name: statistics.median(t) for name, t in common.interleaved_times(runners, reps, warmup).items()}


def _bn_runners(shape: tuple[int, ...], rng: np.random.Generator, n_dev: int) -> dict[str, Callable[[], Any]]:
    """The model's BatchNorm (train mode, fp32 statistics) forward + backward wrt input, scale
    and bias."""
    import torch

    from jaxres.models import batchnorm

    c = shape[-1]
    x_np = rng.standard_normal(shape, np.float32)
    g_np = rng.standard_normal(shape, np.float32)
    bn = batchnorm.BatchNorm(momentum=0.9, epsilon=1e-5, dtype=jnp.float32)
    variables = bn.init(jax.random.key(0), jnp.zeros((2, 1, 1, c)))
    batch_sharding, replicated = _mesh_shardings(n_dev)
    x, g = jax.device_put(x_np, batch_sharding), jax.device_put(g_np, batch_sharding)
    params = jax.device_put(variables["params"], replicated)
    stats = jax.device_put(variables["batch_stats"], replicated)

    def step(params, stats, x, g):
        def f(params, x):
            return bn.apply({"params": params, "batch_stats": stats}, x, mutable=["batch_stats"])
        _, vjp, new = jax.vjp(f, params, x, has_aux=True)
        return vjp(g), new

    compiled = jax.jit(step).lower(params, stats, x, g).compile()
    tx = torch.from_numpy(x_np).permute(0, 3, 1, 2).requires_grad_(True)
    tg = torch.from_numpy(g_np).permute(0, 3, 1, 2)
    weight = torch.ones(c, requires_grad=True)
    bias = torch.zeros(c, requires_grad=True)
    mean, var = torch.zeros(c), torch.ones(c)

    def torch_run():
        y = torch.nn.functional.batch_norm(tx, mean, var, weight, bias, True, 0.1, 1e-5)
        return torch.autograd.grad(y, (tx, weight, bias), tg)

    return {"jax": lambda: compiled(params, stats, x, g), "torch": torch_run}


def _optimizer_runners(variables: Any, batch_size: int, n_dev: int) -> dict[str, Callable[[], Any]]:
    """jaxres's optax update (config default: SGD Nesterov + decay) vs torch SGD on the same tree.

    The JAX update runs replicated on `n_dev` devices, as in the train step.
    """
    import optax
    import torch

    from jaxres import config_base, optim

    config = config_base.base_config()
    tx = optim.make_optimizer(config.optimizer, optim.make_schedule(config.optimizer, batch_size, 1000, 100000))
    replicated = _mesh_shardings(n_dev)[1]
    params = jax.device_put(
        jax.tree_util.tree_map(lambda s: np.full(s.shape, 0.01, s.dtype), variables["params"]), replicated)
    grads = jax.tree_util.tree_map(lambda p: p * 0.1, params)
    opt_state = tx.init(params)

    def update(params, opt_state, grads):
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    compiled = jax.jit(update, donate_argnums=(0, 1)).lower(params, opt_state, grads).compile()
    holder = [params, opt_state]

    def jax_run():
        holder[0], holder[1] = compiled(holder[0], holder[1], grads)
        return holder[0]

    tparams = [torch.full(p.shape, 0.01, requires_grad=True) for p in jax.tree_util.tree_leaves(params)]
    for p in tparams:
        p.grad = torch.full(p.shape, 0.001)
    topt = torch.optim.SGD(tparams, lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-5)
    return {"jax": jax_run, "torch": lambda: topt.step()}


def _train_step_runners(model_name: str, image_size: int, batch_size: int) -> dict[str, Callable[[], Any]]:
    """The whole jaxres train step (default device split) and the torch eager one, for the 'step' row."""
    import torch

    from jaxres.bench import steps, torch_ref

    config = steps.bench_config(model_name, batch_size, "float32", image_size, 1000)
    mesh, state, step_fn, _ = steps.train_setup(config)
    batch = parallel.to_global(steps.synthetic_batch(batch_size, image_size, 1000, (1,)), mesh, batch_axis=1)
    compiled = step_fn.lower(state, batch).compile()
    holder = [state]

    def jax_run():
        holder[0], _ = compiled(holder[0], batch)
        return holder[0].step

    net = torch_ref.torch_model(model_name).to(memory_format=torch.channels_last).train()
    x = torch.randn(batch_size, 3, image_size, image_size).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch_size,))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-5)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def torch_run():
        loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return {"jax": jax_run, "torch": torch_run}


# ---------------------------------------------------------------------------------------------
# The profile


def run_op_profile(model_name: str = "resnet18", image_size: int = 112, batch_size: int = 32,
                   reps: int = 5, jax_impls: tuple[str, ...] = JAX_IMPLS, whole_step: bool = True,
                   log: Callable[[str], None] = print) -> dict[str, Any]:
    """Times every conv shape (3 kinds), BatchNorm, the optimizer update and the whole step; see module doc.

    Returns:
      {"machine", "model", "image_size", "batch_size", "impls", "shapes": [per shape and kind:
      ms per impl], "categories": {category: {"flops", "ms": {impl: ms}}}}.
    """
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    impls = (*jax_impls, "torch")
    info = common.machine()
    log(f"machine: {info}")
    convs, norms, variables = model_shapes(model_name, image_size, batch_size)
    rng = np.random.default_rng(0)
    shapes, categories = [], {}
    for kind in KINDS:
        categories[kind] = {"flops": 0.0, "ms": dict.fromkeys(impls, 0.0)}
    for shape, count in convs.items():
        data = _conv_data(shape, rng)
        for kind in KINDS:
            if kind == "input_grad" and shape.cin == 3:  # the stem: images need no gradient
                continue
            runners = {impl: _jax_conv_runner(impl, shape, kind, data) for impl in jax_impls}
            runners["torch"] = _torch_conv_runner(shape, kind, data)
            # Big shapes take seconds a call: fewer repetitions keep the profile to minutes.
            secs = interleaved(runners, reps if shape.flops * shape.n < 2e12 else max(3, reps // 2))
            ms = {impl: s * 1000 for impl, s in secs.items()}
            shapes.append({"shape": shape.label(), "kind": kind, "count": count,
                           "gflop": shape.flops / 1e9, "ms": ms})
            categories[kind]["flops"] += count * shape.flops
            for impl in impls:
                categories[kind]["ms"][impl] += count * ms[impl]
            log(f"{shape.label():34s} x{count} {kind:11s} " + "  ".join(f"{k} {v:8.1f}" for k, v in ms.items()))
    n_dev = 2 if any("2dev" in impl for impl in jax_impls) and jax.device_count() >= 2 else 1
    bn_ms = {"jax": 0.0, "torch": 0.0}
    for shape, count in norms.items():
        secs = interleaved(_bn_runners(shape, rng, n_dev), reps)
        for k in bn_ms:
            bn_ms[k] += count * secs[k] * 1000
    categories["batchnorm fwd+bwd"] = {"flops": 0.0, "ms": {"jax": bn_ms["jax"], "torch": bn_ms["torch"]}}
    log(f"batchnorm: {bn_ms}")
    opt = interleaved(_optimizer_runners(variables, batch_size, n_dev), max(reps, 5), warmup=2)
    categories["optimizer update"] = {"flops": 0.0, "ms": {k: v * 1000 for k, v in opt.items()}}
    log(f"optimizer: {categories['optimizer update']}")
    if whole_step:
        step = interleaved(_train_step_runners(model_name, image_size, batch_size), max(3, reps), warmup=2)
        categories["whole train step"] = {"flops": 0.0, "ms": {k: v * 1000 for k, v in step.items()}}
        log(f"step: {categories['whole train step']}")
    info["loadavg_end"] = common.load_average()
    return {"machine": info, "model": model_name, "image_size": image_size, "batch_size": batch_size,
            "impls": list(impls), "shapes": shapes, "categories": categories,
            "jax": jax.__version__, "torch": torch.__version__, "xla_flags": os.environ.get("XLA_FLAGS", "")}


def format_markdown(result: dict[str, Any]) -> str:
    """category | ms per implementation | torch ms / jax ms (per JAX implementation) | GFLOP/s each."""
    impls = result["impls"]
    jax_impls = [i for i in impls if i != "torch"]
    m = result["machine"]
    lines = [
        f"{result['model']} @ {result['image_size']} px, batch {result['batch_size']}, float32. "
        f"CPU: {m['cpu_model']}, {m['cores']} cores, AVX-512 {'yes' if m['avx512'] else 'no'}, "
        f"sgemm {m['sgemm_gflops']:.0f} GFLOP/s, load average {m['loadavg']} (start) / "
        f"{m.get('loadavg_end', '')} (end); jax {result['jax']}, torch {result['torch']}"
        + (f", XLA_FLAGS='{result['xla_flags']}'" if result["xla_flags"] else "") + ".",
        "",
        "| category | GFLOP | " + " | ".join(f"{i} ms" for i in impls) + " | "
        + " | ".join(f"torch / {i}" for i in jax_impls) + " | GFLOP/s " + " / ".join(impls) + " |",
        "|---" * (2 + len(impls) + len(jax_impls) + 1) + "|",
    ]
    totals = dict.fromkeys(impls, 0.0)
    for name, cat in result["categories"].items():
        ms = {i: cat["ms"].get(i, cat["ms"].get("jax" if i != "torch" else "torch")) for i in impls}
        if name != "whole train step":
            for i in impls:
                totals[i] += ms[i]
        lines.append(_row(name, cat["flops"], ms, impls, jax_impls))
    lines.insert(-1 if "whole train step" in result["categories"] else len(lines),
                 _row("**sum of the rows above**", 0.0, totals, impls, jax_impls))
    return "\n".join(lines)


def _row(name: str, flops: float, ms: dict[str, float], impls: list[str], jax_impls: list[str]) -> str:
    cells = [name, f"{flops / 1e9:.1f}" if flops else "-"]
    cells += [f"{ms[i]:.0f}" for i in impls]
    cells += [f"{ms['torch'] / ms[i]:.2f}x" for i in jax_impls]
    cells.append(" / ".join(f"{flops / ms[i] / 1e6:.0f}" for i in impls) if flops else "-")
    return "| " + " | ".join(cells) + " |"


# ---------------------------------------------------------------------------------------------
# Whole train step, one per `model.cpu_conv` backend, interleaved


def _step_runner(compiled: Any, state: Any, batch: Any) -> Callable[[], Any]:
    """One call = one step of `compiled` on its own (donated) state."""
    holder = [state]

    def run():
        holder[0], _ = compiled(holder[0], batch)
        return holder[0].step

    return run


def train_step_ab(model_name: str, image_size: int, batch_size: int, steps: int = 7, warmup: int = 2,
                  variants: Sequence[str] = cpu_conv.BACKENDS) -> list[dict[str, Any]]:
    """results.jsonl rows of the real jaxres train step, one per conv backend, timed interleaved.

    Args:
      variants: values of `model.cpu_conv` to compare (`cpu_conv.BACKENDS` by default).

    Returns:
      One `steps.result_row` per variant (key "conv" names it, "interleaved_with" the others),
      on the default device split.
    """
    from jaxres.bench import steps as bench_steps

    runners, compile_s = {}, {}
    for name in variants:
        config = bench_steps.bench_config(model_name, batch_size, "float32", image_size, 1000)
        config.model.cpu_conv = name
        mesh, state, step_fn, _ = bench_steps.train_setup(config)
        batch = parallel.to_global(bench_steps.synthetic_batch(batch_size, image_size, 1000, (1,)), mesh,
                                   batch_axis=1)
        compile_s[name], compiled = common.timed(lambda f=step_fn, s=state, b=batch: f.lower(s, b).compile())

        runners[name] = _step_runner(compiled, state, batch)
    times = common.interleaved_times(runners, steps, warmup)
    rows = []
    for name in runners:
        row = bench_steps.result_row("train", "jax", model_name, batch_size, "float32", times[name],
                                     compile_s[name], conv=name, image_size=image_size,
                                     interleaved_with=[n for n in runners if n != name])
        rows.append(row)
    return rows
