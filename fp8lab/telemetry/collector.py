"""The scaling collector: per-layer scale, amax and cast statistics, read at log steps.

Invariant: between log steps nothing here runs and no layer computes statistics. The
collector reads layers only through ``layer.scaling_view()`` (so it imports no backend;
a Transformer Engine layer syncs from TE inside its view) and writes only the layers'
telemetry slots and the fault counters it drains. On a log step it arms every FP8
layer's TelemetrySlot before the forward, snapshots the views on the device after the
backward (before ``update_scales`` rolls row 0 away), and after the update reads snapshot
and fault counts with ONE device-to-host copy. That copy is a sync point, by design only
here. On the same step it reads each layer's output SQNR against its BF16 shadow
(``accuracy/<layer>/<fprop|dgrad|wgrad>_sqnr_db``), in the same copy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fp8lab.formats import GEMM_NAMES, ROLE_NAMES
from fp8lab.layers.linear import Linear
from fp8lab.quantize.tensor import STAT_NAMES
from fp8lab.scaling import SCALINGS
from fp8lab.quantize.blocks import BLOCK_STAT_NAMES

# Rows of one layer's snapshot, each over the 3 roles: scale, amax, the cast statistics,
# the block-scale statistics, and the non-finite casts counted since the previous log step.
# What-if statistics (fp8lab.scaling.whatif): each recipe's cast statistics on the same tensor.
WHATIF = tuple(f"whatif_{recipe}_{stat}" for recipe in SCALINGS for stat in STAT_NAMES)  # recipes in SCALINGS order
FIELDS = ("scale", "amax") + STAT_NAMES + BLOCK_STAT_NAMES + WHATIF
NONFINITE = "nonfinite_amax"
# Fields a scaling may not have (NaN then, and not logged): a block scaling has no single
# scale, a per-tensor scaling no block statistics, a layer without delayed scaling no
# delayed what-if, a Transformer Engine layer no what-if at all.
OPTIONAL = ("scale",) + BLOCK_STAT_NAMES + WHATIF
# One row over the 3 GEMMs (not roles): fprop, dgrad, wgrad output SQNR against BF16.
SHADOW = "shadow_sqnr_db"
ROWS = FIELDS + (SHADOW, NONFINITE)


def tag(layer: str, role: str, field: str) -> str:
    """The TensorBoard tag of one statistic: scaling/... or whatif/<layer>/<role>/<recipe>/<stat>."""
    if field.startswith("whatif_"):
        recipe, stat = field[len("whatif_"):].split("_", 1)
        return f"whatif/{layer}/{role}/{recipe}/{stat}"
    return f"scaling/{layer}/{role}/{field}"


@dataclass(frozen=True)
class LayerStats:
    """Host-side snapshot: ``values[name]`` is (n_layers, 3 roles) for each field."""

    layers: tuple[str, ...]
    values: dict[str, np.ndarray]

    def scalars(self) -> dict[str, float]:
        """{tag: value} for the TensorBoard writer (``tag``): every field a layer's scaling
        has (an optional field that is NaN is one it does not have), and the output SQNR
        against BF16 as "accuracy/<layer>/<gemm>_sqnr_db" (a GEMM not measured is left out)."""
        out = {tag(layer, role, field): v for layer, role, field, v in self.rows() if not (field in OPTIONAL and math.isnan(v))}
        return out | self.accuracy_scalars()

    def accuracy_scalars(self) -> dict[str, float]:
        """{"accuracy/<layer>/<fprop|dgrad|wgrad>_sqnr_db": dB} of the measured GEMMs."""
        shadow = self.values.get(SHADOW)
        if shadow is None:
            return {}
        return {f"accuracy/{layer}/{gemm}_sqnr_db": float(shadow[i, g])
                for i, layer in enumerate(self.layers) for g, gemm in enumerate(GEMM_NAMES)
                if not math.isnan(float(shadow[i, g]))}

    def rows(self):
        """(layer, role, field, value) for every scaling entry, for writers and reports."""
        for i, layer in enumerate(self.layers):
            for r, role in enumerate(ROLE_NAMES):
                for field in FIELDS:
                    yield layer, role, field, float(self.values[field][i, r])


def fp8_layers(model: nn.Module) -> list[tuple[str, Linear]]:
    """(qualified name, layer) of every fp8lab Linear that runs FP8 on its device."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Linear) and m.plan().precision == "fp8"]


