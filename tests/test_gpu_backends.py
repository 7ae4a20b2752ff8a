"""Hardware backends on a GPU: torch._scaled_mm and Transformer Engine against the emulation.

Every test here needs CUDA and skips elsewhere with the reason. Tolerances, all stated:
- same quantized operands, different GEMM (executor level): with power-of-2 scales the
  products are exact and the model and cuBLASLt agree except where their fp32 summation
  orders differ (>= 99% of bf16 outputs bit-equal); with any scales also >= 99%, and every
  output within 2 bf16 ulps;
- Linear outputs and gradients, hardware vs emulated with the same scales: E4M3 tolerance
  rtol 0.125, atol 0.0675, and SQNR >= 25 dB (after step 0 the scales may differ in
  the last bit, so values may take the neighbouring FP8 grid point);
- the emulation on CUDA against the hardware model (float64 reference): as on CPU,
  >= 99% of bf16 outputs bit-equal, fp32 outputs within 1e-5 of max|ref|, with TF32 and
  reduced-precision bf16 reductions switched ON globally (the exact path must not use them);
- TE's forward GEMM (delayed and current scaling) runs with cuBLASLt's FAST_ACCUM
  (``use_split_accumulator=False``), which the emulation does not model: the Linear
  tolerance above covers it at K=256 (``benchmarks/gpu_fast_accum.py`` measures it);
- amax histories: identical inputs give identical amaxes, so torch.equal between fp8lab
  backends; against TE rtol 2^-8 (one bf16 rounding), scales rtol 1e-6 (op order).
- training: a 2-layer MLP regressing a fixed random teacher for 60 AdamW steps; the loss
  must fall below half its start, and end within 25 % of the BF16 baseline's; a tiny GPT
  for 40 steps per backend ends within 5 % of the BF16 GPT's loss.
"""

from __future__ import annotations

import contextlib
import copy
import io
import math

import pytest
import torch
from torch import nn

from fp8lab import DelayedScaling, Float8BlockScaling, FP8Options, Linear, update_scales
from fp8lab.accumulation import HOPPER_PROMOTED
from fp8lab.formats import E4M3, E5M2
from fp8lab.gemm.backends.emulated import EmulatedBackend
from fp8lab.gemm.backends.scaled_mm import ScaledMMBackend
from fp8lab.gemm.backends.select import probe_te
from fp8lab.gemm.exact import gemm_path
from fp8lab.gemm.hardware import torch_has_blockwise_mm
from fp8lab.quantize.tensor import cast_to_fp8

pytestmark = pytest.mark.gpu

HAS_CUDA = torch.cuda.is_available()
HAS_FP8 = HAS_CUDA and torch.cuda.get_device_capability() >= (8, 9)
HAS_TE = probe_te().version is not None
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
needs_fp8 = pytest.mark.skipif(not HAS_FP8, reason="needs a CUDA device with compute capability >= 8.9")
needs_te = pytest.mark.skipif(not HAS_TE, reason="Transformer Engine not installed")

RTOL, ATOL, MIN_SQNR_DB = 0.125, 0.0675, 25.0
SCALING = DelayedScaling(amax_history_len=4)  # short, so the window rolls over within a test


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    ref, test = ref.double(), test.double()
    return 10 * math.log10(ref.pow(2).sum().item() / max((ref - test).pow(2).sum().item(), 1e-300))


def assert_fp8_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), rtol=RTOL, atol=ATOL, msg=lambda m: f"{what}: {m}")
    assert sqnr_db(expected, actual) >= MIN_SQNR_DB, f"{what}: SQNR {sqnr_db(expected, actual):.1f} dB"


def run_step(layer: nn.Module, x: torch.Tensor, g: torch.Tensor) -> dict:
    """One forward/backward under bf16 autocast with a fixed upstream gradient ``g``."""
    xi = x.clone().requires_grad_()
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        y = layer(xi)
    y.backward(g.to(y.dtype))
    out = {"y": y.detach().float(), "grad_x": xi.grad, "grad_w": layer.weight.grad, "grad_b": layer.bias.grad}
    layer.weight.grad = layer.bias.grad = None
    return out


@pytest.fixture
def tokens():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 256, generator=gen)  # 21 tokens: wgrad inner dim not a multiple of 16
    g = torch.randn(3, 7, 128, generator=gen)
    return x, g


