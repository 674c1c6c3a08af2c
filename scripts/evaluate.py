"""Evaluate a run's checkpoint on a whole split: `python scripts/evaluate.py --workdir runs/demo`.

    python scripts/evaluate.py --workdir runs/demo --checkpoint best --crops 10 --output runs/demo/results.json
    python scripts/evaluate.py --workdir runs/a --ensemble runs/a,runs/b

Prints the number of images counted (every one: the last batch is padded and
masked), top-1, top-5, mean per-class accuracy and loss. --ensemble averages
the members' probabilities. The results also go to the (first) run's TensorBoard:
`evaluate/<center|10crop>[_ensembleN]/top1` etc. at the checkpoint's step, and a text table.
Multi-process: the flags of scripts/train.py.
"""

import json

from absl import app, flags

from jaxres import cli

flags.DEFINE_string("workdir", None, "Run directory (config.json + checkpoints/).")
flags.DEFINE_string(
    "ensemble", None, "Comma-separated run directories whose probabilities are averaged."
)
flags.DEFINE_string("checkpoint", "latest", "'latest', 'best' (highest val_top1) or a step number.")
flags.DEFINE_integer(
    "crops", 1, "1: centre crop; 10: four corners + centre and their mirror images."
)
flags.DEFINE_string("split", None, "Split to evaluate (default: the run's dataset.val_split).")
flags.DEFINE_string("data_dir", None, "Overrides the run's dataset.data_dir.")
flags.DEFINE_integer("batch_size", None, "Global batch (default: the run's eval_batch_size).")
flags.DEFINE_string("output", None, "Write the results as JSON here.")
cli.define_distributed_flags()


def main(argv):
    del argv
    f = flags.FLAGS
    cli.initialize_distributed_from_flags()
    with cli.user_errors():
        import jax

        from jaxres import dashboard, evaluate, runs
        from jaxres.errors import ConfigError

        run_dirs = [r for r in (f.ensemble or "").split(",") if r] or ([f.workdir] if f.workdir else [])
        if not run_dirs:
            raise ConfigError("Pass --workdir RUN (or --ensemble RUN_A,RUN_B).")
        results = evaluate.evaluate_runs(
            run_dirs,
            checkpoint=runs.parse_checkpoint(f.checkpoint),
            split=f.split,
            crops=f.crops,
            data_dir=f.data_dir,
            batch_size=f.batch_size,
        )
        print(json.dumps(results, indent=2))
        if f.output:
            with open(f.output, "w") as out:
                json.dump(results, out, indent=2)
        if jax.process_index() == 0:
            dashboard.log_evaluation(results)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
