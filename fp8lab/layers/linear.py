"""fp8lab.Linear: a drop-in nn.Linear whose GEMMs run in FP8 with delayed scaling.

Invariant: parameters are created float32 (master weights; a run without them converts
them to its training dtype, ``fp8lab.run.precision``); the layer owns the state its
scaling asks for (``self.fp8_state``: a ScalingState under DelayedScaling) and never
updates the scales itself: ``fp8lab.update_scales`` does, once per optimizer step. The backend is chosen per device by
``fp8lab.gemm.backends.select`` (the plan, whose reason ``fp8lab.describe`` shows), and
``forward`` is only: plan -> backend -> ``backend.forward(self, x)``.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from fp8lab.accumulation import describe_gemms
from fp8lab.gemm.backends import backend_for
from fp8lab.gemm.backends.base import ScalingView
from fp8lab.gemm.backends.select import DeviceFacts, Plan, TEFacts, probe_device, probe_te, select_backend
from fp8lab.gemm.exact import ROUNDED_DTYPES, gemm_path, rounded_gemm_path
from fp8lab.gemm.telemetry_slot import TelemetrySlot
from fp8lab.layers import choices
from fp8lab.layers.fp8_weight import load_fp8_weight, save_fp8_weight
from fp8lab.options import FP8Options, as_options
from fp8lab.quantize.weight import FP8Weight
from fp8lab.scaling.state import ScalingState

# Training forwards without an update_scales call after which a layer warns (once):
# enough for long gradient accumulation, few enough that stale scales are noticed early.
STALE_SCALE_FORWARDS = 256


class Linear(nn.Module):
    """``y = x @ W^T + b`` with FP8 GEMMs (forward E4M3, gradients E5M2 under "hybrid").

    Takes what ``nn.Linear`` takes and returns the same shapes: input ``(*, in_features)``
    with any number of leading dimensions (none, or a zero-size batch, too), output
    ``(*, out_features)``; ``in_features=0`` gives the bias (zeros without one), as
    nn.Linear does. The input must be a floating-point tensor (float32, bfloat16, float16,
    float64); an integer or bool tensor, a 0-dim tensor or a last dimension other than
    ``in_features`` raises ``RuntimeError``, as nn.Linear does. NaN propagates to the output
    as in nn.Linear; an inf in an FP8 GEMM's operand saturates to the format's largest value
    (the hardware's saturating cast) where nn.Linear gives inf; both are counted in the
    ``faults/`` telemetry, and the scales ignore NaN and keep their value on inf (DESIGN.md).

    Args:
        in_features: size of each input sample (an int >= 0).
        out_features: size of each output sample (an int >= 0).
        bias: learn an additive bias (a bool).
        fp8: the FP8 options: an ``FP8Options`` (scaling, backend, fallback, accumulation),
            a scaling recipe alone (``DelayedScaling(...)`` etc.: ``FP8Options(scaling=it)``)
            or None (``FP8Options()``); anything else, a backend name such as "emulated"
            included, raises TypeError.
        device: where parameters and scaling state are created.
        dtype: the parameters' dtype (default float32: master weights); one of float32,
            bfloat16, float16, float64.

    Attributes read by the backends (``fp8lab.gemm.backends.base``):
        fp8_state: what ``fp8.scaling.new_state`` made: a ScalingState (amax history and
            scales, saved in the state_dict) for DelayedScaling; None for a scaling
            without persistent state.
        telemetry: the TelemetrySlot the collector arms on log steps (cast statistics).
        te_handle: the Transformer Engine module when the plan is "te" (built by that
            backend at the first forward), else None; a plain attribute, not a
            submodule, so TE's pickled ``_extra_state`` never enters the state_dict.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        fp8: FP8Options | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        in_features, out_features = (
            choices.size("in_features", in_features, 0),
            choices.size("out_features", out_features, 0),
        )
        bias, device, dtype = choices.flag("bias", bias), choices.device(device), choices.dtype(dtype)
        self.in_features, self.out_features = in_features, out_features
        self.fp8 = as_options(fp8)
        self.keep_bf16_reason: str | None = None  # why a policy keeps it out of FP8 (None: it isn't)
        self.kept_precision = "bf16"  # the precision of its GEMMs while kept: the activations' one
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype)) if bias else None
        self.fp8_state = self.fp8.scaling.new_state(device)  # the scaling decides (None: stateless)
        self.telemetry = TelemetrySlot()
        self.te_handle = None  # an fp8lab.gemm.backends.te.TEHandle once TE runs this layer
        self._plans: dict[torch.device, Plan] = {}
        self._warned_stale = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation, so converted and fresh layers start alike."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias, -bound, bound)

    def plan(self, device: torch.device | None = None) -> Plan:
        """The backend this layer runs on ``device`` (default: its weight's) and why."""
        device = device if device is not None else self.weight.device
        plan = self._plans.get(device)
        if plan is None:
            plan = self.plan_for(probe_device(device), probe_te())
            if plan.backend == "emulated":  # name the exact GEMM path this machine uses and the accumulators
                backend = backend_for("emulated", device.type)
                accumulation = (
                    self._accumulation()
                    if backend.models_accumulation
                    else ("accumulation: fp32 (the tensor-core accumulator model runs on the CPU only)")
                )
                plan = Plan(plan.backend, f"{plan.reason}; {gemm_path(device.type).reason}; {accumulation}")
            elif plan.precision == "fp8":  # the hardware accumulates: say what it is asked for
                plan = Plan(plan.backend, f"{plan.reason}; {self._accumulation()}")
            elif plan.backend in ROUNDED_DTYPES:
                plan = Plan(plan.backend, f"{plan.reason}; {rounded_gemm_path(device.type, plan.backend).reason}")
            self._plans[device] = plan
        return plan

    def plan_for(self, device: DeviceFacts, te: TEFacts) -> Plan:
        """The plan on a device with these facts (pure: the policy first, then select_backend)."""
        if self.keep_bf16_reason is not None:
            return Plan(self.kept_precision, self.keep_bf16_reason)
        return select_backend(
            device=device,
            te=te,
            requested=self.fp8.backend,
            fallback=self.fp8.fallback,
            dims=(self.in_features, self.out_features),
            scaling=self.fp8.scaling,
            accumulation=self.fp8.accumulation,
        )

    def _accumulation(self) -> str:
        accs = [self.fp8.accumulator(gemm) for gemm in range(3)]
        setting = self.fp8.accumulation if isinstance(self.fp8.accumulation, str) else "custom"
        return f"accumulation ({setting}): {describe_gemms(accs)}"

    def gemm_weight(self) -> torch.Tensor:
        """The weight as the GEMM takes it, (out_features, in_features): ``self.weight``
        itself; a layer that stores it transposed (``convert_hf.Conv1DLinear``) overrides this."""
        return self.weight

    def keep_in_bf16(self, reason: str) -> None:
        """Run this layer's GEMM in BF16 from now on, recording why."""
        self.keep_out_of_fp8(reason, "bf16")

    def keep_out_of_fp8(self, reason: str, precision: str = "bf16") -> None:
        """Run this layer's GEMMs in ``precision`` ("bf16", "fp16" or "fp32": the precision
        of the activations around it) from now on, recording why."""
        if precision not in ROUNDED_DTYPES:
            raise ValueError(f"precision must be one of {tuple(ROUNDED_DTYPES)}, got {precision!r}")
        self.keep_bf16_reason, self.kept_precision = reason, precision
        self._plans.clear()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.in_features == 0:  # an empty sum: the bias (or zeros), as nn.Linear gives
            return F.linear(x, self.gemm_weight(), self.bias)
        backend = backend_for(self.plan(x.device).backend, x.device.type)
        return backend.forward(self, x)  # (..., in_features) -> (..., out_features)

    def _check_input(self, x) -> None:
        """nn.Linear's refusals, in words that name the layer's sizes (metadata only, no sync)."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"fp8lab.Linear: input must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in choices.FLOAT_DTYPES:
            raise RuntimeError(
                f"fp8lab.Linear: input must be a floating-point tensor ({', '.join(map(str, choices.FLOAT_DTYPES))}), "
                f"got {x.dtype} (nn.Linear refuses it too); convert it with x.float()"
            )
        if x.dim() == 0:
            raise RuntimeError("fp8lab.Linear: input must be at least 1-D (..., in_features), got a 0-dim tensor")
        if x.shape[-1] != self.in_features:
            raise RuntimeError(
                f"fp8lab.Linear: input shape {tuple(x.shape)} cannot be multiplied with the weight "
                f"({self.out_features}, {self.in_features}): its last dimension must be in_features={self.in_features}"
            )

    def scaling_view(self) -> ScalingView | None:
        """This layer's scaling as telemetry reads it, on its weight's device (a TE
        layer's is synced from TE first); None when its plan is BF16."""
        return backend_for(self.plan().backend, self.weight.device.type).scaling_view(self)

    def note_training_forward(self) -> None:
        """Count a training forward since the last update_scales; warn once when stale.
        Called by the backends whose scales ``fp8lab.update_scales`` updates."""
        state = self.fp8_state
        if not isinstance(state, ScalingState):  # no scales (NVFP4's state is a cast counter): nothing to go stale
            return
        state.forwards_since_update += 1
        if state.forwards_since_update > STALE_SCALE_FORWARDS and not self._warned_stale:
            self._warned_stale = True
            warnings.warn(
                f"an fp8lab layer ran {STALE_SCALE_FORWARDS} training forwards without "
                "fp8lab.update_scales(model); its FP8 scales are stale. Call "
                "update_scales(model) once after every optimizer.step().",
                RuntimeWarning,
                stacklevel=3,
            )

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if isinstance(self.weight, FP8Weight):  # its codes and scale: plain tensors (weights_only loads)
            save_fp8_weight(self.weight, destination, prefix + "weight")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, error_msgs):
        if not isinstance(self.weight, FP8Weight):
            return super()._load_from_state_dict(
                state_dict, prefix, local_metadata, strict, missing, unexpected, error_msgs
            )
        key = prefix + "weight"  # an FP8 primary weight loads its codes in place (never cast)
        load_fp8_weight(self.weight, state_dict, key, error_msgs)
        rest = {k: v for k, v in state_dict.items() if k not in (key, key + "_scale_inv")}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing, unexpected, error_msgs)
        if key in missing:
            missing.remove(key)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, backend={self.fp8.backend}, fallback={self.fp8.fallback}"
        )
