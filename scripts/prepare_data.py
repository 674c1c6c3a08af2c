r"""Prepare a dataset once, from its official archives, for training and transfer.

    python scripts/prepare_data.py --dataset imagenet2012 --manual_dir ~/archives --data_dir ~/tensorflow_datasets
    python scripts/prepare_data.py --dataset imagenet2012 --manual_dir ~/archives --data_dir ~/tensorflow_datasets \
        --resize_shorter 256          # + data_dir/imagenet2012_resized_256 (JPEG q90)
    python scripts/prepare_data.py --dataset caltech101 --manual_dir ~/archives   # -> ~/archives/caltech101
    python scripts/prepare_data.py --dataset caltech256 --manual_dir ~/archives [--keep_clutter]
    python scripts/prepare_data.py --dataset indoor67 --manual_dir ~/archives    # tar + TrainImages.txt/TestImages.txt
    python scripts/prepare_data.py --dataset imagefolder --manual_dir ~/photos --name flowers --val_fraction 0.2
    python scripts/prepare_data.py --dataset imagefolder --manual_dir ~/photos --split_lists_only --val_fraction 0.2

Files that are not images are left out, and truncated images kept as decoded
(--truncated skip leaves them out); the metadata's `skipped` lists both with the reason.
Running it again is a no-op once the dataset is written (--overwrite redoes it).
Train on the result with --config.dataset.name=NAME --config.dataset.data_dir=DATA_DIR.
"""

import os

from absl import app, flags

from jaxres import cli

flags.DEFINE_enum(
    "dataset",
    None,
    ["imagenet2012", "caltech101", "caltech256", "indoor67", "imagefolder"],
    "Dataset to prepare.",
)
flags.DEFINE_string(
    "manual_dir",
    None,
    "Folder holding the downloaded archives (or the extracted folder / image folder).",
)
flags.DEFINE_string(
    "data_dir",
    None,
    "Where the prepared dataset goes (default: --manual_dir; imagefolder: its parent).",
)
flags.DEFINE_string("name", None, "imagefolder: the dataset's name (config.dataset.name).")
flags.DEFINE_float(
    "val_fraction", 0.0, "imagefolder: share of every class held out as split 'val' (stratified)."
)
flags.DEFINE_integer("seed", 0, "imagefolder: seed of the train/val split.")
flags.DEFINE_bool(
    "split_lists_only", False, "imagefolder: only write train.txt / val.txt into --manual_dir."
)
flags.DEFINE_integer(
    "resize_shorter",
    None,
    "Also store images with the shorter side resized to N (imagenet2012: a separate dataset).",
)
flags.DEFINE_integer(
    "jpeg_quality",
    None,
    "JPEG quality of re-encoded images (default 90 with --resize_shorter, else 95).",
)
flags.DEFINE_bool(
    "keep_clutter", False, "caltech256: keep 257.clutter as a class (dropped by default)."
)
flags.DEFINE_integer(
    "num_workers", os.cpu_count() or 1, "Processes that check / re-encode images (0 = in-process)."
)
flags.DEFINE_bool("overwrite", False, "Write the dataset again even when it is already prepared.")
flags.DEFINE_enum(
    "truncated",
    "keep",
    ["keep", "skip"],
    "A truncated image: keep what decodes, or skip it; listed in the metadata's `skipped` either way.",
)


def main(argv):
    del argv
    f = flags.FLAGS
    with cli.user_errors():
        from jaxres.data import splits
        from jaxres.data.prepare import recipes, records
        from jaxres.errors import DataError

        manual_dir = os.path.expanduser(f.manual_dir)
        data_dir = os.path.expanduser(f.data_dir) if f.data_dir else None
        if f.split_lists_only:
            written = splits.write_split_lists(manual_dir, f.val_fraction, f.seed)
            counts = ", ".join(
                f"{path} ({len(path.read_text().splitlines())} images)" for path in written.values()
            )
            print(
                f"Wrote the split lists {counts}; the images stay in place. Train on them with "
                f"--config.dataset.name=imagefolder --config.dataset.data_dir={manual_dir} "
                "--config.dataset.val_split=val",
                flush=True,
            )
            return
        quality = f.jpeg_quality or (
            records.RESIZED_JPEG_QUALITY if f.resize_shorter else records.PREPARE_JPEG_QUALITY
        )
        common = {
            "resize_shorter": f.resize_shorter,
            "jpeg_quality": quality,
            "num_workers": f.num_workers,
            "overwrite": f.overwrite,
            "truncated": f.truncated,
        }
        if f.dataset == "imagenet2012":
            if not data_dir:
                raise DataError("--dataset imagenet2012 needs --data_dir (the tfds data_dir).")
            out = recipes.prepare_imagenet2012(manual_dir, data_dir, **common)
        elif f.dataset == "imagefolder":
            out = recipes.prepare_imagefolder(
                manual_dir, data_dir, f.name, f.val_fraction, f.seed, **common
            )
        elif f.dataset == "caltech256":
            out = recipes.prepare_caltech256(
                manual_dir, data_dir, keep_clutter=f.keep_clutter, **common
            )
        else:
            out = recipes.DATASETS[f.dataset](manual_dir, data_dir, **common)
        print(f"Ready: {out}", flush=True)


if __name__ == "__main__":
    flags.mark_flags_as_required(["dataset", "manual_dir"])
    app.run(main, flags_parser=cli.parse_flags)
