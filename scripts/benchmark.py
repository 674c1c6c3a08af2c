"""Benchmarks, one entry point: `--what train|infer|input|probe|features`.

    python scripts/benchmark.py --what train --model resnetv2_50 --batch_size 256 --dtype bfloat16
    python scripts/benchmark.py --what train --framework torch --model resnet50 --batch_size 256
    python scripts/benchmark.py --what e2e --batch_size 256 --num_workers 16   # records -> grain -> step
    python scripts/benchmark.py --what input          # grain transforms vs tf.data vs PIL
    python scripts/benchmark.py --what idct           # JPEG IDCT accurate vs fast, pixels vs PIL
    python scripts/benchmark.py --what probe          # ridge / logistic probes vs scikit-learn
    python scripts/benchmark.py --what features --model resnet50 --batch_size 32
    python scripts/benchmark.py --what ops --model resnet18 --image_size 112 --batch_size 32  # per conv op

train / infer / e2e print their JSON row, append it to benchmarks/results.jsonl and
re-render benchmarks/results.md (CPU rows say "cpu:" in their device column).
ops prints where a CPU train step goes (every conv shape's forward / input-gradient /
weight-gradient conv, BatchNorm, optimizer; JAX vs PyTorch, interleaved) and, with
`--ops_parts train_ab`, appends the train step with XLA's conv and with
`jaxres.models.cpu_conv.conv` (interleaved) to results.jsonl.
input / idct / probe / features print their tables as JSON or markdown (--output
writes them); benchmarks/input.md and probe.md hold the recorded figures.
Run on a quiet machine (check `uptime`).
"""

import json
import os

from absl import app, flags

from jaxres import cli

flags.DEFINE_enum(
    "what",
    "train",
    ["train", "infer", "e2e", "input", "idct", "probe", "features", "ops"],
    "What to time.",
)
flags.DEFINE_enum("framework", "jax", ["jax", "torch"], "train / infer: jaxres or the PyTorch reference.")
flags.DEFINE_string("model", "resnetv2_50", "jaxres registry name, or torchvision/timm name for torch.")
flags.DEFINE_integer("batch_size", 256, "Global batch size (input: its pipelines' batch, default 64).")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype (params stay float32).")
flags.DEFINE_integer("steps", 20, "Timed steps (median reported).")
flags.DEFINE_integer("warmup", 5, "Untimed steps after compilation.")
flags.DEFINE_integer("image_size", 224, "Input resolution.")
flags.DEFINE_bool("torch_compile", True, "torch.compile the torch step.")
flags.DEFINE_bool("record", True, "train / infer: append to benchmarks/results.jsonl.")
flags.DEFINE_integer("num_images", None,
                     "input / e2e / idct: JPEGs to make (about 500x375, q90; default 512 / 1,024 / "
                     "256).")
flags.DEFINE_integer("repeats", 3, "input / idct: timed passes per figure (best kept).")
flags.DEFINE_bool("tf", None, "input: include tf.data rows (default: when TensorFlow is installed).")
flags.DEFINE_bool("sweep", True, "probe: also time the whole Caltech-101 protocol sweep (minutes).")
flags.DEFINE_list("probe_shape", ["102", "2048"],
                  "probe: classes,features of the synthetic features (Caltech-101, ResNet-50).")
flags.DEFINE_integer("num_workers", 8, "e2e: grain worker processes.")
flags.DEFINE_enum("decoder", "cpu", ["cpu", "dali"], "e2e: config.input.decoder (dali: extra [dali]).")
flags.DEFINE_string("dataset", "", "e2e: a prepared dataset name (default: synthetic JPEG records).")
flags.DEFINE_string("data_dir", "", "e2e: its data_dir.")
flags.DEFINE_list("ops_parts", ["profile", "train_ab"],
                  "ops: 'profile' (per-op table) and / or 'train_ab' (whole step, XLA conv vs cpu_conv).")
