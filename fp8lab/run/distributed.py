"""Data-parallel training on torch.distributed: the process group, DDP or FSDP2, and the loss convention.

Invariant: N ranks training on N slices of a global batch compute exactly what one
process computes when it accumulates the gradients of those N slices as micro-batches:
each rank's loss is its token-loss *sum* divided by the *global* token count, and DDP
*sums* the gradients (``sum_gradients_hook``) instead of averaging them. So every FP8
operand, grad_output included, has the same values, amaxes and scales on any world size
(DDP's default -- a per-rank mean, then an average -- multiplies grad_output by the world
size, which moves its FP8 scales and its E5M2 underflow with the number of ranks). The
amaxes of a step are MAX-reduced across ranks by ``fp8lab.update_scales``, so every rank
holds the same scaling state. DDP syncs buffers once, at construction, never per
forward: the scaling state is kept identical by that reduction, and a per-forward
broadcast would overwrite amaxes that other ranks recorded during gradient accumulation.
FSDP2 (``shard``) keeps the same convention: its reduce-scatter sums (divide factor 1), and
with 2 ranks every gradient element is the same single fp32 addition as DDP's.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from fp8lab.run.checks import ConfigError

# A rank that waits longer than this in a collective fails instead of hanging forever.
DEFAULT_TIMEOUT = datetime.timedelta(minutes=10)
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def torchrun_worker() -> bool:
    """Whether this process is one of several workers torchrun started (its RANK, WORLD_SIZE
    and LOCAL_RANK set, WORLD_SIZE above 1)."""
    return all(name in os.environ for name in TORCHRUN_VARS) and int(os.environ["WORLD_SIZE"]) > 1


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
        rank: global rank, 0 .. world_size-1; rank 0 alone writes logs and checkpoints.
        world_size: number of processes.
        local_rank: rank on this node (picks the CUDA device).
        device: this process's device.
        group: the data-parallel process group (None: WORLD).
        control_group: a gloo group for host-side flags (None: WORLD, already gloo on CPU).
        owns_group: ``close()`` destroys the default group (``from_env`` created it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    group: object = None
    control_group: object = None
    owns_group: bool = False

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device: torch.device, *, timeout: datetime.timedelta = DEFAULT_TIMEOUT) -> Distributed:
        """Join the job torchrun started (its RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT).

        Without those variables (or with WORLD_SIZE 1) this is a single process and no
        group is created. Backend ``nccl`` on CUDA (device LOCAL_RANK), ``gloo`` on CPU.

        Args:
            device: the resolved ``train.device`` ("cuda" means this rank's CUDA device).
            timeout: how long a collective may wait for a peer before it fails.
        """
        if not torchrun_worker():
            return cls(device=device)
        rank, world_size, local_rank = (int(os.environ[name]) for name in TORCHRUN_VARS)
        if device.type == "cuda":
            if local_rank >= torch.cuda.device_count():
                raise RuntimeError(
                    f"LOCAL_RANK {local_rank} has no CUDA device (this node has {torch.cuda.device_count()}); "
                    "launch at most one process per GPU (--nproc-per-node)"
                )
            device = torch.device("cuda", local_rank)
            torch.cuda.set_device(device)
        owns = not dist.is_initialized()
        if owns:
            backend = "nccl" if device.type == "cuda" else "gloo"
            kwargs = {"device_id": device} if device.type == "cuda" else {}
            dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout, **kwargs)
        control = dist.new_group(backend="gloo", timeout=timeout) if device.type == "cuda" else None
        return cls(rank, world_size, local_rank, device, control_group=control, owns_group=owns)

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

    def shard(
        self, model: nn.Module, *, fp8_all_gather: bool = False, param_dtype: torch.dtype | None = None
    ) -> nn.Module:
        """``model`` under FSDP2 (``fully_shard``): each block, then the root, summing gradients.

        Parameters (master weights, gradients, optimizer state) are sharded; fp8lab's
        scaling state is buffers, which FSDP2 leaves whole on every rank, and a layer
        casts its all-gathered weight, so amaxes and scales mean what they mean under DDP.
        Build the optimizer after this call (its parameters are the sharded ones).

        Args:
            fp8_all_gather: cast each FP8 layer's weight shard to FP8 before the all-gather
                (``fp8lab.gemm.fp8_all_gather``; per-tensor recipes, others stay fp32). Which
                layers do, and why not, is ``model.fp8_all_gather`` afterwards.
            param_dtype: the dtype parameters are stored, gathered and their gradients
                reduced in (the precision rung's: fp32 master weights, or the activations'
                dtype without them); None: the parameters' own. FSDP never re-casts them:
                each layer casts its gathered weight as it would unsharded (to FP8, or to
                the rung's GEMM precision), so numerics are DDP's.
        """
        from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

        from fp8lab.gemm.fp8_all_gather import enable_fp8_all_gather

        chosen = enable_fp8_all_gather(model, self.device) if fp8_all_gather else {}
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=param_dtype, cast_forward_inputs=False)
        mesh = None  # WORLD
        if self.group is not None:
            from torch.distributed.device_mesh import DeviceMesh

            mesh = DeviceMesh.from_group(self.group, self.device.type)
        for block in getattr(model, "blocks", []):
            fully_shard(block, mesh=mesh, mp_policy=policy)
        fully_shard(model, mesh=mesh, mp_policy=policy)
        counter = AllGatherCounter()
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_gradient_divide_factor(1.0)  # SUM: see token_loss
                module.set_force_sum_reduction_for_comms(True)  # plain SUM (gloo has no PREMUL_SUM)
                module.set_custom_all_gather(counter)
        model.fp8_all_gather = chosen  # layer name -> "fp8" or "<dtype>: why not"
        model.all_gather_counter = counter
        return model

    def broadcast(self, obj):
        """Rank 0's ``obj`` (any picklable value), on every rank."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control_group)
        return box[0]

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over ranks, in place (a no-op for one process; no host sync)."""
        if self.enabled:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def any_rank(self, flag: bool) -> bool:
        """True on every rank when ``flag`` is True on any (a host-side gloo collective)."""
        if not self.enabled:
            return flag
        box = torch.tensor([int(flag)])
        dist.all_reduce(box, op=dist.ReduceOp.MAX, group=self.control_group)
        return bool(box[0])

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier(group=self.control_group)

    def close(self) -> None:
        """Tear down the process group if ``from_env`` created it."""
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _default_all_gather():
    from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather

    return DefaultAllGather


class AllGatherCounter(_default_all_gather()):
    """FSDP2's default all-gather, counting the bytes each rank receives (``bytes``)."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.calls = 0

    def __call__(self, output_tensor, input_tensor, group, async_op=False):
        self.bytes += output_tensor.numel() * output_tensor.element_size()
        self.calls += 1
        return super().__call__(output_tensor, input_tensor, group, async_op)

    def take(self) -> int:
        """Bytes gathered since the last call."""
        taken, self.bytes = self.bytes, 0
        return taken


class NullWriter:
    """The TensorBoard writer of ranks other than 0: same calls, writes nothing."""

    def scalars(self, step, values) -> None: ...
    def layer_stats(self, step, stats) -> None: ...
    def histories(self, step, histories) -> None: ...
    def image(self, tag, png, step) -> None: ...
    def text(self, tag, markdown, step=0) -> None: ...
    def layout(self) -> None: ...
    def hparams(self, hparams, metrics) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


def resolve_device(name: str) -> torch.device:
    """``train.device`` as a device: "auto" is CUDA where there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return torch.device(name)


def check_world_size(config, world_size: int) -> None:
    """The global batch splits into equal slices, one per rank (``config``: a RunConfig)."""
    if config.train.batch_size % world_size:
        raise ConfigError(
            f"train.batch_size must be divisible by the number of processes ({world_size}), "
            f"got {config.train.batch_size}: every rank trains on an equal slice of the global batch"
        )
