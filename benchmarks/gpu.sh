#!/usr/bin/env bash
# The GPU side-by-side (issue: ResNet-50 throughput on one H100 ahead of PyTorch).
# Run from the repository root on a GPU host that has jax[cuda], flax, optax, orbax,
# torch, torchvision and timm (e.g. the lent H100 image); grain / clu / ml_collections /
# tfds come as cp312 wheels in wheels/ (fetch them with the `pip download` line below).
#
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d wheels/ \
#     grain array-record clu ml-collections tensorflow-datasets tensorboardX etils \
#     promise simple-parsing dm-tree \
#     nvidia-dali-cuda130 nvidia-nvimgcodec-cu13 nvidia-nvjpeg nvidia-nvjpeg2k-cu13 \
#     nvidia-nvtiff-cu13 nvidia-libnvcomp-cu13 nvtx makefun libcst astunparse gast
#   bash benchmarks/gpu.sh
set -euo pipefail
if ls wheels/*.whl >/dev/null 2>&1; then pip install -q --no-deps wheels/*.whl; fi
pip install -q --no-deps -e .
export XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_latency_hiding_scheduler=true"
for bs in 256; do
  python scripts/benchmark.py --what train --model resnetv2_50 --batch_size $bs --dtype bfloat16
  python scripts/benchmark.py --what train --model resnet50 --batch_size $bs --dtype bfloat16
  python scripts/benchmark.py --what train --framework torch --model resnet50 --batch_size $bs --dtype bfloat16
done
# What moves the jaxres number: batch size, and XLA's scheduler / autotuning flags (one row each).
for bs in 128 512; do
  python scripts/benchmark.py --what train --model resnetv2_50 --batch_size $bs --dtype bfloat16
done
XLA_FLAGS="--xla_gpu_autotune_level=4" \
  python scripts/benchmark.py --what train --model resnetv2_50 --batch_size 256 --dtype bfloat16
XLA_FLAGS="--xla_gpu_enable_latency_hiding_scheduler=false" \
  python scripts/benchmark.py --what train --model resnetv2_50 --batch_size 256 --dtype bfloat16
for bs in 256 1024; do
  python scripts/benchmark.py --what infer --model resnetv2_50 --batch_size $bs --dtype bfloat16
  python scripts/benchmark.py --what infer --framework torch --model resnet50 --batch_size $bs --dtype bfloat16
done
# End to end: JPEG records -> grain (16 host cores) -> train step, vs synthetic in the same call.
python scripts/benchmark.py --what e2e --model resnetv2_50 --batch_size 256 --dtype bfloat16 --num_workers 16 --steps 50
# The same with JPEG decoding by DALI on the GPU (config.input.decoder=dali, extra [dali]):
# grain's 16 workers only draw crop boxes; nvJPEG + the hardware JPEG engines decode.
python scripts/benchmark.py --what e2e --model resnetv2_50 --batch_size 256 --dtype bfloat16 --num_workers 16 --steps 50 --decoder dali
