"""Every config key with its default; `configs/*.py` start here and override.

Code reads `config.key`, never `config.get(key, default)`: a key missing here
is a bug, and an unknown `--config.key=value` on the command line is refused.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import ml_collections

# Where jaxres keeps what it can rebuild: the embedded digits, the XLA compilation cache.
CACHE_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "jaxres")

# ImageNet channel statistics in uint8 units (applied on the device).
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def base_config() -> ml_collections.ConfigDict:
    """The full set of training keys, with ImageNet ResNet-50 defaults."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.batch_size = 1024  # Global, over all devices and processes.
    c.eval_batch_size = 1024
    c.grad_accum_steps = 1  # Each step sums gradients of this many micro-batches.
    c.num_epochs = 90.0  # Fractions work (0.5: half an epoch of steps).
    c.num_steps = 0  # > 0: train exactly this many steps, whatever num_epochs says.

    c.model = ml_collections.ConfigDict()
    c.model.name = "resnetv2_50"
    c.model.dtype = "bfloat16"  # Compute dtype; params are always float32.
    # Fields of jaxres.models.ResNet that differ from the registered model (e.g. stem_type).
    c.model.overrides = ml_collections.ConfigDict()
    # What the classifier head reads and how deep it is (probe exports: jaxres/transfer/export.py):
    # "pre_logits" or a pooled "stem" / "stageN" (later stages not built); 0 = a linear head.
    c.model.head_layer = "pre_logits"
    c.model.head_hidden = 0
    # Stochastic depth: residual branches dropped per example, rate rising linearly over the
    # blocks to this value (timm `drop_path_rate`); training only.
    c.model.drop_path_rate = 0.0
    # How convolutions run on CPU (jaxres/models/cpu_conv.py): "onednn" (oneDNN's kernels, float32;
    # "matmul" where not built or JAXRES_ONEDNN=0), "matmul" or "xla". Same result; GPUs ignore it.
    c.model.cpu_conv = "onednn"

    c.dataset = ml_collections.ConfigDict()
    c.dataset.name = "imagenet2012"  # tfds name, "imagefolder" or "digits" (embedded).
    c.dataset.data_dir = ""  # tfds data_dir, or the image folder root.
    c.dataset.train_split = "train"
    c.dataset.val_split = "validation"
    c.dataset.num_classes = 1000
    c.dataset.image_size = 224
    c.dataset.eval_crop_ratio = 0.875  # Resize to size / ratio, then centre-crop.
    c.dataset.eval_image_size = 0  # Evaluation size; 0 = image_size (RSB A3: train 160, test 224).
    c.dataset.mean = IMAGENET_MEAN
    c.dataset.std = IMAGENET_STD
    c.dataset.train_limit = 0  # Use only the first N train / val examples (0 = all): smoke runs.
    c.dataset.val_limit = 0

    # How stored images are read (jaxres/data/loader.py): decoding and worker processes.
    c.input = ml_collections.ConfigDict()
    # "cpu": decode + augment in the grain workers. "dali": the workers only draw the crops,
    # NVIDIA DALI decodes them (on the GPU when there is one); extra [dali].
    c.input.decoder = "cpu"
    c.input.decode_reduced = True  # Decode JPEGs at 1/2, 1/4, 1/8 size when the crop still covers the output.
    # keep | skip: a truncated JPEG decoded as far as its data goes, or masked like an undecodable one.
    c.input.truncated = "keep"
    # The JPEG inverse DCT (jaxres/data/decode.py): "accurate" (libjpeg's ISLOW: PIL's pixels
    # exactly, what timm and torchvision decode with and published accuracies are measured on)
    # or "fast" (integer IFAST, tf.io.decode_jpeg's default: 6-18 grey levels off at most, mean ~1).
    # Accurate costs ~2% more per image (benchmarks/input.md). Training keeps fast (tf.data's
    # pixels; a run resumed across this key trains on the same pixels as before).
    c.input.train_dct = "fast"
    # Every evaluation's (validation, evaluate, predict, features, transfer). A run saved before
    # the key reads this default (`runs.read_config`): it is evaluated on PIL's pixels, as an
    # imported model is, rather than on the fast-IDCT pixels its recorded val figures came from
    # (they move by decoding noise; set "eval_dct": "fast" in its config.json to repeat them).
    c.input.eval_dct = "accurate"
    c.input.num_workers = 8  # grain worker processes per host (0 = in-process).

    # Augmentation of training images: on the host, per image, in the grain workers (crop, flip,
    # colour, RandAugment, repeats), then on the device, per batch, inside the jitted step
    # (jaxres/device_augment.py), as timm `Mixup` (mode "batch": one lambda per device shard)
    # and `RandomErasing` (mode "pixel").
    c.augment = ml_collections.ConfigDict()
    c.augment.crop_min_area = 0.08  # Inception random-resized-crop area range [min, 1].
    c.augment.flip = True
    c.augment.color_jitter = 0.0  # Brightness/contrast/saturation factors in [1-s, 1+s], random order; 0 = off.
    # timm RandAugment string, e.g. "rand-m7-mstd0.5-inc1" (jaxres/data/randaugment.py); "" = off.
    c.augment.randaugment = ""
    # Repeated augmentation (timm RepeatAugSampler): each image this many times in a row of the
    # stream, differently augmented; an epoch stays len(train) images. 1 = off.
    c.augment.repeated_aug = 1
    c.augment.mixup_alpha = 0.0  # Beta(alpha, alpha) mixing of each image with the flipped batch; 0 = off.
    c.augment.cutmix_alpha = 0.0  # CutMix box area from Beta(alpha, alpha); 0 = off.
    c.augment.mix_prob = 1.0  # Probability that a batch is mixed at all.
    c.augment.switch_prob = 0.5  # With both on: probability of CutMix instead of Mixup.
    c.augment.random_erasing = 0.0  # Probability of erasing one random box with noise per image.

    # The training loss (jaxres/losses.py); evaluation reports plain cross-entropy.
    c.loss = ml_collections.ConfigDict()
    # "softmax" cross-entropy, or "bce": per-class sigmoid binary cross-entropy (RSB A1-A3) whose
    # (mixed, smoothed) targets become 1 above `bce_threshold` and 0 below (0 = off).
    c.loss.name = "softmax"
    c.loss.label_smoothing = 0.1
    c.loss.bce_threshold = 0.0

    c.optimizer = ml_collections.ConfigDict()
    c.optimizer.name = "sgd"  # sgd (Nesterov) | lars | adamw | lamb
    c.optimizer.base_lr = 0.1  # Per 256 images; scaled by batch_size / 256.
    c.optimizer.momentum = 0.9
    c.optimizer.nesterov = True
    c.optimizer.weight_decay = 5e-5  # On kernels only, not on norms or biases.
    c.optimizer.schedule = "cosine"  # cosine | step | constant, after linear warmup.
    c.optimizer.warmup = "5ep"  # Linear warm-up length, a period (jaxres/periods.py): "5ep", "500".
    c.optimizer.decay_epochs = (30, 60, 80)  # For schedule="step".
    c.optimizer.decay_factor = 0.1
    c.optimizer.grad_clip_norm = 0.0  # 0 = off.
    # Fine-tuning: only the head trains for this long (a period: "84", "1ep"), then every layer.
    c.optimizer.head_only = "0"

    c.ema_decay = 0.0  # EMA of params (0 = off); when on, evaluation uses the EMA.

    # Periods (jaxres/periods.py): "500" steps, "2ep" epochs, "50000ex" training examples.
    c.log_every = "100"
    # "START:END": trace steps START..END with jax.profiler into WORKDIR/plugins/profile
    # (TensorBoard's Profile tab, Perfetto); "" = off.
    c.profile_steps = ""

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = "1000"  # Also saved at every epoch's end and when `best_metric` is evaluated.
    c.checkpoint.keep_latest = 2
    c.checkpoint.keep_best = 1
    # Any evaluator's logged key ("val_top1", "fewshot/digits/5shot", ...); "max" or "min" is better.
    # Kept in each checkpoint's meta; `--checkpoint best` picks by it.
    c.checkpoint.best_metric = "val_top1"
    c.checkpoint.best_mode = "max"

    # Evaluators run during training (jaxres/evaluators.py), each on its own period; add more in a
    # config file, e.g. `c.evals.fewshot = fewshot_eval("digits", every="1ep")`.
    c.evals = ml_collections.ConfigDict()
    c.evals.val = classification_eval(every="1ep")  # dataset.val_split, centre crop.
    # Another run's whole state (params, optimizer, step, data position): "RUN" or "RUN:STEP"
    # (STEP: latest | best | a number), to resume or branch a run in a new workdir.
    c.resume_from = ""
    c.init_from = ""  # Another run: "RUN" or "RUN:STEP"; start from its params (fine-tuning).
    c.init_fresh_head = False  # With init_from: a new head even when its shape matches.
    # A key a config file (or code) sets that is not above is an error, not a new key; the
    # model's `overrides` are open (any ResNet field).
    c.lock()
    c.model.overrides.unlock()
    c.evals.unlock()  # Evaluators are named by the config; each one's keys stay checked.
    for evaluator in c.evals.values():
        evaluator.lock()
    return c


