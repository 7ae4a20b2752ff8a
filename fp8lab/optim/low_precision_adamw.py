"""AdamW whose moments are stored in FP8 or FP16 between steps (FP8-LM / MS-AMP O2 style).

Invariant: the arithmetic of a step is torch.optim.AdamW's (decoupled weight decay, the
same op order), done in fp32 on the moments *dequantized* from their stored form; the
parameter update uses the fp32 moments of this step, and only then are the moments
quantized for storage (torchao ``single_param_adam``: "keep high precision copy for param
update"). Parameters (the master weights) stay fp32. Nothing on a step copies to the host:
the step counter, the bias corrections and ``found_inf`` stay on the device.

The storage of one moment (``quantize_moment``), torchao's ``OptimStateFp8`` definition
(torchao/optim/subclass_fp8.py, ``quantize_fp8``) applied to any target format:

    blocks   the tensor flattened, cut into blocks of ``block_size`` elements (the last one
             may be shorter); ``block_size=None``: one block, a per-tensor scale (FP8-LM)
    amax     max |x| over the block, in fp32
    scale    max(amax, 1e-12) / fmax        (fp32; fmax 448 for E4M3, 65504 for FP16)
    codes    (x / scale).clamp(-fmax, fmax).to(dtype): round to nearest even, saturating
             (the clamp only catches x / scale rounding above fmax); a zero stays zero
    value    codes.float() * scale          (dequantized, fp32)

A value of magnitude at most ``scale * 2**-10`` (half E4M3's smallest subnormal 2**-9; the
tie rounds to even, zero) or ``scale * 2**-25`` (FP16) is stored as zero: that is the
underflow the telemetry counts. A block of zeros
gets scale 1e-12 / fmax and stays zero. Non-finite moments are not defined here: steps with
non-finite gradients are skipped through ``found_inf`` (the runner sets it).

FP8-LM (arXiv 2310.18313) and MS-AMP's ``LBAdamW`` (O2) store the first moment
in FP8 E4M3 with a per-tensor scale and the second in FP16; torchao's ``AdamWFp8`` stores
both in E4M3 with blocks of 256. Here FP16 storage carries a scale too (same definition),
so small second moments use FP16's whole range instead of flushing below 2**-24 (whether
MS-AMP scales its FP16 moment the same way was not checked against its source).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# What a moment may be stored as, and the torch dtype of its codes.
MOMENT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}
SCALE_FLOOR = 1e-12  # torchao's clip of amax: a block of zeros gets a finite scale

# Named settings a run config chooses from (variants.<v>.optimizer_state); "fp32" is
# torch.optim.AdamW itself in a run, not this class.
OPTIMIZER_STATES = {
    "fp32": {"exp_avg_dtype": "fp32", "exp_avg_sq_dtype": "fp32", "block_size": None},
    "fp8-lm": {"exp_avg_dtype": "fp8", "exp_avg_sq_dtype": "fp16", "block_size": None},
    "fp8-block": {"exp_avg_dtype": "fp8", "exp_avg_sq_dtype": "fp8", "block_size": 256},
}


def _blocks(x: torch.Tensor, block_size: int | None) -> torch.Tensor:
    """``x`` flattened and zero-padded to whole blocks: (blocks, block_size)."""
    flat = x.reshape(-1)
    size = flat.numel() if block_size is None else block_size
    count = -(-flat.numel() // size)
    return F.pad(flat, (0, count * size - flat.numel())).view(count, size)


def quantize_moment(x_fp32: torch.Tensor, dtype: str, block_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The stored form of one fp32 moment: (codes shaped like ``x_fp32``, fp32 scales [blocks]).

    Args:
        x_fp32: the moment in fp32.
        dtype: "fp16" or "fp8" (E4M3); see the module docstring for the definition.
        block_size: elements per scale, or None for one scale per tensor.
    """
    target = MOMENT_DTYPES[dtype]
    fmax = torch.finfo(target).max
    blocks = _blocks(x_fp32, block_size)  # (blocks, block_size)
    scale = blocks.abs().amax(dim=-1).clamp(min=SCALE_FLOOR) / fmax  # (blocks,)
    codes = (blocks / scale[:, None]).clamp(-fmax, fmax).to(target).reshape(-1)
    if codes.numel() != x_fp32.numel():  # a copy: a view would keep the padding's storage alive
        codes = codes[: x_fp32.numel()].clone()
    return codes.view(x_fp32.shape), scale


def dequantize_moment(codes: torch.Tensor, scale: torch.Tensor, block_size: int | None) -> torch.Tensor:
    """``codes.float() * scale`` per block, shaped like ``codes`` (fp32)."""
    blocks = _blocks(codes.float(), block_size)
    return (blocks * scale[:, None]).reshape(-1)[: codes.numel()].view(codes.shape)


def _check_options(exp_avg_dtype, exp_avg_sq_dtype, block_size) -> None:
    if exp_avg_dtype not in ("fp32", "fp8"):
        raise ValueError(f"exp_avg_dtype must be one of ('fp32', 'fp8'), got {exp_avg_dtype!r}")
    if exp_avg_sq_dtype not in ("fp32", "fp16", "fp8"):
        raise ValueError(f"exp_avg_sq_dtype must be one of ('fp32', 'fp16', 'fp8'), got {exp_avg_sq_dtype!r}")
    if block_size is not None and (type(block_size) is not int or block_size < 1):
        raise ValueError(f"block_size must be None (one scale per tensor) or an int >= 1, got {block_size!r}")


