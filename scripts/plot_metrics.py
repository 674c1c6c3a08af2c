"""Training curves as a picture: `python scripts/plot_metrics.py RUN [RUN ...] [--output curves.png]`.

Draws loss, top-1 (train and val), learning rate, img/s, MFU and input wait against
steps from each run's metrics.jsonl, several runs overlaid (one colour each). Training
writes RUN/curves.png by itself when it ends; this redraws it, or compares runs.
"""

import os

from absl import app, flags

from jaxres import cli

flags.DEFINE_string(
    "output", None, "The PNG (default: RUN/curves.png for one run, ./curves.png for several)."
)


def main(argv):
    run_dirs = argv[1:]
    with cli.user_errors():
        from jaxres import plots
        from jaxres.errors import ConfigError

        if not run_dirs:
            raise ConfigError(
                "Pass run directories after the flags, e.g. scripts/plot_metrics.py runs/a runs/b."
            )
        missing = [r for r in run_dirs if not os.path.isfile(os.path.join(r, "metrics.jsonl"))]
        if missing:
            raise ConfigError(
                f"No metrics.jsonl in {', '.join(missing)}; pass the --workdir of training runs."
            )
        output = flags.FLAGS.output or (
            os.path.join(run_dirs[0], "curves.png") if len(run_dirs) == 1 else "curves.png"
        )
        if not plots.write_curves(run_dirs, output):
            raise ConfigError(f"{', '.join(run_dirs)}: metrics.jsonl has no rows yet.")
        print(f"Curves: {output}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
