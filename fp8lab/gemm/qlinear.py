"""The quantized GEMM: one autograd Function for fprop, dgrad and wgrad.

Invariant: scales are read from the layer's ScalingState and never changed here; the
only state this writes is row 0 of the amax history (a running max until
``update_scales``), the fault count of casts that met NaN or inf, and, while the layer's
TelemetrySlot is armed (log steps), its cast statistics, each GEMM's SQNR against its
BF16 shadow (``fp8lab.gemm.shadow``) and against the same GEMM accumulated in fp32. Every
GEMM is the hardware model (``fp8lab.gemm.exact``), with its own accumulator
(``fp8lab.accumulation``: per GEMM, as the layer's FP8 options say):

    fprop:  y      = x_fp8 (E4M3)        @ w_fp8 (E4M3)^T   * 1/(s_x * s_w) + b
    dgrad:  grad_x = grad_out_fp8 (E5M2) @ w_fp8 (E4M3)     * 1/(s_g * s_w)
    wgrad:  grad_w = grad_out_fp8^T      @ x_fp8 (E4M3)     * 1/(s_g * s_x)
            grad_b = sum(grad_out) in high precision (TE takes bgrad before the cast)

grad_out is E5M2 under "hybrid", E4M3 under "e4m3". Under NVFP4 the operands are E2M1 values times
their E4M3 block scales and each carries its tensor amax: the epilogue multiplies by the GEMM's
alpha, formed from both amaxes (``fp8lab.scaling.nvfp4_scales.gemm_alpha``). Under torchao's rowwise scaling the inverse
scales are per row of the left operand and per column of the right (an (M, N) epilogue), b is
added after the output's rounding (``Scaling.bias_after_gemm``), and "rowwise_with_gw_hp"'s
wgrad multiplies the high-precision tensors (an fp32 accumulator: no FP8 GEMM). x and w are quantized once in the
forward and the FP8 copies are saved for the backward, as on FP8 hardware. All three
GEMMs round once to the activation dtype (autocast's, else x's), as Transformer Engine's
Linear does without ``fuse_wgrad_accumulation``; autograd then casts grad_x and grad_w to
the dtypes of x and w. A BF16 layer runs the same Function with operands rounded to bf16
and no scaling (``state`` None).
"""

from __future__ import annotations

import torch

from fp8lab.accumulation import FP32, Accumulator
from fp8lab.formats import DGRAD, E2M1, FPROP, WGRAD, Role
from fp8lab.gemm import shadow
from fp8lab.gemm.exact import epilogue_bias
from fp8lab.gemm.fp8_all_gather import GatheredFP8Weight
from fp8lab.gemm.telemetry_slot import TelemetrySlot
from fp8lab.quantize.tensor import CPU_CHUNK
from fp8lab.quantize.weight import FP8Weight
from fp8lab.scaling.nvfp4_scales import gemm_alpha
from fp8lab.scaling.protocol import COLUMNWISE, ROWWISE, Operand, Scaling
from fp8lab.scaling.state import ScalingState
from fp8lab.scaling.whatif import whatif_stats

FP32_ACCUMULATORS = (FP32, FP32, FP32)


def output_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype a GEMM returns: autocast's when it is on for x's device, else x's."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _operand(x2d, role: Role, usage: str, ctx_or_args, record: bool, acc: Accumulator = FP32) -> Operand:
    """An FP8 operand (the scaling's ``operand``; block values left unscaled with their group
    scales when the GEMM's accumulator ``acc`` applies them, or the backend's GEMM takes block
    scales, ``block_scales_in_gemm``), or x rounded for a BF16 GEMM.
    On a log step the rowwise cast of each role also leaves what every recipe would have done
    to the same tensor in the slot (``fp8lab.scaling.whatif``), the layer's own recipe's row
    being the cast statistics it just measured."""
    scaling, state, backend, slot = ctx_or_args
    if scaling is None:
        return Operand(backend.round(x2d), None)
    raw = not scaling.per_tensor and (acc.kind != "fp32" or backend.block_scales_in_gemm)
    op = scaling.operand(x2d, role, usage, state=state, backend=backend, record=record, slot=slot, raw=raw)
    if slot is not None and slot.armed and slot.whatif_armed and usage == ROWWISE:
        known = {scaling.name: slot.cast_stats[role]}
        slot.whatif[role] = whatif_stats(x2d, role, scaling.format_for(role), known=known)
    return op


