"""Demo: a small ResNetV2 on the embedded digits dataset, on CPU, in minutes.

    python scripts/train.py --config configs/demo.py --workdir runs/demo

Data: scikit-learn's 1,797 handwritten digits (10 classes) as 32x32 JPEGs,
fixed stratified split 1,438 train / 359 val, no download. Model
`resnetv2_18` with a 3x3/1 stem (no max-pool), fp32, batch 64, SGD +
Nesterov, 1 warmup epoch then cosine, 6 epochs.
Expected on 2 CPU cores: ~2.5 min (about 25 s per epoch), val top-1 0.99
(measured on 25 Nov 2026: 0.992 on one CPU device, 0.994 in 145 s on the two
CPU devices the scripts now make; chance is 0.10).

`configs/demo.py:smoke` is a seconds-long run on 256 images for tests.
"""

from jaxres.config_base import CACHE_DIR, base_config


def get_config(arg: str = ""):
    c = base_config()
    c.seed = 0
    c.batch_size = 64
    c.eval_batch_size = 128
    c.num_epochs = 6

    c.model.name = "resnetv2_18"
    c.model.overrides.stem_type = "cifar"  # 3x3/1 stem, no max-pool: 32x32 inputs keep their detail.
    c.model.dtype = "float32"  # bf16 convolutions are slow on CPU.

    c.dataset.name = "digits"
    c.dataset.data_dir = CACHE_DIR
    c.dataset.train_split = "train"
    c.dataset.val_split = "val"
    c.dataset.num_classes = 10
    c.dataset.image_size = 32
    c.dataset.eval_crop_ratio = 1.0  # The digits fill the frame: no centre crop.
    c.dataset.crop_min_area = 0.5  # Milder than ImageNet's 0.08: an 8% crop of a digit is a stroke.
    c.dataset.flip = False  # A mirrored 2 is not a 2.
    c.dataset.mean = (0.25 * 255,) * 3
    c.dataset.std = (0.35 * 255,) * 3
    c.dataset.num_workers = 0  # Decoding 32x32 JPEGs is cheap; worker processes cost more than they save.

    c.optimizer.base_lr = 0.4  # x 64 / 256 = 0.1 peak.
    c.optimizer.weight_decay = 5e-4  # Small data: more regularisation than ImageNet.
    c.optimizer.warmup_epochs = 1.0

    c.log_every_steps = 10
    c.checkpoint_every_steps = 50
    c.eval_every_epochs = 1

    if arg == "smoke":  # Seconds: a tiny model on 256 images, for tests.
        c.model.name = "resnetv2_tiny"
        c.num_epochs = 2
        c.batch_size = 32
        c.eval_batch_size = 48
        c.dataset.train_limit = 256
        c.dataset.val_limit = 100
        c.log_every_steps = 2
        c.checkpoint_every_steps = 4
    return c
