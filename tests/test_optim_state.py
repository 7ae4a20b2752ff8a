"""LowPrecisionAdamW: moments stored in FP8/FP16 (fp8lab.optim), exact against a plain
reference written here from the module docstring's definition; state_dict, checkpoints,
telemetry, memory and a run with ``variants.<v>.optimizer_state``.

Tolerances: none. Every comparison is bit for bit (torch.equal on parameters, on the stored
codes viewed as bytes, and on the scales).
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from fp8lab.optim import LowPrecisionAdamW

FMAX = {"fp16": 65504.0, "fp8": 448.0}
TORCH = {"fp32": torch.float32, "fp16": torch.float16, "fp8": torch.float8_e4m3fn}
SETTINGS = {  # (exp_avg_dtype, exp_avg_sq_dtype, block_size)
    "fp8-lm": ("fp8", "fp16", None),
    "fp8-fp8-tensor": ("fp8", "fp8", None),
    "fp8-block-128": ("fp8", "fp8", 128),
    "fp8-fp16-block-100": ("fp8", "fp16", 100),  # a partial last block
    "fp32-fp8": ("fp32", "fp8", None),
}
HP = dict(lr=3e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)


# ---- the reference: one block at a time, in plain Python loops over blocks -----------------


def ref_quantize(x: torch.Tensor, dtype: str, block_size):
    flat = x.reshape(-1)
    size = flat.numel() if block_size is None else block_size
    codes, scales = [], []
    for start in range(0, flat.numel(), size):
        block = flat[start : start + size]
        amax = block.abs().max()
        scale = torch.maximum(amax, torch.tensor(1e-12)) / FMAX[dtype]
        scaled = torch.clamp(block / scale, -FMAX[dtype], FMAX[dtype])
        codes.append(scaled.to(TORCH[dtype]))
        scales.append(scale)
    return torch.cat(codes).view(x.shape), torch.stack(scales)


def ref_dequantize(codes, scales, block_size):
    flat = codes.reshape(-1).float()
    size = flat.numel() if block_size is None else block_size
    parts = [flat[i : i + size] * scales[i // size] for i in range(0, flat.numel(), size)]
    return torch.cat(parts).view(codes.shape)


class RefAdamW:
    """One parameter; torch.optim.AdamW's single-tensor step on the dequantized moments, the
    update from the fp32 moments, then the moments quantized (fp32: kept as they are)."""

    def __init__(self, p, exp_avg_dtype, exp_avg_sq_dtype, block_size, lr, betas, eps, weight_decay):
        self.p = p.detach().clone()
        self.dtypes, self.block = (exp_avg_dtype, exp_avg_sq_dtype), block_size
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
        self.t = 0
        self.stored = [self._store(torch.zeros_like(p), d) for d in self.dtypes]
        self.last_fp32 = None

    def _store(self, x, dtype):
        return (x.clone(), None) if dtype == "fp32" else ref_quantize(x, dtype, self.block)

    def _value(self, i):
        codes, scales = self.stored[i]
        return codes.clone() if scales is None else ref_dequantize(codes, scales, self.block)

    def step(self, grad):
        beta1, beta2 = self.betas
        self.t += 1
        m, v = self._value(0), self._value(1)
        self.p.mul_(1 - self.lr * self.wd)
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = self.lr / (1 - beta1**self.t)
        denom = (v.sqrt() / math.sqrt(1 - beta2**self.t)).add_(self.eps)
        self.p.add_(m * -step_size / denom)
        self.last_fp32 = (m, v)
        self.stored = [self._store(m, self.dtypes[0]), self._store(v, self.dtypes[1])]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    )


def grads(shape, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # magnitudes over many binades, so that FP8 and FP16 storage round and underflow
    return [
        torch.randn(shape, generator=gen) * torch.exp(4 * torch.randn(shape, generator=gen)) * 1e-3
        for _ in range(steps)
    ]


# ---- the moments and parameters, bit for bit ------------------------------------------------


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_moments_and_params_bit_exact_against_the_reference(setting):
    exp_avg_dtype, exp_avg_sq_dtype, block = SETTINGS[setting]
    p0 = torch.randn(37, 29, generator=torch.Generator().manual_seed(1))
    p = torch.nn.Parameter(p0.clone())
    opt = LowPrecisionAdamW([p], exp_avg_dtype=exp_avg_dtype, exp_avg_sq_dtype=exp_avg_sq_dtype, block_size=block, **HP)
    ref = RefAdamW(p0, exp_avg_dtype, exp_avg_sq_dtype, block, **HP)
    for g in grads(p.shape, 6):
        p.grad = g.clone()
        opt.step()
        ref.step(g)
        state = opt.state[p]
        assert same_bits(p.detach(), ref.p)
        for i, name in enumerate(("exp_avg", "exp_avg_sq")):
            codes, scales = ref.stored[i]
            assert state[name].dtype == TORCH[ref.dtypes[i]]
            assert same_bits(state[name], codes)
            if scales is None:
                assert f"{name}_scale" not in state
            else:
                assert same_bits(state[f"{name}_scale"], scales)
    assert float(state["step"]) == 6.0
    # the storage is lossy: this test would fail against an fp32 AdamW
    plain = torch.nn.Parameter(p0.clone())
    adamw = torch.optim.AdamW([plain], foreach=False, **HP)
    for g in grads(p.shape, 6):
        plain.grad = g.clone()
        adamw.step()
    assert not torch.equal(plain.detach(), p.detach())


def test_quantize_definition_on_hand_values():
    """amax 448 * 2 -> scale 2: codes are x / 2 rounded to E4M3 (RNE); zeros stay zero."""
    from fp8lab.optim import dequantize_moment, quantize_moment

    x = torch.tensor([896.0, -17.0, 0.0, 2.0**-12, 2.0**-7])
    codes, scale = quantize_moment(x, "fp8", None)
    assert scale.tolist() == [2.0]
    # -8.5 is halfway between -8 and -9 (E4M3 step 1 in [8, 16)): RNE gives -8;
    # 2**-13 is below E4M3's smallest subnormal 2**-9 -> 0 (underflow); 2**-8 is exact
    assert codes.float().tolist() == [448.0, -8.0, 0.0, 0.0, 2.0**-8]
    assert dequantize_moment(codes, scale, None).tolist() == [896.0, -16.0, 0.0, 0.0, 2.0**-7]
    zeros, zscale = quantize_moment(torch.zeros(3), "fp16", None)
    assert zeros.float().tolist() == [0.0, 0.0, 0.0] and zscale.item() == pytest.approx(1e-12 / 65504, rel=1e-6)


def test_fp32_setting_equals_torch_adamw_bit_for_bit():
    """fp32 moments: the same ops as torch.optim.AdamW's single-tensor and foreach paths.
    (The fused kernel, which fp8lab runs use for optimizer_state="fp32", orders its
    arithmetic differently and agrees only to rounding: a run with "fp32" keeps torch's.)"""
    p0 = torch.randn(64, 33, generator=torch.Generator().manual_seed(2))
    for foreach in (False, True):
        theirs = torch.nn.Parameter(p0.clone())
        ref = torch.optim.AdamW([theirs], foreach=foreach, **HP)
        mine = torch.nn.Parameter(p0.clone())
        opt = LowPrecisionAdamW([mine], exp_avg_dtype="fp32", exp_avg_sq_dtype="fp32", **HP)
        for g in grads(p0.shape, 5, seed=3):
            mine.grad, theirs.grad = g.clone(), g.clone()
            opt.step()
            ref.step()
        assert same_bits(mine.detach(), theirs.detach())
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert same_bits(opt.state[mine][name], ref.state[theirs][name])


def test_defaults_are_torch_adamw_defaults():
    p = torch.nn.Parameter(torch.zeros(2))
    ours, theirs = LowPrecisionAdamW([p]).defaults, torch.optim.AdamW([p]).defaults
    for key in ("lr", "betas", "eps", "weight_decay"):
        assert ours[key] == theirs[key]


def test_found_inf_skips_and_grad_scale_divides():
    p0 = torch.randn(10, 10)
    a, b = torch.nn.Parameter(p0.clone()), torch.nn.Parameter(p0.clone())
    oa = LowPrecisionAdamW([a], **HP)
    ob = LowPrecisionAdamW([b], **HP)
    g = grads(p0.shape, 2, seed=4)
    a.grad, b.grad = g[0].clone(), g[0] * 4
    ob.grad_scale = torch.tensor(4.0)
    oa.step()
    ob.step()
    assert same_bits(a.detach(), b.detach())
    before = {k: v.clone() for k, v in oa.state[a].items()}
    a_before = a.detach().clone()
    a.grad = torch.full_like(p0, float("nan"))
    oa.found_inf = torch.tensor(1.0)
    oa.track_underflow = True
    oa.step()
    assert same_bits(a.detach(), a_before)
    assert all(same_bits(oa.state[a][k], v) for k, v in before.items())
    assert oa.underflow[a].tolist() == [0, 0]  # nothing stored, nothing underflowed
    a.grad = g[1].clone()
    oa.found_inf = torch.tensor(0.0)
    oa.step()
    assert float(oa.state[a]["step"]) == 2.0  # the skipped step was not counted


# ---- options ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"exp_avg_dtype": "fp16"}, "exp_avg_dtype"),
        ({"exp_avg_dtype": "bf16"}, "exp_avg_dtype"),
        ({"exp_avg_sq_dtype": "e5m2"}, "exp_avg_sq_dtype"),
        ({"block_size": 0}, "block_size"),
        ({"block_size": 128.0}, "block_size"),
        ({"block_size": True}, "block_size"),
    ],
)
def test_bad_options_raise_value_error_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field} "):
        LowPrecisionAdamW([torch.nn.Parameter(torch.zeros(3))], **kwargs)


