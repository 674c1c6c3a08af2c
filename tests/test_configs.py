"""Configs load, keep every base key, and the optimizer follows them."""

import glob
import importlib.util
import os

import jax.numpy as jnp
import numpy as np
import pytest

from jaxres import config_base, optim

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))


def _load(path):
    spec = importlib.util.spec_from_file_location("cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _flat_keys(config):
    return set(_walk(config.to_dict()))


def _walk(d, prefix=""):
    for k, v in d.items():
        if isinstance(v, dict) and k != "overrides":
            yield from _walk(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


@pytest.mark.parametrize("path", [p for p in TRAIN_CONFIGS if not p.endswith("__init__.py")])
def test_config_has_every_base_key(path):
    module = _load(path)
    assert module.__doc__ and "scripts/train.py" in module.__doc__  # Docstring = the command.
    config = module.get_config()
    # Every base key; evaluators beyond the default `val` are the config's own (each built by
    # config_base's *_eval functions, so their keys are checked there).
    base = _flat_keys(config_base.base_config())
    assert {k for k in _flat_keys(config) if k in base or not k.startswith("evals.")} == base


def test_rsb_recipes():
    module = _load(os.path.join(REPO, "configs", "imagenet_rsb.py"))
    a1, a3 = module.get_config("a1"), module.get_config("a3,seresnet50")
    assert (a1.num_epochs, a1.augment.repeated_aug, a1.model.drop_path_rate, a1.optimizer.name) == (600, 3, 0.05, "lamb")
    assert a1.optimizer.base_lr * a1.batch_size / 256 == pytest.approx(5e-3)  # The paper's LR at batch 2048.
    assert (a3.model.name, a3.dataset.image_size, a3.dataset.eval_image_size) == ("seresnet50", 160, 224)
    assert a3.augment.randaugment == "rand-m6-mstd0.5-inc1" and a3.augment.repeated_aug == 1
    with pytest.raises(ValueError, match="one of a1, a2, a3"):
        module.get_config("b1")


def test_imagenet_depth_argument():
    module = _load(os.path.join(REPO, "configs", "imagenet_resnetv2.py"))
    assert module.get_config("101").model.name == "resnetv2_101"
    with pytest.raises(ValueError, match="depth must be one of"):
        module.get_config("77")


def test_schedules_and_decay_mask():
    opt = config_base.base_config().optimizer
    schedule = optim.make_schedule(opt, global_batch_size=512, steps_per_epoch=10, total_steps=100)
    peak = 0.1 * 512 / 256
    assert float(schedule(0)) == 0.0
    assert float(schedule(50)) == pytest.approx(peak)  # End of the 5 warmup epochs.
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-6)
    opt.schedule, opt.warmup, opt.decay_epochs = "step", "0", (3, 6)
    step = optim.make_schedule(opt, 256, 10, 100)
    assert [float(step(s)) for s in (0, 29, 30, 60)] == pytest.approx([0.1, 0.1, 0.01, 0.001])
    params = {"conv": {"kernel": jnp.ones((3, 3, 4, 4))}, "norm": {"scale": jnp.ones(4), "bias": jnp.zeros(4)}}
    assert optim.decay_mask(params) == {"conv": {"kernel": True}, "norm": {"scale": False, "bias": False}}
    # Weight decay moves kernels only.
    tx = optim.make_optimizer(opt, lambda _: 0.0 + 1.0)
    zero = {k: {n: jnp.zeros_like(v) for n, v in d.items()} for k, d in params.items()}
    updates, _ = tx.update(zero, tx.init(params), params)
    assert np.all(np.asarray(updates["conv"]["kernel"]) != 0)
    assert np.all(np.asarray(updates["norm"]["scale"]) == 0)


@pytest.mark.parametrize("name", optim.OPTIMIZERS)
def test_every_optimizer_updates(name):
    opt = config_base.base_config().optimizer
    opt.name = name
    params = {"conv": {"kernel": jnp.ones((3, 3, 4, 4))}, "norm": {"scale": jnp.ones(4)}}
    tx = optim.make_optimizer(opt, optim.make_schedule(opt, 256, 10, 100))
    grads = {"conv": {"kernel": jnp.full((3, 3, 4, 4), 0.5)}, "norm": {"scale": jnp.full(4, 0.5)}}
    state = tx.init(params)
    for _ in range(3):
        updates, state = tx.update(grads, state, params)
    assert np.isfinite(np.asarray(updates["conv"]["kernel"])).all()
    assert np.abs(np.asarray(updates["conv"]["kernel"])).max() > 0