def _gemm(
    backend,
    a: Operand,
    b: Operand,
    out_dtype: torch.dtype,
    bias=None,
    acc: Accumulator = FP32,
    slot: TelemetrySlot | None = None,
    gemm: int = FPROP,
) -> torch.Tensor:
    """``a @ b`` by the backend with the accumulator ``acc``; while the slot is armed, also
    the SQNR of that output against the same GEMM accumulated in fp32 (what the accumulator
    alone costs, ``accum_sqnr``). A GEMM of high-precision operands (no FP8 format: rowwise
    scaling's "rowwise_with_gw_hp" wgrad) has no FP8 accumulator: fp32."""
    if a.fmt is None or b.fmt is None:
        acc = FP32
    a_inv, b_inv = a.inv_scale, b.inv_scale
    if a.fmt is E2M1 and b.fmt is E2M1:  # NVFP4: the operands carry their amaxes; cuBLAS's alpha
        a_inv, b_inv = gemm_alpha(a.inv_scale, b.inv_scale), None
    kwargs = (
        {}
        if acc is FP32 and a.group_scale is None
        else dict(
            accumulator=acc,
            formats=(a.fmt, b.fmt),
            group_scales=(a.group_scale, b.group_scale),
            blocks=(a.block, b.block),
        )
    )
    out = backend.gemm(a.values, b.values, a_inv, b_inv, out_dtype, bias, **kwargs)
    if slot is not None and slot.armed and acc.kind != "fp32":
        ref = backend.fp32_reference(
            a.values,
            b.values,
            a_inv,
            b_inv,
            out_dtype,
            bias,
            formats=(a.fmt, b.fmt),
            group_scales=(a.group_scale, b.group_scale),
        )
        slot.accum_sqnr[gemm] = shadow.sqnr_db(ref, out)
    return out


def _t(op: Operand) -> Operand:
    """The operand transposed (its group scales and per-row/column inverse scales with it)."""
    per_slice = op.inv_scale is not None and op.inv_scale.dim() == 2
    return op._replace(
        values=op.values.t(),
        inv_scale=op.inv_scale.t() if per_slice else op.inv_scale,
        group_scale=None if op.group_scale is None else op.group_scale.t(),
        block=None if op.block is None else op.block[::-1],
    )


