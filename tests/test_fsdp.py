"""FSDP2 with fp8lab layers: 2 CPU ranks (gloo) against DDP and one process, per scaling recipe.

One spawn of 2 ranks runs every scenario (a module fixture: starting two Python processes
with torch costs seconds on a shared CPU). Per recipe (delayed, current, block) each rank
trains the tiny GPT (2 blocks) for STEPS steps three ways on the same global batches: DDP,
FSDP with fp32 all-gather, FSDP with FP8 all-gather (``fp8lab.gemm.fp8_all_gather``). No
gradient clipping here: with 2 ranks every gradient element is one fp32 addition of the two
ranks' contributions, whether DDP all-reduces it or FSDP reduce-scatters it, and a + b is
b + a, so the three runs are bit-identical (clipping's sharded norm is the one difference:
``tests/test_fsdp_run.py``).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import fp8lab
from fp8lab.formats import Role
from fp8lab.gemm.fp8_all_gather import GatheredFP8Weight, ShardedFP8Weight, whole_tensor
from fp8lab.run.data import BatchSampler, load_corpus
from fp8lab.run.distributed import Distributed, token_loss
from tests.helpers import free_port, gloo_group, run_ranks

WORLD = 2
STEPS, BATCH, BLOCK, LR = 3, 4, 32, 1e-3
SPAWN_TIMEOUT_S = 150
RECIPES = {
    "delayed": fp8lab.DelayedScaling(amax_history_len=8),
    "current": fp8lab.Float8CurrentScaling(),
    "block": fp8lab.Float8BlockScaling(),
}


def gpt(scaling, **kwargs) -> fp8lab.GPT:
    torch.manual_seed(0)
    return fp8lab.GPT.from_preset(
        "tiny", fallback="emulated", num_layers=2, block_size=BLOCK, scaling=scaling, **kwargs
    )


def head_in_fp8() -> fp8lab.GPT:
    """Delayed scaling with the LM head in FP8 too: an FP8 layer of the root FSDP group, whose
    gathered weight FSDP2 keeps between an eval forward and the next training forward."""
    from fp8lab.layers.policy import PrecisionPolicy

    return gpt(RECIPES["delayed"], policy=PrecisionPolicy(keep_bf16=()))


def sampler() -> BatchSampler:
    return BatchSampler(load_corpus("stdlib", max_bytes=1 << 18).train, BATCH, BLOCK, seed=7)


def states(model) -> tuple[torch.Tensor, torch.Tensor] | None:
    found = fp8lab.scaling.update.scaling_states(model)
    if not found:
        return None
    return torch.stack([s.amax_history.clone() for s in found]), torch.stack([s.scale.clone() for s in found])


def train(model, batches, micro_batches: int = 1, counter=None, telemetry: bool = False) -> dict:
    """STEPS optimizer steps; per step the (local) loss, the scaling state, the bytes gathered;
    at the end every parameter whole (a collective under FSDP). ``telemetry``: every step is a
    log step (what-if statistics included) read through the runner's protocol, and an eval
    forward follows it."""
    from fp8lab.telemetry.step import StepTelemetry

    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    opt = torch.optim.AdamW(model.parameters(), lr=LR, fused=True)
    out = {"losses": [], "states": [], "bytes": [], "stats": []}
    log = StepTelemetry(inner, log_interval=1) if telemetry else None
    for step in range(STEPS):
        x, y = batches(step)
        if log is not None:
            log.begin(True, whatif=True)
        loss = torch.zeros(())
        for xs, ys in zip(x.chunk(micro_batches), y.chunk(micro_batches)):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(xs)  # (B_local, T, V)
            micro = token_loss(logits, ys, BATCH * BLOCK)
            micro.backward()
            loss += micro.detach()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if log is not None:
            stats = log.end(loss=loss).stats
            out["stats"].append([stats.values, stats.whatif, stats.shadow, stats.accum])
            inner.eval()
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                model(x)
            inner.train()
        else:
            fp8lab.update_scales(inner)
        out["losses"].append(loss)
        out["states"].append(states(inner))
        out["bytes"].append(counter.take() if counter is not None else 0)
    if hasattr(inner, "reshard"):  # FSDP2 keeps the root gathered after an eval forward
        inner.reshard()
    out["params"] = {name: whole_tensor(p).detach().clone() for name, p in inner.named_parameters()}
    return out


def expected_bytes(model, chosen: dict) -> int:
    """What one rank receives per step: every parameter whole, at 1 byte an element when it is
    gathered as FP8, else its dtype's; blocks twice (forward, and again for the backward after
    resharding), the root's parameters once (FSDP2 keeps the root unsharded until backward)."""
    total = 0
    for name, p in model.named_parameters():
        layer = name.rsplit(".", 1)[0]
        width = 1 if chosen.get(layer) == "fp8" and name.endswith(".weight") else p.element_size()
        total += p.numel() * width * (2 if name.startswith("blocks.") else 1)
    return total