EVAL_TYPES = ("classification", "fewshot", "linear_probe")


def classification_eval(
    every: str = "1ep", split: str = "", dataset: str = "", data_dir: str = "", views: str = "center"
) -> ml_collections.ConfigDict:
    """An evaluator of top-1 / top-5 / mean per-class / loss on a split, logged as NAME_top1, ...

    Args:
      every: its period (jaxres/periods.py); it also runs at the last step.
      split: "" = `dataset.val_split` of the training dataset.
      dataset / data_dir: another prepared dataset with the same classes (ImageNet-V2, an image
        folder); "" = the training dataset (whose `val_limit` then applies).
      views: "center" or "10crop" (averaged probabilities).
    """
    e = ml_collections.ConfigDict()
    e.type = "classification"
    e.every, e.split, e.dataset, e.data_dir, e.views = every, split, dataset, data_dir, views
    e.lock()
    return e


def fewshot_eval(
    datasets: str = "digits", every: str = "1ep", shots: str = "1,5,10,25", trials: int = 3,
    layer: str = "pre_logits", data_dir: str = "",
) -> ml_collections.ConfigDict:  # fmt: skip
    """An evaluator of few-shot ridge probes on a layer's features, logged as NAME/DATASET/Kshot.

    The draws, seeds and penalty choice are `configs/transfer/fewshot.py`'s
    (`config_transfer.fewshot_config`), so its last value equals what
    `scripts/linear_probe.py --config configs/transfer/fewshot.py:DATASET --config.probe.methods=ridge`
    reports for that checkpoint.

    Args:
      datasets: comma-separated: "digits" (embedded), caltech101, caltech256, indoor67, a tfds name
        with train / test splits, or "imagefolder" (`data_dir`/train, `data_dir`/test).
      shots / trials: train images per class (comma-separated) and seeded draws of each.
      data_dir: where the datasets are prepared ("" = the training dataset's `data_dir`; the
        embedded digits, probed from another dataset, are written to the cache directory).
    """
    e = ml_collections.ConfigDict()
    e.type = "fewshot"
    e.every, e.datasets, e.shots, e.trials, e.layer, e.data_dir = every, datasets, shots, trials, layer, data_dir
    e.lock()
    return e


