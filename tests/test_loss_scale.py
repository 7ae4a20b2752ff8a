"""Dynamic loss scaling: GradScaler's semantics, on the device, skipped steps leave the model
alone, and a resumed run continues the scale bit for bit."""

from __future__ import annotations

import pytest
import torch

from fp8lab.run import checkpoint as ckpt
from fp8lab.run.config import Variant
from fp8lab.run.loss_scale import DynamicLossScaler, LossScaleConfig
from fp8lab.run.runner import Runner
from fp8lab.run.variant import VariantRun
from tests.helpers import sigterm_in_training_step
from tests.test_precision_ladder import RUNGS, make_run, tiny_config
from tests.test_run import _HostReads

INF_STEPS = {2, 5, 6}  # steps (0-based) whose gradients are made non-finite


def test_scale_follows_torch_grad_scaler_exactly():
    """The same model, data and injected infs through torch.amp.GradScaler and through the
    fp8lab scaler give the same scale after every step (growth_interval 3, so both growth
    and backoff happen), and the same skipped steps."""
    config = LossScaleConfig(init=2.0**10, growth_interval=3)
    torch_scaler = torch.amp.GradScaler(
        "cpu",
        init_scale=config.init,
        growth_factor=config.growth_factor,
        backoff_factor=config.backoff_factor,
        growth_interval=config.growth_interval,
    )
    ours = DynamicLossScaler(config, torch.device("cpu"))
    torch_scales, our_scales = [], []
    for step in range(12):
        layer = torch.nn.Linear(4, 4)
        opt = torch.optim.AdamW(layer.parameters(), fused=True)
        loss = layer(torch.ones(2, 4)).sum()
        torch_scaler.scale(loss).backward()
        if step in INF_STEPS:
            layer.weight.grad[0, 0] = float("inf")
        torch_scaler.step(opt)
        torch_scaler.update()
        torch_scales.append(torch_scaler.get_scale())
        our_loss = loss.detach()
        grads_finite = step not in INF_STEPS
        ours.update(torch.tensor(not grads_finite) | ~torch.isfinite(our_loss))
        our_scales.append(float(ours.scale))
    assert our_scales == torch_scales
    assert our_scales[:3] == [2.0**10, 2.0**10, 2.0**9]  # grows only after 3 good steps; backs off at once


def _fp16_run(**fields) -> VariantRun:
    return make_run(Variant(name="fp16", precision="fp16", **fields))


def _batch():
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    return x, torch.roll(x, 1, 1)


@pytest.mark.parametrize("master_weights", [True, False], ids=["master", "no_master"])
def test_overflow_skips_the_step_halves_the_scale_and_leaves_weights_untouched(master_weights):
    """A loss scale of 2**100 overflows FP16 in the backward (the overflow is real, not a
    patched flag): the step is skipped, the scale halves, weights and AdamW state stay bit
    for bit, and it is not counted toward the divergence limit."""
    run = _fp16_run(loss_scale_init=2.0**100, master_weights=master_weights)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    run.train_step(*_batch(), 1e-3, log=False)
    assert float(run.loss_scaler.scale) == 2.0**99
    assert all(torch.equal(before[n], p) for n, p in run.model.named_parameters())
    assert all(float(s["step"]) == 0 and not s["exp_avg"].any() for s in run.optimizer.state.values())
    metrics = run.take_train_metrics(32)
    assert metrics["faults/skipped_steps"] == 1 and metrics["faults/consecutive_skips"] == 0
    assert metrics["precision/loss_scale"] == 2.0**99


def test_scale_grows_after_the_configured_good_steps():
    run = _fp16_run(loss_scale_init=2.0**8, loss_scale_growth_interval=2)
    scales = []
    for _ in range(5):
        before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
        run.train_step(*_batch(), 1e-3, log=False)
        scales.append(float(run.loss_scaler.scale))
        assert any(not torch.equal(before[n], p) for n, p in run.model.named_parameters())  # good steps update
    assert scales == [2.0**8, 2.0**9, 2.0**9, 2.0**10, 2.0**10]
    assert run.take_train_metrics(32)["faults/skipped_steps"] == 0


def test_loss_scaled_step_reads_nothing_on_the_host():
    """The fp16 step (scale, clip, skip, update) reads no tensor on the host; a log step
    reads the scale with the counters (tests/test_run.py checks the FP8 layers' reads)."""
    run = _fp16_run()
    run.train_step(*_batch(), 1e-3, log=False)  # the optimizer's lazy state
    with _HostReads() as reads:
        run.train_step(*_batch(), 1e-3, log=False)
    assert reads.reads == []


def test_resume_continues_the_loss_scale_and_16_bit_state_bit_for_bit(tmp_path):
    fp16 = Variant(name="fp16", precision="fp16", loss_scale_init=2.0**12, loss_scale_growth_interval=2)
    bf16_pure = Variant(name="bf16_pure", precision="bf16", master_weights=False)
    cfg = tiny_config(RUNGS["fp32"], fp16, bf16_pure, steps=6, checkpoint_interval=2)
    straight = Runner(cfg, tmp_path / "a", progress=False)
    straight.run()

    interrupted = Runner(cfg, tmp_path / "b", progress=False)
    sigterm_in_training_step(interrupted, 3)
    assert interrupted.run() is None
    saved = ckpt.read_checkpoint(ckpt.list_checkpoints(interrupted.run_dir)[-1][1])
    assert saved["step"] == 3
    assert saved["variants"]["fp16"]["loss_scale"]["growth_tracker"].item() == 1  # mid-interval: must be restored
    resumed = Runner(cfg, tmp_path / "unused", progress=False, resume=interrupted.run_dir)
    resumed.run()
    for a, b in zip(straight.variants, resumed.variants):
        for key, value in a.model.state_dict().items():
            other = b.model.state_dict()[key]
            assert value.dtype == other.dtype and torch.equal(value, other), (a.variant.name, key)
        for sa, sb in zip(a.optimizer.state.values(), b.optimizer.state.values()):
            assert all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)
    assert torch.equal(straight.variants[1].loss_scaler.scale, resumed.variants[1].loss_scaler.scale)
    assert torch.equal(straight.variants[1].loss_scaler.growth_tracker, resumed.variants[1].loss_scaler.growth_tracker)
    assert float(resumed.variants[1].loss_scaler.scale) == 2.0**15  # grew at steps 2, 4 and 6
    assert {p.dtype for p in resumed.variants[2].model.parameters()} == {torch.bfloat16}
