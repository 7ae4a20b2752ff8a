"""TelemetrySlot: where a layer's quantized GEMM leaves its cast statistics for telemetry.

Invariant: the slot belongs to its layer (``layer.telemetry``), never to the scaling
state: it is not saved, not reduced across ranks and not read by ``update_scales``. Only
the telemetry collector arms it, for one log step, and reads it (through
``layer.scaling_view()``); the quantized GEMM computes and writes ``cast_stats`` only
while it is armed, so between log steps no statistics are computed. The same holds for ``shadow_sqnr``, the
output SQNR of each of the layer's FP8 GEMMs against its BF16 shadow (``fp8lab.gemm.shadow``).
"""

from __future__ import annotations

import torch

from fp8lab.quantize import STAT_NAMES


class TelemetrySlot:
    """One layer's armed flag, cast statistics (3 roles x ``STAT_NAMES``) and output SQNR
    against BF16 (3 GEMMs, ``fp8lab.formats.GEMM_NAMES``; NaN: that GEMM did not run)."""

    def __init__(self) -> None:
        self.armed = False  # a host bool: checking it never touches the device
        self.cast_stats: torch.Tensor | None = None  # (3, len(STAT_NAMES)) float32, once armed
        self.shadow_sqnr: torch.Tensor | None = None  # (3,) float32 dB: fprop, dgrad, wgrad

    def arm(self, device: torch.device) -> None:
        """Ask for statistics during the coming step (the buffer is made on first use)."""
        if self.cast_stats is None or self.cast_stats.device != device:
            self.cast_stats = torch.zeros(3, len(STAT_NAMES), dtype=torch.float32, device=device)
        if self.shadow_sqnr is None or self.shadow_sqnr.device != device:
            self.shadow_sqnr = torch.empty(3, dtype=torch.float32, device=device)
        self.shadow_sqnr.fill_(float("nan"))  # a GEMM that does not run this step stays unmeasured
        self.armed = True

    def disarm(self) -> None:
        self.armed = False
