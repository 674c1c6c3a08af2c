"""The PyTorch side of the side-by-side: torchvision / timm ResNets, same batch, same timing rules.

bf16 autocast (or fp32), channels_last, SGD + Nesterov with weight decay,
`torch.compile` when asked for; inference under `torch.inference_mode`.
Needs the `[convert]` extra (torch, torchvision, timm).
"""

from __future__ import annotations

import statistics
from typing import Any

from jaxres.bench import common
from jaxres.bench import steps as bench_steps


def torch_model(name: str):
    """An untrained torchvision model of that name, else timm's."""
    import torchvision

    if hasattr(torchvision.models, name):
        return getattr(torchvision.models, name)(weights=None)
    import timm

    return timm.create_model(name, pretrained=False)


def bench_torch(what: str, model: str, batch_size: int, dtype: str, steps: int, warmup: int,
                compile_model: bool = True, image_size: int = 224) -> dict[str, Any]:
    """img/s of a torch train step or inference forward, timed as `steps.bench_jax` times ours."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    net = torch_model(model).to(device).to(memory_format=torch.channels_last)
    amp_dtype = torch.bfloat16 if dtype == "bfloat16" else torch.float32
    x = torch.randn(batch_size, 3, image_size, image_size, device=device).to(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch_size,), device=device)
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-5)
    loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=0.1)

    def train_step():
        with torch.autocast(device, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
            loss = loss_fn(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    def infer():
        with torch.inference_mode(), torch.autocast(device, dtype=amp_dtype, enabled=amp_dtype != torch.float32):
            return net(x)

    if what == "train":
        net.train()
        fn = train_step
    else:
        net.eval()
        fn = infer
    if compile_model:
        fn = torch.compile(fn)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run():
        fn()
        sync()

    compile_s, _ = common.timed(run)
    times = common.call_times(run, steps, warmup)
    row = bench_steps.result_row(what, "torch", model, batch_size, dtype, times, compile_s,
                                 torch=torch.__version__, torch_compile=compile_model)
    if device == "cuda":
        row["peak_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
    row["img_per_sec"] = batch_size / statistics.median(times)
    return row