def test_non_fp32_params_are_refused():
    with pytest.raises(ValueError, match="params must be fp32"):
        LowPrecisionAdamW([torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))])


# ---- state_dict and checkpoints -----------------------------------------------------------


def _model_and_opt(setting, seed=5):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(20, 30), torch.nn.GELU(), torch.nn.Linear(30, 5))
    e, s, block = SETTINGS[setting]
    opt = LowPrecisionAdamW(model.parameters(), exp_avg_dtype=e, exp_avg_sq_dtype=s, block_size=block, **HP)
    return model, opt


def _train(model, opt, steps, start):
    for i in range(start, start + steps):
        gen = torch.Generator().manual_seed(100 + i)
        x = torch.randn(8, 20, generator=gen)
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _reload(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("setting", ["fp8-lm", "fp8-block-128", "fp32-fp8"])
def test_state_dict_round_trip_and_resume_bit_exact(setting):
    model, opt = _model_and_opt(setting)
    _train(model, opt, 3, 0)
    saved = _reload({"model": model.state_dict(), "optimizer": opt.state_dict()})
    # uninterrupted
    _train(model, opt, 3, 3)
    # resumed in a fresh process's objects, from the weights_only checkpoint
    model2, opt2 = _model_and_opt(setting, seed=99)
    model2.load_state_dict(saved["model"])
    opt2.load_state_dict(saved["optimizer"])
    again = opt2.state_dict()
    ref_saved = saved["optimizer"]["state"]
    for pid, state in again["state"].items():  # loaded exactly: dtypes and bytes
        for key, value in state.items():
            assert same_bits(value, ref_saved[pid][key]), key
    _train(model2, opt2, 3, 3)
    for (n, a), (_, b) in zip(model.named_parameters(), model2.named_parameters()):
        assert same_bits(a.detach(), b.detach()), n
    for a, b in zip(opt.state.values(), opt2.state.values()):
        assert a.keys() == b.keys()
        assert all(same_bits(a[k], b[k]) for k in a)


# ---- memory ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setting, per_param, scales",
    [("fp8-lm", 1 + 2, 2), ("fp8-fp8-tensor", 1 + 1, 2), ("fp32-fp8", 4 + 1, 1)],
)
def test_state_bytes_per_parameter(setting, per_param, scales):
    """Per parameter tensor: numel * (bytes of each stored moment) + 4 per fp32 scale + 4
    (the step); fp32 AdamW holds 8 bytes per value."""
    from fp8lab.run.footprint import optimizer_tensors, tensor_bytes

    model, opt = _model_and_opt(setting)
    _train(model, opt, 1, 0)
    params = list(model.parameters())
    numel = sum(p.numel() for p in params)
    assert tensor_bytes(optimizer_tensors(opt)) == per_param * numel + 4 * scales * len(params) + 4 * len(params)
    plain = torch.optim.AdamW(model.parameters())
    _train(model, plain, 1, 0)
    assert tensor_bytes(optimizer_tensors(plain)) == 8 * numel + 4 * len(params)


