"""ResNetV2 (pre-activation) on ImageNet-1k (ILSVRC2012), data-parallel on GPUs.

    python scripts/train.py --config configs/imagenet_resnetv2.py:50 --workdir runs/r50 \
        --config.dataset.data_dir=/data/tfds

Arg: depth, one of 18, 34, 50, 101, 152, 200 (default 50). Data: tfds
`imagenet2012` prepared as array_record (scripts/prepare_data.py). Recipe:
global batch 1024, SGD + Nesterov 0.9, base LR 0.1 per 256 (peak 0.4), 5
warmup epochs then cosine to 0, 90 epochs, label smoothing 0.1, weight decay
5e-5 on kernels, bf16 compute, 224x224 Inception crops.
Expected (published for this recipe, not yet reproduced here): ResNetV2-50
~77% top-1 (He et al. 2016 report 77.2% for 200 epochs w/o smoothing; timm's
`resnetv2_50` reaches 80.4% with a much longer recipe); about 1 day on 8 GPUs.

`:50,smoke` trains 20 steps on 512 images for a quick check of the data path.
"""

from jaxres.config_base import base_config

DEPTHS = ("18", "34", "50", "101", "152", "200")


def get_config(arg: str = "50"):
    depth, *flags = (arg or "50").split(",")
    if depth not in DEPTHS:
        raise ValueError(f"configs/imagenet_resnetv2.py:{arg}: depth must be one of {', '.join(DEPTHS)}.")
    c = base_config()
    c.model.name = f"resnetv2_{depth}"
    if "smoke" in flags:
        c.batch_size = c.eval_batch_size = 32
        c.num_epochs = 1
        c.dataset.train_limit = 640
        c.dataset.val_limit = 100
        c.log_every = "5"
    return c
