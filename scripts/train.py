"""Train (or resume) a run: `python scripts/train.py --config configs/demo.py --workdir runs/demo`.

Re-running with the same --workdir resumes from its newest checkpoint.
Override any config key with --config.key=value. Multi-process: see README
"Multi-GPU and multi-host" (--multihost for SLURM/MPI, or the explicit
--coordinator_address / --num_processes / --process_id flags).
"""

from absl import app, flags
from ml_collections import config_flags

from jaxres import cli

config_flags.DEFINE_config_file("config", None, "Config file, optionally with :arg.", lock_config=True)
flags.DEFINE_string("workdir", None, "Run directory (checkpoints, metrics.jsonl, TensorBoard events).", required=True)
cli.define_distributed_flags()


def main(argv):
    del argv
    cli.initialize_distributed_from_flags()
    with cli.user_errors():
        from jaxres import train

        train.train_and_evaluate(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == "__main__":
    flags.mark_flags_as_required(["config"])
    app.run(main, flags_parser=cli.parse_flags)
