"""NVFP4: E2M1 values in 1x16 blocks with E4M3 block scales and an fp32 per-tensor scale.

Invariant: ``NVFP4BlockScaling`` is immutable and valid once constructed, with Transformer
Engine 2.20.2's names and defaults; fields fp8lab does not model are refused with a
``ValueError`` naming the field and the value it allows, and no default is read from TE's
``NVTE_*`` environment variables. Every operand is cast from the high-precision tensor, one copy
per usage (the rowwise copy and the transposed, "columnwise", copy are not each other's
transpose), as TE does. Per operand, with TE's ``QParams``:

    input        1x16 along the contracted dim; RHT on the columnwise copy (wgrad's operand)
    weight       16x16 blocks (``disable_2d_quantization``: 1x16), no RHT, no SR
    grad_output  1x16; RHT on the columnwise copy; stochastic rounding on both copies

    fprop:  y      = x (1x16)            @ w^T (16x16)        * alpha(amax_x, amax_w)
    dgrad:  grad_x = grad_out (1x16, SR) @ w (16x16)          * alpha(amax_g, amax_w)
    wgrad:  grad_w = (H grad_out)^T (SR) @ (H x)              * alpha(amax_Hg, amax_Hx)

where H is the random Hadamard transform along the tokens (16x16, TE's fixed signs), which
cancels in the product (H^T H = I). The scale arithmetic is ``nvfp4_scales``: each copy's amax
(of the transformed copy where RHT applies) gives its fp32 S_enc, each block its E4M3 scale;
the cast is ``fp8lab.quantize.fp4``.

The GEMM (model of Blackwell's block-scaled MMA through cuBLASLt): the operand values are the
E2M1 values times their E4M3 block scales, exact in bf16 and fp32, so each product of two
elements is exact, and a block's products carry the product of the two block scales exactly;
they are accumulated in fp32 (fp8lab's "fp32" accumulator), and the output is ``acc * alpha``
rounded once to the output dtype, bias added in fp32. Not public, so not modelled: how the MMA
sums the 16 (or 32, 64) products of a block before it scales them (its internal width and
order), and when it adds block sums into the fp32 accumulator; fp8lab's fp32 sum of exact
products is the model, as for MXFP8.

Stochastic rounding draws 8 random bits per element (TE's ``stochastic_round_fp4_e2m1``) from
a counter-based generator (``fp4.sr_bits``: a hash of the element's index and a key made from
``sr_seed`` and the layer's cast counter, ``NVFP4State.sr_casts``, saved with the layer's
state_dict), so a resumed run draws the same bits on any device, and the CPU kernel makes them
in its cast loop instead of reading a tensor of them; TE's own bits come from Philox on the GPU
and are not reproduced.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fp8lab.formats import E2M1, FP8Format, Role
from fp8lab.quantize import block_cast_native
from fp8lab.quantize.blocks import blocks_amax, blocks_amax_and_raw
from fp8lab.quantize.fp4 import (
    cast_blocks_e2m1,
    cast_dequantized_e2m1,
    dequantize_blocks,
    rht_dim0,
    sr_key,
)
from fp8lab.quantize.tensor import amaxes_of
from fp8lab.scaling.blockwise import tile
from fp8lab.scaling.nvfp4_scales import block_scales, global_decode_scale, global_encode_scale
from fp8lab.scaling.protocol import COLUMNWISE, KEEP_BF16, ROWWISE, TE_PINNED, Operand, Scaling

BLOCK = 16
# TE's ``get_wgrad_sign_vector`` (transformer_engine/pytorch/tensor/nvfp4_tensor.py): the fixed
# "random" signs of the Hadamard transform's rows.
RHT_SIGNS = (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)
# Made once: torch.tensor of a tuple costs about 10 us, per cast.
RHT_SIGN_TENSOR = torch.tensor(RHT_SIGNS, dtype=torch.float32)
# TE 2.20.2's allowed values of the 4over6 fields; fp8lab models only nvfp4_4over6="none".
SCOPES = ("none", "weights", "activations", "all")
ERR_MODES = ("MAE", "MSE")


class NVFP4State(nn.Module):
    """The persistent state of an NVFP4 layer: how many stochastically rounded casts it has made
    (a buffer, so checkpoints carry it and a resumed run draws the same random bits)."""

    def __init__(self, device=None):
        super().__init__()
        self.register_buffer("sr_casts", torch.zeros((), dtype=torch.int64, device=device))
        self._casts: int | None = None  # the counter on the host; read from the buffer once, after a load

    def next_cast(self) -> int:
        """The number of this cast, counted on the host: the buffer is written, never read on the hot path
        (a read of a device tensor would sync a GPU at every cast)."""
        if self._casts is None:
            self._casts = int(self.sr_casts)
        cast, self._casts = self._casts, self._casts + 1
        self.sr_casts.fill_(self._casts)
        return cast

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._casts = None  # the loaded buffer is the count now


@dataclass(frozen=True, kw_only=True)
class NVFP4BlockScaling(Scaling):
    """NVFP4 training (TE's ``NVFP4BlockScaling``; on hardware: Blackwell).

    Args:
        fp4_format: "e2m1" (TE's ``Format.E2M1``, the only value).
        fp8_format: "e4m3": the block scales' format (TE's only value).
        disable_rht: no random Hadamard transform on any tensor (default False).
        disable_stochastic_rounding: gradients rounded to nearest even too (default False).
        disable_2d_quantization: 1x16 blocks for weights too, not 16x16 (default False).
        row_scaled_activation, nvfp4_4over6, nvfp4_4over6_e4m3_use_256, nvfp4_4over6_err_mode:
            TE's; only their defaults' behaviour is modelled (False, "none"; the other two are
            validated and have no effect without 4over6).
        sr_seed: fp8lab's: the seed of the stochastic-rounding bits (not a TE field).
    """

    fp4_format: str = "e2m1"
    fp8_format: str = "e4m3"
    disable_rht: bool = False
    disable_stochastic_rounding: bool = False
    disable_2d_quantization: bool = False
    row_scaled_activation: bool = False
    nvfp4_4over6: str = "none"
    nvfp4_4over6_e4m3_use_256: str = "all"
    nvfp4_4over6_err_mode: str = "MAE"
    sr_seed: int = 0

    name = "nvfp4"
    per_tensor = False

    def __post_init__(self) -> None:
        if self.fp4_format != "e2m1":
            raise ValueError(f"fp4_format must be 'e2m1' (NVFP4's only format), got {self.fp4_format!r}")
        if self.fp8_format != "e4m3":
            raise ValueError(f"fp8_format must be 'e4m3' (NVFP4's block scales), got {self.fp8_format!r}")
        for name in ("disable_rht", "disable_stochastic_rounding", "disable_2d_quantization"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if self.row_scaled_activation is not False:
            raise ValueError(
                "row_scaled_activation must be False (row-scaled NVFP4 is not modelled), "
                f"got {self.row_scaled_activation!r}"
            )
        if self.nvfp4_4over6 != "none":
            raise ValueError(f"nvfp4_4over6 must be 'none' (4over6 is not modelled), got {self.nvfp4_4over6!r}")
        if self.nvfp4_4over6_e4m3_use_256 not in SCOPES:
            raise ValueError(
                f"nvfp4_4over6_e4m3_use_256 must be one of {SCOPES}, got {self.nvfp4_4over6_e4m3_use_256!r}"
            )
        if self.nvfp4_4over6_err_mode not in ERR_MODES:
            raise ValueError(f"nvfp4_4over6_err_mode must be one of {ERR_MODES}, got {self.nvfp4_4over6_err_mode!r}")
        if not isinstance(self.sr_seed, int) or isinstance(self.sr_seed, bool) or self.sr_seed < 0:
            raise ValueError(f"sr_seed must be a non-negative int, got {self.sr_seed!r}")

    def format_for(self, role: Role) -> FP8Format:
        return E2M1

    def new_state(self, device=None) -> nn.Module | None:
        """The stochastic-rounding cast counter, or None when no cast rounds stochastically."""
        return None if self.disable_stochastic_rounding else NVFP4State(device)

    def block(self, role: Role, usage: str) -> tuple[int, int]:
        """16x16 for weights (unless ``disable_2d_quantization``), else 1x16 along the contracted dim."""
        dim = 2 if role == Role.WEIGHT and not self.disable_2d_quantization else 1
        return tile(dim, usage, BLOCK)

    def rht(self, role: Role, usage: str) -> bool:
        """TE applies the transform to the columnwise copies of inputs and gradients (wgrad's operands)."""
        return not self.disable_rht and usage == COLUMNWISE and role != Role.WEIGHT

    def stochastic(self, role: Role) -> bool:
        return not self.disable_stochastic_rounding and role == Role.GRAD_OUTPUT

    def _scales(self, x2d: torch.Tensor, role: Role, usage: str, faults=None):
        """(the tensor cast: ``x2d``, Hadamard-transformed where TE transforms it; its amax; the
        E4M3 block decode scales; the float32 block encode scales) for ``usage``; ``faults``: the
        slot whose fault count this cast adds to (when the tensor cast is x2d itself)."""
        block = self.block(role, usage)
        x = rht_dim0(x2d, RHT_SIGN_TENSOR) if self.rht(role, usage) else x2d
        if faults is not None:
            block_amax, raw_amax = blocks_amax_and_raw(x, block)  # one pass on the CPU
            faults.count_faults(role, raw_amax)
        else:
            block_amax = blocks_amax(x, block)
        largest = block_amax.amax() if block_amax.device.type == "cpu" and block_amax.numel() else None
        amax = _tensor_amax(largest, lambda: x)
        return x, amax, *block_scales(block_amax, amax)

    def quantize(self, x2d: torch.Tensor, role: Role, usage: str, rbits: torch.Tensor | None = None):
        """(E2M1 values float32, E4M3 block scales float32, tensor amax, the tensor cast) of ``x2d``
        as this recipe casts it for ``usage``, with the given random bits (None: nearest even)."""
        x, amax, decode, encode = self._scales(x2d, role, usage)
        return cast_blocks_e2m1(x, self.block(role, usage), encode, rbits), decode, amax, x

    def operand(
        self, x2d: torch.Tensor, role: Role, usage: str, *, state, backend, record: bool, slot, raw: bool = False
    ) -> Operand:
        """The NVFP4 copy of ``x2d`` for ``usage``: values ``e2m1 * block scale`` (exact) in the
        backend's operand dtype, ``inv_scale`` the copy's amax (the GEMM's alpha is formed from
        both operands' amaxes, ``nvfp4_scales.gemm_alpha``), format E2M1. ``raw`` is ignored:
        the block scales are exact in the values (no group scales)."""
        block = self.block(role, usage)
        key, k = None, None
        if self.stochastic(role) and state is not None:
            key = sr_key(self.sr_seed, state.next_cast())  # the counter keys the bits (fp4.sr_bits)
        faults = slot if record and usage == ROWWISE else None  # rowwise: never transformed
        dtype = backend.path.operand_dtype
        if block_cast_native.readable(x2d) and dtype in (torch.float32, torch.bfloat16):
            k = block_cast_native.kernel()
        if k is not None:  # the CPU: amaxes, scales and cast in one call of the C kernel, the same values
            signs = RHT_SIGN_TENSOR if self.rht(role, usage) else None
            values, amax, decode, nans = block_cast_native.nvfp4_cast(
                k, x2d, block, signs, key, dtype, faults is not None
            )
            x = x2d if signs is None else None  # a transform is not stored (statistics read rowwise casts only)
            amax = _tensor_amax(amax, lambda: rht_dim0(x2d, signs) if x is None else x)
            if faults is not None:  # the raw amax, NaN propagating: non-finite iff x2d holds NaN or inf
                faults.count_faults(role, torch.tensor(float("nan")) if nans else amax)
        else:
            x, amax, decode, encode = self._scales(x2d, role, usage, faults)
            values = cast_dequantized_e2m1(x, block, encode, decode, key, dtype)
        if slot is not None and slot.armed and usage == ROWWISE:
            slot.cast_stats[role] = _cast_stats(x, values, amax)
            slot.record_blocks(role, _block_stats(x, values, block, decode, amax), amax)
        return Operand(values, amax, E2M1)

    @classmethod
    def whatif_stats(cls, x2d: torch.Tensor, role: Role, fmt: FP8Format) -> torch.Tensor:
        q, decode, amax, x = cls().quantize(x2d, role, ROWWISE)
        return _cast_stats(x, dequantize_blocks(q, cls().block(role, ROWWISE), decode, torch.float32), amax)

    def te_accumulation(self, gemm: int) -> str:
        """Blackwell's block-scaled MMA applies the block scales inside the instruction; its
        accumulator is not public, so fp8lab accumulates NVFP4 GEMMs in fp32 (module docstring)."""
        return "fp32"

    def accumulation_error(self, acc) -> str | None:
        if acc.kind != "fp32":
            return (
                "NVFP4's block scales are applied inside Blackwell's MMA, whose accumulator is not modelled; "
                "only 'fp32' (or 'te') accumulation applies"
            )
        return None

    def unsupported(self, backend: str, device) -> str | None:
        if backend == "te":
            return (
                "fp8lab does not drive Transformer Engine's NVFP4BlockScaling yet (only the emulated backend runs it)"
            )
        if backend == "scaled_mm":
            return "fp8lab drives no NVFP4 GEMM through torch._scaled_mm (only the emulated backend runs it)"
        return None

    @classmethod
    def advice(cls, problem: str) -> str:
        if problem == "overflow":
            return (
                "NVFP4's per-tensor and per-block scales keep every finite value within range, so only inf "
                "clamps: see faults/nonfinite_amax"
            )
        return f"the flushed values lie more than E2M1's range below their 1x16 block's amax: {KEEP_BF16}"

    def te_recipe(self) -> dict:
        kwargs = {
            "disable_rht": self.disable_rht,
            "disable_stochastic_rounding": self.disable_stochastic_rounding,
            "disable_2d_quantization": self.disable_2d_quantization,
            "row_scaled_activation": False,
            "nvfp4_4over6": "none",
            "nvfp4_4over6_e4m3_use_256": self.nvfp4_4over6_e4m3_use_256,
            "nvfp4_4over6_err_mode": self.nvfp4_4over6_err_mode,
            **TE_PINNED,
        }
        return {"recipe": "NVFP4BlockScaling", "kwargs": kwargs, "mmparams": None, "qparams": None}


def _tensor_amax(largest: torch.Tensor | None, tensor: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``amaxes_of(tensor())[1]`` (fmaxf: NaN ignored, as TE's amax kernels) of the tensor cast, whose
    largest block amax (a CPU tensor; None elsewhere) is ``largest``: that value without another pass
    over the tensor, unless it is 0: then amaxes_of's own (its sign of zero, -0 for a tensor of +0s,
    reaches the GEMM's alpha; the scales are those of any zero amax)."""
    if largest is not None and largest > 0:  # a CPU tensor: reading it is a load, no sync
        return largest
    return amaxes_of(tensor())[1]


def _block_stats(x, values, block, decode, amax) -> torch.Tensor:
    """``BLOCK_STAT_NAMES`` of one NVFP4 cast: log2 of the blocks' effective scales (what their
    elements are multiplied by, 1 / (E4M3 scale * S_dec)) over the blocks holding a non-zero
    value, the % of those blocks that lost a non-zero element to zero, and 0 % clamped."""
    s_dec = global_decode_scale(global_encode_scale(amax))
    occupied = blocks_amax(x, block) > 0
    lost = blocks_amax(((x != 0) & (values == 0)).float(), block) > 0
    log2 = -torch.log2(decode.float() * s_dec)[occupied & (decode > 0)]
    if log2.numel() == 0:
        log2 = torch.zeros(1, device=x.device)
    blocks = max(int(occupied.sum()), 1)  # telemetry steps only: a host read is acceptable here
    zero = torch.zeros((), device=x.device)
    return torch.stack([log2.min(), log2.median(), log2.max(), lost.sum().float() * (100.0 / blocks), zero]).float()


def _cast_stats(x: torch.Tensor, dequantized_by_block: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """[overflow %, underflow %, SQNR dB] of one NVFP4 cast (log steps only): overflow is 0 (the
    scales map every finite block amax within range); SQNR against the values times 1/S_enc."""
    s_dec = global_decode_scale(global_encode_scale(amax)).double()
    xd = x.double()
    err = dequantized_by_block.double() * s_dec - xd
    n = max(x.numel(), 1)
    underflow = (torch.count_nonzero(xd) - torch.count_nonzero(dequantized_by_block)).double() * (100.0 / n)
    signal, noise = (xd * xd).sum(), (err * err).sum().clamp_min(1e-300)
    sqnr = 10.0 * torch.log10(signal / noise)
    return torch.stack([torch.zeros((), dtype=torch.float64, device=x.device), underflow, sqnr]).float()
