"""FP8Weight: a tensor held as FP8 codes and the inverse scale they were cast with.

Invariant: an ``FP8Weight`` holds ``codes`` (a float8 tensor of its shape) and ``scale_inv``
(fp32, 0-dim: 1/scale of the cast that made the codes); its value is Transformer Engine's
``Float8Tensor.dequantize``, ``codes.float() * scale_inv`` in fp32. It reports dtype float32
so that autograd gives it fp32 gradients (as TE's Float8Tensor reports its nominal dtype);
every op but the quantized GEMM (``fp8lab.gemm.qlinear``, which takes the codes as they are)
sees that dequantized value, and an op that would write into it raises: it changes only by
a cast (``fp8lab.layers.fp8_weight.cast_into``).
"""

from __future__ import annotations

import torch
from torch.utils._pytree import tree_map

from fp8lab.scaling.protocol import Operand


class FP8Weight(torch.Tensor):
    """A weight parameter held as FP8 codes and the inverse scale they were cast with.

    Args:
        codes: the FP8 codes (a float8 tensor; E4M3 for every fp8lab weight).
        scale_inv: fp32 0-dim tensor, 1/scale of the cast.
    """

    @staticmethod
    def __new__(cls, codes: torch.Tensor, scale_inv: torch.Tensor):
        return torch.Tensor._make_wrapper_subclass(
            cls, codes.shape, dtype=torch.float32, device=codes.device, requires_grad=False
        )

    def __init__(self, codes: torch.Tensor, scale_inv: torch.Tensor):
        self.codes, self.scale_inv = codes, scale_inv

    def dequantize(self) -> torch.Tensor:
        """The weight's value: ``codes * scale_inv`` in fp32 (TE's ``Float8Tensor.dequantize``;
        one fp32 rounding of the product)."""
        return self.codes.float() * self.scale_inv

    def operand(self, backend, fmt) -> Operand:
        """The codes as ``backend``'s GEMM takes an FP8 weight, with their inverse scale."""
        return Operand(backend.fp8_values(self.codes), self.scale_inv, fmt)

    def __repr__(self, *, tensor_contents=None) -> str:
        return f"FP8Weight(shape={tuple(self.shape)}, codes={self.codes.dtype}, scale_inv={self.scale_inv})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.ops.aten.detach.default, torch.ops.aten.alias.default):
            return FP8Weight(args[0].codes, args[0].scale_inv)  # a view: the same codes
        if func._schema.is_mutable and any(isinstance(a, FP8Weight) for a in args):
            raise TypeError(
                f"{func} would write into an FP8 primary weight; it changes only by a cast "
                "(fp8lab.layers.fp8_weight.cast_into, called by fp8lab.optim.FP8WeightUpdate)"
            )
        deq = lambda t: t.dequantize() if isinstance(t, FP8Weight) else t  # noqa: E731
        return func(*tree_map(deq, args), **tree_map(deq, kwargs))

    __torch_function__ = torch._C._disabled_torch_function_impl
