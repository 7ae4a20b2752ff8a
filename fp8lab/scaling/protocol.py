"""The Scaling protocol: every question fp8lab asks of a scaling recipe, answered by the recipe.

Invariant: no code outside ``fp8lab/scaling`` dispatches on a scaling's type. The quantized
GEMM, the what-if statistics, the backend choice and the Transformer Engine mapping each
call one method of this protocol; a scaling is a frozen keyword-only dataclass that is
valid once constructed (``__post_init__`` raises ``ValueError`` naming the field) with
Transformer Engine's field names and defaults. A new scaling is one file with a subclass
of ``Scaling`` and one entry in ``fp8lab.scaling.SCALINGS``.

The questions, in the order a training step asks them:

- ``format_for(role)``: the FP8 format of each GEMM operand (E5M2 gradients under "hybrid");
- ``new_state(device)``: the persistent state a layer keeps (delayed scaling's amax history
  and scales), or None;
- ``operand(x2d, role, usage, ...)``: a high-precision tensor made into what one GEMM
  multiplies: the scale decided here, the cast done by the backend it is handed (which
  takes scales and never computes them), amaxes and fault counts recorded in training,
  cast statistics left in the layer's telemetry slot on log steps;
- ``whatif_stats(x2d, role, fmt)`` (a class method): what this recipe, at TE's defaults,
  would do to a tensor another recipe cast (log steps only);
- ``te_accumulation(gemm)`` and ``accumulation_error(acc)``: how TE asks the tensor cores
  to accumulate each of its GEMMs, and why an explicit accumulator cannot apply to it;
- ``unsupported(backend, device)``: why a hardware backend cannot run it there, or None;
- ``te_recipe()``: TE's recipe class name and constructor arguments, without TE;
- ``advice(problem)`` (a class method): what to change when a layer under this recipe
  loses values to "overflow" or "underflow" (``fp8lab report``), in this recipe's fields.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
from torch import nn

from fp8lab.accumulation import Accumulator
from fp8lab.formats import FPROP, GEMM_NAMES, FP8Format, Role, format_for
from fp8lab.quantize.tensor import STAT_NAMES

# Which dimension of a 2-D operand a GEMM contracts: the last ("rowwise") or the first
# ("columnwise", the transposed copies the backward multiplies).
ROWWISE, COLUMNWISE = "rowwise", "columnwise"


class Operand(NamedTuple):
    """What one GEMM multiplies: exact values in the backend's operand dtype, the float32
    inverse scale its epilogue applies (0-dim per tensor, or (R, 1) per row / (1, C) per column
    of the values for rowwise scaling; None when the values are already exact dequantized
    values, as for power-of-2 block scales, or high-precision values), the FP8 format of the values (None
    for a BF16 GEMM), and, for block values left unscaled (for a promoting accumulator, or a
    GEMM that takes block scales), their inverse scales per group of 128 along the contracted
    dimension: (R, G) for a rowwise operand (R, C), (G, C) for a columnwise one, with the
    block shape in the values' orientation ((1, 128) tiles, (128, 128) blocks, ...)."""

    values: torch.Tensor
    inv_scale: torch.Tensor | None
    fmt: FP8Format | None = None
    group_scale: torch.Tensor | None = None
    block: tuple[int, int] | None = None


def not_measured(device: torch.device) -> torch.Tensor:
    """A what-if row of a recipe that cannot be evaluated here: NaN for every statistic."""
    return torch.full((len(STAT_NAMES),), float("nan"), device=device)


def te_format(fp8_format: str) -> str:
    """The name of the ``transformer_engine.common.recipe.Format`` member of ``fp8_format``."""
    return {"hybrid": "HYBRID", "e4m3": "E4M3"}[fp8_format]


# Numerics fields of every TE recipe that fp8lab pins to the values it models (TE would
# otherwise take ``backward_override`` from $NVTE_BACKWARD_OVERRIDE): no FP8 attention, the
# backward in the recipe's own precision.
TE_PINNED = {"fp8_dpa": False, "fp8_mha": False, "backward_override": None}


# What helps a layer whatever its recipe: take it out of FP8.
KEEP_BF16 = "keep the layer in BF16 (variants.<name>.keep_bf16)"


