"""A memory estimate of a run, checked against the device before anything is allocated.

Invariant: the estimate is deliberately low, so a run it refuses clearly cannot fit,
and a run that fits is never refused; a run it lets through may still run out of
memory, which then exits 2 with the allocator's message (see fp8lab/run/cli.py). Nothing
here allocates a tensor; it reads the config and the free memory only.

What it counts, in bytes (``P`` parameters of the GPT, counted from its shape):
- every variant's training state at once: ``16 * P`` (fp32 weights, gradients and
  AdamW's two moments; ``8 * P`` in 16 bits for a variant without master weights; 3 bytes
  less a block Linear's weight element with FP8 primary weights without master), plus
  the amax history of every FP8 layer (12 bytes per row);
- the activations of one training step of one variant (the variants take turns):
  ``34 * B * T * H`` per block (Megatron's count for BF16 activations, without the
  attention scores a fused attention kernel never stores) and ``6 * B * T * V`` for the
  logits (BF16 logits and their float32 log-softmax), for this process's share B of
  the batch;
- the validation batches kept on the device.
It is compared with MemAvailable (and the cgroup's limit, and the address space left under
``ulimit -v`` less what the runtime maps after this check) on CPU, shared by every local
process of a ``--nproc`` run, or with ``torch.cuda.mem_get_info`` on CUDA. A refusal names
the share of the estimate that is largest and the settings that make it.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path

import torch

from fp8lab.layers.gpt import PRESETS
from fp8lab.optim import OPTIMIZER_STATES

TRAIN_STATE_BYTES = 16  # per parameter: fp32 weight + grad + exp_avg + exp_avg_sq
# A variant without master weights holds all four in 16 bits.
HALF = 2
MOMENT_BYTES = {"fp32": 4, "fp16": 2, "fp8": 1}  # one stored AdamW moment value (fp8lab.optim)
HISTORY_ROW_BYTES = 12  # one amax history row: 3 roles x float32
ACTIVATION_BYTES_PER_BLOCK = 34  # x B*T*H (Megatron-LM, activations in 16 bits)
LOGIT_BYTES = 6  # x B*T*V: bf16 logits + float32 log-softmax
# Under an address-space limit (ulimit -v): what a CPU run maps after the memory check besides
# its tensors (TensorBoard's writer, oneDNN's kernels, a malloc arena and a stack per thread).
# Measured: a one-block run on 2 threads grows by about 410 MiB, so this stays below it.
RUNTIME_MAPPINGS = 256 * 2**20
PER_THREAD_MAPPINGS = 64 * 2**20


class ResourceError(RuntimeError):
    """The run cannot fit in this device's memory; the message gives the numbers."""


@dataclass(frozen=True)
class Estimate:
    params: int  # of one model
    state: int  # training state of every variant, bytes
    activations: int  # one step of one variant, bytes
    histories: int  # amax histories of every FP8 layer, bytes
    val_batches: int  # validation batches on the device, bytes
    history_keys: tuple[str, ...] = ()  # the settings that make the histories (per variant)

    @property
    def other(self) -> int:
        return self.histories + self.val_batches

    @property
    def total(self) -> int:
        return self.state + self.activations + self.other

    def shares(self, config) -> list[tuple[int, str, str]]:
        """(bytes, what, the settings that make it) of each part, largest first."""
        t, variants = config.train, len(config.variants)
        return sorted(
            [
                (
                    self.state,
                    f"the training state of {variants} variants x {self.params / 1e6:.1f}M parameters",
                    "model.num_layers, model.hidden_size or model.ffn_hidden_size, or train fewer variants",
                ),
                (
                    self.activations,
                    f"the activations of one step ({t.batch_size} x {t.block_size} tokens)",
                    "train.batch_size or train.block_size (or model.num_layers, model.hidden_size)",
                ),
                (self.histories, "the amax histories of the FP8 layers", " or ".join(self.history_keys) or "-"),
                (self.val_batches, f"{t.eval_batches} validation batches", "train.eval_batches"),
            ],
            key=lambda share: -share[0],
        )


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
    pos = t * h if shape.get("position_embedding", "learned") == "learned" else 0  # rotary: no table
    return v * h + pos + layers * block + norm + head


def train_state_bytes(variant) -> int:
    """Bytes per parameter of weight, gradient and AdamW moments for ``variant``: 16 in fp32,
    8 without master weights, fp32 weight and grad + the stored moments' bytes with FP8/FP16
    optimizer state (their per-tensor or per-block scales are left out: a few bytes a tensor)."""
    if variant.optimizer_state != "fp32":
        moments = OPTIMIZER_STATES[variant.optimizer_state]
        return 8 + sum(MOMENT_BYTES[moments[m]] for m in ("exp_avg_dtype", "exp_avg_sq_dtype"))
    return TRAIN_STATE_BYTES // (1 if variant.master_weights else HALF)


