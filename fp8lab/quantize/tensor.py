"""Casting high-precision tensors into FP8 with a given scale.

Invariant: casting takes the scale as an input and never computes one (delayed scaling
lives in ``fp8lab.scaling``). Every cast clamps to +-fp8_max before
rounding to nearest even, so finite input never becomes NaN (older torch turns E4M3
overflow into NaN). The product ``x * scale`` is formed in float32, as TE's kernels do.

Two outputs of the same rounding:
- ``cast_to_fp8`` returns a real float8 tensor (for ``torch._scaled_mm`` on CUDA);
- ``cast_to_fp8_grid`` returns the same values held in bfloat16, which is exact (bf16 has
  more exponent and mantissa bits than either FP8 format). It rounds with float32
  arithmetic instead of the float8 dtype because torch's CPU float8 -> bf16 conversion is
  scalar code (7-12 ms for a 2048x3072 tensor on the quiet 2-core dev VM, 38 ms under load). The
  values equal ``cast_to_fp8(...).to(bfloat16)`` exactly; only the sign of a value that
  rounds to zero may differ (+0 for -0), which no GEMM can observe.
"""

from __future__ import annotations

import struct
import warnings
from collections.abc import Callable

import torch

from fp8lab.formats import FP8Format

_EXPONENT_MASK = 0x7F800000

# Elements per chunk of a CPU grid cast. The cast is 8 memory-bound passes (7 for float32
# input); done on 2^18 values at a time its two 1 MiB work buffers stay in cache between
# passes and are reused by malloc. Casting a whole 2048x3072 tensor at once streams every
# pass through DRAM and allocates two fresh 25 MB temporaries, which glibc keeps handing
# back to the OS, so each step page-faults them in again (4 KiB at a time, slow on a VM).
# Measured on the 2-core dev VM (MLP 768->3072->768 fwd+bwd, 2048 tokens, interleaved),
# step time over BF16 step time: previous whole-tensor cast 1.41-1.49 (15-20k page faults
# per step); chunks of 2^17: 1.22-1.25; 2^18: 1.16-1.21 (no faults); 2^19: 1.17-1.28;
# 2^20: 1.23-1.31 (5-11k faults per step in some runs). Cost: 8 tensor ops per chunk.
CPU_CHUNK = 1 << 18

# The statistics of one cast, in the order ``cast_stats`` returns them.
STAT_NAMES = ("overflow_pct", "underflow_pct", "sqnr_db")


def _float32_bits(value: float) -> int:
    return struct.unpack("<i", struct.pack("<f", value))[0]


def _scale_clamp_into(x_hp: torch.Tensor, scale: torch.Tensor, fmt: FP8Format, out: torch.Tensor) -> torch.Tensor:
    """``out = clamp(x * scale, -max, max)`` in float32; ``x_hp`` is not modified."""
    if x_hp.dtype == torch.float32:
        torch.mul(x_hp, scale, out=out)
    else:
        # Exact upcast first: torch.mul(bf16, fp32 scalar, out=fp32) would compute in bf16
        # (and its mixed-dtype loop is not vectorised).
        out.copy_(x_hp).mul_(scale)
    return out.clamp_(-fmt.max, fmt.max)


