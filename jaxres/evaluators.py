"""Evaluators that run during training (`config.evals`), each on its own period.

    evals = evaluators.build(config, model, eval_fn, variables, mesh, steps_per_epoch)
    at a step:  metrics = evaluators.run_due(evals, step, last, variables)

As big_vision's `config.evals`: a dict of named evaluators, each with a `type`,
its data and its `every` (a period, `jaxres.periods`); each also runs at the last
step. Types (their keys: `config_base.classification_eval`, `fewshot_eval`,
`linear_probe_eval`):

* classification: NAME_top1 / _top5 / _mean_per_class / _loss / _count on a split
  of the training dataset or of another prepared one with the same classes, centre
  crop or 10-crop; every example is counted once on any number of devices and
  processes (padded, masked batches). The default `val` is the validation the trainer
  always ran: the same pixels (`preprocessing.of`), the same keys in metrics.jsonl.
* fewshot: NAME/DATASET/Kshot, the mean top-1 over seeded trials of the closed-form
  ridge probe on K train images per class of a transfer dataset, scored on its
  whole test split; the draws, seeds and penalty choice are
  `config_transfer.fewshot_config`'s, so the last value equals
  `scripts/linear_probe.py --config configs/transfer/fewshot.py:DATASET
  --config.probe.methods=ridge` on that checkpoint. The draws are made once, from
  the labels; each evaluation computes the features of the drawn train images and
  the test split in one sharded pass.
* linear_probe: NAME/METHOD/N (N = "all" for every train image), a whole transfer
  protocol (a configs/transfer file) on the current weights, without a feature cache.

Every evaluator logs its wall time as NAME_eval_s; the trainer keeps it out of the
step time and MFU. Nothing here keeps state between evaluations (the draws are
seeded), so a resumed run evaluates exactly as an uninterrupted one.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxres import config_transfer, periods, runs
from jaxres import metrics as metrics_lib
from jaxres.config_base import EVAL_TYPES
from jaxres.console import log_line
from jaxres.data import preprocessing, sources
from jaxres.errors import ConfigError, unknown_name
from jaxres.transfer import features, probe, report, runner, sampling


class Evaluator:
    """One named evaluator: `every` (steps, 0 = only at the end) and `run(variables)` -> metrics."""

    def __init__(self, name: str, spec: ml_collections.ConfigDict, steps_per_epoch: int, batch_size: int):
        self.name = name
        self.every = periods.to_steps(spec.every, steps_per_epoch, batch_size, f"evals.{name}.every")

    def due(self, step: int, last: bool) -> bool:
        return last or periods.due(step, self.every)

    def run(self, variables: dict[str, Any]) -> dict[str, float]:
        raise NotImplementedError

    def describe(self, metrics: dict[str, float]) -> str:
        """One console line of the results."""
        return " ".join(f"{k} {v:.4f}" for k, v in metrics.items() if isinstance(v, float))


class Classification(Evaluator):
    """Top-1 / top-5 / mean per-class / loss over a whole split (the trainer's `validate`)."""

    def __init__(self, name, spec, config, eval_fn, mesh, steps_per_epoch):
        super().__init__(name, spec, steps_per_epoch, config.batch_size)
        if spec.views not in ("center", "10crop"):
            raise ConfigError(unknown_name(f"config.evals.{name}.views", spec.views, ("center", "10crop")))
        dataset = config.dataset.copy_and_resolve_references()
        if spec.dataset:  # Another dataset with the training classes: its whole split.
            dataset.name, dataset.val_limit = spec.dataset, 0
        if spec.data_dir:
            dataset.data_dir = spec.data_dir
        self.split = spec.split or dataset.val_split
        self.source = sources.open_source(dataset, self.split)
        found = len(self.source.class_names or [])
        if found and found != config.dataset.num_classes:
            raise ConfigError(
                f"config.evals.{name} reads {dataset.name!r} split {self.split!r} with {found} classes; the "
                f"model has {config.dataset.num_classes}. Evaluate on a dataset with the training classes."
            )
        if dataset.val_limit and not spec.dataset:  # Smoke runs: a fixed subset.
            self.source = sources.limited(self.source, dataset.val_limit)
        self.config, self.eval_fn, self.mesh, self.views = config, eval_fn, mesh, spec.views

    def run(self, variables):
        return validate(variables, self.eval_fn, self.source, self.config, self.mesh, self.views, self.name)

    def describe(self, m):
        n = self.name
        return (f"top1 {m[f'{n}_top1']:.4f} top5 {m[f'{n}_top5']:.4f} loss {m[f'{n}_loss']:.4f} "
                f"over {m[f'{n}_count']} images ({self.split}, {self.views})")  # fmt: skip


def validate(
    variables: dict[str, Any],
    eval_fn: Callable,
    source: Any,
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    views: str = "center",
    prefix: str = "val",
) -> dict[str, float]:
    """PREFIX_top1 / _top5 / _mean_per_class / _loss / _count over the whole split (padded + masked)."""
    prep = preprocessing.of(config)  # The pixels evaluate.py, predict.py and the probes see too.
    _, batches = prep.device_batches(source, views, config.eval_batch_size, mesh, config.input.num_workers)
    summary = metrics_lib.summarize_sums(metrics_lib.sum_over_batches(eval_fn, variables, batches))
    return {f"{prefix}_{k}": v for k, v in summary.items()}


def _extractor(config, model, variables, mesh, layer: str, **options: Any) -> features.FeatureExtractor:
    """The training run's features of `layer` with its evaluation preprocessing (as `runs.load` would
    give `scripts/linear_probe.py`); weights are passed to each `extract`. `options`: the
    extractor's pool, views, image_size, crop_ratio."""
    member = runs.LoadedRun(run="", step=0, config=config, model=model, variables=variables, meta={})
    return features.FeatureExtractor(member, layer, mesh=mesh, **options)


class FewShot(Evaluator):
    """Ridge probes on K drawn train images per class of each dataset: NAME/DATASET/Kshot."""

    def __init__(self, name, spec, config, model, variables, mesh, steps_per_epoch):
        super().__init__(name, spec, steps_per_epoch, config.batch_size)
        self.mesh, self.batch_size = mesh, config.eval_batch_size
        self.extractor = _extractor(config, model, variables, mesh, spec.layer)
        self.tasks = []
        for dataset in config_transfer.parse_list(spec.datasets, str, f"evals.{name}.datasets"):
            tc = config_transfer.fewshot_config(dataset)
            # Where the training data is, unless the embedded digits are probed from another dataset.
            own = dataset == config.dataset.name or dataset != "digits"
            tc.dataset.data_dir = spec.data_dir or (config.dataset.data_dir if own else tc.dataset.data_dir)
            tc.protocol.per_class, tc.protocol.trials = spec.shots, spec.trials
            tc.features.layer, tc.probe.methods = spec.layer, "ridge"
            self.tasks.append(self._draw(tc))

    def _draw(self, tc: ml_collections.ConfigDict) -> dict[str, Any]:
        """The trials (from the labels alone, as `linear_probe.py` draws them when every image
        decodes) and one source: the drawn train images, then the whole test split."""
        lists = config_transfer.lists(tc)
        train, test = (sources.open_source(tc.dataset, s) for s in runner.protocol_splits(tc, lists))
        names = list(train.class_names)
        train_y, test_y = np.asarray(train.labels, np.int64), np.asarray(test.labels, np.int64)
        trials = sampling.draw_trials(tc, lists.per_class, train_y, test_y, names)
        drawn = np.unique(np.concatenate([t.train for t in trials]))
        source = sources.Concat(sources.Subset(train, drawn), test)
        return {"config": tc, "lists": lists, "trials": trials, "drawn": drawn, "source": source, "names": names}

    def run(self, variables):
        out = {}
        for task in self.tasks:
            x, y, mask = self.extractor.extract(task["source"], self.batch_size, variables=variables)
            n = len(task["drawn"])
            test_ok = mask[n:] > 0  # Undecodable test images are left out, as linear_probe.py does.
            test = (x[n:][test_ok], y[n:][test_ok])
            rows = []
            for trial in task["trials"]:
                rows_of_trial = np.searchsorted(task["drawn"], trial.train)
                rows_of_trial = rows_of_trial[mask[rows_of_trial] > 0]
                row, _, _ = runner.fit_and_score(
                    "ridge", task["config"].probe, trial.seed, (x[rows_of_trial], y[rows_of_trial]), test,
                    len(task["names"]), probe.fit_mesh(self.mesh), task["lists"].l2s["ridge"],
                )  # fmt: skip
                rows.append(dict(row, per_class=trial.per_class))
            for k in sorted({r["per_class"] for r in rows}):
                summary = report.summarise([r for r in rows if r["per_class"] == k])
                out[f"{self.name}/{task['config'].dataset.name}/{k}shot"] = summary["top1_mean"]
        return out


def load_protocol(path_and_arg: str, name: str) -> ml_collections.ConfigDict:
    """A configs/transfer file's `get_config(ARG)`, from "PATH[:ARG]"."""
    path, _, arg = path_and_arg.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config.evals.{name}.protocol={path_and_arg!r}: no such file; name a configs/transfer/*.py.")
    spec = importlib.util.spec_from_file_location(f"jaxres_protocol_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


class LinearProbe(Evaluator):
    """A whole transfer protocol on the current weights: NAME/METHOD/N, mean top-1 over its trials."""

    def __init__(self, name, spec, config, model, variables, mesh, steps_per_epoch):
        super().__init__(name, spec, steps_per_epoch, config.batch_size)
        self.protocol = load_protocol(spec.protocol, name)
        if spec.data_dir:
            self.protocol.dataset.data_dir = spec.data_dir
        self.lists = config_transfer.lists(self.protocol)
        runner.check_counts_before_features(self.protocol, self.lists)
        f = self.protocol.features
        self.extractor = _extractor(config, model, variables, mesh, f.layer, pool=f.pool, views=f.views,
                                    image_size=f.image_size or None, crop_ratio=f.crop_ratio or None)  # fmt: skip
        self.mesh = mesh

    def run(self, variables):
        (train_x, train_y), test, names = runner.load_data(
            self.protocol, self.lists, self.extractor, cache_dir=None, variables=variables
        )
        trials = sampling.draw_trials(
            self.protocol, self.lists.per_class, train_y, None if test is None else test[1], names
        )
        rows, _, _ = runner.run_trials(self.protocol, self.lists, trials, (train_x, train_y), test, names, self.mesh, None)
        out = {}
        for method in self.lists.methods:
            for n in sorted({r["per_class"] for r in rows}):
                summary = report.summarise([r for r in rows if r["method"] == method and r["per_class"] == n])
                out[f"{self.name}/{method}/{n or 'all'}"] = summary["top1_mean"]
        return out


def build(
    config: ml_collections.ConfigDict,
    model: Any,
    eval_fn: Callable,
    variables: dict[str, Any],
    mesh: jax.sharding.Mesh,
    steps_per_epoch: int,
) -> list[Evaluator]:
    """The evaluators of `config.evals` (passed by `check`), in name order; data opened and draws
    made once, here."""
    out = []
    for name in sorted(config.evals):
        spec = config.evals[name]
        if spec.type == "classification":
            out.append(Classification(name, spec, config, eval_fn, mesh, steps_per_epoch))
        elif spec.type == "fewshot":
            out.append(FewShot(name, spec, config, model, variables, mesh, steps_per_epoch))
        else:
            out.append(LinearProbe(name, spec, config, model, variables, mesh, steps_per_epoch))
    return out


def check(config: ml_collections.ConfigDict) -> None:
    """Fails early, naming the key, on an unknown evaluator type or a bad period or best metric."""
    for name, spec in config.evals.items():
        if spec.get("type") not in EVAL_TYPES:
            raise ConfigError(unknown_name(f"config.evals.{name}.type", spec.get("type"), EVAL_TYPES))
        periods.parse(spec.every, f"evals.{name}.every")
    if config.checkpoint.best_mode not in ("max", "min"):
        raise ConfigError(f"config.checkpoint.best_mode={config.checkpoint.best_mode!r}: use 'max' or 'min'.")
    best, names = config.checkpoint.best_metric, sorted(config.evals)
    if not any(best.startswith((f"{n}_", f"{n}/")) for n in names):
        raise ConfigError(
            f"config.checkpoint.best_metric={best!r} is logged by no evaluator ({', '.join(names)}); name "
            "one of their keys, e.g. val_top1, val_loss (with best_mode=min) or fewshot/DATASET/10shot."
        )


def run_due(
    evaluators: list[Evaluator], step: int, last: bool, variables: dict[str, Any]
) -> dict[str, float]:
    """Runs the evaluators due at `step` (all at the last); their metrics and NAME_eval_s."""
    out = {}
    for e in evaluators:
        if not e.due(step, last):
            continue
        start = time.perf_counter()
        metrics = e.run(variables)
        seconds = time.perf_counter() - start
        log_line(f"eval {e.name} step {step}: {e.describe(metrics)} ({seconds:.1f} s)")
        out.update(metrics, **{f"{e.name}_eval_s": seconds})
    return out
