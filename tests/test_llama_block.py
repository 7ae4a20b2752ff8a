"""The Llama-style block (RMSNorm, SwiGLU, rotary positions, no biases) and its GPT preset.

Tolerances, each against a float64 reference written here from the definition:
- RMSNorm in float32: forward and gradients within rtol 2e-6 / atol 1e-6 (float32 rounding
  of a 128-term mean square; measured ~3e-7);
- rotary embedding in float32: within 1e-6 absolute on unit-scale inputs (angles up to 127
  rad are rounded once to float32: |error| <= 2^-24 * 2 per term); in float64, q.k
  depends on positions only through their offset, to 1e-12 relative;
- SwiGLU MLP and rotary attention with every GEMM in fp32: SQNR >= 100 dB (float32
  rounding is ~140 dB);
- the same with emulated FP8 GEMMs (E4M3 forward, E5M2 gradients, BF16 autocast): forward
  SQNR >= 20 dB and every gradient >= 17 dB, the bounds of tests/test_layers.py.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

import fp8lab
from fp8lab import GPT, FP8Options, GPTConfig, LayerNormMLP, MultiheadAttention
from fp8lab.layers.norm import Norm
from fp8lab.layers.rotary import RotaryEmbedding
from fp8lab.run import checkpoint as ckpt
from fp8lab.run import memory
from fp8lab.run.overrides import apply_overrides
from fp8lab.run.recipe_file import load_recipe
from fp8lab.run.runner import Runner
from fp8lab.telemetry.collector import ScalingCollector
from tests.helpers import QUICKSTART, sigterm_in_training_step, sqnr_db
from tests.test_gpt import train_step

B, T, C, HEADS, FFN = 2, 32, 64, 4, 96
EPS = 1e-5
FP32_DB = 100.0
FWD_DB, GRAD_DB = 20.0, 17.0
BLOCK_GEMMS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")


# ---- float64 references, from the definitions ----


def ref_rms_norm(x, w):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * w


def ref_rotary(x, base):
    """(..., T, D) rotated as complex numbers: channel i + 1j * channel i + D/2, at position
    t, times exp(1j * t * base ** (-2i / D)) (RoFormer eq. 13, "rotate half" pairing)."""
    t, d = x.shape[-2], x.shape[-1]
    z = torch.complex(x[..., : d // 2].double(), x[..., d // 2 :].double())  # (..., T, D/2)
    freqs = torch.tensor([base ** (-2.0 * i / d) for i in range(d // 2)], dtype=torch.float64)
    angles = torch.arange(t, dtype=torch.float64)[:, None] * freqs  # (T, D/2)
    z = z * torch.polar(torch.ones_like(angles), angles)
    return torch.cat([z.real, z.imag], dim=-1)


def ref_swiglu_mlp(x, p):
    """down(silu(gate(h)) * up(h)), h = RMSNorm(x); fc1's rows are [gate; up]."""
    h = ref_rms_norm(x, p["norm.weight"])
    gate_w, up_w = p["fc1.weight"].chunk(2, dim=0)
    gate, up = h @ gate_w.T, h @ up_w.T
    return (gate * torch.sigmoid(gate) * up) @ p["fc2.weight"].T


def ref_rotary_attention(x, p, base: float | None):
    """Causal attention after RMSNorm; q and k rotated by ``ref_rotary`` (None: not rotated)."""
    h = ref_rms_norm(x, p["norm.weight"])
    q, k, v = (h @ p["qkv.weight"].T).chunk(3, dim=-1)  # (B, T, C) each: (three h d) layout
    q, k, v = (u.unflatten(-1, (HEADS, -1)).transpose(1, 2) for u in (q, k, v))  # (B, H, T, D)
    if base is not None:
        q, k = ref_rotary(q, base), ref_rotary(k, base)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, H, T, T)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    y = (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)  # (B, T, C)
    return y @ p["proj.weight"].T