def _scaled_clamped_fp32(x_hp: torch.Tensor, scale: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
    """A new float32 tensor ``clamp(x * scale, -max, max)``; ``x_hp`` is not modified."""
    out = torch.empty(x_hp.shape, dtype=torch.float32, device=x_hp.device)
    return _scale_clamp_into(x_hp, scale, fmt, out)


def _cast_math(x_hp: torch.Tensor, scale: torch.Tensor, fp8_max: float, dtype: torch.dtype) -> torch.Tensor:
    """``clamp(x * scale, -max, max)`` in float32, rounded to nearest even into ``dtype``
    (a float8 dtype, or float8 and then bf16/fp32, exact). Compiled into one kernel on CUDA."""
    return (x_hp.float() * scale).clamp(-fp8_max, fp8_max).to(dtype)


def _amaxes_math(x: torch.Tensor) -> torch.Tensor:
    """(max|x| with NaN propagating, max|x| with NaN ignored); compiled into one pass on CUDA."""
    magnitude = x.float().abs()
    return torch.stack([magnitude.amax(), torch.where(magnitude.isnan(), 0.0, magnitude).amax()])


def _amaxes_rows_math(rows: torch.Tensor) -> torch.Tensor:
    """``_amaxes_math`` of a tensor viewed as (R, W) rows: each row's maxima, then the rows'.
    The same values (a max is exact in any order); compiled, the first stage is one kernel
    over many thread blocks. Inductor compiled the 1-D form's full reduction, with a dynamic
    size, into a kernel that took 7.8 ms for a 8192x8192 bf16 tensor on an H200 (87% of an FP8
    TransformerBlock step: ``benchmarks/gpu_profile_step.py``), where reading it takes ~40 us."""
    magnitude = rows.float().abs()
    raw = magnitude.amax(dim=1).amax()
    return torch.stack([raw, torch.where(magnitude.isnan(), 0.0, magnitude).amax(dim=1).amax()])


def _compile(fn, backend: str = "inductor"):
    """``fn`` fused by torch.compile (Triton) for CUDA tensors, or eager ``fn`` where
    compiling is impossible (no Triton, a torch without inductor): the same values.

    ``fn`` takes a 1-D tensor first (``_flat``): one graph per input dtype and format, not per
    rank and layout too, which had taken a GPT's casts past dynamo's recompile limit (8 graphs
    per function), and with ``fullgraph=True`` dynamo then fails every later call. A call
    that still meets the limit runs eager, that call alone; any other compiler failure turns
    compiling off for good. Both warn once.
    """
    compiled = None
    broken = False
    warned = set()

    def run(*args):
        nonlocal compiled, broken
        if not broken:
            try:
                if compiled is None:
                    compiled = torch.compile(fn, dynamic=True, fullgraph=True, backend=backend)
                return compiled(*args)
            except Exception as err:  # noqa: BLE001 - any compiler failure: fall back, loudly
                limit = "RecompileLimit" in type(err).__name__ or "CacheLimit" in type(err).__name__
                broken = broken or not limit
                if type(err).__name__ not in warned:
                    warned.add(type(err).__name__)
                    what = "this call runs eager" if limit else "using eager CUDA kernels"
                    warnings.warn(
                        f"fp8lab: torch.compile of {fn.__name__} failed ({type(err).__name__}: "
                        f"{str(err)[:200]}); {what}",
                        RuntimeWarning,
                        stacklevel=2,
                    )
        return fn(*args)

    return run


def _flat(x: torch.Tensor) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """``x`` as a 1-D tensor without a copy where its layout allows (contiguous, or the
    transpose of a contiguous matrix), and the function that puts an elementwise result of it
    back into ``x``'s shape and layout. Detached: a view would make dynamo guard on the sizes
    of its base, one graph per base shape again (the casts need no autograd: they run inside
    the layers' autograd Functions)."""
    if x.is_contiguous():
        return x.view(-1).detach(), lambda y: y.view(x.shape)
    if x.dim() == 2 and x.t().is_contiguous():
        return x.t().reshape(-1).detach(), lambda y: y.view(x.t().shape).t()
    return x.reshape(-1).detach(), lambda y: y.view(x.shape)


_cast_compiled = _compile(_cast_math)
_amaxes_compiled = _compile(_amaxes_math)
_amaxes_rows_compiled = _compile(_amaxes_rows_math)
AMAX_ROW = 1024  # the row width of the two-stage CUDA amax
AMAX_ONE_STAGE = 1 << 16  # below this many elements, one reduction (one thread block is enough)


def _cast_cuda(x_hp: torch.Tensor, scale: torch.Tensor, fp8_max: float, dtype: torch.dtype) -> torch.Tensor:
    flat, restore = _flat(x_hp)
    return restore(_cast_compiled(flat, scale.detach(), fp8_max, dtype))  # a row of a state's scales: no base


def _amaxes_cuda(x: torch.Tensor) -> torch.Tensor:
    """Small tensors in one reduction; others as rows of AMAX_ROW (``_amaxes_rows_math``), a
    ragged tail (under AMAX_ROW elements) reduced on its own and combined (``maximum``
    propagates NaN into [0]; [1] never holds one)."""
    flat = _flat(x)[0]
    n = flat.numel()
    if n < AMAX_ONE_STAGE:
        return _amaxes_compiled(flat)
    body = n - n % AMAX_ROW
    amaxes = _amaxes_rows_compiled(flat[:body].view(-1, AMAX_ROW).detach())
    if body == n:
        return amaxes
    return torch.maximum(amaxes, _amaxes_compiled(flat[body:].detach()))


def cast_to_fp8(x_hp: torch.Tensor, scale: torch.Tensor, fmt: FP8Format) -> torch.Tensor:
    """``clamp(x * scale, -max, max)`` rounded to nearest even into ``fmt.dtype``."""
    if x_hp.device.type == "cuda":
        return _cast_cuda(x_hp, scale, fmt.max, fmt.dtype)
    return _scaled_clamped_fp32(x_hp, scale, fmt).to(fmt.dtype)


def round_fp32_to_fp8_grid_(v: torch.Tensor, fmt: FP8Format, magic: torch.Tensor | None = None) -> torch.Tensor:
    """Round float32 values already inside +-fmt.max onto the FP8 grid, in place.

    Magic-number rounding: for |v| in [2^e, 2^(e+1)) the FP8 grid spacing is
    2^(max(e, e_min) - mantissa_bits). Adding M = 1.5 * 2^(max(e, e_min) + 23 - mbits)
    puts v + M in a binade whose float32 spacing is exactly that, so IEEE addition rounds
    v to nearest even on the FP8 grid; subtracting M is then exact. Subnormals come out
    right because e is clamped to the smallest normal exponent.

    Args:
        v: contiguous float32 values, rounded in place and returned.
        fmt: the FP8 format whose grid to round to.
        magic: optional int32 scratch buffer shaped like ``v`` (saves an allocation).
    """
    # 2^max(floor(log2|v|), e_min) as float32 bits: |v|'s exponent field, clamped as an
    # integer (bits of non-negative floats order like the floats).
    magic = torch.bitwise_and(v.view(torch.int32), _EXPONENT_MASK, out=magic)
    magic = magic.clamp_(min=_float32_bits(fmt.min_normal)).view(torch.float32)
    # M = alpha * magic with alpha = 1.5 * 2^(23 - mbits): the product is exact, so
    # add_/sub_ with alpha round exactly as v + M - M would, without a pass to form M.
    alpha = 1.5 * 2.0 ** (23 - fmt.mantissa_bits)
    return v.add_(magic, alpha=alpha).sub_(magic, alpha=alpha)


def cast_to_fp8_grid(
    x_hp: torch.Tensor, scale: torch.Tensor, fmt: FP8Format, *, dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """The values of ``cast_to_fp8(x_hp, scale, fmt)`` as an exact ``dtype`` tensor.

    Args:
        x_hp: any float tensor.
        scale: 0-dim float32 scale (values are multiplied by it, then clamped and rounded).
        fmt: the FP8 format.
        dtype: bfloat16 or float32; both hold every FP8 value exactly.
    """
    if x_hp.device.type == "cuda":  # one fused kernel: the real float8 cast, then exact widening
        return _cast_cuda(x_hp, scale, fmt.max, fmt.dtype).to(dtype)
    out = torch.empty(x_hp.shape, dtype=dtype, device=x_hp.device)
    x_flat, out_flat = x_hp.reshape(-1), out.view(-1)
    n = x_flat.numel()
    chunk = CPU_CHUNK if x_hp.device.type == "cpu" else max(n, 1)  # other devices: one pass each
    # A float32 output is its own work buffer (no copy at the end of each chunk).
    v_buf = None if dtype == torch.float32 else torch.empty(min(n, chunk), dtype=torch.float32, device=x_hp.device)
    magic_buf = torch.empty(min(n, chunk), dtype=torch.int32, device=x_hp.device)
    for x_part, out_part in zip(x_flat.split(chunk), out_flat.split(chunk)):
        k = x_part.numel()
        magic = magic_buf if k == magic_buf.numel() else magic_buf[:k]
        v = out_part if v_buf is None else (v_buf if k == v_buf.numel() else v_buf[:k])
        round_fp32_to_fp8_grid_(_scale_clamp_into(x_part, scale, fmt, v), fmt, magic)
        if v is not out_part:
            out_part.copy_(v)
    return out


def _nan_ignoring_amax(x: torch.Tensor) -> torch.Tensor:
    """max|x| over the non-NaN elements (0 if there are none), in CPU_CHUNK slices on CPU."""
    x_flat = x.reshape(-1)
    chunk = CPU_CHUNK if x.device.type == "cpu" else max(x_flat.numel(), 1)
    amax = torch.zeros((), dtype=torch.float32, device=x.device)
    for part in x_flat.split(chunk):
        if part.numel():
            magnitude = part.abs().float().nan_to_num_(nan=0.0, posinf=float("inf"))
            torch.maximum(amax, magnitude.amax(), out=amax)
    return amax


def amaxes_of(x: torch.Tensor) -> torch.Tensor:
    """(raw amax, Transformer Engine's amax) of ``x``: a float32 tensor of 2.

    [0] is max|x| with NaN propagating, so it is non-finite iff ``x`` holds NaN or inf
    (one ``aminmax`` pass); [1] is what TE's cast kernels take (``fmaxf(fabsf(x), amax)``):
    NaN elements ignored, inf counted. [1] differs from [0] only when ``x`` holds NaN, so on
    CPU the NaN-ignoring pass runs only then: deciding reads [0] on the host, which for a
    CPU tensor is a load from host memory (no copy, no sync). On an accelerator both are
    always computed and selected on the device, so nothing is read.
    """
    if x.numel() == 0:
        return torch.zeros(2, dtype=torch.float32, device=x.device)
    if x.device.type == "cuda":  # both in one fused pass, nothing read on the host
        return _amaxes_cuda(x)
    lo, hi = torch.aminmax(x)
    raw = torch.maximum(-lo, hi).to(torch.float32)
    if x.device.type == "cpu":
        te = _nan_ignoring_amax(x) if torch.isnan(raw) else raw
    else:
        te = torch.where(torch.isnan(raw), _nan_ignoring_amax(x), raw)
    return torch.stack([raw, te])


def cast_stats(
    x_hp: torch.Tensor, x_fp8_values: torch.Tensor | None, scale: torch.Tensor, fmt: FP8Format
) -> torch.Tensor:
    """[overflow %, underflow %, SQNR dB] (``STAT_NAMES``) of one cast, on the tensor's device.

    overflow: elements with |x * scale| > fmt.max (clamped); underflow: non-zero elements
    that became zero; SQNR: 10*log10(|x|^2 / |x - dequant(x_fp8)|^2) in float32.
    ``x_fp8_values`` None: the statistics of ``cast_to_fp8(x_hp, scale, fmt)``, cast here
    chunk by chunk (bit-identical to passing that cast's values, without materialising it:
    the what-if statistics). Called only on telemetry steps. On CPU it runs over CPU_CHUNK
    slices, for the reason the cast does: whole-tensor float32 temporaries page-fault on
    every call (measured 9.4 ms for a 2048x512 bf16 tensor, against 3.6 ms of actual work).
    """
    x_flat = x_hp.reshape(-1)
    chunk = CPU_CHUNK if x_hp.device.type == "cpu" else max(x_flat.numel(), 1)
    q_parts = x_fp8_values.reshape(-1).split(chunk) if x_fp8_values is not None else None
    sums = torch.zeros(4, dtype=torch.float32, device=x_hp.device)  # overflow, underflow, signal, noise
    for i, x_part in enumerate(x_flat.split(chunk)):
        # In the scaled domain (x * scale against the FP8 values): SQNR is a ratio, so the
        # scale cancels, and no division by the scale is needed.
        xs = x_part.to(torch.float32, copy=True).mul_(scale)
        if q_parts is None:  # the cast itself: clamp, then round onto the grid (as cast_to_fp8_grid)
            q32 = round_fp32_to_fp8_grid_(xs.clamp(-fmt.max, fmt.max), fmt)
        else:
            q32 = q_parts[i].to(torch.float32, copy=True)  # float8 has no count_nonzero kernel
        nonzero_q = torch.count_nonzero(q32)
        err = q32.sub_(xs)
        sums += torch.stack(
            [
                torch.count_nonzero(xs.abs() > fmt.max).float(),
                (torch.count_nonzero(x_part) - nonzero_q).float(),  # 0 always stays 0
                torch.dot(xs, xs),
                torch.dot(err, err),
            ]
        )
    pct = sums[:2] * (100.0 / max(x_flat.numel(), 1))
    sqnr = 10.0 * torch.log10(sums[2] / sums[3].clamp_min(torch.finfo(torch.float32).tiny))
    return torch.cat([pct, sqnr[None]])
