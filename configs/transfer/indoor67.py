"""MIT Indoor-67 linear probe on the official split (80 train / 20 test images per class).

    python scripts/linear_probe.py --config configs/transfer/indoor67.py --workdir runs/probe_indoor \
        --config.model.checkpoint=runs/r50 --config.dataset.data_dir=/data/tfds

Data: `indoor67` as prepared by scripts/prepare_data.py, whose splits "train"
and "test" are the official TrainImages.txt / TestImages.txt lists (Quattoni &
Torralba 2009): 5,360 train and 1,340 test images, 67 classes. One trial on
all train images; the L2 penalty is chosen on 20% of each class's train images,
then refit on all. Mean per-class accuracy is the number usually reported.
Expected: ImageNet ResNet-50 features reach roughly 70-75% (not reproduced here).
"""

from jaxres.config_transfer import base_transfer_config


def get_config(arg: str = ""):
    del arg
    c = base_transfer_config()
    c.dataset.name = "indoor67"
    c.dataset.data_dir = ""
    c.protocol.kind = "split"
    c.dataset.train_split, c.dataset.val_split = "train", "test"
    c.protocol.per_class = "0"  # All train images.
    c.protocol.trials = 1
    return c
