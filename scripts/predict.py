"""Top-k predictions for images: `python scripts/predict.py --workdir runs/demo --top_k 3 a.jpg FOLDER`.

    python scripts/predict.py --workdir runs/demo --top_k 3 --grid runs/demo/predictions.png \
        ~/.cache/jaxres/digits/val/7

Prints one line per image (class name and probability for the top k, and the
true class when the image's parent folder is a class name); --grid draws the
images with predicted vs true labels.
"""

from absl import app, flags

from jaxres import cli

flags.DEFINE_string("workdir", None, "Run directory (config.json + checkpoints/).", required=True)
flags.DEFINE_integer("top_k", 5, "Classes printed per image.")
flags.DEFINE_string("checkpoint", "latest", "'latest', 'best' or a step number.")
flags.DEFINE_string(
    "grid", None, "Save a grid of the images with predicted / true labels here (PNG)."
)


def main(argv):
    with cli.user_errors():
        from jaxres import predict, runs
        from jaxres.errors import DataError

        if len(argv) < 2:
            raise DataError(
                "Pass image files or folders after the flags, e.g. scripts/predict.py --workdir RUN a.jpg."
            )
        f = flags.FLAGS
        predictions = predict.predict(f.workdir, argv[1:], f.top_k, runs.parse_checkpoint(f.checkpoint))
        print(predict.format_predictions(predictions))
        if f.grid:
            predict.draw_grid(predictions, f.grid)
            print(f"Grid: {f.grid}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