@pytest.fixture
def te_reset():
    """TE keeps process-global scaling buffers; start each TE test from a clean one."""
    from fp8lab.gemm.backends.te import _import_te

    _import_te().manager.reset()
    yield
    _import_te().manager.reset()


def _bf16_ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in units of the bf16 spacing at |b| (float64)."""
    spacing = torch.finfo(torch.bfloat16).eps * b.double().abs().clamp_min(torch.finfo(torch.bfloat16).tiny)
    return (a.double() - b.double()).abs() / spacing


@needs_fp8
@pytest.mark.parametrize("inner", [64, 21], ids=["K64", "K21-padded"])
@pytest.mark.parametrize("scales", [(16.0, 512.0), (13.37, 448.0 / 3.1)], ids=["pow2", "any"])
def test_scaled_mm_gemm_matches_emulated_gemm(inner, scales):
    gen = torch.Generator().manual_seed(1)
    a_hp = torch.randn(48, inner, generator=gen).cuda()
    b_hp = torch.randn(inner, 32, generator=gen).cuda()
    s_a, s_b = (torch.tensor(s, device="cuda") for s in scales)
    emulated = EmulatedBackend(gemm_path("cuda"))
    # use_fast_accum=False on an H200 is the promoted model bit for bit (benchmarks/gpu_fast_accum.py,
    # BENCHMARKS.md): compare with it, not with an ideal fp32 sum (98% of outputs equal there)
    qa, qb = emulated.quantize(a_hp, s_a, E5M2), emulated.quantize(b_hp, s_b, E4M3)
    ref = emulated.gemm(
        qa.cpu(),
        qb.cpu(),
        (1 / s_a).cpu(),
        (1 / s_b).cpu(),
        torch.bfloat16,
        accumulator=HOPPER_PROMOTED,
        formats=(E5M2, E4M3),
    ).cuda()
    # laid out as the wgrad gets them: A = grad_out^T (column-major), B = x (row-major)
    a_q = cast_to_fp8(a_hp.t().contiguous(), s_a, E5M2).t()
    b_q = cast_to_fp8(b_hp, s_b, E4M3)
    out = ScaledMMBackend().gemm(a_q, b_q, 1 / s_a, 1 / s_b, torch.bfloat16)
    assert out.shape == (48, 32) and out.dtype == torch.bfloat16
    if scales == (16.0, 512.0):  # power-of-2 scales: the epilogue is exact, so every bit is the model's
        assert torch.equal(out, ref)
    assert (out == ref).float().mean().item() >= 0.99
    assert _bf16_ulps(out, ref).max().item() <= 1.0


def _cpu_model_and_scaled_mm(scaling) -> tuple[Linear, Linear]:
    """The same 256 -> 128 layer (one initialisation) as the hardware model on the CPU (the emulated
    backend there models the tensor cores' accumulator: fast fprop, promoted dgrad and wgrad, as
    cuBLASLt runs them; the emulation on CUDA accumulates in fp32) and on the scaled_mm backend."""
    torch.manual_seed(0)
    ref = Linear(256, 128, fp8=FP8Options(scaling=scaling, backend="emulated"))
    hw = Linear(256, 128, fp8=FP8Options(scaling=scaling, backend="scaled_mm"), device="cuda")
    hw.load_state_dict(ref.state_dict())
    assert hw.plan().backend == "scaled_mm"
    return ref, hw


def _emulated_and_scaled_mm(scaling) -> tuple[Linear, Linear]:
    """The same 256 -> 128 layer (one initialisation) on the emulated and scaled_mm backends."""
    torch.manual_seed(0)
    ref = Linear(256, 128, fp8=FP8Options(scaling=scaling, backend="emulated"), device="cuda")
    hw = Linear(256, 128, fp8=FP8Options(scaling=scaling, backend="scaled_mm"), device="cuda")
    hw.load_state_dict(ref.state_dict())
    assert hw.plan().backend == "scaled_mm"
    return ref, hw


@needs_fp8
def test_scaled_mm_linear_matches_emulated_with_the_same_scales(tokens):
    ref, hw = _emulated_and_scaled_mm(SCALING)
    x, g = (t.cuda() for t in tokens)
    for step in range(5):  # step 0 runs at scale 1, later steps at the updated scales
        want, got = run_step(ref, x, g), run_step(hw, x, g)
        for key in ("y", "grad_x", "grad_w"):
            assert_fp8_close(got[key], want[key], f"step {step} {key}")
        assert torch.equal(got["grad_b"], want["grad_b"])  # both sum the same bf16 gradient in fp32
        update_scales(ref), update_scales(hw)
        assert torch.equal(hw.fp8_state.amax_history, ref.fp8_state.amax_history)
        assert torch.equal(hw.fp8_state.scale, ref.fp8_state.scale)
    assert (ref.fp8_state.scale != 1).all()  # the scales did move


@needs_cuda
def test_emulated_on_cuda_matches_emulated_on_cpu(tokens):
    x, g = tokens
    torch.manual_seed(0)
    # accumulation="fp32": the emulation on CUDA accumulates in fp32 (the accumulator model is a CPU kernel)
    cpu = Linear(256, 128, fp8=FP8Options(scaling=SCALING, backend="emulated", accumulation="fp32"))
    gpu = copy.deepcopy(cpu).cuda()
    for step in range(3):
        want, got = run_step(cpu, x, g), run_step(gpu, x.cuda(), g.cuda())
        for key in ("y", "grad_x", "grad_w"):  # bf16 GEMM outputs: the same model on both
            assert (want[key] == got[key].cpu()).float().mean().item() >= 0.99, f"step {step} {key}"
        update_scales(cpu), update_scales(gpu)
        assert torch.equal(gpu.fp8_state.amax_history.cpu(), cpu.fp8_state.amax_history)
        torch.testing.assert_close(gpu.fp8_state.scale.cpu(), cpu.fp8_state.scale, rtol=1e-6, atol=0)


@needs_te
@needs_fp8
def test_te_linear_matches_emulated_and_shares_parameters(tokens, te_reset):
    from fp8lab.gemm.backends.te import read_te_scaling, sync_te_scaling

    x, g = (t.cuda() for t in tokens)
    torch.manual_seed(0)
    ref = Linear(256, 128, fp8=FP8Options(scaling=SCALING, backend="emulated"), device="cuda")
    tel = Linear(256, 128, fp8=FP8Options(scaling=SCALING, backend="te"), device="cuda")
    tel.load_state_dict(ref.state_dict())
    assert tel.plan().backend == "te"
    for step in range(5):
        want = run_step(ref, x, g)
        if step == 0:
            with pytest.warns(RuntimeWarning, match="opened its own te.autocast region"):
                got = run_step(tel, x, g)
            te_linear = tel.te_handle.module
            assert te_linear.weight is tel.weight and te_linear.bias is tel.bias
            assert [n for n, _ in tel.named_parameters()] == ["weight", "bias"]
            assert tel.state_dict().keys() == ref.state_dict().keys()  # no TE keys, no _extra_state
        else:
            got = run_step(tel, x, g)
        for key in ("y", "grad_x", "grad_w", "grad_b"):
            assert_fp8_close(got[key], want[key], f"step {step} {key}")
        update_scales(ref)  # TE updated its own at the region's exit and after backward
        update_scales(tel)  # leaves a TE layer's state alone
        sync_te_scaling(tel)
        torch.testing.assert_close(tel.fp8_state.amax_history, ref.fp8_state.amax_history, rtol=2**-8, atol=0)
        torch.testing.assert_close(tel.fp8_state.scale, ref.fp8_state.scale, rtol=1e-6, atol=0)
        history, scale = read_te_scaling(te_linear)
        assert torch.equal(history, tel.fp8_state.amax_history) and torch.equal(scale, tel.fp8_state.scale)


@needs_te
@needs_fp8
@pytest.mark.filterwarnings("ignore:fp8lab.Linear\\(backend='te'\\) opened:RuntimeWarning")
def test_te_state_checkpoint_round_trip(tokens, te_reset):
    from fp8lab.gemm.backends.te import ensure_handle, read_te_scaling

    x, g = (t.cuda() for t in tokens)
    src = Linear(256, 128, fp8=FP8Options(scaling=SCALING, backend="te"), device="cuda")
    for _ in range(3):
        run_step(src, x, g)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)  # the pre-hook copies TE's state into fp8_state
    saved = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    want_history, want_scale = read_te_scaling(src.te_handle.module)
    assert torch.equal(saved["fp8_state.amax_history"].cuda(), want_history)
    assert (saved["fp8_state.scale"] != 1).any()

    fresh = Linear(256, 128, fp8=FP8Options(scaling=SCALING, backend="te"), device="cuda")
    fresh.load_state_dict(saved)  # before TE exists: restored when it is built
    history, scale = read_te_scaling(ensure_handle(fresh).module)
    assert torch.equal(history, want_history) and torch.equal(scale, want_scale)
    built = Linear(256, 128, fp8=FP8Options(scaling=SCALING, backend="te"), device="cuda")
    run_step(built, x, g)  # TE exists now ...
    built.load_state_dict(saved)  # ... so the load hook restores it
    history, scale = read_te_scaling(built.te_handle.module)
    assert torch.equal(history, want_history) and torch.equal(scale, want_scale)
    # same weights and restored scales: the source's next forward and the fresh one agree
    # (to one bf16 rounding; with scale 1 instead of the restored ones they differ by ~2^-4)
    torch.testing.assert_close(run_step(fresh, x, g)["y"], run_step(src, x, g)["y"], rtol=2**-8, atol=1e-5)


def _teacher_batches(steps: int):
    gen = torch.Generator().manual_seed(2)
    teacher = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64)).cuda()
    for _ in range(steps):
        x = torch.randn(8, 16, 64, generator=gen).cuda()
        with torch.no_grad():
            target = teacher(x)
        yield x, target  # outside no_grad: a generator suspended inside it would leak it


def _train(backend: str, region: bool, steps: int = 60) -> tuple[float, float]:
    torch.manual_seed(3)
    model = nn.Sequential(
        Linear(64, 256, fp8=FP8Options(scaling=SCALING, backend=backend), device="cuda"),
        nn.GELU(),
        Linear(256, 64, fp8=FP8Options(scaling=SCALING, backend=backend), device="cuda"),
    )
    assert model[0].plan().backend == backend
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for x, target in _teacher_batches(steps):
        if region:
            from fp8lab.gemm.backends.te import autocast as te_autocast

            ctx = te_autocast(SCALING)
        else:
            ctx = contextlib.nullcontext()
        with ctx, torch.autocast("cuda", dtype=torch.bfloat16):
            loss = (model(x).float() - target).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_scales(model)
        losses.append(loss.item())  # test only: a sync per step is fine here
    return losses[0], sum(losses[-5:]) / 5


BACKENDS = [
    pytest.param("emulated", False, marks=needs_cuda, id="emulated-cuda"),
    pytest.param("scaled_mm", False, marks=needs_fp8, id="scaled_mm"),
    pytest.param("te", False, marks=[needs_fp8, needs_te], id="te-per-layer-region"),
    pytest.param("te", True, marks=[needs_fp8, needs_te], id="te-model-region"),
]


@pytest.mark.filterwarnings("ignore:fp8lab.Linear\\(backend='te'\\) opened:RuntimeWarning")
@pytest.mark.parametrize("backend,region", BACKENDS)
def test_short_training_run_tracks_bf16(backend, region, request):
    if backend == "te":
        request.getfixturevalue("te_reset")
    start, end = _train(backend, region)
    _, bf16_end = _train("bf16", False)
    assert end < 0.5 * start, f"{backend}: loss {start:.4f} -> {end:.4f}"
    assert abs(end - bf16_end) / bf16_end < 0.25, f"{backend} {end:.4f} vs bf16 {bf16_end:.4f}"


@needs_fp8
@pytest.mark.parametrize("pow2", [True, False], ids=["pow2-scales", "any-scales"])
def test_scaled_mm_linear_equals_the_emulation_at_the_same_scales(tokens, pow2):
    """One step of the same layer, scales set by hand: fprop, dgrad and wgrad of the real
    FP8 GEMM against the emulation (the same FP8 operands; only cuBLASLt's summation order
    and, for any scales, its epilogue may differ)."""
    ref, hw = _cpu_model_and_scaled_mm(SCALING)
    x, g = tokens
    scales = [2.0**5, 2.0**9, 2.0**13] if pow2 else [448.0 / 3.3, 448.0 / 0.061, 57344.0 / 0.0077]
    for layer in (ref, hw):
        layer.fp8_state.scale.copy_(torch.tensor(scales))
    want, got = run_step(ref, x, g), run_step(hw, x.cuda(), g.cuda())
    for key in ("y", "grad_x", "grad_w"):
        if pow2:  # exact epilogues: every bit is the model's (BENCHMARKS.md, the H200 section)
            assert torch.equal(got[key].cpu(), want[key]), key
        assert (got[key].cpu() == want[key]).float().mean().item() >= 0.99, key
        assert _bf16_ulps(got[key].cpu(), want[key]).max().item() <= 2.0, key


HAS_BLOCKWISE = (
    HAS_CUDA
    and torch.cuda.get_device_capability()[0] == 9
    and tuple(int(p) for p in (torch.version.cuda or "0.0").split(".")[:2]) >= (12, 9)
    and torch_has_blockwise_mm()
)


@pytest.mark.skipif(not HAS_BLOCKWISE, reason="needs sm_90, CUDA >= 12.9 and torch's blockwise scaled GEMM")
@pytest.mark.parametrize(
    "scaling",
    [
        Float8BlockScaling(),
        Float8BlockScaling(x_block_scaling_dim=2, w_block_scaling_dim=1),
        Float8BlockScaling(w_block_scaling_dim=1, grad_block_scaling_dim=2),
    ],
    ids=["x1-w2-g1", "x2-w1-g1", "x1-w1-g2"],
)
def test_block_scaling_on_torchs_blockwise_gemm_matches_the_emulation(tokens, scaling):
    """Float8BlockScaling without TE: the same layer through torch's blockwise GEMM and the
    emulation (same block scales, computed from the same amaxes; the emulation on CUDA
    accumulates in fp32, the tensor cores promote every 128 products). Unverified before a
    GPU run: the thresholds (>= 95% of bf16 outputs bit-equal, every one within 2 ulps)."""
    ref, hw = _cpu_model_and_scaled_mm(scaling)
    x, g = tokens
    want, got = run_step(ref, x, g), run_step(hw, x.cuda(), g.cuda())
    for key in ("y", "grad_x", "grad_w"):
        share = (got[key].cpu() == want[key]).float().mean().item()
        print(f"{key}: {100 * share:.2f}% of outputs equal to the CPU model")
        assert share >= 0.95, key
        assert _bf16_ulps(got[key].cpu(), want[key]).max().item() <= 2.0, key


@needs_cuda
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_emulated_on_cuda_is_the_hardware_model_whatever_the_global_flags(out_dtype):
    """TF32 and reduced-precision bf16 reductions switched on globally (what many training
    scripts do) must not reach the emulation's exact GEMM."""
    from tests.helpers import equal_fraction, fp32_error, hw_reference

    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(96, 320, generator=gen) * 3).cuda()
    w = (torch.randn(192, 320, generator=gen) * 0.05).cuda()
    bias = torch.randn(192, generator=gen).cuda()
    s_x, s_w = torch.tensor(448.0 / 9.1, device="cuda"), torch.tensor(448.0 / 0.17, device="cuda")
    matmul = torch.backends.cuda.matmul
    flags = (matmul.allow_tf32, matmul.allow_bf16_reduced_precision_reduction)
    matmul.allow_tf32, matmul.allow_bf16_reduced_precision_reduction = True, True
    try:
        emu = EmulatedBackend(gemm_path("cuda"))
        b = fp8lab_epilogue_bias(bias, out_dtype)
        out = emu.gemm(emu.quantize(x, s_x, E4M3), emu.quantize(w, s_w, E4M3).t(), 1 / s_x, 1 / s_w, out_dtype, b)
    finally:
        matmul.allow_tf32, matmul.allow_bf16_reduced_precision_reduction = flags
    x_q, w_q = cast_to_fp8(x, s_x, E4M3).double().cpu(), cast_to_fp8(w, s_w, E4M3).double().cpu()
    ref = hw_reference(x_q, w_q.T, (1 / s_x * (1 / s_w)).cpu(), None if b is None else b.cpu(), out_dtype)
    if out_dtype == torch.bfloat16:
        assert equal_fraction(out.cpu(), ref) >= 0.99
    else:
        assert fp32_error(out.cpu(), ref) <= 1e-5


