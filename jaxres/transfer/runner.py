"""Runs a transfer protocol: features once per split (cached), then every N x trial x probe.

    python scripts/linear_probe.py --config configs/transfer/caltech101.py --workdir W \
        --config.model.checkpoint=runs/r50

The config's keys are `jaxres.config_transfer.base_transfer_config`; the draws
are `jaxres.transfer.sampling`, the probes `jaxres.transfer.probe` (ridge), `logistic` and `mlp_head`, the outputs
`jaxres.transfer.report`. Features are extracted once per split and cached
(`jaxres.transfer.features`); results are mean +- sample std over trials of
top-1 and mean per-class accuracy.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from jaxres import config_transfer, parallel, runs
from jaxres.data import sources
from jaxres.errors import ConfigError, unknown_name
from jaxres.console import log_line
from jaxres.transfer import export, features, logistic, mlp_head, probe, report, sampling
from jaxres.transfer.sampling import KINDS

# The linear probes by config name; "mlp" is `mlp_head.MLPProbe`.
PROBES = {"ridge": probe.RidgeProbe, "logistic": logistic.LogisticProbe}
METHODS = (*PROBES, "mlp")


def make_probe(
    method: str, probe_config: ml_collections.ConfigDict, seed: int, l2s: Sequence[float] | None = None
) -> Any:
    """A probe from `config.probe`: "logistic", "ridge" or "mlp" (a one-hidden-layer head).

    `l2s`: the penalty sweep (`config_transfer.lists(config).l2s[method]`); None: the probe's default.
    """
    if method not in METHODS:
        raise ConfigError(unknown_name("config.probe.methods entry", method, METHODS))
    if method == "mlp":
        c = probe_config
        return mlp_head.MLPProbe(
            hidden=c.mlp_hidden,
            dropout=c.mlp_dropout,
            learning_rate=c.mlp_learning_rate,
            weight_decay=c.mlp_weight_decay,
            label_smoothing=c.mlp_label_smoothing,
            max_steps=c.mlp_steps,
            holdout=c.holdout,
            seed=seed,
        )
    l2s = list(l2s) if l2s else None
    if method == "ridge":
        return probe.RidgeProbe(l2s, holdout=probe_config.holdout, seed=seed)
    return logistic.LogisticProbe(
        l2s,
        holdout=probe_config.holdout,
        seed=seed,
        tol=probe_config.tol,
        max_iter=probe_config.max_iter,
    )


def fit_and_score(
    method: str,
    probe_config: ml_collections.ConfigDict,
    seed: int,
    train: tuple,
    test: tuple,
    num_classes: int,
    mesh: jax.sharding.Mesh,
    l2s: Sequence[float] | None = None,
) -> tuple[dict[str, Any], np.ndarray, Any]:
    """Fits one probe on (x, y) `train`, scores it on `test`; returns (row, test predictions, probe).

    `l2s`: the penalty sweep (None: the probe's default).

    The row holds top1, mean_per_class, the penalty, its held-out top-1 and the seconds.
    """
    start = time.perf_counter()
    x_train, train_mask = probe.shard_rows(train[0], mesh)
    model = make_probe(method, probe_config, seed, l2s).fit(x_train, train[1], train_mask, num_classes)
    x_test, test_mask = probe.shard_rows(test[0], mesh)
    scores = model.score(x_test, test[1], test_mask)
    predictions = model.predict(x_test)[: len(test[1])]
    row = dict(
        scores,
        l2=model.l2_,
        l2_source=model.l2_source_,
        holdout_top1=max(model.sweep_.values()) if model.sweep_ else None,
        seconds=time.perf_counter() - start,
    )
    return row, predictions, model


def _split_features(config, extractor, split: str, cache_dir: str | None, variables: Any = None):
    source = sources.open_source(config.dataset, split)
    name = {
        "name": config.dataset.name,
        "data_dir": os.path.abspath(os.path.expanduser(config.dataset.data_dir)),
        "split": split,
    }
    if cache_dir is None:  # Weights that change (an evaluator during training): no cache.
        x, y, mask = extractor.extract(source, config.eval_batch_size, variables=variables)
    else:
        x, y, mask = features.cached_features(extractor, source, name, cache_dir, config.eval_batch_size)
    return x, y.astype(np.int64), mask, list(source.class_names)


def _keep_classes(class_names: list[str], excluded: Sequence[str]) -> list[int]:
    for name in excluded:
        if name not in class_names:
            raise ConfigError(
                unknown_name("class in config.protocol.exclude_classes", name, class_names)
            )
    return [i for i, n in enumerate(class_names) if n not in excluded]


def _relabel(x, y, mask, keep: list[int], num_classes: int):
    """Drops undecodable images and excluded classes; class ids become positions in `keep`."""
    new_id = np.full(num_classes, -1)
    new_id[keep] = np.arange(len(keep))
    valid = (mask > 0) & (new_id[y] >= 0)
    return x[valid], new_id[y[valid]]


def protocol_splits(config: ml_collections.ConfigDict, lists: config_transfer.Lists) -> list[str]:
    """The splits a protocol reads: the pooled ones, or train and test (`dataset.val_split`)."""
    p = config.protocol
    if p.kind not in KINDS:
        raise ConfigError(unknown_name("config.protocol.kind", p.kind, KINDS))
    if p.kind == "pool":
        return list(lists.pool_splits)
    return [config.dataset.train_split, config.dataset.val_split]


def check_counts_before_features(config: ml_collections.ConfigDict, lists: config_transfer.Lists) -> None:
    """Checks the probe methods and draws the protocol's trials on the splits' labels alone: an
    unknown method or a class too small to sample fails here, in one line, before any forward
    pass (the real draw drops undecodable images too)."""
    for method in lists.methods:
        if method not in METHODS:
            raise ConfigError(unknown_name("config.probe.methods entry", method, METHODS))
    splits = [sources.open_source(config.dataset, s) for s in protocol_splits(config, lists)]
    class_names = list(splits[0].class_names)
    keep = _keep_classes(class_names, lists.exclude_classes)
    parts = [_relabel(np.zeros(len(s)), np.asarray(s.labels, np.int64), np.ones(len(s)), keep, len(class_names))
             for s in splits]  # fmt: skip
    train_y = np.concatenate([y for _, y in parts]) if config.protocol.kind == "pool" else parts[0][1]
    test_y = None if config.protocol.kind == "pool" else parts[1][1]
    sampling.draw_trials(config, lists.per_class, train_y, test_y, [class_names[i] for i in keep])


def load_data(
    config: ml_collections.ConfigDict,
    lists: config_transfer.Lists,
    extractor: features.FeatureExtractor,
    cache_dir: str | None,
    variables: Any = None,
):
    """The protocol's features: (pool or train, test or None, class names).

    `cache_dir` None: not cached, of `variables` (default: the extractor's run's weights).
    """
    p = config.protocol
    loaded = [_split_features(config, extractor, s, cache_dir, variables) for s in protocol_splits(config, lists)]
    class_names = loaded[0][3]
    keep = _keep_classes(class_names, lists.exclude_classes)
    parts = [_relabel(x, y, m, keep, len(class_names)) for x, y, m, _ in loaded]
    names = [class_names[i] for i in keep]
    if p.kind == "pool":
        return (
            (np.concatenate([a for a, _ in parts]), np.concatenate([b for _, b in parts])),
            None,
            names,
        )
    return parts[0], parts[1], names


def run_protocol(
    config: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh | None = None
) -> dict[str, Any]:
    """Features once (cached), then every N x trial x probe; writes results.json / .csv / confusion.png.

    Args:
      config: a config from configs/transfer/ (keys: `base_transfer_config()`).
      workdir: where results and (by default) the feature cache go.
      mesh: of the feature extraction (default: every device); probes fit on `probe.fit_mesh(mesh)`.

    Returns:
      The results dict written to `workdir/results.json`.
    """
    if not config.model.checkpoint:
        raise ConfigError(
            "Set --config.model.checkpoint=RUN (a training run or an imported model directory)."
        )
    mesh = mesh if mesh is not None else parallel.make_mesh()
    lists = config_transfer.lists(config)  # The comma-separated keys, parsed once.
    check_counts_before_features(config, lists)
    member = runs.load(config.model.checkpoint, runs.parse_checkpoint(config.model.step))
    f = config.features
    extractor = features.FeatureExtractor(
        member, f.layer, f.pool, f.views, f.image_size or None, f.crop_ratio or None, mesh
    )
    if config.export.dir:
        export.check_exportable(extractor)  # Before the feature pass, not after it.
    cache_dir = f.cache_dir or os.path.join(workdir, "features")
    (train_x, train_y), test, names = load_data(config, lists, extractor, cache_dir)
    trials = sampling.draw_trials(config, lists.per_class, train_y, None if test is None else test[1], names)
    setting = export_setting(config, trials) if config.export.dir else None
    methods = list(lists.methods)
    rows, shown, fitted = run_trials(config, lists, trials, (train_x, train_y), test, names, mesh, setting)
    results = report.results_dict(config, member, extractor, names, methods, rows)
    if fitted:
        results["export"] = export_probe(config, member, extractor, names, fitted)
    if jax.process_index() == 0:
        report.write_outputs(workdir, results, rows, shown, names)
    return results


def run_trials(config, lists, trials, train, test, names, mesh, export_setting_n):
    """Every trial x method: (result rows, the representative trial for the confusion matrix,
    {method: (row, fitted probe)} of the export setting's first trial).

    The representative trial is the first method's at the largest N whose top-1 is closest to
    the mean over those trials (the best one would show a rosier matrix than the table).
    """
    train_x, train_y = train
    methods = lists.methods
    largest = max({t.per_class for t in trials}, key=lambda n: (n == 0, n))  # 0 = all: the largest.
    rows, candidates, fitted = [], [], {}
    for trial in trials:
        test_x, test_y = (train_x, train_y) if test is None else test
        for method in methods:
            row, predictions, model = fit_and_score(
                method,
                config.probe,
                trial.seed,
                (train_x[trial.train], train_y[trial.train]),
                (test_x[trial.test], test_y[trial.test]),
                len(names),
                probe.fit_mesh(mesh),
                lists.l2s.get(method),
            )
            row.update(
                method=method,
                per_class=trial.per_class,
                trial=trial.trial,
                seed=trial.seed,
                n_train=len(trial.train),
                n_test=len(trial.test),
            )
            rows.append(row)
            log_line(
                f"{method} N={trial.per_class} trial {trial.trial}: top-1 {row['top1']:.4f} "
                f"mean per-class {row['mean_per_class']:.4f} (l2 {row['l2']:.3g}, {row['seconds']:.1f} s)"
            )
            if method == methods[0] and trial.per_class == largest:
                candidates.append((row, test_y[trial.test], predictions))
            if (trial.per_class, trial.trial) == (export_setting_n, 0):
                fitted[method] = (row, model)
    mean = np.mean([row["top1"] for row, _, _ in candidates])
    shown = min(candidates, key=lambda c: abs(c[0]["top1"] - mean))  # Ties: the first trial.
    return rows, shown, fitted


def export_setting(config: ml_collections.ConfigDict, trials: list) -> int:
    """The train images per class whose first trial is exported: `export.per_class`, else the
    largest setting (0, "all train images", counts as the largest)."""
    settings = sorted({t.per_class for t in trials}, key=lambda n: (n == 0, n))
    want = config.export.per_class
    if want < 0:
        return settings[-1]
    if want not in settings:
        raise ConfigError(
            f"config.export.per_class={want} is not a setting of this protocol "
            f"({', '.join(map(str, settings))}); set --config.export.per_class to one of them."
        )
    return want


def export_probe(
    config: ml_collections.ConfigDict,
    member: runs.LoadedRun,
    extractor: features.FeatureExtractor,
    names: list[str],
    fitted: dict[str, tuple[dict[str, Any], Any]],
) -> dict[str, Any]:
    """Writes the chosen probe of the export setting as a run in `config.export.dir`.

    The method is `export.method`, else the one with the best held-out top-1 (its penalty
    was already picked on that held-out part; ties: the first listed).
    """
    method = config.export.method or max(fitted, key=lambda m: fitted[m][0]["holdout_top1"] or -1.0)
    if method not in fitted:
        raise ConfigError(unknown_name("config.export.method", method, fitted))
    row, model = fitted[method]
    info = {k: row[k] for k in ("per_class", "trial", "seed", "l2", "l2_source", "n_train", "n_test")}
    info.update(
        method=method,
        holdout_top1=row["holdout_top1"],
        test_top1=row["top1"],
        test_mean_per_class=row["mean_per_class"],
        protocol=config.protocol.kind,
    )
    out = export.write_probe_run(member, extractor, model, names, config.dataset, config.export.dir, info)
    log_line(
        f"Exported the {method} probe (N={row['per_class']} trial 0, held-out top-1 "
        f"{row['holdout_top1'] if row['holdout_top1'] is not None else 'n/a'}, test top-1 {row['top1']:.4f}) "
        f"as a run: {out}\n  python scripts/predict.py --workdir {out} IMAGE..."
    )
    return dict(info, dir=out)
