"""Which scaling recipe would have served each layer best, from the what-if statistics.

Invariant: reads only what a run logged (``whatif/<layer>/<role>/<recipe>/<stat>`` tags,
through TensorBoard's own reader, or the host values the runner hands its summary) and
decides by one rule: the recipe with the highest SQNR, averaged over the layer's three
operands and the run's log steps (a recipe not measured for a layer is left out).
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from fp8lab.options import SCALINGS


def best_by_layer(sqnr: dict[tuple[str, str], list[float]]) -> dict[str, dict]:
    """{layer: {"best": recipe, "sqnr_db": {recipe: mean dB}}} from {(layer, recipe): [dB ...]},
    the values pooled over roles and log steps."""
    per_layer: dict[str, dict[str, float]] = defaultdict(dict)
    for (layer, recipe), values in sqnr.items():
        finite = [v for v in values if math.isfinite(v)]
        if finite:
            per_layer[layer][recipe] = sum(finite) / len(finite)
    return {
        layer: {"best": max(means, key=means.get), "sqnr_db": {r: means[r] for r in SCALINGS if r in means}}
        for layer, means in sorted(per_layer.items())
        if means
    }


def read_whatif(variant_dir: Path) -> dict[tuple[str, str], list[float]]:
    """{(layer, recipe): SQNR dB over roles and log steps} from one variant's events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(variant_dir), size_guidance={"scalars": 0})
    acc.Reload()
    out: dict[tuple[str, str], list[float]] = defaultdict(list)
    for tag in acc.Tags()["scalars"]:
        if tag.startswith("whatif/") and tag.endswith("/sqnr_db"):
            layer, _role, recipe, _stat = tag[len("whatif/"):].rsplit("/", 3)
            out[(layer, recipe)] += [e.value for e in acc.Scalars(tag)]
    return out


def whatif_lines(variant: str, best: dict[str, dict], used: str | None) -> list[str]:
    """The report's section: per layer, the best recipe and every recipe's mean SQNR."""
    if not best:
        return []
    head = f"{'layer':<34} {'best':<8} " + " ".join(f"{r:>9}" for r in SCALINGS)
    lines = ["", f"== {variant}: which scaling would have served each layer best (cast SQNR dB, "
             f"mean over its operands and log steps{'; it ran ' + used if used else ''})", head]
    for layer, entry in best.items():
        cells = " ".join(f"{entry['sqnr_db'][r]:>9.2f}" if r in entry["sqnr_db"] else f"{'-':>9}" for r in SCALINGS)
        lines.append(f"{layer:<34} {entry['best']:<8} {cells}")
    counts = defaultdict(int)
    for entry in best.values():
        counts[entry["best"]] += 1
    lines.append("best per layer: " + ", ".join(f"{r} {n}" for r, n in sorted(counts.items(), key=lambda kv: -kv[1])))
    return lines
