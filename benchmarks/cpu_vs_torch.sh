#!/bin/bash
# jaxres vs PyTorch eager on CPU, train and inference, three rounds (benchmarks/README.md).
cd "$(dirname "$0")/.."
# TORCH_PYTHON: another interpreter for the PyTorch rows (one with torch + timm installed).
ARGS="scripts/benchmark.py --batch_size 32 --dtype float32 --steps 5 --warmup 2"
B="${PYTHON:-.venv/bin/python} $ARGS"
T="${TORCH_PYTHON:-${PYTHON:-.venv/bin/python}} $ARGS"
for round in $(seq "${ROUNDS:-3}"); do  # ROUNDS=1: one round
  for args in "--what train --model resnet18 --image_size 112" \
              "--what train --framework torch --notorch_compile --model resnet18 --image_size 112" \
              "--what train --model resnet50 --image_size 224" \
              "--what train --model resnetv2_50 --image_size 224" \
              "--what train --framework torch --notorch_compile --model resnet50 --image_size 224" \
              "--what infer --model resnet50 --image_size 224" \
              "--what infer --framework torch --notorch_compile --model resnet50 --image_size 224"; do
    echo "=== round $round: $args | load $(cut -d' ' -f1-3 /proc/loadavg)"
    case "$args" in *"--framework torch"*) run=$T ;; *) run=$B ;; esac
    $run $args > /dev/null  # Each run appends its row to benchmarks/results.jsonl.
  done
done