class Scaling:
    """Base of every scaling recipe (see the module docstring for the protocol).

    Class attributes:
        name: the short name runs, tags, reports and ``--set variants.<v>.scaling=`` use.
        per_tensor: one scale covers the whole tensor, so one operand serves every usage
            (forward and backward); block recipes cast a copy per usage instead.
        bias_after_gemm: the bias is added to the GEMM's rounded output in its dtype
            (torchao's ``output + bias``), not in the fp32 epilogue (TE's, cuBLASLt's).
    """

    name: ClassVar[str]
    per_tensor: ClassVar[bool]
    bias_after_gemm: ClassVar[bool] = False
    fp8_format: str

    def format_for(self, role: Role) -> FP8Format:
        """The FP8 format of a GEMM operand in ``role``."""
        return format_for(self.fp8_format, role)

    def new_state(self, device: torch.device | str | None = None) -> nn.Module | None:
        """The persistent state a layer stores as ``fp8_state`` (a ``ScalingState`` for
        delayed scaling; None: nothing persists from one step to the next)."""
        return None

    def operand(
        self, x2d: torch.Tensor, role: Role, usage: str, *, state, backend, record: bool, slot, raw: bool = False
    ) -> Operand:
        """``x2d`` (2-D, high precision) made into the operand of a GEMM contracting it as
        ``usage`` says (``ROWWISE`` or ``COLUMNWISE``).

        Args:
            state: the layer's ``fp8_state`` (what ``new_state`` made), or None.
            backend: casts with given scales (``quantize``, ``quantize_blocks``).
            record: training: take amaxes into the state and count casts that met NaN/inf.
            slot: the layer's TelemetrySlot or None; while armed, the rowwise cast of each
                role leaves its statistics there.
            raw: block recipes: the FP8 values unscaled, with their per-group inverse scales
                (``Operand.group_scale``), for an accumulator that applies them at each
                promotion; per-tensor recipes ignore it (their scale is the epilogue's).
        """
        raise NotImplementedError

    def fp8_all_gather_unsupported(self) -> str | None:
        """Why a weight under this recipe cannot be cast to FP8 shard by shard before FSDP's
        all-gather (``fp8lab.gemm.fp8_all_gather``), or None when it can: per-tensor recipes
        can (one scale for the whole weight, from the MAX of the shards' amaxes)."""
        if self.per_tensor:
            return None
        return (
            f"scaling {self.name!r} scales groups of the weight (blocks, rows or columns) and casts a "
            "copy per GEMM orientation; the columnwise copy's groups run along the sharded rows, "
            "across shard boundaries, so a shard cannot cast its part alone: gathered in fp32"
        )

    def gathered_weight_scale(self, amaxes: torch.Tensor, state) -> torch.Tensor:
        """The weight's scale for an FP8 all-gather, from the whole weight's ``amaxes`` ([raw,
        TE's], ``amaxes_of`` of the whole weight, i.e. the MAX over the shards): what
        ``operand`` would use for the whole weight (per-tensor recipes only)."""
        raise NotImplementedError

    def gathered_weight_operand(
        self, values: torch.Tensor, scale: torch.Tensor, amaxes: torch.Tensor, w_hp, *, state, record: bool, slot
    ) -> Operand:
        """The weight operand from values already cast with ``scale`` (on every shard) and
        gathered: the recording and the statistics ``operand`` does for the whole weight, from
        the whole weight's ``amaxes``; ``w_hp`` is the whole high-precision weight on log
        steps (for the cast statistics), else None."""
        raise NotImplementedError

    @classmethod
    def whatif_stats(cls, x2d: torch.Tensor, role: Role, fmt: FP8Format) -> torch.Tensor:
        """``STAT_NAMES`` of this recipe at TE's defaults, in ``fmt``, cast onto ``x2d`` in
        the layout of the GEMM contracting its last dimension (float32, on x2d's device)."""
        raise NotImplementedError

    def te_accumulation(self, gemm: int) -> str:
        """The accumulator kind ("fast", "promoted", "fp32") Transformer Engine gives GEMM
        ``gemm`` (``fp8lab.formats.FPROP``/``DGRAD``/``WGRAD``): by default its module's
        ``_2X_ACC_FPROP = False`` (fast) and ``_2X_ACC_DGRAD/_WGRAD = True`` (split, i.e.
        promoted), as for DelayedScaling (no ``fp8_gemm_*`` fields) and Float8CurrentScaling
        (whose ``fp8_gemm_*`` fields say the same)."""
        return "fast" if gemm == FPROP else "promoted"

    def te_split_accumulator(self) -> dict[str, bool]:
        """``use_split_accumulator`` of each ``fp8_gemm_<gemm>`` MMParams field of TE's recipe
        (promoted accumulation, ``te_accumulation``), for recipes whose TE class has them."""
        return {f"fp8_gemm_{name}": self.te_accumulation(g) == "promoted" for g, name in enumerate(GEMM_NAMES)}

    def accumulation_error(self, acc: Accumulator) -> str | None:
        """Why ``acc`` cannot accumulate this scaling's GEMMs, or None (per-tensor scales sit
        in the epilogue, so any accumulator applies)."""
        return None

    def unsupported(self, backend: str, device) -> str | None:
        """Why ``backend`` ("te" or "scaled_mm") cannot run this scaling on ``device`` (a
        ``fp8lab.gemm.backends.select.DeviceFacts``), or None when it can; the device is
        already known to have FP8 tensor cores."""
        return None

    @classmethod
    def advice(cls, problem: str) -> str:
        """What to change when a layer cast by this recipe loses values to ``problem``
        ("overflow": clamped at fp8_max; "underflow": flushed to zero), naming only settings
        this recipe has."""
        return KEEP_BF16

    def te_recipe(self) -> dict:
        """Transformer Engine's recipe equal to this scaling, without importing TE:
        {"recipe": class name in ``transformer_engine.common.recipe``, "kwargs": its
        constructor arguments, every numerics field set (``fp8_format`` as the name of a
        ``Format`` member; ``TE_PINNED``), "mmparams": the ``use_split_accumulator`` of each
        ``fp8_gemm_*`` field or None, "qparams": ``QParams`` arguments to set on the object
        (TE takes power-of-2 and epsilon from class-level QParams computed from the
        environment at import), or None}. ``fp8lab.gemm.backends.te_mapping.make_te_recipe``
        builds it."""
        raise NotImplementedError