def _shadow(view) -> torch.Tensor:
    """(3,) output SQNR of the view's GEMMs against BF16; NaN where not measured (TE)."""
    if view.shadow_sqnr is None:
        return torch.full((3,), float("nan"), dtype=torch.float32, device=view.scale.device)
    return view.shadow_sqnr


class ScalingCollector:
    """Reads the scaling of every FP8 layer of ``model``.

    Args:
        model: the model; its FP8 layers are found once, here.
    """

    def __init__(self, model: nn.Module):
        self.layers = fp8_layers(model)
        self.names = tuple(name for name, _ in self.layers)

    def _views(self) -> list:
        return [layer.scaling_view() for _, layer in self.layers]

    def arm(self, whatif: bool = True) -> None:
        """Ask every layer to compute cast statistics during the coming step, and the
        what-if statistics of every scaling recipe when ``whatif``."""
        for _, layer in self.layers:
            layer.telemetry.arm(layer.weight.device, whatif=whatif)

    def snapshot(self) -> torch.Tensor | None:
        """Scale, amax (row 0), cast stats and output SQNR against BF16 of every layer, on
        the device, before update_scales rolls row 0 away; disarms the layers. No host copy."""
        if not self.layers:
            return None
        for _, layer in self.layers:
            layer.telemetry.disarm()
        rows = []
        for v in self._views():
            nan = lambda n: torch.full((3, n), float("nan"), device=v.scale.device)  # noqa: E731
            blocks = v.block_stats if v.block_stats is not None else nan(len(BLOCK_STAT_NAMES))
            whatif = v.whatif.reshape(3, -1) if v.whatif is not None else nan(len(WHATIF))
            rows.append(torch.cat([v.scale[None], v.amax[None], v.cast_stats.t(), blocks.t(), whatif.t(),
                                   _shadow(v)[None]]))  # (len(FIELDS) + 1, 3)
        return torch.stack(rows)  # (n_layers, len(FIELDS) + 1, 3)

    def read(self, snapshot: torch.Tensor | None) -> LayerStats:
        """The snapshot plus the non-finite amaxes counted by this step's update_scales,
        copied to the host together: the one sync of a log step. Drains the fault counts."""
        if snapshot is None:
            return LayerStats((), {f: np.zeros((0, 3)) for f in ROWS})
        counters = [v.faults for v in self._views()]
        faults = torch.stack(counters)[:, None]  # (n, 1, 3)
        host = torch.cat([snapshot, faults], dim=1).float().cpu().numpy()  # (n_layers, len(ROWS), 3)
        torch._foreach_zero_(counters)
        return LayerStats(self.names, {f: host[:, i, :] for i, f in enumerate(ROWS)})

    def faults(self) -> torch.Tensor:
        """(n_layers, 3) non-finite amax counts not yet collected (for checkpoints)."""
        if not self.layers:
            return torch.zeros(0, 3)
        return torch.stack([v.faults for v in self._views()]).cpu()

    def load_faults(self, faults: torch.Tensor) -> None:
        for view, row in zip(self._views(), faults):
            view.faults.copy_(row)

    def histories(self) -> dict[str, np.ndarray]:
        """Each delayed-scaling layer's whole amax history (H, 3) on the host (histograms)."""
        found = [(name, v.amax_history) for name, v in zip(self.names, self._views()) if v.amax_history is not None]
        if not found:
            return {}
        if len({h.shape for _, h in found}) == 1:  # one copy when all windows are alike
            return dict(zip([name for name, _ in found], torch.stack([h for _, h in found]).cpu().numpy()))
        return {name: h.cpu().numpy() for name, h in found}