def fp8lab_epilogue_bias(bias, out_dtype):
    from fp8lab.gemm.exact import epilogue_bias

    return epilogue_bias(bias, out_dtype, fp8=True)


def _train_gpt(backend: str, steps: int = 40) -> list[float]:
    from fp8lab import GPT

    torch.manual_seed(5)
    model = GPT.from_preset("tiny", backend=backend, scaling=DelayedScaling(amax_history_len=16), block_size=64).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, fused=True)
    gen = torch.Generator().manual_seed(6)
    data = torch.randint(0, 64, (steps, 8, 65), generator=gen)  # a small vocabulary: learnable
    losses = []
    for batch in data.cuda():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_scales(model)
        losses.append(loss.item())  # test only: a sync per step is fine here
    return losses


@needs_fp8
@pytest.mark.parametrize("backend", ["emulated", "scaled_mm"])
def test_tiny_gpt_per_backend_tracks_bf16(backend):
    bf16 = _train_gpt("bf16")
    fp8 = _train_gpt(backend)
    assert fp8[-1] < 0.8 * fp8[0], f"{backend}: {fp8[0]:.3f} -> {fp8[-1]:.3f}"
    end, bf16_end = sum(fp8[-5:]) / 5, sum(bf16[-5:]) / 5
    assert abs(end - bf16_end) / bf16_end < 0.05, f"{backend} {end:.4f} vs bf16 {bf16_end:.4f}"