def _bias_grad(g2d: torch.Tensor) -> torch.Tensor:
    """sum(grad_out) over rows in float32: (B*T, N) -> (N,).

    On CPU, ``sum(dtype=float32)`` of a bf16 tensor first converts all of it into a float32
    temporary (25 MB for 2048x3072, page-faulted in again at every step on the dev VM:
    MLP step 132-137 ms -> 111-128 ms measured without it). Summing slices of about
    CPU_CHUNK elements keeps that temporary small; it is the same float32 sum of the same
    values, added in a different order (results can differ in the last bits).
    """
    if g2d.device.type != "cpu" or g2d.dtype == torch.float32:
        return g2d.sum(dim=0, dtype=torch.float32)
    parts = g2d.split(max(1, CPU_CHUNK // max(1, g2d.shape[1])))
    grad_b = parts[0].sum(dim=0, dtype=torch.float32)
    for part in parts[1:]:
        grad_b.add_(part.sum(dim=0, dtype=torch.float32))
    return grad_b


class _QuantizedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_hp, w_hp, bias, scaling, state, backend, out_dtype, record, slot, accumulators=None):
        parts = (scaling, state, backend, slot)
        accs = accumulators if accumulators is not None else FP32_ACCUMULATORS
        x2d = x_hp.reshape(-1, x_hp.shape[-1])  # (B*T, K)
        x_row = _operand(x2d, Role.INPUT, ROWWISE, parts, record, accs[FPROP])  # fprop contracts K
        ctx.w_dtype = w_hp.dtype
        if isinstance(w_hp, FP8Weight):  # an FP8 primary weight is the operand as stored (TE: not cast again)
            w_row = w_hp.operand(backend, scaling.format_for(Role.WEIGHT))
            w_hp = w_hp.dequantize() if slot is not None and slot.armed else None  # the shadows' (log steps)
        elif isinstance(w_hp, GatheredFP8Weight):  # cast shard by shard, gathered as FP8 (FSDP)
            gathered = w_hp
            w_hp = gathered.whole_hp() if slot is not None and slot.armed else None  # telemetry's (log steps)
            w_row = gathered.operand(scaling, state, slot, record, w_hp)
            if slot is not None and slot.armed and slot.whatif_armed:
                known = {scaling.name: slot.cast_stats[Role.WEIGHT]}
                slot.whatif[Role.WEIGHT] = whatif_stats(w_hp, Role.WEIGHT, scaling.format_for(Role.WEIGHT), known=known)
        else:
            w_row = _operand(w_hp, Role.WEIGHT, ROWWISE, parts, record, accs[FPROP])
        after = scaling is not None and scaling.bias_after_gemm  # torchao's ``output + bias``
        b = None if after else epilogue_bias(bias, out_dtype, backend.fp8)
        y = _gemm(backend, x_row, _t(w_row), out_dtype, b, accs[FPROP], slot, FPROP)  # (B*T, N)
        if after and bias is not None:
            y = y + bias.to(y.dtype)
        # Log steps only (a host flag): the BF16 GEMM of the same operands; the backward's
        # shadows need x_hp and w_hp, kept only then.
        shadow_on = scaling is not None and slot is not None and slot.armed
        if shadow_on:
            shadow.record(slot, shadow.FPROP, x2d, w_hp.t(), y, out_dtype, bias)
        # The backward contracts x over the tokens (wgrad) and w over N (dgrad): one scale per
        # tensor serves every usage; block scalings cast those copies from x and w again.
        same = scaling is None or scaling.per_tensor
        x_col = x_row if same else _operand(x2d, Role.INPUT, COLUMNWISE, parts, False, accs[WGRAD])
        w_col = w_row if same else _operand(w_hp, Role.WEIGHT, COLUMNWISE, parts, False, accs[DGRAD])
        ctx.save_for_backward(x_col.values, w_col.values, x_col.inv_scale, w_col.inv_scale)
        # Kept outside save_for_backward: telemetry's, not the GEMM's, so saved-tensor hooks
        # (memory accounting at the hardware path's width) never see them; likewise the
        # per-block scales of a promoting accumulator (one float per 128 values).
        ctx.shadow_hp = (x_hp.detach(), w_hp.detach()) if shadow_on else ()
        ctx.meta = (x_col._replace(values=None, inv_scale=None), w_col._replace(values=None, inv_scale=None))
        ctx.parts, ctx.record, ctx.out_dtype, ctx.same, ctx.shadow = parts, record, out_dtype, same, shadow_on
        ctx.accs = accs
        ctx.x_dtype, ctx.has_bias = x_hp.dtype, bias is not None
        return y.reshape(*x_hp.shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        x_q, w_q, x_inv, w_inv = ctx.saved_tensors
        x_col = ctx.meta[0]._replace(values=x_q, inv_scale=x_inv)
        w_col = ctx.meta[1]._replace(values=w_q, inv_scale=w_inv)
        hp, accs = ctx.shadow_hp, ctx.accs  # (x_hp, w_hp) on log steps only
        backend, slot = ctx.parts[2], ctx.parts[3]
        g2d = grad_out.reshape(-1, grad_out.shape[-1])  # (B*T, N)
        g_row = _operand(g2d, Role.GRAD_OUTPUT, ROWWISE, ctx.parts, ctx.record, accs[DGRAD])  # dgrad contracts N
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _gemm(backend, g_row, w_col, ctx.out_dtype, None, accs[DGRAD], slot, DGRAD)  # (B*T, K)
            if ctx.shadow:
                shadow.record(slot, shadow.DGRAD, g2d, hp[1], grad_x, ctx.out_dtype)
            grad_x = grad_x.reshape(*grad_out.shape[:-1], grad_x.shape[-1]).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            g_col = g_row if ctx.same else _operand(g2d, Role.GRAD_OUTPUT, COLUMNWISE, ctx.parts, False, accs[WGRAD])
            grad_w = _gemm(backend, _t(g_col), x_col, ctx.out_dtype, None, accs[WGRAD], slot, WGRAD)  # (N, K)
            if ctx.shadow:
                shadow.record(slot, shadow.WGRAD, g2d.t(), hp[0].reshape(-1, hp[0].shape[-1]), grad_w, ctx.out_dtype)
            grad_w = grad_w.to(ctx.w_dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = _bias_grad(g2d)
        return grad_x, grad_w, grad_b, None, None, None, None, None, None, None


def quantized_linear(
    x_hp: torch.Tensor,
    w_hp: torch.Tensor,
    bias: torch.Tensor | None,
    scaling: Scaling | None,
    state: ScalingState | None,
    backend,
    out_dtype: torch.dtype,
    record: bool,
    slot: TelemetrySlot | None = None,
    accumulators: tuple[Accumulator, Accumulator, Accumulator] | None = None,
) -> torch.Tensor:
    """``y = x @ w^T + b`` with both GEMM operands (and the gradient) in FP8, or in bf16.

    Args:
        x_hp: (..., K) input in any float dtype.
        w_hp: (N, K) weight (the float32 master copy), or an ``FP8Weight`` (FP8 primary
            weight: its codes and inverse scale are the operand; no cast, no amax recorded).
        bias: (N,) or None.
        scaling: the layer's scaling (``fp8.scaling``), or None for a BF16 GEMM (``backend``
            is then a ``RoundedBackend``).
        state: the layer's ScalingState under delayed scaling (scales read, amaxes
            recorded), else None.
        backend: quantizes the operands with given scales (``quantize``,
            ``quantize_blocks``) and runs the GEMMs (``gemm``), or rounds them (``round``).
        out_dtype: dtype of all three GEMM outputs (autocast's dtype when on, else x's).
        record: training: record amaxes and count NaN/inf casts; False (eval) leaves
            scaling state and fault counts alone.
        slot: the layer's TelemetrySlot; while armed, each cast's statistics go there.
        accumulators: the accumulator of fprop, dgrad and wgrad (``FP8Options.accumulator``);
            None: fp32 for all three (a BF16 GEMM, or the ideal model).
    """
    with torch.autocast(x_hp.device.type, enabled=False):
        return _QuantizedLinear.apply(x_hp, w_hp, bias, scaling, state, backend, out_dtype, record, slot, accumulators)
