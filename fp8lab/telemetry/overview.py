"""The overview: every layer's scaling on one chart or one picture, readable at a glance.

Invariant: host values only (the ``LayerStats`` of log steps); nothing here touches a
device tensor. Two views of the same tags:

- ``LAYOUT``: Custom Scalars categories whose charts match one statistic of one role (or
  GEMM) in every layer by regex, so all layers share a chart (15 scaling charts and 4
  accuracy charts instead of 5 x 3 x n_layers separate ones);
- ``ScalingOverview``: a heatmap picture, layers (rows) x log steps (columns), of
  log2(scale), overflow %, underflow % per role and the output SQNR against BF16 per GEMM.
  The runner and the Monitor write it to TensorBoard's Images tab at every log step and
  as a PNG next to summary.json.
"""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from fp8lab.formats import GEMM_NAMES, ROLE_NAMES
from fp8lab.quantize.tensor import STAT_NAMES
from fp8lab.telemetry.collector import SHADOW, LayerStats

_STATS = ("scale", "amax") + STAT_NAMES
LAYOUT = {
    "all layers: accuracy against BF16": {
        **{f"{gemm} output SQNR (dB)": ["Multiline", [rf"^accuracy/.*/{gemm}_sqnr_db$"]] for gemm in GEMM_NAMES},
        **{
            f"{gemm} accumulator SQNR against fp32 accumulation (dB)": [
                "Multiline",
                [rf"^accuracy/.*/{gemm}_accum_sqnr_db$"],
            ]
            for gemm in GEMM_NAMES
        },
        "weight drift ||W_fp8 - W_bf16|| / ||W_bf16||": ["Multiline", [r"^accuracy/.*/weight_rel_diff$"]],
    },
    **{
        f"all layers: {stat}": {
            f"{role} {stat}": ["Multiline", [rf"^scaling/.*/{role}/{stat}$"]] for role in ROLE_NAMES
        }
        for stat in _STATS
    },
}

# Rows of panels: (what, the LayerStats field, its column names, colour scale).
PANELS = (
    ("log2(scale)", "scale", ROLE_NAMES, "log2"),
    ("overflow % (log)", "overflow_pct", ROLE_NAMES, "pct"),
    ("underflow % (log)", "underflow_pct", ROLE_NAMES, "pct"),
    ("output SQNR vs BF16 (dB)", SHADOW, GEMM_NAMES, "sqnr"),
)
MAX_COLUMNS = 240  # log steps drawn per panel; a longer run is sampled evenly
PCT_RANGE = (-3.0, 2.0)  # log10 of 0.001 % .. 100 %
SQNR_RANGE = (0.0, 40.0)  # dB: red (0) .. yellow .. green (40 and above)
NAN_RGB = (96, 96, 96)  # not measured
_VIRIDIS = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], dtype=np.float64)
_HEAT = np.array([(0, 0, 0), (80, 18, 123), (182, 54, 121), (251, 136, 97), (252, 253, 191)], dtype=np.float64)
_RDYLGN = np.array([(165, 0, 38), (244, 109, 67), (254, 224, 139), (166, 217, 106), (0, 104, 55)], dtype=np.float64)


