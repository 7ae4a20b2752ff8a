"""FP8 attention (``MultiheadAttention(fp8_dpa=True)``, ``fp8lab.layers.fp8_attention``).

The reference is the documented model written again here in float64: the same casts with
the same scales (torch's own float8 dtypes: clamp, round to nearest even), exact products,
float64 sums where the model sums in fp32, and the gradient casts as TE's Python reference
places them (``FP8EmulationFunc``: forward quantize-dequantize, straight-through backward;
gradient quantize-dequantize in the backward). Tolerances:
- casts of q, k, v and of P (given the model's own fp32 P): bit-exact;
- the softmax probabilities P (fp32 GEMM and softmax vs float64): 1e-5 absolute;
- the output vs the float64 model rounded to bf16: >= 99% of elements equal (100% measured)
  and >= 45 dB SQNR against the unrounded float64 output (52-57 dB measured: bf16's rounding);
- the gradients vs autograd of the float64 model: >= 50 dB SQNR (57-68 dB measured; a cast of
  a value that fp32 and float64 put on either side of a rounding boundary differs by one FP8
  step). Dropping the dS cast, the dO cast, or taking the softmax backward on the FP8 P
  instead of the fp32 P each gives ~21 dB, so the bound tells the model from its neighbours;
- FP8 attention vs the fp32 attention: >= 20 dB (output), >= 12 dB (gradients); measured
  23-24 dB and 18-21 dB on these inputs.
"""

from __future__ import annotations

import io

import pytest
import torch

import fp8lab
from fp8lab.formats import E4M3, E5M2
from fp8lab.layers.attention import MultiheadAttention, attention
from fp8lab.layers.fp8_attention import Bwd, Fwd, fp8_attention
from tests.helpers import sqnr_db

B, H, T, D = 2, 2, 32, 16
EMULATED = fp8lab.FP8Options(fallback="emulated")


def _states(history: int = 4):
    layer = MultiheadAttention(
        H * D,
        H,
        fp8_dpa=True,
        fp8=fp8lab.FP8Options(scaling=fp8lab.DelayedScaling(amax_history_len=history), fallback="emulated"),
    )
    return layer.dpa.scaling_fwd, layer.dpa.scaling_bwd


def _qkv(seed: int = 0, dtype=torch.bfloat16):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, H, T, D, generator=g) * s).to(dtype).requires_grad_() for s in (1.5, 2.0, 0.7)]


def _cast64(x: torch.Tensor, scale: torch.Tensor, fmt) -> torch.Tensor:
    """The FP8 values of x (scaled in fp32, clamped, RNE by torch's float8 dtype), as float64."""
    return (x.detach().float() * scale).clamp(-fmt.max, fmt.max).to(fmt.dtype).to(torch.float64)


class _QDQ(torch.autograd.Function):
    """Forward: cast and dequantize; backward: straight through (TE's QKV/S/O emulation)."""

    @staticmethod
    def forward(ctx, x, scale, fmt):
        return _cast64(x, scale, fmt) * scale.reciprocal().double()

    @staticmethod
    def backward(ctx, g):
        return g, None, None


class _GradQDQ(torch.autograd.Function):
    """Forward: identity; backward: the gradient cast and dequantized (TE's dO/dP/dQKV)."""

    @staticmethod
    def forward(ctx, x, scale, fmt):
        ctx.scale, ctx.fmt = scale, fmt
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return _cast64(g, ctx.scale, ctx.fmt) * ctx.scale.reciprocal().double(), None, None


def _reference(q, k, v, fwd, bwd, causal=True):
    """The documented model in float64, differentiable (autograd gives its backward)."""
    sf, sb = fwd.scale, bwd.scale
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    qd, kd, vd = (_GradQDQ.apply(_QDQ.apply(t, sf[Fwd.QKV], E4M3), sb[Bwd.DQKV], E5M2) for t in (q64, k64, v64))
    scores = _GradQDQ.apply(qd @ kd.transpose(-2, -1) * D**-0.5, sb[Bwd.DP], E5M2)
    if causal:
        scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = _GradQDQ.apply(_QDQ.apply(_QDQ.apply(probs, sf[Fwd.S], E4M3) @ vd, sf[Fwd.O], E4M3), sb[Bwd.DO], E5M2)
    return out, (q64, k64, v64)