def test_block_scales_count():
    from fp8lab.run.footprint import optimizer_tensors, tensor_bytes

    p = torch.nn.Parameter(torch.randn(1000))
    opt = LowPrecisionAdamW([p], exp_avg_dtype="fp8", exp_avg_sq_dtype="fp8", block_size=256)
    p.grad = torch.randn(1000)
    opt.step()
    assert opt.state[p]["exp_avg_scale"].shape == (4,)  # 256 * 3 + 232
    assert tensor_bytes(optimizer_tensors(opt)) == 1000 * 2 + 4 * 4 * 2 + 4


# ---- underflow telemetry ----------------------------------------------------------------


def test_underflow_counts_against_a_hand_computed_case():
    """One step from zero state, lr 0: exp_avg = 0.1 * g, exp_avg_sq = 0.05 * g**2 (fp32).
    Stored values are v / scale with scale = amax / fmax; E4M3 rounds below 2**-10 (half its
    smallest subnormal 2**-9) to zero, FP16 below 2**-25.
    Weight (4 values), g = [2**10, 2**-12, 0, -1]:
      exp_avg / scale = g / 2**10 * 448: 2**-12 -> about 2**-13.2 -> 0; -1 -> 0.4375 kept: 1 underflow
      exp_avg_sq / scale = g**2 / 2**20 * 65504: 2**-12 -> about 2**-28 -> 0; -1 -> 65504 / 2**20 (exact): 1
    Bias (2 values), g = [1, 2**-24]:
      exp_avg: 2**-24 * 448 (about 2**-15.2) -> 0; exp_avg_sq: 2**-48 * 65504 -> 0: 1 and 1.
    The zero gradient is not counted (zero in fp32 already). Per layer: 2 of 6 values each.
    """
    from fp8lab.telemetry.optimizer_state import StoredMomentProbe

    layer = torch.nn.Linear(1, 4)
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias = torch.nn.Parameter(torch.zeros(2))
    model = torch.nn.Sequential(layer)
    opt = LowPrecisionAdamW(model.parameters(), lr=0.0, betas=(0.9, 0.95), weight_decay=0.0)
    layer.weight.grad = torch.tensor([[2.0**10], [2.0**-12], [0.0], [-1.0]])
    layer.bias.grad = torch.tensor([1.0, 2.0**-24])
    probe = StoredMomentProbe(model, opt)
    opt.step()  # not tracked
    assert probe.read() == {}
    opt.track_underflow = True
    opt.state.clear()
    opt.step()
    assert opt.underflow[layer.weight].tolist() == [1, 1]
    assert opt.underflow[layer.bias].tolist() == [1, 1]
    got = probe.read()
    assert got == {
        "optimizer_state/0/exp_avg/underflow_pct": 100.0 * 2 / 6,
        "optimizer_state/0/exp_avg_sq/underflow_pct": 100.0 * 2 / 6,
    }
    # the stored codes agree: the counted values are exactly the zero codes of nonzero grads
    codes = opt.state[layer.weight]["exp_avg"].float().flatten().tolist()
    assert codes == [448.0, 0.0, 0.0, -0.4375]
    assert opt.state[layer.weight]["exp_avg_sq"].float().flatten().tolist() == [65504.0, 0.0, 0.0, 65504 / 2**20]


