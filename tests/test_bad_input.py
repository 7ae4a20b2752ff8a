"""Bad input of every kind exits with code 2, names the problem, and writes nothing."""

from __future__ import annotations

import shutil

import pytest
import torch

from fp8lab.run.cli import main
from fp8lab.run.digest import sealed
from tests.helpers import QUICKSTART, RECIPE_HEADER, TINY

RECIPES = {  # recipe file body -> the message it must produce
    "no_config": ("x = 1\n", "must define a function config()"),
    "wrong_type": ("def config():\n    return {'steps': 3}\n", "returned dict, not a RunConfig"),
    "syntax": ("def config(:\n", "failed to load: SyntaxError"),
    "bad_precision": (
        "def config():\n    return RunConfig(name='r', variants=(Variant(name='bf16', precision='bf16'), "
        "Variant(name='x', precision='fp4')))\n",
        "variants.x.precision must be one of",
    ),
    "negative_steps": (
        "def config():\n    return RunConfig(name='r', train=TrainConfig(steps=-5))\n",
        "train.steps must be an int >= 1",
    ),
    "bad_margin": (
        "def config():\n    return RunConfig(name='r', variants=(Variant(name='bf16', precision='bf16'), "
        "Variant(name='f', scaling=DelayedScaling(margin=-1))))\n",
        "margin must be an int >= 0",
    ),
    "backend_typo": (
        "def config():\n    return RunConfig(name='r', variants=(Variant(name='bf16', precision='bf16'), "
        "Variant(name='f', backend='emulted')))\n",
        "variants.f.backend must be one of",
    ),
    "duplicate_variants": (
        "def config():\n    return RunConfig(name='r', variants=(Variant(name='bf16', precision='bf16'), "
        "Variant(name='bf16')))\n",
        "variants must be a non-empty tuple with unique names",
    ),
    "baseline_not_bf16": (
        "def config():\n    return RunConfig(name='r', baseline='f', variants=(Variant(name='bf16', "
        "precision='bf16'), Variant(name='f')))\n",
        "baseline must be a variant with precision 'bf16'",
    ),
    "lr_float_as_str": (
        "def config():\n    return RunConfig(name='r', train=TrainConfig(lr='0.1'))\n",
        "train.lr must be a float >= 0",
    ),
    "unknown_preset": (
        "def config():\n    return RunConfig(name='r', model=ModelConfig(preset='gpt5'))\n",
        "model.preset must be one of",
    ),
}


@pytest.mark.parametrize("case", sorted(RECIPES))
def test_bad_recipe_file(tmp_path, capsys, case):
    body, message = RECIPES[case]
    recipe = tmp_path / f"{case}.py"
    recipe.write_text(RECIPE_HEADER + body)
    out = tmp_path / "logs"
    assert main(["run", str(recipe), "--out", str(out), "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_missing_recipe_file(tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.py"), "--out", str(tmp_path / "logs")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _data_file(tmp_path, kind):
    if kind == "odd_tokens":
        path = tmp_path / "t.bin"
        path.write_bytes(b"\x01\x00" * 800 + b"\x07")
        return f"tokens:{path}", "is not a whole number of uint16 tokens"
    if kind == "too_small":
        path = tmp_path / "small.txt"
        path.write_text("tiny")
        return f"text:{path}", "at least 1024 are needed"
    if kind == "missing":
        return f"text:{tmp_path / 'none.txt'}", "no such file"
    if kind == "vocab":
        path = tmp_path / "big.bin"
        path.write_bytes(torch.arange(2000, dtype=torch.int16).numpy().tobytes())
        return f"tokens:{path}", "has vocab_size 256"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["odd_tokens", "too_small", "missing", "vocab"])
def test_bad_data_source(tmp_path, capsys, kind):
    source, message = _data_file(tmp_path, kind)
    out = tmp_path / "logs"
    code = main(["run", str(QUICKSTART), "--out", str(out), "--quiet", "--set", f"data.source={source}"])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def _sets(pairs):
    return [a for p in pairs for a in ("--set", p)]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("logs")
    assert main(["run", str(QUICKSTART), "--out", str(out), "--quiet", *_sets(TINY)]) == 0
    (run_dir,) = (out / "quickstart").iterdir()
    return run_dir


def _damaged_copy(finished_run, tmp_path, damage):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    newest = sorted((run_dir / "checkpoints").glob("step_*.pt"))[-1]
    if damage == "truncated":
        newest.write_bytes(newest.read_bytes()[:5000])
    elif damage == "garbage":
        newest.write_bytes(b"not a checkpoint at all" * 100)
    elif damage == "foreign":
        torch.save({"weights": torch.ones(3)}, newest)
    elif damage == "no_scaling_state":
        payload = torch.load(newest, weights_only=True)
        model = payload["variants"]["fp8"]["model"]
        for key in [k for k in model if "fp8_state" in k]:
            del model[key]
        torch.save(sealed(payload), newest)  # a consistent file without scaling state, not a damaged one
    elif damage == "no_checkpoints":
        shutil.rmtree(run_dir / "checkpoints")
    elif damage == "not_a_run":
        (run_dir / "config.json").unlink()
    return run_dir


CHECKPOINTS = {
    "truncated": "is truncated or corrupt",
    "garbage": "is truncated or corrupt",
    "foreign": "is not an fp8lab run checkpoint",
    "no_scaling_state": "has no FP8 scaling state for",
    "no_checkpoints": "has no checkpoints",
    "not_a_run": "not a run folder",
}


@pytest.mark.parametrize("damage", sorted(CHECKPOINTS))
def test_bad_checkpoint(finished_run, tmp_path, capsys, damage):
    run_dir = _damaged_copy(finished_run, tmp_path, damage)
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    code = main(["run", str(QUICKSTART), "--quiet", *_sets(TINY), "--resume", str(run_dir)])
    err = capsys.readouterr().err
    assert code == 2 and CHECKPOINTS[damage] in err, err
    if damage in ("truncated", "garbage", "foreign", "no_scaling_state"):
        assert "step_00000002.pt" in err and "An older intact checkpoint exists" in err and "step_00000001.pt" in err
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*")) == before  # nothing written


def test_checkpoint_of_another_config(finished_run, capsys):
    code = main(["run", str(QUICKSTART), "--quiet", *_sets(TINY + ["fp8.margin=1"]), "--resume", str(finished_run)])
    err = capsys.readouterr().err
    assert code == 2 and "was written for another config" in err and "margin: checkpoint 0, now 1" in err
