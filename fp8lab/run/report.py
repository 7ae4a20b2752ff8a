"""``fp8lab report RUN_DIR``: the per-layer scaling table read back from the event files.

Invariant: reads only what the run wrote (TensorBoard event files and summary.json)
through TensorBoard's own event reader, so it shows exactly what TensorBoard shows; a
missing, unreadable or damaged input is a ``ReportError`` naming the file and what to do
(exit 2). Damage TensorBoard's reader passes over in silence is found first
(``run.event_files``): a record failing its CRC, bytes past the last record, a file cut
short, or events that end before the step summary.json or the newest checkpoint says the
run reached; the error names the file and the last step read intact.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from fp8lab.formats import ROLE_NAMES
from fp8lab.layers.fp8_attention import BWD_TENSORS, FWD_TENSORS
from fp8lab.run.accuracy_report import accuracy_lines, mean
from fp8lab.run.event_files import check_event_file, expected_last_step
from fp8lab.run.lock import holder_pid
from fp8lab.run.whatif_report import best_by_layer, read_whatif, whatif_lines
from fp8lab.scaling import SCALINGS, Scaling
from fp8lab.telemetry.keys import ACCURACY, OPTIMIZER_STATE, SCALING, parse_tag

ATTENTION_TENSORS = FWD_TENSORS + BWD_TENSORS  # the rows of an FP8 attention core (fp8_dpa)
# Thresholds for "worth attention", applied to the mean over the run's log steps.
OVERFLOW_PCT = 0.01  # any noticeable share of values clamped at fp8_max
UNDERFLOW_PCT = 1.0  # more than 1% of non-zero values flushed to zero
SQNR_DB = 20.0  # below torchao's bar for an FP8 linear

# AdamW state in 16 bits (no master weights): a layer whose exp_avg_sq is zero while exp_avg is
# not in more than this % of its values takes steps of lr * exp_avg / eps there.
M_OVER_EPS_PCT = 1.0
SQNR_ADVICE = "keep the layer in BF16 (variants.<name>.keep_bf16) or check its inputs for outliers"
OPTIMIZER_ADVICE = (
    "keep master weights (variants.<name>.master_weights=true: fp32 AdamW state), or train in bf16, whose "
    "exponent range holds squared gradients"
)


def advice(scaling: str | None, problem: str) -> str:
    """What to change for ``problem`` ("overflow", "underflow") under the variant's scaling
    recipe (``Scaling.advice``; the generic answer when the recipe is unknown)."""
    return (SCALINGS[scaling] if scaling in SCALINGS else Scaling).advice(problem)


class ReportError(ValueError):
    """The run folder cannot be read; the message names it and why."""


def _load(variant_dir: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(variant_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return acc


def read_scaling(variant_dir: Path) -> dict[tuple[str, str, str], list[float]]:
    """{(layer, role, field): values over log steps} from one variant's events."""
    return read_variant(variant_dir)[0]


def read_variant(
    variant_dir: Path, *, live: bool = False, expected: tuple[int, str] | None = None
) -> tuple[dict, dict, tuple[dict, dict], dict]:
    """({(layer, role, field): values}, {(layer, name): values}, what-if, {(layer, moment, stat):
    values}) of the ``scaling/``, the ``accuracy/`` (name: ``fprop_sqnr_db`` ...,
    ``weight_rel_diff``), the ``whatif/`` (``read_whatif``) and the ``optimizer_state/`` tags
    of one variant, from one read of its events.

    Args:
        live: a process is writing the run (a record being written is not damage).
        expected: (step, source): the last step the events must reach (``expected_last_step``).
    Raises:
        ReportError: an event file is damaged, or the events end before ``expected``.
    """
    for path in sorted(variant_dir.glob("events.out.tfevents.*")):
        damage = check_event_file(path, live=live)
        if damage is not None:
            raise ReportError(str(damage))
    acc = _load(variant_dir)
    if expected is not None and not live:
        step, source = expected
        train = acc.Scalars("loss/train") if "loss/train" in acc.Tags()["scalars"] else []
        last = max((e.step for e in train), default=None)
        if last is None or last < step:
            end = "hold no train loss" if last is None else f"end at step {last}"
            raise ReportError(
                f"the event files in {variant_dir} {end} but the run reached step {step} ({source}): "
                "events were lost (a file cut at a record boundary, or removed); restore them from a copy"
            )
    if not any(isinstance(v, list) and v for v in acc.Tags().values()):
        if any(p.stat().st_size for p in variant_dir.glob("events.out.tfevents.*")):
            # every run writes its layout and layer table first: nothing readable means damage
            raise ReportError(
                f"the event files in {variant_dir} hold no readable event (damaged or not "
                "TensorBoard files); restore them from a copy, or move them away"
            )
    out, accuracy, state = {}, {}, {}
    for tag in acc.Tags()["scalars"]:
        key = parse_tag(tag)
        if key is not None and key.group == SCALING:
            out[(key.layer, key.role, key.stat)] = [e.value for e in acc.Scalars(tag)]
        elif key is not None and key.group == ACCURACY:
            accuracy[(key.layer, key.stat)] = [e.value for e in acc.Scalars(tag)]
        elif key is not None and key.group == OPTIMIZER_STATE:
            state[(key.layer, key.moment, key.stat)] = [e.value for e in acc.Scalars(tag)]
    return out, accuracy, read_whatif(acc), state