def test_probe_logs_only_moments_stored_below_fp32():
    from fp8lab.telemetry.optimizer_state import StoredMomentProbe

    model = torch.nn.Sequential(torch.nn.Linear(3, 3))
    opt = LowPrecisionAdamW(model.parameters(), exp_avg_dtype="fp32", exp_avg_sq_dtype="fp8")
    model(torch.randn(2, 3)).sum().backward()
    opt.track_underflow = True
    opt.step()
    assert set(StoredMomentProbe(model, opt).read()) == {"optimizer_state/0/exp_avg_sq/underflow_pct"}


# ---- the run config and the runner ------------------------------------------------------


def test_run_config_field_validation():
    from fp8lab.run.config import ConfigError, Variant

    assert Variant(name="v").optimizer_state == "fp32"  # the default: torch's fused AdamW, unchanged
    with pytest.raises(ConfigError, match=r"^variants\.v\.optimizer_state must be one of"):
        Variant(name="v", optimizer_state="fp8")
    with pytest.raises(ConfigError, match=r"^variants\.v\.optimizer_state must be 'fp32' when master_weights"):
        Variant(name="v", precision="bf16", optimizer_state="fp8-lm", master_weights=False)


def test_set_override_reaches_the_field():
    from fp8lab.run.config import RunConfig, Variant
    from fp8lab.run.overrides import apply_overrides

    base = RunConfig(name="t", variants=(Variant(name="bf16", precision="bf16"), Variant(name="fp8")))
    config = apply_overrides(base, ["variants.fp8.optimizer_state=fp8-block"])
    assert [v.optimizer_state for v in config.variants] == ["fp32", "fp8-block"]
    from fp8lab.run.config import ConfigError

    with pytest.raises(ConfigError, match=r"variants\.fp8\.optimizer_state"):
        apply_overrides(base, ["variants.fp8.optimizer_state=int4"])


def test_old_configs_hash_as_before():
    """A config saved before the field existed hashes like today's default (checkpoints resume)."""
    from fp8lab.run.config import RunConfig, hash_of, upgrade

    config = RunConfig(name="t")
    saved = config.to_dict()
    for v in saved["variants"]:
        del v["optimizer_state"]
    assert hash_of(upgrade(saved)) == config.hash()


