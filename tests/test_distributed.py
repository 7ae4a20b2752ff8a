"""FP8 scaling under torch.distributed: 2 CPU processes (gloo, loopback) against one process.

All distributed scenarios run in ONE spawn of 2 ranks (a module fixture: starting two
Python processes with torch costs seconds on a shared CPU); each rank saves what it
saw, and the tests compare it with single-process references computed here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import fp8lab
from fp8lab import FP8Options
from fp8lab.formats import Role
from fp8lab.run.data import BatchSampler, load_corpus
from fp8lab.run.distributed import Distributed, token_loss
from tests.helpers import free_port, gloo_group, run_ranks

WORLD = 2
SPAWN_TIMEOUT_S = 150  # a hung collective fails the test instead of hanging it
SCALING = fp8lab.DelayedScaling(amax_history_len=4)
OUTLIER = 1e4
GPT_STEPS, GPT_BATCH, GPT_BLOCK, GPT_LR = 20, 4, 32, 1e-3


# ---------------------------------------------------------------- shared by ranks and references
def small_model(num_layers: int) -> nn.Sequential:
    torch.manual_seed(0)
    layers = [fp8lab.Linear(16, 16, fp8=FP8Options(scaling=SCALING, backend="emulated")) for _ in range(num_layers)]
    return nn.Sequential(*layers)


def outlier_batch() -> torch.Tensor:
    """(4, 16); the outlier sits in row 3, i.e. in rank 1's half of the global batch."""
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(1))
    x[3, 5] = OUTLIER
    return x


def forward_backward(model: nn.Module, x: torch.Tensor) -> None:
    model(x).float().sum().backward()


