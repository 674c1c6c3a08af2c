"""The small edges a new user hits, each reproduced: where the embedded digits are written, a
batch size that does not divide (named as given), what --split_lists_only wrote, an unfinished
save left by a second Ctrl-C, an unprepared tfds dataset, --help's usage examples, the
benchmark's PyTorch extra. Checkpoint damage: tests/test_checkpoint_damage.py."""

from __future__ import annotations

import ast
import glob
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_cli import REPO, _env
from test_train import smoke_config

from jaxres import checkpoint as ckpt_lib
from jaxres import parallel, runs
from jaxres.data import embedded, sources
from jaxres.errors import DataError


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("data")
    embedded.write_digits(path)
    return str(path)


@pytest.fixture(scope="module")
def small_run(data_dir, tmp_path_factory):
    """A run written directly (config.json + a step-0 checkpoint of freshly initialised weights)."""
    config = smoke_config(data_dir)
    model = runs.build_model(config)
    variables = parallel.run_once(
        lambda rng, x: model.init(rng, x, train=False), jax.random.key(0), jnp.zeros((1, 32, 32, 3))
    )
    out = str(tmp_path_factory.mktemp("small") / "run")
    return runs.write_run(out, config, jax.tree.map(np.asarray, variables))


def _script(name: str, *args: str, devices: int = 1, env=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, os.path.join(REPO, "scripts", name), *args]
    return subprocess.run(cmd, env=env or _env(devices), cwd=REPO, capture_output=True, text=True,
                          timeout=300, check=False)  # fmt: skip


def test_digits_say_where_they_are_written_and_refuse_an_unwritable_data_dir(tmp_path, capsys):
    new = tmp_path / "not_yet" / "data"
    embedded.write_digits(new)
    out = capsys.readouterr().out
    assert (
        f"Writing the embedded digits dataset (1,797 images, first use) to {new / 'digits'}." in out
    )
    embedded.write_digits(new)  # Already there: silent.
    assert capsys.readouterr().out == ""
    (tmp_path / "a_file").write_text("")
    with pytest.raises(
        DataError,
        match=r"Cannot write the embedded digits .* pass a writable --config.dataset.data_dir",
    ):
        embedded.write_digits(tmp_path / "a_file")


def test_evaluate_batch_size_names_the_flag_given(small_run):
    result = _script("evaluate.py", "--workdir", small_run, "--batch_size", "3", devices=2)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("jaxres error")]
    assert (
        errors == [errors[0]]
        and "e.g. --batch_size=4" in errors[0]
        and "eval_batch_size" not in errors[0]
    )


def test_split_lists_only_says_what_it_wrote(data_dir, tmp_path):
    folder = tmp_path / "photos"
    shutil.copytree(os.path.join(data_dir, "digits", "val"), folder)
    result = _script("prepare_data.py", "--dataset", "imagefolder", "--manual_dir", str(folder),
                     "--split_lists_only", "--val_fraction", "0.2")  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    train_count = len((folder / "train.txt").read_text().splitlines())
    assert f"{folder / 'train.txt'} ({train_count} images)" in result.stdout
    assert f"--config.dataset.data_dir={folder}" in result.stdout


def test_an_unfinished_save_is_removed_when_training_starts_again(small_run, capsys):
    """A second Ctrl-C (os._exit) during an asynchronous save leaves STEP.orbax-checkpoint-tmp-*."""
    checkpoints = os.path.join(small_run, "checkpoints")
    unfinished = os.path.join(checkpoints, "4.orbax-checkpoint-tmp-1796304219")
    shutil.copytree(os.path.join(checkpoints, "0"), unfinished)
    reader = runs.open_checkpoints(small_run)  # Evaluation: read-only, leaves it alone.
    assert reader.all_steps() == [0]
    reader.close()
    assert os.path.isdir(unfinished)
    capsys.readouterr()
    writer = ckpt_lib.Checkpointer(checkpoints)  # What train_and_evaluate opens.
    writer.close()
    assert not glob.glob(os.path.join(checkpoints, "*tmp*")) and os.path.isdir(
        os.path.join(checkpoints, "0")
    )
    assert "Removing unfinished checkpoint save(s)" in capsys.readouterr().out


def test_an_unprepared_tfds_dataset_is_one_clean_line(tmp_path):
    with pytest.raises(DataError) as raised:
        sources.TfdsSource("caltech101", "all", str(tmp_path))
    message = str(raised.value)
    assert "\n" not in message and "FileFormat" not in message and "root causes" not in message
    assert "prepare_data.py --dataset caltech101 --manual_dir ARCHIVES --data_dir DIR" in message


def test_help_keeps_the_usage_examples_line_breaks():
    """A backslash continuation in a non-raw docstring joins the two lines in `--help`."""
    for path in sorted(glob.glob(os.path.join(REPO, "scripts", "*.py"))):
        with open(path) as f:
            source = f.read()
        docstring = ast.get_source_segment(source, ast.parse(source).body[0].value)
        if "\\\n" in docstring:
            assert "\\\n" in ast.get_docstring(ast.parse(source), clean=False), path
    result = _script("prepare_data.py", "--help")
    assert "--data_dir ~/tensorflow_datasets \\\n        --resize_shorter 256" in result.stdout


def test_benchmark_ops_without_torch_names_the_extra(tmp_path):
    wrapper = tmp_path / "core_install.py"
    wrapper.write_text(
        "import importlib.util, runpy, sys\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda n, *a: None if n.split('.')[0] in ('torch', 'torchvision') else real(n, *a)\n"
        "sys.modules['torch'] = None\n"
        f"sys.argv = ['benchmark.py'] + sys.argv[1:]\n"
        f"runpy.run_path({os.path.join(REPO, 'scripts', 'benchmark.py')!r}, run_name='__main__')\n"
    )
    result = subprocess.run([sys.executable, str(wrapper), "--what", "ops", "--steps", "1"], env=_env(1),
                            cwd=REPO, capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "pip install -e '.[convert]'" in result.stderr
