"""Test setup: 8 fake CPU devices (set before jax is imported) and parsed absl flags."""

import os
import shutil
import tempfile

from jaxres import hostmem  # Imports nothing of jax.

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The scripts the tests start inherit glibc's huge-page tunable, so they do not restart for it
# (jaxres/hostmem.py; `make test` exports it for the pytest processes too).
os.environ.update(hostmem.with_tunable(dict(os.environ)) or {})
# One persistent compilation cache for the whole run: both pytest workers and every script the
# tests start (the environment wins over `--compilation_cache`), so a program the tests compile
# again (the smoke model's init and steps, mostly) is compiled once per run. Fresh for each run
# (named after the pytest process; xdist's workers inherit the variable from it), never the
# user's ~/.cache, and removed at the end of the run.
_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"jaxres-tests-xla-{os.getpid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.25")  # As the scripts' own.

import pytest  # noqa: E402
from absl import flags  # noqa: E402

# grain and other absl users read flags; pytest does not parse them.
flags.FLAGS.mark_as_parsed()


def pytest_configure(config):
    """torchvision / timm load triton, which crashes when TensorFlow was imported first (tfds
    preparation tests import TensorFlow): load them first when installed, in every process that
    runs tests (not in xdist's controller, which runs none: 3-6 s off the start of `make test`)."""
    if config.getoption("numprocesses", None) and not hasattr(config, "workerinput"):
        return
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass


# `make test` runs two pytest workers (pytest-xdist, `--dist loadfile`: a file's tests on one
# worker, so its module fixtures are built once). The session reference runs below are used
# by test_faults.py only, so they run once.


@pytest.fixture(scope="session")
def two_process_reference(tmp_path_factory):
    """(workdir, output) of one uninterrupted 2-process smoke run (launch_local, gloo, 16 steps),
    shared by the multi-process tests of test_faults.py."""
    import sys

    from test_cli import FAULTS_CONFIG, REPO, _env, _run, _train_cmd

    from jaxres.data import embedded

    data_dir = tmp_path_factory.mktemp("reference_data")
    embedded.write_digits(data_dir)
    workdir = str(tmp_path_factory.mktemp("reference") / "run")
    launcher = [sys.executable, os.path.join(REPO, "scripts", "launch_local.py"), "--num_processes", "2", "--"]
    return workdir, _run(launcher + _train_cmd(workdir, str(data_dir), config=FAULTS_CONFIG), _env(1)).stdout


@pytest.fixture(scope="session")
def one_process_reference(tmp_path_factory):
    """(workdir, data_dir) of one uninterrupted 1-process, 2-device smoke run: the reference of
    test_faults' SIGTERM and 2-process tests (its compiled steps land in the run's cache, above)."""
    from test_cli import FAULTS_CONFIG, _env, _run, _train_cmd

    from jaxres.data import embedded

    data_dir = tmp_path_factory.mktemp("reference1_data")
    embedded.write_digits(data_dir)
    workdir = str(tmp_path_factory.mktemp("reference1") / "run")
    _run(_train_cmd(workdir, str(data_dir), config=FAULTS_CONFIG), _env(2))
    return workdir, str(data_dir)


# The slowest files first (seconds of one `make test` on 2 AVX2 cores, 30 Nov 2026): with one
# file per worker at a time, a long file started last keeps one worker busy after the other is
# done. The rest keep their order.
SLOW_FILES = ("test_slurm.py",  # A SLURM cluster and eight 2-task jobs: the longest (6-7 min).
              "test_train.py", "test_convert.py", "test_faults.py", "test_export.py",  # 108, 83, 77, 69
              "test_faults_local.py", "test_models.py", "test_transfer_export.py")  # 67, 59, 59


def pytest_collection_modifyitems(items):
    def rank(item):
        name = os.path.basename(str(item.fspath))
        return SLOW_FILES.index(name) if name in SLOW_FILES else len(SLOW_FILES)

    items.sort(key=rank)  # Stable: tests within a file keep their order.


def pytest_sessionfinish(session):
    if _OWN_CACHE and "PYTEST_XDIST_WORKER" not in os.environ:  # The process that named it.
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
