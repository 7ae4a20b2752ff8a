"""convert: turn the nn.Linear layers of any model into fp8lab.Linear, in place.

transformers' ``Conv1D`` (GPT-2's transposed Linear) converts too, into a
``convert_hf.Conv1DLinear`` that keeps its (in, out) weight: the state_dict keys and
shapes of the original, plus the scaling state.

Invariant: a converted layer computes the same function with the same Parameter
objects (weight ties and optimizer references survive; nothing is copied and the
global RNG is not touched); a layer that is not converted keeps working as before and
carries a reason (``SKIP_REASON_ATTR``) that ``fp8lab.describe`` shows. Whether a
converted layer runs FP8 is its backend plan's business: a layer with dimensions a
hardware FP8 GEMM cannot take is converted anyway and runs its fallback, with the
reason in its plan; conversion never stops at an odd layer.

Layers left as they are, with their reason:
- ``nn.MultiheadAttention.out_proj`` (a ``NonDynamicallyQuantizableLinear``):
  ``F.multi_head_attention_forward`` reads ``out_proj.weight`` and ``.bias`` directly
  and never calls its forward, so an fp8lab.Linear there would run in BF16/FP32 while
  claiming FP8 (its QKV projection is a bare Parameter, not a Linear, for the same
  reason);
- subclasses of nn.Linear that override ``forward``, parametrized layers, and lazy
  layers not yet materialised.

torch's fused ``TransformerEncoderLayer`` inference fast path (eval mode, no grad, no
autocast) reads ``linear1.weight``/``linear2.weight`` directly too; converting those
layers switches that fast path off (``activation_relu_or_gelu = 0`` on the layer and
``use_nested_tensor = False`` on its encoder, both read only by the fast-path checks),
so the converted GEMMs really run.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

from fp8lab.layers.convert_hf import Conv1DLinear, conv1d_skip_reason, is_hf_conv1d
from fp8lab.layers.linear import Linear
from fp8lab.layers.policy import PrecisionPolicy
from fp8lab.options import FP8Options, as_options

SKIP_REASON_ATTR = "fp8lab_skip_reason"


def _skip_reason(parent: nn.Module | None, name: str, linear: nn.Linear) -> str | None:
    """Why ``linear`` (child ``name`` of ``parent``) must stay a torch layer, or None."""
    if isinstance(parent, nn.MultiheadAttention) and name == "out_proj":
        return (
            "not converted: nn.MultiheadAttention reads out_proj.weight directly "
            "(F.multi_head_attention_forward), so its forward never runs"
        )
    if parametrize.is_parametrized(linear):
        return "not converted: parametrized layer (its weight is computed, not stored)"
    if isinstance(linear.weight, nn.parameter.UninitializedParameter):
        return "not converted: lazy layer not materialised yet (run one forward first)"
    if type(linear).forward is not nn.Linear.forward:
        return f"not converted: {type(linear).__qualname__} overrides nn.Linear.forward"
    return None


def _to_fp8lab(linear: nn.Linear, fp8: FP8Options) -> Linear:
    """An fp8lab.Linear that holds ``linear``'s own weight and bias Parameters."""
    device = linear.weight.device
    # Built on the meta device so that no throw-away init runs (and no RNG is consumed).
    new = Linear(linear.in_features, linear.out_features, linear.bias is not None, fp8=fp8, device="meta")
    new.weight = linear.weight
    new.bias = linear.bias
    new.fp8_state = fp8.scaling.new_state(device)  # on the layer's device, not meta
    new.train(linear.training)
    return new


def _reason(parent: nn.Module | None, name: str, layer: nn.Module) -> str | None:
    return conv1d_skip_reason(layer) if is_hf_conv1d(layer) else _skip_reason(parent, name, layer)


def _converted(layer: nn.Module, fp8: FP8Options) -> Linear:
    return Conv1DLinear.from_conv1d(layer, fp8) if is_hf_conv1d(layer) else _to_fp8lab(layer, fp8)


def _disable_fused_fast_paths(model: nn.Module) -> None:
    """Stop torch's fused encoder kernels from reading converted layers' weights."""
    for module in model.modules():
        if isinstance(module, nn.TransformerEncoderLayer) and (
            isinstance(module.linear1, Linear) or isinstance(module.linear2, Linear)
        ):
            module.activation_relu_or_gelu = 0
        if isinstance(module, nn.TransformerEncoder) and any(isinstance(m, Linear) for m in module.modules()):
            module.use_nested_tensor = False


def convert(
    model: nn.Module,
    *,
    fp8: FP8Options | None = None,
    policy: PrecisionPolicy | None = None,
) -> nn.Module:
    """Replace every convertible ``nn.Linear`` (and transformers ``Conv1D``) in ``model``
    by an ``fp8lab.Linear``.

    Returns ``model`` (or the new layer when ``model`` itself is an nn.Linear). Layers
    already fp8lab are left alone; see the module docstring for those skipped.

    Args:
        model: any module.
        fp8: the FP8 options of every converted layer, as ``fp8lab.Linear`` takes them (an
            FP8Options, a scaling recipe alone, or None: ``FP8Options()``); anything else
            raises TypeError before any layer is touched.
        policy: applied to every fp8lab layer of ``model`` afterwards (default:
            ``PrecisionPolicy()``, which keeps a layer named ``lm_head`` in BF16).
    """
    fp8 = as_options(fp8)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if policy is not None and not isinstance(policy, PrecisionPolicy):
        raise TypeError(f"policy must be an fp8lab.PrecisionPolicy or None, got {policy!r}")
    policy = policy if policy is not None else PrecisionPolicy()
    if not isinstance(model, Linear) and (isinstance(model, nn.Linear) or is_hf_conv1d(model)):
        reason = _reason(None, "", model)
        if reason is not None:
            setattr(model, SKIP_REASON_ATTR, reason)
            return model
        return policy.apply(_converted(model, fp8))

    converted: dict[int, Linear] = {}  # a layer registered twice is converted once
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):  # named_children() skips repeats
            if isinstance(child, Linear) or not (isinstance(child, nn.Linear) or is_hf_conv1d(child)):
                continue
            reason = _reason(parent, name, child)
            if reason is not None:
                setattr(child, SKIP_REASON_ATTR, reason)
                continue
            if id(child) not in converted:
                converted[id(child)] = _converted(child, fp8)
            setattr(parent, name, converted[id(child)])
    _disable_fused_fast_paths(model)
    return policy.apply(model)
