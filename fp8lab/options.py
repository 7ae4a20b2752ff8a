"""FP8Options: a layer's FP8 settings (scaling, backend, fallback) as one frozen object.

Invariant: an FP8Options is immutable and valid once constructed; this is the only place
that checks backend and fallback names, and a bad field raises ``ValueError`` whose
message starts with the field's name and lists the allowed values. Every fp8lab layer,
``GPT`` and ``convert`` take one ``fp8=`` keyword of this type (None: ``FP8Options()``; a
bare scaling recipe: ``FP8Options(scaling=it)``; anything else: TypeError, ``as_options``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

from fp8lab.accumulation import HOPPER, SETTINGS, Accumulator
from fp8lab.formats import GEMM_NAMES
from fp8lab.scaling import SCALINGS, DelayedScaling, Scaling

BACKENDS = ("auto", "te", "scaled_mm", "emulated", "bf16")
FALLBACKS = ("bf16", "emulated")
# Old spellings still accepted from external code, with a DeprecationWarning: old -> new.
LEGACY_FALLBACKS = {"emulate": "emulated"}


@dataclass(frozen=True, kw_only=True)
class FP8Options:
    """How a layer runs its GEMMs in FP8.

    Args:
        scaling: how scales are computed, one of ``fp8lab.scaling.SCALINGS``:
            ``DelayedScaling`` (default, TE's defaults), ``Float8CurrentScaling``,
            ``Float8BlockScaling``, ``MXFP8BlockScaling`` or ``Float8RowwiseScaling`` (torchao's).
        backend: "auto", "te", "scaled_mm", "emulated" or "bf16" (see docs/backends.md).
        fallback: what "auto" does without FP8 hardware: "bf16" or "emulated" (the old
            spelling "emulate" is accepted with a DeprecationWarning).
        accumulation: how the tensor cores accumulate each FP8 GEMM (``fp8lab.accumulation``):
            "te" (default: per GEMM what Transformer Engine (torchao, for rowwise) asks of a Hopper for this scaling,
            ``Scaling.te_accumulation``), "fast", "promoted" or "fp32" for all three GEMMs with
            Hopper's parameters, or an ``Accumulator`` for other parameters.
    """

    scaling: Scaling = field(default_factory=DelayedScaling)
    backend: str = "auto"
    fallback: str = "bf16"
    accumulation: str | Accumulator = "te"

    def __post_init__(self) -> None:
        if not isinstance(self.scaling, tuple(SCALINGS.values())):
            names = tuple(t.__name__ for t in SCALINGS.values())
            raise ValueError(f"scaling must be one of the scaling types {names}, got {self.scaling!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if not isinstance(self.backend, str) or not isinstance(self.fallback, str):
            name, value = (
                ("backend", self.backend) if not isinstance(self.backend, str) else ("fallback", self.fallback)
            )
            allowed = BACKENDS if name == "backend" else FALLBACKS
            raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.fallback in LEGACY_FALLBACKS:
            new = LEGACY_FALLBACKS[self.fallback]
            warnings.warn(
                f"fallback={self.fallback!r} is deprecated; use fallback={new!r}",
                DeprecationWarning,
                stacklevel=3,  # the caller of FP8Options(...)
            )
            object.__setattr__(self, "fallback", new)
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {FALLBACKS}, got {self.fallback!r}")
        if not isinstance(self.accumulation, Accumulator) and (
            not isinstance(self.accumulation, str) or self.accumulation not in SETTINGS
        ):
            raise ValueError(
                f"accumulation must be one of {SETTINGS} or an fp8lab.accumulation.Accumulator, "
                f"got {self.accumulation!r}"
            )
        for gemm, name in enumerate(GEMM_NAMES):
            why = self.scaling.accumulation_error(self.accumulator(gemm))
            if why is not None:
                raise ValueError(f"accumulation={self.accumulation!r} with {self.scaling.name} scaling ({name}): {why}")

    def accumulator(self, gemm: int) -> Accumulator:
        """The accumulator model of GEMM ``gemm`` (``fp8lab.formats.FPROP``, ``DGRAD``, ``WGRAD``)."""
        if isinstance(self.accumulation, Accumulator):
            return self.accumulation
        kind = self.scaling.te_accumulation(gemm) if self.accumulation == "te" else self.accumulation
        return HOPPER[kind]


def as_options(fp8, name: str = "fp8") -> FP8Options:
    """What the layers' ``fp8=`` argument means, or TypeError naming ``name``.

    None is ``FP8Options()``; an ``FP8Options`` is itself; a scaling recipe alone
    (``DelayedScaling(...)``, ``Float8CurrentScaling()``, ...) is ``FP8Options(scaling=it)``
    with the default backend and fallback. Anything else (a backend name such as
    "emulated", a bool) is refused: a string could mean the backend or the fallback.
    """
    if fp8 is None:
        return FP8Options()
    if isinstance(fp8, FP8Options):
        return fp8
    if isinstance(fp8, tuple(SCALINGS.values())):
        return FP8Options(scaling=fp8)
    names = ", ".join(t.__name__ for t in SCALINGS.values())
    hint = ""
    if isinstance(fp8, str):
        hint = (
            f"; for a backend or fallback name write {name}=fp8lab.FP8Options(backend={fp8!r}) or "
            f"{name}=fp8lab.FP8Options(fallback={fp8!r})"
        )
    raise TypeError(
        f"{name} must be an fp8lab.FP8Options, a scaling recipe ({names}) or None, "
        f"got {fp8!r} ({type(fp8).__name__}){hint}"
    )
