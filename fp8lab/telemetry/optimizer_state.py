"""AdamW moments that underflow their dtype, per layer, at log steps.

Why: without master weights AdamW's state is held in the activations' 16-bit dtype. Its
second moment ``exp_avg_sq`` holds squared gradients, which FP16 (smallest subnormal 2**-24)
flushes far sooner than the gradients themselves; where it is exactly zero and ``exp_avg``
is not, the update is ``lr * exp_avg / eps`` (eps = 1e-8): a step thousands of times larger
than AdamW's normalised one. What is measured, per layer (the module owning the parameters)
and moment: the share of values exactly zero (``zero_pct``), subnormal (``subnormal_pct``),
and for ``exp_avg_sq`` the share that is zero while ``exp_avg`` is not (``m_over_eps_pct``).

With moments stored in FP8/FP16 (``fp8lab.optim.LowPrecisionAdamW``, master weights kept)
``StoredMomentProbe`` reports, per layer and stored moment, ``underflow_pct``: the share of
values that were nonzero in fp32 and are stored as zero (counted by the optimizer on the
steps it is asked to: the runner's log steps).

Invariant: ``read`` runs only when the runner asks for a log step; it counts on the device
and copies the counts to the host once. The optimizer and its state are never written to.
"""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from fp8lab.gemm.fp8_all_gather import local_shard
from fp8lab.telemetry.keys import OPTIMIZER_STATE, Key

MOMENTS = ("exp_avg", "exp_avg_sq")
# The columns of one layer's counts on the device: what read() turns into percentages of its values.
_COUNTS = ("exp_avg_zero", "exp_avg_subnormal", "exp_avg_sq_zero", "exp_avg_sq_subnormal", "m_over_eps")


def params_by_layer(model: nn.Module) -> list[tuple[str, list[nn.Parameter]]]:
    """``model``'s parameters grouped by the module that owns them, in name order."""
    by_layer: dict[str, list[nn.Parameter]] = defaultdict(list)
    for name, param in model.named_parameters():
        by_layer[name.rpartition(".")[0] or name].append(param)
    return sorted(by_layer.items())


class OptimizerStateProbe:
    """Per layer of ``model``, how much of ``optimizer``'s AdamW state is zero or subnormal.

    Args:
        model: the variant's (un-wrapped) model.
        optimizer: its AdamW (state ``exp_avg`` and ``exp_avg_sq`` per parameter).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.layers = params_by_layer(model)
        self.optimizer = optimizer

    def _counts(self, params: list[nn.Parameter], device: torch.device) -> tuple[int, torch.Tensor]:
        """(values counted, from tensor metadata; the counts of ``_COUNTS``, on the device)."""
        values, counts = 0, torch.zeros(len(_COUNTS), dtype=torch.int64, device=device)
        for param in params:
            state = self.optimizer.state.get(param, {})
            if "exp_avg" not in state:
                continue  # no step yet
            values += param.numel()
            m, v = local_shard(state["exp_avg"]), local_shard(state["exp_avg_sq"])  # FSDP: this rank's
            tiny = torch.finfo(m.dtype).tiny  # the smallest normal value
            m_zero, v_zero = m == 0, v == 0
            counts += torch.stack(
                [
                    m_zero.sum(),
                    ((m.abs() < tiny) & ~m_zero).sum(),
                    v_zero.sum(),
                    ((v < tiny) & ~v_zero).sum(),
                    (v_zero & ~m_zero).sum(),
                ]
            )
        return values, counts

    def read(self) -> dict[str, float]:
        """``{"optimizer_state/<layer>/<moment>/<stat>": %}`` now (one host copy)."""
        device = next(p.device for _, params in self.layers for p in params)
        values, counts = zip(*(self._counts(params, device) for _, params in self.layers))
        counts = torch.stack(counts)
        if any(isinstance(p, DTensor) for _, params in self.layers for p in params):
            torch.distributed.all_reduce(counts)  # FSDP: the shards' counts add up (integers: exact)
        host = counts.tolist()
        out = {}
        for (layer, _), total, row in zip(self.layers, values, host):
            counted = dict(zip(_COUNTS, row))
            if not total:
                continue
            for moment in MOMENTS:
                for stat in ("zero", "subnormal"):
                    pct = 100.0 * counted[f"{moment}_{stat}"] / total
                    out[Key(OPTIMIZER_STATE, layer, moment=moment, stat=f"{stat}_pct").tag] = pct
            pct = 100.0 * counted["m_over_eps"] / total
            out[Key(OPTIMIZER_STATE, layer, moment="exp_avg_sq", stat="m_over_eps_pct").tag] = pct
        return out


class StoredMomentProbe:
    """Per layer of ``model``, the underflow % of each moment ``optimizer`` stores below fp32.

    Args:
        model: the variant's (un-wrapped) model.
        optimizer: a ``fp8lab.optim.LowPrecisionAdamW``; its ``underflow`` counts (int64 [2]
            per parameter, on the device) of the last step that had ``track_underflow`` set.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        self.layers = params_by_layer(model)
        self.optimizer = optimizer
        group_of = {p: g for g in optimizer.param_groups for p in g["params"]}
        # the moments each layer stores below fp32 (an fp32 moment never underflows here)
        self.moments = {
            layer: [m for m in MOMENTS if any(group_of[p][f"{m}_dtype"] != "fp32" for p in params if p in group_of)]
            for layer, params in self.layers
        }

    def read(self) -> dict[str, float]:
        """``{"optimizer_state/<layer>/<moment>/underflow_pct": %}`` of the last tracked step
        (one host copy); layers with no count yet are left out."""
        rows, totals = [], []
        for _, params in self.layers:
            counted = [self.optimizer.underflow[p] for p in params if p in self.optimizer.underflow]
            totals.append(sum(p.numel() for p in params if p in self.optimizer.underflow))
            rows.append(torch.stack(counted).sum(0) if counted else None)
        present = [row for row in rows if row is not None]
        host = iter(torch.stack(present).tolist() if present else [])
        out = {}
        for (layer, _), row, total in zip(self.layers, rows, totals):
            if row is None:
                continue
            counts = dict(zip(MOMENTS, next(host)))
            for moment in self.moments[layer]:
                out[Key(OPTIMIZER_STATE, layer, moment=moment, stat="underflow_pct").tag] = (
                    100.0 * counts[moment] / total
                )
        return out