def gathered_equals_cast(model) -> bool:
    """Each FP8-gathered weight's values == the whole fp32 weight cast with the same scale."""
    from fp8lab.gemm.backends import backend_for

    checked = 0
    for block in model.blocks:
        layers = [m for m in block.modules() if isinstance(m, fp8lab.Linear)]
        whole = {m: whole_tensor(m.weight).detach().clone() for m in layers}
        block.unshard()
        for m in layers:
            w = m.weight
            if not isinstance(w, GatheredFP8Weight):
                continue
            backend = backend_for(m.plan().backend, "cpu")
            scale = w._scale
            ref = backend.quantize(whole[m], scale, m.fp8.scaling.format_for(Role.WEIGHT))
            if not torch.equal(w.values(), ref):
                return False
            checked += 1
        block.reshard()
    return checked > 0


def rank_scenarios(rank: int) -> dict:
    data = sampler()

    def batches(step):
        return data.batch(step, rank, WORLD)

    me = Distributed(rank, WORLD, rank, torch.device("cpu"))
    out = {}
    for name, scaling in RECIPES.items():
        out[name] = {"ddp": train(me.wrap(gpt(scaling)), batches)}
        for fp8_gather in (False, True):
            model = me.shard(gpt(scaling), fp8_all_gather=fp8_gather)
            key = "fsdp_fp8" if fp8_gather else "fsdp_fp32"
            out[name][key] = train(model, batches, counter=model.all_gather_counter)
            out[name][key]["chosen"] = model.fp8_all_gather
            out[name][key]["wrapped"] = sum(isinstance(p._local_tensor, ShardedFP8Weight) for p in model.parameters())
            if fp8_gather:
                out[name]["gathered_equals_cast"] = gathered_equals_cast(model)
    out["head"] = {
        "ddp": train(me.wrap(head_in_fp8()), batches, telemetry=True),
        "fsdp_fp8": train(me.shard(head_in_fp8(), fp8_all_gather=True), batches, telemetry=True),
    }
    return out


