"""A memory estimate of a run, checked against the device before anything is allocated.

Invariant: the estimate is deliberately low, so a run it refuses clearly cannot fit,
and a run that fits is never refused; a run it lets through may still run out of
memory, which then exits 2 with the allocator's message (see fp8lab/run/cli.py). Nothing
here allocates a tensor; it reads the config and the free memory only.

What it counts, in bytes (``P`` parameters of the GPT, counted from its shape):
- every variant's training state at once: ``16 * P`` (fp32 weights, gradients and
  AdamW's two moments; ``8 * P`` in 16 bits for a variant without master weights), plus
  the amax history of every FP8 layer (12 bytes per row);
- the activations of one training step of one variant (the variants take turns):
  ``34 * B * T * H`` per block (Megatron's count for BF16 activations, without the
  attention scores a fused attention kernel never stores) and ``6 * B * T * V`` for the
  logits (BF16 logits and their float32 log-softmax), for this process's share B of
  the batch;
- the validation batches kept on the device.
It is compared with MemAvailable (and the cgroup's limit) on CPU, shared by every
local process of a ``--nproc`` run, or with ``torch.cuda.mem_get_info`` on CUDA.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fp8lab.layers.gpt import PRESETS

TRAIN_STATE_BYTES = 16  # per parameter: fp32 weight + grad + exp_avg + exp_avg_sq
# A variant without master weights holds all four in 16 bits.
HALF = 2
HISTORY_ROW_BYTES = 12  # one amax history row: 3 roles x float32
ACTIVATION_BYTES_PER_BLOCK = 34  # x B*T*H (Megatron-LM, activations in 16 bits)
LOGIT_BYTES = 6  # x B*T*V: bf16 logits + float32 log-softmax


class ResourceError(RuntimeError):
    """The run cannot fit in this device's memory; the message gives the numbers."""


@dataclass(frozen=True)
class Estimate:
    params: int  # of one model
    state: int  # training state of every variant, bytes
    activations: int  # one step of one variant, bytes
    other: int  # amax histories and validation batches, bytes

    @property
    def total(self) -> int:
        return self.state + self.activations + self.other


def gpt_shape(config) -> dict:
    """The GPT fields of ``config`` (preset, model.* overrides, train.block_size)."""
    return {**PRESETS[config.model.preset], **config.model.overrides(), "block_size": config.train.block_size}


def gpt_params(shape: dict) -> int:
    """Parameters of the GPT with these fields (fp8lab/gpt.py's layout)."""
    v, t, layers = shape["vocab_size"], shape["block_size"], shape["num_layers"]
    h, f = shape["hidden_size"], shape["ffn_hidden_size"]
    bias = shape.get("bias", True)
    norm = 2 * h if shape.get("normalization", "LayerNorm") == "LayerNorm" else h
    fc1_out = 2 * f if shape.get("activation", "gelu") == "swiglu" else f
    block = 2 * norm + h * 3 * h + h * h + h * fc1_out + f * h + bias * (3 * h + h + fc1_out + h)
    head = 0 if shape.get("tie_embeddings", False) else h * v
    return v * h + t * h + layers * block + norm + head


def fp8_layers(shape: dict) -> int:
    return 4 * shape["num_layers"] + 1


def estimate(config, processes: int = 1) -> Estimate:
    """The memory one process of a ``processes``-process run needs (see the module docstring)."""
    shape = gpt_shape(config)
    params = gpt_params(shape)
    state = sum(TRAIN_STATE_BYTES // (1 if v.master_weights else HALF) for v in config.variants) * params
    histories = sum(getattr(v.scaling, "amax_history_len", 0) for v in config.variants if v.precision == "fp8")
    t = config.train
    batch = max(t.batch_size // processes, 1)
    tokens = batch * t.block_size
    activations = tokens * (
        ACTIVATION_BYTES_PER_BLOCK * shape["num_layers"] * shape["hidden_size"] + LOGIT_BYTES * shape["vocab_size"]
    )
    val_batches = t.eval_batches * 2 * t.batch_size * t.block_size * 8  # int64 (x, y), kept on the device
    other = histories * fp8_layers(shape) * HISTORY_ROW_BYTES + val_batches
    return Estimate(params, state, activations, other)


def _cgroup_free() -> int | None:
    """Bytes left under the cgroup v2 memory limit, if there is one."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return int(limit) - int((root / "memory.current").read_text())
    except (OSError, ValueError):
        return None


def available(device: torch.device) -> tuple[int | None, str]:
    """(free bytes, where that number comes from); None when it cannot be read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free on {torch.cuda.get_device_name(device)}"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
                break
        else:
            return None, ""
    except (OSError, ValueError):
        return None, ""
    limit = _cgroup_free()
    if limit is not None and limit < free:
        return limit, "left under this cgroup's memory limit"
    return free, "MemAvailable in /proc/meminfo"


def gib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_fits(config, device: torch.device, world_size: int = 1) -> Estimate:
    """Raise ``ResourceError`` when the estimate exceeds the free memory of ``device``.

    Args:
        world_size: processes of the run; on CPU the local ones share the host's memory.
    """
    est = estimate(config, world_size)
    free, source = available(device)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world_size)) if device.type == "cpu" else 1
    needed = est.total * local
    if free is not None and needed > free:
        who = f"{local} processes x " if local > 1 else ""
        raise ResourceError(
            f"the model is too large for this machine: it needs at least {who}{gib(est.total)} "
            f"({len(config.variants)} variants x {est.params / 1e6:.1f}M parameters with gradients and AdamW state: "
            f"{gib(est.state)}; activations of one step: {gib(est.activations)}; other: {gib(est.other)}), but "
            f"{gib(free)} are {source}. Lower model.num_layers / model.hidden_size, train.batch_size or "
            "train.block_size, or train fewer variants"
        )
    return est
