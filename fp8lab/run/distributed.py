"""Data-parallel training on torch.distributed: the process group, DDP, and the loss convention.

Invariant: N ranks training on N slices of a global batch compute exactly what one
process computes when it accumulates the gradients of those N slices as micro-batches:
each rank's loss is its token-loss *sum* divided by the *global* token count, and DDP
*sums* the gradients (``sum_gradients_hook``) instead of averaging them. So every FP8
operand, grad_output included, has the same values, amaxes and scales on any world size
(DDP's default -- a per-rank mean, then an average -- multiplies grad_output by the world
size, which moves its FP8 scales and its E5M2 underflow with the number of ranks). The
amaxes of a step are MAX-reduced across ranks by ``fp8lab.update_scales``, so every rank
holds the same scaling state. DDP never broadcasts buffers: the scaling state is kept
identical by that reduction, and a broadcast would overwrite amaxes that other ranks
recorded during gradient accumulation.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

# A rank that waits longer than this in a collective fails instead of hanging forever.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def token_loss(logits: torch.Tensor, targets: torch.Tensor, global_tokens: int) -> torch.Tensor:
    """Cross-entropy summed over this rank's tokens, divided by the global batch's token count.

    Summed over ranks (or over micro-batches) it is the mean loss of the global batch.

    Args:
        logits: (B_local, T, V) logits, any float dtype (computed in float32).
        targets: (B_local, T) int64 token ids.
        global_tokens: tokens in the global batch (all ranks, all micro-batches).
    """
    loss_sum = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum")
    return loss_sum / global_tokens


def sum_gradients_hook(group, bucket):
    """DDP communication hook: all-reduce a gradient bucket with SUM (no division by world size).

    (No annotations: DDP compares them with ``dist.GradBucket`` and ``Future[Tensor]``
    objects, and this module's postponed annotations would be strings.)
    """
    work = dist.all_reduce(bucket.buffer(), op=dist.ReduceOp.SUM, group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


@dataclass(frozen=True)
class Distributed:
    """Where this process sits in a data-parallel job (one process per device).

    Args:
        rank: global rank, 0 .. world_size-1; rank 0 writes logs and checkpoints.
        world_size: number of processes.
        local_rank: rank on this node (picks the CUDA device).
        device: this process's device.
        group: the data-parallel process group (None: WORLD, or no group when world_size == 1).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    group: object = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: str = "auto", *, timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> Distributed:
        """Join the job torchrun started (its RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

        Without those variables this is a single process and no group is created. Backend
        ``nccl`` when the device is CUDA, ``gloo`` on CPU.

        Args:
            device: ``train.device``: "auto", "cpu" or "cuda"; CUDA uses device LOCAL_RANK.
            timeout: how long a collective may wait for a peer before it fails.
        """
        if not all(name in os.environ for name in TORCHRUN_VARS):
            return cls(device=_device(device, 0))
        rank, world_size, local_rank = (int(os.environ[name]) for name in TORCHRUN_VARS)
        dev = _device(device, local_rank)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if world_size > 1 and not dist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            kwargs = {"device_id": dev} if dev.type == "cuda" else {}
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout, **kwargs)
        return cls(rank, world_size, local_rank, dev)

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` under DDP with summed gradients (see the module docstring); as is for one process."""
        if not self.enabled:
            return model
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        ddp = nn.parallel.DistributedDataParallel(
            model, device_ids=device_ids, forward_sync_buffers=False, process_group=self.group
        )  # buffers are still synced once, at init
        ddp.register_comm_hook(self.group, sum_gradients_hook)
        return ddp

    def broadcast(self, obj):
        """Rank 0's ``obj`` (any picklable value), on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over ranks, in place (a no-op for one process)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(group=self.group)

    def close(self) -> None:
        """Tear down the process group (only the one ``from_env`` created)."""
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def _device(name: str, local_rank: int) -> torch.device:
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(
            f"LOCAL_RANK {local_rank} has no CUDA device (this node has {torch.cuda.device_count()}); "
            "launch at most one process per GPU (--nproc-per-node)"
        )
    return torch.device("cuda", local_rank)
