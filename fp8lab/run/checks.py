"""How a config error reads: ``ConfigError`` and the checks every config section uses.

Invariant: every invalid config field raises ``ConfigError`` whose message starts with the
field's dotted name (``train.steps``) and says what is allowed, so the CLI can print it
as is (exit 2).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config field is invalid; the message names the field and what is allowed."""


def check(ok: bool, name: str, allowed: str, value) -> None:
    if not ok:
        raise ConfigError(f"{name} must be {allowed}, got {value!r}")


def check_int(value, name: str, low: int = 1) -> None:
    check(isinstance(value, int) and not isinstance(value, bool) and value >= low, name, f"an int >= {low}", value)
