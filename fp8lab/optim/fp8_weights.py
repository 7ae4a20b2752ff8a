"""FP8 primary weights stepped by an ordinary optimizer, with or without an fp32 master copy.

What Transformer Engine does after its optimizer (``pytorch/optimizers/fused_adam.py``):

- master weights (``FusedAdam(master_weights=True)``, ``multi_tensor_adam_fp8``): AdamW runs
  on an fp32 ``master_param`` kept in the optimizer state; the FP8 parameter is then cast
  from the new master with its quantizer's *current* scale (delayed scaling: the scale of
  the last update of the amax history; current scaling: the new value's own amax), the
  master's amax goes into the history's current row, and ``scale_inv`` becomes 1/scale;
- no master weights: TE's FusedAdam has no such path for FP8 parameters; a torch optimizer
  on a ``Float8Tensor`` gets what its in-place ops do: the update is applied to the
  *dequantized* weight and the result is cast back with the quantizer's scale, so an
  update smaller than half an FP8 step of the weight is lost.

Invariant: the inner optimizer (torch's fused AdamW or ``LowPrecisionAdamW``, unchanged)
sees, in place of each FP8 weight, an fp32 leaf of its own (the "stand-in"): the master copy,
or, without master weights, a leaf that holds the dequantized weight only from ``prepare``
to ``finish`` (between steps it is empty: the weight's bytes are its codes). ``prepare``
hands it the weight's gradient (the same tensor, no copy); ``finish`` casts it into the
weight (``fp8lab.layers.fp8_weight.cast_into``). A step skipped through ``found_inf`` keeps
codes and scales. On tracked steps (log steps) ``finish`` counts, per layer, the updates
lost to rounding: elements whose stand-in changed in the step but whose new FP8 code is the
code the value *before* the step gets with the same scale (so a scale that moved, which
regrids every element under delayed scaling, is not mistaken for an update that arrived;
with an unchanged scale this is "the stored FP8 weight did not change"). Nothing here
copies to the host.
"""

from __future__ import annotations

import torch
from torch import nn

from fp8lab.formats import Role
from fp8lab.layers.fp8_weight import cast_into, convertible, to_fp8_weights
from fp8lab.quantize.tensor import cast_to_fp8


class FP8WeightUpdate:
    """The stand-ins of a model's FP8 primary weights and the casts around each optimizer step.

    Args:
        layers: the Linears whose weight is an ``FP8Weight``, by module name.
        master: keep an fp32 master copy per weight (``"fp8-master"``) or not (``"fp8"``).
        init: the masters' initial values by layer name (fp32 of the weight's shape; TE's
            ``preserve_high_precision_init_val``); default: the dequantized FP8 weights
            (what TE's FusedAdam starts its master from otherwise).
    """

    def __init__(self, layers: dict[str, nn.Module], master: bool, init: dict[str, torch.Tensor] | None = None):
        self.layers, self.master = layers, master
        self.stand_ins: dict[str, nn.Parameter] = {}
        for name, layer in layers.items():
            weight = layer.weight
            if not master:
                value = torch.empty(0, device=weight.device)  # filled only during a step
            elif init is not None and name in init:
                value = init[name].detach().float().clone()
            else:
                value = weight.dequantize()
            self.stand_ins[name] = nn.Parameter(value)
        self.lost: dict[str, torch.Tensor] = {}  # layer -> int64 count of the last tracked step
        self._before: dict[str, torch.Tensor] = {}

    def substitute(self, param: torch.Tensor) -> torch.Tensor:
        """What the optimizer steps for ``param``: its stand-in if it is an FP8 weight."""
        for name, layer in self.layers.items():
            if layer.weight is param:
                return self.stand_ins[name]
        return param

    def prepare(self, track: bool = False) -> None:
        """Before ``optimizer.step()``: each stand-in takes its weight's gradient and (no
        master) its dequantized value; with ``track``, the values before the step are kept."""
        for name, layer in self.layers.items():
            stand_in = self.stand_ins[name]
            if not self.master:
                # .data: the same leaf (the optimizer's state is keyed by it) gets the storage
                stand_in.data = layer.weight.dequantize()
            stand_in.grad = layer.weight.grad
            if track:
                self._before[name] = stand_in.detach().clone()

    @torch.no_grad()
    def finish(self, skip: torch.Tensor | None = None) -> None:
        """After ``optimizer.step()``: cast every stand-in into its weight (kept where the 0-dim
        bool ``skip`` is True); count the lost updates if ``prepare`` tracked this step."""
        for name, layer in self.layers.items():
            stand_in, weight = self.stand_ins[name], layer.weight
            before = self._before.pop(name, None)
            old = (weight.codes.clone(), weight.scale_inv.clone()) if skip is not None else None
            scale = cast_into(layer, stand_in.detach())
            if old is not None:  # a skipped step stores nothing (no host read: a select)
                codes = weight.codes.view(torch.uint8)
                codes.copy_(torch.where(skip, old[0].view(torch.uint8), codes))
                weight.scale_inv.copy_(torch.where(skip, old[1], weight.scale_inv))
            if before is not None:  # lost: updated, yet the same code as the value before, cast alike
                fmt = layer.fp8.scaling.format_for(Role.WEIGHT)
                updated = stand_in.detach() != before
                kept = weight.codes.float() == cast_to_fp8(before, scale, fmt).float()
                self.lost[name] = (updated & kept).sum()
            stand_in.grad = None
            if not self.master:
                stand_in.data = torch.empty(0, device=weight.device)

    def state_dict(self) -> dict:
        """The master copies by layer name (plain fp32 tensors); empty without master weights."""
        return {"master": {name: s.detach() for name, s in self.stand_ins.items()} if self.master else {}}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        masters = state["master"]
        if self.master and set(masters) != set(self.stand_ins):
            raise KeyError(f"FP8 weights' master copies: expected {sorted(self.stand_ins)}, got {sorted(masters)}")
        for name, value in masters.items():
            self.stand_ins[name].copy_(value)


def fp8_primary_weights(model: nn.Module, master: bool) -> FP8WeightUpdate:
    """Convert ``model``'s convertible Linears to FP8 primary weights
    (``fp8lab.layers.fp8_weight.to_fp8_weights``) and return their update; with ``master``,
    each master copy starts from the high-precision weight before the cast. Raises
    ``ValueError`` naming a layer that runs FP8 GEMMs and cannot be converted (e.g. one run by
    Transformer Engine, whose own modules hold their weights)."""
    from fp8lab.layers.linear import Linear

    hp = {}
    if master:
        for name, layer in model.named_modules():
            if isinstance(layer, Linear) and convertible(layer) is None:
                hp[name] = layer.weight.detach().float().clone()
    layers = to_fp8_weights(model)
    for name, layer in model.named_modules():  # nothing stays in high precision silently
        if isinstance(layer, Linear) and name not in layers and layer.plan().precision == "fp8":
            why = convertible(layer) or "its weight is shared with another module"
            raise ValueError(f"layer {name!r} runs FP8 GEMMs but cannot hold FP8 primary weights: {why}")
    return FP8WeightUpdate(layers, master, {name: hp[name] for name in layers} if master else None)
