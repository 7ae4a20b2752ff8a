"""Recipes end to end: a shortened quickstart, its event files, overrides, log-step structure."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fp8lab.formats import ROLE_NAMES
from fp8lab.run.cli import main
from fp8lab.run.overrides import apply_overrides
from fp8lab.run.recipe_file import load_recipe
from fp8lab.run.report import read_scaling
from fp8lab.run.runner import Runner
from tests.helpers import CPU_PATH_NAMES, QUICKSTART, ROOT, SHORT, assert_bad_override_exits_2, force_gemm_path


def _sets(pairs):
    return [arg for pair in pairs for arg in ("--set", pair)]


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("logs")
    assert main(["run", QUICKSTART, "--out", str(out), "--quiet", *_sets(SHORT)]) == 0
    (run_dir,) = (out / "quickstart").iterdir()
    return run_dir


def _scalars(variant_dir: Path) -> dict[str, list]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(variant_dir), size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    acc.Reload()
    return acc


def test_events_hold_losses_and_every_fp8_layer_role(quick_run):
    summary = json.loads((quick_run / "summary.json").read_text())
    assert set(summary["variants"]) == {"bf16", "fp8"}
    for variant in ("bf16", "fp8"):
        acc = _scalars(quick_run / variant)
        steps = [e.step for e in acc.Scalars("loss/train")]
        assert steps == [2, 4]
        assert [e.step for e in acc.Scalars("loss/val")] == [4]
    acc = _scalars(quick_run / "fp8")
    tags = set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("compare/val_loss_rel_gap")] == [4]
    # every FP8 layer of a 2-block tiny GPT (the LM head stays BF16 by policy)
    layers = [f"blocks.{b}.{name}" for b in range(2) for name in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    for layer in layers:
        for role in ROLE_NAMES:
            for field in ("scale", "amax", "overflow_pct", "underflow_pct", "sqnr_db"):
                assert f"scaling/{layer}/{role}/{field}" in tags, (layer, role, field)
            assert f"amax_history/{layer}/{role}" in acc.Tags()["histograms"]
    assert not any(t.startswith("scaling/lm_head") for t in tags)
    # accuracy against the BF16 twin: every FP8 layer's three GEMMs, every GEMM layer's weights
    for layer in layers:
        for gemm in ("fprop", "dgrad", "wgrad"):
            assert [e.step for e in acc.Scalars(f"accuracy/{layer}/{gemm}_sqnr_db")] == [2, 4]
        assert f"accuracy/{layer}/weight_rel_diff" in tags
    assert "accuracy/lm_head/weight_rel_diff" in tags and not any(t.startswith("accuracy/lm_head/f") for t in tags)
    assert all(e.value > 0 for e in acc.Scalars("accuracy/blocks.0.mlp.fc1/weight_rel_diff"))
    # the overview: a heatmap per log step in the Images tab and as a PNG beside summary.json
    assert [e.step for e in acc.Images("overview/scaling")] == [2, 4]
    assert (quick_run / "scaling_fp8.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (quick_run / "scaling_bf16.png").exists()
    assert not any(t.startswith(("scaling/", "accuracy/")) for t in _scalars(quick_run / "bf16").Tags()["scalars"])
    # the scaling values are real readings: scales moved off their initial 1.0, SQNR is finite
    scaling = read_scaling(quick_run / "fp8")
    assert scaling[("blocks.0.mlp.fc1", "input", "scale")][-1] != 1.0
    assert all(v > 10.0 for v in scaling[("blocks.0.mlp.fc1", "weight", "sqnr_db")])


def test_variants_train_on_identical_tokens(quick_run):
    summary = json.loads((quick_run / "summary.json").read_text())
    shas = {v["first_batch_sha"] for v in summary["variants"].values()}
    assert len(shas) == 1 and None not in shas


def test_report_reads_the_run(quick_run, capsys):
    assert main(["report", str(quick_run)]) == 0
    text = capsys.readouterr().out
    assert "blocks.1.mlp.fc2" in text and "grad_output" in text
    assert "accuracy against the BF16 GEMM" in text and "weight drift" in text
    assert main(["report", str(quick_run / "nope")]) == 2


BAD_OVERRIDES = [
    ("train.stpes=3", "unknown key 'train.stpes'"),
    ("train.steps=three", "train.steps must be an int"),
    ("train.steps=0", "train.steps must be an int >= 1"),
    ("train.lr=-1", "train.lr must be a float >= 0"),
    ("data.source=web:foo", "data.source must be 'stdlib'"),
    ("fp8.margin=-1", "fp8.margin: margin must be an int >= 0"),
    ("fp8.amax_compute_algo=mean", "amax_compute_algo must be one of"),
    ("fp8.fp8_format=e5m2", "fp8_format must be one of"),
    ("variants.fp9.fallback=bf16", "unknown variant 'fp9'"),
    ("variants.fp8.fallback=cpu", "variants.fp8.fallback must be one of ('bf16', 'emulated')"),
    (
        "variants.fp8.backend=emulted",
        "variants.fp8.backend must be one of ('auto', 'te', 'scaled_mm', 'emulated', 'bf16')",
    ),
    ("model.preset=huge", "model.preset must be one of"),
    ("train.steps", "must look like section.key=value"),
    ("data.source=text:/no/such/file.txt", "no such file"),
]


@pytest.mark.parametrize("override,message", BAD_OVERRIDES)
def test_bad_override_exits_2_and_writes_nothing(tmp_path, capsys, override, message):
    assert_bad_override_exits_2(tmp_path, capsys, QUICKSTART, override, message)


def test_overrides_are_typed_and_reach_every_fp8_variant():
    config = load_recipe(ROOT / "recipes" / "amax_history_sweep.py")
    config = apply_overrides(config, ["fp8.margin=2", "train.lr=0.001", "fp8.reduce_amax=false"])
    fp8 = [v for v in config.variants if v.precision == "fp8"]
    assert len(fp8) == 6 and all(v.scaling.margin == 2 and v.scaling.reduce_amax is False for v in fp8)
    assert config.train.lr == 0.001
    assert {v.scaling.amax_history_len for v in fp8} == {1, 16, 1024}  # untouched fields survive


@pytest.mark.parametrize("recipe", sorted((ROOT / "recipes").glob("*.py")), ids=lambda p: p.stem)
def test_every_recipe_loads(recipe):
    config = load_recipe(recipe)
    assert config.baseline in [v.name for v in config.variants]


class _HostReads(TorchDispatchMode):
    """Records ops that copy a tensor's value to the host (.item(), float(t), bool(t))."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            t = args[0]
            self.reads.append((t.device.type, tuple(t.shape), t.dtype))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("path_name", CPU_PATH_NAMES)
