"""The accuracy sections of ``fp8lab report``: layers ranked by output SQNR against the BF16
GEMM of the same operands, by weight drift from BF16, and by what the tensor cores'
accumulator alone costs (SQNR against the same GEMM accumulated in fp32).

Invariant: pure functions of the ``accuracy/`` values ``report.read_variant`` returns,
{(layer, name): values over log steps}; nothing here reads files.
"""

from __future__ import annotations

from fp8lab.formats import GEMM_NAMES
from fp8lab.layers.fp8_attention import GEMMS as ATTENTION_GEMMS

TOP_ACCURACY = 10  # layers shown in each accuracy ranking
# The accumulator's error power is at least half of a GEMM's total error against BF16 when its
# SQNR is within 10*log10(2) dB of the total's: "accumulation dominates".
ACCUMULATION_DOMINATES_DB = 3.01


def mean(values: list[float]) -> float:
    """The mean, NaN for no values."""
    return sum(values) / len(values) if values else float("nan")


def accuracy_lines(variant: str, accuracy: dict, top: int = TOP_ACCURACY) -> list[str]:
    """Layers ranked by output SQNR against BF16 (lowest first) and by weight drift from
    BF16 (largest first): the layers whose FP8 output or weights differ most."""
    layers = sorted({layer for layer, _ in accuracy})
    if not layers:
        return []
    sqnr = {layer: [mean(accuracy.get((layer, f"{g}_sqnr_db"), [])) for g in GEMM_NAMES] for layer in layers}
    measured = [layer for layer in layers if any(v == v for v in sqnr[layer])]  # NaN != NaN
    lines = [
        "",
        f"== {variant}: accuracy against the BF16 GEMM of the same operands (mean over log steps, lowest first)",
        f"{'layer':<34} {'fprop dB':>9} {'dgrad dB':>9} {'wgrad dB':>9}",
    ]
    for layer in sorted(measured, key=lambda name: min(v for v in sqnr[name] if v == v))[:top]:
        lines.append(f"{layer:<34} " + " ".join(f"{v:>9.2f}" for v in sqnr[layer]))
    lines += accumulation_lines(variant, accuracy, sqnr)
    lines += attention_lines(variant, accuracy, top)
    drift = {
        layer: accuracy[(layer, "weight_rel_diff")][-1] for layer in layers if accuracy.get((layer, "weight_rel_diff"))
    }
    if drift:
        lines += ["", f"== {variant}: weight drift ||W - W_bf16|| / ||W_bf16|| at the last log step (largest first)"]
        lines += [f"{layer:<34} {value:>9.3g}" for layer, value in sorted(drift.items(), key=lambda kv: -kv[1])[:top]]
    return lines


def accumulation_lines(variant: str, accuracy: dict, sqnr: dict) -> list[str]:
    """Per layer and GEMM, the output SQNR against the same GEMM accumulated in fp32 (what the
    tensor cores' accumulator alone costs) and whether it dominates the error against BF16:
    it does when its error power is at least half of the total, i.e. when its SQNR is within
    ``ACCUMULATION_DOMINATES_DB`` (3.01 dB) of the SQNR against BF16 (cast and accumulator)."""
    accum = {layer: [mean(accuracy.get((layer, f"{g}_accum_sqnr_db"), [])) for g in GEMM_NAMES] for layer in sqnr}
    measured = [layer for layer in accum if any(v == v for v in accum[layer])]
    if not measured:
        return []
    lines = [
        "",
        f"== {variant}: accumulator SQNR against fp32 accumulation (mean over log steps; the tensor cores' "
        "accumulator alone, lowest first)",
        f"{'layer':<34} {'fprop dB':>9} {'dgrad dB':>9} {'wgrad dB':>9}",
    ]
    dominated = []
    for layer in sorted(measured, key=lambda name: min(v for v in accum[name] if v == v)):
        lines.append(f"{layer:<34} " + " ".join(f"{v:>9.2f}" for v in accum[layer]))
        for gemm, acc_db, total_db in zip(GEMM_NAMES, accum[layer], sqnr[layer]):
            if acc_db == acc_db and total_db == total_db and acc_db <= total_db + ACCUMULATION_DOMINATES_DB:
                dominated.append(
                    f"{layer} {gemm} ({acc_db:.1f} dB against fp32 accumulation, {total_db:.1f} dB against BF16)"
                )
    if dominated:
        lines.append("accumulation, not the FP8 cast, dominates the error of: " + "; ".join(dominated))
    else:
        lines.append("the FP8 casts, not the accumulator, dominate every layer's error")
    return lines


def attention_lines(variant: str, accuracy: dict, top: int = TOP_ACCURACY) -> list[str]:
    """FP8 attention cores (``<layer>.dpa``) ranked by the lowest output SQNR of their six GEMMs
    against BF16 twins (s = QK^T, o = PV, and the backward's dv, dp, dq, dk)."""
    sqnr = {
        layer: [mean(accuracy.get((layer, f"{g}_sqnr_db"), [])) for g in ATTENTION_GEMMS]
        for layer in sorted({layer for layer, _ in accuracy})
    }
    measured = [layer for layer, values in sqnr.items() if any(v == v for v in values)]
    if not measured:
        return []
    lines = [
        "",
        f"== {variant}: FP8 attention GEMMs against their BF16 twins (mean over log steps, lowest first)",
        f"{'attention core':<34} " + " ".join(f"{g + ' dB':>8}" for g in ATTENTION_GEMMS),
    ]
    for layer in sorted(measured, key=lambda name: min(v for v in sqnr[name] if v == v))[:top]:
        lines.append(f"{layer:<34} " + " ".join(f"{v:>8.2f}" for v in sqnr[layer]))
    return lines
