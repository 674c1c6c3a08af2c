"""Input pipeline benchmark (thin runner; `scripts/benchmark.py --what input` calls the same function).

    python scripts/benchmark_input.py [--num_images 512 --image_size 224 --repeats 3] [--json out.json]

Prints markdown tables of images/s: our transforms vs tf.data (when TensorFlow
is installed: pip install 'jaxres[prepare]') vs plain PIL, per core and on all
cores. Run it on a quiet machine (check `uptime`); the tables record the load.
"""

import json

from absl import app, flags

from jaxres import cli

flags.DEFINE_integer("num_images", 512, "JPEGs to make (about 500x375, q90).")
flags.DEFINE_integer("image_size", 224, "Output crop size.")
flags.DEFINE_integer("batch_size", 64, "Batch size of the grain / tf.data pipelines.")
flags.DEFINE_integer("repeats", 3, "Timed passes per figure (best kept).")
flags.DEFINE_bool("tf", None, "Include tf.data rows (default: when TensorFlow is installed).")
flags.DEFINE_string("json", None, "Also write the raw result to this JSON file.")


def main(argv):
    del argv
    f = flags.FLAGS
    with cli.user_errors():
        from jaxres import bench_input

        result = bench_input.run_input_benchmark(
            f.num_images, f.image_size, f.batch_size, f.repeats, f.tf
        )
        print(bench_input.format_markdown(result))
        if f.json:
            with open(f.json, "w") as out:
                json.dump(result, out, indent=1)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
