"""ResNetV2-50 on ImageNet-1k with a large global batch (>= 4k) and LARS, for multi-node runs.

    srun --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 python scripts/train.py --multihost \
        --config configs/imagenet_large_batch.py:4096 --workdir /shared/runs/r50_lars \
        --config.dataset.data_dir=/data/tfds

Arg: global batch size (default 4096; 8192 and 16384 work with the same
linear LR scaling). LARS (You et al. 2017; trust coefficient 0.001, no decay
or trust ratio on norms/biases), peak LR 10 at 4k scaled linearly, 5 warmup
epochs then cosine, 90 epochs, label smoothing 0.1, bf16. Expected
(published for LARS at 4k-8k, not yet reproduced here): ~76-77% top-1 for
ResNet-50; 32 GPUs at the 6,000 img/s per-GPU goal would take ~1 h per 10 epochs.
"""

from jaxres.config_base import base_config


def get_config(arg: str = "4096"):
    c = base_config()
    c.model.name = "resnetv2_50"
    c.batch_size = c.eval_batch_size = int(arg or 4096)
    c.optimizer.name = "lars"
    c.optimizer.base_lr = 10.0 * 256 / 4096  # Peak 10 at batch 4096.
    c.optimizer.nesterov = False
    c.optimizer.warmup = "5ep"
    c.checkpoint.every = "500"
    c.log_every = "50"
    return c
