"""Every key of a transfer (linear-probe) config with its default; configs/transfer/*.py start here.

The runner is `jaxres.transfer.runner`; this module imports none of it, so a
config file stays a plain description. The dataset keys are training's
(`jaxres.config_base`): `dataset.train_split` is the split probes train on (and
whose class folders name the classes), `dataset.val_split` the split they are
scored on (the "split" protocol kind); the "pool" kind pools `protocol.pool_splits`.

Five keys are comma-separated lists, so that a command line reads
`--config.protocol.per_class=15,30`; `lists(config)` parses them once, where the
config is read (`runner.run_protocol`, the demo's probe, the few-shot evaluator),
and the runner and the draws take the parsed `Lists`.
"""

from __future__ import annotations

import dataclasses

import ml_collections

from jaxres.config_base import CACHE_DIR, base_config
from jaxres.errors import ConfigError

DEFAULT_LAYER = "pre_logits"


def base_transfer_config() -> ml_collections.ConfigDict:
    """The full set of transfer keys, with the embedded digits as the dataset."""
    c = ml_collections.ConfigDict()
    c.model = ml_collections.ConfigDict()
    c.model.checkpoint = ""  # A run directory (training run or imported weights).
    c.model.step = "latest"  # "latest", "best" or a step number.

    c.dataset = base_config().dataset  # name, data_dir, splits, ... as for training.
    c.dataset.name = "digits"
    c.dataset.data_dir = CACHE_DIR
    c.dataset.val_split = "test"
    c.eval_batch_size = 64  # Global batch of the feature pass.

    c.features = ml_collections.ConfigDict()
    c.features.layer = DEFAULT_LAYER
    c.features.pool = True  # Global-average-pool spatial layers.
    c.features.views = "center"  # center | flip | 10crop (averaged).
    c.features.image_size = 0  # 0: the checkpoint's evaluation size (dataset.eval_image_size or image_size).
    c.features.crop_ratio = 0.0  # 0: the checkpoint's eval_crop_ratio.
    c.features.cache_dir = ""  # "": WORKDIR/features.

    c.protocol = ml_collections.ConfigDict()
    c.protocol.kind = "split"  # pool | split (see jaxres/transfer/sampling.py).
    c.protocol.per_class = "0"  # Comma-separated train images per class; 0 = all (split kind).
    c.protocol.test_per_class = 0  # pool kind: test images per class.
    c.protocol.test_at_most = True  # pool kind: "up to" test_per_class (the rest when fewer).
    c.protocol.trials = 1
    c.protocol.seed = 0
    c.protocol.pool_splits = "all"  # pool kind: the splits pooled (prepare_data.py writes "all").
    c.protocol.exclude_classes = ""  # Comma-separated class names left out (e.g. clutter).

    c.probe = ml_collections.ConfigDict()
    c.probe.methods = "logistic,ridge"  # logistic | ridge | mlp; the first draws the confusion matrix.
    c.probe.logistic_l2s = ""  # Comma-separated; "": jaxres.transfer.logistic.LOGISTIC_L2S.
    c.probe.ridge_l2s = ""  # Relative penalties; "": jaxres.transfer.probe.RIDGE_L2S.
    c.probe.holdout = 0.2  # Fraction of each class's train images that picks the L2.
    c.probe.tol = 1e-4  # Logistic: max |gradient| at convergence (scikit-learn's default).
    c.probe.max_iter = 1000
    # methods entry "mlp": one hidden layer (jaxres/transfer/mlp_head.py), early-stopped on holdout.
    c.probe.mlp_hidden = 512
    c.probe.mlp_dropout = 0.5
    c.probe.mlp_steps = 500
    c.probe.mlp_learning_rate = 1e-3
    c.probe.mlp_weight_decay = 1e-4
    c.probe.mlp_label_smoothing = 0.1

    c.export = ml_collections.ConfigDict()
    c.export.dir = ""  # A directory: the chosen probe + backbone written there as a run.
    c.export.per_class = -1  # The setting exported (its first trial); -1: the largest N.
    c.export.method = ""  # "": the method with the best held-out top-1.
    return c


# The few-shot protocol's splits where a dataset's are not named train / test.
FEWSHOT_SPLITS = {"digits": ("train", "val")}


def fewshot_config(dataset: str = "digits") -> ml_collections.ConfigDict:
    """configs/transfer/fewshot.py's protocol on `dataset`: 1, 5, 10 and 25 train images per class
    from its train split, 3 seeded trials, scored on its whole test split. The few-shot evaluator
    during training (`jaxres.evaluators`) starts from it too, so both draw the same images."""
    c = base_transfer_config()
    c.dataset.name = dataset
    c.dataset.data_dir = CACHE_DIR if dataset == "digits" else ""
    c.dataset.train_split, c.dataset.val_split = FEWSHOT_SPLITS.get(dataset, ("train", "test"))
    c.protocol.kind = "split"
    c.protocol.per_class = "1,5,10,25"
    c.protocol.trials = 3
    return c


@dataclasses.dataclass(frozen=True)
class Lists:
    """The comma-separated keys of a transfer config, parsed (`lists(config)`)."""

    per_class: tuple[int, ...]  # protocol.per_class: train images per class; 0 = all.
    pool_splits: tuple[str, ...]  # protocol.pool_splits
    exclude_classes: tuple[str, ...]  # protocol.exclude_classes
    methods: tuple[str, ...]  # probe.methods
    l2s: dict[str, tuple[float, ...] | None]  # probe.{method}_l2s; None: the probe's default sweep.


def parse_list(text: str | int, kind: type = int, name: str = "value") -> list:
    """ "15,30" -> [15, 30] (an int passes through); a bad entry names the key."""
    if isinstance(text, (int, float)):
        return [kind(text)]
    try:
        return [kind(v.strip()) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise ConfigError(
            f"config.{name}={text!r}: expected comma-separated {kind.__name__}s, e.g. '15,30'."
        ) from None


def lists(config: ml_collections.ConfigDict) -> Lists:
    """Parses the config's comma-separated keys once, checking the counts and the method list."""
    p, probe = config.protocol, config.probe
    per_class = tuple(parse_list(p.per_class, int, "protocol.per_class"))
    if not per_class or min(per_class) < 0 or (p.kind == "pool" and min(per_class) < 1):
        raise ConfigError(
            f"config.protocol.per_class={p.per_class!r}: give positive counts, e.g. '15,30'."
        )
    methods = tuple(parse_list(probe.methods, str, "probe.methods"))
    if not methods:
        raise ConfigError("config.probe.methods is empty; give e.g. 'logistic,ridge'.")
    l2s = {}
    for method in ("logistic", "ridge"):
        values = parse_list(probe[f"{method}_l2s"], float, f"probe.{method}_l2s")
        l2s[method] = tuple(values) or None
    return Lists(
        per_class=per_class,
        pool_splits=tuple(parse_list(p.pool_splits, str, "protocol.pool_splits")),
        exclude_classes=tuple(parse_list(p.exclude_classes, str, "protocol.exclude_classes")),
        methods=methods,
        l2s=l2s,
    )
