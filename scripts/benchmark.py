"""Benchmarks: `--what train|infer` (jaxres, or torch with --framework torch).

    python scripts/benchmark.py --what train --model resnetv2_50 --batch_size 256 --dtype bfloat16
    python scripts/benchmark.py --what train --framework torch --model resnet50 --batch_size 256

Each run prints its JSON row, appends it to benchmarks/results.jsonl and
re-renders the table in benchmarks/results.md. CPU rows say "cpu:" in their
device column.
"""

import json
import os

from absl import app, flags

from jaxres import cli

flags.DEFINE_enum("what", "train", ["train", "infer"], "What to time.")
flags.DEFINE_enum("framework", "jax", ["jax", "torch"], "jaxres or the PyTorch reference.")
flags.DEFINE_string("model", "resnetv2_50", "jaxres registry name, or torchvision/timm name for torch.")
flags.DEFINE_integer("batch_size", 256, "Global batch size.")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Compute dtype (params stay float32).")
flags.DEFINE_integer("steps", 20, "Timed steps (median reported).")
flags.DEFINE_integer("warmup", 5, "Untimed steps after compilation.")
flags.DEFINE_integer("image_size", 224, "Input resolution.")
flags.DEFINE_bool("torch_compile", True, "torch.compile the torch step.")
flags.DEFINE_bool("record", True, "Append to benchmarks/results.jsonl.")


def main(argv):
    del argv
    f = flags.FLAGS
    with cli.user_errors():
        from jaxres import bench

        if f.framework == "jax":
            row = bench.bench_jax(f.what, f.model, f.batch_size, f.dtype, f.steps, f.warmup, f.image_size)
        else:
            from jaxres import bench_torch

            row = bench_torch.bench_torch(
                f.what, f.model, f.batch_size, f.dtype, f.steps, f.warmup, f.torch_compile, f.image_size
            )
        print(json.dumps(row, indent=1))
        if f.record:
            bench.append_result(row)
            with open(os.path.join(os.path.dirname(bench.RESULTS), "results.md"), "w") as out:
                out.write("# Benchmark results (newest first)\n\n" + bench.render_markdown() + "\n")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
