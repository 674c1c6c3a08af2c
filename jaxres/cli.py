"""Shared pieces of the absl entry points in scripts/: distributed flags, user errors."""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections.abc import Iterator

from absl import flags
from absl import logging as absl_logging

from jaxres import hostmem
from jaxres.config_base import CACHE_DIR, MOVED_KEYS, moved_value
from jaxres.errors import JaxresError

# Executables that compiled faster than this are not worth a disk entry.
CACHE_MIN_COMPILE_SECONDS = 0.25
CACHE_MAX_BYTES = 4 * 2**30  # Least recently used entries go beyond this.

flags.DEFINE_string(
    "compilation_cache",
    os.path.join(CACHE_DIR, "xla"),
    "JAX's persistent compilation cache: a re-run loads its compiled steps instead of compiling "
    "them again. '' turns it off; JAX_COMPILATION_CACHE_DIR, when set, wins.",
)


def define_distributed_flags() -> None:
    """--multihost, or --coordinator_address / --num_processes / --process_id."""
    flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() and let JAX detect the cluster (SLURM, MPI).")
    flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (generic multi-process launch).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (with --coordinator_address).")
    flags.DEFINE_integer("process_id", None, "This process's index (with --coordinator_address).")
    flags.DEFINE_integer(
        "heartbeat_timeout", 100, "Seconds of silence after which a process is declared dead and the rest stop."
    )


def initialize_distributed_from_flags() -> None:
    from jaxres import parallel

    f = flags.FLAGS
    with user_errors():
        parallel.initialize_distributed(
            f.coordinator_address, f.num_processes, f.process_id, f.multihost, f.heartbeat_timeout
        )


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """A user error ends the program with its one-line message, not a traceback."""
    try:
        yield
    except JaxresError as e:
        print(f"jaxres error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing that turns a bad `--config.key=value` into one clear line.

    Pass as `app.run(main, flags_parser=cli.parse_flags)`. `--help` prints the
    script's docstring and every flag it takes (the shared ones of this module too).
    """
    hostmem.restart_with_huge_pages()
    if any(arg in HELP_ARGS for arg in argv[1:]):
        print_help()
        sys.exit(0)
    argv = moved_config_keys(argv)
    try:
        remaining = flags.FLAGS(argv)
        _load_config_files()
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
        print(f"jaxres error: {_flag_error_message(argv, e)}", file=sys.stderr, flush=True)
        sys.exit(2)
    if not flags.FLAGS["verbosity"].present:
        # orbax and grain log every save and worker at INFO; --verbosity=0 brings them back.
        absl_logging.set_verbosity(absl_logging.WARNING)
    if not _multi_process_requested():
        from jaxres import parallel

        parallel.use_one_cpu_device_per_core()
    use_compilation_cache(flags.FLAGS.compilation_cache)
    return remaining


def moved_config_keys(argv: list[str]) -> list[str]:
    """`argv` with each `--config.OLD` key that moved (`config_base.MOVED_KEYS`) spelled at its
    new place (a number of steps or epochs as a period), saying so on stderr: command lines
    written before the move still run."""
    out, args = [], iter(argv)
    for arg in args:
        flag, sep, value = arg.partition("=")
        old = flag[len("--config.") :] if flag.startswith("--config.") else ""
        if old in MOVED_KEYS:
            new = MOVED_KEYS[old]
            if not sep:  # "--config.KEY VALUE": the value is the next argument.
                value = next(args, "")
            value = moved_value(old, value)
            print(f"jaxres: config.{old} is now config.{new}; read as --config.{new}={value}.", file=sys.stderr)
            arg = f"--config.{new}={value}"
        out.append(arg)
    return out


HELP_ARGS = ("--help", "-h", "-?", "--helpshort")


def print_help() -> None:
    """The main script's docstring, then its flags and the shared ones (absl hides those)."""
    main = sys.modules["__main__"]
    print((main.__doc__ or "").strip() + "\n")
    for module in (sys.argv[0], __name__):
        text = flags.FLAGS.module_help(module)
        if text:
            print(text + "\n")
    print("--config.KEY=VALUE overrides a config key; every key is listed in jaxres/config_base.py.")


def _load_config_files() -> None:
    """Loads `--config` files now: a missing file or a bad `:arg` fails here, as one line."""
    for name in ("config",):
        if name in flags.FLAGS and flags.FLAGS[name].present:
            flags.FLAGS[name].value.keys  # noqa: B018 - a file that failed to load raises here.


def use_compilation_cache(path: str) -> None:
    """Turns on JAX's persistent compilation cache in `path` ('' = off; the environment wins)."""
    if not path or "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_SECONDS)
    jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)


def _multi_process_requested() -> bool:
    f = flags.FLAGS
    return ("multihost" in f and f.multihost) or ("coordinator_address" in f and f.coordinator_address is not None)


def _config_arg(argv: list[str]) -> str:
    """The value given to --config (`--config=X` or `--config X`)."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return ""


def _flag_error_message(argv: list[str], error: Exception) -> str:
    text = str(error)
    if "Traceback (most recent call last)" in text or "No such file" in text:
        # A config file that failed to load: its last line says why (the file's own error).
        last = [line.strip() for line in text.splitlines() if line.strip()][-1]
        return f"--config={_config_arg(argv)}: {last}"
    text = text.replace("\\'", "'").replace("\\n", " ").strip("\"'")
    for arg in argv[1:]:
        if not arg.startswith("--config."):
            continue
        key = arg[len("--config.") :].split("=", 1)[0]
        if isinstance(error, (AttributeError, KeyError)) and any(
            re.search(rf"\b{re.escape(p)}\b", text) for p in key.split(".")
        ):
            hint = " " + text[text.index("Did you mean") :] if "Did you mean" in text else ""
            return f"{arg}: config has no key {key!r}.{hint} Every key is listed in jaxres/config_base.py."
        if f"--config.{key}=" in text or f"--config.{key} " in text:
            return f"{arg}: bad value for config.{key} ({text.split(': ', 1)[-1]})."
    return text
