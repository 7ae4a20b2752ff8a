"""Which scaling recipe would have served each layer best, from the what-if statistics.

Invariant: reads only what a run logged (``whatif/<layer>/<role>/<recipe>/<stat>`` tags,
through TensorBoard's own reader, or the host values the runner hands its summary) and
decides by one rule: the recipe with the highest SQNR, averaged over the layer's three
operands and the run's log steps (a recipe not measured for a layer is left out), among
the recipes that lose at most ``LOST_PCT`` of the values to overflow and underflow, when it
leads the next by at least ``CLEAR_DB``; otherwise "tie".
"""

from __future__ import annotations

import math
from collections import defaultdict

from fp8lab.scaling import SCALINGS
from fp8lab.telemetry.keys import WHATIF, parse_tag

# A recipe "serves a layer best" only by this margin over the next one (dB of cast SQNR):
# below it the recipes quantize the layer equally well, and the report says "tie".
CLEAR_DB = 0.25
# ... and only among the recipes that lose (clamp or flush) at most this % of the values.
LOST_PCT = 1.0


def best_by_layer(
    sqnr: dict[tuple[str, str], list[float]], lost: dict[tuple[str, str], list[float]] | None = None
) -> dict[str, dict]:
    """{layer: {"best", "margin_db", "sqnr_db": {recipe: dB}, "lost_pct": {recipe: %}}}.

    Args:
        sqnr: {(layer, recipe): cast SQNR dB over roles and log steps}.
        lost: {(layer, recipe): overflow % + underflow % over roles and log steps}. A whole-
            tensor SQNR is dominated by the largest values, so a recipe that flushes most of
            a tensor to zero next to one outlier can still score high: recipes that lose more
            than ``LOST_PCT`` of the values are ranked only if every recipe does.
    """
    lost = lost or {}
    per_layer: dict[str, dict[str, tuple[float, float]]] = defaultdict(dict)
    for (layer, recipe), values in sqnr.items():
        finite = [v for v in values if math.isfinite(v)]
        lost_values = [v for v in lost.get((layer, recipe), []) if math.isfinite(v)]
        if finite:
            per_layer[layer][recipe] = (
                sum(finite) / len(finite),
                sum(lost_values) / len(lost_values) if lost_values else 0.0,
            )
    out = {}
    for layer, scores in sorted(per_layer.items()):
        keep = [r for r, (_, gone) in scores.items() if gone <= LOST_PCT] or list(scores)
        ranked = sorted(keep, key=lambda r: scores[r][0], reverse=True)
        margin = scores[ranked[0]][0] - scores[ranked[1]][0] if len(ranked) > 1 else math.inf
        if len(keep) < len(scores) and len(ranked) == 1:
            margin = math.inf  # the only recipe that keeps the values
        out[layer] = {
            "best": ranked[0] if margin >= CLEAR_DB else "tie",
            "margin_db": margin,
            "sqnr_db": {r: scores[r][0] for r in SCALINGS if r in scores},
            "lost_pct": {r: scores[r][1] for r in SCALINGS if r in scores},
        }
    return out


def read_whatif(acc) -> tuple[dict, dict]:
    """({(layer, recipe): SQNR dB}, {(layer, recipe): overflow + underflow %}) over roles
    and log steps, from one variant's events (a loaded TensorBoard ``EventAccumulator``)."""
    sqnr: dict[tuple[str, str], list[float]] = defaultdict(list)
    lost: dict[tuple[str, str], list[float]] = defaultdict(list)
    pct: dict[tuple[str, str, str], dict[int, float]] = defaultdict(lambda: defaultdict(float))
    for tag in acc.Tags()["scalars"]:
        key = parse_tag(tag)
        if key is None or key.group != WHATIF:
            continue
        if key.stat == "sqnr_db":
            sqnr[(key.layer, key.scaling)] += [e.value for e in acc.Scalars(tag)]
        else:  # overflow_pct, underflow_pct: summed per step and role
            for e in acc.Scalars(tag):
                pct[(key.layer, key.scaling, key.role)][e.step] += e.value
    for (layer, recipe, _role), by_step in pct.items():
        lost[(layer, recipe)] += list(by_step.values())
    return sqnr, lost


def whatif_lines(variant: str, best: dict[str, dict], used: str | None) -> list[str]:
    """The report's section: per layer, the best recipe and every recipe's mean SQNR."""
    if not best:
        return []
    head = f"{'layer':<34} {'best':<8} {'lead dB':>7} " + " ".join(f"{r:>14}" for r in SCALINGS)
    lines = [
        "",
        f"== {variant}: which scaling would have served each layer best (cast SQNR dB / % of values "
        f"lost, mean over its operands and log steps{'; it ran ' + used if used else ''})",
        head,
    ]
    for layer, entry in best.items():
        cells = " ".join(
            f"{entry['sqnr_db'][r]:>7.2f}/{entry['lost_pct'][r]:<6.2f}" if r in entry["sqnr_db"] else f"{'-':>14}"
            for r in SCALINGS
        )
        lead = f"{entry['margin_db']:>7.2f}" if math.isfinite(entry["margin_db"]) else f"{'-':>7}"
        lines.append(f"{layer:<34} {entry['best']:<8} {lead} {cells}")
    counts = defaultdict(int)
    for entry in best.values():
        counts[entry["best"]] += 1
    lines.append("best per layer: " + ", ".join(f"{r} {n}" for r, n in sorted(counts.items(), key=lambda kv: -kv[1])))
    return lines