def sqnr_against_float64(layer, ref_fn, *, fp8: bool) -> dict[str, float]:
    """SQNR (dB) of the layer's forward, input gradient and parameter gradients against
    ``ref_fn`` in float64 on the same weights. FP8: the scales are first set by one step."""
    torch.manual_seed(1)
    x, g = torch.randn(B, T, C), torch.randn(B, T, C)
    if fp8:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            layer(x).float().backward(g)
        fp8lab.update_scales(layer)
    layer.zero_grad()
    x = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=fp8):
        y = layer(x)
    y.float().backward(g)
    p64 = {n: p.detach().double().requires_grad_() for n, p in layer.named_parameters()}
    x64 = x.detach().double().requires_grad_()
    y64 = ref_fn(x64, p64)
    (y64 * g.double()).sum().backward()
    results = {"forward": sqnr_db(y64, y), "input grad": sqnr_db(x64.grad, x.grad)}
    results.update({f"{n} grad": sqnr_db(p64[n].grad, p.grad) for n, p in layer.named_parameters()})
    return results


def assert_sqnr(results: dict[str, float], fwd_db: float, grad_db: float) -> None:
    low = {k: round(v, 1) for k, v in results.items() if v < (fwd_db if k == "forward" else grad_db)}
    assert not low, f"SQNR below bound (dB): {low}; all: { {k: round(v, 1) for k, v in results.items()} }"


def in_fp32(layer):
    for module in layer.modules():
        if isinstance(module, fp8lab.Linear):
            module.keep_out_of_fp8("test: fp32 reference mode", "fp32")
    return layer


# ---- RMSNorm ----