@needs_fp8
@pytest.mark.parametrize("backend", ["scaled_mm", "emulated"])
def test_a_training_step_between_log_steps_never_syncs_with_the_host(tmp_path, backend):
    """The runner's step on CUDA under torch.cuda.set_sync_debug_mode("error"): any
    device-to-host copy or synchronisation in a non-log step raises."""
    from pathlib import Path

    from fp8lab.run.overrides import apply_overrides
    from fp8lab.run.recipe_file import load_recipe
    from fp8lab.run.runner import Runner

    quickstart = Path(__file__).resolve().parents[1] / "recipes" / "quickstart.py"
    config = apply_overrides(
        load_recipe(quickstart),
        [
            "train.steps=4",
            "train.batch_size=4",
            "train.block_size=32",
            "train.eval_batches=1",
            "train.log_interval=4",
            "train.device=cuda",
            f"variants.fp8.backend={backend}",
        ],
    )
    runner = Runner(config, tmp_path, progress=False)
    run = runner.variants[1]
    assert all(layer.plan().backend == backend for _, layer in run.collector.layers)
    for step in range(2):  # warm-up: lazy CUDA init, kernel compilation
        run.train_step(*runner.sampler.batch(step), 1e-3, log=False)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run.train_step(*runner.sampler.batch(2), 1e-3, log=False)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    stats = run.train_step(*runner.sampler.batch(3), 1e-3, log=True)  # the log step reads, once
    assert stats is not None and len(stats.layers) == len(run.collector.layers) == 16  # 4 blocks x 4 GEMMs