def fp8_weight_saving(variant, shape: dict) -> int:
    """Bytes ``weights="fp8"`` saves below ``train_state_bytes``: 3 a weight element of every
    block Linear (an E4M3 code for an fp32 weight; at most that, as a policy may keep some in
    BF16). ``"fp8-master"`` is counted as ``"hp"`` (its master's extra byte a weight is left
    out: the estimate stays low)."""
    if variant.weights != "fp8":
        return 0
    h, f = shape["hidden_size"], shape["ffn_hidden_size"]
    fc1_out = 2 * f if shape.get("activation", "gelu") == "swiglu" else f
    return 3 * shape["num_layers"] * (h * 3 * h + h * h + h * fc1_out + f * h)


def fp8_layers(shape: dict) -> int:
    return 4 * shape["num_layers"] + 1


def estimate(config, processes: int = 1) -> Estimate:
    """The memory one process of a ``processes``-process run needs (see the module docstring)."""
    shape = gpt_shape(config)
    params = gpt_params(shape)
    state = sum(train_state_bytes(v) * params - fp8_weight_saving(v, shape) for v in config.variants)
    fp8 = [v for v in config.variants if v.precision == "fp8" and hasattr(v.scaling, "amax_history_len")]
    histories = sum(v.scaling.amax_history_len for v in fp8)
    keys = tuple(
        f"variants.{v.name}.scaling.amax_history_len (={v.scaling.amax_history_len}, or fp8.amax_history_len)"
        for v in sorted(fp8, key=lambda v: -v.scaling.amax_history_len)
    )
    t = config.train
    batch = max(t.batch_size // processes, 1)
    tokens = batch * t.block_size
    activations = tokens * (
        ACTIVATION_BYTES_PER_BLOCK * shape["num_layers"] * shape["hidden_size"] + LOGIT_BYTES * shape["vocab_size"]
    )
    val_batches = t.eval_batches * 2 * t.batch_size * t.block_size * 8  # int64 (x, y), kept on the device
    history_bytes = histories * fp8_layers(shape) * HISTORY_ROW_BYTES
    return Estimate(params, state, activations, history_bytes, val_batches, keys)


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
        free, source = limit, "left under this cgroup's memory limit"
    else:
        source = "MemAvailable in /proc/meminfo"
    mappable = _address_space_free()
    if mappable is not None and mappable < free:
        return mappable, (
            "left under this process's address-space limit (ulimit -v / RLIMIT_AS: raise it), after the "
            f"{gib(RUNTIME_MAPPINGS + PER_THREAD_MAPPINGS * torch.get_num_threads())} the runtime maps besides tensors"
        )
    return free, source


def address_space_limited() -> bool:
    """This process runs under an address-space limit (``ulimit -v``, RLIMIT_AS)."""
    return resource.getrlimit(resource.RLIMIT_AS)[0] != resource.RLIM_INFINITY


def _address_space_free() -> int | None:
    """Bytes this process can still map under RLIMIT_AS, less what the runtime maps later
    besides tensors (``RUNTIME_MAPPINGS``, ``PER_THREAD_MAPPINGS``); None without a limit."""
    if not address_space_limited():
        return None
    try:
        status = Path("/proc/self/status").read_text()
        mapped = next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmSize:"))
    except (OSError, ValueError, StopIteration):
        return None
    reserve = RUNTIME_MAPPINGS + PER_THREAD_MAPPINGS * torch.get_num_threads()
    return max(resource.getrlimit(resource.RLIMIT_AS)[0] - mapped - reserve, 0)


def is_out_of_memory(err: BaseException) -> bool:
    """``err`` is an allocation that failed: torch's or Python's out-of-memory error, the
    allocator's message, or (under an address-space limit) oneDNN failing to create a kernel,
    which is how a GEMM that cannot map its scratch space fails."""
    text = str(err)
    return isinstance(err, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(err, RuntimeError)
        and (
            "can't allocate memory" in text
            or "not enough memory" in text
            or (address_space_limited() and "could not create a primitive" in text)
        )
    )


def out_of_memory_message(err: BaseException) -> str:
    """What an exit 2 says about an allocation that failed during the run."""
    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    where = f" (this process's address-space limit, ulimit -v, is {gib(limit)})" if address_space_limited() else ""
    return (
        f"out of memory ({type(err).__name__}: {first_line[:300]}). The run needs more memory than this device "
        f"has free{where}; lower train.batch_size, train.block_size or the model size (model.num_layers, "
        "model.hidden_size), or train fewer variants"
    )


def gib(n: int) -> str:
    """``n`` bytes in GiB, or in MiB below 1 GiB (so a small share does not read 0.0 GiB)."""
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


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
        (size, what, keys), *rest = est.shares(config)
        others = "; ".join(f"{w}: {gib(b)}" for b, w, _ in rest)
        raise ResourceError(
            f"the run is too large for this machine: it needs at least {who}{gib(est.total)}, but {gib(free)} are "
            f"{source}. The largest share, {gib(size)}, is {what}: lower {keys} (the rest: {others})"
        )
    return est
