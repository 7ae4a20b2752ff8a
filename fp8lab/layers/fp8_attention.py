"""FP8 dot-product attention (``fp8_dpa``): QK^T and PV as FP8 GEMMs with delayed scaling.

Invariant: this is the one model of FP8 attention in fp8lab, the same on every device; it
reads the scales of its two ScalingStates and never changes them (only row 0 of their amax
histories, in training, as every fp8lab cast does); ``fp8lab.update_scales`` updates them
with every other layer's. The tensors cast, and the state holding each one's amax history
and scale, are Transformer Engine's DPA meta (``dot_product_attention/utils.py``,
``get_attention_quantizers``: ``scaling_fwd`` META_QKV, META_S, META_O and ``scaling_bwd``
META_DQKV, META_DO, META_DP); under "hybrid" the forward ones are E4M3 and the backward ones
E5M2 (``dot_product_attention.py``: ``kFloat8E5M2 if is_bwd_role else kFloat8E4M3``).
Where the casts sit follows TE's Python reference of FP8 attention, ``FP8EmulationFunc``
in ``UnfusedDotProductAttention`` (``backends.py``); cuDNN's fused FP8 kernel, which TE runs
on the GPU, is not public, so everything between the casts is a model (README, "FP8
attention"):

    q8, k8, v8 = cast(q, k, v; s_qkv)       E4M3, one scale and one amax for all three
    S   = (q8 @ k8^T) * (1/s_qkv * 1/s_qkv * softmax_scale)      fp32 GEMM, fp32 result
    P   = softmax(mask(S))                  fp32
    p8  = cast(P; s_s)                      E4M3 (TE's "S": the softmax output)
    O   = (p8 @ v8) * (1/s_s * 1/s_qkv)     fp32
    out = dequant(cast(O; s_o))             E4M3, then * 1/s_o rounded to the activation dtype
  backward:
    do8 = cast(d_out; s_do)                 E5M2
    dV  = (p8^T @ do8) * (1/s_s * 1/s_do)   fp32
    dP  = (do8 @ v8^T) * (1/s_do * 1/s_qkv) fp32 (not cast: TE's "dS" is passed through)
    dS  = P * (dP - rowsum(P * dP))         softmax backward, fp32, on the fp32 P
    ds8 = cast(dS; s_dp)                    E5M2 (TE's "dP": the gradient of the scores)
    dQ  = (ds8 @ k8)   * (1/s_dp * 1/s_qkv * softmax_scale)   fp32
    dK  = (ds8^T @ q8) * (1/s_dp * 1/s_qkv * softmax_scale)   fp32
    dq, dk, dv = dequant(cast(dQ, dK, dV; s_dqkv))   E5M2, one scale for all three

Every GEMM multiplies the exact FP8 values held in float32 and accumulates in fp32 (the
hardware model's fp32 accumulator; cuDNN's own accumulation order is not published), its
inverse scales applied to the fp32 sum in the order written above (fp32 roundings).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
from dataclasses import dataclass

import torch
from torch import nn

from fp8lab.formats import FP8Format, Role, format_for
from fp8lab.gemm.exact import _cuda_exact
from fp8lab.gemm.shadow import sqnr_db
from fp8lab.quantize.tensor import STAT_NAMES, amaxes_of, cast_stats, cast_to_fp8_grid
from fp8lab.scaling.delayed import DelayedScaling
from fp8lab.scaling.state import ScalingState

# Columns of the two states, named as TE's DPA meta names them.
FWD_TENSORS = ("qkv", "s", "o")  # scaling_fwd: META_QKV, META_S (softmax output), META_O
BWD_TENSORS = ("dqkv", "do", "dp")  # scaling_bwd: META_DQKV, META_DO, META_DP (grad of the scores)


class Fwd(enum.IntEnum):
    """Columns of ``scaling_fwd`` (E4M3)."""

    QKV = 0
    S = 1  # the softmax output P
    O = 2  # noqa: E741 -- TE's name


class Bwd(enum.IntEnum):
    """Columns of ``scaling_bwd`` (E5M2 under "hybrid")."""

    DQKV = 0
    DO = 1
    DP = 2  # the gradient of the scores S = q k^T * softmax_scale


# The six GEMMs, named by their outputs (telemetry: ``accuracy/<core>/<gemm>_sqnr_db``).
GEMMS = ("s", "o", "dv", "dp", "dq", "dk")


@dataclass(frozen=True, kw_only=True)
class AttentionScaling(DelayedScaling):
    """The layer's DelayedScaling for one of the two attention states: every column in one
    format (E4M3 forward; E5M2 backward under "hybrid"), so ``update_scales`` maps each amax
    onto that format's maximum. A separate class, so its states are updated in their own group.

    Args:
        backward: the state of the backward tensors (dQKV, dO, dP) rather than the forward ones.
    """

    backward: bool = False

    @classmethod
    def of(cls, scaling: DelayedScaling, backward: bool) -> AttentionScaling:
        """The attention scaling with every field of the layer's ``scaling``."""
        fields = {f.name: getattr(scaling, f.name) for f in dataclasses.fields(DelayedScaling)}
        return cls(**fields, backward=backward)

    @property
    def tensor_format(self) -> FP8Format:
        """The format of every tensor of this state."""
        return format_for(self.fp8_format, Role.GRAD_OUTPUT if self.backward else Role.INPUT)

    def format_for(self, role: Role) -> FP8Format:
        return self.tensor_format

    @property
    def fp8_max(self) -> tuple[float, float, float]:
        return (self.tensor_format.max,) * 3


