r"""Linear probes on a model's frozen features under a transfer protocol.

    python scripts/linear_probe.py --config configs/transfer/caltech101.py --workdir runs/probe_c101 \
        --config.model.checkpoint=runs/r50 --config.dataset.data_dir=/data/tfds
    python scripts/linear_probe.py --config configs/transfer/fewshot.py:digits --workdir runs/demo_fewshot \
        --config.model.checkpoint=runs/demo

Extracts features once per split (cached under WORKDIR/features), runs every
N per class x trial x regularisation sweep, prints the results table and writes
WORKDIR/results.json, results.csv and confusion.png. --export OUT writes the
chosen probe (the best held-out method, refit on the first trial of the largest
N, or --config.export.per_class) with the backbone as a run that evaluate.py,
predict.py and --config.init_from read:

    python scripts/linear_probe.py --config configs/transfer/fewshot.py:digits --workdir runs/demo_fewshot \
        --config.model.checkpoint=runs/demo --export runs/demo_probe
    python scripts/predict.py --workdir runs/demo_probe --top_k 3 ~/.cache/jaxres/digits/val/7
"""

from absl import app, flags
from ml_collections import config_flags

from jaxres import cli

config_flags.DEFINE_config_file(
    "config",
    None,
    "Transfer config (configs/transfer/*.py), optionally with :arg.",
    lock_config=True,
)
flags.DEFINE_string("workdir", None, "Output directory (results, feature cache).", required=True)
flags.DEFINE_string(
    "export", None, "Write the chosen probe on the backbone as a run here (= --config.export.dir)."
)
cli.define_distributed_flags()


def main(argv):
    del argv
    cli.initialize_distributed_from_flags()
    with cli.user_errors():
        from jaxres.transfer import runner

        config = flags.FLAGS.config
        if flags.FLAGS.export:
            config.export.dir = flags.FLAGS.export
        runner.run_protocol(config, flags.FLAGS.workdir)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=cli.parse_flags)