flags.DEFINE_bool("ops_whole_step", True, "ops profile: also time the whole jax and torch train steps.")
flags.DEFINE_string("output", None, "input / probe / features / ops: also write the JSON results here.")


def _throughput(f) -> None:
    from jaxres.bench import common, steps

    if f.what == "e2e":
        row = steps.bench_e2e(f.model, f.batch_size, f.dtype, f.steps, f.warmup, f.num_workers,
                              f.dataset, f.data_dir, f.image_size, f.decoder, f.num_images or 1024)
    elif f.framework == "jax":
        row = steps.bench_jax(f.what, f.model, f.batch_size, f.dtype, f.steps, f.warmup, f.image_size)
    else:
        common.require_extra("torchvision", "convert", "--framework torch")
        from jaxres.bench import torch_ref as bench_torch

        row = bench_torch.bench_torch(
            f.what, f.model, f.batch_size, f.dtype, f.steps, f.warmup, f.torch_compile, f.image_size
        )
    print(json.dumps(row, indent=1))
    if f.record:
        steps.append_result(row)
        with open(os.path.join(os.path.dirname(steps.RESULTS), "results.md"), "w") as out:
            out.write("# Benchmark results (newest first)\n\n" + steps.render_markdown() + "\n")


def _ops(f) -> dict:
    from jaxres.bench import common, op_profile, steps

    result = {}
    if "profile" in f.ops_parts:
        # The profile times PyTorch beside JAX; train_ab is JAX only.
        common.require_extra("torch", "convert", "--what ops --ops_parts profile")
        result = op_profile.run_op_profile(f.model, f.image_size, f.batch_size, reps=f.steps,
                                           whole_step=f.ops_whole_step)
        print(op_profile.format_markdown(result))
    if "train_ab" in f.ops_parts:
        rows = op_profile.train_step_ab(f.model, f.image_size, f.batch_size, f.steps, f.warmup)
        for row in rows:
            print(f"train step, conv={row['conv']}: {row['img_per_sec']:.2f} img/s "
                  f"(median {row['step_ms_median']:.0f} ms, load {row.get('loadavg', '-')})")
            if f.record:
                steps.append_result(row)
        if f.record:
            with open(os.path.join(os.path.dirname(steps.RESULTS), "results.md"), "w") as out:
                out.write("# Benchmark results (newest first)\n\n" + steps.render_markdown() + "\n")
        result["train_ab"] = rows
    return result


def _other(f) -> dict:
    if f.what == "ops":
        return _ops(f)
    if f.what == "input":
        from jaxres.bench import common
        from jaxres.bench import input as bench_input

        if f.tf:
            common.require_extra("tensorflow", "prepare", "--what input --tf")
        batch = f.batch_size if f["batch_size"].present else 64  # Its own default: 64.
        result = bench_input.run_input_benchmark(
            f.num_images or 512, f.image_size, batch, f.repeats, f.tf
        )
        print(bench_input.format_markdown(result))
        return result
    if f.what == "idct":
        from jaxres.bench import idct

        result = idct.run_idct_benchmark(f.num_images or 256, f.image_size, f.repeats)
        print(idct.format_markdown(result))
        return result
    from jaxres.bench import probe as bench_probe

    if f.what == "probe":
        classes, dim = (int(v) for v in f.probe_shape)
        result = bench_probe.run_probe_benchmark(sweep=f.sweep, num_classes=classes, dim=dim)
    else:
        result = bench_probe.run_feature_benchmark(f.model, f.batch_size, f.image_size, f.steps, f.warmup)
    print(json.dumps(result, indent=1))
    return result


def main(argv):
    del argv
    f = flags.FLAGS
    with cli.user_errors():
        if f.what in ("train", "infer", "e2e"):
            _throughput(f)
            return
        result = _other(f)
        if f.output:
            with open(f.output, "w") as out:
                json.dump(result, out, indent=1)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