class AttentionSlot:
    """Where the FP8 attention leaves its statistics on a log step (the collector arms it, as a
    Linear's TelemetrySlot): ``cast_stats`` (2 states, 3 tensors, ``STAT_NAMES``) and
    ``gemm_sqnr`` (``GEMMS``: each GEMM's output SQNR in dB against its BF16 twin, the same
    GEMM of the same high-precision operands rounded to bf16, summed in fp32); NaN for what
    did not run while armed. Not saved, never read by ``update_scales``."""

    def __init__(self) -> None:
        self.armed = False  # a host flag: checking it never touches the device
        self.cast_stats: torch.Tensor | None = None
        self.gemm_sqnr: torch.Tensor | None = None

    def arm(self, device: torch.device) -> None:
        if self.cast_stats is None or self.cast_stats.device != device:
            self.cast_stats = torch.empty(2, 3, len(STAT_NAMES), dtype=torch.float32, device=device)
            self.gemm_sqnr = torch.empty(len(GEMMS), dtype=torch.float32, device=device)
        self.cast_stats.fill_(float("nan"))
        self.gemm_sqnr.fill_(float("nan"))
        self.armed = True

    def twin(self, gemm: str, a_hp: torch.Tensor, b_hp: torch.Tensor, out: torch.Tensor, factor=None) -> None:
        """The SQNR of the FP8 GEMM's fp32 output ``out`` against ``a_hp @ b_hp`` in BF16 (times
        ``factor``, the softmax scale of S, dQ and dK); log steps only."""
        if self.armed:
            ref = _mm(a_hp.detach().to(torch.bfloat16).float(), b_hp.detach().to(torch.bfloat16).float())
            self.gemm_sqnr[GEMMS.index(gemm)] = sqnr_db(ref if factor is None else ref * factor, out)

    def disarm(self) -> None:
        self.armed = False

    def note(self, state: int, column: int, tensors, values, scale: torch.Tensor, fmt: FP8Format) -> None:
        """The statistics of one cast (of several tensors with one scale: over all of them)."""
        if self.armed:
            x = torch.cat([t.reshape(-1) for t in tensors]) if len(tensors) > 1 else tensors[0]
            v = torch.cat([t.reshape(-1) for t in values]) if len(values) > 1 else values[0]
            self.cast_stats[state, column] = cast_stats(x, v, scale, fmt)


def _amax(*tensors: torch.Tensor) -> torch.Tensor:
    """``amaxes_of`` over several tensors together (one amax, as TE's one QKV quantizer takes)."""
    return torch.stack([amaxes_of(t) for t in tensors]).amax(dim=0)


