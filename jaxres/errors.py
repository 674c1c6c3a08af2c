"""User-facing errors: every one names the thing that is wrong and the fix."""

from __future__ import annotations

import difflib
from typing import Iterable


class JaxresError(ValueError):
    """An error the user caused (config, data, checkpoint); the message names the fix."""


class ConfigError(JaxresError):
    """A bad config key or value."""


class DataError(JaxresError):
    """A missing or malformed dataset."""


class CheckpointError(JaxresError):
    """A missing checkpoint, or one that does not match the model."""


class NonFiniteLossError(JaxresError):
    """Training produced NaN or inf."""


def unknown_name(kind: str, name: str, valid: Iterable[str]) -> str:
    """A message for an unknown name that lists close matches and all valid names."""
    valid = sorted(valid)
    close = difflib.get_close_matches(name, valid, n=3)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"Unknown {kind} {name!r}.{hint} Valid: {', '.join(valid)}."