def _summary_lines(run_dir: Path, path: Path) -> list[str]:
    """The head of the report from summary.json; a damaged file is refused by name."""
    try:
        summary = json.loads(path.read_text())
        lines = [f"run {run_dir}  (recipe {summary['recipe']}, {summary['steps']} steps, {summary['device']})"]
        for name, v in summary["variants"].items():
            gap = (
                "baseline"
                if v["val_loss_rel_gap"] is None
                else f"{100 * v['val_loss_rel_gap']:+.2f}% vs {summary['baseline']}"
            )
            loss = "-" if v["final_val_loss"] is None else f"{v['final_val_loss']:.4f}"
            lines.append(f"  {name:<22} val loss {loss}  {gap}")
    except OSError as err:
        raise ReportError(f"{path} cannot be read ({err.strerror or err}); check its permissions") from None
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # not JSON, or not fp8lab's summary
        what = f"{type(err).__name__}: {err}" if not isinstance(err, KeyError) else f"no field {err}"
        raise ReportError(
            f"{path} is damaged ({what}); rewrite it by running the same recipe and --set options with "
            f"--resume {run_dir} (the final checkpoint holds everything it needs), or move it away to see "
            "the per-layer table alone"
        ) from None
    return lines


def _scaling_of(run_dir: Path, variant: str) -> tuple[str | None, str | None]:
    """The scaling recipe a variant ran, from the run's config.json: its kind and a label that adds
    the fields it set away from the recipe's defaults (``mxfp8(scale_calculation_mode='floor')``),
    so that variants of one recipe read apart; (None, None) if unknown."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
        entry = next(v for v in config["variants"] if v["name"] == variant)
        if entry.get("precision") != "fp8":
            return None, None
        fields = dict(entry["scaling"])
        kind = fields.pop("kind", "delayed")
    except (OSError, ValueError, KeyError, TypeError, StopIteration, AttributeError):
        return None, None
    defaults = {f.name: f.default for f in dataclasses.fields(SCALINGS[kind])} if kind in SCALINGS else {}
    changed = [f"{k}={v!r}" for k, v in fields.items() if k in defaults and defaults[k] != v]
    return kind, f"{kind}({', '.join(changed)})" if changed else kind


def report(run_dir: str | Path) -> str:
    """The report text for ``run_dir`` (a ``logs/<recipe>/<run_id>`` folder)."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise ReportError(f"{str(run_dir)!r} is a file; name a run folder: logs/<recipe>/<run_id>")
    if not run_dir.is_dir():
        raise ReportError(f"run folder {str(run_dir)!r} does not exist")
    try:
        variants = sorted(p for p in run_dir.iterdir() if p.is_dir() and any(p.glob("events.out.tfevents.*")))
    except OSError as err:
        raise ReportError(
            f"run folder {str(run_dir)!r} cannot be read ({err.strerror or err}); check its permissions"
        ) from None
    if not variants:
        raise ReportError(
            f"run folder {str(run_dir)!r} holds no TensorBoard event files (is it logs/<recipe>/<run_id>?)"
        )
    lines = []
    summary_path = run_dir / "summary.json"
    if summary_path.exists() and not summary_path.is_file():
        raise ReportError(f"{summary_path} is not a file; move it away (the run's checkpoints can rewrite it)")
    if summary_path.is_file():
        lines += _summary_lines(run_dir, summary_path)
    else:
        lines.append(f"run {run_dir}  (no summary.json: the run did not finish)")
    live = holder_pid(run_dir) is not None  # a run writing now: its last record may be half-written
    expected = expected_last_step(run_dir)
    for variant_dir in variants:
        try:
            scaling, accuracy, whatif, state = read_variant(variant_dir, live=live, expected=expected)
        except ReportError:
            raise
        except Exception as err:  # TensorBoard's reader: unreadable or damaged event files
            raise ReportError(
                f"the event files in {variant_dir} cannot be read ({type(err).__name__}: "
                f"{str(err)[:200]}); check their permissions, or restore them from a copy"
            ) from None
        if not scaling and not state:
            continue
        kind, label = _scaling_of(run_dir, variant_dir.name)
        table, attention = _scaling_table(variant_dir.name, scaling, kind, label) if scaling else ([], [])
        lines += table
        lines += whatif_lines(variant_dir.name, best_by_layer(*whatif), label) if scaling else []
        table, watch = optimizer_state_lines(variant_dir.name, state)
        lines += table + [""]
        attention += watch
        if attention:
            lines.append(f"layers worth attention ({variant_dir.name}):")
            lines += [f"  {layer}/{role}: {what} -> {advice}" for layer, role, what, advice in attention]
        else:
            lines.append(
                f"no layer worth attention in {variant_dir.name} (overflow <= {OVERFLOW_PCT}%, "
                f"underflow <= {UNDERFLOW_PCT}%, SQNR >= {SQNR_DB} dB, AdamW exp_avg_sq zero where exp_avg is not "
                f"<= {M_OVER_EPS_PCT}%)"
            )
        lines += accuracy_lines(variant_dir.name, accuracy)
    return "\n".join(lines)


