"""TelemetrySlot: where a layer's quantized GEMM leaves what telemetry reads.

Invariant: the slot belongs to its layer (``layer.telemetry``), never to the scaling
state: it is not saved with the model, not reduced across ranks and not read by
``update_scales``. Only the telemetry collector arms it, for one log step, and reads it
(through ``layer.scaling_view()``); the quantized GEMM measures and writes statistics only
while it is armed, so between log steps nothing is measured (cast statistics, what-if
statistics, and ``shadow_sqnr``, the output SQNR of each of the layer's FP8 GEMMs against
its BF16 shadow, ``fp8lab.gemm.shadow``). The one thing written on every training step is
``faults``, the count of casts that met NaN or inf, for scalings without a ScalingState (a
device-side add, never read on the host between log steps).
"""

from __future__ import annotations

import torch

from fp8lab.quantize.blocks import BLOCK_STAT_NAMES
from fp8lab.quantize.tensor import STAT_NAMES
from fp8lab.scaling.whatif import WHATIF_RECIPES


class TelemetrySlot:
    """One layer's armed flag, its casts' statistics (3 roles x ``STAT_NAMES``), the output
    SQNR against BF16 (3 GEMMs, ``fp8lab.formats.GEMM_NAMES``; NaN: that GEMM did not run),
    and, for scalings without persistent state, each role's scale and amax of the armed step,
    block statistics (3 x ``BLOCK_STAT_NAMES``) and fault counts."""

    def __init__(self) -> None:
        self.armed = False  # a host bool: checking it never touches the device
        self.whatif_armed = False  # while armed: also the what-if statistics
        self.cast_stats: torch.Tensor | None = None  # (3, len(STAT_NAMES)) float32, once armed
        self.scale_amax: torch.Tensor | None = None  # (3, 2): the armed step's scale, amax
        self.block_stats: torch.Tensor | None = None  # (3, len(BLOCK_STAT_NAMES))
        self.faults: torch.Tensor | None = None  # (3,) casts with NaN/inf, since drained
        self.whatif: torch.Tensor | None = None  # (3, recipes, len(STAT_NAMES)): fp8lab.scaling.whatif
        self.shadow_sqnr: torch.Tensor | None = None  # (3,) float32 dB: fprop, dgrad, wgrad
        # (3,) float32 dB: each GEMM's output against the same GEMM accumulated in fp32 (what
        # its accumulator alone costs; NaN for an fp32 accumulator or a GEMM that did not run)
        self.accum_sqnr: torch.Tensor | None = None

    def arm(self, device: torch.device, whatif: bool = True) -> None:
        """Ask for statistics during the coming step, the what-if statistics only when
        ``whatif`` (NaN otherwise, so nothing stale is logged). Buffers are made on first
        use; values a scaling does not have stay NaN."""
        if self.cast_stats is None or self.cast_stats.device != device:
            nan = dict(dtype=torch.float32, device=device)
            self.cast_stats = torch.full((3, len(STAT_NAMES)), float("nan"), **nan)
            self.scale_amax = torch.full((3, 2), float("nan"), **nan)
            self.block_stats = torch.full((3, len(BLOCK_STAT_NAMES)), float("nan"), **nan)
            self.whatif = torch.full((3, len(WHATIF_RECIPES), len(STAT_NAMES)), float("nan"), **nan)
        if self.shadow_sqnr is None or self.shadow_sqnr.device != device:
            self.shadow_sqnr = torch.empty(3, dtype=torch.float32, device=device)
            self.accum_sqnr = torch.empty(3, dtype=torch.float32, device=device)
        self.shadow_sqnr.fill_(float("nan"))  # a GEMM that does not run this step stays unmeasured
        self.accum_sqnr.fill_(float("nan"))
        if not whatif:
            self.whatif.fill_(float("nan"))
        self.whatif_armed = whatif
        self.armed = True

    def disarm(self) -> None:
        self.armed = False

    def fault_counts(self, device: torch.device) -> torch.Tensor:
        if self.faults is None or self.faults.device != device:
            self.faults = torch.zeros(3, dtype=torch.float32, device=device)
        return self.faults

    def count_faults(self, role: int, raw_amax: torch.Tensor) -> None:
        """One more cast of ``role`` that met NaN or inf, when ``raw_amax`` is not finite."""
        self.fault_counts(raw_amax.device)[role].add_(~torch.isfinite(raw_amax))

    def record_scale(self, role: int, scale: torch.Tensor, amax: torch.Tensor) -> None:
        self.scale_amax[role, 0] = scale
        self.scale_amax[role, 1] = amax

    def record_blocks(self, role: int, block_stats: torch.Tensor, amax: torch.Tensor) -> None:
        self.block_stats[role] = block_stats
        self.scale_amax[role, 1] = amax
