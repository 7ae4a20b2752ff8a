"""The layers' named options (a normalization, an activation, an attention core...), checked once.

Invariant: a value outside its option's allowed set raises ``ValueError`` naming the option
and listing the allowed values, in the same words for every layer.
"""

from __future__ import annotations


def one_of(name: str, value, allowed: tuple):
    """``value`` itself when it is one of ``allowed``; otherwise ValueError naming ``name``."""
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value
