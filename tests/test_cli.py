"""scripts/train.py as a user runs it: SIGTERM + resume, 2 processes vs 1, one-line errors."""

import json
import os
import subprocess
import sys

import pytest

from jaxres.data import embedded
from jaxres.models import onednn

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    embedded.write_digits(path)
    return str(path)


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    # oneDNN's weight-gradient sums depend on its thread count (cores / devices by default):
    # pinned, so that runs on different device / process layouts differ only in the all-reduce.
    env["JAXRES_ONEDNN_THREADS"] = "1"
    return env


# The runs of test_faults.py carry a few-shot evaluator: resumed and 2-process runs must evaluate
# it at the same steps and to the same values as the uninterrupted 1-process run.
FAULTS_CONFIG = "smoke,fewshot"


def _train_cmd(workdir: str, data_dir: str, *extra: str, config: str = "smoke") -> list[str]:
    return [
        sys.executable,
        os.path.join(REPO, "scripts", "train.py"),
        "--config",
        os.path.join(REPO, "configs", "demo.py") + f":{config}",
        "--workdir",
        workdir,
        f"--config.dataset.data_dir={data_dir}",
        *extra,
    ]


def _rows(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _final(workdir: str) -> tuple[dict, dict]:
    rows = _rows(workdir)
    train_rows = [r for r in rows if "loss" in r]
    eval_rows = [r for r in rows if "val_top1" in r]
    return train_rows[-1], eval_rows[-1]


def _run(cmd, env, timeout=300):
    result = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.parametrize(
    "flag, message",
    [
        ("--config.foo=3", "config has no key 'foo'"),
        ("--config.model.nam=x", "Did you mean \"name\""),
        ("--config.batch_size=abc", "bad value for config.batch_size"),
        ("--config.model.name=resnet5", "Unknown model 'resnet5'"),
    ],
)
def test_user_errors_are_one_line(data_dir, tmp_path, flag, message):
    result = subprocess.run(_train_cmd(str(tmp_path / "w"), data_dir, flag), env=_env(1), cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("jaxres error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]


_DEVICES_AFTER_FLAGS = (
    "from jaxres import cli; cli.parse_flags(['prog']); import jax; print(jax.device_count())"
)


@pytest.mark.parametrize(
    "env, expected",
    [
        # One device where oneDNN's kernels (all cores per conv) are installed.
        ({}, 1 if onednn.installed() else min(len(os.sched_getaffinity(0)), 8)),
        ({"JAX_NUM_CPU_DEVICES": "3"}, 3),
        ({"XLA_FLAGS": "--xla_force_host_platform_device_count=5"}, 5),
    ],
)
def test_scripts_use_one_cpu_device_per_core_unless_told(env, expected):
    clean = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    result = _run([sys.executable, "-c", _DEVICES_AFTER_FLAGS], dict(clean, JAX_PLATFORMS="cpu", **env))
    assert int(result.stdout.split()[-1]) == expected


def test_cpu_split_is_skipped_once_a_backend_runs():
    code = (
        "import jax; jax.devices(); from jaxres import parallel;"
        "print(parallel.use_one_cpu_device_per_core(), jax.device_count())"
    )
    clean = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_NUM_CPU_DEVICES")}
    result = _run([sys.executable, "-c", code], dict(clean, JAX_PLATFORMS="cpu"))
    assert result.stdout.split()[-2:] == ["None", "1"]


def test_help_lists_the_shared_flags_and_exits_0():
    result = subprocess.run([sys.executable, os.path.join(REPO, "scripts", "evaluate.py"), "--help"],
                            cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    for flag in ("--workdir", "--checkpoint", "--compilation_cache", "--coordinator_address"):
        assert flag in result.stdout


@pytest.mark.parametrize(
    "config, message",
    [
        ("configs/nope.py", "--config=configs/nope.py: [Errno 2] No such file or directory"),
        ("configs/finetune.py:bogus", "use 'digits', 'probe' or 'r50'"),
    ],
)
def test_bad_config_file_or_arg_is_one_line(tmp_path, config, message):
    cmd = [sys.executable, os.path.join(REPO, "scripts", "train.py"), f"--config={config}", f"--workdir={tmp_path}"]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("jaxres error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]


def _without_test_cache(**env: str) -> dict:
    """os.environ plus `env`, without the tests' shared compilation cache (conftest.py)."""
    return {k: v for k, v in {**os.environ, **env}.items() if k != "JAX_COMPILATION_CACHE_DIR"}


def test_compilation_cache_is_written_then_read(tmp_path):
    """The persistent cache works in the core install (filelock): a second process hits it."""
    script = (
        "import sys, jax, jax.numpy as jnp\n"
        "from jaxres import cli\n"
        "hits = []\n"
        "jax.monitoring.register_event_listener(lambda e, **k: hits.append(e) if 'cache_hits' in e else None)\n"
        "cli.use_compilation_cache(sys.argv[1])\n"
        "jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)\n"
        "x = jnp.ones((64, 64))\n"
        "jax.jit(lambda a: jnp.tanh(a @ a) @ a)(x).block_until_ready()\n"
        "print('hits', len(hits))\n"
    )
    runs = [subprocess.run([sys.executable, "-c", script, str(tmp_path / "xla")], cwd=REPO, capture_output=True,
                           text=True, timeout=120, check=False, env=_without_test_cache(XLA_FLAGS=""))
            for _ in range(2)]  # fmt: skip
    for r in runs:
        assert r.returncode == 0 and "filelock" not in r.stderr, r.stderr[-2000:]
    assert os.listdir(tmp_path / "xla")
    assert "hits 0" in runs[0].stdout and "hits 0" not in runs[1].stdout, [r.stdout for r in runs]
