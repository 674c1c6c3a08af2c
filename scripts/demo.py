"""`make demo`: train on the embedded digits, evaluate the best checkpoint, probe, print a table.

    python scripts/demo.py --workdir runs/demo

Trains `configs/demo.py` (resumes if the workdir has a run), evaluates its
best checkpoint on the whole validation split, fits a linear probe on the
model's `pre_logits` features, and prints one results table.
"""

import os
import sys
import time

from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # configs/ is a folder of the repository, not of the package.

from configs import demo as demo_config  # noqa: E402
from jaxres import cli  # noqa: E402

flags.DEFINE_string("workdir", "runs/demo", "Run directory.")
flags.DEFINE_string("data_dir", None, "Where the digits image folder is written (default: the config's).")


def main(argv):
    del argv
    with cli.user_errors():
        from jaxres import demo

        config = demo_config.get_config()
        if flags.FLAGS.data_dir:
            config.dataset.data_dir = flags.FLAGS.data_dir
        start = time.time()
        rows = demo.run(config, flags.FLAGS.workdir)
        print(demo.format_table(rows, time.time() - start))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