def _warm_states(q, k, v, g, causal=True):
    """States whose scales come from one recorded step (realistic, not powers of two)."""
    fwd, bwd = _states()
    fp8_attention(q, k, v, fwd, bwd, causal=causal, record=True).backward(g)
    holder = torch.nn.ModuleDict({"f": fwd, "b": bwd})
    fp8lab.update_scales(holder)
    for t in (q, k, v):
        t.grad = None
    return fwd, bwd


def test_forward_casts_and_gemms_against_float64_model():
    q, k, v = _qkv()
    g = torch.randn(B, H, T, D).to(torch.bfloat16)
    fwd, bwd = _warm_states(q, k, v, g)
    y = fp8_attention(q, k, v, fwd, bwd, causal=True, record=False)
    q8, k8, v8, p8, probs = y.grad_fn.saved_tensors[:5]
    s = fwd.scale
    for t8, t in zip((q8, k8, v8), (q, k, v)):  # the casts are exact: bit for bit
        assert torch.equal(t8.double(), _cast64(t, s[Fwd.QKV], E4M3))
    inv = s.reciprocal()
    scores = q8.double() @ k8.double().transpose(-2, -1) * (inv[Fwd.QKV].double() ** 2 * D**-0.5)
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(probs.double(), torch.softmax(scores, -1), rtol=0, atol=1e-5)
    assert torch.equal(p8.double(), _cast64(probs, s[Fwd.S], E4M3))  # P's cast, bit for bit
    out64 = p8.double() @ v8.double() * (inv[Fwd.S].double() * inv[Fwd.QKV].double())
    y_ref = (_cast64(out64, s[Fwd.O], E4M3) * inv[Fwd.O].double()).to(torch.bfloat16)
    assert (y == y_ref).float().mean() > 0.99  # only fp32-vs-float64 rounding-boundary cases differ
    assert sqnr_db(y_ref, y) > 40
    out_ref, _ = _reference(q, k, v, fwd, bwd)
    assert (out_ref.to(torch.bfloat16) == y).float().mean() > 0.99
    assert sqnr_db(out_ref, y) > 45


@pytest.mark.parametrize("causal", [True, False])
def test_gradients_against_autograd_of_float64_model(causal):
    q, k, v = _qkv(1)
    g = torch.randn(B, H, T, D).to(torch.bfloat16)
    fwd, bwd = _warm_states(q, k, v, g, causal)
    y = fp8_attention(q, k, v, fwd, bwd, causal=causal, record=False)
    y.backward(g)
    out_ref, leaves = _reference(q, k, v, fwd, bwd, causal)
    assert (out_ref.to(torch.bfloat16) == y).float().mean() > 0.99
    out_ref.backward(g.double())
    plain = [t.detach().float().requires_grad_() for t in (q, k, v)]
    torch.nn.functional.scaled_dot_product_attention(*plain, is_causal=causal).backward(g.float())
    for t, ref, hp in zip((q, k, v), leaves, plain):
        assert t.grad.dtype == torch.bfloat16
        model_db = sqnr_db(ref.grad, t.grad)
        assert model_db > 50, model_db
        assert model_db > sqnr_db(hp.grad, t.grad) + 25  # the bound tells the model from plain attention


