"""`make demo`: train on the embedded digits, evaluate the best checkpoint, probe, print a table.

    python scripts/demo.py --workdir runs/demo [--config.num_epochs=3 ...]

Trains `configs/demo.py` (resumes if the workdir has a run), evaluates its
best checkpoint on the whole validation split, fits a linear probe on the
model's `pre_logits` features, and prints one results table.
"""

import os
import time

from absl import app, flags
from ml_collections import config_flags

from jaxres import cli

DEMO_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py")

config_flags.DEFINE_config_file("config", DEMO_CONFIG, "The demo's config (override keys with --config.key=value).")
flags.DEFINE_string("workdir", "runs/demo", "Run directory.")
flags.DEFINE_string("data_dir", None, "Where the digits image folder is written (default: the config's).")


def main(argv):
    del argv
    with cli.user_errors():
        from jaxres import demo

        config = flags.FLAGS.config
        if flags.FLAGS.data_dir:
            config.dataset.data_dir = flags.FLAGS.data_dir
        start = time.time()
        rows = demo.run(config, flags.FLAGS.workdir)
        print(demo.format_table(rows, time.time() - start))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
