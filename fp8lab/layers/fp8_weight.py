"""FP8 primary weights: a Linear's weight stored as FP8 codes and their scale.

Transformer Engine's ``quantized_model_init`` (``pytorch/quantization.py``; the cast in
``module/base.py``, ``reset_parameters``): the parameter *is* a ``Float8Tensor``, its FP8
codes (``_data``) and ``_scale_inv``; the Linear's forward takes it as the FP8 weight
operand as it is (``module/linear.py``: a weight that is already a QuantizedTensor is not
cast again), and only an optimizer changes it, by casting a new high-precision value with
the quantizer's scale of that moment (``quantize_``; for delayed scaling the cast also
records the value's amax into the history's current row).

Invariant: a converted layer's ``weight`` is an ``FP8Weight`` (``fp8lab.quantize.weight``)
that only ``cast_into`` changes; ``weight_scale`` is the one place the scale of a cast is
chosen; the state dict holds the codes under ``<layer>.weight`` and ``<layer>.weight_scale_inv``.
"""

from __future__ import annotations

import torch
from torch import nn

from fp8lab.formats import Role
from fp8lab.quantize.tensor import cast_to_fp8
from fp8lab.quantize.weight import FP8Weight
from fp8lab.scaling.delayed import compute_scale

# Run-config values of ``variants.<v>.weights``: high-precision parameters (fp32, or the
# activations' dtype without master weights), FP8 codes alone, FP8 codes + an fp32 master copy.
WEIGHT_SETTINGS = ("hp", "fp8", "fp8-master")
SCALINGS = ("delayed", "current")  # per-tensor scalings whose weight scale is one fp32 number


def weight_amaxes(w_hp: torch.Tensor) -> torch.Tensor:
    """(raw amax, TE's amax) of a weight, as ``fp8lab.quantize.tensor.amaxes_of`` defines them
    (TE's: NaN elements ignored, inf counted), with no host read on any device (the checkpoint
    size preflight builds runs under FakeTensorMode, where a data-dependent branch cannot run)."""
    magnitude = w_hp.abs()
    return torch.stack([magnitude.amax(), torch.where(magnitude.isnan(), 0.0, magnitude).amax()]).float()


def weight_scale(layer, w_hp: torch.Tensor) -> torch.Tensor:
    """The scale the next cast of ``layer``'s weight uses: under delayed scaling the state's
    current weight scale (TE: the quantizer's ``scale``, from the amax history), under current
    scaling the one ``w_hp``'s own amax gives (TE's current-scaling quantizer)."""
    scaling, fmt = layer.fp8.scaling, layer.fp8.scaling.format_for(Role.WEIGHT)
    if scaling.name == "delayed":
        return layer.fp8_state.scale[Role.WEIGHT]
    return scaling.scale(weight_amaxes(w_hp)[1], fmt)


def cast_into(layer, w_hp: torch.Tensor, record: bool = True) -> torch.Tensor:
    """Cast ``w_hp`` (fp32) into ``layer.weight`` (an FP8Weight) with ``weight_scale``;
    under delayed scaling, with ``record``, its amax goes into the history's row 0 (TE's
    cast kernel writes the amax of what it casts). Codes and scale_inv change in place;
    returns the scale used."""
    weight, fmt = layer.weight, layer.fp8.scaling.format_for(Role.WEIGHT)
    scale = weight_scale(layer, w_hp)
    if record and layer.fp8_state is not None:
        layer.fp8_state.record_amax(Role.WEIGHT, weight_amaxes(w_hp))
    weight.codes.copy_(cast_to_fp8(w_hp, scale, fmt))
    weight.scale_inv.copy_(scale.reciprocal())
    return scale


def convertible(layer) -> str | None:
    """Why ``layer`` cannot hold FP8 primary weights, or None when it can: an FP8 plan on
    fp8lab's own GEMMs with a per-tensor scaling of ``SCALINGS``, and a weight of its own."""
    plan = layer.plan()
    if plan.precision != "fp8" or plan.backend not in ("emulated", "scaled_mm"):
        return f"its GEMMs run {plan.precision} on {plan.backend}"
    if layer.weight.numel() == 0:
        return "its weight has no elements"
    if layer.fp8.scaling.name not in SCALINGS:
        return f"{layer.fp8.scaling.name} scaling has no single weight scale"
    return None


@torch.no_grad()
def to_fp8_weights(model: nn.Module) -> dict[str, nn.Module]:
    """Replace the weight of every Linear of ``model`` that ``convertible`` accepts, and that
    no other module shares (a tied LM head), by an ``FP8Weight``; returns them by name.

    The first cast departs from TE on purpose: TE casts the initial weight with its
    quantizer's initial scale (1.0, far too small for weights of ~1/sqrt(fan_in)); here the
    scale is the one the initial weight's own amax gives, ``fp8_max / amax`` (delayed
    scaling: written into the state's weight scale and the amax into row 0, as if its first
    update had run), so every variant starts from the same weights up to one E4M3 rounding.
    """
    from fp8lab.layers.linear import Linear  # the layer module imports this one

    counts: dict[int, int] = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        counts[id(p)] = counts.get(id(p), 0) + 1
    converted = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, Linear) or convertible(layer) is not None or counts[id(layer.weight)] > 1:
            continue
        if type(layer).gemm_weight is not Linear.gemm_weight:  # stored transposed (Conv1DLinear): not handled
            continue
        w_hp = layer.weight.detach().float()
        fmt = layer.fp8.scaling.format_for(Role.WEIGHT)
        if layer.fp8_state is not None:  # delayed: the scale its first update would give
            state = layer.fp8_state
            amax = weight_amaxes(w_hp)[1]
            state.scale[Role.WEIGHT] = compute_scale(amax, state.scale[Role.WEIGHT], fmt.max, layer.fp8.scaling.margin)
        codes = torch.empty(w_hp.shape, dtype=fmt.dtype, device=w_hp.device)
        layer.weight = nn.Parameter(FP8Weight(codes, torch.ones((), device=w_hp.device)))
        cast_into(layer, w_hp)
        converted[name] = layer
    return converted


def save_fp8_weight(weight: FP8Weight, destination: dict, key: str) -> None:
    """State dict entries of an FP8 weight: ``<key>`` its codes, ``<key>_scale_inv``."""
    destination[key] = weight.codes.detach()
    destination[key + "_scale_inv"] = weight.scale_inv.detach()


def load_fp8_weight(weight: FP8Weight, state_dict: dict, key: str, error_msgs: list) -> None:
    """Load what ``save_fp8_weight`` wrote into ``weight`` in place (codes must be FP8 codes
    of the same shape and format: a high-precision checkpoint is refused, not cast)."""
    codes, scale_inv = state_dict.get(key), state_dict.get(key + "_scale_inv")
    if codes is None or scale_inv is None:
        error_msgs.append(f"{key}: an FP8 primary weight needs {key} (codes) and {key}_scale_inv")
    elif codes.dtype != weight.codes.dtype or codes.shape != weight.codes.shape:
        error_msgs.append(
            f"{key}: expected FP8 codes {weight.codes.dtype} {tuple(weight.codes.shape)}, "
            f"got {codes.dtype} {tuple(codes.shape)}"
        )
    else:
        weight.codes.copy_(codes)
        weight.scale_inv.copy_(scale_inv)
