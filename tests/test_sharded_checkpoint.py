"""Sharded (DCP) checkpoints: bit-exact resume under FSDP2, world-size changes, integrity, no pickle code.

Multi-process scenarios run in one spawn per world size (gloo on loopback, 1 thread a rank):
2 ranks train and save; then this process (world size 1) loads that checkpoint and saves its
own; then 2 fresh ranks resume from both; then 4 ranks load the 2-rank one. Each rank saves
what it saw; the tests compare. Integrity tests run in this process on small checkpoints.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import time
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException as DCPException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.tensor import DTensor

import fp8lab
from fp8lab.optim.low_precision_adamw import LowPrecisionAdamW
from fp8lab.run.checkpoint import CheckpointError
from fp8lab.run.distributed import Distributed, token_loss
from fp8lab.run.sharded_checkpoint import (
    list_sharded,
    load_sharded,
    newest_usable_sharded,
    save_sharded,
    verify_sharded,
)
from fp8lab.run.sharded_files import (
    MANIFEST,
    METADATA,
    SafeReader,
    WeightsOnlyLoadPlanner,
    file_digest,
    rank_file,
    read_dcp_metadata,
)
from tests.helpers import free_port, gloo_group, run_ranks

SPAWN_TIMEOUT_S = 120
N_STEPS, M_STEPS = 3, 2  # train N, save, train M
BATCH, BLOCK = 4, 16  # global batch (sequences), sequence length
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")  # DCP's "assuming a single process"


# ---------------------------------------------------------------- shared by ranks and this process
def build() -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    return fp8lab.GPT.from_preset(
        "tiny", fallback="emulated", num_layers=1, block_size=BLOCK, scaling=fp8lab.DelayedScaling(amax_history_len=8)
    )


def optimizer_for(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)


CORPUS = torch.arange(4096) * 7919 % 251  # fixed tokens; the batch positions come from the RNG


def train(model, opt, steps: int, world: int, extra: dict) -> list[torch.Tensor]:
    """``steps`` optimizer steps; each rank draws its sequences with the global CPU generator,
    so the per-rank RNG state must be restored for a resume to be exact."""
    losses = []
    for _ in range(steps):
        starts = torch.randint(0, CORPUS.numel() - BLOCK - 1, (BATCH // world,))
        idx = torch.stack([CORPUS[s : s + BLOCK + 1] for s in starts.tolist()])
        loss = token_loss(model(idx[:, :-1]), idx[:, 1:], BATCH * BLOCK)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        fp8lab.update_scales(model)
        extra["step"] += 1
        extra["data_pos"] += BATCH
        extra["loss_scale"] = extra["loss_scale"] * 0.5
        losses.append(loss.detach())
    return losses


def snapshot(model, opt) -> dict:
    """Whole (all-gathered) copies of the model and optimizer state: parameters, scaling buffers,
    moments, step counters, hyperparameters."""
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))
    flat = {f"model.{k}": v.detach().clone() for k, v in msd.items()}
    for fqn, state in osd["state"].items():
        flat.update({f"optim.{fqn}.{k}": v.detach().clone() for k, v in state.items()})
    flat["param_groups"] = [{k: v for k, v in g.items() if k != "params"} for g in osd["param_groups"]]
    return flat


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def scaling_state(model) -> torch.Tensor:
    found = fp8lab.scaling.update.scaling_states(model)
    return torch.cat([torch.cat([s.amax_history.flatten(), s.scale]) for s in found])


def fresh_extra() -> dict:
    return {"step": 0, "data_pos": 0, "loss_scale": torch.tensor(2.0**16), "note": ["plain", ("values",)]}


# ---------------------------------------------------------------- what each rank runs
def scenario_train_and_save(rank: int, world: int, root: Path) -> dict:
    out = {}
    model = build()
    model = Distributed(rank, world, rank, torch.device("cpu")).shard(model)
    opt = optimizer_for(model)
    torch.manual_seed(100 + rank)  # a different data stream per rank
    extra = fresh_extra()
    train(model, opt, N_STEPS, world, extra)

    history = fp8lab.scaling.update.scaling_states(model)[0].amax_history
    kept = history.clone()
    if rank == 1:  # ranks disagree on a replicated buffer: refused on every rank, nothing written
        history.add_(1.0)
    try:
        save_sharded(root / "refused", N_STEPS, model, opt, extra, keep=2)
    except CheckpointError as err:
        out["refused"] = str(err)
    history.copy_(kept)

    out["saved"] = snapshot(model, opt)
    out["rng_at_save"] = torch.get_rng_state()
    out["extra_at_save"] = {**extra}
    start = time.perf_counter()
    path = save_sharded(root / "run2", N_STEPS, model, opt, extra, keep=2)
    out["save_s"] = time.perf_counter() - start
    out["files"] = {p.name: p.stat().st_size for p in path.iterdir()}
    out["losses"] = train(model, opt, M_STEPS, world, extra)
    out["final"] = snapshot(model, opt)
    out["scaling"] = scaling_state(model)

    # FP8/FP16 moments (LowPrecisionAdamW) under FSDP2, same world size: this rank's shards
    # (gloo cannot all-gather float8, so no whole snapshot here)
    model, opt = Distributed(rank, world, rank, torch.device("cpu")).shard(build()), None
    opt = LowPrecisionAdamW(model.parameters(), lr=1e-2, exp_avg_dtype="fp8", exp_avg_sq_dtype="fp16")
    train(model, opt, 1, world, fresh_extra())
    out["lp_saved"] = local_shards(model, opt)
    path = save_sharded(root / "lp", 1, model, opt, {}, keep=1)
    model = Distributed(rank, world, rank, torch.device("cpu")).shard(build())
    opt = LowPrecisionAdamW(model.parameters(), lr=1e-2, exp_avg_dtype="fp8", exp_avg_sq_dtype="fp16")
    load_sharded(path, model, opt)
    out["lp_loaded"] = local_shards(model, opt)
    return out


def local_shards(model, opt) -> dict:
    """This rank's shards of the model and optimizer state (DTensors' local tensors)."""
    msd, osd = get_state_dict(model, opt)
    flat = {f"model.{k}": v for k, v in msd.items()}
    for fqn, state in osd["state"].items():
        flat.update({f"optim.{fqn}.{k}": v for k, v in state.items()})
    return {k: (v.to_local() if isinstance(v, DTensor) else v).detach().clone() for k, v in flat.items()}


def load_into_sharded(rank: int, world: int, path: Path) -> tuple:
    model = build()
    model = Distributed(rank, world, rank, torch.device("cpu")).shard(model)
    opt = optimizer_for(model)
    torch.manual_seed(12345)  # whatever it is, the load replaces it
    start = time.perf_counter()
    extra = load_sharded(path, model, opt)
    return model, opt, extra, time.perf_counter() - start


def scenario_resume(rank: int, world: int, root: Path, runs=(("from2", "run2"), ("from1", "run1"))) -> dict:
    out = {}
    for name, run in runs:
        model, opt, extra, load_s = load_into_sharded(
            rank, world, root / run / "checkpoints" / f"step_{N_STEPS:08d}.dcp"
        )
        out[name] = {
            "load_s": load_s,
            "extra": {**extra},
            "rng": torch.get_rng_state(),
            "loaded": snapshot(model, opt),
            "scaling_loaded": scaling_state(model),
        }
        out[name]["losses"] = train(model, opt, M_STEPS, world, extra)
        out[name]["final"] = snapshot(model, opt)
        out[name]["scaling"] = scaling_state(model)
    damaged = root / "damaged2" / "checkpoints" / f"step_{N_STEPS:08d}.dcp"
    if damaged.exists():  # only rank 1 reads the damaged file: rank 0 must fail as well
        try:
            load_into_sharded(rank, world, damaged)
        except CheckpointError as err:
            out["damaged"] = str(err)
    return out


SCENARIOS = {
    "train_and_save": scenario_train_and_save,
    "resume": scenario_resume,
    "resume_from2": lambda rank, world, root: scenario_resume(rank, world, root, (("from2", "run2"),)),
}


def _rank_entry(rank: int, world: int, port: int, scenario: str, root: str) -> None:
    warnings.simplefilter("ignore")
    with gloo_group(rank, world, port):
        out = SCENARIOS[scenario](rank, world, Path(root))
        torch.save(out, Path(root) / f"{scenario}_w{world}_rank{rank}.pt")


def spawn(scenario: str, world: int, root: Path) -> list[dict]:
    what = f"{world}-rank run {scenario}"
    run_ranks(_rank_entry, (world, free_port(), scenario, str(root)), world, SPAWN_TIMEOUT_S, what)
    return [torch.load(root / f"{scenario}_w{world}_rank{r}.pt", weights_only=False) for r in range(world)]


# ---------------------------------------------------------------- fixtures: run once per module
@pytest.fixture(scope="module", autouse=True)
def one_thread_module():
    """One intra-op thread in this process, as in the ranks (see conftest's ``one_thread``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("sharded")


@pytest.fixture(scope="module")
def two_ranks(root) -> list[dict]:
    return spawn("train_and_save", 2, root)


@pytest.fixture(scope="module")
def one_process(root, two_ranks) -> dict:
    """World size 1 in this process: load the 2-rank checkpoint (2 -> 1), then train and save its own."""
    rng = torch.get_rng_state()
    try:
        out = {}
        model = build()
        opt = optimizer_for(model)
        out["extra"] = load_sharded(root / "run2" / "checkpoints" / f"step_{N_STEPS:08d}.dcp", model, opt)
        out["rng"] = torch.get_rng_state()
        out["loaded"] = snapshot(model, opt)
        out["losses"] = train(model, opt, M_STEPS, 1, out["extra"])

        model = build()
        opt = optimizer_for(model)
        torch.manual_seed(100)
        extra = fresh_extra()
        train(model, opt, N_STEPS, 1, extra)
        out["saved1"] = snapshot(model, opt)
        out["rng1"] = torch.get_rng_state()
        path = save_sharded(root / "run1", N_STEPS, model, opt, extra, keep=2)
        out["files1"] = {p.name: p.stat().st_size for p in path.iterdir()}
        return out
    finally:
        torch.set_rng_state(rng)


@pytest.fixture(scope="module")
def resumed(root, two_ranks, one_process) -> list[dict]:
    shutil.copytree(root / "run2", root / "damaged2")
    shard = root / "damaged2" / "checkpoints" / f"step_{N_STEPS:08d}.dcp" / "__0_0.distcp"
    flip_byte(shard, shard.stat().st_size // 2)
    return spawn("resume", 2, root)


# ---------------------------------------------------------------- resume and world sizes
def test_resume_at_the_same_world_size_is_bit_exact(two_ranks, resumed):
    """Train N, save, train M == train N, save, (new processes) load, train M: every loss,
    parameter, moment, step counter and scaling buffer bit-identical on both ranks."""
    for r in range(2):
        new = resumed[r]["from2"]
        assert_identical(new["loaded"], two_ranks[r]["saved"])
        assert torch.equal(torch.stack(new["losses"]), torch.stack(two_ranks[r]["losses"]))
        assert_identical(new["final"], two_ranks[r]["final"])
        assert torch.equal(new["scaling"], two_ranks[r]["scaling"])
    assert not torch.equal(two_ranks[0]["final"]["model.tok_emb.weight"], two_ranks[0]["saved"]["model.tok_emb.weight"])


def test_each_rank_gets_its_own_rng_state_and_extra_back(two_ranks, resumed):
    for r in range(2):
        new, old = resumed[r]["from2"], two_ranks[r]
        assert torch.equal(new["rng"], old["rng_at_save"])
        assert new["extra"]["step"] == N_STEPS and new["extra"]["data_pos"] == N_STEPS * BATCH
        assert torch.equal(new["extra"]["loss_scale"], old["extra_at_save"]["loss_scale"])
        assert new["extra"]["note"] == ["plain", ("values",)]
    assert not torch.equal(two_ranks[0]["rng_at_save"], two_ranks[1]["rng_at_save"])  # so the check means something


def test_scaling_state_round_trips_and_is_identical_on_every_rank(two_ranks, resumed):
    saved = two_ranks[0]["saved"]
    keys = [k for k in saved if k.endswith(("amax_history", ".scale"))]
    assert len(keys) == 2 * len(fp8lab.scaling.update.scaling_states(build()))
    assert any(saved[k].ne(1).any() for k in keys if k.endswith(".scale"))  # scales were updated: not the init
    for r in range(2):
        for case in ("from2", "from1"):
            assert torch.equal(resumed[r][case]["scaling_loaded"], resumed[0][case]["scaling_loaded"])
            assert torch.equal(resumed[r][case]["scaling"], resumed[0][case]["scaling"])


def test_ranks_with_different_replicated_state_are_refused(two_ranks, root):
    for r in range(2):
        assert "replicated tensors differ between ranks" in two_ranks[r]["refused"]
        assert "amax_history" in two_ranks[r]["refused"]
    assert list_sharded(root / "refused") == []


def test_a_file_one_rank_checks_is_refused_on_every_rank(resumed):
    """Ranks share the digest checks (sorted files, every world-th): rank 1 reads __0_0.distcp."""
    for r in range(2):
        assert "__0_0.distcp is corrupt" in resumed[r]["damaged"]


def test_two_ranks_to_one_process_loads_the_saved_state_exactly(two_ranks, one_process):
    assert_identical(one_process["loaded"], two_ranks[0]["saved"])
    assert torch.equal(one_process["rng"], two_ranks[0]["rng_at_save"])  # rank 0's; rank 1's is dropped
    assert all(torch.isfinite(loss) for loss in one_process["losses"])


def test_one_process_to_two_ranks_loads_the_saved_state_exactly(one_process, resumed):
    for r in range(2):
        new = resumed[r]["from1"]
        assert_identical(new["loaded"], one_process["saved1"])
        assert new["extra"]["step"] == N_STEPS
        assert all(torch.isfinite(loss) for loss in new["losses"])
    assert torch.equal(resumed[0]["from1"]["rng"], one_process["rng1"])
    # rank 1 was not saved: a generator seeded from rank 0's state, not rank 0's state itself
    assert not torch.equal(resumed[1]["from1"]["rng"], one_process["rng1"])


@pytest.mark.slow  # 4 processes on a 2-core machine: about 25 s
def test_two_ranks_to_four_ranks(root, two_ranks, resumed):
    four = spawn("resume_from2", 4, root)
    for r in range(4):
        assert_identical(four[r]["from2"]["loaded"], two_ranks[0]["saved"])
        assert torch.equal(four[r]["from2"]["scaling"], four[0]["from2"]["scaling"])
        assert all(torch.isfinite(loss) for loss in four[r]["from2"]["losses"])
    for r in range(2):
        assert torch.equal(four[r]["from2"]["rng"], two_ranks[r]["rng_at_save"])
    rngs = [four[r]["from2"]["rng"] for r in range(4)]
    assert all(not torch.equal(rngs[a], rngs[b]) for a in range(4) for b in range(a + 1, 4))
    assert four[3]["from2"]["extra"]["data_pos"] == two_ranks[0]["extra_at_save"]["data_pos"]


def test_layout_one_shard_file_per_rank(two_ranks, one_process):
    files = two_ranks[0]["files"]
    assert sorted(files) == sorted([METADATA, MANIFEST, "__0_0.distcp", "__1_0.distcp", rank_file(0), rank_file(1)])
    whole = one_process["files1"]["__0_0.distcp"]
    # each rank's shard file holds about half the state (+ small replicated tensors on one rank)
    assert files["__0_0.distcp"] + files["__1_0.distcp"] < 1.1 * whole
    assert max(files["__0_0.distcp"], files["__1_0.distcp"]) < 0.7 * whole


# ---------------------------------------------------------------- integrity (one process)
@pytest.fixture(scope="module")
def two_saves(tmp_path_factory) -> Path:
    """A run folder with sharded checkpoints of steps 1 and 2 (one process)."""
    run = tmp_path_factory.mktemp("integrity")
    model = build()
    opt = optimizer_for(model)
    extra = fresh_extra()
    for step in (1, 2):
        train(model, opt, 1, 1, extra)
        save_sharded(run, step, model, opt, extra, keep=3)
    return run


@pytest.fixture
def run(two_saves, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(two_saves, copy)
    return copy


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / f"step_{step:08d}.dcp"


def load_fresh(path: Path) -> dict:
    model = build()
    return load_sharded(path, model, optimizer_for(model), restore_rng=False)


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


DAMAGES = {
    "flipped bit in a shard": ("__0_0.distcp", lambda p: flip_byte(p, p.stat().st_size // 2), "corrupt"),
    "truncated shard": ("__0_0.distcp", lambda p: os.truncate(p, p.stat().st_size - 10), "truncated"),
    "missing shard": ("__0_0.distcp", lambda p: p.unlink(), "does not exist"),
    "flipped bit in metadata": (METADATA, lambda p: flip_byte(p, 40), "corrupt"),
    "truncated rank file": (rank_file(0), lambda p: os.truncate(p, 100), "truncated"),
    "missing manifest": (MANIFEST, lambda p: p.unlink(), "does not exist"),
    "truncated manifest": (MANIFEST, lambda p: os.truncate(p, 50), "truncated or corrupt"),
    "manifest is a folder": (MANIFEST, lambda p: (p.unlink(), p.mkdir()), "a folder"),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damage_is_refused_naming_the_file_and_the_older_one_is_offered(run, damage):
    name, do, words = DAMAGES[damage]
    newest = step_dir(run, 2)
    verify_sharded(newest)  # intact before the damage
    do(newest / name)
    where = re.escape(str(newest / name))
    with pytest.raises(CheckpointError, match=f"{where}.*{words}|{words}.*{where}"):
        load_fresh(newest)
    path, refused = newest_usable_sharded(run)
    assert path == step_dir(run, 1)
    assert [p for p, _ in refused] == [newest] and str(newest / name) in refused[0][1]


def test_a_manifest_digest_that_does_not_match_names_the_file(run):
    newest = step_dir(run, 2)
    manifest = json.loads((newest / MANIFEST).read_text())
    entry = manifest["files"]["__0_0.distcp"]
    entry["sha256"] = entry["sha256"][:-1] + ("0" if entry["sha256"][-1] != "0" else "1")
    (newest / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="__0_0.distcp is corrupt"):
        verify_sharded(newest)


def test_a_rank_file_of_another_step_is_refused_even_with_a_matching_manifest(run):
    newest = step_dir(run, 2)
    shutil.copy(step_dir(run, 1) / rank_file(0), newest / rank_file(0))
    manifest = json.loads((newest / MANIFEST).read_text())
    size, digest = file_digest(newest / rank_file(0))
    manifest["files"][rank_file(0)] = {"bytes": size, "sha256": digest}
    (newest / MANIFEST).write_text(json.dumps(manifest))
    verify_sharded(newest)  # every digest matches: only the content check can catch it
    with pytest.raises(CheckpointError, match="is not the rank file this checkpoint needs"):
        load_fresh(newest)


def test_no_usable_checkpoint_lists_every_damage(run):
    for step in (1, 2):
        (step_dir(run, step) / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="step_00000002.*step_00000001.*No sharded checkpoint is usable"):
        newest_usable_sharded(run)


def test_leftover_tmp_folder_is_ignored_and_removed_by_the_next_save(run):
    folder = run / "checkpoints"
    leftover = folder / "step_00000003.dcp.tmp-99999"  # a save killed before its rename
    shutil.copytree(step_dir(run, 2), leftover)
    (folder / "step_00000001.dcp.replaced-4242").mkdir()
    assert [s for s, _ in list_sharded(run)] == [1, 2]
    assert newest_usable_sharded(run) == (step_dir(run, 2), [])
    model = build()
    opt = optimizer_for(model)
    extra = load_sharded(step_dir(run, 2), model, opt)
    save_sharded(run, 3, model, opt, extra, keep=2)
    assert sorted(p.name for p in folder.iterdir()) == ["step_00000002.dcp", "step_00000003.dcp"]


def test_a_save_that_fails_before_its_rename_leaves_the_old_set(run, monkeypatch):
    import fp8lab.run.sharded_checkpoint as sc

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(sc, "write_manifest", disk_full)
    model = build()
    opt = optimizer_for(model)
    with pytest.raises(CheckpointError, match="No space left"):
        save_sharded(run, 3, model, opt, fresh_extra(), keep=1)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000001.dcp", "step_00000002.dcp"]
    assert newest_usable_sharded(run) == (step_dir(run, 2), [])


def test_saving_a_step_again_replaces_it_and_keep_prunes(run):
    model = build()
    opt = optimizer_for(model)
    extra = load_sharded(step_dir(run, 1), model, opt)
    extra["note"] = "second time"
    save_sharded(run, 2, model, opt, extra, keep=1)
    assert [s for s, _ in list_sharded(run)] == [2]
    assert load_fresh(step_dir(run, 2))["note"] == "second time"


# ---------------------------------------------------------------- nothing pickled runs
class Evil:
    """Unpickling it creates a marker file (stands for any code a forged pickle could run)."""

    marker: Path

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_extra_is_stored_for_weights_only_loading(two_saves, tmp_path):
    payload = torch.load(step_dir(two_saves, 2) / rank_file(0), weights_only=True)
    assert payload["extra"]["step"] == 2 and payload["rng"]["cpu"].dtype == torch.uint8
    model = build()
    with pytest.raises(TypeError, match=r"extra\['bad'\] is a .*Evil"):
        save_sharded(tmp_path, 1, model, None, {"bad": Evil(tmp_path / "x")}, keep=1)
    assert list_sharded(tmp_path) == []


def test_forged_metadata_pickle_is_refused_without_running_it(run, tmp_path):
    """A ``.metadata`` holding another class (and a manifest forged to match it): fp8lab's
    reader refuses it; DCP's own reader runs it (so this test can fail)."""
    newest = step_dir(run, 2)
    marker = tmp_path / "pwned"
    (newest / METADATA).write_bytes(pickle.dumps(Evil(marker)))
    manifest = json.loads((newest / MANIFEST).read_text())
    size, digest = file_digest(newest / METADATA)
    manifest["files"][METADATA] = {"bytes": size, "sha256": digest}
    (newest / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"pathlib.Path.touch|not DCP metadata"):
        load_fresh(newest)
    assert not marker.exists()
    with pytest.raises(DCPException):  # DCP's reader ran the pickle, then failed on what it returned
        dcp.load({"x": torch.zeros(1)}, storage_reader=dcp.FileSystemReader(str(newest)))
    assert marker.exists()


def test_non_tensor_values_load_weights_only(tmp_path):
    """DCP stores non-tensor values with torch.save; its planner loads them with
    weights_only=False, fp8lab's with weights_only=True."""
    folder, marker = tmp_path / "ckpt", tmp_path / "pwned"
    dcp.save({"obj": Evil(marker), "lr": 0.5}, storage_writer=dcp.FileSystemWriter(str(folder)))
    files = {p.name: file_digest(p) for p in folder.iterdir()}
    manifest = {"files": {n: {"bytes": s, "sha256": d} for n, (s, d) in files.items()}}
    state = {"obj": None, "lr": 0.0}
    metadata = read_dcp_metadata(folder, manifest)
    with pytest.raises(DCPException, match="Weights only load failed"):
        dcp.load(state, storage_reader=SafeReader(folder, metadata), planner=WeightsOnlyLoadPlanner())
    assert not marker.exists()
    dcp.load(state, storage_reader=SafeReader(folder, metadata), planner=DefaultLoadPlanner())
    assert marker.exists()


def test_low_precision_adamw_shards_round_trip_under_fsdp2(two_ranks):
    for r in range(2):
        saved, loaded = two_ranks[r]["lp_saved"], two_ranks[r]["lp_loaded"]
        assert any(v.dtype == torch.float8_e4m3fn for v in saved.values())
        assert_identical(loaded, saved)


def test_low_precision_adamw_state_round_trips_with_its_dtypes(tmp_path):
    model = build()
    opt = LowPrecisionAdamW(model.parameters(), lr=1e-2, exp_avg_dtype="fp8", exp_avg_sq_dtype="fp16")
    train(model, opt, 1, 1, fresh_extra())  # one step: FP8 moments are slow to quantize on CPU
    saved = snapshot(model, opt)
    assert any(v.dtype == torch.float8_e4m3fn for v in saved.values() if isinstance(v, torch.Tensor))
    path = save_sharded(tmp_path, 2, model, opt, {}, keep=1)
    model2 = build()
    opt2 = LowPrecisionAdamW(model2.parameters(), lr=1e-2, exp_avg_dtype="fp8", exp_avg_sq_dtype="fp16")
    load_sharded(path, model2, opt2, restore_rng=False)
    assert_identical(snapshot(model2, opt2), saved)
