"""Each rung of the precision ladder really runs in its precision, and the rungs differ.

The GEMM check records every call of the hardware-model GEMM (``scaled_gemm``) of the
rounded and emulated backends during one training step: its output dtype, and whether its
operand values are exactly representable in the rung's precision (fp32 values: some are
not representable in bf16 or fp16; FP8 values: on the E4M3 or E5M2 grid). A forward hook
checks every Linear's output dtype, and the attention core's inputs.
"""

from __future__ import annotations

import json

import pytest
import torch

import fp8lab
from fp8lab import DelayedScaling
from fp8lab.gemm.backends import emulated, rounded
from fp8lab.run.cli import main
from fp8lab.run.config import ModelConfig, RunConfig, TrainConfig, Variant
from fp8lab.run.runner import Runner
from fp8lab.run.variant import VariantRun, build_model
from tests.helpers import LADDER, TINY_MODEL

SCALING = DelayedScaling(amax_history_len=4)
RUNGS = {
    "fp32": Variant(name="fp32", precision="fp32"),
    "fp16": Variant(name="fp16", precision="fp16"),
    "bf16": Variant(name="bf16", precision="bf16"),
    "fp8": Variant(name="fp8", precision="fp8", scaling=SCALING, fallback="emulated"),
    "fp8_fp16": Variant(name="fp8_fp16", precision="fp8", activations="fp16", scaling=SCALING, fallback="emulated"),
    "bf16_no_master": Variant(name="bf16_no_master", precision="bf16", master_weights=False),
}
# rung -> (dtype of every GEMM output and Linear output, dtype the non-FP8 operands are exact in, parameter dtype)
EXPECTED = {
    "fp32": (torch.float32, torch.float32, torch.float32),
    "fp16": (torch.float16, torch.float16, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16, torch.float32),
    "fp8": (torch.bfloat16, torch.bfloat16, torch.float32),
    "fp8_fp16": (torch.float16, torch.float16, torch.float32),
    "bf16_no_master": (torch.bfloat16, torch.bfloat16, torch.bfloat16),
}


def tiny_config(*variants: Variant, **train) -> RunConfig:
    fields = dict(steps=3, batch_size=2, block_size=16, log_interval=1, eval_interval=3, eval_batches=1, warmup_steps=1)
    return RunConfig(
        name="ladder_test", model=ModelConfig(num_layers=1), train=TrainConfig(**{**fields, **train}), variants=variants
    )


def exact_in(t: torch.Tensor, dtype: torch.dtype) -> bool:
    return torch.equal(t.to(dtype).to(t.dtype), t)


def on_fp8_grid(t: torch.Tensor) -> bool:
    return exact_in(t, torch.float8_e4m3fn) or exact_in(t, torch.float8_e5m2)


def make_run(variant: Variant) -> VariantRun:
    """One VariantRun of ``variant`` on the tiny model (fp32 reference weights), on CPU."""
    config = tiny_config(Variant(name="ref", precision="fp32"), variant)
    device = torch.device("cpu")
    init = {n: p.detach() for n, p in build_model(config, config.variants[0], device).named_parameters()}
    return VariantRun(variant, config, init, device)


def _one_step(variant: Variant, monkeypatch):
    run = make_run(variant)
    calls = []

    def recorder(module, kind):
        real = module.scaled_gemm

        def record(a, b, inv_scale, out_dtype, bias=None, *, path):
            out = real(a, b, inv_scale, out_dtype, bias, path=path)
            calls.append((kind, a.detach().clone(), b.detach().clone(), out_dtype, out.dtype))
            return out

        monkeypatch.setattr(module, "scaled_gemm", record)

    recorder(rounded, "rounded")
    real_fp8 = emulated.EmulatedBackend.gemm  # FP8 GEMMs: fp32-accumulated or the accumulator model

    def record_fp8(self, a, b, a_inv, b_inv, out_dtype, bias=None, **kwargs):
        out = real_fp8(self, a, b, a_inv, b_inv, out_dtype, bias, **kwargs)
        calls.append(("fp8", a.detach().clone(), b.detach().clone(), out_dtype, out.dtype))
        return out

    monkeypatch.setattr(emulated.EmulatedBackend, "gemm", record_fp8)
    outputs, attention_inputs = [], []
    hooks = [
        m.register_forward_hook(lambda mod, args, out: outputs.append(out.dtype))
        for m in run.model.modules()
        if isinstance(m, fp8lab.Linear)
    ]
    real_attention = fp8lab.layers.attention.attention
    monkeypatch.setattr(
        fp8lab.layers.attention,
        "attention",
        lambda q, k, v, **kw: (attention_inputs.append(q.dtype), real_attention(q, k, v, **kw))[1],
    )
    x = torch.randint(0, 256, (2, 16))
    run.train_step(x, torch.roll(x, 1, 1), 1e-3, log=False)
    for hook in hooks:
        hook.remove()
    return run, calls, outputs, attention_inputs