def _tiny(*variants, **train):
    from fp8lab.run.config import ModelConfig, RunConfig, TrainConfig

    fields = dict(steps=3, batch_size=2, block_size=16, log_interval=1, eval_interval=3, eval_batches=1, warmup_steps=1)
    return RunConfig(
        name="optstate", model=ModelConfig(num_layers=1), train=TrainConfig(**{**fields, **train}), variants=variants
    )


def test_runner_trains_with_fp8_moments_and_logs_their_underflow(tmp_path):
    from fp8lab.run.config import Variant
    from fp8lab.run.runner import Runner

    variants = (
        Variant(name="bf16", precision="bf16"),
        Variant(name="fp8lm", precision="bf16", optimizer_state="fp8-lm"),
        Variant(name="fp8blk", precision="fp8", fallback="emulated", optimizer_state="fp8-block"),
        # FP16 activations: the loss scale and clipping reach the optimizer as grad_scale
        Variant(name="fp8fp16", precision="fp8", activations="fp16", fallback="emulated", optimizer_state="fp8-lm"),
    )
    runner = Runner(_tiny(*variants), tmp_path, progress=False)
    assert isinstance(runner.variants[1].optimizer, LowPrecisionAdamW)
    assert isinstance(runner.variants[0].optimizer, torch.optim.AdamW)  # unchanged default
    result = runner.run()
    assert all(math.isfinite(result["variants"][n]["final_val_loss"]) for n in ("bf16", "fp8lm", "fp8blk", "fp8fp16"))
    for name in ("fp8lm", "fp8blk", "fp8fp16"):
        logged = runner.summary.train[name][-1][1]
        tags = [t for t in logged if t.endswith("/underflow_pct")]
        assert "optimizer_state/blocks.0.mlp.fc1/exp_avg/underflow_pct" in tags
        assert all(0.0 <= logged[t] <= 100.0 for t in tags)
        state = runner.variants[[v.name for v in variants].index(name)].optimizer.state
        assert {s["exp_avg"].dtype for s in state.values()} == {torch.float8_e4m3fn}
    assert not [t for t in runner.summary.train["bf16"][-1][1] if t.endswith("/underflow_pct")]
    assert [result["variants"][n]["optimizer_state"] for n in ("bf16", "fp8lm", "fp8blk")] == [
        "fp32",
        "fp8-lm",
        "fp8-block",
    ]


def test_resumed_run_equals_uninterrupted_run(tmp_path):
    """A 4-step run checkpointed at step 2 (weights_only files) and resumed ends with the same
    weights and moments, bit for bit, as one run straight through."""
    from fp8lab.run.config import Variant
    from fp8lab.run.runner import Runner

    variants = (Variant(name="bf16", precision="bf16"), Variant(name="lp", precision="bf16", optimizer_state="fp8-lm"))
    straight = Runner(_tiny(*variants, steps=4, eval_interval=4), tmp_path / "a", progress=False)
    straight.run()
    first = Runner(_tiny(*variants, steps=4, eval_interval=4, checkpoint_interval=2), tmp_path / "b", progress=False)
    first.run()
    # keep only the step-2 checkpoint, then resume from it in a new Runner
    from fp8lab.run.checkpoint import list_checkpoints

    for step, path in list_checkpoints(first.run_dir):
        if step != 2:
            path.unlink()
    resumed = Runner(
        _tiny(*variants, steps=4, eval_interval=4, checkpoint_interval=2),
        tmp_path / "b",
        progress=False,
        resume=first.run_dir,
    )
    assert resumed.start_step == 2
    resumed.run()
    a, b = straight.variants[1], resumed.variants[1]
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert same_bits(p.detach(), q.detach()), n
    for sa, sb in zip(a.optimizer.state.values(), b.optimizer.state.values()):
        assert all(same_bits(sa[k], sb[k]) for k in sa)


def test_cli_run_with_the_override(tmp_path):
    import json

    from fp8lab.run.cli import main
    from tests.helpers import QUICKSTART, TINY_MODEL

    sets = [
        *TINY_MODEL,
        "train.steps=2",
        "train.log_interval=1",
        "train.eval_interval=2",
        "variants.fp8.optimizer_state=fp8-lm",
    ]
    assert main(["run", QUICKSTART, "--out", str(tmp_path), "--quiet", *(a for s in sets for a in ("--set", s))]) == 0
    summary = json.loads(next(tmp_path.rglob("summary.json")).read_text())
    assert all(math.isfinite(v["final_val_loss"]) for v in summary["variants"].values())
    assert json.loads(next(tmp_path.rglob("config.json")).read_text())
