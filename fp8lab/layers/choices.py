"""The layers' arguments, checked once: sizes, flags, epsilons, named options, device, dtype.

Invariant: a layer's constructor checks every argument before it allocates anything, in
the same words for every layer: a value of the wrong type raises ``TypeError``, a value of
the right type outside its range or allowed set raises ``ValueError``; both messages start
with the argument's name and say what is allowed.
"""

from __future__ import annotations

import math
import numbers

import torch

# Parameter dtypes a layer can be created in (``dtype=``) and inputs a forward takes.
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _got(value) -> str:
    return f"{value!r} ({type(value).__name__})"


def one_of(name: str, value, allowed: tuple):
    """``value`` itself when it is one of ``allowed``; otherwise ValueError naming ``name``."""
    if not isinstance(value, (str, type(None))) or value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def size(name: str, value, minimum: int = 1) -> int:
    """An int (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int >= {minimum}, got {_got(value)}")
    if value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def flag(name: str, value) -> bool:
    """A bool (``bias="no"`` is truthy and would silently mean True)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool (True or False), got {_got(value)}")
    return value


def positive_float(name: str, value) -> float:
    """A finite real number > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a finite number > 0, got {_got(value)}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def device(value) -> torch.device | None:
    """None, or what ``torch.device`` takes (a device, "cpu", "cuda:0", an index)."""
    if value is None or isinstance(value, torch.device):
        return value
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise TypeError(f"device must be a torch.device, a device string or an index, got {_got(value)}")
    try:
        return torch.device(value)
    except (RuntimeError, ValueError) as err:
        raise ValueError(f"device must name a torch device (e.g. 'cpu', 'cuda:0'), got {value!r}: {err}") from None


def dtype(value) -> torch.dtype | None:
    """None, or a floating dtype parameters can be created in."""
    if value is None:
        return None
    if not isinstance(value, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype or None, got {_got(value)}")
    if value not in FLOAT_DTYPES:
        raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {value}")
    return value