@pytest.mark.parametrize("name", list(RUNGS))
def test_every_gemm_of_a_rung_runs_in_its_precision(name, monkeypatch):
    out_dtype, operand_dtype, param_dtype = EXPECTED[name]
    run, calls, outputs, attention_inputs = _one_step(RUNGS[name], monkeypatch)
    fp8_calls = [c for c in calls if c[0] == "fp8"]
    rounded_calls = [c for c in calls if c[0] == "rounded"]
    # one block (qkv, proj, fc1, fc2) and the LM head, each: fprop, dgrad, wgrad
    assert len(calls) == 15
    assert len(fp8_calls) == (12 if RUNGS[name].precision == "fp8" else 0)
    for kind, _a, _b, requested, produced in calls:
        assert requested == produced == out_dtype, (kind, requested, produced)
    for _, a, b, _, _ in fp8_calls:
        assert on_fp8_grid(a) and on_fp8_grid(b)
    for _, a, b, _, _ in rounded_calls:
        assert exact_in(a, operand_dtype) and exact_in(b, operand_dtype)
    lower = {torch.float32: (torch.float16, torch.bfloat16), torch.float16: (torch.bfloat16,)}.get(operand_dtype, ())
    for dtype in lower:  # really the finer precision: some operand values need it
        assert not all(exact_in(a, dtype) and exact_in(b, dtype) for _, a, b, _, _ in rounded_calls), dtype
    assert outputs and set(outputs) == {out_dtype}
    assert set(attention_inputs) == {out_dtype}
    assert {p.dtype for p in run.model.parameters()} == {param_dtype}
    assert {p.dtype for p in run.model.parameters()} == {
        t.dtype for s in run.optimizer.state.values() for k, t in s.items() if k != "step"
    }
    rows = {r.name: r for r in fp8lab.describe(run.model)}
    head = rows["lm_head"]
    assert (
        head.precision
        == head.backend
        == {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[operand_dtype]
    )


def test_the_rungs_train_differently_on_the_same_batches(tmp_path):
    """fp32, fp16 and bf16 each give their own loss curve (before this issue, the fp16 and
    fp32 variants trained as bf16, identical to the last bit)."""
    config = tiny_config(RUNGS["fp32"], RUNGS["fp16"], RUNGS["bf16"])
    runner = Runner(config, tmp_path, progress=False)
    result = runner.run()
    curves = {name: [m["loss/train"] for _, m in runner.summary.train[name]] for name in ("fp32", "fp16", "bf16")}
    assert len(curves["fp32"]) == 3
    assert curves["fp32"] != curves["fp16"] and curves["fp32"] != curves["bf16"] and curves["fp16"] != curves["bf16"]
    assert len({v["first_batch_sha"] for v in result["variants"].values()}) == 1  # same batches
    assert result["baseline"] == "fp32"  # the reference, chosen because the run has it


def test_ladder_recipe_runs_and_reports_every_rung(tmp_path, capsys):
    sets = [*TINY_MODEL, "train.steps=2", "train.log_interval=1", "train.eval_interval=2"]
    assert main(["run", LADDER, "--out", str(tmp_path), *(a for s in sets for a in ("--set", s))]) == 0
    captured = capsys.readouterr()
    out = captured.out + captured.err
    assert "gap vs fp32" in out and "state MiB" in out and "saved MiB" in out and "skipped" in out
    (run_dir,) = (tmp_path / "precision_ladder").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    variants = summary["variants"]
    assert {"fp32", "fp16", "bf16", "fp8"} <= set(variants) and summary["baseline"] == "fp32"
    for name, v in variants.items():
        mem = v["memory"]
        assert {"params_bytes", "grads_bytes", "optimizer_bytes", "activations_saved_bytes"} <= set(mem), name
        assert mem["grads_bytes"] > 0 and mem["activations_saved_bytes"] > 0
        if v.get("weights", "hp") == "hp":  # FP8 primary weights: 1-byte codes, fp32 gradients
            assert mem["params_bytes"] == mem["grads_bytes"], name
        else:
            assert mem["params_bytes"] < mem["grads_bytes"], name
    assert variants["fp16"]["loss_scale"] == 2.0**16 and variants["bf16"]["loss_scale"] is None
    assert variants["bf16_no_master"]["memory"]["params_bytes"] * 2 == variants["bf16"]["memory"]["params_bytes"]
    saved = {name: v["memory"]["activations_saved_bytes"] for name, v in variants.items()}
    copies = {name: v["memory"]["weight_copies_saved_bytes"] for name, v in variants.items()}
    assert saved["fp8"] < saved["bf16"] < saved["fp32"] and saved["fp16"] == saved["bf16"]
    assert copies["fp32"] == copies["bf16_no_master"] == 0 < copies["fp8"] < copies["bf16"] == copies["fp16"]
    assert variants["fp16"]["most_fp16_flush"] and not variants["bf16"]["most_fp16_flush"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "fp16"), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {
        "precision/loss_scale",
        "faults/skipped_steps",
        "perf/mem_params_bytes",
        "perf/mem_activations_saved_bytes",
        "precision/fp16_flush_pct/blocks.0.mlp.fc1",
    } <= tags
