"""Per-channel mean / std (uint8 units) and class counts of a prepared dataset.

    python scripts/dataset_stats.py --dataset caltech101 --data_dir ~/archives --split all --max_images 2000
    python scripts/dataset_stats.py --dataset imagenet2012 --data_dir ~/tensorflow_datasets --split train

Use the mean / std as --config.dataset.mean / std when training from scratch
on a dataset unlike ImageNet.
"""

import json

from absl import app, flags

from jaxres import cli

flags.DEFINE_string(
    "dataset",
    None,
    "config.dataset.name: a prepared dataset, a tfds name, 'imagefolder' or 'digits'.",
)
flags.DEFINE_string("data_dir", "", "config.dataset.data_dir.")
flags.DEFINE_string("split", "train", "Split to measure.")
flags.DEFINE_integer(
    "max_images", 1000, "Images decoded for mean / std, sampled with --seed (0 = all)."
)
flags.DEFINE_integer("seed", 0, "Seed of the sample.")
flags.DEFINE_string("output", None, "Also write the result to this JSON file.")


def main(argv):
    del argv
    f = flags.FLAGS
    with cli.user_errors():
        from jaxres.config_base import base_config
        from jaxres.data import sources, statistics

        dataset = base_config().dataset
        dataset.update(name=f.dataset, data_dir=f.data_dir, train_split=f.split)
        stats = statistics.dataset_statistics(
            sources.open_source(dataset, f.split), f.max_images, f.seed
        )
        result = dict(dataset=f.dataset, split=f.split, seed=f.seed, **stats)
        text = json.dumps(result, indent=1)
        print(text)
        if f.output:
            with open(f.output, "w") as out:
                out.write(text + "\n")


if __name__ == "__main__":
    flags.mark_flags_as_required(["dataset"])
    app.run(main, flags_parser=cli.parse_flags)
