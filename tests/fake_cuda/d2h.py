"""Counting host syncs: every way a CUDA tensor's values reach the host, and blocking copies.

Invariant: ``D2HCounter`` sits above FakeTensorMode and sees every ATen call (forward,
backward on autograd's threads, optimizer, telemetry). It counts, per kind, the calls that
on a real GPU copy device memory to the host or wait for the device to learn a value:

  item       ``_local_scalar_dense`` of a CUDA tensor (``.item()``, ``float(t)``, ``bool(t)``,
             ``if t:``, printing)
  to_cpu     ``_to_copy`` of a CUDA tensor to the CPU, blocking or ``non_blocking=True``
             (``.cpu()``, ``.to("cpu")``, ``.tolist()``, ``.numpy()`` after ``.cpu()``)
  copy_to_cpu ``copy_`` into a CPU tensor from a CUDA one
  value_dependent ops whose result (shape or bool) needs the values: ``equal``, ``nonzero``,
             ``masked_select``, ``unique``..., and ``is_nonzero``
  h2d_blocking a blocking copy from the CPU to a CUDA tensor (``torch.tensor(v, device=cuda)``,
             ``.to("cuda")``, ``cuda_t.copy_(cpu_t)``): no value comes back, but PyTorch's
             blocking copy (``memcpy_and_sync``) synchronises the stream, so it is a host
             sync as ``torch.cuda.set_sync_debug_mode("error")`` counts them

Fake tensors have no values, so a counted read is answered with zeros (a real CPU tensor,
or 0 / False), which lets the caller go on: the count, not the value, is what a test checks.
Each counted call also records a short stack (the innermost fp8lab frame) in ``where``.
"""

from __future__ import annotations

import collections
import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

aten = torch.ops.aten
VALUE_DEPENDENT = {
    "equal",
    "nonzero",
    "masked_select",
    "unique",
    "_unique",
    "_unique2",
    "unique_consecutive",
    "unique_dim",
    "is_nonzero",
    "allclose",
    "repeat_interleave",
    "bincount",
}


def _on_cuda(x) -> bool:
    return isinstance(x, torch.Tensor) and x.device.type == "cuda"


def _caller() -> str:
    for frame in reversed(traceback.extract_stack()[:-3]):
        if "/fp8lab/" in frame.filename or "/tests/" in frame.filename and "fake_cuda" not in frame.filename:
            return (
                f"{frame.filename.rsplit('/', 2)[-2]}/{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} {frame.name}"
            )
    return "?"


class D2HCounter(TorchDispatchMode):
    """``with D2HCounter() as c: ...``; then ``c.total``, ``c.counts`` (kind -> n), ``c.where``."""

    def __init__(self):
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()
        self.where: list[tuple[str, str]] = []

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def reset(self) -> None:
        self.counts.clear()
        self.where.clear()

    def _count(self, kind: str) -> None:
        self.counts[kind] += 1
        self.where.append((kind, _caller()))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if func is aten._local_scalar_dense.default and _on_cuda(args[0]):
            self._count("item")
            return False if args[0].dtype == torch.bool else 0
        if (
            func is aten._to_copy.default
            and _on_cuda(args[0])
            and torch.device(kwargs.get("device") or "cuda").type == "cpu"
        ):
            self._count("to_cpu")
            with _disable_current_modes():  # a real CPU tensor, so .numpy() and friends work
                return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        if func is aten.copy_.default and args[0].device.type == "cpu" and _on_cuda(args[1]):
            self._count("copy_to_cpu")
            return args[0]
        blocking = not (kwargs.get("non_blocking") or (func is aten.copy_.default and len(args) > 2 and args[2]))
        if (
            blocking
            and func is aten._to_copy.default
            and args[0].device.type == "cpu"
            and torch.device(kwargs.get("device") or "cpu").type == "cuda"
        ):
            self._count("h2d_blocking")
        if blocking and func is aten.copy_.default and _on_cuda(args[0]) and args[1].device.type == "cpu":
            self._count("h2d_blocking")
        if name in VALUE_DEPENDENT and any(_on_cuda(a) for a in args):
            self._count("value_dependent")
        return func(*args, **kwargs)
