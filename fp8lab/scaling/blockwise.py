"""What the block recipes share: one scale per block of a 2-D operand, dequantized exactly.

Invariant: a blockwise recipe (``Float8BlockScaling``, ``MXFP8BlockScaling``) says only
which block each operand gets (``block``) and how a block's amax becomes its scale
(``block_scales``); everything else is here. A 1-D block runs along the GEMM's contraction
dimension, so the forward and backward GEMMs see one tensor through different tiles, each
cast from the high-precision tensor (TE quantizes "rowwise" and "columnwise" copies); the
operands' values arrive dequantized (exact: power-of-2 scales), with no per-tensor inverse
scale, unless the scales are not powers of two (``exact_dequantization`` False) or the
accumulator applies them: then as FP8 values with their group scales. No state persists
between steps.
"""

from __future__ import annotations

import torch

from fp8lab.formats import FP8Format, Role
from fp8lab.quantize.blocks import block_cast_stats, blocks_amax, blocks_amax_and_raw
from fp8lab.scaling.protocol import ROWWISE, Operand, Scaling


def tile(dim: int, usage: str, size: int) -> tuple[int, int]:
    """The block shape of an operand: 1-D tiles along the contracted dim, or 2-D squares."""
    if dim == 2:
        return (size, size)
    return (1, size) if usage == ROWWISE else (size, 1)


class BlockwiseScaling(Scaling):
    """Base of the block recipes: they define ``block(role, usage)`` and
    ``block_scales(amax, fmt, input_dtype) -> (scale, scale_inv)``."""

    per_tensor = False

    @property
    def exact_dequantization(self) -> bool:
        """Whether a block's dequantized values are exact in float32 (power-of-2 scales); when
        not, ``operand`` always hands the GEMM FP8 values with their group scales."""
        return True

    def block(self, role: Role, usage: str) -> tuple[int, int]:
        raise NotImplementedError

    def block_scales(self, amax: torch.Tensor, fmt: FP8Format, input_dtype: torch.dtype):
        raise NotImplementedError

    def operand(
        self, x2d: torch.Tensor, role: Role, usage: str, *, state, backend, record: bool, slot, raw: bool = False
    ) -> Operand:
        """Cast block by block with scales from each block's amax; the rowwise cast counts
        NaN/inf faults in training and leaves cast and block statistics on log steps.
        ``raw``: the FP8 values themselves (the backend's ``quantize_blocks`` with no
        ``scale_inv``), with each block's inverse scale repeated along the dimension the GEMM
        does not contract (``Operand.group_scale``) and the block shape (``Operand.block``)."""
        fmt, block = self.format_for(role), self.block(role, usage)
        raw = raw or not self.exact_dequantization
        if record and usage == ROWWISE:
            amax, raw_amax = blocks_amax_and_raw(x2d, block)  # one pass on the CPU
            slot.count_faults(role, raw_amax)
        else:
            amax = blocks_amax(x2d, block)
        scale, scale_inv = self.block_scales(amax, fmt, x2d.dtype)
        values = backend.quantize_blocks(x2d, block, scale, None if raw else scale_inv, fmt)
        if slot is not None and slot.armed and usage == ROWWISE:
            stats = block_cast_stats(x2d, None if raw else values, block, scale, fmt)  # None: the same cast, redone
            slot.cast_stats[role] = stats[:3]
            slot.record_blocks(role, stats[3:], amax.max())
        if not raw:
            return Operand(values, None, fmt)
        r, c = x2d.shape
        if usage == ROWWISE:  # (ceil(R/br), G) -> (R, G)
            groups = scale_inv.repeat_interleave(block[0], dim=0)[:r]
        else:  # (G, ceil(C/bc)) -> (G, C)
            groups = scale_inv.repeat_interleave(block[1], dim=1)[:, :c]
        return Operand(values, None, fmt, groups.float().contiguous(), block)

    @classmethod
    def whatif_stats(cls, x2d: torch.Tensor, role: Role, fmt: FP8Format) -> torch.Tensor:
        scaling = cls()  # TE's defaults (the format is ``fmt``, given)
        block = scaling.block(role, ROWWISE)
        scale, _ = scaling.block_scales(blocks_amax(x2d, block), fmt, x2d.dtype)
        return block_cast_stats(x2d, None, block, scale, fmt, block_stats=False)

    def accumulation_error(self, acc) -> str | None:
        """Block scales are applied at each promotion (an FMA of the partial sum), so the
        accumulator must promote, once per block along K (``group_k``), or be fp32."""
        if acc.kind == "fast":
            return "fast accumulation cannot apply block scales (they are applied at each promotion); use 'promoted'"
        return None

    def unsupported(self, backend: str, device) -> str | None:
        if backend == "scaled_mm":
            return f"fp8lab drives torch's blockwise scaled GEMM for 1x128/128x128 scales only, not {self.name}'s"
        return None
