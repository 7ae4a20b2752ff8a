"""Hostile configurations (issue 22, rules 2 and 3): one row per case, run through the CLI.

Rule 2: every valid configuration is reachable in any order of --set, and an explicit field
is never dropped without an error. Rule 3: a setting that provably cannot train is refused
(exit 2, the message names the field and the bound), and a run that stops learning says why.
Every row runs the quickstart-sized setup of the issue (6 tiny steps) or a two-rung recipe
written by the test; a valid row must finish (exit 0, summary.json), an invalid one must
exit 2 and write nothing.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers import QUICKSTART, ROOT, TINY_MODEL

from fp8lab.run.cli import main

# The issue's setup: the quickstart recipe, 6 tiny steps, logged twice, evaluated at the end;
# rows that only need to prove a config runs take 2 of them (the table must run in seconds).
SIX_STEPS = TINY_MODEL + ["train.steps=6", "train.log_interval=3", "train.eval_interval=6"]
TWO_STEPS = TINY_MODEL + ["train.steps=2", "train.log_interval=2", "train.eval_interval=2"]
FP16_ACTIVATIONS = ["variants.fp8.activations=fp16"]
# Two rungs of recipes/precision_ladder.py (its reference and its FP16 rung), without the other four.
LADDER_RUNGS = (
    "from fp8lab.run.config import RunConfig, Variant\n"
    "def config():\n"
    "    return RunConfig(name='ladder_rungs', baseline='fp32', variants=(\n"
    "        Variant(name='fp32', precision='fp32'), Variant(name='fp16', precision='fp16')))\n"
)
# Current and block scaling with an epsilon that flushes values (inside the bound); MXFP8's advice is
# checked alone (a third emulated recipe would double the run's time).
NOT_DELAYED = (
    "from fp8lab import Float8BlockScaling, Float8CurrentScaling\n"
    "from fp8lab.run.config import RunConfig, Variant\n"
    "def config():\n"
    "    return RunConfig(name='not_delayed', variants=(Variant(name='bf16', precision='bf16'),\n"
    "        Variant(name='cur', scaling=Float8CurrentScaling(amax_epsilon=1000.0), fallback='emulated'),\n"
    "        Variant(name='blk', scaling=Float8BlockScaling(amax_epsilon=1000.0), fallback='emulated')))\n"
)


@dataclass(frozen=True)
class Case:
    """One hostile input. ``sets``: --set overrides after ``steps`` (TWO_STEPS or SIX_STEPS); ``code``: the exit code;
    ``message``: a regex stderr must match; ``writes``: "nothing" (no --out folder at all) or
    "run" (a finished run folder); ``recipe``: a path, or the text of a recipe file;
    ``check(run_dir, stderr)``: more assertions; ``patch(monkeypatch)``: a fault to inject."""

    sets: tuple[str, ...]
    code: int
    message: str = ""
    writes: str = "nothing"
    recipe: str = QUICKSTART
    check: Callable | None = None
    patch: Callable | None = None
    steps: tuple[str, ...] = tuple(TWO_STEPS)


def ok(*sets: str, recipe: str = QUICKSTART, check=None, message: str = "", steps=TWO_STEPS) -> Case:
    return Case(sets, 0, message, "run", recipe, check, steps=tuple(steps))


def bad(message: str, *sets: str, recipe: str = QUICKSTART, patch=None) -> Case:
    return Case(sets, 2, message, "nothing", recipe, None, patch)


def _config(run_dir: Path) -> dict:
    return json.loads((run_dir / "config.json").read_text())


def _variant(run_dir: Path, name: str) -> dict:
    return next(v for v in _config(run_dir)["variants"] if v["name"] == name)


def _history_len(n: int):
    def check(run_dir: Path, err: str) -> None:
        assert _variant(run_dir, "fp8")["scaling"] == {**_variant(run_dir, "fp8")["scaling"], "amax_history_len": n}

    return check


def _model(**fields):
    def check(run_dir: Path, err: str) -> None:
        assert {k: _config(run_dir)["model"][k] for k in fields} == fields

    return check


def _train(**fields):
    def check(run_dir: Path, err: str) -> None:
        assert {k: _config(run_dir)["train"][k] for k in fields} == fields

    return check


def _fp16_fp8(run_dir: Path, err: str) -> None:
    fp8 = _variant(run_dir, "fp8")
    assert (fp8["activations"], fp8["loss_scale_init"]) == ("fp16", 1024.0)


def _stopped_learning(run_dir: Path, err: str) -> None:
    summary = json.loads((run_dir / "summary.json").read_text())["variants"]["fp8"]
    assert summary["loss_scale_flushes"] and summary["skipped_steps"] == 2, summary


def _adam_underflow(run_dir: Path, err: str) -> None:
    from fp8lab.run.report import report

    summary = json.loads((run_dir / "summary.json").read_text())["variants"]
    assert summary["fp16"]["most_adam_state_underflow"], summary["fp16"]
    assert "most_adam_state_underflow" in summary["fp32"] and not summary["fp32"]["most_adam_state_underflow"]
    text = report(run_dir)
    assert "== fp16: AdamW state underflow in 16 bits" in text, text
    assert re.search(r"fp16\):\n(  .*\n)*  lm_head/optimizer_state: AdamW exp_avg_sq is 0 where exp_avg is not", text)


def _advice_per_recipe(run_dir: Path, err: str) -> None:
    from fp8lab.run.report import advice, report

    text = report(run_dir)
    attention = [line for line in text.splitlines() if line.startswith("  ") and " -> " in line]
    assert any("scaling=block or mxfp8" in line for line in attention), text  # current's own advice
    for line in attention:  # delayed scaling's fields exist in none of these recipes
        assert not re.search(r"amax_history_len|margin|amax_compute_algo", line), line
    for kind in ("current", "block", "mxfp8"):
        for problem in ("overflow", "underflow"):
            assert not re.search(r"amax_history_len|margin|amax_compute_algo", advice(kind, problem))
    assert "amax_history_len" in advice("delayed", "underflow") and "margin" in advice("delayed", "overflow")


def _oom_in_first_step(monkeypatch) -> None:
    from fp8lab.run.variant import VariantRun

    def train_step(self, *args, **kwargs):
        raise torch.OutOfMemoryError("CPU out of memory: tried to allocate 64.00 GiB")

    monkeypatch.setattr(VariantRun, "train_step", train_step)


HEADS = ("model.num_attention_heads=3", "model.hidden_size=33")
LOSS_SCALE = ("variants.fp8.loss_scale_init=1024", "variants.fp8.activations=fp16")
LR = ("train.lr=1e-4", "train.min_lr=1e-5")
HISTORY = ("fp8.amax_history_len=4", "variants.fp8.scaling=delayed")
CURRENT = ("fp8.amax_history_len=4", "variants.fp8.scaling=current")
EPSILON = ("variants.fp8.scaling=current", "fp8.amax_epsilon=0.001")
BOTH_KEYS = r"unknown key 'fp8.amax_history_len': the scaling of Float8CurrentScaling \(variants.fp8.scaling=current"

CASES: dict[str, Case] = {
    # --- rule 2: reachable in any order (each pair was refused in at least one order before) ---
    "heads_then_hidden": ok(*HEADS, check=_model(num_attention_heads=3, hidden_size=33)),
    "hidden_then_heads": ok(*HEADS[::-1], check=_model(num_attention_heads=3, hidden_size=33)),
    "loss_scale_then_fp16_activations": ok(*LOSS_SCALE, check=_fp16_fp8),
    "fp16_activations_then_loss_scale": ok(*LOSS_SCALE[::-1], check=_fp16_fp8),
    "lr_then_min_lr": ok(*LR, check=_train(lr=1e-4, min_lr=1e-5)),
    "min_lr_then_lr": ok(*LR[::-1], check=_train(lr=1e-4, min_lr=1e-5)),
    "history_then_scaling_delayed_keeps_it": ok(*HISTORY, check=_history_len(4)),
    "scaling_delayed_then_history": ok(*HISTORY[::-1], check=_history_len(4)),
    "history_then_scaling_current_names_both": bad(BOTH_KEYS, *CURRENT),
    "scaling_current_then_history_names_both": bad(BOTH_KEYS, *CURRENT[::-1]),
    "scaling_current_then_epsilon": ok(*EPSILON),
    "epsilon_then_scaling_current": ok(*EPSILON[::-1]),
    # --- rule 3: provably cannot train -> refused, naming the field and the bound ---
    "amax_epsilon_1e6_every_weight_flushes": bad(
        r"fp8.amax_epsilon \(of variants.fp8\) must be <= 229376 \(E4M3's max / its smallest subnormal\)",
        "variants.fp8.scaling=current",
        "variants.fp8.scaling.amax_epsilon=1e6",
    ),
    "loss_scale_init_1e-40_every_gradient_flushes": bad(
        r"variants.fp8.loss_scale_init must be > 9.537e-07 \(.*32 tokens x 2\*\*-25.*got 1e-40",
        *FP16_ACTIVATIONS,
        "variants.fp8.loss_scale_init=1e-40",
    ),
    "loss_scale_init_1e-40_on_the_ladder_rung": bad(
        r"variants.fp16.loss_scale_init must be > ", "variants.fp16.loss_scale_init=1e-40", recipe=LADDER_RUNGS
    ),
    "backoff_1e-45_flushes_after_one_overflow": bad(
        r"variants.fp8.loss_scale_backoff_factor must be > 1.455e-11 \(one skipped step multiplies",
        *FP16_ACTIVATIONS,
        "variants.fp8.loss_scale_backoff_factor=1e-45",
    ),
    "loss_scale_decays_into_flushing_says_so": ok(
        *FP16_ACTIVATIONS,
        "variants.fp8.loss_scale_init=1e30",
        "variants.fp8.loss_scale_backoff_factor=1e-20",
        message=r"warning: variant 'fp8' stopped learning at step 3: its loss scale fell to 1e-10, at or below",
        check=_stopped_learning,
        steps=SIX_STEPS,
    ),
    "fp16_without_master_weights_shows_adam_underflow": ok(
        "variants.fp16.master_weights=false", recipe=LADDER_RUNGS, check=_adam_underflow, steps=SIX_STEPS
    ),
    "report_advice_is_per_scaling_recipe": ok(recipe=NOT_DELAYED, check=_advice_per_recipe),
    "amax_history_1e10_memory_names_the_field": bad(
        r"The largest share, .* is the amax histories of the FP8 layers: lower "
        r"variants.fp8.scaling.amax_history_len \(=10000000000, or fp8.amax_history_len\)",
        "fp8.amax_history_len=10000000000",
    ),
    "out_of_memory_in_first_step_leaves_nothing": bad(
        r"out of memory \(OutOfMemoryError: CPU out of memory.*Nothing was kept", patch=_oom_in_first_step
    ),
    # --- new: the same field twice, two keys for one field, keys that do not exist ---
    "same_key_twice_last_wins": ok("train.steps=4", "train.steps=2", check=_train(steps=2)),
    "shorthand_and_variant_key_disagree": bad(
        r"fp8.margin=1 and variants.fp8.scaling.margin=2 both set the margin of variants.fp8",
        "fp8.margin=1",
        "variants.fp8.scaling.margin=2",
    ),
    "history_then_scaling_block_names_both": bad(
        r"unknown key 'variants.fp8.scaling.amax_history_len': the scaling of variants.fp8 is Float8BlockScaling "
        r"\(variants.fp8.scaling=block chose it\)",
        "variants.fp8.scaling.amax_history_len=4",
        "variants.fp8.scaling=block",
    ),
    "unknown_nested_field": bad(r"unknown key 'model.hidden_size.x'", "model.hidden_size.x=1"),
    "unknown_train_field": bad(r"unknown key 'train.stepz'; train has \[", "train.stepz=3"),
    "unknown_scaling_field_shorthand": bad(r"unknown key 'fp8.amax_histroy_len'", "fp8.amax_histroy_len=4"),
    "variant_name_with_a_dot": bad(r"unknown key 'variants.fp8.x.precision'", "variants.fp8.x.precision=bf16"),
    "field_of_a_variant_that_does_not_exist": bad(r"unknown variant 'fp9'", "variants.fp9.precision=bf16"),
    "scaling_field_of_a_variant_that_does_not_exist": bad(r"unknown variant 'fp9'", "variants.fp9.scaling.margin=1"),
    "scaling_field_of_a_bf16_variant": bad(
        r"variants.bf16 has precision 'bf16', no FP8 scaling", "variants.bf16.scaling.margin=1"
    ),
    "variant_name_cannot_be_set": bad(r"variants.fp8.name cannot be set", "variants.fp8.name=x"),
    "unknown_scaling_kind": bad(r"variants.fp8.scaling must be one of \('delayed'", "variants.fp8.scaling=mxfp4"),
    "no_equals_sign": bad(r"override 'train.steps' must look like section.key=value", "train.steps"),
    "empty_key": bad(r"override '=3' must look like section.key=value", "=3"),
    # --- new: a value of the wrong type for each kind of field ---
    "int_field_given_a_word": bad(r"train.steps must be an int, got 'six'", "train.steps=six"),
    "int_field_given_a_float": bad(r"train.batch_size must be an int, got '2.5'", "train.batch_size=2.5"),
    "int_field_given_1e10": bad(r"fp8.amax_history_len must be an int, got '1e10'", "fp8.amax_history_len=1e10"),
    "float_field_given_a_word": bad(r"train.lr must be a float, got 'fast'", "train.lr=fast"),
    "bool_field_given_maybe": bad(r"variants.fp8.master_weights must be a bool", "variants.fp8.master_weights=maybe"),
    "str_field_given_empty": bad(r"data.source must be 'stdlib'", "data.source="),
    "choice_field_given_a_typo": bad(r"model.attention_core must be one of", "model.attention_core=flash"),
    # --- new: NaN, inf, negative and huge numbers ---
    "nan_lr": bad(r"train.lr must be a float >= 0 \(finite\), got nan", "train.lr=nan"),
    "inf_weight_decay": bad(r"train.weight_decay must be a float >= 0 \(finite\), got inf", "train.weight_decay=inf"),
    "negative_grad_clip": bad(r"train.grad_clip must be a float > 0", "train.grad_clip=-1"),
    "min_lr_above_lr": bad(r"train.min_lr must be <= train.lr", "train.min_lr=0.5"),
    "nan_val_fraction": bad(r"data.val_fraction must be a float in \(0, 0.5\]", "data.val_fraction=nan"),
    "negative_seed": bad(r"train.seed must be an int >= 0", "train.seed=-1"),
    "seed_past_64_bits": bad(r"train.seed must be an int in \[0, 2\*\*64 - 1\]", f"train.seed={2**64}"),
    "zero_eval_interval": bad(r"train.eval_interval must be an int >= 1", "train.eval_interval=0"),
    "negative_num_layers": bad(r"model.num_layers must be an int >= 1, got -1", "model.num_layers=-1"),
    "zero_heads": bad(r"model.num_attention_heads must be an int >= 1, got 0", "model.num_attention_heads=0"),
    "hidden_size_past_2_31": bad(r"model.hidden_size must be an int < 2\*\*31", f"model.hidden_size={2**31}"),
    "heads_not_dividing_hidden": bad(r"model.hidden_size \(128\) must be divisible", "model.num_attention_heads=3"),
    "negative_margin": bad(r"fp8.margin: margin must be an int >= 0, got -1", "fp8.margin=-1"),
    "margin_past_its_bound": bad(r"fp8.margin \(of variants.fp8\) must be <= 17", "fp8.margin=18"),
    "nan_amax_epsilon": bad(
        r"fp8.amax_epsilon: amax_epsilon must be a finite float >= 0, got nan",
        "variants.fp8.scaling=current",
        "fp8.amax_epsilon=nan",
    ),
    "backoff_factor_of_1": bad(
        r"variants.fp8.loss_scale_backoff_factor must be a float in \(0, 1\)",
        *FP16_ACTIVATIONS,
        "variants.fp8.loss_scale_backoff_factor=1",
    ),
    "growth_interval_0": bad(
        r"variants.fp8.loss_scale_growth_interval must be an int in \[1, 2\*\*31 - 1\]",
        *FP16_ACTIVATIONS,
        "variants.fp8.loss_scale_growth_interval=0",
    ),
    # --- new: conflicting precision, backends and fields ---
    "loss_scale_under_bf16_activations": bad(
        r"variants.fp8.loss_scale_init does not apply to precision 'fp8'", "variants.fp8.loss_scale_init=1024"
    ),
    "fp8_activations_in_fp32": bad(
        r"variants.fp8.activations must be one of \('bf16', 'fp16'\)", "variants.fp8.activations=fp32"
    ),
    "backend_on_a_bf16_variant": bad(
        r"variants.bf16.backend does not apply to precision 'bf16'", "variants.bf16.backend=emulated"
    ),
    "scaling_kind_on_a_variant_turned_bf16": bad(
        r"variants.fp8.scaling does not apply to precision 'bf16'",
        "variants.fp8.scaling=current",
        "variants.fp8.precision=bf16",
    ),
    "baseline_turned_fp8": bad(
        r"baseline must be a variant with precision 'bf16' or 'fp32'", "variants.bf16.precision=fp8"
    ),
    "fp32_without_master_weights": bad(
        r"variants.bf16.master_weights does not apply to precision 'fp32'",
        "variants.bf16.master_weights=false",
        "variants.bf16.precision=fp32",
    ),
}


def _recipe(case: Case, tmp_path: Path) -> str:
    if case.recipe.endswith(".py"):
        return case.recipe
    path = tmp_path / "recipe.py"
    path.write_text(case.recipe)
    return str(path)


def test_the_table_holds_the_issue_cases_and_20_more():
    assert len(CASES) >= 21 + 20


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_config(name, tmp_path, capsys, monkeypatch):
    case = CASES[name]
    if case.patch is not None:
        case.patch(monkeypatch)
    out = tmp_path / "logs"
    sets = [a for s in case.steps + case.sets for a in ("--set", s)]
    code = main(["run", _recipe(case, tmp_path), "--out", str(out), "--quiet", *sets])
    err = capsys.readouterr().err
    assert code == case.code, err
    assert re.search(case.message, err), err
    if case.writes == "nothing":
        assert not out.exists(), sorted(out.rglob("*"))
        return
    (recipe_dir,) = out.iterdir()
    (run_dir,) = recipe_dir.iterdir()
    assert (run_dir / "summary.json").is_file()
    if case.check is not None:
        case.check(run_dir, err)


ADDRESS_SPACE_CHILD = """
import re, resource, sys
from fp8lab.run.cli import main
import torch, tensorboard  # what the run maps before its memory check
mapped = int(re.search(r"VmSize:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) * 1024
limit = mapped + 64 * 2**20  # room for the config, not for the runtime a run maps besides tensors
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
sys.exit(main(sys.argv[1:]))
"""


def test_address_space_limit_is_refused_before_anything_is_written(tmp_path):
    """Under ``ulimit -v`` a run used to pass preflight (MemAvailable) and die mid-run with a
    partial folder; the address space left is now part of preflight."""
    out = tmp_path / "logs"
    sets = [a for s in SIX_STEPS for a in ("--set", s)]
    argv = [sys.executable, "-c", ADDRESS_SPACE_CHILD, "run", QUICKSTART, "--out", str(out), "--quiet", *sets]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "left under this process's address-space limit (ulimit -v / RLIMIT_AS: raise it)" in proc.stderr
    assert not out.exists()
