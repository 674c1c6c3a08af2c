"""Caltech-256 linear probe: 15, 30, 45 and 60 train images per class, 25 test per class, 5 trials.

    python scripts/linear_probe.py --config configs/transfer/caltech256.py --workdir runs/probe_c256 \
        --config.model.checkpoint=runs/r50 --config.dataset.data_dir=/data/tfds

Data: `caltech256` as prepared by scripts/prepare_data.py (256 object classes
in one split "all"; it drops 257.clutter, as the protocol of Griffin et al.
2007 does; a dataset prepared with the clutter class kept can leave it out here
with --config.protocol.exclude_classes=257.clutter). Each trial draws N train
and 25 test images per class from the pool. The smallest class has 80
images, so at N = 60 some classes have only 20 left: they are tested on all of
them (`test_at_most`; set it False to require exactly 25 and get an error
naming the short classes). Expected: ImageNet ResNet-50 features with logistic
regression give roughly 80-85% top-1 at 60 per class (not reproduced here).
"""

from jaxres.config_transfer import base_transfer_config


def get_config(arg: str = ""):
    del arg
    c = base_transfer_config()
    c.dataset.name = "caltech256"
    c.dataset.data_dir = ""
    c.protocol.kind = "pool"
    c.protocol.pool_splits = "all"
    c.protocol.per_class = "15,30,45,60"
    c.protocol.test_per_class = 25
    c.protocol.test_at_most = True
    c.protocol.trials = 5
    return c
