"""SE-ResNet (ResNet v1.5 + squeeze-and-excitation, Hu et al.) on ImageNet-1k.

    python scripts/train.py --config configs/imagenet_se_resnet.py:50 --workdir runs/se50 \
        --config.dataset.data_dir=/data/tfds

Arg: depth 50, 101 or 152 (default 50). Same recipe as imagenet_resnetv2.py
(batch 1024, SGD + Nesterov, 5 warmup + cosine, 90 epochs, smoothing 0.1),
with zero-init of the last BatchNorm in each block.
Expected (published, not yet reproduced here): SE-ResNet-50 ~77.6% top-1
(Hu et al. report 77.6% single-crop 224 with their recipe).
"""

from jaxres.config_base import base_config

DEPTHS = ("50", "101", "152")


def get_config(arg: str = "50"):
    depth = arg or "50"
    if depth not in DEPTHS:
        raise ValueError(f"configs/imagenet_se_resnet.py:{arg}: depth must be one of {', '.join(DEPTHS)}.")
    c = base_config()
    c.model.name = f"seresnet{depth}"
    return c
