"""Probe and feature-extraction benchmarks (to become `scripts/benchmark.py --what probe|features`).

    python scripts/benchmark_probe.py --what probe --output benchmarks/probe.json
    python scripts/benchmark_probe.py --what features --batch_size 32

Prints the results as JSON (and writes them with --output); benchmarks/probe.md
holds the recorded figures with the machine and its load.
"""

import json

from absl import app, flags

from jaxres import cli

flags.DEFINE_enum("what", "probe", ["probe", "features"], "Which benchmark.")
flags.DEFINE_string("model", "resnet50", "features: the jaxres model (torchvision / Keras run ResNet-50).")
flags.DEFINE_integer("batch_size", 32, "features: images per forward pass.")
flags.DEFINE_integer("steps", 5, "features: timed batches (after 2 warm-up batches).")
flags.DEFINE_bool("sweep", True, "probe: also time the whole Caltech-101 protocol sweep (minutes).")
flags.DEFINE_string("output", None, "Write the JSON results here.")


def main(argv):
    del argv
    from jaxres import bench_probe

    f = flags.FLAGS
    if f.what == "probe":
        results = bench_probe.run_probe_benchmark(sweep=f.sweep)
    else:
        results = bench_probe.run_feature_benchmark(f.model, f.batch_size, steps=f.steps)
    text = json.dumps(results, indent=2)
    print(text)
    if f.output:
        with open(f.output, "w") as out:
            out.write(text + "\n")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
