"""FP8 primary weights (fp8lab.layers.fp8_weight, fp8lab.optim.fp8_weights, variants.<v>.weights).

References are independent of the code under test: E4M3 rounding is done here by nearest
neighbour on the table of all E4M3 values (ties to the even code), scales in numpy float32,
amax history by hand; only AdamW's arithmetic is torch's in both (it is not what is tested).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch

import fp8lab
from fp8lab import DelayedScaling, FP8Options
from fp8lab.layers.fp8_weight import to_fp8_weights
from fp8lab.optim.fp8_weights import FP8WeightUpdate, fp8_primary_weights
from fp8lab.quantize.weight import FP8Weight
from fp8lab.run.config import ConfigError, Variant, hash_of, upgrade
from fp8lab.scaling.block import Float8BlockScaling
from fp8lab.telemetry.weight_updates import LostUpdateProbe
from tests.test_precision_ladder import make_run, tiny_config

E4M3_MAX = 448.0
_CODES = torch.arange(256, dtype=torch.uint8)
_VALUES = _CODES.view(torch.float8_e4m3fn).double()
_FINITE = ~torch.isnan(_VALUES)
GRID, GRID_CODES = _VALUES[_FINITE], _CODES[_FINITE]


def e4m3_reference(x: torch.Tensor) -> torch.Tensor:
    """x (any float) -> nearest E4M3 value in float64, ties to the even code, saturating."""
    x64 = x.double().clamp(-E4M3_MAX, E4M3_MAX).reshape(-1, 1)
    dist = (GRID[None, :] - x64).abs()
    best = dist.min(dim=1, keepdim=True).values
    ties = dist == best  # one or two candidates
    even = (GRID_CODES[None, :] % 2 == 0) & ties
    pick = torch.where(ties.sum(1, keepdim=True) > 1, even, ties)
    out = (pick.double() * GRID[None, :]).nan_to_num().sum(1)  # -0 and +0 both give 0
    return out.reshape(x.shape)


def f32(x) -> np.float32:
    return np.float32(x)


def make_layer(k: int = 32, n: int = 16, history: int = 4, seed: int = 0) -> fp8lab.Linear:
    torch.manual_seed(seed)
    fp8 = FP8Options(scaling=DelayedScaling(amax_history_len=history), fallback="emulated")
    return fp8lab.Linear(k, n, bias=False, fp8=fp8)


def reference_run(w0: torch.Tensor, grads: list, master: bool, history: int, lr: float) -> list[torch.Tensor]:
    """The FP8 values after each step, by the semantics the module docstrings state:
    conversion casts w0 with fp8_max/amax(w0) (amax into row 0); each step AdamW updates
    the master (or the dequantized weight), the result is cast with the current scale, its
    amax joins row 0, then the history rolls and scale = 448 / max(window)."""
    amax0 = f32(w0.abs().max())
    scale = f32(E4M3_MAX) / amax0
    values = e4m3_reference(w0 * torch.tensor(scale)).float()  # fp32 product, then E4M3
    scale_inv = f32(1.0) / scale
    window, row0 = [], float(amax0)  # recorded amaxes (newest last), the row being recorded
    target = torch.nn.Parameter(w0.clone().float())
    opt = torch.optim.AdamW([target], lr=lr, foreach=False)
    out = []
    for g in grads:
        if not master:  # the update acts on the dequantized weight (fp32 product)
            with torch.no_grad():
                target.copy_(values * torch.tensor(scale_inv))
        target.grad = g.clone()
        opt.step()
        new = target.detach()
        prod = (new * torch.tensor(scale)).float()  # fp32 product, as the cast computes it
        values = e4m3_reference(prod).float()
        scale_inv = f32(1.0) / scale
        row0 = max(row0, float(new.abs().max()))
        window = (window + [row0])[-history:]
        scale = f32(E4M3_MAX) / f32(max(window))
        row0 = 0.0
        out.append(values * torch.tensor(scale_inv))
    return out


@pytest.mark.parametrize("master", [True, False])
def test_codes_after_steps_match_a_plain_reference(master):
    layer = make_layer()
    w0 = layer.weight.detach().clone()
    update = fp8_primary_weights(layer, master=master)
    opt = torch.optim.AdamW([update.substitute(layer.weight)], lr=3e-3, foreach=False)
    torch.manual_seed(1)
    grads = [torch.randn(16, 32) * 10.0 ** (-i % 3) for i in range(6)]
    expected = reference_run(w0, grads, master, history=4, lr=3e-3)
    for g, want in zip(grads, expected):
        layer.weight.grad = g.clone()
        update.prepare()
        opt.step()
        update.finish()
        fp8lab.update_scales(layer)
        assert torch.equal(layer.weight.dequantize(), want)
    changed = (layer.weight.dequantize() != expected[0]).float().mean()
    assert changed > 0.1  # the steps moved the weights: the comparison is not of constants


def test_forward_and_backward_equal_the_fp8_path_for_a_representable_weight():
    hp, fp8w = make_layer(seed=3), make_layer(seed=3)
    with torch.no_grad():  # values on the E4M3 grid times 2**-6, amax 7: scale 448/7 = 64 casts them exactly
        grid = e4m3_reference(hp.weight * 64).float() / 64
        grid[0, 0] = 7.0
        hp.weight.copy_(grid)
        fp8w.weight.copy_(grid)
    to_fp8_weights(fp8w)
    hp.fp8_state.scale.copy_(fp8w.fp8_state.scale)  # the same weight scale (and the rest: ones)
    assert float(fp8w.fp8_state.scale[1]) == 64.0 and torch.equal(fp8w.weight.dequantize(), grid)
    recorded = fp8w.fp8_state.amax_history[0, 1].clone()  # by the conversion
    x = torch.randn(4, 8, 32)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = hp(x1), fp8w(x2)
    assert torch.equal(y1, y2)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    assert torch.equal(x1.grad, x2.grad) and torch.equal(hp.weight.grad, fp8w.weight.grad)
    # the FP8 weight is not cast in the forward: its history column records nothing there
    fp8w.fp8_state.amax_history[0, 1] = 0.0
    hp.fp8_state.amax_history[0, 1] = 0.0
    fp8w(x), hp(x)
    assert fp8w.fp8_state.amax_history[0, 1] == 0.0 and hp.fp8_state.amax_history[0, 1] == 7.0
    assert recorded == 7.0
    assert torch.equal(hp.fp8_state.amax_history[0, 0], fp8w.fp8_state.amax_history[0, 0])
    # against float64: the GEMM of the same FP8 operands (inputs cast with scale 1)
    ref = e4m3_reference(x).reshape(-1, 32) @ grid.double().t()
    assert torch.allclose(y2.reshape(-1, 16).double(), ref, rtol=2**-7, atol=1e-2)


def _lost_case(master: bool):
    """Weights 1.0 (and one 1.75, the amax, gradient 0) at scale 448/1.75 = 256: 1.0 is the
    code 256, whose E4M3 step is 32, 0.125 in weight units. SGD adds lr = 2**-5 (a quarter
    step) to every other element per step."""
    layer = make_layer(k=16, n=2)
    with torch.no_grad():
        layer.weight.fill_(1.0)
        layer.weight[0, 0] = 1.75
    model = torch.nn.Sequential(layer)
    update = fp8_primary_weights(model, master=master)
    opt = torch.optim.SGD([update.substitute(layer.weight)], lr=2**-5)
    grad = -torch.ones(2, 16)
    grad[0, 0] = 0.0
    probe, lost, values = LostUpdateProbe(update), [], []
    for _ in range(4):
        layer.weight.grad = grad.clone()
        update.prepare(track=True)
        opt.step()
        update.finish()
        fp8lab.update_scales(model)
        lost.append(probe.read()["weights/0/updates_lost_pct"])
        values.append(layer.weight.dequantize()[1, 1].item())
    return layer, update, lost, values


def test_updates_below_half_a_step_are_all_lost_without_master_weights():
    layer, _, lost, values = _lost_case(master=False)
    assert float(layer.fp8_state.scale[1]) == 256.0
    assert lost == [100.0 * 31 / 32] * 4  # every updated element (31 of 32), every step
    assert values == [1.0] * 4


def test_master_weights_accumulate_tiny_updates_until_the_fp8_weight_moves():
    _, update, lost, values = _lost_case(master=True)
    # master 1 + k/32, x256 = 264 (-> 256), 272 (tie -> 256, the even code), 280 (-> 288: moved),
    # 288 (-> 288: this step's update again left the FP8 weight where it was)
    assert lost == [100.0 * 31 / 32, 100.0 * 31 / 32, 0.0, 100.0 * 31 / 32]
    assert values == [1.0, 1.0, 1.125, 1.125]
    assert update.stand_ins["0"][1, 1].item() == 1.0 + 4 / 32


def test_skipped_step_keeps_codes_and_scale():
    layer = make_layer()
    update = fp8_primary_weights(layer, master=False)
    opt = torch.optim.AdamW([update.substitute(layer.weight)], lr=1e-2)
    before = (layer.weight.codes.clone(), layer.weight.scale_inv.clone())
    layer.fp8_state.scale[1] *= 2  # a new scale since the cast: a recast would change every code
    layer.weight.grad = torch.randn(16, 32)
    update.prepare()
    opt.step()
    update.finish(skip=torch.tensor(True))
    assert torch.equal(layer.weight.codes.view(torch.uint8), before[0].view(torch.uint8))
    assert torch.equal(layer.weight.scale_inv, before[1])


def test_state_dict_holds_codes_and_scale_and_loads_weights_only():
    layer = make_layer()
    to_fp8_weights(layer)
    sd = layer.state_dict()
    assert sd["weight"].dtype == torch.float8_e4m3fn and type(sd["weight"]) is torch.Tensor
    assert sd["weight_scale_inv"].shape == () and sd["weight_scale_inv"].dtype == torch.float32
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    other = make_layer(seed=7)
    to_fp8_weights(other)
    other.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(other.weight.dequantize(), layer.weight.dequantize())
    with pytest.raises(RuntimeError, match="FP8 codes"):  # an fp32 checkpoint is refused, not cast
        other.load_state_dict(make_layer().state_dict() | {"weight_scale_inv": torch.tensor(1.0)})


def test_an_fp8_weight_refuses_in_place_writes():
    layer = make_layer()
    to_fp8_weights(layer)
    assert isinstance(layer.weight, FP8Weight) and isinstance(layer.weight, torch.nn.Parameter)
    with pytest.raises(TypeError, match="FP8 primary weight"), torch.no_grad():
        layer.weight.add_(1.0)


def _steps(run, batches):
    losses = []
    for i, x in enumerate(batches):
        run.train_step(x, torch.roll(x, 1, 1), 1e-3, log=i % 2 == 0)
        losses.append(run.take_train_metrics(32)["loss/train"])
    return losses


@pytest.mark.parametrize("weights", ["fp8", "fp8-master"])
def test_resume_is_bit_exact(weights):
    variant = Variant(
        name="w8", precision="fp8", scaling=DelayedScaling(amax_history_len=4), fallback="emulated", weights=weights
    )
    torch.manual_seed(0)
    batches = [torch.randint(0, 256, (2, 16)) for _ in range(4)]
    straight = make_run(variant)
    _steps(straight, batches[:2])
    buf = io.BytesIO()
    torch.save(straight.state_dict(), buf)
    buf.seek(0)
    resumed = make_run(variant)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert _steps(straight, batches[2:]) == _steps(resumed, batches[2:])
    a, b = straight.state_dict(), resumed.state_dict()
    for key, value in a["model"].items():
        assert torch.equal(
            value.view(torch.uint8) if value.dtype == torch.float8_e4m3fn else value,
            (b["model"][key].view(torch.uint8) if value.dtype == torch.float8_e4m3fn else b["model"][key]),
        ), key
    assert a["fp8_weights"].keys() == b["fp8_weights"].keys()
    for name, master in a["fp8_weights"]["master"].items():
        assert torch.equal(master, b["fp8_weights"]["master"][name])
    assert len(a["fp8_weights"]["master"]) == (4 if weights == "fp8-master" else 0)
    assert sum(isinstance(p, FP8Weight) for p in straight.model.parameters()) == 4  # qkv, proj, fc1, fc2


@pytest.mark.parametrize(
    "fields,message",
    [
        (dict(weights="fp9"), "variants.v.weights must be one of ('hp', 'fp8', 'fp8-master')"),
        (dict(weights="fp8", scaling=Float8BlockScaling()), "variants.v.weights"),
        (dict(weights="fp8-master", master_weights=False), "variants.v.weights"),
        (dict(weights="fp8", precision="bf16"), "variants.v.weights does not apply to precision 'bf16'"),
    ],
)
def test_refusals_name_the_field(fields, message):
    with pytest.raises(ConfigError) as err:
        Variant(name="v", **{"fallback": "emulated", **fields})
    assert message in str(err.value)


def test_old_configs_upgrade_to_hp_with_their_hash():
    config = tiny_config(
        Variant(name="fp32", precision="fp32"), Variant(name="fp8", scaling=DelayedScaling(amax_history_len=4))
    )
    saved = config.to_dict()
    for v in saved["variants"]:
        del v["weights"]
    assert hash_of(upgrade(saved)) == config.hash()


def test_update_without_conversion_changes_nothing():
    layer = make_layer()
    update = FP8WeightUpdate({}, master=True)
    assert update.substitute(layer.weight) is layer.weight and update.state_dict() == {"master": {}}


def test_a_layer_that_cannot_be_converted_is_refused_by_name():
    a, b = make_layer(), make_layer()
    b.weight = a.weight  # shared: its FP8 codes would have two owners
    with pytest.raises(ValueError, match="layer '0' runs FP8 GEMMs but cannot hold FP8 primary weights"):
        fp8_primary_weights(torch.nn.Sequential(a, b), master=True)


def test_a_cli_run_with_fp8_weights_logs_lost_updates_and_bytes(tmp_path):
    """`--set variants.fp8.weights=fp8` reaches the model: the FP8 variant logs
    weights/<layer>/updates_lost_pct for the four block Linears, the BF16 baseline none, and
    its parameters take fewer bytes than the baseline's by 3 bytes a converted weight element."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fp8lab.run.cli import main
    from tests.helpers import QUICKSTART, TINY_MODEL

    sets = TINY_MODEL + ["train.steps=2", "train.log_interval=1", "train.eval_interval=2", "variants.fp8.weights=fp8"]
    assert main(["run", QUICKSTART, "--out", str(tmp_path), "--quiet", *(a for s in sets for a in ("--set", s))]) == 0
    (run_dir,) = (tmp_path / "quickstart").iterdir()
    scalars = {}
    for variant in ("fp8", "bf16"):
        acc = EventAccumulator(str(run_dir / variant), size_guidance={"scalars": 0})
        acc.Reload()
        scalars[variant] = {t: acc.Scalars(t) for t in acc.Tags()["scalars"]}
    lost = {t for t in scalars["fp8"] if t.startswith("weights/")}
    assert lost == {f"weights/blocks.0.{n}/updates_lost_pct" for n in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")}
    assert not any(t.startswith("weights/") for t in scalars["bf16"])
    assert all(0 <= e.value <= 100 for t in lost for e in scalars["fp8"][t])
    params = {v: scalars[v]["perf/mem_params_bytes"][-1].value for v in ("fp8", "bf16")}
    assert params["bf16"] - params["fp8"] == 3 * W8_TINY - 4 * 4


W8_TINY = 128 * 384 + 128 * 128 + 128 * 512 + 512 * 128  # the tiny GPT's block Linears' weight elements


@pytest.mark.parametrize("weights", ["fp8", "fp8-master"])
def test_runner_resumed_from_a_weights_only_checkpoint_equals_a_straight_run(tmp_path, weights):
    """4 steps straight vs checkpointed at step 2 (the run's own files, read weights_only) and
    resumed by a new Runner: FP8 codes, scales, master copies and moments equal bit for bit."""
    from fp8lab.run.checkpoint import list_checkpoints
    from fp8lab.run.runner import Runner

    scaling = DelayedScaling(amax_history_len=4)
    variants = (
        Variant(name="fp32", precision="fp32"),
        Variant(name="w8", precision="fp8", scaling=scaling, fallback="emulated", weights=weights),
    )

    def config(**train):
        return tiny_config(*variants, steps=4, eval_interval=4, **train)

    straight = Runner(config(), tmp_path / "a", progress=False)
    straight.run()
    first = Runner(config(checkpoint_interval=2), tmp_path / "b", progress=False)
    first.run()
    for step, path in list_checkpoints(first.run_dir):
        if step != 2:
            path.unlink()
    resumed = Runner(config(checkpoint_interval=2), tmp_path / "b", progress=False, resume=first.run_dir)
    assert resumed.start_step == 2
    resumed.run()
    a, b = straight.variants[1], resumed.variants[1]
    bits = lambda t: t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t  # noqa: E731
    for key, value in a.model.state_dict().items():
        assert torch.equal(bits(value), bits(b.model.state_dict()[key])), key
    for name, master in a.fp8_weights.state_dict()["master"].items():
        assert torch.equal(master, b.fp8_weights.state_dict()["master"][name])
    for sa, sb in zip(a.optimizer.state.values(), b.optimizer.state.values()):
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_memory_estimate_counts_fp8_weights_low():
    """The preflight estimate: 3 bytes less per block Linear weight element for weights="fp8"
    (an E4M3 code for an fp32 weight); "fp8-master" counted as "hp" (the estimate stays low)."""
    from fp8lab.run.memory import estimate

    scaling = DelayedScaling(amax_history_len=4)

    def state(weights):
        variant = Variant(name="v", scaling=scaling, weights=weights)
        return estimate(tiny_config(Variant(name="fp32", precision="fp32"), variant)).state

    assert state("hp") - state("fp8") == 3 * W8_TINY
    assert state("fp8-master") == state("hp")


def test_current_scaling_casts_each_new_weight_with_its_own_amax():
    """Under Float8CurrentScaling the cast after a step takes the scale 448 / amax of the new
    value (TE's current-scaling quantizer), with no state; a run trains with it."""
    from fp8lab.scaling.current import Float8CurrentScaling

    torch.manual_seed(0)
    layer = fp8lab.Linear(32, 16, bias=False, fp8=FP8Options(scaling=Float8CurrentScaling(), fallback="emulated"))
    update = fp8_primary_weights(layer, master=True)
    master = update.stand_ins[""].detach().clone()
    opt = torch.optim.SGD([update.substitute(layer.weight)], lr=0.1)
    for step in range(3):
        g = torch.randn(16, 32) * (step + 1)
        layer.weight.grad = g.clone()
        update.prepare()
        opt.step()
        update.finish()
        master = master - 0.1 * g  # SGD in fp32, as torch computes it (p + (-lr) * g)
        scale = f32(E4M3_MAX) / f32(master.abs().max())
        want = e4m3_reference(master * torch.tensor(scale)).float() * torch.tensor(f32(1.0) / scale)
        assert float(layer.weight.scale_inv) == f32(1.0) / scale
        assert torch.equal(layer.weight.dequantize(), want)
    run = make_run(Variant(name="cur", precision="fp8", scaling=Float8CurrentScaling(), weights="fp8"))
    x = torch.randint(0, 256, (2, 16))
    run.train_step(x, torch.roll(x, 1, 1), 1e-3, log=True)
    assert np.isfinite(run.take_train_metrics(32)["loss/train"])


@pytest.mark.gpu
@pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)),
    reason="needs a CUDA device with FP8 tensor cores (torch._scaled_mm)",
)
def test_scaled_mm_takes_the_fp8_codes_as_the_weight_operand():
    """On the GPU backend the codes go to torch._scaled_mm as they are: the output and the
    gradients equal the high-precision-weight path with the same weight scale, bit for bit."""
    torch.manual_seed(0)
    fp8 = FP8Options(scaling=DelayedScaling(amax_history_len=4), backend="scaled_mm")
    hp = fp8lab.Linear(64, 32, bias=False, fp8=fp8, device="cuda")
    w8 = fp8lab.Linear(64, 32, bias=False, fp8=fp8, device="cuda")
    with torch.no_grad():
        grid = e4m3_reference(hp.weight.cpu() * 64).float() / 64
        grid[0, 0] = 7.0  # amax 7: scale 64, the grid cast exactly
        hp.weight.copy_(grid)
        w8.weight.copy_(grid)
    to_fp8_weights(w8)
    hp.fp8_state.scale.copy_(w8.fp8_state.scale)
    x = torch.randn(16, 64, device="cuda", dtype=torch.bfloat16)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = hp(x1), w8(x2)
    assert torch.equal(y1, y2)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    assert torch.equal(x1.grad, x2.grad) and torch.equal(hp.weight.grad, w8.weight.grad)
