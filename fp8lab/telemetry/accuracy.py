"""Weight drift: how far an FP8 model's weights moved from its BF16 twin's.

Invariant: read at log steps only, after both models took the same optimizer step (same
initial weights, same batches). For every fp8lab GEMM layer of the FP8 model, whatever
precision it runs (a layer kept in BF16 drifts too when the layers before it do), and its
same-named layer in the reference:

    accuracy/<layer>/weight_rel_diff = ||W_fp8 - W_bf16||_F / ||W_bf16||_F

computed on the device in float32; ``read`` is one device-to-host copy. Nothing here runs
between log steps. (The per-GEMM output SQNRs, ``accuracy/<layer>/<gemm>_sqnr_db``, are
measured inside the FP8 GEMMs and read by ``ScalingCollector``.)
"""

from __future__ import annotations

import torch
from torch import nn

from fp8lab.gemm.fp8_all_gather import whole_tensor
from fp8lab.layers.linear import Linear
from fp8lab.telemetry.keys import ACCURACY, Key


class WeightDrift:
    """The relative weight difference of ``model``'s GEMM layers from ``reference``'s.

    Args:
        model: the FP8 model (its fp8lab.Linear layers are the rows).
        reference: the BF16 twin; a layer of the same qualified name with a ``weight`` of
            the same shape is compared, any other is left out.
    """

    def __init__(self, model: nn.Module, reference: nn.Module):
        ref = dict(reference.named_modules())
        self.pairs = [
            (name, m.weight, ref[name].weight)
            for name, m in model.named_modules()
            if isinstance(m, Linear)
            and name in ref
            and getattr(ref[name], "weight", None) is not None
            and ref[name].weight.shape == m.weight.shape
        ]

    def compute(self) -> torch.Tensor:
        """(n_layers,) float32 relative differences, on the device (no host copy)."""
        if not self.pairs:
            return torch.zeros(0)
        with torch.no_grad():  # FSDP: the whole weights (a gather per layer, log steps only)
            pairs = [(whole_tensor(w), whole_tensor(w_ref)) for _, w, w_ref in self.pairs]
            diffs = [torch.linalg.vector_norm(w.float() - w_ref.float()) for w, w_ref in pairs]
            norms = [torch.linalg.vector_norm(w_ref.float()) for _, w_ref in pairs]
            return torch.stack(diffs) / torch.stack(norms).clamp_min(torch.finfo(torch.float32).tiny)

    def read(self) -> dict[str, float]:
        """{"accuracy/<layer>/weight_rel_diff": value}: one device-to-host copy (log steps)."""
        host = self.compute().cpu().tolist()
        return {Key(ACCURACY, name, stat="weight_rel_diff").tag: value for (name, _, _), value in zip(self.pairs, host)}
