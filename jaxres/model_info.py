"""A model at a glance (`scripts/model_info.py`): parameters and FLOPs per stage, the output
shapes of the named layers, XLA's FLOPs and the activation memory per example.

Parameters and FLOPs are counted without computing anything (`jaxres.flops`); with
`xla=True` the forward pass is lowered for XLA's cost analysis, and forward + backward is
compiled at two batch sizes: the growth of XLA's temporary buffers per example is the
activation memory (what a training batch costs beyond the weights, gradients and optimizer).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxres import flops as flops_lib


def summarize(
    model: Any, image_size: int, batch_size: int = 32, xla: bool = True
) -> dict[str, Any]:
    """What `format_summary` prints, as a dict.

    Args:
      model: an unbound `jaxres.models.ResNet`.
      image_size: input height = width.
      batch_size: where the activation memory is measured (and at half of it).
      xla: also XLA's FLOPs and the activation memory (compiles forward + backward twice).

    Returns:
      params, forward_flops (counted, per image), groups ({"stem" / "stageN" / ...: (params,
      forward FLOPs per image)}), layers ({name: output shape of one example}) and, with
      `xla`, xla_forward_flops, xla_train_flops (per image) and activation_bytes (per example).
    """
    cost = flops_lib.model_cost(model, image_size)
    x = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    forward = functools.partial(model.apply, train=False)
    _, features = jax.eval_shape(forward, cost.variables, x)
    info = {
        "params": cost.params,
        "forward_flops": cost.forward_flops,
        "groups": cost.groups,
        "layers": {
            name: tuple(features[name].shape[1:])
            for name in sorted(features, key=flops_lib.layer_sort_key)
        },
        "image_size": image_size,
        "batch_size": batch_size,
    }
    if xla:
        # With XLA's own convs: oneDNN's (the CPU default) are custom calls it cannot count.
        xla_forward = functools.partial(model.clone(cpu_conv="xla").apply, train=False)
        info["xla_forward_flops"] = flops_lib.xla_flops(
            jax.jit(lambda v, x: xla_forward(v, x)[0]).lower(cost.variables, x)
        )
        info.update(_train_memory(model, cost.variables, image_size, batch_size))
    return info


def _train_memory(model: Any, variables: Any, image_size: int, batch_size: int) -> dict[str, Any]:
    """XLA's forward + backward FLOPs per image and temp bytes per example (two compiles)."""

    def loss(params, batch_stats, images):
        (logits, _), _ = model.apply(
            {"params": params, "batch_stats": batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        return logits.astype(jnp.float32).sum()

    grad = jax.jit(jax.grad(loss))
    temps, flops = {}, None
    for b in sorted({max(1, batch_size // 2), batch_size}):
        images = jax.ShapeDtypeStruct((b, image_size, image_size, 3), jnp.float32)
        compiled = grad.lower(
            variables["params"], variables.get("batch_stats", {}), images
        ).compile()
        memory = compiled.memory_analysis()
        temps[b] = memory.temp_size_in_bytes if memory is not None else None
        flops = flops_lib.xla_flops(compiled)
        flops = flops / b if flops else None
    small, large = min(temps), max(temps)
    if None in temps.values():
        per_example = None
    elif large > small:
        per_example = (temps[large] - temps[small]) / (large - small)
    else:
        per_example = temps[large] / large
    return {"xla_train_flops": flops, "activation_bytes": per_example, "temp_bytes": temps[large]}


def _shape(shape: tuple) -> str:
    return "x".join(map(str, shape)) if shape else "-"


def format_summary(name: str, info: dict[str, Any], dtype: str) -> str:
    """The printed summary: a row per stage, totals, XLA's check, memory, the named layers."""
    layers = info["layers"]
    shown = {"head": layers.get("logits", ())}
    lines = [
        f"{name} at {info['image_size']}x{info['image_size']}, {dtype} compute",
        f"{'layer':<12}{'parameters':>14}{'GFLOPs/image':>14}   output (one image)",
    ]
    for group, (params, flops) in info["groups"].items():
        lines.append(
            f"{group:<12}{params:>14,}{flops / 1e9:>14.3f}   {_shape(shown.get(group, layers.get(group, ())))}"
        )
    fwd = info["forward_flops"] / 1e9
    lines.append(
        f"{'total':<12}{info['params']:>14,}{fwd:>14.3f}   ({fwd / 2:.3g} G multiply-adds, counted)"
    )
    lines.append(
        f"train step (forward + backward) = 3x forward = {3 * fwd:.3g} GFLOPs/image (the MFU convention)"
    )
    if info.get("xla_forward_flops"):
        xf = info["xla_forward_flops"] / 1e9
        check = f"XLA cost analysis: forward {xf:.3g} GFLOPs/image ({xf / fwd:.2f}x the count"
        check += ": XLA skips zero-padding taps, adds elementwise ops)"
        if info.get("xla_train_flops"):
            xt = info["xla_train_flops"] / 1e9
            check += f"; forward + backward {xt:.3g} ({xt / xf:.2f}x its forward)"
        lines.append(check)
    if info.get("activation_bytes"):
        lines.append(
            f"activation memory: {info['activation_bytes'] / 2**20:.1f} MiB per example ({dtype}; growth of "
            f"XLA:{jax.default_backend().upper()}'s forward + backward temp buffers between batch "
            f"{max(1, info['batch_size'] // 2)} and {info['batch_size']}, which needs "
            f"{info['temp_bytes'] / 2**30:.2f} GiB)"
        )
    named = ", ".join(f"{k} {_shape(v)}" for k, v in layers.items())
    lines.append(f"named layers (--config.features.layer, --config.model.head_layer): {named}")
    return "\n".join(lines)