def test_no_host_read_between_log_steps_and_collector_only_on_log_steps(tmp_path, monkeypatch, path_name):
    """No device tensor is read on the host in a non-log step. On CPU, tensors live in host
    memory and reading one is a load, not a copy; fp8lab does it by design, and only these:
    one NaN check per FP8 cast (amaxes_of: the NaN-ignoring pass runs only when a NaN is
    there), one alpha (the inverse scale) per GEMM of the accumulator model (its C kernel
    applies the epilogue; the model runs on the CPU only) and, on the oneDNN bf16 path, one
    alpha per FP8 GEMM accumulated in fp32. Each is a 0-dim CPU tensor. On an accelerator none
    happens (tests/test_gpu_backends.py checks with CUDA's sync debug mode). The BF16 shadow
    GEMMs (accuracy) run on log steps only."""
    from fp8lab.gemm import shadow

    force_gemm_path(monkeypatch, path_name)
    config = apply_overrides(load_recipe(QUICKSTART), SHORT + ["train.steps=3", "train.log_interval=3"])
    runner = Runner(config, tmp_path, progress=False)
    run = runner.variants[1]
    assert run.variant.precision == "fp8"
    x, y = runner.sampler.batch(0)
    armed = []
    original_arm = run.collector.arm
    run.collector.arm = lambda **kw: (armed.append(True), original_arm(**kw))[1]
    shadows = []
    original_record = shadow.record
    monkeypatch.setattr(shadow, "record", lambda *a, **k: (shadows.append(a[1]), original_record(*a, **k))[1])
    with _HostReads() as plain:
        assert run.train_step(x, y, 1e-3, log=False) is None
    n_fp8 = 8  # FP8 layers of the model; each step casts x, w, grad_out and runs 3 GEMMs
    nan_checks = [("cpu", (), torch.bool)] * (3 * n_fp8)
    fp32_gemms = sum(run.variant.fp8.accumulator(gemm).kind == "fp32" for gemm in range(3)) * n_fp8
    model_gemms = 3 * n_fp8 - fp32_gemms
    alphas = [("cpu", (), torch.float32)] * (model_gemms + (fp32_gemms if path_name == "onednn-bf16" else 0))
    assert sorted(plain.reads, key=str) == sorted(nan_checks + alphas, key=str)
    assert armed == [] and shadows == []
    assert not any(layer.telemetry.armed for _, layer in run.collector.layers)
    stats = run.train_step(x, y, 1e-3, log=True)
    assert armed == [True] and stats is not None and len(stats.layers) == 8
    # per GEMM: the output SQNR against BF16 and against the same GEMM accumulated in fp32
    assert len(shadows) == 3 * n_fp8 and sum(key.group == "accuracy" for key, _ in stats.items()) == 2 * 3 * n_fp8
    assert not any(layer.telemetry.armed for _, layer in run.collector.layers)
