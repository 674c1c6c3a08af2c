"""Test setup: 8 fake CPU devices (set before jax is imported) and parsed absl flags."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402
from absl import flags  # noqa: E402

# grain and other absl users read flags; pytest does not parse them.
flags.FLAGS.mark_as_parsed()

# torchvision / timm load triton, which crashes when TensorFlow was imported first
# (tfds preparation tests import TensorFlow): load them first when installed.
try:
    import torchvision  # noqa: F401, E402
except ImportError:
    pass


@pytest.fixture(scope="session")
def two_process_reference(tmp_path_factory):
    """(workdir, output) of one uninterrupted 2-process smoke run (launch_local, gloo, 16 steps),
    shared by the multi-process tests of test_cli.py and test_faults.py."""
    import sys

    from test_cli import REPO, _env, _run, _train_cmd

    from jaxres.data import embedded

    data_dir = tmp_path_factory.mktemp("reference_data")
    embedded.write_digits(data_dir)
    workdir = str(tmp_path_factory.mktemp("reference") / "run")
    launcher = [sys.executable, os.path.join(REPO, "scripts", "launch_local.py"), "--num_processes", "2", "--"]
    return workdir, _run(launcher + _train_cmd(workdir, str(data_dir)), _env(1)).stdout
