"""Fine-tune a trained run: a new head, head-only warm-up, then every layer at a lower LR.

    python scripts/train.py --config configs/finetune.py --workdir runs/demo_ft --config.init_from=runs/demo
    python scripts/train.py --config configs/finetune.py:probe --workdir runs/demo_lpft

Starts from `init_from`'s params and batch stats (jaxres.state: a head of
another shape, or any head with `init_fresh_head`, is re-initialised). For the
first `optimizer.head_only` steps only the head trains (the body's
updates are zero and its optimizer state untouched); then every layer trains,
the body with its own warmup + cosine over the remaining steps.

Arg "digits" (default): the demo model (runs/demo, configs/demo.py) fine-tuned
with a fresh head on 200 digit images, base LR 4x below the demo's; 90 steps
(6 of 32 images per epoch), 15 head-only; evaluated at step 0 (the starting
weights) and every 5 epochs. About 2.5 min on 2 CPU cores; measured val top-1 0.978 (0.969
after the head-only phase; the features already separate digits, see the
demo's linear probe).
Arg "probe": linear probe, then fine-tune (LP-FT, Kumar et al. ICLR 2022: better than
a fresh head in and out of distribution). Starts from the demo's probe exported as a
run (`scripts/linear_probe.py ... --export runs/demo_probe`, see README "Use your
probe") and keeps its head: no head-only phase; the evaluation at step 0, before the
first update, is the probe's accuracy; 200 train images as in "digits".
Arg "r50": a ResNetV2-50 run (e.g. ImageNet, configs/imagenet_resnetv2.py:50)
fine-tuned on another dataset at 224x224; set the dataset, e.g.
    --config.dataset.name=indoor67 --config.dataset.data_dir=/data/tfds
    --config.dataset.num_classes=67 --config.dataset.val_split=test
(20 epochs, batch 64, base LR 0.01 per 256, 1 head-only epoch ~ 84 steps).
"""

import importlib.util
import os

from jaxres.config_base import base_config


def _demo_config():
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "demo.py")
    spec = importlib.util.spec_from_file_location("jaxres_configs_demo", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def get_config(arg: str = "digits"):
    arg = arg or "digits"
    if arg == "digits":
        c = _demo_config()
        c.init_from = "runs/demo"
        c.dataset.train_limit = 200  # Few labels: where starting from a trained model pays.
        c.num_epochs = 15  # 200 // 32 = 6 steps per epoch -> 90 steps.
        c.optimizer.base_lr = 0.1  # 4x below the demo's 0.4.
        c.optimizer.warmup = "1ep"
        c.optimizer.head_only = "15"
        c.evals.val.every = "5ep"
        c.checkpoint.every = "15"
    elif arg == "r50":
        c = base_config()
        c.model.name = "resnetv2_50"
        c.init_from = "runs/r50"
        c.batch_size = c.eval_batch_size = 64
        c.num_epochs = 20
        c.dataset.name = "imagefolder"
        c.optimizer.base_lr = 0.01
        c.optimizer.warmup = "1ep"
        c.loss.label_smoothing = 0.0
        c.optimizer.weight_decay = 0.0  # Short schedule from good weights (BiT-HyperRule style).
        c.optimizer.head_only = "84"  # About one epoch of 5,360 images.
        c.log_every = "20"
    elif arg == "probe":
        c = get_config("digits")
        c.init_from = "runs/demo_probe"
        c.init_fresh_head = False  # The probe is the head.
        c.optimizer.head_only = "0"
        return c
    else:
        raise ValueError(f"configs/finetune.py:{arg}: use 'digits', 'probe' or 'r50'.")
    c.init_fresh_head = True
    return c
