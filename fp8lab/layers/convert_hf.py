"""Linear-like layers of other libraries: what ``convert`` turns into FP8, and what it can't.

Invariant: recognised by duck type, never by importing the library (fp8lab does not
depend on transformers). A converted layer holds the original's own Parameters in the
original's layout, so its state_dict has the original's keys and shapes plus the scaling
state; a layer left as it was gets a reason that ``describe`` shows.

- transformers' ``Conv1D`` (GPT-2, GPT, ...): a Linear whose weight is stored transposed,
  ``(in_features, out_features)``, computing ``x @ weight + bias``. It becomes a
  ``Conv1DLinear``: an ``fp8lab.Linear`` whose ``weight`` keeps that (in, out) layout and
  whose GEMM takes ``weight.t()`` (an (out, in) view; the cast makes its FP8 copy anyway).
  Transformer Engine's Linear owns an (out, in) weight, so such a layer runs on
  ``torch._scaled_mm`` where the plan would pick TE, and its plan says so.
- Anything else with a 2-D ``weight`` Parameter that is not an embedding or a convolution
  (e.g. a library's own tensor-parallel Linear) is left as it was, with the reason
  ``describe`` shows: its GEMM, if any, does not run in FP8.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

from fp8lab.gemm.backends.select import DeviceFacts, Plan, TEFacts
from fp8lab.layers.linear import Linear
from fp8lab.options import FP8Options

# Modules whose 2-D weight is not a GEMM operand (a table lookup, a convolution kernel).
NOT_GEMMS = (nn.Embedding, nn.EmbeddingBag, nn.modules.conv._ConvNd)


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is transformers' ``Conv1D`` (or a subclass): a transposed Linear."""
    return any(cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers") for cls in type(module).__mro__)


def conv1d_skip_reason(conv: nn.Module) -> str | None:
    """Why a transformers Conv1D must stay as it is, or None (it converts)."""
    base = next(cls for cls in type(conv).__mro__ if cls.__name__ == "Conv1D")
    if type(conv).forward is not base.forward:
        return f"not converted: {type(conv).__qualname__} overrides transformers' Conv1D.forward"
    if parametrize.is_parametrized(conv):
        return "not converted: parametrized layer (its weight is computed, not stored)"
    if getattr(conv, "bias", None) is None or conv.weight.dim() != 2:
        return "not converted: a Conv1D without the (in, out) weight and bias that transformers gives it"
    return None


class Conv1DLinear(Linear):
    """An ``fp8lab.Linear`` that keeps transformers' Conv1D layout: ``weight`` is
    (in_features, out_features) and ``y = x @ weight + bias``, with FP8 GEMMs.

    Built by ``fp8lab.convert`` from a Conv1D (``from_conv1d``); ``nf`` and ``nx`` (out and
    in features, Conv1D's names) stay readable for the model code that uses them.
    """

    @classmethod
    def from_conv1d(cls, conv: nn.Module, fp8: FP8Options) -> Conv1DLinear:
        nx, nf = conv.weight.shape
        new = cls(nx, nf, True, fp8=fp8, device="meta")  # meta: no throw-away init, no RNG
        new.weight, new.bias = conv.weight, conv.bias  # the same Parameters, (in, out) layout
        new.fp8_state = fp8.scaling.new_state(conv.weight.device)
        new.nf, new.nx = nf, nx
        new.train(conv.training)
        return new

    def gemm_weight(self) -> torch.Tensor:
        return self.weight.t()  # (out, in) view of the (in, out) Parameter

    def plan_for(self, device: DeviceFacts, te: TEFacts) -> Plan:
        plan = super().plan_for(device, te)
        if plan.backend != "te":
            return plan
        return Plan(
            "scaled_mm",
            f"torch._scaled_mm on {device.name or 'this GPU'}: Transformer Engine's Linear "
            "needs an (out, in) weight and this layer keeps transformers' Conv1D (in, out) layout",
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight stored (in, out) as transformers' Conv1D"


def unconverted_reason(module: nn.Module) -> str | None:
    """Why a linear-like ``module`` that is neither an nn.Linear nor a Conv1D runs as it
    was, or None when it is not linear-like (for ``describe``)."""
    if isinstance(module, nn.MultiheadAttention):
        return (
            "not converted: nn.MultiheadAttention multiplies its packed in_proj_weight directly "
            "(F.multi_head_attention_forward); use fp8lab.MultiheadAttention for FP8 QKV"
        )
    weight = module._parameters.get("weight")
    if isinstance(module, (Linear, nn.Linear, *NOT_GEMMS)) or is_hf_conv1d(module):
        return None
    if isinstance(weight, nn.Parameter) and weight.dim() == 2:
        return (
            f"not converted: {type(module).__module__}.{type(module).__qualname__} is not a layer fp8lab "
            "converts (nn.Linear, transformers Conv1D); if it runs a GEMM, that GEMM is not FP8"
        )
    return None