def _cast(x: torch.Tensor, scale: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
    """x on the FP8 grid of ``fmt`` with ``scale`` (values * scale), held exactly in float32."""
    return cast_to_fp8_grid(x, scale, fmt, dtype=torch.float32)


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Batched fp32 GEMM of exact FP8 values: exact products, fp32 sums (no TF32 on CUDA)."""
    with _cuda_exact() if a.device.type == "cuda" else contextlib.nullcontext():
        return torch.matmul(a, b)


class _FP8Attention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, fwd, bwd, softmax_scale, causal, record, out_dtype, slot):
        fmt = fwd.scaling.tensor_format
        s_qkv, s_s, s_o = fwd.scale.unbind(0)
        inv_qkv, inv_s, inv_o = fwd.scale.reciprocal().unbind(0)
        sm = torch.tensor(softmax_scale, dtype=torch.float32, device=q.device)
        if record:
            fwd.record_amax(Fwd.QKV, _amax(q, k, v))
        q8, k8, v8 = (_cast(t, s_qkv, fmt) for t in (q, k, v))  # (B, H, T, D) each
        slot.note(0, Fwd.QKV, (q, k, v), (q8, k8, v8), s_qkv, fmt)
        scores = _mm(q8, k8.transpose(-2, -1)) * (inv_qkv * inv_qkv * sm)  # (B, H, T, T) fp32
        slot.twin("s", q, k.transpose(-2, -1), scores, sm)
        if causal:
            t_q, t_k = scores.shape[-2:]
            future = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        probs = torch.softmax(scores, dim=-1)  # fp32
        if record:
            fwd.record_amax(Fwd.S, amaxes_of(probs))
        p8 = _cast(probs, s_s, fmt)
        slot.note(0, Fwd.S, (probs,), (p8,), s_s, fmt)
        out = _mm(p8, v8) * (inv_s * inv_qkv)  # (B, H, T, D) fp32
        slot.twin("o", probs, v, out)
        if record:
            fwd.record_amax(Fwd.O, amaxes_of(out))
        o8 = _cast(out, s_o, fmt)
        slot.note(0, Fwd.O, (out,), (o8,), s_o, fmt)
        out = (o8 * inv_o).to(out_dtype)
        ctx.save_for_backward(q8, k8, v8, p8, probs, inv_qkv, inv_s, sm)
        ctx.bwd, ctx.record, ctx.dtypes, ctx.slot = bwd, record, (q.dtype, k.dtype, v.dtype), slot
        # Log steps only (a host flag): the high-precision q, k, v for the backward's BF16 twins;
        # kept outside save_for_backward (telemetry's, not the GEMMs'), as qlinear's shadows.
        ctx.hp = (q.detach(), k.detach(), v.detach()) if slot.armed else None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q8, k8, v8, p8, probs, inv_qkv, inv_s, sm = ctx.saved_tensors
        bwd, record, slot = ctx.bwd, ctx.record, ctx.slot
        fmt = bwd.scaling.tensor_format
        s_dqkv, s_do, s_dp = bwd.scale.unbind(0)
        inv_dqkv, inv_do, inv_dp = bwd.scale.reciprocal().unbind(0)
        if record:
            bwd.record_amax(Bwd.DO, amaxes_of(grad_out))
        do8 = _cast(grad_out, s_do, fmt)
        slot.note(1, Bwd.DO, (grad_out,), (do8,), s_do, fmt)
        dv = _mm(p8.transpose(-2, -1), do8) * (inv_s * inv_do)  # (B, H, T, D)
        dp = _mm(do8, v8.transpose(-2, -1)) * (inv_do * inv_qkv)  # (B, H, T, T)
        twins = ctx.hp is not None and slot.armed
        if twins:
            slot.twin("dv", probs.transpose(-2, -1), grad_out, dv)
            slot.twin("dp", grad_out, ctx.hp[2].transpose(-2, -1), dp)
        ds = probs * (dp - (probs * dp).sum(dim=-1, keepdim=True))  # softmax backward, fp32
        if record:
            bwd.record_amax(Bwd.DP, amaxes_of(ds))
        ds8 = _cast(ds, s_dp, fmt)
        slot.note(1, Bwd.DP, (ds,), (ds8,), s_dp, fmt)
        alpha = inv_dp * inv_qkv * sm
        dq = _mm(ds8, k8) * alpha
        dk = _mm(ds8.transpose(-2, -1), q8) * alpha
        if twins:
            slot.twin("dq", ds, ctx.hp[1], dq, sm)
            slot.twin("dk", ds.transpose(-2, -1), ctx.hp[0], dk, sm)
        if record:
            bwd.record_amax(Bwd.DQKV, _amax(dq, dk, dv))
        grads8 = [_cast(g, s_dqkv, fmt) for g in (dq, dk, dv)]
        slot.note(1, Bwd.DQKV, (dq, dk, dv), grads8, s_dqkv, fmt)
        grads = [(g8 * inv_dqkv).to(dt) for g8, dt in zip(grads8, ctx.dtypes)]
        return *grads, None, None, None, None, None, None, None


def fp8_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    fwd: ScalingState,
    bwd: ScalingState,
    *,
    causal: bool,
    record: bool,
    softmax_scale: float | None = None,
    slot: AttentionSlot | None = None,
) -> torch.Tensor:
    """``softmax(q k^T * softmax_scale) v`` over (B, H, T, D) tensors, the FP8 model above.

    Args:
        q, k, v: (B, H, T, D) in the activation dtype.
        fwd, bwd: the ScalingStates of the forward (qkv, s, o) and backward (dqkv, do, dp)
            tensors (``AttentionScaling``).
        causal: token t sees tokens <= t.
        record: training: the amaxes go into row 0 of the states' histories.
        softmax_scale: default 1/sqrt(D).
        slot: the layer's AttentionSlot; while armed, each cast's statistics go there.
    Returns:
        (B, H, T, D) in q's dtype.
    """
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    with torch.autocast(q.device.type, enabled=False):
        slot = slot if slot is not None else AttentionSlot()
        return _FP8Attention.apply(q, k, v, fwd, bwd, scale, causal, record, q.dtype, slot)


class FP8DotProductAttention(nn.Module):
    """The FP8 attention core's scaling state: ``scaling_fwd`` (qkv, s, o) and
    ``scaling_bwd`` (dqkv, do, dp), each a ScalingState [H, 3] saved in the state_dict.

    Args:
        scaling: the layer's scaling; must be a ``DelayedScaling`` (its history length,
            algorithm, margin, format and amax reduction apply to both states).
        device: where the states are created.
    """

    def __init__(self, scaling, device: torch.device | str | None = None):
        super().__init__()
        if not isinstance(scaling, DelayedScaling):
            raise ValueError(
                f"fp8_dpa=True needs DelayedScaling (FP8 attention keeps amax histories, as TE's "
                f"DPA does), got {type(scaling).__name__}"
            )
        self.scaling_fwd = ScalingState(AttentionScaling.of(scaling, backward=False), device)
        self.scaling_bwd = ScalingState(AttentionScaling.of(scaling, backward=True), device)
        self.telemetry = AttentionSlot()  # armed by the telemetry collector on log steps

    def forward(self, q, k, v, *, causal: bool) -> torch.Tensor:
        """(B, H, T, D) q, k, v -> (B, H, T, D); amaxes recorded in training."""
        return fp8_attention(
            q, k, v, self.scaling_fwd, self.scaling_bwd, causal=causal, record=self.training, slot=self.telemetry
        )

    def telemetry_snapshot(self) -> torch.Tensor:
        """(6, 3 + len(STAT_NAMES)) on the device: row i holds the scale, amax (row 0, the step
        being recorded) and the armed step's cast statistics of tensor i (qkv, s, o, dqkv, do,
        dp), then the BF16-twin SQNR of GEMM i (``GEMMS``: s, o, dv, dp, dq, dk); NaN where not
        measured. No host copy."""
        scale = torch.cat([self.scaling_fwd.scale, self.scaling_bwd.scale])
        amax = torch.cat([self.scaling_fwd.amax_history[0], self.scaling_bwd.amax_history[0]])
        stats, gemms = self.telemetry.cast_stats, self.telemetry.gemm_sqnr
        if stats is None:
            stats = torch.full((2, 3, len(STAT_NAMES)), float("nan"), device=scale.device)
            gemms = torch.full((len(GEMMS),), float("nan"), device=scale.device)
        return torch.cat([scale[:, None], amax[:, None], stats.reshape(6, -1), gemms[:, None]], dim=1)