def states(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(histories (L, H, 3), scales (L, 3)) copies of every layer's scaling state."""
    found = fp8lab.scaling.update.scaling_states(model)
    return torch.stack([s.amax_history.clone() for s in found]), torch.stack([s.scale.clone() for s in found])


def gpt() -> fp8lab.GPT:
    torch.manual_seed(0)
    return fp8lab.GPT.from_preset(
        "tiny",
        fallback="emulated",
        num_layers=2,
        block_size=GPT_BLOCK,
        scaling=fp8lab.DelayedScaling(amax_history_len=8),
    )


def sampler() -> BatchSampler:
    return BatchSampler(load_corpus("stdlib", max_bytes=1 << 18).train, GPT_BATCH, GPT_BLOCK, seed=7)


def train_gpt(model: nn.Module, batches, micro_batches: int) -> dict[str, torch.Tensor]:
    """GPT_STEPS optimizer steps; each global batch is ``micro_batches`` accumulated slices.

    ``batches(step)`` returns this process's (x, y); the loss of a slice is its token-loss
    sum over the global batch's token count, so slices (or ranks) add up to the mean.
    """
    inner = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    opt = torch.optim.AdamW(model.parameters(), lr=GPT_LR, fused=True)
    losses, scales = [], []
    for step in range(GPT_STEPS):
        x, y = batches(step)
        loss = torch.zeros(())
        for xs, ys in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(xs)  # (B_local, T, V)
            micro_loss = token_loss(logits, ys, GPT_BATCH * GPT_BLOCK)
            micro_loss.backward()
            loss += micro_loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        opt.step()
        opt.zero_grad(set_to_none=True)
        fp8lab.update_scales(inner)
        losses.append(loss)
        scales.append(states(inner)[1])
    return {"losses": torch.stack(losses), "scales": torch.stack(scales), "histories": states(inner)[0]}


# ---------------------------------------------------------------- what each rank runs
class AllReduceSpy:
    """Counts torch.distributed.all_reduce calls (and their groups) and calls through."""

    def __init__(self):
        self.real, self.calls = dist.all_reduce, []

    def __call__(self, tensor, *args, **kwargs):
        self.calls.append((tensor.numel(), kwargs.get("group")))
        return self.real(tensor, *args, **kwargs)


def rank_scenarios(rank: int) -> dict:
    out = {}
    spy = AllReduceSpy()
    dist.all_reduce = spy
    try:
        x_local = outlier_batch().chunk(WORLD)[rank]
        for num_layers in (2, 5):  # one collective whatever the layer count
            model = small_model(num_layers)
            forward_backward(model, x_local)
            spy.calls.clear()
            fp8lab.update_scales(model)
            out[f"calls_{num_layers}"] = list(spy.calls)
            out[f"states_{num_layers}"] = states(model)

        singles = [dist.new_group([r]) for r in range(WORLD)]  # every rank creates every group
        model = small_model(2)
        forward_backward(model, x_local)
        spy.calls.clear()
        fp8lab.update_scales(model, group=singles[rank])  # a group of one: nothing from the other rank
        out["group_calls_are_mine"] = [group is singles[rank] for _, group in spy.calls]
        out["states_group"] = states(model)
    finally:
        dist.all_reduce = spy.real

    model = small_model(2)
    forward_backward(model, outlier_batch().chunk(WORLD)[rank] / OUTLIER)
    fp8lab.update_scales(model)
    out["scale_before_nan"] = states(model)[1]
    x_nan = torch.randn(2, 16)
    if rank == 1:
        x_nan[0, 0] = float("nan")
    forward_backward(model, x_nan)
    fp8lab.update_scales(model)
    out["states_nan"] = states(model)
    out["faults_nan"] = torch.stack([s.faults.clone() for s in fp8lab.scaling.update.scaling_states(model)])

    ddp = Distributed(rank, WORLD, rank, torch.device("cpu")).wrap(gpt())
    data = sampler()
    out["gpt"] = train_gpt(ddp, lambda step: data.batch(step, rank, WORLD), micro_batches=1)
    fsdp = Distributed(rank, WORLD, rank, torch.device("cpu")).shard(gpt())
    out["fsdp"] = train_gpt(fsdp, lambda step: data.batch(step, rank, WORLD), micro_batches=1)
    return out


def _rank_entry(rank: int, port: int, out_dir: str) -> None:
    with gloo_group(rank, WORLD, port):
        torch.save(rank_scenarios(rank), Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("ranks")
    run_ranks(_rank_entry, (free_port(), str(out_dir)), WORLD, SPAWN_TIMEOUT_S, "2-rank gloo run")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ---------------------------------------------------------------- the tests
def test_one_collective_per_update_whatever_the_layer_count(ranks):
    for r in ranks:
        # one MAX all-reduce of a single buffer: (amax x3 + non-finite casts x3) per layer
        assert r["calls_2"] == [(2 * 6, None)] and r["calls_5"] == [(5 * 6, None)]


def test_outlier_on_rank1_reaches_every_rank_and_matches_one_process(ranks):
    model = small_model(2)
    forward_backward(model, outlier_batch())  # one process, the whole global batch
    fp8lab.update_scales(model)
    ref_hist, ref_scale = states(model)
    assert ref_hist[0, -1, Role.INPUT] == OUTLIER  # the reference itself saw the outlier
    for r in ranks:
        hist, scale = r["states_2"]
        assert hist[0, -1, Role.INPUT] == OUTLIER  # newest past amax: row 0 rolled to the end
        assert torch.equal(hist, ref_hist) and torch.equal(scale, ref_scale)
    assert torch.equal(ranks[0]["states_5"][1], ranks[1]["states_5"][1])


def test_the_group_argument_is_the_group_reduced_over(ranks):
    """A group of one rank per process: rank 0 must NOT see rank 1's outlier."""
    for r in ranks:
        assert r["group_calls_are_mine"] == [True]
    assert ranks[0]["states_group"][0][0, -1, Role.INPUT] < 10.0
    assert ranks[1]["states_group"][0][0, -1, Role.INPUT] == OUTLIER


def test_nan_element_on_rank1_is_ignored_by_scaling_and_a_fault_on_every_rank(ranks):
    """A NaN element only on rank 1: the amax ignores it (TE's fmaxf), so both ranks roll
    the same finite amax and rescale from it; the fault is counted on every rank."""
    for r in ranks:
        hist, scale = r["states_nan"]
        assert torch.isfinite(hist[0, -1, Role.INPUT]) and hist[0, -1, Role.INPUT] > 0
        # the NaN reaches the second layer's input too; weights and gradients stay finite
        assert r["faults_nan"][:, Role.INPUT].tolist() == [1.0, 1.0]
        assert r["faults_nan"][:, [Role.WEIGHT, Role.GRAD_OUTPUT]].sum() == 0
        assert scale[0, Role.INPUT] == torch.tensor(448.0) / hist[0, -1, Role.INPUT]
    assert torch.equal(ranks[0]["states_nan"][0], ranks[1]["states_nan"][0])


@pytest.fixture(scope="module")
def references() -> dict[str, dict]:
    data = sampler()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the ranks: CPU reductions split work (and round) by thread count
    try:
        return {
            "full": train_gpt(gpt(), data.batch, micro_batches=1),  # the global batch in one forward
            "accum": train_gpt(gpt(), data.batch, micro_batches=WORLD),  # the ranks' slices, accumulated
        }
    finally:
        torch.set_num_threads(threads)


def _ddp_run(ranks) -> dict[str, torch.Tensor]:
    """What the 2-rank DDP run computed: rank 0's scaling state, the global loss per step."""
    for key in ("scales", "histories"):  # every rank holds the same state, every step
        assert torch.equal(ranks[0]["gpt"][key], ranks[1]["gpt"][key]), key
    # each rank's loss is its token-loss sum over the global token count: they add up
    return {**ranks[0]["gpt"], "losses": ranks[0]["gpt"]["losses"] + ranks[1]["gpt"]["losses"]}


def test_ddp_equals_one_process_accumulating_the_rank_slices_exactly(ranks, references):
    """2 ranks == 1 process running the same 2 slices as accumulated micro-batches, bit for bit.

    Same GEMM shapes, the gradient sum a + b in fp32 either way (DDP's SUM hook), one
    MAX of the amaxes either way: every loss and every scale of all 20 steps is equal.
    """
    ddp, ref = _ddp_run(ranks), references["accum"]
    assert torch.equal(ddp["losses"], ref["losses"])
    assert torch.equal(ddp["scales"], ref["scales"])  # (steps, layers, roles)
    assert torch.equal(ddp["histories"], ref["histories"])


def test_ddp_against_one_process_on_the_whole_global_batch(ranks, references):
    """2 ranks vs 1 process that runs the global batch in one forward.

    Exact: step 1, whose weights are identical: every scale of every layer and role.
    From step 2 the weights differ by rounding, so amaxes and scales do too: the emulated
    FP8 GEMM emits bf16, so each rank's weight gradient (a sum over 2 sequences) is
    rounded to bf16 before the two are added, where the one process rounds the sum over 4
    once (relative error up to 2**-9 per element); bias and LayerNorm gradients are fp32
    sums in another order. Measured over 20 steps at lr 1e-3: loss rel. difference
    <= 1.1e-3 (bound 5e-3); scales rel. difference up to 1.8% (input), 0.5% (weight),
    18% (grad_output). Step 1's loss differs only by fp32 summation order (8.5e-8).
    """
    ddp, ref = _ddp_run(ranks), references["full"]
    assert torch.equal(ddp["scales"][0], ref["scales"][0])
    torch.testing.assert_close(ddp["losses"][0], ref["losses"][0], rtol=1e-6, atol=0)
    torch.testing.assert_close(ddp["losses"], ref["losses"], rtol=5e-3, atol=0)


def test_fsdp2_fully_shard_keeps_fp8_scaling_whole_and_identical(ranks, references):
    """FSDP2 shards parameters; fp8lab's scaling state (buffers) stays whole on every rank.

    Exact on every rank at every step; against the accumulating process exact at step 1.
    Later the gradient norm differs: FSDP2 sums the squares of each shard and then across
    ranks, so the clip factor can differ by 1 ulp (measured: identical scales for steps
    1-8, 1-ulp scale differences from step 9, loss rel. difference <= 1.8e-4; with
    clipping off all 20 steps were bit-identical).
    """
    f0, f1 = ranks[0]["fsdp"], ranks[1]["fsdp"]
    assert torch.equal(f0["scales"], f1["scales"]) and torch.equal(f0["histories"], f1["histories"])
    ref = references["accum"]
    assert torch.equal(f0["scales"][0], ref["scales"][0])
    torch.testing.assert_close(f0["losses"] + f1["losses"], ref["losses"], rtol=1e-3, atol=0)
