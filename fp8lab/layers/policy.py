"""PrecisionPolicy: which FP8-capable layers a model keeps out of FP8 (in BF16), and why.

Invariant: a policy only ever moves layers from FP8 to its ``precision`` (BF16 unless the
activations are FP16), through ``Linear.keep_out_of_fp8(reason, precision)``, and every
layer it moves carries a reason naming the rule that moved it (shown by
``fp8lab.describe``). Names are the qualified names of ``model.named_modules()``.

Two kinds of rule:
- ``keep_bf16``: fnmatch patterns on the layer's name ("lm_head", "blocks.0.*");
- ``first_last_bf16=N``: Megatron-style, every layer under ``blocks.<i>.`` with i < N
  or i >= len(blocks) - N (the first and last blocks are the most sensitive to FP8).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from torch import nn

from fp8lab.gemm.exact import ROUNDED_DTYPES
from fp8lab.layers.linear import Linear

_BLOCK_NAME = re.compile(r"^(?P<prefix>(?:.*\.)?blocks)\.(?P<index>\d+)\.")


@dataclass(frozen=True, kw_only=True)
class PrecisionPolicy:
    """The default keeps only the LM head in BF16, as Transformer Engine recipes do.

    Args:
        keep_bf16: fnmatch patterns on qualified layer names to keep in BF16.
        first_last_bf16: keep the first N and the last N transformer blocks in BF16.
        precision: what the kept layers run in: "bf16", or the activations' precision
            when they are not BF16 ("fp16" for an FP8 model with FP16 activations).
    """

    keep_bf16: tuple[str, ...] = ("lm_head",)
    first_last_bf16: int = 0
    precision: str = "bf16"

    def __post_init__(self) -> None:
        if isinstance(self.keep_bf16, str) or not all(isinstance(p, str) for p in self.keep_bf16):
            raise ValueError(f"keep_bf16 must be a tuple of name patterns (str), got {self.keep_bf16!r}")
        object.__setattr__(self, "keep_bf16", tuple(self.keep_bf16))
        n = self.first_last_bf16
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"first_last_bf16 must be an int >= 0, got {n!r}")
        if self.precision not in ROUNDED_DTYPES:
            raise ValueError(f"precision must be one of {tuple(ROUNDED_DTYPES)}, got {self.precision!r}")

    def reason_for(self, name: str, model: nn.Module) -> str | None:
        """Why the layer called ``name`` in ``model`` stays out of FP8, or None (it may run FP8)."""
        for pattern in self.keep_bf16:
            if fnmatch.fnmatchcase(name, pattern):
                return f"kept in {self.precision.upper()} by policy pattern {pattern!r}"
        match = _BLOCK_NAME.match(name)
        if self.first_last_bf16 and match:
            n_blocks = len(model.get_submodule(match["prefix"]))
            index = int(match["index"])
            if index < self.first_last_bf16 or index >= n_blocks - self.first_last_bf16:
                return (
                    f"kept in {self.precision.upper()} by policy first_last_bf16={self.first_last_bf16} "
                    f"(block {index} of {n_blocks})"
                )
        return None

    def apply(self, model: nn.Module) -> nn.Module:
        """Keep every matching ``fp8lab.Linear`` in ``model`` in ``precision``; returns ``model``.

        Args:
            model: any module; only its ``fp8lab.Linear`` layers are looked at.
        """
        for name, module in model.named_modules():
            if isinstance(module, Linear):
                reason = self.reason_for(name, model)
                if reason is not None:
                    module.keep_out_of_fp8(reason, self.precision)
        return model
