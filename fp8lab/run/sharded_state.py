"""State dicts of an FSDP-sharded variant: whole tensors (the checkpoint format DDP writes), and
the sharded view DCP saves and loads (``dcp_state``, ``set_dcp_state``).

Invariant: what ``whole_*`` returns equals, key for key and bit for bit, the state dict the
same model and optimizer would have unsharded (the shards are gathered, never rounded), so
a checkpoint written under FSDP resumes under FSDP, DDP or one process alike, and one
written by those resumes under FSDP: ``load_whole_*`` keeps this rank's shard of every
whole tensor (no communication). Gathering is a collective: every rank calls ``whole_*``,
in the same order (the state dicts' key order, the same on every rank).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.tensor import DTensor
from torch.utils._pytree import tree_map_only

from fp8lab.gemm.fp8_all_gather import local_shard, whole_tensor


def _whole(value):
    return whole_tensor(value).detach() if isinstance(value, torch.Tensor) else value


def whole_model_state(model: nn.Module) -> dict:
    """``model.state_dict()`` with every sharded tensor gathered whole (every rank)."""
    return {key: _whole(value) for key, value in model.state_dict().items()}


def whole_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` (parameters by index) with its sharded moments gathered."""
    state = optimizer.state_dict()
    per_param = {index: {k: _whole(v) for k, v in entry.items()} for index, entry in state["state"].items()}
    return {**state, "state": per_param}


def _shard_like(whole: torch.Tensor, like):
    """This rank's shard of ``whole``, placed as ``like`` (a DTensor) is; ``whole`` otherwise."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if not isinstance(like, DTensor) or not isinstance(whole, torch.Tensor) or whole.shape != like.shape:
        return whole
    whole = whole.to(device=like.device)
    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None)  # no communication


def load_whole_model_state(model: nn.Module, state: dict) -> None:
    """``model.load_state_dict`` of a whole-tensor state dict into a sharded model."""
    current = model.state_dict()
    model.load_state_dict({key: _shard_like(value, current.get(key)) for key, value in state.items()})


def load_whole_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """``optimizer.load_state_dict`` of a whole-tensor state dict over sharded parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    per_param = {
        index: {k: _shard_like(v, params[index]) if k != "step" else v for k, v in entry.items()}
        for index, entry in state["state"].items()
    }
    optimizer.load_state_dict({**state, "state": per_param})


def plain_shards(state: dict) -> dict:
    """``state`` with every DTensor over a wrapper subclass (fp8lab's ``ShardedFP8Weight``, the
    FP8 all-gather's parameter) as a DTensor over its plain shard, sharing its storage: DCP
    pickles the class of each tensor it saves, and ``weights_only`` loading refuses fp8lab's.
    DCP loads into the same storage, so the parameter receives the values."""

    def plain(t: DTensor) -> DTensor:
        shard = local_shard(t)
        if shard is t._local_tensor:
            return t
        return DTensor.from_local(shard, t.device_mesh, t.placements, run_check=False, shape=t.shape, stride=t.stride())

    return tree_map_only(DTensor, plain, state)


def dcp_state(model, optimizer) -> dict:
    """DCP's view of one model (and its optimizer): ``{"model": ..., "optim": ...}``."""
    if optimizer is None:
        return {"model": plain_shards(get_model_state_dict(model))}
    model_state, optim_state = get_state_dict(model, optimizer)
    return {"model": plain_shards(model_state), "optim": plain_shards(optim_state)}


def set_dcp_state(model, optimizer, state: dict) -> None:
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