def test_amaxes_recorded_and_update_scales_changes_them():
    q, k, v = _qkv(2)
    g = torch.randn(B, H, T, D).to(torch.bfloat16)
    fwd, bwd = _states(history=4)
    y = fp8_attention(q, k, v, fwd, bwd, causal=True, record=True)
    q8, k8, v8, p8, probs = (t.double() for t in y.grad_fn.saved_tensors[:5])
    y.backward(g)
    # exact: the amaxes of tensors the test sees (the inputs, the model's own fp32 P, dO)
    assert fwd.amax_history[0, Fwd.QKV] == max(t.detach().abs().max().float() for t in (q, k, v))
    assert fwd.amax_history[0, Fwd.S] == probs.max().float()
    assert bwd.amax_history[0, Bwd.DO] == g.abs().max().float()
    # O, dS and dQKV: float64 from the model's own FP8 operands (all scales are 1 here), so
    # only the fp32 sums differ
    o = p8 @ v8
    do8 = _cast64(g, bwd.scale[Bwd.DO], E5M2)
    dp = do8 @ v8.transpose(-2, -1)
    ds = probs * (dp - (probs * dp).sum(-1, keepdim=True))
    ds8 = _cast64(ds, bwd.scale[Bwd.DP], E5M2)
    dqkv = (ds8 @ k8 * D**-0.5, ds8.transpose(-2, -1) @ q8 * D**-0.5, p8.transpose(-2, -1) @ do8)
    close = dict(rtol=1e-5, atol=0)
    torch.testing.assert_close(fwd.amax_history[0, Fwd.O].double(), o.abs().max(), **close)
    torch.testing.assert_close(bwd.amax_history[0, Bwd.DP].double(), ds.abs().max(), **close)
    torch.testing.assert_close(bwd.amax_history[0, Bwd.DQKV].double(), max(t.abs().max() for t in dqkv), **close)
    assert (fwd.amax_history[0] > 0).all() and (bwd.amax_history[0] > 0).all()
    assert torch.equal(fwd.scale, torch.ones(3)) and torch.equal(bwd.scale, torch.ones(3))
    before_f, before_b = fwd.amax_history[0].clone(), bwd.amax_history[0].clone()
    fp8lab.update_scales(torch.nn.ModuleDict({"f": fwd, "b": bwd}))
    assert torch.equal(fwd.scale, torch.tensor(448.0) / before_f)  # E4M3 for qkv, s, o
    assert torch.equal(bwd.scale, torch.tensor(57344.0) / before_b)  # E5M2 for dqkv, do, dp
    assert torch.equal(fwd.amax_history[-1], before_f) and (fwd.amax_history[0] == 0).all()
    # an eval forward records nothing
    fp8_attention(q, k, v, fwd, bwd, causal=True, record=False)
    assert (fwd.amax_history[0] == 0).all()


def _layer(seed: int, **kwargs) -> MultiheadAttention:
    torch.manual_seed(seed)
    return MultiheadAttention(64, 4, fp8=EMULATED, **kwargs)


