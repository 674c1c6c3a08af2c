"""Caltech-101 linear probe: 15 and 30 train images per class, up to 50 test per class, 5 trials.

    python scripts/linear_probe.py --config configs/transfer/caltech101.py --workdir runs/probe_c101 \
        --config.model.checkpoint=runs/r50 --config.dataset.data_dir=/data/tfds

Data: `caltech101` prepared by scripts/prepare_data.py (101 object classes,
BACKGROUND_Google dropped; 8,677 images in one split "all"). Each trial draws N
train images per class and up to 50 test images per class from the rest
(Fei-Fei et al. 2004); the smallest class has 31 images, so at N = 30 it is
tested on 1. (A tfds `caltech101`, 102 classes with BACKGROUND_Google, works
too: --config.protocol.pool_splits=train,test.) Features: pre_logits of the
checkpoint, at its evaluation preprocessing (224 centre crop for ImageNet runs).
Probes: logistic regression (L2 swept, chosen on 20% of each class's train
images) and ridge. Time: feature extraction dominates (about 8.7k ResNet-50
forward passes: minutes on one GPU, ~10 min on 2 CPU cores); the probe sweep
takes seconds on CPU once features are cached (benchmarks/probe.md).
Expected: an ImageNet ResNet-50 reaches roughly 90% mean per-class accuracy at
30 per class with logistic regression (Kornblith et al. 2019 report ~91% for
ImageNet ResNet-50 features); not yet reproduced here.
"""

from jaxres.config_transfer import base_transfer_config


def get_config(arg: str = ""):
    del arg
    c = base_transfer_config()
    c.dataset.name = "caltech101"
    c.dataset.data_dir = ""
    c.protocol.kind = "pool"
    c.protocol.pool_splits = "all"
    c.protocol.per_class = "15,30"
    c.protocol.test_per_class = 50
    c.protocol.test_at_most = True
    c.protocol.trials = 5
    return c
