r"""Top-k predictions for images: `python scripts/predict.py --workdir runs/demo --top_k 3 a.jpg FOLDER`.

    python scripts/predict.py --workdir runs/demo --top_k 3 --output runs/demo/preds.csv \
        --grid runs/demo/predictions.png ~/.cache/jaxres/digits/val/7

Prints one line per image (class name and probability for the top k, and the
true class when the image's parent folder is a class name); --output also
writes them as CSV or JSON (timm inference.py-style columns, see
`jaxres.predict.write_predictions`); --grid draws the images with predicted vs
true labels. Each file that cannot be decoded is named once on stderr
(`could not decode FILE (why)`) and flagged decoded=false in --output.

Exit status: 0 when at least one image was decoded, 1 (one `jaxres error:`
line) when none was, 2 for other errors (flags, run directory, paths).
"""

import sys

from absl import app, flags

from jaxres import cli

flags.DEFINE_string("workdir", None, "Run directory (config.json + checkpoints/).", required=True)
flags.DEFINE_integer("top_k", 5, "Classes printed per image.")
flags.DEFINE_string("checkpoint", "latest", "'latest', 'best' or a step number.")
flags.DEFINE_string(
    "output", None, "Also write the predictions here: .csv or .json (format from the extension)."
)
flags.DEFINE_string(
    "grid", None, "Save a grid of the images with predicted / true labels here (PNG)."
)


def main(argv):
    f = flags.FLAGS
    with cli.user_errors():
        from jaxres import predict, runs
        from jaxres.errors import DataError

        if len(argv) < 2:
            raise DataError(
                "Pass image files or folders after the flags, e.g. scripts/predict.py --workdir RUN a.jpg."
            )
        if f.output:
            predict.output_format(f.output)  # A wrong extension fails before the run loads.
        predictions = predict.predict(f.workdir, argv[1:], f.top_k, runs.parse_checkpoint(f.checkpoint))
    try:
        predict.check_decoded(predictions)
    except DataError as e:
        print(f"jaxres error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
    for line in predict.undecodable_lines(predictions):
        print(line, file=sys.stderr, flush=True)
    print(predict.format_predictions(predictions), flush=True)
    with cli.user_errors():
        if f.output:
            predict.write_predictions(predictions, f.output)
            print(f"Predictions: {f.output}")
        if f.grid:
            predict.draw_grid(predictions, f.grid)
            print(f"Grid: {f.grid}")
            predict.log_grid(f.workdir, runs.parse_checkpoint(f.checkpoint), f.grid)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