def test_rms_norm_matches_float64():
    torch.manual_seed(0)
    norm = Norm(128, "RMSNorm", EPS)
    assert norm.bias is None
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = (torch.randn(4, 16, 128) * 3.0).requires_grad_()
    g = torch.randn(4, 16, 128)
    y = norm(x)
    y.backward(g)
    x64, w64 = x.detach().double().requires_grad_(), norm.weight.detach().double().requires_grad_()
    y64 = ref_rms_norm(x64, w64)
    y64.backward(g.double())
    torch.testing.assert_close(y, y64.float(), rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(x.grad, x64.grad.float(), rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(norm.weight.grad, w64.grad.float(), rtol=2e-6, atol=1e-5)  # a sum of 64 terms


# ---- rotary embedding ----


@pytest.mark.parametrize("base", [10000.0, 500000.0])
def test_rotary_matches_float64_definition(base):
    torch.manual_seed(0)
    rope = RotaryEmbedding(32, base)
    q, k = torch.randn(2, 3, 128, 32), torch.randn(2, 3, 128, 32)
    q_rot, k_rot = rope(q, k)
    assert q_rot.dtype == torch.float32
    torch.testing.assert_close(q_rot, ref_rotary(q, base).float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(k_rot, ref_rotary(k, base).float(), rtol=0, atol=1e-6)
    assert torch.equal(q_rot[..., 0, :], q[..., 0, :])  # position 0: angle 0, no rotation
    # bf16 in (the QKV GEMM's output under autocast): rotated in float32, rounded once
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q_bf16, _ = rope(q.bfloat16(), k.bfloat16())
    assert q_bf16.dtype == torch.bfloat16
    ref = ref_rotary(q.bfloat16(), base)
    assert ((q_bf16.double() - ref).abs() <= 2**-8 * ref.abs() + 1e-6).all()  # bf16's half ulp


def test_rotary_scores_depend_only_on_the_offset():
    torch.manual_seed(0)
    d, t = 32, 64
    q, k = torch.randn(d, dtype=torch.float64), torch.randn(d, dtype=torch.float64)
    # the same q at every position and the same k at every position
    q_rot, k_rot = RotaryEmbedding(d)(q.expand(1, 1, t, d), k.expand(1, 1, t, d))
    scores = (q_rot[0, 0] @ k_rot[0, 0].T).double()  # (T, T): scores[m, n] = q_m . k_n
    scale = scores.abs().max()
    for offset in range(-t + 1, t):
        diagonal = scores.diagonal(offset)  # every (m, n) with n - m == offset
        assert (diagonal - diagonal[0]).abs().max() <= 1e-12 * scale, offset
    # ... and it does depend on the offset (no rotation at all would pass the check above)
    offsets = torch.stack([scores.diagonal(o)[0] for o in range(t)])
    assert offsets.std() > 0.1 * scale
    assert torch.allclose(scores.diagonal(0), (q @ k).expand(t))  # offset 0: the plain dot product


def test_rotary_arguments_are_checked_before_anything_is_built():
    with pytest.raises(ValueError, match="even"):
        RotaryEmbedding(31)
    with pytest.raises(ValueError, match="even"):
        MultiheadAttention(12, 4, rotary_base=1e4)  # head size 3
    with pytest.raises(TypeError, match="^rotary_base"):
        MultiheadAttention(16, 4, rotary_base="1e4")
    with pytest.raises(ValueError, match="^rotary_base"):
        MultiheadAttention(16, 4, rotary_base=1.0)  # every angle 0: no position information
    assert MultiheadAttention(16, 4, rotary_base=500000).rotary.base == 500000.0


# ---- SwiGLU MLP and rotary attention, fp32 and FP8 ----


def swiglu_mlp(fp8: bool) -> LayerNormMLP:
    torch.manual_seed(0)
    layer = LayerNormMLP(
        C, FFN, normalization="RMSNorm", activation="swiglu", bias=False, fp8=FP8Options(fallback="emulated")
    )
    with torch.no_grad():
        layer.norm.weight.uniform_(0.5, 1.5)
    assert layer.fc1.out_features == 2 * FFN and layer.fc2.in_features == FFN
    return layer if fp8 else in_fp32(layer)


def rotary_attention(fp8: bool) -> MultiheadAttention:
    torch.manual_seed(0)
    layer = MultiheadAttention(
        C, HEADS, normalization="RMSNorm", rotary_base=10000.0, bias=False, fp8=FP8Options(fallback="emulated")
    )
    with torch.no_grad():
        layer.norm.weight.uniform_(0.5, 1.5)
    return layer if fp8 else in_fp32(layer)


def test_swiglu_mlp_in_fp32_matches_float64():
    assert_sqnr(sqnr_against_float64(swiglu_mlp(fp8=False), ref_swiglu_mlp, fp8=False), FP32_DB, FP32_DB)


def test_swiglu_mlp_in_fp8_matches_float64():
    assert_sqnr(sqnr_against_float64(swiglu_mlp(fp8=True), ref_swiglu_mlp, fp8=True), FWD_DB, GRAD_DB)


def test_rotary_attention_in_fp32_matches_float64():
    layer = rotary_attention(fp8=False)
    assert_sqnr(sqnr_against_float64(layer, lambda x, p: ref_rotary_attention(x, p, 1e4), fp8=False), FP32_DB, FP32_DB)
    # the reference without rotation is far off (measured 14 dB): the check sees the rotation
    no_rope = sqnr_against_float64(layer, lambda x, p: ref_rotary_attention(x, p, None), fp8=False)
    assert no_rope["forward"] < 30.0, no_rope


def test_rotary_attention_in_fp8_matches_float64():
    results = sqnr_against_float64(rotary_attention(fp8=True), lambda x, p: ref_rotary_attention(x, p, 1e4), fp8=True)
    assert_sqnr(results, FWD_DB, GRAD_DB)


# ---- the "llama-tiny" GPT preset ----

LLAMA_STEPS, LLAMA_BATCH, LLAMA_BLOCK, LLAMA_LR = 8, 4, 32, 3e-3


def llama(num_layers: int = 2) -> GPT:
    return GPT.from_preset(
        "llama-tiny",
        num_layers=num_layers,
        block_size=LLAMA_BLOCK,
        scaling=fp8lab.DelayedScaling(amax_history_len=8),
        fallback="emulated",
    )


def fixed_batch() -> tuple[torch.Tensor, torch.Tensor]:
    idx = torch.randint(0, 256, (LLAMA_BATCH, LLAMA_BLOCK + 1), generator=torch.Generator().manual_seed(0))
    return idx[:, :-1], idx[:, 1:]


def test_llama_tiny_preset():
    cfg = GPTConfig.from_preset("llama-tiny")
    tiny = GPTConfig.from_preset("tiny")
    for name in ("vocab_size", "block_size", "num_layers", "hidden_size", "num_attention_heads"):
        assert getattr(cfg, name) == getattr(tiny, name), name  # the scale of "tiny"
    assert (cfg.normalization, cfg.activation, cfg.bias) == ("RMSNorm", "swiglu", False)
    assert cfg.position_embedding == "rotary"
    assert (cfg.ffn_hidden_size, cfg.rotary_base, cfg.tie_embeddings) == (384, 10000.0, False)
    assert (tiny.position_embedding, tiny.rotary_base) == ("learned", 10000.0)  # the defaults: GPT-2's block
    model = GPT.from_preset("llama-tiny", num_layers=1)
    assert model.pos_emb is None and model.blocks[0].attn.rotary.base == 10000.0
    assert GPT.from_preset("tiny", num_layers=1).blocks[0].attn.rotary is None
    keys = list(model.state_dict())
    assert not [k for k in keys if k.endswith(".bias") or k.startswith("pos_emb")], keys
    assert model.state_dict()["blocks.0.mlp.fc1.weight"].shape == (2 * 384, 128)  # [gate; up]
    assert model.state_dict()["blocks.0.mlp.fc2.weight"].shape == (128, 384)
    # the CLI's memory estimate counts the real model's parameters
    assert memory.gpt_params({**vars(cfg), "num_layers": 1}) == sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize(
    "overrides,field,allowed",
    [
        (dict(position_embedding="rope"), "position_embedding", "'learned', 'rotary'"),
        (dict(position_embedding=None), "position_embedding", "'learned', 'rotary'"),
        (dict(normalization="rmsnorm"), "normalization", "'LayerNorm', 'RMSNorm'"),
        (dict(activation="geglu"), "activation", "'gelu', 'swiglu'"),
        (dict(rotary_base=0), "rotary_base", "> 1"),
        (dict(rotary_base=float("nan")), "rotary_base", "> 1"),
        (dict(rotary_base="10000"), "rotary_base", "> 1"),
        (dict(rotary_base=True), "rotary_base", "> 1"),
        (dict(bias="no"), "bias", "bool"),
        (dict(num_attention_heads=128), "position_embedding", "even"),  # head size 1
    ],
)
def test_bad_llama_field_names_the_field_and_the_allowed_values(overrides, field, allowed):
    with pytest.raises(ValueError, match=field) as err:
        GPTConfig.from_preset("llama-tiny", **overrides)
    assert allowed in str(err.value)


def test_llama_tiny_trains_in_fp8_on_a_fixed_batch(one_thread):
    torch.manual_seed(0)
    model = llama()
    rows = {r.name: r.precision for r in fp8lab.describe(model)}
    assert {n: p for n, p in rows.items() if n.startswith("blocks.")} == {
        f"blocks.{i}.{gemm}": "fp8" for i in range(2) for gemm in BLOCK_GEMMS
    }
    opt = torch.optim.AdamW(model.parameters(), lr=LLAMA_LR, weight_decay=0.0)
    x, y = fixed_batch()
    losses = torch.stack([train_step(model, opt, x, y) for _ in range(LLAMA_STEPS)]).tolist()
    assert all(math.isfinite(v) for v in losses), losses
    assert 5.0 < losses[0] < 6.0, losses  # ~ln(256) = 5.55 at init
    assert losses[-1] < 0.6 * losses[0], losses  # memorising one batch (measured: 0.40)
    for i in range(2):
        for gemm in BLOCK_GEMMS:  # every scale moved off its initial 1.0: real FP8 casts ran
            assert (model.get_submodule(f"blocks.{i}.{gemm}").fp8_state.scale != 1.0).all(), (i, gemm)


def test_swiglu_and_rotary_gemms_show_in_per_layer_telemetry(one_thread):
    torch.manual_seed(0)
    model = llama(num_layers=1)
    collector = ScalingCollector(model)
    assert collector.names == tuple(f"blocks.0.{gemm}" for gemm in BLOCK_GEMMS)  # lm_head: BF16
    collector.arm(whatif=False)
    opt = torch.optim.AdamW(model.parameters(), lr=LLAMA_LR)
    x, y = fixed_batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
    loss.backward()
    snapshot = collector.snapshot()
    opt.step()
    fp8lab.update_scales(model)
    scalars = collector.read(snapshot).scalars()
    for gemm in ("mlp.fc1", "mlp.fc2"):
        for role in ("input", "weight", "grad_output"):
            amax = scalars[f"scaling/blocks.0.{gemm}/{role}/amax"]
            assert math.isfinite(amax) and amax > 0, (gemm, role, amax)


def test_llama_tiny_state_round_trip_resumes_bit_exact(one_thread):
    """Model and optimizer state saved after 2 steps and loaded into a fresh model: the
    next 2 steps give the same losses, parameters, amax histories and scales, bit for bit."""
    x, y = fixed_batch()
    torch.manual_seed(0)
    model = llama()
    opt = torch.optim.AdamW(model.parameters(), lr=LLAMA_LR)
    for _ in range(2):
        train_step(model, opt, x, y)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)

    torch.manual_seed(1)
    resumed = llama()
    assert not torch.equal(resumed.state_dict()["blocks.0.mlp.fc1.weight"], saved["model"]["blocks.0.mlp.fc1.weight"])
    resumed.load_state_dict(saved["model"])
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=LLAMA_LR)
    resumed_opt.load_state_dict(saved["opt"])

    for _ in range(2):
        assert torch.equal(train_step(model, opt, x, y), train_step(resumed, resumed_opt, x, y))
    ref, after = model.state_dict(), resumed.state_dict()
    assert list(ref) == list(after)
    assert all(torch.equal(ref[k], after[k]) for k in ref), [k for k in ref if not torch.equal(ref[k], after[k])]


# ---- from the command line's config: a run, interrupted and resumed ----

CLI_SETS = [
    "model.preset=llama-tiny",
    "model.num_layers=1",
    "train.steps=4",
    "train.batch_size=2",
    "train.block_size=16",
    "train.warmup_steps=1",
    "train.log_interval=1",
    "train.eval_interval=4",
    "train.eval_batches=1",
    "train.checkpoint_interval=2",
]


def test_llama_tiny_run_from_the_cli_config_resumes_bit_exact(tmp_path, one_thread):
    """``fp8lab run quickstart --set model.preset=llama-tiny``: both variants build the
    Llama block, and a run stopped by SIGTERM at step 3 and resumed equals one that ran
    straight through (parameters, amax histories, scales, losses)."""
    cfg = apply_overrides(load_recipe(QUICKSTART), CLI_SETS)
    straight = Runner(cfg, tmp_path / "a", progress=False)
    assert all(run.model.pos_emb is None and run.model.config.activation == "swiglu" for run in straight.variants)
    straight.run()

    interrupted = Runner(cfg, tmp_path / "b", progress=False)
    hook = sigterm_in_training_step(interrupted, 3)
    assert interrupted.run() is None  # finished step 3, checkpointed, stopped
    hook.remove()
    assert [s for s, _ in ckpt.list_checkpoints(interrupted.run_dir)] == [2, 3]
    resumed = Runner(cfg, tmp_path / "unused", progress=False, resume=interrupted.run_dir)
    assert resumed.start_step == 3
    resumed.run()

    for a, b in zip(straight.variants, resumed.variants):
        ref, after = a.model.state_dict(), b.model.state_dict()
        assert list(ref) == list(after)
        for key in ref:
            assert torch.equal(ref[key], after[key]), (a.variant.name, key)
    fp8 = dict(straight.variants[1].model.named_modules())
    assert (fp8["blocks.0.mlp.fc1"].fp8_state.scale != 1.0).all()  # its FP8 state was exercised
