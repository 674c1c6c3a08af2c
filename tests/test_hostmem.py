"""Huge pages for XLA:CPU's buffers: the scripts restart themselves with glibc's tunable."""

import os
import subprocess
import sys

import pytest

from jaxres import hostmem

_PRINT_TUNABLES = "from jaxres import cli; cli.parse_flags(['prog']); import os; print(os.environ.get('GLIBC_TUNABLES'))"


def _script_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env.update(extra)
    return env


def _tunables_seen_by_script(env: dict[str, str]) -> str:
    out = subprocess.run(
        [sys.executable, "-c", _PRINT_TUNABLES],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return out.stdout.strip().splitlines()[-1]


def test_thp_mode_reads_the_bracketed_mode(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    assert hostmem.thp_mode(str(path)) == "madvise"
    assert hostmem.thp_mode(str(tmp_path / "missing")) is None


@pytest.mark.skipif(
    hostmem.thp_mode() != "madvise", reason="transparent huge pages are not in madvise mode here"
)
def test_script_restarts_with_the_tunable_kept_and_added():
    assert _tunables_seen_by_script(_script_env()) == hostmem.TUNABLE
    other = "glibc.malloc.arena_max=2"
    assert (
        _tunables_seen_by_script(_script_env(GLIBC_TUNABLES=other)) == f"{other}:{hostmem.TUNABLE}"
    )


def test_switch_off_and_already_set_mean_no_restart():
    assert _tunables_seen_by_script(_script_env(**{hostmem.ENV_SWITCH: "0"})) == "None"
    assert hostmem.with_tunable({"GLIBC_TUNABLES": hostmem.TUNABLE}) is None
    assert hostmem.with_tunable({hostmem.ENV_SWITCH: "0"}) is None


def test_never_restarts_a_test_runner():
    # Returns without exec: were it to restart, this worker would be replaced and the test lost.
    hostmem.restart_with_huge_pages()
