"""Few-shot linear probes: 1, 5, 10 and 25 train images per class, 3 seeds, on any prepared dataset.

    python scripts/linear_probe.py --config configs/transfer/fewshot.py:digits --workdir runs/demo_fewshot \
        --config.model.checkpoint=runs/demo
    python scripts/linear_probe.py --config configs/transfer/fewshot.py:caltech101 --workdir runs/fewshot_c101 \
        --config.model.checkpoint=runs/r50 --config.dataset.data_dir=/data/tfds

Arg: the dataset, "digits" (embedded; default), a prepared dataset name
(caltech101, caltech256, indoor67, or any tfds name with train / test splits)
or "imagefolder" with --config.dataset.data_dir=ROOT (ROOT/train, ROOT/test).
Each seed draws k train images per class from the train split; the whole test
split is the test set (as big_vision's few-shot evaluators). With one image per
class nothing can be held out to choose the penalty, so 1-shot uses the middle
of the sweep. Expected on the digits demo run (runs/demo, val top-1 ~0.99):
logistic top-1 around 0.9 at 1 shot and 0.98+ at 25 shots; about 30 s on 2 cores.
"""

from jaxres.config_transfer import fewshot_config


def get_config(arg: str = "digits"):
    return fewshot_config(arg or "digits")
