"""FP8 weight all-gather under FSDP2: each rank casts its shard, 1-byte values travel.

Invariant: the weight a layer multiplies is bit for bit the one it would cast from the
fp32 weight gathered whole. That holds for per-tensor recipes (``Scaling.per_tensor``):
the cast is element-wise given one scale, and the scale comes from the *whole* weight's
amaxes, the MAX over the shards' (one 2-float MAX all-reduce per weight and forward;
NaN sent as +inf, as ``fp8lab.update_scales`` does). The amaxes, faults and statistics a
layer records are those of the whole weight, recorded in the layer's forward
(``Scaling.gathered_weight_operand``), so scaling state and telemetry are what an
unsharded or DDP run records.

How (FSDP2's extension hooks, the way torchao's ``float8/fsdp_utils.py`` does it): the
sharded parameter's local tensor is a ``ShardedFP8Weight`` wrapping the fp32 shard.
``fsdp_pre_all_gather`` casts it with the weight's scale and hands FSDP the FP8 bytes
(uint8); ``fsdp_post_all_gather`` wraps the gathered bytes as a ``GatheredFP8Weight``,
which ``fp8lab.gemm.qlinear`` takes as the FP8 weight operand directly. The backward's
re-gather (blocks reshard after forward) reuses the forward's scale and amaxes (no
collective); recording happens in the layer's forward only, so a gather the root keeps
across forwards (FSDP2 does not reshard the root after forward) records like a fresh one.
On log steps the telemetry needs the whole fp32 weight (cast statistics, the BF16 shadow
GEMMs): the layer gathers it beside, in fp32 (a log-step cost only).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.utils._pytree as pytree
from torch import nn

from fp8lab.formats import Role
from fp8lab.quantize.tensor import amaxes_of
from fp8lab.scaling.protocol import Operand

# FSDP pads its local shard on dim 0 and copies it around: those ops keep the subclass.
_PRESERVED = {
    torch.ops.aten.empty_like.default,
    torch.ops.aten.new_zeros.default,
    torch.ops.aten.slice.Tensor,
    torch.ops.aten.copy_.default,
    torch.ops.aten.view.default,
    torch.ops.aten.as_strided.default,
    torch.ops.aten._to_copy.default,
    torch.ops.aten._pin_memory.default,
    torch.ops.aten.split.Tensor,
    torch.ops.aten.clone.default,
    torch.ops.aten.detach.default,
    torch.ops.aten.alias.default,
}


def _wrapper(cls, like: torch.Tensor, dtype: torch.dtype, requires_grad: bool = False):
    return torch.Tensor._make_wrapper_subclass(
        cls,
        like.size(),
        strides=like.stride(),
        storage_offset=like.storage_offset(),
        dtype=dtype,
        layout=like.layout,
        device=like.device,
        requires_grad=requires_grad,
    )


def _in_backward() -> bool:
    """True inside an autograd backward (FSDP's pre-backward re-gather)."""
    return torch._C._current_graph_task_id() != -1


class ShardedFP8Weight(torch.Tensor):
    """The fp32 shard of an FP8 layer's weight (FSDP's local tensor); gathered as FP8.

    Every op but FSDP's bookkeeping ones (``_PRESERVED``) sees the plain shard: the
    optimizer updates ``_tensor`` in place, state dicts and norms read it.
    """

    @staticmethod
    def __new__(cls, tensor: torch.Tensor):
        return _wrapper(cls, tensor, tensor.dtype, tensor.requires_grad)

    def __init__(self, tensor: torch.Tensor):
        self._tensor = tensor
        self._forward_cast = None  # (scale, amaxes) of the last forward, for the backward's re-gather

    __torch_function__ = torch._C._disabled_torch_function_impl

    @classmethod
    def __torch_dispatch__(cls, func, types, args, kwargs=None):
        args, kwargs = pytree.tree_map_only(ShardedFP8Weight, lambda t: t._tensor, (args, kwargs or {}))
        out = func(*args, **kwargs)
        if func not in _PRESERVED:
            return out
        return pytree.tree_map_only(torch.Tensor, ShardedFP8Weight, out)

    def __tensor_flatten__(self):
        return ["_tensor"], None

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return ShardedFP8Weight(inner["_tensor"])

    def __repr__(self):
        return f"ShardedFP8Weight({self._tensor!r})"

    def fsdp_pre_all_gather(self, mesh, outer_size, outer_stride, module: nn.Module, mp_policy):
        """This shard cast to FP8 with the whole weight's scale: (uint8 bytes,), metadata."""
        layer, group = module, mesh.get_group()
        rows = -(-outer_size[0] // group.size())  # FSDP's padded shard: ceil(rows / ranks)
        shard = self.padded(rows)  # (rows, K) fp32; zero rows pad it (the amax is unchanged)
        scaling, fmt = layer.fp8.scaling, layer.fp8.scaling.format_for(Role.WEIGHT)
        if _in_backward() and self._forward_cast is not None:  # the same weight as in the forward
            scale, amaxes = self._forward_cast
        else:
            amaxes = amaxes_of(shard).nan_to_num(nan=float("inf"), posinf=float("inf"))
            dist.all_reduce(amaxes, op=dist.ReduceOp.MAX, group=group)  # the whole weight's amaxes
            scale = scaling.gathered_weight_scale(amaxes, layer.fp8_state).clone()
            self._forward_cast = (scale, amaxes)
        backend = _backend(layer, shard.device)
        values = backend.quantize(shard, scale, fmt)  # exact FP8 values in the backend's dtype
        fp8_bytes = values.to(fmt.dtype).view(torch.uint8)  # exact: on the grid, within +-max
        return (fp8_bytes,), (scale, amaxes, values.dtype, fmt.dtype, (self, group, rows, outer_size[0]))

    def padded(self, rows: int) -> torch.Tensor:
        """The fp32 shard with zero rows up to ``rows`` (FSDP's padded shard size)."""
        shard = self._tensor
        if shard.shape[0] < rows:
            shard = torch.cat([shard, shard.new_zeros(rows - shard.shape[0], *shard.shape[1:])])
        return shard.contiguous()

    def fsdp_post_all_gather(
        self, all_gather_outputs: tuple[torch.Tensor, ...], metadata: Any, param_dtype: torch.dtype, *, out=None
    ):
        (data,) = all_gather_outputs  # (rows of all ranks, padded, K) uint8
        scale, amaxes, operand_dtype, fp8_dtype, source = metadata
        if out is not None:  # FSDP refilled the same storage: only the metadata is new
            out._set(scale, amaxes, source)
            return None
        gathered = GatheredFP8Weight(data, scale, amaxes, operand_dtype, fp8_dtype, param_dtype)
        gathered._set(scale, amaxes, source)
        return gathered, (data,)


class GatheredFP8Weight(torch.Tensor):
    """A whole weight as gathered FP8 bytes with its scale (nominally ``param_dtype``).

    ``fp8lab.gemm.qlinear`` takes ``operand(...)`` as the weight's FP8 operand; any other op
    sees the dequantized weight (values / scale), which nothing on the training path uses.
    """

    @staticmethod
    def __new__(cls, data, scale, amaxes, operand_dtype, fp8_dtype, param_dtype):
        return _wrapper(cls, data, param_dtype)

    def __init__(self, data, scale, amaxes, operand_dtype, fp8_dtype, param_dtype):
        self._data, self._operand_dtype, self._fp8_dtype = data, operand_dtype, fp8_dtype
        self._set(scale, amaxes, None)

    def _set(self, scale, amaxes, source) -> None:
        # source: (the ShardedFP8Weight, its group, padded rows, rows) for whole_hp
        self._scale, self._amaxes, self._source = scale, amaxes, source

    __torch_function__ = torch._C._disabled_torch_function_impl

    def values(self) -> torch.Tensor:
        """The FP8 values in the backend's operand dtype (exact widening of the bytes)."""
        return self._data.view(self._fp8_dtype).to(self._operand_dtype)

    def operand(self, scaling, state, slot, record: bool, w_hp: torch.Tensor | None) -> Operand:
        """The weight's FP8 operand; recording (``record``: training) and statistics (from
        ``w_hp``, the whole fp32 weight, on log steps) as for the whole weight."""
        return scaling.gathered_weight_operand(
            self.values(), self._scale, self._amaxes, w_hp, state=state, record=record, slot=slot
        )

    def whole_hp(self) -> torch.Tensor:
        """The whole fp32 weight, gathered now from the shards (a collective: telemetry's, on
        log steps, where every rank runs the same layers in the same order)."""
        sharded, group, rows, n = self._source
        shard = sharded.padded(rows)
        whole = shard.new_empty((rows * group.size(), *shard.shape[1:]))
        dist.all_gather_single(whole, shard, group=group)
        return whole[:n]

    def _rewrap(self, data: torch.Tensor) -> GatheredFP8Weight:
        out = GatheredFP8Weight(data, self._scale, self._amaxes, self._operand_dtype, self._fp8_dtype, self.dtype)
        out._set(self._scale, self._amaxes, self._source)
        return out

    @classmethod
    def __torch_dispatch__(cls, func, types, args, kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten.detach.default, torch.ops.aten.alias.default):
            return args[0]._rewrap(args[0]._data)
        if func is torch.ops.aten.as_strided.default:  # FSDP narrows the padded rows
            return args[0]._rewrap(func(args[0]._data, *args[1:], **kwargs))

        def dequantize(t):
            return (t._data.view(t._fp8_dtype).to(torch.float32) / t._scale).to(t.dtype)

        args, kwargs = pytree.tree_map_only(GatheredFP8Weight, dequantize, (args, kwargs))
        return func(*args, **kwargs)

    def __tensor_flatten__(self):
        return ["_data", "_scale", "_amaxes"], (self._operand_dtype, self._fp8_dtype, self.dtype)

    @staticmethod
    def __tensor_unflatten__(inner, meta, outer_size, outer_stride):
        return GatheredFP8Weight(inner["_data"], inner["_scale"], inner["_amaxes"], *meta)


def _backend(layer: nn.Module, device: torch.device):
    from fp8lab.gemm.backends import backend_for

    return backend_for(layer.plan(device).backend, device.type)


def fp8_all_gather_reason(layer: nn.Module, device: torch.device) -> str | None:
    """Why ``layer``'s weight is gathered in its own dtype rather than as FP8 (None: as FP8)."""
    from fp8lab.gemm.backends.base import QuantizedGemmBackend

    plan = layer.plan(device)
    if plan.precision != "fp8":
        return f"its GEMMs run in {plan.precision} ({plan.reason})"
    if not isinstance(_backend(layer, device), QuantizedGemmBackend):
        return f"backend {plan.backend!r} casts its own weights"
    if layer.gemm_weight() is not layer.weight:
        return "its weight is stored transposed"
    if layer.weight.dtype != torch.float32:
        return f"its weight is {layer.weight.dtype}, not fp32 master weights"
    return layer.fp8.scaling.fp8_all_gather_unsupported()


def enable_fp8_all_gather(model: nn.Module, device: torch.device) -> dict[str, str]:
    """Wrap every eligible fp8lab Linear's weight as a ``ShardedFP8Weight`` (before
    ``fully_shard``); returns {layer name: "fp8" or "fp32: <why not>"}."""
    from fp8lab.layers.linear import Linear

    chosen, uses = {}, {}
    for _, param in model.named_parameters(remove_duplicate=False):
        uses[id(param)] = uses.get(id(param), 0) + 1
    for name, layer in model.named_modules():
        if not isinstance(layer, Linear) or layer.in_features == 0:
            continue
        reason = fp8_all_gather_reason(layer, device)
        if reason is None and uses[id(layer.weight)] > 1:
            reason = "its weight is tied to another module's (which multiplies it in high precision)"
        if reason is None:
            layer.weight = nn.Parameter(ShardedFP8Weight(layer.weight.data), requires_grad=layer.weight.requires_grad)
            chosen[name] = "fp8"
        else:
            chosen[name] = f"{layer.weight.dtype}: {reason}".replace("torch.float32", "fp32")
    return chosen


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """This rank's plain shard of a sharded parameter or state tensor (``t`` itself if whole)."""
    from torch.distributed.tensor import DTensor

    if isinstance(t, DTensor):
        t = t._local_tensor
    return t._tensor if isinstance(t, ShardedFP8Weight) else t


def whole_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded one (a collective: every rank calls it, in the same order)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t
    plain = DTensor.from_local(
        local_shard(t), t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride()
    )
    return plain.full_tensor()
