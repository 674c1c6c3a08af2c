"""A fitted probe exported as a run: the backbone up to the probed layer, the probe as its head.

    out = export.write_probe_run(loaded, extractor, fitted, class_names, dataset, "runs/probe", info)
    python scripts/predict.py --workdir runs/probe photo.jpg        # then like any run

The exported model takes uint8 images and returns logits: it normalises as the
backbone did, runs the backbone to the layer the features came from (`head_layer`;
later stages are not built), pools it as feature extraction did, and applies the
probe. Feature standardisation is folded into the head (`probe.head_params`), so
the logits equal the probe's decision function on those features. The run's
config is the backbone's with that head (`model.head_layer`, `model.head_hidden`),
the transfer dataset (class count, splits) and the features' preprocessing
(image size, crop ratio); its checkpoint meta holds the class names and the
probe's method, penalty and held-out / test accuracy. `evaluate.py`,
`predict.py`, `linear_probe.py` and `--config.init_from` read it like any run;
fine-tuning from it keeps the head (linear probe, then fine-tune: Kumar et al. 2022).
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from jaxres import runs
from jaxres.data import preprocessing
from jaxres.errors import ConfigError
from jaxres.transfer.features import FeatureExtractor

HEAD_LAYERS = ("pre_logits", "stem")  # And "stageN": what a model can pool and classify.


def check_exportable(extractor: FeatureExtractor) -> None:
    """ConfigError when the features cannot become a head: an unpooled or a logits layer."""
    if extractor.layer == "logits" or not (
        extractor.layer in HEAD_LAYERS or extractor.layer.startswith("stage")
    ):
        raise ConfigError(
            f"features.layer={extractor.layer!r} cannot be exported as a head; export a probe of "
            "pre_logits, stem or a stageN layer."
        )
    if not extractor.pool and extractor.layer != "pre_logits":
        raise ConfigError(
            "An unpooled spatial layer cannot be exported as a head; set --config.features.pool=true."
        )


def exported_config(
    loaded: runs.LoadedRun,
    extractor: FeatureExtractor,
    num_classes: int,
    hidden: int,
    dataset: ml_collections.ConfigDict,
) -> ml_collections.ConfigDict:
    """The backbone's config with the probe's head, the transfer dataset and the features' preprocessing."""
    config = copy.deepcopy(loaded.config)
    config.model.head_layer = extractor.layer
    config.model.head_hidden = hidden
    config.dataset = copy.deepcopy(dataset)
    config.dataset.num_classes = num_classes
    # The features' preprocessing (the backbone's normalisation and decoding, the features' one
    # size), so the exported model is evaluated on the pixels its probe was fitted on.
    preprocessing.write_into(extractor.preprocessing, config)
    config.ema_decay = 0.0  # The weights below are the ones the features came from (EMA if kept).
    config.init_from, config.resume_from, config.init_fresh_head = "", "", False
    return config


def probe_variables(
    loaded: runs.LoadedRun, config: ml_collections.ConfigDict, head: dict[str, Any]
) -> dict[str, Any]:
    """The backbone's weights the exported model has (none past the head layer), with `head`."""
    model = runs.build_model(config)
    size = config.dataset.image_size
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    template = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)
    variables = {}
    for collection, modules in flax.core.unfreeze(template).items():
        source = loaded.variables.get(collection, {})
        variables[collection] = {
            name: jax.tree.map(np.asarray, source[name])
            for name in modules
            if not name.startswith("head") and name in source
        }
    variables["params"].update(head)
    runs.check_variables(variables, model, size, "the exported probe")
    return variables


def write_probe_run(
    loaded: runs.LoadedRun,
    extractor: FeatureExtractor,
    fitted: Any,
    class_names: Sequence[str],
    dataset: ml_collections.ConfigDict,
    output: str,
    probe_info: dict[str, Any],
    overwrite: bool = False,
) -> str:
    """Writes the backbone + fitted probe as a run in `output`; returns its directory.

    Args:
      loaded: the backbone run the features came from.
      extractor: the features' layer and preprocessing.
      fitted: a fitted probe with `head_params()` and `hidden` (jaxres.transfer.probe / mlp_head).
      class_names: the probe's classes, in label order.
      dataset: the transfer dataset config (name, data_dir, splits).
      output: the run directory to write.
      probe_info: method, penalty, setting and accuracies, kept in the checkpoint meta.
      overwrite: replace an earlier export in `output`.
    """
    check_exportable(extractor)
    config = exported_config(loaded, extractor, len(class_names), fitted.hidden, dataset)
    variables = probe_variables(loaded, config, fitted.head_params())
    return runs.write_run(
        output,
        config,
        variables,
        overwrite=overwrite,
        class_names=list(class_names),
        probe=dict(probe_info, layer=extractor.layer, views=extractor.views),
        preprocessing=extractor.preprocessing.description(),
        backbone={"run": loaded.run, "step": int(loaded.step), "model": loaded.config.model.name},
    )
