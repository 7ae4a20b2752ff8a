"""Hostile input to the Python API and to the CLI's paths: a clear answer, never a traceback.

One table. Each row is an action on a scratch folder and what it must give:
- an exception type and a message regex (the API: raised at construction or forward,
  naming the argument and what is allowed), and nothing written under the scratch folder;
- or a CLI exit code and a regex on stderr (``fp8lab run`` with a hostile ``--out`` or
  ``data.source``): exit 2 leaves the scratch folder as it was (same entries, same bytes);
- or None: the action works, and ``check`` looks at its result.

``test_linear_matches_nn_linear`` compares fp8lab.Linear with nn.Linear on what nn.Linear
accepts (shapes and dtypes of the output, errors of the same type).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import fp8lab
from fp8lab import DelayedScaling, Float8CurrentScaling, FP8Options
from fp8lab.run.cli import main
from tests.helpers import QUICKSTART, TINY_MODEL

EMULATED = FP8Options(fallback="emulated")
ONE_STEP = TINY_MODEL + ["train.steps=1", "train.log_interval=1", "train.eval_interval=1"]


@dataclass(frozen=True)
class Row:
    action: Callable[[Path], object]  # API: called; CLI: returns the argv of ``fp8lab``
    expect: type[BaseException] | int | None  # exception type, CLI exit code, or None (works)
    message: str = ""  # regex on the exception's message or on stderr
    check: Callable[[Path, object], None] | None = None  # for rows that work: the result, what was written


def cli(out, *sets: str) -> list[str]:
    return ["run", QUICKSTART, "--out", os.fsdecode(out) if isinstance(out, bytes) else str(out), "--quiet"] + [
        a for s in [*ONE_STEP, *sets] for a in ("--set", s)
    ]


def _linear(**kw):
    return lambda base: fp8lab.Linear(16, 16, **kw)


def _forward(x, **kw):
    return lambda base: fp8lab.Linear(16, 16, fp8=EMULATED, **kw)(x() if callable(x) else x)


def _monitor(log_dir=None, model=None, **kw):
    def action(base):
        target = base / "tb" if log_dir is None else log_dir(base)
        return fp8lab.Monitor(model if model is not None else nn.Sequential(fp8lab.Linear(16, 16)), target, **kw)

    return action


def _nan_rows(base):
    layer = fp8lab.Linear(16, 16, fp8=EMULATED)
    x = torch.randn(4, 16)
    x[1, 3] = float("nan")
    x[2, 5] = float("inf")
    y = layer(x)
    y.sum().backward()
    fp8lab.update_scales(layer)
    return layer, y


def _check_nan_rows(base, result):
    layer, y = result
    assert torch.isfinite(y[0]).all() and torch.isfinite(y[3]).all()  # other rows untouched
    assert torch.isnan(y[1]).all()  # NaN propagates as in nn.Linear
    assert torch.isfinite(y[2]).all()  # inf saturates to +-448 / scale: the saturating E4M3 cast, as TE's
    assert torch.isfinite(layer.fp8_state.scale).all()  # inf amax keeps the scale (DESIGN.md)


def _symlink(target: str):
    def make(base):
        link = base / "link"
        link.symlink_to(base / target if target != "loop" else link)
        return link

    return make


def _dangling(base):
    return cli(_symlink("nowhere")(base))


def _loop(base):
    return cli(_symlink("loop")(base))


def _file(base):
    (base / "afile").write_text("keep me")
    return cli(base / "afile")


def _through_file(base):
    (base / "afile").write_text("keep me")
    return cli(base / "afile" / "logs")


def _read_only(base):
    ro = base / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes through mode bits: a read-only bind mount instead
        for args in (["mount", "--bind", str(ro), str(ro)], ["mount", "-o", "remount,bind,ro", str(ro)]):
            if subprocess.run(args, capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(ro)], capture_output=True)
                pytest.skip("running as root without mount permission: no read-only folder can be made here")
        _CLEANUPS.append(lambda: subprocess.run(["umount", "-l", str(ro)], capture_output=True))
    return cli(ro / "logs")


def _dotdot_ok(base):
    (base / "a").mkdir()
    return cli(Path(os.path.relpath(base / "a" / ".." / "logs")))


def _check_dotdot(base, code):
    assert code == 0
    assert list((base / "logs" / "quickstart").iterdir())  # the run folder, under base/logs


_CLEANUPS: list[Callable[[], None]] = []

ROWS: dict[str, Row] = {
    # --- rule 4: fp8= and the Python API's errors --------------------------------------------
    "linear_fp8_scaling_recipe": Row(
        _linear(fp8=DelayedScaling(amax_history_len=8)),
        None,
        check=lambda base, m: (
            m.fp8 == FP8Options(scaling=DelayedScaling(amax_history_len=8)) or pytest.fail(repr(m.fp8)),
            m.fp8_state.amax_history.shape == (8, 3) or pytest.fail("history length"),
        ),
    ),
    "linear_fp8_backend_name": Row(
        _linear(fp8="emulated"),
        TypeError,
        r"^fp8 must be an fp8lab\.FP8Options.*"
        r"FP8Options\(backend='emulated'\)",
    ),  # fmt: skip
    "convert_fp8_backend_name": Row(
        lambda base: fp8lab.convert(nn.Sequential(nn.Linear(16, 16)), fp8="emulated"), TypeError, r"^fp8 must be"
    ),
    "convert_fp8_scaling_recipe": Row(
        lambda base: fp8lab.convert(nn.Sequential(nn.Linear(16, 16)), fp8=Float8CurrentScaling()),
        None,
        check=lambda base, m: isinstance(m[0].fp8.scaling, Float8CurrentScaling) or pytest.fail(repr(m)),
    ),
    "linear_int64_input": Row(_forward(torch.ones(2, 16, dtype=torch.int64)), RuntimeError, r"floating-point.*int64"),
    # --- rule 4: new cases: constructor arguments --------------------------------------------
    "linear_fp8_true": Row(_linear(fp8=True), TypeError, r"^fp8 must be .* got True \(bool\)"),
    "linear_fp8_dict": Row(_linear(fp8={"backend": "bf16"}), TypeError, r"^fp8 must be"),
    "linear_in_features_str": Row(lambda b: fp8lab.Linear("16", 4), TypeError, r"^in_features must be an int >= 0"),
    "linear_in_features_float": Row(lambda b: fp8lab.Linear(16.0, 4), TypeError, r"^in_features must be an int"),
    "linear_out_features_negative": Row(lambda b: fp8lab.Linear(4, -1), ValueError, r"^out_features .* got -1"),
    "linear_in_features_bool": Row(lambda b: fp8lab.Linear(True, 4), TypeError, r"^in_features must be an int"),
    "linear_bias_str": Row(_linear(bias="no"), TypeError, r"^bias must be a bool"),
    "linear_device_unknown": Row(_linear(device="gpu0"), ValueError, r"^device must name a torch device"),
    "linear_device_list": Row(_linear(device=["cpu"]), TypeError, r"^device must be a torch.device"),
    "linear_dtype_int8": Row(_linear(dtype=torch.int8), ValueError, r"^dtype must be one of"),
    "linear_dtype_str": Row(_linear(dtype="float32"), TypeError, r"^dtype must be a torch.dtype"),
    "norm_eps_zero": Row(lambda b: fp8lab.LayerNormLinear(16, 16, eps=0.0), ValueError, r"^eps must be a finite"),
    "norm_eps_nan": Row(lambda b: fp8lab.LayerNormLinear(16, 16, eps=float("nan")), ValueError, r"^eps must be"),
    "norm_eps_str": Row(lambda b: fp8lab.LayerNormLinear(16, 16, eps="1e-5"), TypeError, r"^eps must be"),
    "norm_lowercase_name": Row(
        lambda b: fp8lab.LayerNormLinear(16, 16, normalization="layernorm"), ValueError, r"^normalization must be one"
    ),
    "lnl_in_features_zero": Row(
        lambda b: fp8lab.LayerNormLinear(0, 16), ValueError, r"^in_features must be an int >= 1"
    ),
    "mlp_activation_relu": Row(lambda b: fp8lab.LayerNormMLP(16, 32, activation="relu"), ValueError, r"^activation"),
    "mlp_ffn_zero": Row(lambda b: fp8lab.LayerNormMLP(16, 0), ValueError, r"^ffn_hidden_size must be an int >= 1"),
    "mlp_fp8_string": Row(lambda b: fp8lab.LayerNormMLP(16, 32, fp8="bf16"), TypeError, r"^fp8 must be"),
    "mha_heads_not_divisor": Row(lambda b: fp8lab.MultiheadAttention(16, 3), ValueError, r"divisible by num_attention"),
    "mha_heads_str": Row(lambda b: fp8lab.MultiheadAttention(16, "4"), TypeError, r"^num_attention_heads must be"),
    "mha_mask_type": Row(
        lambda b: fp8lab.MultiheadAttention(16, 4, attn_mask_type="padding"), ValueError, r"^attn_mask_type"
    ),
    "mha_normalization_bad": Row(
        lambda b: fp8lab.MultiheadAttention(16, 4, normalization="BatchNorm"), ValueError, r"^normalization"
    ),
    "block_bias_int": Row(lambda b: fp8lab.TransformerBlock(16, 32, 4, bias=1), TypeError, r"^bias must be a bool"),
    "gpt_fp8_scaling_recipe": Row(
        lambda b: fp8lab.GPT.from_preset(
            "tiny", num_layers=1, fp8=DelayedScaling(amax_history_len=4), fallback="emulated"
        ),
        None,
        check=lambda base, m: (
            m.blocks[0].mlp.fc1.fp8 == FP8Options(scaling=DelayedScaling(amax_history_len=4), fallback="emulated")
            or pytest.fail("fp8")
        ),
    ),  # fmt: skip
    "gpt_sequence_too_long": Row(
        lambda b: fp8lab.GPT.from_preset("tiny", num_layers=1)(torch.zeros(1, 129, dtype=torch.int64)),
        ValueError,
        r"sequence length 129 exceeds block_size 128",
    ),
    "convert_not_a_module": Row(lambda b: fp8lab.convert("model"), TypeError, r"^model must be a torch.nn.Module"),
    "convert_policy_wrong_type": Row(
        lambda b: fp8lab.convert(nn.Linear(4, 4), policy=["lm_head"]), TypeError, r"^policy must be"
    ),
    # --- rule 4: new cases: forward inputs ---------------------------------------------------
    "linear_bool_input": Row(_forward(torch.ones(2, 16, dtype=torch.bool)), RuntimeError, r"floating-point"),
    "linear_float8_input": Row(
        _forward(lambda: torch.zeros(2, 16).to(torch.float8_e4m3fn)), RuntimeError, r"floating-point.*float8"
    ),
    "linear_0d_input": Row(_forward(torch.tensor(1.0)), RuntimeError, r"at least 1-D"),
    "linear_wrong_last_dim": Row(_forward(torch.randn(2, 15)), RuntimeError, r"\(2, 15\).*in_features=16"),
    "linear_list_input": Row(_forward([[1.0] * 16]), TypeError, r"input must be a torch.Tensor"),
    "linear_nan_inf_input": Row(_nan_rows, None, check=_check_nan_rows),
    "linear_float64_parameters": Row(
        _forward(torch.randn(3, 16, dtype=torch.float64), dtype=torch.float64),
        None,
        check=lambda base, y: (y.shape == (3, 16) and y.dtype == torch.float64) or pytest.fail(f"{y.shape} {y.dtype}"),
    ),
    # --- rule 4: Monitor --------------------------------------------------------------------
    "monitor_model_str": Row(_monitor(model="model"), TypeError, r"^model must be a torch.nn.Module"),
    "monitor_log_dir_int": Row(_monitor(log_dir=lambda b: 3), TypeError, r"^log_dir must be a str"),
    "monitor_log_dir_empty": Row(_monitor(log_dir=lambda b: ""), ValueError, r"^log_dir: the path is empty"),
    "monitor_log_dir_file": Row(
        _monitor(log_dir=lambda b: (b / "f").write_text("x") and b / "f" / "tb"), ValueError, r"^log_dir: .* is a file"
    ),
    "monitor_log_dir_dangling": Row(
        _monitor(log_dir=lambda b: _symlink("gone")(b) / "tb"), ValueError, r"^log_dir: .*link.*does not exist"
    ),
    "monitor_log_interval_zero": Row(_monitor(log_interval=0), ValueError, r"^log_interval must be an int >= 1"),
    "monitor_histogram_zero": Row(_monitor(histogram_interval=0), ValueError, r"^histogram_interval must be an int"),
    "monitor_histogram_float": Row(_monitor(histogram_interval=2.5), TypeError, r"^histogram_interval must be an int"),
    "monitor_whatif_not_multiple": Row(
        _monitor(log_interval=4, whatif_interval=6), ValueError, r"^whatif_interval must be None"
    ),
    "monitor_reference_str": Row(_monitor(reference="bf16"), TypeError, r"^reference must be"),
    # --- rule 5: --out and data.source paths ------------------------------------------------
    "out_dangling_symlink": Row(_dangling, 2, r"--out .*link.* to .*nowhere.*, which does not exist"),
    "out_symlink_loop": Row(_loop, 2, r"--out .*symbolic link loop"),
    "out_name_too_long": Row(lambda b: cli(b / ("x" * 256) / "logs"), 2, r"256 bytes long; .* allows 255 bytes"),
    "out_path_too_long": Row(lambda b: cli(b / "/".join(["y" * 200] * 21)), 2, r"passes PATH_MAX"),
    "out_not_utf8": Row(lambda b: cli(os.fsencode(b) + b"/logs\xff"), 2, r"--out .*is not valid UTF-8"),
    "data_source_not_utf8": Row(
        lambda b: cli(b / "logs", "data.source=text:" + os.fsdecode(b"/tmp/corpus\xfe.txt")), 2, r"data\.source .*UTF-8"
    ),
    "out_read_only_folder": Row(_read_only, 2, r"--out .*(no permission|Read-only)"),
    "out_regular_file": Row(_file, 2, r"--out .*afile is a file, not a folder"),
    "out_below_a_file": Row(_through_file, 2, r"--out .*afile is a file, not a folder"),
    "out_dev_null": Row(lambda b: cli("/dev/null"), 2, r"--out .*/dev/null is a device, pipe or socket"),
    "out_empty": Row(lambda b: cli(""), 2, r"--out '': the path is empty"),
    "out_dotdot_through_missing": Row(lambda b: cli(b / "missing" / ".." / "logs"), 2, r"goes up \('\.\.'\) out of"),
    "out_relative_dotdot": Row(_dotdot_ok, None, check=_check_dotdot),
}


def _snapshot(base: Path) -> dict[str, bytes | None]:
    out = {}
    for root, dirs, files in os.walk(base):
        for name in dirs + files:
            p = Path(root) / name
            out[str(p)] = p.read_bytes() if p.is_file() and not p.is_symlink() else None
    return out


def test_the_table_holds_the_issue_cases_and_20_more():
    assert len(ROWS) >= 5 + 10 + 20


@pytest.mark.parametrize("case", list(ROWS))
def test_hostile(case, tmp_path, capsys, monkeypatch):
    row = ROWS[case]
    base = tmp_path / "base"
    base.mkdir()
    monkeypatch.chdir(tmp_path)
    try:
        if isinstance(row.expect, int) or case.startswith(("out_", "data_")):
            argv = row.action(base)
            before = _snapshot(base)
            code = main(argv)
            err = capsys.readouterr().err
            if row.expect is None:
                row.check(base, code)
                return
            assert code == row.expect, err
            assert re.search(row.message, err), err
            assert "Traceback" not in err
            assert _snapshot(base) == before  # nothing written
            return
        before = _snapshot(base)
        if row.expect is None:
            row.check(base, row.action(base))
            return
        with pytest.raises(row.expect) as info:
            row.action(base)
        assert re.search(row.message, str(info.value)), str(info.value)
        assert _snapshot(base) == before or case.startswith("monitor_log_dir"), "an error left files behind"
        if case.startswith("monitor_"):
            assert not (base / "tb").exists()
    finally:
        while _CLEANUPS:
            _CLEANUPS.pop()()


# Inputs nn.Linear takes, with the layer's arguments: the output shapes and dtypes must match.
SHAPES = {
    "1d": ((16, 8), {}, (16,), torch.float32),
    "2d": ((16, 8), {}, (4, 16), torch.float32),
    "3d": ((16, 8), {}, (2, 3, 16), torch.float32),
    "5d": ((16, 8), {}, (2, 1, 3, 2, 16), torch.float32),
    "zero_batch": ((16, 8), {}, (0, 16), torch.float32),
    "zero_middle": ((16, 8), {}, (2, 0, 16), torch.float32),
    "no_bias": ((16, 8), {"bias": False}, (4, 16), torch.float32),
    "in_features_0": ((0, 8), {}, (3, 0), torch.float32),
    "out_features_0": ((16, 0), {}, (3, 16), torch.float32),
    "float64_params": ((16, 8), {"dtype": torch.float64}, (3, 16), torch.float64),
    "bfloat16_params": ((16, 8), {"dtype": torch.bfloat16}, (3, 16), torch.bfloat16),
    "device_kwarg": ((16, 8), {"device": "cpu"}, (3, 16), torch.float32),
    "device_object": ((16, 8), {"device": torch.device("cpu")}, (3, 16), torch.float32),
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_linear_matches_nn_linear(name):
    (i, o), kw, shape, dtype = SHAPES[name]
    ref = nn.Linear(i, o, **kw)
    layer = fp8lab.Linear(i, o, fp8=EMULATED, **kw)
    x = torch.randn(shape, dtype=dtype)
    y_ref, y = ref(x), layer(x)
    assert y.shape == y_ref.shape and y.dtype == y_ref.dtype, (y.shape, y_ref.shape, y.dtype, y_ref.dtype)
    assert (layer.bias is None) == (ref.bias is None)
    assert layer.weight.dtype == ref.weight.dtype and layer.weight.shape == ref.weight.shape
    if y.numel():
        y.float().sum().backward()
        assert layer.weight.grad is not None and layer.weight.grad.shape == layer.weight.shape


@pytest.mark.parametrize(
    "x",
    [torch.ones(2, 16, dtype=torch.int64), torch.tensor(1.0), torch.randn(2, 15)],
    ids=["int64", "0d", "wrong_last_dim"],
)
def test_linear_refuses_what_nn_linear_refuses_with_the_same_type(x):
    with pytest.raises(RuntimeError):
        nn.Linear(16, 16)(x)
    with pytest.raises(RuntimeError):
        fp8lab.Linear(16, 16, fp8=EMULATED)(x)
