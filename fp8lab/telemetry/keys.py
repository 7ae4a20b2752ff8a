"""Telemetry keys: what one logged value is (group, layer, role, scaling, statistic), as data.

Invariant: a value's identity travels as a frozen ``Key`` from where it is measured to where
it is written; ``Key.tag`` is the only place a TensorBoard tag string is built and
``parse_tag`` the only place one is split again (by ``fp8lab report``, which reads tags back
from event files). Layer names are ``named_modules`` names, which never hold "/". The tags
(DESIGN.md's TensorBoard layout):

    scaling/<layer>/<role>/<stat>               whatif/<layer>/<role>/<scaling>/<stat>
    accuracy/<layer>/<fprop|dgrad|wgrad>_sqnr_db  accuracy/<layer>/weight_rel_diff
    faults/nonfinite_amax/<layer>/<role>        amax_history/<layer>/<role> (histogram)
    precision/fp16_flush_pct/<layer>
    optimizer_state/<layer>/<exp_avg|exp_avg_sq>/<zero_pct|subnormal_pct|m_over_eps_pct|underflow_pct>
    weights/<layer>/updates_lost_pct
"""

from __future__ import annotations

from dataclasses import dataclass

SCALING, WHATIF, ACCURACY = "scaling", "whatif", "accuracy"
NONFINITE, AMAX_HISTORY, FP16_FLUSH = "faults/nonfinite_amax", "amax_history", "precision/fp16_flush_pct"
OPTIMIZER_STATE = "optimizer_state"
WEIGHTS = "weights"

# The parts after "<group>/<layer>/" of each group's tags, in order.
_PARTS = {
    SCALING: ("role", "stat"),
    WHATIF: ("role", "scaling", "stat"),
    ACCURACY: ("stat",),
    NONFINITE: ("role",),
    AMAX_HISTORY: ("role",),
    FP16_FLUSH: (),
    OPTIMIZER_STATE: ("moment", "stat"),
    WEIGHTS: ("stat",),
}


@dataclass(frozen=True)
class Key:
    """One per-layer value: ``group`` (one of the groups above), ``layer``, and the parts
    its group has (``role``: input, weight or grad_output; ``scaling``: a recipe's short
    name; ``stat``: the statistic, e.g. "sqnr_db" or "fprop_sqnr_db"; ``moment``: an AdamW
    state tensor, "exp_avg" or "exp_avg_sq")."""

    group: str
    layer: str
    role: str | None = None
    scaling: str | None = None
    stat: str | None = None
    moment: str | None = None

    @property
    def tag(self) -> str:
        """The TensorBoard tag of this value."""
        return "/".join([self.group, self.layer, *(getattr(self, part) for part in _PARTS[self.group])])


def parse_tag(tag: str) -> Key | None:
    """The ``Key`` a per-layer tag was built from, or None for any other tag (loss/train...)."""
    for group, parts in _PARTS.items():
        prefix = group + "/"
        if tag.startswith(prefix):
            pieces = tag[len(prefix) :].split("/")
            if len(pieces) != 1 + len(parts) or not all(pieces):
                return None
            return Key(group, pieces[0], **dict(zip(parts, pieces[1:])))
    return None