class LowPrecisionAdamW(torch.optim.Optimizer):
    """AdamW (torch.optim.AdamW's math and defaults) with FP8/FP16 moments between steps.

    State per parameter: ``step`` (fp32, 0-dim), ``exp_avg`` and ``exp_avg_sq`` (their
    codes, in the stored dtype), and ``exp_avg_scale`` / ``exp_avg_sq_scale`` (fp32
    [blocks]) for a moment not stored in fp32. All plain tensors: ``state_dict`` saves and
    loads with ``torch.load(weights_only=True)``, and ``load_state_dict`` keeps the stored
    dtypes (torch's would cast them to the parameter's).

    Like the fused torch AdamW, ``step`` reads two optional attributes: ``grad_scale`` (a
    0-dim tensor every gradient is divided by, in fp32) and ``found_inf`` (0-dim; 1 skips
    the step: parameters, moments and step counter unchanged). With ``track_underflow``
    True, a step also counts per parameter the moment values that were nonzero in fp32 and
    are stored as zero (``underflow[param]``: int64 [2], exp_avg then exp_avg_sq, on the
    device); the runner sets it on log steps only.

    Args:
        params: parameters (fp32) or parameter groups.
        lr, betas, eps, weight_decay: as torch.optim.AdamW (same defaults).
        exp_avg_dtype: "fp32" or "fp8" (E4M3).
        exp_avg_sq_dtype: "fp32", "fp16" or "fp8" (E4M3; the sign bit is unused).
        block_size: elements per scale, or None (default) for one scale per tensor.
    """

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        exp_avg_dtype: str = "fp8",
        exp_avg_sq_dtype: str = "fp16",
        block_size: int | None = None,
    ):
        _check_options(exp_avg_dtype, exp_avg_sq_dtype, block_size)
        if not (isinstance(lr, float) and lr >= 0):
            raise ValueError(f"lr must be a float >= 0, got {lr!r}")
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"betas must be two floats in [0, 1), got {betas!r}")
        if not eps >= 0:
            raise ValueError(f"eps must be >= 0, got {eps!r}")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            eps=eps,
            weight_decay=weight_decay,
            exp_avg_dtype=exp_avg_dtype,
            exp_avg_sq_dtype=exp_avg_sq_dtype,
            block_size=block_size,
        )
        super().__init__(params, defaults)
        for group in self.param_groups:
            _check_options(group["exp_avg_dtype"], group["exp_avg_sq_dtype"], group["block_size"])
            for p in group["params"]:
                if p.dtype != torch.float32:
                    raise ValueError(f"params must be fp32 (the master weights), got one of dtype {p.dtype}")
        self.track_underflow = False
        self.underflow: dict[torch.Tensor, torch.Tensor] = {}

    def _store(self, state: dict, name: str, x_fp32: torch.Tensor, dtype: str, block_size) -> None:
        if dtype == "fp32":
            state[name] = x_fp32
        else:
            state[name], state[f"{name}_scale"] = quantize_moment(x_fp32, dtype, block_size)

    def _load(self, state: dict, name: str, block_size) -> torch.Tensor:
        if f"{name}_scale" not in state:
            return state[name]
        return dequantize_moment(state[name], state[f"{name}_scale"], block_size)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = getattr(self, "grad_scale", None)
        found_inf = getattr(self, "found_inf", None)
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps, wd, block = group["lr"], group["eps"], group["weight_decay"], group["block_size"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    zeros = torch.zeros_like(p, memory_format=torch.preserve_format)
                    self._store(state, "exp_avg", zeros, group["exp_avg_dtype"], block)
                    self._store(state, "exp_avg_sq", zeros.clone(), group["exp_avg_sq_dtype"], block)
                grad = p.grad.float()
                if grad_scale is not None:
                    grad = grad / grad_scale
                step = state["step"] + (1 if found_inf is None else 1 - found_inf)
                # torch.optim.AdamW's single-tensor op order, on fp32 copies
                param = p.mul(1 - lr * wd)
                exp_avg = self._load(state, "exp_avg", block).clone().lerp_(grad, 1 - beta1)
                exp_avg_sq = self._load(state, "exp_avg_sq", block).clone().mul_(beta2)
                exp_avg_sq.addcmul_(grad, grad, value=1 - beta2)
                step64 = step.double()  # bias corrections in float64, as torch's Python floats
                step_size = lr / (1 - beta1**step64)
                bias_correction2_sqrt = (1 - beta2**step64) ** 0.5
                denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt.float()).add_(eps)
                param.add_(exp_avg * -step_size.float() / denom)
                new = {"step": step}
                self._store(new, "exp_avg", exp_avg, group["exp_avg_dtype"], block)
                self._store(new, "exp_avg_sq", exp_avg_sq, group["exp_avg_sq_dtype"], block)
                if self.track_underflow:
                    self.underflow[p] = torch.stack(
                        [
                            ((exp_avg != 0) & (new["exp_avg"].float() == 0)).sum(),
                            ((exp_avg_sq != 0) & (new["exp_avg_sq"].float() == 0)).sum(),
                        ]
                    )
                if found_inf is not None:  # a skipped step keeps everything (no host sync)
                    skip = found_inf > 0
                    if self.track_underflow:  # and stored nothing: no underflow
                        self.underflow[p] = torch.where(skip, 0, self.underflow[p])
                    param = torch.where(skip, p, param)
                    new = {k: torch.where(skip, state[k], v) for k, v in new.items()}
                p.copy_(param)
                state.update(new)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but the moments keep their stored dtypes (codes, scales)."""
        super().load_state_dict(state_dict)
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for param_id, p in zip(ids, params):
            for key, value in state_dict["state"].get(param_id, {}).items():
                if isinstance(value, torch.Tensor):
                    self.state[p][key] = value.to(device=p.device, copy=True)