def _colormap(t: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """t in [0, 1] (NaN: grey) -> uint8 RGB, by linear interpolation between anchors."""
    pos = np.clip(np.nan_to_num(t, nan=0.0), 0.0, 1.0) * (len(anchors) - 1)
    lo = np.minimum(pos.astype(int), len(anchors) - 2)
    frac = (pos - lo)[..., None]
    rgb = anchors[lo] * (1 - frac) + anchors[lo + 1] * frac
    rgb[np.isnan(t)] = NAN_RGB
    return rgb.round().astype(np.uint8)


def _colour(values: np.ndarray, kind: str) -> tuple[np.ndarray, str, str]:
    """(RGB cells, low label, high label) of one panel's values (layers x steps)."""
    if kind == "log2":
        with np.errstate(divide="ignore", invalid="ignore"):
            v = np.where(values > 0, np.log2(values), np.nan)
        finite = v[np.isfinite(v)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
        t = (v - lo) / (hi - lo) if hi > lo else np.where(np.isfinite(v), 0.5, np.nan)
        return _colormap(t, _VIRIDIS), f"{lo:.1f}", f"{hi:.1f}"
    if kind == "pct":
        with np.errstate(divide="ignore", invalid="ignore"):
            t = (np.log10(values) - PCT_RANGE[0]) / (PCT_RANGE[1] - PCT_RANGE[0])
        t = np.where(values > 0, np.maximum(t, 0.02), np.where(np.isnan(values), np.nan, 0.0))  # any > 0 shows
        return _colormap(t, _HEAT), "0.001%", "100%"
    t = (values - SQNR_RANGE[0]) / (SQNR_RANGE[1] - SQNR_RANGE[0])
    return _colormap(t, _RDYLGN), f"{SQNR_RANGE[0]:.0f} dB", f"{SQNR_RANGE[1]:.0f} dB"


class ScalingOverview:
    """The history of log steps the heatmap is drawn from (host arrays, checkpointable).

    Args:
        title: the first line of the picture (e.g. the variant's name).
    """

    def __init__(self, title: str = ""):
        self.title = title
        self.layers: tuple[str, ...] = ()
        self.steps: list[int] = []
        self.values: dict[str, list[np.ndarray]] = {field: [] for _, field, _, _ in PANELS}

    def add(self, step: int, stats: LayerStats) -> None:
        """Append one log step's values (a different layer set starts the history anew)."""
        if stats.layers != self.layers:
            self.__init__(self.title)
            self.layers = stats.layers
        self.steps.append(step)
        for _, field, _, _ in PANELS:
            self.values[field].append(np.asarray(stats.column(field), dtype=np.float64))

    def __bool__(self) -> bool:
        return bool(self.steps and self.layers)

    def state_dict(self) -> dict:
        """Tensors and plain containers (checkpoints load with weights_only=True)."""
        return {
            "layers": list(self.layers),
            "steps": list(self.steps),
            "values": {f: torch.from_numpy(np.stack(v)) if v else torch.zeros(0) for f, v in self.values.items()},
        }

    def load_state_dict(self, state: dict) -> None:
        self.layers, self.steps = tuple(state["layers"]), list(state["steps"])
        self.values = {f: list(state["values"][f].numpy()) if len(self.steps) else [] for f, _ in self.values.items()}

    def render(self) -> np.ndarray:
        """The picture, (H, W, 3) uint8: a title line, then one row of panels per statistic,
        one column per role (GEMM for SQNR); each panel is layers (rows) x log steps."""
        n = len(self.layers)
        index = np.linspace(0, len(self.steps) - 1, min(len(self.steps), MAX_COLUMNS)).round().astype(int)
        rh = max(4, min(14, 360 // max(n, 1)))  # pixels per layer row
        cw = max(1, min(12, MAX_COLUMNS // len(index)))  # pixels per log step
        font = ImageFont.load_default()
        char_w, line_h = 6, 12
        label_w = 8 + char_w * max(len(name) for name in self.layers)
        panel_w, panel_h = cw * len(index), rh * n
        col_w = max(panel_w, 26 * char_w) + 16
        head, foot = line_h + 4, 2 * line_h + 12
        block_h = head + panel_h + foot
        width = label_w + 3 * col_w
        height = 2 * line_h + 8 + len(PANELS) * block_h
        img = Image.new("RGB", (width, height), (255, 255, 255))
        draw = ImageDraw.Draw(img)
        steps = f"steps {self.steps[0]}..{self.steps[-1]}" if self.steps else ""
        draw.text(
            (4, 2),
            f"{self.title}  {n} FP8 layers (rows) x {len(self.steps)} log steps (columns), {steps}",
            fill=(0, 0, 0),
            font=font,
        )
        draw.text(
            (4, 2 + line_h),
            "overflow/underflow: black = none, log colour scale; grey = not measured",
            fill=(90, 90, 90),
            font=font,
        )
        every = max(1, math.ceil(line_h / rh))  # label every k-th layer when rows are thin
        for p, (what, field, columns, kind) in enumerate(PANELS):
            top = 2 * line_h + 8 + p * block_h
            data = np.stack(self.values[field])[index] if self.values[field] else np.full((1, n, 3), np.nan)
            for i, name in enumerate(self.layers):
                if i % every == 0:
                    draw.text((4, top + head + i * rh + (rh - line_h) // 2), name, fill=(0, 0, 0), font=font)
            for c, column in enumerate(columns):
                left = label_w + c * col_w
                rgb, lo, hi = _colour(data[:, :, c].T, kind)  # (layers, steps, 3)
                cells = np.repeat(np.repeat(rgb, rh, axis=0), cw, axis=1)
                img.paste(Image.fromarray(cells, "RGB"), (left, top + head))
                draw.text((left, top), f"{column}: {what}", fill=(0, 0, 0), font=font)
                bar_top = top + head + panel_h + 4
                bar = _colour_bar(kind, panel_w)
                img.paste(Image.fromarray(bar, "RGB"), (left, bar_top))
                draw.text((left, bar_top + 6), lo, fill=(60, 60, 60), font=font)
                draw.text(
                    (left + max(panel_w - char_w * len(hi), char_w * (len(lo) + 1)), bar_top + 6),
                    hi,
                    fill=(60, 60, 60),
                    font=font,
                )
        return np.asarray(img)

    def png(self) -> bytes:
        """The picture as PNG bytes."""
        buf = io.BytesIO()
        Image.fromarray(self.render(), "RGB").save(buf, format="PNG", optimize=False)
        return buf.getvalue()


def _colour_bar(kind: str, width: int) -> np.ndarray:
    """A (5, width, 3) strip from the low to the high end of ``kind``'s colour scale."""
    t = np.linspace(0.0, 1.0, max(width, 2))[None, :].repeat(5, axis=0)
    anchors = {"log2": _VIRIDIS, "pct": _HEAT, "sqnr": _RDYLGN}[kind]
    return _colormap(t, anchors)