def _every_recipe():
    from fp8lab import Float8CurrentScaling, Float8RowwiseScaling, MXFP8BlockScaling, NVFP4BlockScaling

    return {
        "delayed": DelayedScaling(amax_history_len=4),
        "current": Float8CurrentScaling(),
        "block": Float8BlockScaling(),
        "mxfp8": MXFP8BlockScaling(),
        "nvfp4": NVFP4BlockScaling(),  # RHT, stochastic rounding of gradients and 2-D weight blocks, TE's defaults
        "rowwise": Float8RowwiseScaling(),
    }


def _recipe_steps(layer: Linear, x: torch.Tensor, g: torch.Tensor, steps: int = 3) -> list[dict]:
    out = []
    for _ in range(steps):
        got = run_step(layer, x, g)
        update_scales(layer)
        out.append({k: v.detach().cpu() for k, v in got.items()})
    return out


@needs_cuda
@pytest.mark.parametrize("name", ["delayed", "current", "block", "mxfp8", "nvfp4", "rowwise"])
def test_every_recipe_emulated_on_cuda_matches_the_cpu(name, tokens):
    """The emulation's casts run on the tensor's device (torch code or fused CUDA casts there,
    the C kernels on the CPU): the same recipe gives the same quantized GEMMs on both, so with
    fp32 accumulation >= 99% of bf16 outputs and gradients are bit-equal over three steps (the
    stochastic rounding's bits are counter-based, not a device generator's)."""
    x, g = tokens
    torch.manual_seed(0)
    cpu = Linear(256, 128, fp8=FP8Options(scaling=_every_recipe()[name], backend="emulated", accumulation="fp32"))
    gpu = copy.deepcopy(cpu).cuda()
    want = _recipe_steps(cpu, x, g)
    got = _recipe_steps(gpu, x.cuda(), g.cuda())
    for step, (w, o) in enumerate(zip(want, got)):
        for key in ("y", "grad_x", "grad_w"):
            share = (w[key] == o[key]).float().mean().item()
            assert share >= 0.99, f"{name} step {step} {key}: {100 * share:.2f}% equal"
