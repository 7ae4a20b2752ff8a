"""How the tensor cores accumulate an FP8 GEMM: the parameters of the accumulator model.

Invariant: these are settings (frozen, validated at construction, ``ValueError`` naming the
field), not arithmetic: the model itself is ``fp8lab.gemm.accumulate`` (bit-exact, on every
device). The kinds, per GEMM (MMA-Sim, arXiv 2511.10909; Khattak & Mikaitis, arXiv
2512.07004; DeepSeek-V3 3.3.2):

- "fast": Hopper's FP8 ``wgmma`` chained over K: per instruction of ``chunk`` = 32 products,
  terms aligned to the largest exponent and truncated toward zero to ``fraction_bits`` = 13
  fraction bits, the sum stored with 13 fraction bits (cuBLASLt's FAST_ACCUM);
- "promoted": the same instructions, their chained partial added into an fp32 accumulator
  every ``promote_every`` instructions (cuBLASLt's split accumulator; CUTLASS's default 4);
- "fp32": an ideal fp32 accumulation (what fp8lab modelled before; no hardware computes it).

``FP8Options(accumulation="te")``, the default, picks per GEMM what Transformer Engine asks
cuBLASLt for (``Scaling.te_accumulation``): "fast" for the forward GEMM of delayed and
current scaling, "promoted" for their dgrad and wgrad and for every block-scaled GEMM.
What NVIDIA does not publish is a named parameter here: the promotion interval, the K order
and split-K; cuBLASLt's epilogue order is the caller's (``fp8lab.gemm.exact``).
"""

from __future__ import annotations

from dataclasses import dataclass

from fp8lab.formats import GEMM_NAMES

KINDS = ("fp32", "promoted", "fast")
K_ORDERS = ("ascending", "descending")
SETTINGS = ("te",) + KINDS  # what FP8Options.accumulation accepts by name


def _positive_int(name: str, value, upper: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= upper:
        raise ValueError(f"Accumulator.{name} must be an int in [1, {upper}], got {value!r}")


@dataclass(frozen=True, kw_only=True)
class Accumulator:
    """How the tensor cores accumulate one GEMM (see the module docstring).

    Args:
        kind: "fast", "promoted" or "fp32".
        promote_every: instructions per promotion ("promoted"; also the K group of block scales
            and of ``split_k``). Not public for cuBLASLt: 4 is CUTLASS's default (128 of K).
        chunk: products per instruction: 32 for Hopper's FP8 ``wgmma`` (measured by MMA-Sim);
            16 models Ada's ``mma.sync`` (its k = 32 runs as two chained halves).
        fraction_bits: fraction bits kept per instruction: 13 for Hopper and Ada FP8
            (measured), 25 for Blackwell FP8.
        k_order: the order the K loop visits instructions, "ascending" or "descending". Not public.
        split_k: K cut into this many slices of whole groups, each accumulated alone and the
            slices added in fp32 in order. Not public; 1 = none.
    """

    kind: str
    promote_every: int = 4
    chunk: int = 32
    fraction_bits: int = 13
    k_order: str = "ascending"
    split_k: int = 1

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Accumulator.kind must be one of {KINDS}, got {self.kind!r}")
        if self.k_order not in K_ORDERS:
            raise ValueError(f"Accumulator.k_order must be one of {K_ORDERS}, got {self.k_order!r}")
        _positive_int("promote_every", self.promote_every, 1 << 20)
        _positive_int("chunk", self.chunk, 1024)  # chunk sums stay exact in float64
        _positive_int("fraction_bits", self.fraction_bits, 40)
        _positive_int("split_k", self.split_k, 1 << 20)

    @property
    def group_k(self) -> int:
        """K per promotion group (and per group scale): ``chunk * promote_every``."""
        return self.chunk * self.promote_every

    def describe(self) -> str:
        """One short phrase for ``describe`` and ``info``, e.g. "promoted every 4 x 32"."""
        if self.kind == "fp32":
            return "fp32"
        bits = f"{self.fraction_bits}-bit, {self.chunk} per instruction"
        if self.kind == "fast":
            return f"fast ({bits})"
        return f"promoted every {self.promote_every} instructions ({bits})"


FP32 = Accumulator(kind="fp32")
HOPPER_FAST = Accumulator(kind="fast")
HOPPER_PROMOTED = Accumulator(kind="promoted")
HOPPER = {"fp32": FP32, "promoted": HOPPER_PROMOTED, "fast": HOPPER_FAST}  # by kind, Hopper's parameters


def describe_gemms(accumulators) -> str:
    """One phrase for a layer's three GEMMs, e.g. "fprop fast (13-bit, 32 per instruction),
    dgrad and wgrad promoted every 4 instructions (13-bit, 32 per instruction)"."""
    groups: dict[Accumulator, list[str]] = {}
    for name, acc in zip(GEMM_NAMES, accumulators):
        groups.setdefault(acc, []).append(name)
    return ", ".join(f"{' and '.join(names)} {acc.describe()}" for acc, names in groups.items())
