"""What one variant's training holds in memory, counted exactly from its tensors.

Invariant: only tensor metadata is read (shape, dtype, storage address), never a value,
so counting makes no device-to-host copy. Every count is of distinct storages: a tensor
seen twice (a tied weight, three views of one QKV output) counts once.

- parameters, gradients, optimizer state: the bytes their tensors occupy (AdamW: the two
  moments and the fused kernel's fp32 step counter of every parameter); under FSDP, the
  bytes of this rank's shards (a DTensor's local tensor), i.e. what this rank holds. An FP8
  primary weight (``FP8Weight``) is its codes (1 byte an element) and its fp32 inverse scale; a
  tensor the optimizer steps that is no model parameter (an FP8 weight's fp32 master copy,
  ``fp8lab.optim.fp8_weights``) counts as optimizer state, where TE's FusedAdam keeps it;
- saved for the backward (``SavedTensorCounter``): every tensor autograd keeps from one
  forward, seen through ``torch.autograd.graph.saved_tensors_hooks``, at the width the
  hardware path stores it. A GEMM operand an fp8lab Linear saves counts at its GEMM's
  precision (FP8: 1 byte an element, BF16/FP16: 2, FP32: 4), whatever dtype the emulation
  holds it in (FP8 values in bf16 or fp32, FP16 values in fp32). Two totals: activations,
  and the low-precision weight copies a Linear keeps for its dgrad (a BF16 or FP8 copy of
  a master weight). Parameters saved by reference (an fp32 GEMM's weight, or a weight
  already in its GEMM's dtype) are not counted again: they are in the parameters. Nor is
  the operand the exact fp32 GEMM path makes of a weight already in its GEMM's dtype (a
  bf16 weight without master weights, on CPUs without native BF16): the hardware path
  multiplies the parameter itself.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn

from fp8lab.gemm.fp8_all_gather import local_shard
from fp8lab.layers.linear import Linear
from fp8lab.quantize.weight import FP8Weight

# Bytes an element of a GEMM operand takes on the hardware path, by plan precision.
OPERAND_BYTES = {"fp8": 1, "bf16": 2, "fp16": 2, "fp32": 4}
# The dtype a plan precision's operands have on the hardware path (FP8 weights are never parameters).
OPERAND_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Backends whose saved operands are fp8lab's own (TE stores its own, natively sized).
OWN_GEMM_BACKENDS = ("emulated", "scaled_mm", "bf16", "fp16", "fp32")


def _storage_key(t: torch.Tensor) -> tuple:
    t = local_shard(t)  # FSDP: the bytes this rank holds
    storage = t.untyped_storage()
    return (t.device, storage.data_ptr(), storage.nbytes())


def _stored(tensors: Iterable[torch.Tensor | None]) -> Iterable[torch.Tensor]:
    """The tensors that hold memory: an FP8Weight is its codes and inverse scale."""
    for t in tensors:
        if isinstance(t, FP8Weight):
            yield from (t.codes, t.scale_inv)
        elif t is not None:
            yield t


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes of the distinct storages of ``tensors`` (None entries are skipped)."""
    seen = {}
    for t in _stored(tensors):
        key = _storage_key(t)
        seen[key] = key[2]
    return sum(seen.values())


def optimizer_tensors(optimizer: torch.optim.Optimizer, model_params: Iterable[torch.Tensor] | None = None) -> list:
    """Every tensor of the optimizer's per-parameter state; given the model's parameters,
    also every tensor it steps that is none of them (master copies of FP8 primary weights)."""
    state = [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    if model_params is None:
        return state
    own = {id(p) for p in model_params}
    return state + [p for group in optimizer.param_groups for p in group["params"] if id(p) not in own]


class SavedTensorCounter:
    """Counts the bytes autograd saves for the backward during ``counting()`` regions.

    Inside an fp8lab Linear whose GEMMs fp8lab runs, the saved operand of the weight's size
    is the weight copy; if the input operand has the same size, the first one saved is the
    input (``fp8lab.gemm.qlinear`` saves ``x_q, w_q, x_inv, w_inv`` in that order).

    Args:
        model: the variant's (un-wrapped) model: its parameters are excluded, and its
            fp8lab Linears tell the width of the operands they save.
    """

    def __init__(self, model: nn.Module):
        self.model = model
        self.activation_bytes = self.weight_bytes = 0
        self._seen: set[tuple] = set()
        self._params: set[tuple] = set()
        self._scope: dict | None = None  # inside an fp8lab Linear: width, operand sizes not yet seen

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if isinstance(t, nn.Parameter):  # counted in the parameters (FSDP: the gathered one of a shard)
            return t
        key = _storage_key(t)
        if not key[1] or key in self._seen or key in self._params:
            return t
        self._seen.add(key)
        scope, elements = self._scope, key[2] // t.element_size()
        if scope is None or t.dim() == 0:  # outside a Linear, or a scale: as stored
            self.activation_bytes += key[2]
        elif t.numel() == scope["x"]:  # the input operand
            scope["x"] = None
            self.activation_bytes += elements * scope["width"]
        elif t.numel() == scope["w"]:  # the weight copy, unless the weight is the operand itself
            scope["w"] = None
            if not scope["weight_is_operand"]:
                self.weight_bytes += elements * scope["width"]
        else:
            self.activation_bytes += elements * scope["width"]
        return t

    def _enter(self, layer: Linear) -> list:
        def pre_hook(module, args):
            plan = module.plan()
            if plan.backend in OWN_GEMM_BACKENDS:
                self._scope = {
                    "width": OPERAND_BYTES[plan.precision],
                    "x": args[0].numel(),
                    "w": module.weight.numel(),
                    # the FP8 codes of an FP8 primary weight are the operand (the emulation's copy
                    # of them in bf16/fp32 stands for the parameter itself)
                    "weight_is_operand": isinstance(module.weight, FP8Weight)
                    or module.weight.dtype == OPERAND_DTYPES.get(plan.precision),
                }

        def post_hook(module, args, output):
            self._scope = None

        return [layer.register_forward_pre_hook(pre_hook), layer.register_forward_hook(post_hook)]

    @contextlib.contextmanager
    def counting(self):
        """Count what the enclosed forward saves (``activation_bytes``, ``weight_bytes``)."""
        self.activation_bytes = self.weight_bytes = 0
        self._seen = set()
        self._params = {_storage_key(p) for p in _stored(self.model.parameters())}
        handles = [h for m in self.model.modules() if isinstance(m, Linear) for h in self._enter(m)]
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t):
                yield self
        finally:
            for handle in handles:
                handle.remove()
            self._scope, self._seen = None, set()


def training_bytes(
    params: list[torch.Tensor], optimizer: torch.optim.Optimizer, saved: SavedTensorCounter
) -> dict[str, int]:
    """The ``perf/mem_*`` values of one step: parameters, their gradients (call while they
    are held), the optimizer's state, and what ``saved`` counted in the step's forward."""
    return {
        "perf/mem_params_bytes": tensor_bytes(params),
        "perf/mem_grads_bytes": tensor_bytes(p.grad for p in params),
        "perf/mem_optimizer_bytes": tensor_bytes(optimizer_tensors(optimizer, params)),
        "perf/mem_activations_saved_bytes": saved.activation_bytes,
        "perf/mem_weight_copies_saved_bytes": saved.weight_bytes,
    }
