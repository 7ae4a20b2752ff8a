"""The scaling collector: per-layer scale, amax and cast statistics, read at log steps.

Invariant: between log steps nothing here runs and no layer computes statistics. The
collector reads layers only through ``layer.scaling_view()`` (so it imports no backend;
a Transformer Engine layer syncs from TE inside its view) and writes only the layers'
telemetry slots and the fault counters it drains. On a log step it arms every FP8
layer's TelemetrySlot before the forward, snapshots the views on the device after the
backward (before ``update_scales`` rolls row 0 away), and after the update reads snapshot
and fault counts with ONE device-to-host copy. That copy is a sync point, by design only
here. On the same step it reads each layer's output SQNR against its BF16 shadow
(``accuracy/<layer>/<fprop|dgrad|wgrad>_sqnr_db``), in the same copy, and the scale, amax
and cast statistics of each FP8 attention core's tensors (``fp8_dpa``):
``scaling/<attention fqn>.dpa/<qkv|s|o|dqkv|do|dp>/<stat>``, and the output SQNR of its six
GEMMs against their BF16 twins, ``accuracy/<attention fqn>.dpa/<s|o|dv|dp|dq|dk>_sqnr_db``,
kept apart from the layers' rows (whose roles are input, weight, grad_output) in
``LayerStats.attention``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from fp8lab.formats import GEMM_NAMES, ROLE_NAMES
from fp8lab.layers.attention import MultiheadAttention
from fp8lab.layers.fp8_attention import BWD_TENSORS, FWD_TENSORS, GEMMS
from fp8lab.layers.linear import Linear
from fp8lab.quantize.blocks import BLOCK_STAT_NAMES
from fp8lab.quantize.tensor import STAT_NAMES
from fp8lab.scaling.whatif import WHATIF_RECIPES
from fp8lab.telemetry.keys import ACCURACY, SCALING, WHATIF, Key

# Per-role statistics of one layer's snapshot: scale, amax, the cast statistics and the
# block-scale statistics (each (n_layers, 3 roles) in ``LayerStats.values``).
FIELDS = ("scale", "amax") + STAT_NAMES + BLOCK_STAT_NAMES
# Fields a scaling may not have (NaN then, and not logged): a block scaling has no single
# scale, a per-tensor scaling no block statistics. (The what-if rows a layer cannot have are
# NaN too: delayed scaling on another recipe's layer, any recipe on a Transformer Engine one.)
OPTIONAL = ("scale",) + BLOCK_STAT_NAMES
NONFINITE = "nonfinite_amax"  # casts that met NaN/inf since the previous log step, per role
SHADOW = "shadow_sqnr_db"  # per GEMM (fprop, dgrad, wgrad): output SQNR against BF16
ACCUM = "accum_sqnr_db"  # per GEMM: output SQNR against the same GEMM accumulated in fp32
_WHATIF_ROWS = len(WHATIF_RECIPES) * len(STAT_NAMES)
_ROWS = len(FIELDS) + _WHATIF_ROWS + 3  # + the shadow and accumulator SQNR rows and the fault counts


@dataclass(frozen=True)
class LayerStats:
    """Host-side snapshot of one log step, structured (nothing here is a tag string).

    Attributes:
        layers: the FP8 layers' qualified names (rows of every array).
        values: ``FIELDS`` and ``NONFINITE`` -> (n_layers, 3 roles).
        whatif: (n_layers, 3 roles, len(WHATIF_RECIPES), len(STAT_NAMES)): what every recipe
            would have done to each role's tensor (NaN: not measured).
        shadow: (n_layers, 3 GEMMs): each GEMM's output SQNR against BF16 (NaN: not measured).
        accum: (n_layers, 3 GEMMs): each GEMM's output SQNR against the same GEMM accumulated
            in fp32 (NaN: an fp32 accumulator, or not measured).
        attention: {FP8 attention core's name: (6, len(ATTENTION_FIELDS) + 1)}: row i holds
            scale, amax and cast statistics of tensor ``ATTENTION_TENSORS[i]``, then the
            BF16-twin output SQNR of GEMM ``fp8_attention.GEMMS[i]`` (NaN: not measured).
        attention_faults: {FP8 attention core's name: (6,)}: casts of each of its tensors
            that met NaN or inf since the previous log step (as ``NONFINITE`` of a layer).
    """

    layers: tuple[str, ...]
    values: dict[str, np.ndarray]
    whatif: np.ndarray
    shadow: np.ndarray
    accum: np.ndarray
    attention: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)
    attention_faults: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @classmethod
    def empty(cls) -> LayerStats:
        return cls(
            (),
            {f: np.zeros((0, 3)) for f in FIELDS + (NONFINITE,)},
            np.zeros((0, 3, len(WHATIF_RECIPES), len(STAT_NAMES))),
            np.zeros((0, 3)),
            np.zeros((0, 3)),
        )

    def column(self, field: str) -> np.ndarray:
        """(n_layers, 3) of a per-role field, or of ``SHADOW`` / ``ACCUM`` (per GEMM)."""
        return {SHADOW: self.shadow, ACCUM: self.accum}.get(field, self.values.get(field))

    def items(self):
        """(Key, value) of every value a log step writes: each layer's per-role scaling
        statistics (an ``OPTIONAL`` one only where its scaling has it), its what-if rows and
        the output SQNR of each GEMM against BF16 (only those measured)."""
        for i, layer in enumerate(self.layers):
            for r, role in enumerate(ROLE_NAMES):
                for field in FIELDS:
                    value = float(self.values[field][i, r])
                    if not (field in OPTIONAL and math.isnan(value)):
                        yield Key(SCALING, layer, role, stat=field), value
                for j, recipe in enumerate(WHATIF_RECIPES):
                    for k, stat in enumerate(STAT_NAMES):
                        value = float(self.whatif[i, r, j, k])
                        if not math.isnan(value):
                            yield Key(WHATIF, layer, role, recipe, stat), value
            for g, gemm in enumerate(GEMM_NAMES):
                for array, stat in ((self.shadow, f"{gemm}_sqnr_db"), (self.accum, f"{gemm}_accum_sqnr_db")):
                    value = float(array[i, g])
                    if not math.isnan(value):
                        yield Key(ACCURACY, layer, stat=stat), value
        for core, values in self.attention.items():
            for t, tensor in enumerate(ATTENTION_TENSORS):
                for f, stat in enumerate(ATTENTION_FIELDS):
                    value = float(values[t, f])
                    if not math.isnan(value):
                        yield Key(SCALING, core, tensor, stat=stat), value
                value = float(values[t, -1])
                if not math.isnan(value):
                    yield Key(ACCURACY, core, stat=f"{GEMMS[t]}_sqnr_db"), value

    def scalars(self) -> dict[str, float]:
        """{tag: value} of ``items`` for the TensorBoard writer."""
        return {key.tag: value for key, value in self.items()}


ATTENTION_TENSORS = FWD_TENSORS + BWD_TENSORS  # qkv, s, o, dqkv, do, dp
ATTENTION_FIELDS = ("scale", "amax") + STAT_NAMES


def fp8_attention_cores(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, core) of every FP8 attention core (``MultiheadAttention.dpa``) that runs
    FP8 on its layer's device."""
    return [
        (f"{name}.dpa" if name else "dpa", m.dpa)
        for name, m in model.named_modules()
        if isinstance(m, MultiheadAttention) and m.dpa_runs(m.qkv.weight.device)
    ]


def fp8_layers(model: nn.Module) -> list[tuple[str, Linear]]:
    """(qualified name, layer) of every fp8lab Linear that runs FP8 on its device."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, Linear) and m.plan().precision == "fp8"]


def _per_gemm(view, sqnr: torch.Tensor | None) -> torch.Tensor:
    """(3,) one SQNR per GEMM of the view; NaN where not measured (TE)."""
    if sqnr is None:
        return torch.full((3,), float("nan"), dtype=torch.float32, device=view.scale.device)
    return sqnr


class ScalingCollector:
    """Reads the scaling of every FP8 layer of ``model``.

    Args:
        model: the model; its FP8 layers are found once, here.
    """

    def __init__(self, model: nn.Module):
        self.layers = fp8_layers(model)
        self.names = tuple(name for name, _ in self.layers)
        self.attention = fp8_attention_cores(model)

    def _views(self) -> list:
        return [layer.scaling_view() for _, layer in self.layers]

    def _fault_counters(self) -> list[torch.Tensor]:
        """The (3,) fault counters to drain: each layer's (per role), then each FP8 attention
        core's forward and backward states' (per tensor: qkv, s, o; dqkv, do, dp)."""
        cores = [state.faults for _, core in self.attention for state in (core.scaling_fwd, core.scaling_bwd)]
        return [v.faults for v in self._views()] + cores

    def arm(self, whatif: bool = True) -> None:
        """Ask every layer to compute cast statistics during the coming step, and the
        what-if statistics of every scaling recipe when ``whatif``."""
        for _, layer in self.layers:
            layer.telemetry.arm(layer.weight.device, whatif=whatif)
        for _, core in self.attention:
            core.telemetry.arm(core.scaling_fwd.scale.device)

    def snapshot(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """Scale, amax (row 0), cast stats and output SQNR against BF16 of every layer, and
        (second) scale, amax and cast stats of every FP8 attention core's tensors, on the
        device, before update_scales rolls row 0 away; disarms them. No host copy."""
        if not self.layers:
            return None
        for _, layer in self.layers:
            layer.telemetry.disarm()
        for _, core in self.attention:
            core.telemetry.disarm()
        attention = torch.stack([core.telemetry_snapshot() for _, core in self.attention]) if self.attention else None
        return self._layer_snapshot(), attention

    def _layer_snapshot(self) -> torch.Tensor:
        rows = []
        for v in self._views():

            def nan(n: int, device=v.scale.device) -> torch.Tensor:
                return torch.full((3, n), float("nan"), device=device)

            blocks = v.block_stats if v.block_stats is not None else nan(len(BLOCK_STAT_NAMES))
            whatif = v.whatif.reshape(3, -1) if v.whatif is not None else nan(_WHATIF_ROWS)
            rows.append(
                torch.cat(
                    [
                        v.scale[None],
                        v.amax[None],
                        v.cast_stats.t(),
                        blocks.t(),
                        whatif.t(),
                        _per_gemm(v, v.shadow_sqnr)[None],
                        _per_gemm(v, v.accum_sqnr)[None],
                    ]
                )
            )  # (_ROWS - 1, 3)
        return torch.stack(rows)  # (n_layers, _ROWS - 1, 3)

    def read(self, snapshot: torch.Tensor | None) -> LayerStats:
        """``read_with`` without other values."""
        return self.read_with(snapshot, ())[0]

    def read_with(self, snapshot, extra: tuple[torch.Tensor, ...]) -> tuple[LayerStats, list[float]]:
        """The snapshot plus the non-finite amaxes counted by this step's update_scales, and
        the 0-dim ``extra`` tensors (the step's counters), copied to the host together: the one
        sync of a log step. Drains the fault counts. Returns (stats, [extra values])."""
        parts = [torch.stack([t.float() for t in extra])] if extra else []
        snapshot, attention = snapshot if snapshot is not None else (None, None)
        if snapshot is not None:
            counters = self._fault_counters()
            n = len(self.names)
            faults = torch.stack(counters[:n])[:, None]  # (n, 1, 3)
            parts.append(torch.cat([snapshot, faults], dim=1).float().reshape(-1))  # (n_layers * _ROWS * 3,)
        n_attention = 0 if attention is None else attention.numel() + 6 * len(self.attention)
        if attention is not None:
            parts.append(attention.float().reshape(-1))  # (n_cores * 6 * len(ATTENTION_FIELDS),), same copy
            parts.append(torch.stack(counters[n:]).float().reshape(-1))  # (n_cores * 6,) fault counts
        flat = torch.cat([p.to(parts[0].device) for p in parts]).cpu().numpy() if parts else np.zeros(0)
        host_extra = flat[: len(extra)].tolist()
        if snapshot is None:
            return LayerStats.empty(), host_extra
        torch._foreach_zero_(counters)
        tail = flat[len(flat) - n_attention :]
        n_cores, width = len(self.attention), len(ATTENTION_FIELDS) + 1
        host_attention = tail[: tail.size - 6 * n_cores].reshape(-1, len(ATTENTION_TENSORS), width)
        host_faults = tail[tail.size - 6 * n_cores :].reshape(n_cores, len(ATTENTION_TENSORS))
        attention_stats = {name: host_attention[i] for i, (name, _) in enumerate(self.attention)}
        attention_faults = {name: host_faults[i] for i, (name, _) in enumerate(self.attention)}
        host = flat[len(extra) : len(flat) - n_attention].reshape(n, _ROWS, 3)
        values = {f: host[:, i, :] for i, f in enumerate(FIELDS)} | {NONFINITE: host[:, -1, :]}
        per_role = host[:, len(FIELDS) : len(FIELDS) + _WHATIF_ROWS, :]
        whatif = per_role.transpose(0, 2, 1).reshape(n, 3, len(WHATIF_RECIPES), len(STAT_NAMES))
        stats = LayerStats(
            self.names, values, whatif, host[:, -3, :], host[:, -2, :], attention_stats, attention_faults
        )
        return stats, host_extra

    def faults(self) -> torch.Tensor:
        """(n_layers + 2 * n_attention_cores, 3) non-finite amax counts not yet collected (for
        checkpoints): the layers' rows, then two per FP8 attention core (forward, backward)."""
        if not self.layers:
            return torch.zeros(0, 3)
        return torch.stack(self._fault_counters()).cpu()

    def load_faults(self, faults: torch.Tensor) -> None:
        """Rows as ``faults`` returns them (a checkpoint from before the attention rows existed
        has only the layers' rows; the cores' counters then start at zero)."""
        for counter, row in zip(self._fault_counters(), faults):
            counter.copy_(row)

    def histories(self) -> dict[str, np.ndarray]:
        """Each delayed-scaling layer's whole amax history (H, 3: ``ROLE_NAMES``) and each FP8
        attention core's (H, 6: ``ATTENTION_TENSORS``, its two states side by side) on the host
        (histograms)."""
        found = [(name, v.amax_history) for name, v in zip(self.names, self._views()) if v.amax_history is not None]
        found += [
            (name, torch.cat([core.scaling_fwd.amax_history, core.scaling_bwd.amax_history], dim=1))
            for name, core in self.attention
        ]
        if not found:
            return {}
        if len({h.shape for _, h in found}) == 1:  # one copy when all windows are alike
            return dict(zip([name for name, _ in found], torch.stack([h for _, h in found]).cpu().numpy()))
        return {name: h.cpu().numpy() for name, h in found}
