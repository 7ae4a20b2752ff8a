"""convert on a model nobody wrote for fp8lab, PrecisionPolicy, and describe.

The model is torch's own TransformerEncoder between two Linears whose dimensions (24,
30) a hardware FP8 GEMM cannot take. Tolerances: converted vs original in float64,
forward SQNR >= 20 dB; training on a learnable toy task, loss < 0.6 x initial.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fp8lab
from fp8lab import GPT, FP8Options, PrecisionPolicy
from fp8lab.gemm.backends.select import DeviceFacts, TEFacts
from fp8lab.gemm.exact import gemm_path
from fp8lab.layers.convert import SKIP_REASON_ATTR
from fp8lab.layers.describe import LayerRow, plan_for
from fp8lab.layers.linear import Linear
from tests.helpers import sqnr_db

H100 = DeviceFacts("cuda", (9, 0), "H100")
NO_TE = TEFacts(None, "transformer_engine is not installed")
D_IN, D_MODEL, N_CLASSES = 24, 64, 30
CONVERTED = ["0", "1.layers.0.linear1", "1.layers.0.linear2", "1.layers.1.linear1", "1.layers.1.linear2", "2"]
SKIPPED = ["1.layers.0.self_attn.out_proj", "1.layers.1.self_attn.out_proj"]
# the default accumulation="te" of delayed scaling: TE's FAST_ACCUM forward, promoted backward
TE_DELAYED = (
    "accumulation (te): fprop fast (13-bit, 32 per instruction), "
    "dgrad and wgrad promoted every 4 instructions (13-bit, 32 per instruction)"
)
CPU_EMULATED = f"no FP8 hardware on CPU; FP8 emulated in software; {gemm_path('cpu').reason}; {TE_DELAYED}"


def encoder_model() -> nn.Sequential:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=D_MODEL, nhead=4, dim_feedforward=128, dropout=0.0, batch_first=True)
    return nn.Sequential(nn.Linear(D_IN, D_MODEL), nn.TransformerEncoder(layer, 2), nn.Linear(D_MODEL, N_CLASSES))


def fp8lab_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, Linear)]


@pytest.fixture
def count_linear_forwards(monkeypatch):
    """Counts fp8lab.Linear.forward calls (patched on the class: no hooks are added,
    which would themselves switch torch's fused fast paths off)."""
    calls = []
    forward = Linear.forward

    def counting(self, x):
        calls.append(self)
        return forward(self, x)

    monkeypatch.setattr(Linear, "forward", counting)
    return calls


def test_convert_replaces_every_convertible_linear_in_place():
    model = encoder_model()
    params_before = {id(p) for p in model.parameters()}
    rng_before = torch.get_rng_state()
    assert fp8lab.convert(model, fp8=FP8Options(fallback="emulated")) is model
    assert torch.equal(torch.get_rng_state(), rng_before)  # no throw-away init ran
    assert fp8lab_names(model) == CONVERTED
    assert {id(p) for p in model.parameters()} == params_before  # same Parameters, ties kept
    for name in SKIPPED:
        out_proj = model.get_submodule(name)
        assert type(out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear
        assert "reads out_proj.weight directly" in getattr(out_proj, SKIP_REASON_ATTR)


def test_odd_dimensions_fall_back_alone_on_fp8_hardware():
    model = fp8lab.convert(encoder_model(), fp8=FP8Options(fallback="emulated"))
    rows = {r.name: r for r in fp8lab.describe(model, H100, te=NO_TE)}
    assert [n for n in rows if rows[n].backend == "scaled_mm"] == CONVERTED[1:-1]
    assert rows["0"] == LayerRow(
        "0", "fp8", "emulated",
        "dimensions 24x64 are not multiples of 16, which a hardware FP8 GEMM needs; FP8 emulated in software",
    )  # fmt: skip
    assert rows["2"].backend == "emulated" and "dimensions 64x30 are not multiples of 16" in rows["2"].reason
    assert rows["1.layers.0.linear1"].reason == "torch._scaled_mm on H100 (sm_90); install fp8lab[te] for fused kernels"
    for name in SKIPPED:
        assert rows[name].precision == "torch" and "not converted" in rows[name].reason

    bf16_fallback = fp8lab.convert(encoder_model(), fp8=FP8Options(fallback="bf16"))
    head = plan_for(bf16_fallback.get_submodule("2"), H100, NO_TE)
    assert head.backend == "bf16" and head.reason.startswith("dimensions 64x30 are not multiples of 16")
    te_plan = plan_for(bf16_fallback.get_submodule("1.layers.1.linear2"), H100, TEFacts("2.1.0"))
    assert te_plan.backend == "te" and te_plan.reason == "Transformer Engine 2.1.0 on H100 (sm_90)"
    # on this machine: the fallback, and the exact GEMM path that runs it
    assert fp8lab.describe(bf16_fallback)[0].reason == f"no FP8 hardware on CPU; {gemm_path('cpu').reason}"


def test_multihead_attention_out_proj_forward_never_runs(count_linear_forwards):
    """Why convert leaves out_proj alone: torch reads its weight, never calls it."""
    mha = nn.MultiheadAttention(D_MODEL, 4, batch_first=True)
    naive = Linear(D_MODEL, D_MODEL, fp8=FP8Options(fallback="emulated"))
    naive.weight, naive.bias = mha.out_proj.weight, mha.out_proj.bias
    mha.out_proj = naive
    x = torch.randn(2, 8, D_MODEL)
    mha(x, x, x)
    assert count_linear_forwards == [] and naive.fp8_state.forwards_since_update == 0  # FP8 claimed, never run
    assert torch.equal(naive.fp8_state.amax_history, torch.zeros_like(naive.fp8_state.amax_history))


def test_fused_encoder_fast_path_does_not_bypass_converted_layers(count_linear_forwards):
    # eval + no_grad + no autocast is where torch's fused encoder kernel would read
    # linear1/linear2 weights directly; convert switches it off.
    model = fp8lab.convert(encoder_model(), fp8=FP8Options(fallback="emulated")).eval()
    with torch.no_grad():
        model(torch.randn(2, 8, D_IN))
    assert sorted(n for n, m in model.named_modules() if m in count_linear_forwards) == sorted(CONVERTED)


def test_converted_output_matches_float64_original():
    model = encoder_model()
    original64 = copy.deepcopy(model).double()
    fp8lab.convert(model, fp8=FP8Options(fallback="emulated"))
    x = torch.randn(8, 16, D_IN, generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(x).float().pow(2).mean().backward()  # set the scales from real amaxes
    fp8lab.update_scales(model)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x)
        y64 = original64(x.double())
    db = sqnr_db(y64, y)
    assert db >= 20.0, db


def test_converted_model_trains_with_emulated_fp8(one_thread):
    model = fp8lab.convert(encoder_model(), fp8=FP8Options(fallback="emulated"))
    teacher = torch.randn(D_IN, N_CLASSES, generator=torch.Generator().manual_seed(2))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(3)
    losses = []
    for _ in range(40):
        x = torch.randn(16, 8, D_IN, generator=gen)
        y = (x @ teacher).argmax(-1)  # (B, T) classes: a learnable per-token rule
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        fp8lab.update_scales(model)
        losses.append(loss.detach())
    first, last = losses[0].item(), torch.stack(losses[-5:]).mean().item()
    assert last < 0.6 * first, (first, last)
    assert all(not torch.equal(s.scale, torch.ones(3)) for s in fp8lab.scaling.update.scaling_states(model))


def test_convert_applies_policy_and_handles_odd_cases():
    model = fp8lab.convert(
        encoder_model(), policy=PrecisionPolicy(keep_bf16=("2", "*.layers.1.*")), fp8=FP8Options(fallback="emulated")
    )
    rows = {r.name: r for r in fp8lab.describe(model)}
    assert rows["2"].reason.startswith("kept in BF16 by policy pattern '2';") and rows["2"].precision == "bf16"
    assert rows["1.layers.1.linear1"].reason.startswith("kept in BF16 by policy pattern '*.layers.1.*';")
    assert rows["1.layers.0.linear1"] == LayerRow("1.layers.0.linear1", "fp8", "emulated", CPU_EMULATED)

    class Scaled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    shared = nn.Linear(16, 16)
    odd = nn.Sequential(shared, Scaled(16, 16), shared, nn.LazyLinear(8))
    fp8lab.convert(odd)
    assert isinstance(odd[0], Linear) and odd[0] is odd[2]  # one layer registered twice
    assert "Scaled overrides nn.Linear.forward" in getattr(odd[1], SKIP_REASON_ATTR)
    assert "lazy layer not materialised" in getattr(odd[3], SKIP_REASON_ATTR)
    assert isinstance(fp8lab.convert(nn.Linear(16, 32)), Linear)
    with pytest.raises(ValueError, match="fallback"):
        fp8lab.convert(nn.Linear(16, 32), fp8=FP8Options(fallback="fp16"))


def test_describe_gpt_default_policy_keeps_only_lm_head_in_bf16():
    model = GPT.from_preset("tiny", num_layers=2, fallback="emulated")
    rows = fp8lab.describe(model)
    assert all(isinstance(r, LayerRow) for r in rows)
    assert [r.name for r in rows] == [
        f"blocks.{i}.{s}" for i in range(2) for s in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    ] + ["lm_head"]
    assert all((r.precision, r.backend, r.reason) == ("fp8", "emulated", CPU_EMULATED) for r in rows[:-1])
    assert rows[-1] == LayerRow(
        "lm_head", "bf16", "bf16", f"kept in BF16 by policy pattern 'lm_head'; {gemm_path('cpu').reason}"
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        rows[0].precision = "bf16"
    assert fp8lab.describe(GPT.from_preset("tiny", num_layers=1))[0].reason.startswith("no FP8 hardware on CPU;")
    lines = str(rows).splitlines()
    assert lines[0].split() == ["layer", "precision", "backend", "reason"] and len(lines) == len(rows) + 1
    assert len({line.index(" fp8 " if " fp8 " in line else " bf16 ") for line in lines[1:]}) == 1  # aligned


def test_policy_first_and_last_blocks_and_patterns():
    policy = PrecisionPolicy(keep_bf16=("lm_head", "blocks.1.mlp.*"), first_last_bf16=1)
    model = GPT.from_preset("tiny", fallback="emulated", policy=policy)  # 4 blocks
    rows = {r.name: r for r in fp8lab.describe(model)}
    for i in (0, 3):
        for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2"):
            row = rows[f"blocks.{i}.{layer}"]
            assert row.precision == "bf16" and row.reason.startswith(
                f"kept in BF16 by policy first_last_bf16=1 (block {i} of 4);"
            )
    assert rows["blocks.1.mlp.fc2"].reason.startswith("kept in BF16 by policy pattern 'blocks.1.mlp.*';")
    assert [n for n, r in rows.items() if r.precision == "fp8"] == ["blocks.1.attn.qkv", "blocks.1.attn.proj"] + [
        f"blocks.2.{s}" for s in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
    ]
    all_fp8 = GPT.from_preset("tiny", num_layers=1, fallback="emulated", policy=PrecisionPolicy(keep_bf16=()))
    assert {r.precision for r in fp8lab.describe(all_fp8)} == {"fp8"}


def test_describe_plain_model_shows_unconverted_layers():
    rows = fp8lab.describe(nn.Sequential(nn.Linear(4, 4)))
    assert rows == [LayerRow("0", "torch", "torch", "plain torch.nn.Linear (not converted)")]


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(keep_bf16="lm_head"), "keep_bf16"),
        (dict(first_last_bf16=-1), "first_last_bf16"),
        (dict(first_last_bf16=True), "first_last_bf16"),
    ],
)
def test_policy_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        PrecisionPolicy(**kwargs)