def _scaling_table(variant: str, scaling: dict, kind: str | None, label: str | None) -> tuple[list[str], list[tuple]]:
    """The per-layer, per-role table of one FP8 variant (which ran ``label``), and its layers worth
    attention (with the advice of the variant's scaling recipe ``kind``). An FP8 attention core
    (``<layer>.dpa``) has a row per tensor it casts (qkv, s, o, dqkv, do, dp) instead of roles."""
    lines = [
        "",
        f"== {variant}{' (' + label + ')' if label else ''}: mean over log steps",
        f"{'layer':<34} {'role':<12} {'scale':>10} {'amax':>10} {'ovf %':>7} {'unf %':>7} {'sqnr dB':>8}",
    ]
    attention = []
    for layer in sorted({k[0] for k in scaling}):
        for role in [r for r in ROLE_NAMES + ATTENTION_TENSORS if any(k[:2] == (layer, r) for k in scaling)]:
            m = {
                f: mean(scaling.get((layer, role, f), []))
                for f in ("scale", "amax", "overflow_pct", "underflow_pct", "sqnr_db")
            }
            lines.append(
                f"{layer:<34} {role:<12} {m['scale']:>10.4g} {m['amax']:>10.4g} {m['overflow_pct']:>7.3f} "
                f"{m['underflow_pct']:>7.2f} {m['sqnr_db']:>8.2f}"
            )
            if m["overflow_pct"] > OVERFLOW_PCT:
                attention.append((layer, role, f"overflow {m['overflow_pct']:.3f}%", advice(kind, "overflow")))
            if m["underflow_pct"] > UNDERFLOW_PCT:
                attention.append((layer, role, f"underflow {m['underflow_pct']:.2f}%", advice(kind, "underflow")))
            if m["sqnr_db"] < SQNR_DB:
                attention.append((layer, role, f"SQNR {m['sqnr_db']:.1f} dB", SQNR_ADVICE))
    return lines, attention


def optimizer_state_lines(variant: str, state: dict) -> tuple[list[str], list[tuple]]:
    """The AdamW-state underflow table of a variant without master weights (mean % over log
    steps), and the layers whose ``exp_avg_sq`` is zero where ``exp_avg`` is not (their steps
    are ``lr * exp_avg / eps``) in more than ``M_OVER_EPS_PCT`` of their values."""
    if not state:
        return [], []
    lines = [
        "",
        f"== {variant}: AdamW state underflow in 16 bits (mean % of values over log steps)",
        f"{'layer':<34} {'m zero':>8} {'m subn':>8} {'v zero':>8} {'v subn':>8} {'v=0,m!=0':>9}",
    ]
    attention = []
    columns = [("exp_avg", "zero_pct"), ("exp_avg", "subnormal_pct"), ("exp_avg_sq", "zero_pct")]
    columns += [("exp_avg_sq", "subnormal_pct"), ("exp_avg_sq", "m_over_eps_pct")]
    for layer in sorted({k[0] for k in state}):
        m = [mean(state.get((layer, *column), [])) for column in columns]
        lines.append(f"{layer:<34} " + " ".join(f"{v:>8.2f}" for v in m[:4]) + f" {m[4]:>9.2f}")
        if m[4] > M_OVER_EPS_PCT:
            what = f"AdamW exp_avg_sq is 0 where exp_avg is not in {m[4]:.1f}% of values (step = lr * exp_avg / eps)"
            attention.append((layer, "optimizer_state", what, OPTIMIZER_ADVICE))
    return lines, attention