def linear_probe_eval(protocol: str, every: str = "10ep", data_dir: str = "") -> ml_collections.ConfigDict:
    """An evaluator running a whole transfer protocol (a configs/transfer file, "PATH[:ARG]"), logged
    as NAME/METHOD/N (mean top-1 over its trials); slower than `fewshot_eval`, so rarer."""
    e = ml_collections.ConfigDict()
    e.type = "linear_probe"
    e.every, e.protocol, e.data_dir = every, protocol, data_dir
    e.lock()
    return e


# Keys that moved to the section of their concern: old key -> new key. Saved runs' config.json
# (`upgrade_keys`) and old command lines (`jaxres.cli`) still read.
MOVED_KEYS = {
    "dataset.decoder": "input.decoder",
    "dataset.decode_reduced": "input.decode_reduced",
    "dataset.truncated": "input.truncated",
    "dataset.num_workers": "input.num_workers",
    "dataset.crop_min_area": "augment.crop_min_area",
    "dataset.flip": "augment.flip",
    "dataset.color_jitter": "augment.color_jitter",
    "dataset.randaugment": "augment.randaugment",
    "dataset.repeated_aug": "augment.repeated_aug",
    "optimizer.loss": "loss.name",
    "optimizer.label_smoothing": "loss.label_smoothing",
    "optimizer.bce_threshold": "loss.bce_threshold",
    "log_every_steps": "log_every",
    "checkpoint_every_steps": "checkpoint.every",
    "keep_latest": "checkpoint.keep_latest",
    "keep_best": "checkpoint.keep_best",
    "eval_every_epochs": "evals.val.every",
    "optimizer.warmup_epochs": "optimizer.warmup",
    "optimizer.head_only_steps": "optimizer.head_only",
}
# Old numeric keys whose new key is a period (jaxres/periods.py): the unit the old number was in.
MOVED_PERIODS = {
    "log_every_steps": "steps",
    "checkpoint_every_steps": "steps",
    "eval_every_epochs": "epochs",
    "optimizer.warmup_epochs": "epochs",
    "optimizer.head_only_steps": "steps",
}


def moved_value(old: str, value: Any) -> Any:
    """An old key's value as its new key takes it: a number of steps or epochs becomes a period."""
    if old not in MOVED_PERIODS:
        return value
    from jaxres.periods import spelled  # Lazy: config files import this module alone.

    try:
        return spelled(float(value), MOVED_PERIODS[old])
    except ValueError:  # Not a number: the new key's own check names it.
        return value


def upgrade_keys(saved: dict[str, Any]) -> dict[str, Any]:
    """A config dict written before keys moved (`MOVED_KEYS`), with each value at its new key."""
    saved = copy.deepcopy(saved)
    for old, new in MOVED_KEYS.items():
        *parents, key = old.split(".")
        section = saved
        for parent in parents:
            section = section.get(parent) if isinstance(section, dict) else None
        if not isinstance(section, dict) or key not in section:
            continue
        value = moved_value(old, section.pop(key))
        *new_parents, new_key = new.split(".")
        target = saved
        for parent in new_parents:
            target = target.setdefault(parent, {})
        target.setdefault(new_key, value)
    return saved