def _rank_entry(rank: int, port: int, out_dir: str) -> None:
    with gloo_group(rank, WORLD, port):
        torch.save(rank_scenarios(rank), Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("fsdp_ranks")
    run_ranks(_rank_entry, (free_port(), str(out_dir)), WORLD, SPAWN_TIMEOUT_S, "2-rank gloo run")
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _same(a: dict, b: dict) -> None:
    """Bit-identical runs: every loss, every step's scaling state, every final parameter."""
    assert all(torch.equal(x, y) for x, y in zip(a["losses"], b["losses"]))
    for sa, sb in zip(a["states"], b["states"]):
        assert (sa is None and sb is None) or all(torch.equal(x, y) for x, y in zip(sa, sb))
    assert a["params"].keys() == b["params"].keys()
    for name in a["params"]:
        assert torch.equal(a["params"][name], b["params"][name]), name


@pytest.mark.parametrize("recipe", RECIPES)
def test_scaling_state_is_identical_on_every_rank_after_every_update(ranks, recipe):
    """Rank by rank, step by step: the amax histories and scales every rank holds are equal
    (delayed scaling; the other recipes keep no state), under DDP and both FSDP all-gathers."""
    for mode in ("ddp", "fsdp_fp32", "fsdp_fp8"):
        s0, s1 = ranks[0][recipe][mode]["states"], ranks[1][recipe][mode]["states"]
        assert len(s0) == STEPS
        for a, b in zip(s0, s1):
            assert (a is None) == (recipe != "delayed")
            if a is not None:
                assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("recipe", RECIPES)
def test_fsdp_equals_ddp_bit_for_bit(ranks, recipe):
    """FSDP (fp32 all-gather, and FP8 all-gather) == DDP: losses, scaling state, weights."""
    for r in ranks:
        _same(r[recipe]["fsdp_fp32"], r[recipe]["ddp"])
        _same(r[recipe]["fsdp_fp8"], r[recipe]["ddp"])


@pytest.mark.parametrize("recipe", RECIPES)
def test_fsdp_equals_one_process_accumulating_the_rank_slices(ranks, recipe):
    """2 FSDP ranks == 1 process running the 2 slices as accumulated micro-batches (same GEMM
    shapes, the same single fp32 addition of the two gradients, one MAX of the amaxes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in the ranks
    try:
        ref = train(gpt(RECIPES[recipe]), sampler().batch, micro_batches=WORLD)
    finally:
        torch.set_num_threads(threads)
    fsdp = [r[recipe]["fsdp_fp8"] for r in ranks]
    losses = [a + b for a, b in zip(fsdp[0]["losses"], fsdp[1]["losses"])]  # each rank's share of the mean
    assert all(torch.equal(x, y) for x, y in zip(losses, ref["losses"]))
    _same({**fsdp[0], "losses": ref["losses"]}, ref)


@pytest.mark.parametrize("recipe", ["delayed", "current"])
def test_fp8_all_gather_is_the_cast_of_the_fp32_all_gather(ranks, recipe):
    """Per-tensor recipes: every block weight is gathered as FP8; the gathered values equal the
    whole fp32 weight cast with the same scale, bit for bit (checked directly after training)."""
    for r in ranks:
        chosen = r[recipe]["fsdp_fp8"]["chosen"]
        assert [k for k, v in chosen.items() if v == "fp8"] == [
            f"blocks.{b}.{layer}" for b in range(2) for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")
        ]
        assert chosen["lm_head"].startswith("fp32: its GEMMs run in bf16")  # kept in BF16 by the policy
        assert r[recipe]["fsdp_fp8"]["wrapped"] == 8
        assert r[recipe]["gathered_equals_cast"]


def test_block_recipe_falls_back_to_fp32_all_gather_with_the_reason(ranks):
    for r in ranks:
        chosen = r["block"]["fsdp_fp8"]["chosen"]
        assert all(v.startswith("fp32: ") for v in chosen.values())
        assert "across shard boundaries" in chosen["blocks.0.mlp.fc1"]
        assert r["block"]["fsdp_fp8"]["wrapped"] == 0
        assert r["block"]["fsdp_fp8"]["bytes"] == r["block"]["fsdp_fp32"]["bytes"]


@pytest.mark.parametrize("recipe", ["delayed", "current"])
def test_bytes_all_gathered_per_step_fp32_vs_fp8(ranks, recipe):
    """Counted at FSDP's all-gather call, equal to the count from the parameter sizes and the
    dtypes the pre-all-gather hook returns. Tiny GPT, 2 blocks, 2 ranks (measured here):
    3,451,904 bytes a step in fp32, 1,092,608 with FP8 weights (0.317x; the block weights'
    share drops 4x, embeddings, norms, biases and the BF16 lm_head stay fp32)."""
    model = gpt(RECIPES[recipe])
    for r in ranks:
        fp32, fp8 = r[recipe]["fsdp_fp32"], r[recipe]["fsdp_fp8"]
        assert fp32["bytes"] == [expected_bytes(model, {})] * STEPS
        assert fp8["bytes"] == [expected_bytes(model, fp8["chosen"])] * STEPS
    assert ranks[0][recipe]["fsdp_fp32"]["bytes"][0] == 3_451_904
    assert ranks[0][recipe]["fsdp_fp8"]["bytes"][0] == 1_092_608


def test_telemetry_and_a_root_fp8_layer_equal_ddp(ranks):
    """Every step a log step (cast statistics, what-if, shadow and accumulator SQNRs of every
    layer, read as the runner reads them) with an eval forward after it, the LM head in FP8 at
    the root: FSDP with FP8 all-gather == DDP bit for bit, NaN (not measured) where DDP's is."""
    import numpy as np

    for r in ranks:
        fsdp, ddp = r["head"]["fsdp_fp8"], r["head"]["ddp"]
        _same(fsdp, ddp)
        assert len(fsdp["stats"]) == STEPS
        for got, want in zip(fsdp["stats"], ddp["stats"]):
            assert got[0].keys() == want[0].keys()
            for key in want[0]:
                np.testing.assert_array_equal(got[0][key], want[0][key])
            for a, b in zip(got[1:], want[1:]):
                np.testing.assert_array_equal(a, b)
