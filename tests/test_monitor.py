"""fp8lab.Monitor in a user's own loop writes the tags a recipe writes, read back with
TensorBoard's own reader; between log steps it reads nothing on the host."""

from __future__ import annotations

import re

import pytest
import torch

import fp8lab
from fp8lab import FP8Options
from fp8lab.run.cli import main
from tests.test_run import QUICKSTART, SHORT, _HostReads, _scalars, _sets

PREFIXES = ("scaling/", "accuracy/", "faults/")
LAYER = re.compile(
    r"^(scaling|accuracy|amax_history|faults/nonfinite_amax)/(.+?)/((input|weight|grad_output)(/\w+)?|\w+_sqnr_db|weight_rel_diff)$"
)


def _tags(acc) -> set[str]:
    return {t for t in acc.Tags()["scalars"] if t.startswith(PREFIXES)} | set(acc.Tags()["histograms"])


def _shapes(tags: set[str]) -> set[str]:
    """Tags with the layer name taken out: the same per-layer tags in any model."""
    return {LAYER.sub(r"\1/<layer>/\3", t) for t in tags}


@pytest.fixture(scope="module")
def recipe_fp8(tmp_path_factory):
    out = tmp_path_factory.mktemp("logs")
    assert main(["run", QUICKSTART, "--out", str(out), "--quiet", *_sets(SHORT)]) == 0
    (run_dir,) = (out / "quickstart").iterdir()
    return _scalars(run_dir / "fp8")


def _tiny_gpt(backend: str = "auto") -> fp8lab.GPT:
    torch.manual_seed(0)  # the same initial weights for the FP8 model and its BF16 twin
    return fp8lab.GPT.from_preset("tiny", num_layers=2, block_size=32, fallback="emulated", backend=backend)


def _batch(step: int):
    gen = torch.Generator().manual_seed(step)
    ids = torch.randint(0, 256, (4, 33), generator=gen)
    return ids[:, :-1], ids[:, 1:]


def _train_step(model, opt, step):
    x, y = _batch(step)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
    loss.backward()
    opt.step()
    opt.zero_grad()
    return loss


