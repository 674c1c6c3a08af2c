"""A classifier for your images in one command: `python scripts/transfer.py --images DIR --from RUN --output OUT`.

    python scripts/transfer.py --images ~/photos --from runs/r50 --output runs/photos [--head mlp]
    python scripts/predict.py --workdir runs/photos --top_k 3 new_photo.jpg

DIR holds one folder per class (DIR/<class>/<images>), split per class into train
and validation (--val_fraction, seeded), or DIR/train and DIR/val as they are.
The run's features are computed once (cached in OUT/features: a second call with
another --head takes seconds), the head is fitted and exported into OUT as a run,
with the report: results.json, confusion.png, predictions.png (mistakes first).
"""

from absl import app, flags

from jaxres import cli

flags.DEFINE_string("images", None, "Image folder: DIR/<class>/<images> (or DIR/train, DIR/val).", required=True)
flags.DEFINE_string("from", None, "The run whose features the head reads (training run or imported weights).",
                    required=True)  # fmt: skip
flags.DEFINE_string("output", None, "Where the classifier (a run) and the report go.", required=True)
flags.DEFINE_enum("head", "logistic", ["logistic", "ridge", "mlp"], "The classifier fitted on the features.")
flags.DEFINE_float("val_fraction", 0.2, "Share of each class held out for validation (without DIR/val).")
flags.DEFINE_string("checkpoint", "latest", "'latest', 'best' or a step of --from.")
flags.DEFINE_string("layer", "pre_logits", "The feature layer: pre_logits, stem or stageN.")
flags.DEFINE_integer("seed", 0, "Seed of the split and of the head.")
flags.DEFINE_integer("batch_size", 0, "Global batch of the feature pass (0: the run's eval_batch_size).")


def main(argv):
    del argv
    f = flags.FLAGS
    with cli.user_errors():
        from jaxres import runs
        from jaxres.transfer import folder

        folder.transfer_folder(
            f.images,
            f["from"].value,
            f.output,
            head=f.head,
            val_fraction=f.val_fraction,
            checkpoint=runs.parse_checkpoint(f.checkpoint),
            layer=f.layer,
            seed=f.seed,
            batch_size=f.batch_size,
        )


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
