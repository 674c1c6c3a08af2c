#!/usr/bin/env bash
# Every README command that needs no extra, at smoke size, in an install with no extras:
#
#     make smoke-core                      # builds .venv-core (core + dev), then runs this
#     bash scripts/smoke_core.sh .venv-core/bin/python
#
# Each command must exit 0; a command that needs an extra must end in one line naming it.
# The tests run in the full install, where TensorFlow / torch bring dependencies the core
# install lacks (flatbuffers for jax_export was one): this is what catches that.
set -euo pipefail
PY=${1:-.venv-core/bin/python}
cd "$(dirname "$0")/.."
TMP=$(mktemp -d "${TMPDIR:-/tmp}/jaxres-smoke-core.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
export JAX_PLATFORMS=cpu JAX_COMPILATION_CACHE_DIR="$TMP/xla"
START=$SECONDS

step() {  # step NAME CMD...: runs CMD, quiet unless it fails.
  local name=$1
  shift
  local t=$SECONDS
  if ! "$@" >"$TMP/out.txt" 2>&1; then
    echo "smoke-core: FAILED: $name: $*" >&2
    tail -n 30 "$TMP/out.txt" >&2
    exit 1
  fi
  echo "smoke-core: ok  $name ($((SECONDS - t)) s)"
}

needs_extra() {  # needs_extra NAME MODULE EXTRA CMD...: without MODULE, exit 2 and one line naming EXTRA.
  local name=$1 module=$2 extra=$3
  shift 3
  if "$PY" -c "import $module" 2>/dev/null; then
    echo "smoke-core: skip $name ($module is installed: not a core-only install)"
    return
  fi
  local rc=0
  "$@" >"$TMP/out.txt" 2>&1 || rc=$?
  local last
  last=$(grep -v '^\s*$' "$TMP/out.txt" | tail -n 1)
  if [[ $rc -ne 2 || $last != "jaxres error: "*"[$extra]"* ]]; then
    echo "smoke-core: FAILED: $name should say it needs [$extra] in one line (exit $rc): $*" >&2
    tail -n 30 "$TMP/out.txt" >&2
    exit 1
  fi
  echo "smoke-core: ok  $name says: ${last#jaxres error: }"
}

DATA=$TMP/data RUN=$TMP/run
step "digits data" "$PY" -c "from jaxres.data import embedded; embedded.write_digits('$DATA')"
step "train (demo:smoke)" "$PY" scripts/train.py --config configs/demo.py:smoke --workdir "$RUN" \
  --config.dataset.data_dir="$DATA"
step "evaluate" "$PY" scripts/evaluate.py --workdir "$RUN" --checkpoint best --output "$TMP/eval.json"
step "predict --output" "$PY" scripts/predict.py --workdir "$RUN" --output "$TMP/preds.csv" \
  "$DATA/digits/val/7"
step "linear_probe --export" "$PY" scripts/linear_probe.py --config configs/transfer/fewshot.py:digits \
  --workdir "$TMP/fewshot" --config.model.checkpoint="$RUN" --config.dataset.data_dir="$DATA" \
  --config.protocol.per_class=5 --config.protocol.trials=1 --export "$TMP/probe_run"
step "predict (the exported probe)" "$PY" scripts/predict.py --workdir "$TMP/probe_run" --top_k 3 \
  "$DATA/digits/val/3"
step "transfer.py" "$PY" scripts/transfer.py --images "$DATA/digits/train" --from "$RUN" \
  --output "$TMP/head"
step "export_weights --format jax_export" "$PY" scripts/export_weights.py --workdir "$RUN" \
  --format jax_export --output "$TMP/export/model.bin"
step "model_info" "$PY" scripts/model_info.py --workdir "$RUN" --batch_size 8
step "plot_metrics" "$PY" scripts/plot_metrics.py "$RUN" --output "$TMP/curves.png"
TINY=(--model resnetv2_tiny --batch_size 8 --image_size 16 --steps 1 --warmup 0 --dtype float32)
step "benchmark train" "$PY" scripts/benchmark.py --what train "${TINY[@]}" --norecord
step "benchmark infer" "$PY" scripts/benchmark.py --what infer "${TINY[@]}" --norecord
step "benchmark e2e" "$PY" scripts/benchmark.py --what e2e "${TINY[@]}" --norecord --num_workers 0 \
  --num_images 16
step "benchmark input" "$PY" scripts/benchmark.py --what input --num_images 8 --image_size 16 \
  --batch_size 4 --repeats 1 --notf
step "benchmark probe" "$PY" scripts/benchmark.py --what probe --probe_shape 4,16 --nosweep
step "benchmark features" "$PY" scripts/benchmark.py --what features "${TINY[@]}"
needs_extra "benchmark ops" torch convert "$PY" scripts/benchmark.py --what ops "${TINY[@]}" --norecord
needs_extra "benchmark --framework torch" torchvision convert "$PY" scripts/benchmark.py --what train \
  --framework torch "${TINY[@]}" --norecord
echo "smoke-core: every command passed in $((SECONDS - START)) s"