def test_plain_loop_writes_the_recipe_tags(tmp_path, recipe_fp8, one_thread):
    model, twin = _tiny_gpt(), _tiny_gpt(backend="bf16")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    twin_opt = torch.optim.AdamW(twin.parameters(), lr=1e-3)
    with fp8lab.Monitor(model, tmp_path / "fp8", log_interval=2, reference=twin, histogram_interval=4) as monitor:
        for step in range(4):
            monitor.begin_step()
            loss = _train_step(model, opt, step)
            _train_step(twin, twin_opt, step)
            monitor.end_step(loss=loss)
    acc = _scalars(tmp_path / "fp8")
    assert _tags(acc) == _tags(recipe_fp8)  # the same model: the same tags, layer for layer
    assert [e.step for e in acc.Scalars("scaling/blocks.0.mlp.fc1/input/scale")] == [2, 4]
    assert [e.step for e in acc.Scalars("loss/train")] == [2, 4]
    assert [e.step for e in acc.Images("overview/scaling")] == [2, 4]
    assert (tmp_path / "fp8" / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    assert all(e.value > 0 for e in acc.Scalars("accuracy/blocks.1.attn.qkv/weight_rel_diff"))


def test_no_host_read_between_log_steps(monkeypatch, tmp_path, one_thread):
    """A non-log step with the monitor reads exactly what the same step without it reads
    (the CPU-scalar reads of tests/test_run.py's host-read test), and no shadow GEMM runs."""
    from fp8lab.gemm import shadow

    calls = []
    original = shadow.record
    monkeypatch.setattr(shadow, "record", lambda *a, **k: (calls.append(a[1]), original(*a, **k))[1])
    model = _tiny_gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    monitor = fp8lab.Monitor(model, tmp_path / "fp8", log_interval=3)
    with _HostReads() as bare:
        _train_step(model, opt, 0).detach()
        fp8lab.update_scales(model)
    with _HostReads() as monitored:
        monitor.begin_step(1)
        loss = _train_step(model, opt, 1)
        assert monitor.end_step(loss=loss, skip=~torch.isfinite(loss)) is None
    assert sorted(monitored.reads, key=str) == sorted(bare.reads, key=str) and calls == []
    monitor.begin_step()  # step 3: a log step
    loss = _train_step(model, opt, 2)
    values = monitor.end_step(loss=loss)
    assert values is not None and len(calls) == 3 * 8 and values["faults/skipped_steps"] == 0.0
    monitor.close()


def test_monitor_checks_its_interval(tmp_path):
    with pytest.raises(ValueError, match="log_interval must be an int >= 1"):
        fp8lab.Monitor(torch.nn.Linear(4, 4), tmp_path, log_interval=0)
    with pytest.raises(ValueError, match=r"whatif_interval must be None \(every log step\) or a positive multiple"):
        fp8lab.Monitor(torch.nn.Linear(4, 4), tmp_path, log_interval=2, whatif_interval=3)


def test_whatif_interval_thins_out_the_whatif_statistics_only(tmp_path, one_thread):
    model = _tiny_gpt()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with fp8lab.Monitor(model, tmp_path / "fp8", log_interval=2, whatif_interval=4) as monitor:
        for step in range(4):
            monitor.begin_step()
            monitor.end_step(loss=_train_step(model, opt, step))
    acc = _scalars(tmp_path / "fp8")
    assert [e.step for e in acc.Scalars("scaling/blocks.0.mlp.fc1/input/sqnr_db")] == [2, 4]
    assert [e.step for e in acc.Scalars("whatif/blocks.0.mlp.fc1/input/block/sqnr_db")] == [4]


def test_hf_trainer_callback_writes_the_recipe_tags(tmp_path, recipe_fp8, one_thread):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=256, n_positions=32, bos_token_id=0, eos_token_id=0
    )
    model = fp8lab.convert(transformers.GPT2LMHeadModel(config), fp8=FP8Options(fallback="emulated"))
    monitor = fp8lab.Monitor(model, tmp_path / "tb" / "fp8", log_interval=2, histogram_interval=4)
    data = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 256, (8, 32))]
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        logging_strategy="no",
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data, callbacks=[monitor.hf_callback()])
    trainer.train()
    acc = _scalars(tmp_path / "tb" / "fp8")
    expected = {t for t in _shapes(_tags(recipe_fp8)) if not t.endswith("weight_rel_diff")}  # no BF16 twin here
    assert _shapes(_tags(acc)) == expected
    layers = {LAYER.match(t)[2] for t in _tags(acc) if t.startswith("scaling/")}
    assert layers == {
        f"transformer.h.{i}.{n}" for i in range(2) for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    }
    assert [e.step for e in acc.Scalars("accuracy/transformer.h.0.mlp.c_fc/fprop_sqnr_db")] == [2, 4]
    assert (tmp_path / "tb" / "fp8" / "scaling.png").exists()


def test_lightning_callback_writes_the_recipe_tags(tmp_path, one_thread):
    pl = pytest.importorskip("lightning.pytorch")

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = _tiny_gpt()

        def training_step(self, batch, batch_idx):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.model(x).float().flatten(0, 1), y.flatten())

        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3)

    module = Module()
    monitor = fp8lab.Monitor(module.model, tmp_path / "fp8", log_interval=2, histogram_interval=4)
    loader = torch.utils.data.DataLoader([tuple(t[0] for t in _batch(i)) for i in range(8)], batch_size=2)
    trainer = pl.Trainer(
        max_steps=4,
        accumulate_grad_batches=2,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[monitor.lightning_callback()],
    )
    trainer.fit(module, loader)
    acc = _scalars(tmp_path / "fp8")
    assert [e.step for e in acc.Scalars("scaling/blocks.0.mlp.fc1/input/scale")] == [2, 4]
    assert [e.step for e in acc.Scalars("loss/train")] == [2, 4]
    assert "accuracy/blocks.0.mlp.fc1/wgrad_sqnr_db" in acc.Tags()["scalars"]