def test_off_by_default_is_the_unquantized_core():
    x = torch.randn(2, 16, 64)
    plain, off, on = _layer(0), _layer(0, fp8_dpa=False), _layer(0, fp8_dpa=True)
    assert plain.dpa is None and set(plain.state_dict()) == set(off.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(plain.parameters(), on.parameters()))  # same RNG use
    assert {k for k in on.state_dict() if k.startswith("dpa.")} == {
        f"dpa.scaling_{d}.{n}" for d in ("fwd", "bwd") for n in ("amax_history", "scale")
    }
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = plain(x)
        q, k, v = plain.qkv(x).unflatten(-1, (3, 4, 16)).permute(2, 0, 3, 1, 4)
        y_core = plain.proj(attention(q, k, v, causal=True).transpose(1, 2).flatten(2))
        assert not torch.equal(on(x), y)
    assert torch.equal(y, y_core)
    # fp8_dpa with a BF16 plan (CPU, fallback bf16): the unquantized core, bit for bit
    torch.manual_seed(0)
    bf16_on = MultiheadAttention(64, 4, fp8_dpa=True)
    torch.manual_seed(0)
    bf16_off = MultiheadAttention(64, 4)
    assert not bf16_on.dpa_runs(torch.device("cpu"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(bf16_on(x), bf16_off(x))


def test_fp8_dpa_needs_delayed_scaling():
    with pytest.raises(ValueError, match="DelayedScaling"):
        MultiheadAttention(64, 4, fp8_dpa=True, fp8=fp8lab.FP8Options(scaling=fp8lab.Float8CurrentScaling()))
    with pytest.raises(TypeError, match="fp8_dpa"):
        MultiheadAttention(64, 4, fp8_dpa="yes")


def test_sqnr_against_fp32_attention():
    q, k, v = _qkv(3)
    g = torch.randn(B, H, T, D).to(torch.bfloat16)
    fwd, bwd = _warm_states(q, k, v, g)
    y = fp8_attention(q, k, v, fwd, bwd, causal=True, record=False)
    y.backward(g)
    plain = [t.detach().float().requires_grad_() for t in (q, k, v)]
    y32 = torch.nn.functional.scaled_dot_product_attention(*plain, is_causal=True)
    y32.backward(g.float())
    assert sqnr_db(y32, y) > 20
    for t, hp in zip((q, k, v), plain):
        assert sqnr_db(hp.grad, t.grad) > 12


def _step(layer, opt, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = layer(x).float().square().mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    fp8lab.update_scales(layer)
    return loss.detach()


def test_save_load_resumes_bit_exactly(one_thread):
    xs = [torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    a = _layer(0, fp8_dpa=True)
    opt_a = torch.optim.SGD(a.parameters(), lr=0.1)
    for x in xs[:3]:
        _step(a, opt_a, x)
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    assert saved["model"]["dpa.scaling_bwd.amax_history"][-1].gt(0).all()  # states really saved
    b = _layer(1, fp8_dpa=True)
    b.load_state_dict(saved["model"])
    opt_b = torch.optim.SGD(b.parameters(), lr=0.1)
    opt_b.load_state_dict(saved["opt"])
    for x in xs[3:]:
        assert torch.equal(_step(a, opt_a, x), _step(b, opt_b, x))
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(ta, tb), name


def test_gpt_passes_fp8_dpa_down():
    torch.manual_seed(0)
    default = fp8lab.GPT.from_preset("tiny", fallback="emulated", num_layers=1)
    assert not any(".dpa." in k for k in default.state_dict())
    torch.manual_seed(0)
    model = fp8lab.GPT.from_preset("tiny", fallback="emulated", num_layers=1, fp8_dpa=True)
    assert model.config.fp8_dpa and model.blocks[0].attn.dpa_runs(torch.device("cpu"))
    idx = torch.randint(0, model.config.vocab_size, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(idx).float().logsumexp(-1).mean().backward()
    fp8lab.update_scales(model)
    dpa = model.blocks[0].attn.dpa
    assert (dpa.scaling_fwd.scale != 1).all() and (dpa.scaling_bwd.scale != 1).all()
    with pytest.raises(ValueError, match="fp8_dpa"):
        fp8lab.GPTConfig.from_preset("tiny", fp8_dpa=1)


def test_log_step_reports_each_attention_tensor():
    from fp8lab.telemetry.step import StepTelemetry

    torch.manual_seed(0)
    model = fp8lab.GPT.from_preset("tiny", fallback="emulated", num_layers=1, fp8_dpa=True)
    telemetry = StepTelemetry(model, log_interval=1)
    idx = torch.randint(0, model.config.vocab_size, (2, 16))
    dpa = model.blocks[0].attn.dpa
    for _ in range(2):
        telemetry.begin(log=True, whatif=False)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(idx).float().logsumexp(-1).mean().backward()
        scale = torch.cat([dpa.scaling_fwd.scale, dpa.scaling_bwd.scale])
        amax = torch.cat([dpa.scaling_fwd.amax_history[0], dpa.scaling_bwd.amax_history[0]])
        scalars = telemetry.end().stats.scalars()
    tensors = ("qkv", "s", "o", "dqkv", "do", "dp")
    for i, tensor in enumerate(tensors):
        prefix = f"scaling/blocks.0.attn.dpa/{tensor}"
        assert scalars[f"{prefix}/scale"] == float(scale[i]) and scalars[f"{prefix}/amax"] == float(amax[i])
        assert scalars[f"{prefix}/sqnr_db"] > 10 and 0 <= scalars[f"{prefix}/overflow_pct"] <= 100
    for gemm in ("s", "o", "dv", "dp", "dq", "dk"):  # FP8 vs BF16 twin: FP8-sized, not bf16-sized, errors
        assert 10 < scalars[f"accuracy/blocks.0.attn.dpa/{gemm}_sqnr_db"] < 45, gemm
    assert float(scale[0]) != 1.0  # the second step's scales came from the first step's amaxes
    assert "scaling/blocks.0.attn.qkv/input/scale" in scalars  # the layers' rows are unchanged
    torch.manual_seed(0)
    plain = fp8lab.GPT.from_preset("tiny", fallback="emulated", num_layers=1)
    assert StepTelemetry(plain).collector.attention == []


def test_e4m3_format_casts_the_backward_in_e4m3():
    layer = MultiheadAttention(
        64, 4, fp8_dpa=True, fp8=fp8lab.FP8Options(scaling=fp8lab.DelayedScaling(fp8_format="e4m3"))
    )
    assert layer.dpa.scaling_bwd.scaling.tensor_format is E4M3
    assert torch.equal(layer.dpa.scaling_bwd.fp8_max, torch.full((3,), 448.0))
    hybrid = MultiheadAttention(64, 4, fp8_dpa=True)
    assert hybrid.dpa.scaling_bwd.scaling.tensor_format is E5M2
    assert torch.equal(hybrid.dpa.scaling_fwd.fp8_max, torch.full((3,), 448.0))
    assert torch.equal(hybrid.dpa.scaling_bwd.fp8_max, torch.full((3,), 57344.0))


def test_describe_has_a_row_for_the_attention_core():
    on = fp8lab.describe(MultiheadAttention(64, 4, fp8_dpa=True, fp8=EMULATED))
    assert [(r.name, r.precision, r.backend) for r in on if r.name == "dpa"] == [("dpa", "fp8", "emulated")]
    off = fp8lab.describe(MultiheadAttention(64, 4, fp8_dpa=True))  # CPU, fallback bf16
    assert [(r.name, r.precision) for r in off if r.name == "dpa"] == [("dpa", "bf16")]
    assert "not quantized" in str(off)
    assert [r.name for r in fp8lab.describe(MultiheadAttention(64, 4, fp8=EMULATED))] == ["qkv", "proj"]


def _against_cpu(device: str) -> None:
    """The FP8 attention on ``device`` against the CPU with the same scales: the casts are
    exact on both, only the fp32 GEMMs' summation order differs (>= 99% of outputs and
    gradients bit-equal, >= 40 dB SQNR)."""
    q, k, v = _qkv(4)
    g = torch.randn(B, H, T, D).to(torch.bfloat16)
    fwd, bwd = _warm_states(q, k, v, g)
    results = {}
    for where in ("cpu", device):
        f, b = (torch.nn.Module.to(s, where) for s in (fwd, bwd))
        leaves = [t.detach().to(where).requires_grad_() for t in (q, k, v)]
        y = fp8_attention(*leaves, f, b, causal=True, record=True)
        y.backward(g.to(where))
        # clone: on the CPU .cpu() is the tensor itself, which the zero_() below would clear
        results[where] = [y.detach().cpu()] + [t.grad.cpu() for t in leaves] + [f.amax_history[0].cpu().clone()]
        f.amax_history.zero_(), b.amax_history.zero_()
    for a, b in zip(results["cpu"][:4], results[device][:4]):
        assert (a == b).float().mean() > 0.99 and sqnr_db(a, b) > 40
    torch.testing.assert_close(results["cpu"][4], results[device][4], rtol=1e-5, atol=0)


def test_fp8_attention_is_deterministic_on_cpu():
    _against_cpu("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fp8_attention_on_cuda_matches_cpu():
    _against_cpu("cuda")


def test_a_run_with_fp8_dpa_logs_the_attention_core(tmp_path):
    """`--set variants.fp8.fp8_dpa=true` reaches the model: the run trains, its FP8 variant logs the
    attention core's scaling and accuracy tags, the BF16 baseline has none, and the amaxes moved."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fp8lab.run.cli import main
    from tests.helpers import QUICKSTART, TINY_MODEL

    sets = TINY_MODEL + ["train.steps=2", "train.log_interval=2", "train.eval_interval=2", "variants.fp8.fp8_dpa=true"]
    assert main(["run", QUICKSTART, "--out", str(tmp_path), "--quiet", *(a for s in sets for a in ("--set", s))]) == 0
    (run_dir,) = (tmp_path / "quickstart").iterdir()
    tags = {}
    for variant in ("fp8", "bf16"):
        acc = EventAccumulator(str(run_dir / variant), size_guidance={"scalars": 0})
        acc.Reload()
        tags[variant] = {t: acc.Scalars(t) for t in acc.Tags()["scalars"] if ".dpa/" in t}
    assert not tags["bf16"]
    for name in ("qkv", "s", "o", "dqkv", "do", "dp"):
        amax = tags["fp8"][f"scaling/blocks.0.attn.dpa/{name}/amax"]
        assert amax and all(0 < e.value < float("inf") for e in amax), name
    assert all(f"accuracy/blocks.0.attn.dpa/{g}_sqnr_db" in tags["fp8"] for g in ("s", "o", "dv", "dp", "dq", "dk"))
    acc = EventAccumulator(str(run_dir / "fp8"), size_guidance={"histograms": 0})
    acc.Reload()
    histograms = {t for t in acc.Tags()["histograms"] if ".dpa/" in t}
    assert histograms == {f"amax_history/blocks.0.attn.dpa/{t}" for t in ("qkv", "s", "o", "dqkv", "do", "dp")}
    # fp8lab report: a row per attention tensor in the scaling table (not NaN rows per Linear role),
    # and the attention GEMMs ranked against their BF16 twins
    from fp8lab.run.report import report

    text = report(run_dir)
    rows = [line.split() for line in text.splitlines() if line.startswith("blocks.0.attn.dpa ")]
    tensors = ("qkv", "s", "o", "dqkv", "do", "dp")
    scaling_rows = {r[1]: r[2:] for r in rows if r[1] in tensors}
    assert set(scaling_rows) == set(tensors) and len(rows) == 7, text  # 6 tensors + the GEMM row
    assert all(v != "nan" for values in scaling_rows.values() for v in values), text
    assert "FP8 attention GEMMs against their BF16 twins" in text
    (gemm_row,) = [r for r in rows if r[1] not in tensors]
    assert all(10 < float(v) < 45 for v in gemm_row[1:]), text


def test_fp8_dpa_is_refused_where_it_cannot_run():
    from fp8lab.run.config import ConfigError, RunConfig, hash_of, upgrade
    from fp8lab.run.overrides import apply_overrides
    from fp8lab.run.recipe_file import load_recipe
    from tests.helpers import QUICKSTART

    recipe = load_recipe(QUICKSTART)
    for sets, message in (
        (["variants.bf16.fp8_dpa=true"], r"variants\.bf16\.fp8_dpa does not apply to precision 'bf16'"),
        (["variants.fp8.fp8_dpa=true", "variants.fp8.scaling=current"], r"variants\.fp8\.fp8_dpa must be False"),
        (["variants.fp8.fp8_dpa=maybe"], r"variants\.fp8\.fp8_dpa must be a bool"),
    ):
        with pytest.raises(ConfigError, match=message):
            apply_overrides(recipe, sets)
    config = RunConfig(name="t")  # a config saved before the field existed hashes as today's default
    saved = config.to_dict()
    for v in saved["variants"]:
        del v["fp8_dpa"]
    assert hash_of(upgrade(saved)) == config.hash()


def test_nonfinite_attention_casts_are_counted_per_tensor_and_survive_a_checkpoint():
    """A NaN reaching q, k, v is a fault of the core's qkv cast (and of every cast after it), counted
    in faults/nonfinite_amax/<layer>.dpa/<tensor> as a Linear's roles are; counts not yet collected
    travel in the telemetry's state_dict and are drained by the next log step."""
    from fp8lab.telemetry.step import FaultTotals, StepTelemetry

    torch.manual_seed(0)
    layer = MultiheadAttention(H * D, H, fp8_dpa=True, fp8=EMULATED)
    x = torch.randn(B, T, H * D)
    bad = x.clone()
    bad[0, 3, 5] = float("nan")
    telemetry, totals = StepTelemetry(layer, log_interval=1), FaultTotals()
    for batch in (x, bad):
        telemetry.begin(log=True, whatif=False)
        layer(batch).float().sum().backward()
        totals.add(telemetry.end().stats)
    counts = totals.scalars()
    for tensor in ("qkv", "s", "o", "dp", "dqkv"):  # the NaN travels through the core
        assert counts[f"faults/nonfinite_amax/dpa/{tensor}"] == 1.0, tensor
    assert "faults/nonfinite_amax/dpa/do" not in counts  # d(sum)/d(out) through proj is finite
    assert counts["faults/nonfinite_amax/qkv/input"] == 1.0  # the layers' rows are unchanged
    # between log steps the counts stay on the device, in the checkpoint's rows: layers, then fwd, bwd
    telemetry.begin(log=False)
    layer(bad).float().sum().backward()
    telemetry.end()
    state = telemetry.state_dict()
    assert state["faults"].shape == (2 + 2, 3)  # qkv and proj Linears, then the core's two states
    assert state["faults"][2:].tolist() == [[1.0, 1.0, 1.0], [1.0, 0.0, 1.0]]  # (qkv, s, o), (dqkv, do, dp)
    for state_faults in layer.dpa.scaling_fwd.faults, layer.dpa.scaling_bwd.faults:
        state_faults.zero_()  # as in a new process
    fresh = StepTelemetry(layer, log_interval=1)
    fresh.load_state_dict(state)  # the resumed run's counts
    fresh.begin(log=True, whatif=False)
    layer(x).float().sum().backward()
    assert fresh.end().stats.attention_faults["dpa"].tolist() == [1.0, 1.0, 1.0, 1.0, 0.0, 1.0]
    fresh.begin(log=True, whatif=False)  # then drained
    layer(x).float().sum().backward()
    assert fresh.end().stats.attention_faults["dpa"].tolist() == [0.0] * 6


def test_amax_histories_of_the_attention_core_are_written_per_tensor():
    from fp8lab.telemetry.step import StepTelemetry

    torch.manual_seed(0)
    model = fp8lab.GPT.from_preset("tiny", fallback="emulated", num_layers=1, fp8_dpa=True)
    telemetry = StepTelemetry(model, log_interval=1)
    telemetry.begin(log=True, whatif=False)
    model(torch.randint(0, model.config.vocab_size, (2, 16))).float().logsumexp(-1).mean().backward()
    telemetry.end()
    histories = telemetry.collector.histories()
    dpa = model.blocks[0].attn.dpa
    expected = torch.cat([dpa.scaling_fwd.amax_history, dpa.scaling_bwd.amax_history], dim=1)
    assert (histories["blocks.0.attn.dpa"] == expected.numpy()).all() and expected.gt(0).any(dim=0).all()
    assert histories["blocks.0.attn.qkv"].shape[1] == 3
