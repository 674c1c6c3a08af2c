"""When things happen during training: one spelling of a period for every event.

    "100"  or "100st"   every 100 steps
    "2ep"  or "0.5ep"   every 2 (half an) epoch(s) of steps, rounded to whole steps (at least 1)
    "50000ex"           every 50,000 training examples, rounded up to whole steps
    "0"                 never (an evaluator still runs at the last step)

Used by `log_every`, `checkpoint.every` and every `evals.NAME.every`; the lengths
`optimizer.warmup` and `optimizer.head_only` are spelled the same way. An event is
due at the steps that are multiples of its period, counted from step 0, so a
resumed run meets exactly the steps an uninterrupted one does.
"""

from __future__ import annotations

import math
import re

from jaxres.errors import ConfigError

UNITS = {"": "steps", "st": "steps", "step": "steps", "steps": "steps", "ep": "epochs", "epoch": "epochs",
         "epochs": "epochs", "ex": "examples", "examples": "examples"}  # fmt: skip
_PERIOD = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*$")


def parse(text: str | float, name: str) -> tuple[float, str]:
    """ "2ep" -> (2.0, "epochs"); a bad spelling is a ConfigError naming `config.<name>`."""
    match = _PERIOD.match(str(text).lower())
    if not match or match.group(2) not in UNITS:
        raise ConfigError(
            f"config.{name}={text!r} is not a period; write steps ('500' or '500st'), epochs "
            "('2ep', '0.5ep') or training examples ('50000ex')."
        )
    amount, unit = float(match.group(1)), UNITS[match.group(2)]
    if unit == "steps" and amount != int(amount):
        raise ConfigError(f"config.{name}={text!r}: steps are whole numbers; for a fraction of an epoch write 'ep'.")
    return amount, unit


def to_steps(text: str | float, steps_per_epoch: int, batch_size: int, name: str) -> int:
    """The number of steps `text` spells, given the run's steps per epoch and global batch size."""
    amount, unit = parse(text, name)
    if amount == 0:
        return 0
    if unit == "epochs":
        return max(1, round(amount * steps_per_epoch))
    if unit == "examples":
        return max(1, math.ceil(amount / batch_size))
    return int(amount)


def due(step: int, every: int) -> bool:
    """Whether an event of period `every` steps (0: never) happens at `step`."""
    return every > 0 and step % every == 0


def spelled(value: float, unit: str) -> str:
    """A number in `unit` ("steps" or "epochs") written as a period: 100 -> "100", 2.0 -> "2ep"."""
    number = f"{value:g}"
    return number if unit == "steps" else f"{number}ep"
