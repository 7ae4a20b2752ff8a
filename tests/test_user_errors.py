"""Every mistake a user can make gets one clear answer, and no fault loses or mixes up a run.

One table: each case is an input (a --set, a recipe file, a folder, a fault injected
into the run), the exit code and the message it must produce, and what must be on disk
afterwards: nothing written (the watched folder is byte-for-byte as before), or, for
faults during training, a saved state that is intact and resumable. The existing 35
bad-input cases live in test_bad_input.py and test_run.py (BAD_OVERRIDES).

Permission cases run the CLI in a subprocess as an unprivileged user (root reads and
writes everything); the disk-full cases mount a small tmpfs. Both skip with the reason
where the machine does not allow it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from fp8lab.run import checkpoint as ckpt
from fp8lab.run import checkpoint_size
from fp8lab.run.cli import main
from tests.helpers import QUICKSTART, RECIPE_HEADER, ROOT, TINY

NOBODY = 65534


@dataclass
class Ctx:
    """What a case's setup gets and fills in."""

    base: Path  # a scratch folder (readable by the unprivileged user in as_user cases)
    monkeypatch: pytest.MonkeyPatch
    finished_run: Path  # a finished TINY run to copy
    argv: list[str] = field(default_factory=list)
    watched: Path | None = None  # must be unchanged afterwards (None: base / "logs")
    expect: list[str] = field(default_factory=list)  # more substrings the message must hold
    data: dict = field(default_factory=dict)
    cleanups: list[Callable[[], None]] = field(default_factory=list)  # run after the case, pass or fail

    def run(self, *sets: str, recipe: str = QUICKSTART, out: Path | None = None) -> list[str]:
        out = out if out is not None else self.base / "logs"
        return ["run", recipe, "--out", str(out), "--quiet", *(a for s in [*TINY, *sets] for a in ("--set", s))]

    def recipe(self, body: str) -> str:
        path = self.base / "recipe.py"
        path.write_text(RECIPE_HEADER + body)
        path.chmod(0o644)
        return str(path)

    def run_copy(self) -> Path:
        run_dir = self.base / "run"
        shutil.copytree(self.finished_run, run_dir)
        return run_dir


@dataclass(frozen=True)
class Case:
    setup: Callable[[Ctx], None]  # fills ctx.argv (and ctx.watched, ctx.expect)
    code: int
    message: str
    as_user: bool = False  # run as an unprivileged user, in a subprocess
    after: Callable[[Ctx, str], None] | None = None  # saved state checks, instead of "nothing written"
    needs: str = ""  # "tmpfs", "no_cuda"


def _sets(ctx: Ctx, *sets: str):
    ctx.argv = ctx.run(*sets)


def _recipe(body: str):
    def setup(ctx: Ctx):
        ctx.argv = ctx.run(recipe=ctx.recipe(body))

    return setup


def _report(make):
    def setup(ctx: Ctx):
        run_dir = ctx.run_copy()
        make(run_dir)
        ctx.argv, ctx.watched = ["report", str(run_dir)], run_dir

    return setup


def _damage_events(run_dir: Path) -> None:
    for path in (run_dir / "fp8").glob("events.out.tfevents.*"):
        path.write_bytes(os.urandom(2000))


# --- setups that need more than a --set ------------------------------------------------


def _te_without_te(ctx: Ctx):
    """A Hopper GPU without Transformer Engine, as backend selection sees it."""
    import fp8lab.layers.linear
    from fp8lab.gemm.backends.select import DeviceFacts, TEFacts

    ctx.monkeypatch.setattr(
        fp8lab.layers.linear, "probe_device", lambda device: DeviceFacts("cuda", (9, 0), "NVIDIA H100")
    )
    ctx.monkeypatch.setattr(
        fp8lab.layers.linear, "probe_te", lambda: TEFacts(None, "transformer_engine is not installed")
    )
    ctx.argv = ctx.run("variants.fp8.backend=te")


def _data_folder(ctx: Ctx):
    ctx.argv = ctx.run(f"data.source=text:{ctx.base}")


def _nproc_indivisible(ctx: Ctx):
    ctx.argv = ctx.run("train.batch_size=3") + ["--nproc", "2"]


def _recipe_is_folder(ctx: Ctx):
    ctx.argv = ctx.run(recipe=str(ctx.base))


def _out_is_file(ctx: Ctx):
    (ctx.base / "file").write_text("x")
    ctx.argv, ctx.watched = ctx.run(out=ctx.base / "file"), ctx.base


def _out_under_file(ctx: Ctx):
    (ctx.base / "file").write_text("x")
    ctx.argv, ctx.watched = ctx.run(out=ctx.base / "file" / "logs"), ctx.base


def _signal_while_loading(ctx: Ctx):
    import fp8lab.run.runner as runner

    real = runner.load_corpus

    def load_corpus(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    ctx.monkeypatch.setattr(runner, "load_corpus", load_corpus)
    ctx.argv = ctx.run()


def _signal_during_final_checkpoint(ctx: Ctx):
    real = ckpt.save_checkpoint

    def save(run_dir, step, payload, keep):
        if step == 2:  # the final one (train.steps=2)
            os.kill(os.getpid(), signal.SIGTERM)
        return real(run_dir, step, payload, keep)

    ctx.monkeypatch.setattr(ckpt, "save_checkpoint", save)
    ctx.argv = ctx.run()


def _signal_during_summary(ctx: Ctx):
    from fp8lab.run import storage

    real = storage.write_atomic

    def write(path, text):
        if path.name == "summary.json":
            os.kill(os.getpid(), signal.SIGINT)
        return real(path, text)

    ctx.monkeypatch.setattr(storage, "write_atomic", write)
    ctx.argv = ctx.run()


def _finished_intact(ctx: Ctx, err: str) -> None:
    (run_dir,) = (ctx.base / "logs" / "quickstart").iterdir()
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [1, 2]
    ckpt.read_checkpoint(run_dir / "checkpoints" / "step_00000002.pt")
    assert not list(run_dir.rglob("*.tmp*"))


LOCK_HOLDER = """
import sys
from fp8lab.run.lock import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
sys.stdin.readline()
"""


def _second_writer(ctx: Ctx):
    run_dir = ctx.run_copy()
    holder = subprocess.Popen(
        [sys.executable, "-c", LOCK_HOLDER, str(run_dir)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert holder.stdout.readline().strip() == "locked"
    ctx.cleanups.append(lambda: (holder.stdin.close(), holder.wait(timeout=30)))
    ctx.argv = ctx.run() + ["--resume", str(run_dir)]
    ctx.watched = run_dir
    ctx.expect = [f"in use by process {holder.pid}", f"kill -TERM {holder.pid}"]


def _mount_tmpfs(ctx: Ctx, size: int) -> Path:
    mount = ctx.base / "tmpfs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mount)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(
            f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}): the disk-full case needs one"
        )
    ctx.data["mount"] = mount
    ctx.cleanups.append(lambda: subprocess.run(["umount", "-l", str(mount)], check=False))  # -l: even if busy
    return mount


def _checkpoint_size(*sets: str) -> int:
    from fp8lab.run.overrides import apply_overrides
    from fp8lab.run.recipe_file import load_recipe

    return checkpoint_size.checkpoint_bytes(apply_overrides(load_recipe(QUICKSTART), TINY + list(sets)))


def _disk_full(ctx: Ctx):
    """Room for one checkpoint (and the event files), not for two: the second write fails."""
    sets = ("train.steps=3", "train.keep_checkpoints=1")
    mount = _mount_tmpfs(ctx, int(1.5 * _checkpoint_size(*sets)) + 2**18)
    ctx.argv = ctx.run(*sets, out=mount / "logs")
    ctx.data["sets"] = sets


def _disk_full_resumes(ctx: Ctx, err: str) -> None:
    mount = ctx.data["mount"]
    (run_dir,) = (mount / "logs" / "quickstart").iterdir()
    assert f"newest intact checkpoint is {run_dir / 'checkpoints' / 'step_00000001.pt'}" in err
    assert f"resume with: fp8lab run {QUICKSTART}" in err and f"--resume {run_dir}" in err
    assert not list(run_dir.rglob("*.tmp*"))  # the partial checkpoint was removed
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [1]
    ckpt.read_checkpoint(run_dir / "checkpoints" / "step_00000001.pt")  # intact
    subprocess.run(["mount", "-o", "remount,size=64m", str(mount)], check=True)  # space freed
    assert main(ctx.run(*ctx.data["sets"], out=mount / "logs") + ["--resume", str(run_dir)]) == 0
    assert [s for s, _ in ckpt.list_checkpoints(run_dir)] == [3]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 3


def _disk_too_small(ctx: Ctx):
    mount = _mount_tmpfs(ctx, 2**20)
    ctx.argv, ctx.watched = ctx.run(out=mount / "logs"), mount


def _report_on_file(ctx: Ctx):
    run_dir = ctx.run_copy()
    ctx.argv, ctx.watched = ["report", str(run_dir / "config.json")], run_dir


# --- as an unprivileged user -------------------------------------------------------


def _out_not_writable(ctx: Ctx):
    out = ctx.base / "readonly"
    out.mkdir()
    out.chmod(0o555)
    ctx.argv, ctx.watched = ctx.run(out=out / "logs"), out


def _data_unreadable(ctx: Ctx):
    data = ctx.base / "secret.txt"
    data.write_bytes(b"x" * 4096)
    data.chmod(0o000)
    ctx.argv = ctx.run(f"data.source=text:{data}")


def _recipe_unreadable(ctx: Ctx):
    recipe = ctx.recipe("def config():\n    return RunConfig(name='r')\n")
    Path(recipe).chmod(0o000)
    ctx.argv = ctx.run(recipe=recipe)


def _resume_not_writable(ctx: Ctx):
    run_dir = ctx.run_copy()  # readable by everyone, writable by no one
    for path in [run_dir, *run_dir.rglob("*")]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    ctx.argv, ctx.watched = ctx.run() + ["--resume", str(run_dir)], run_dir


def _report_unreadable(ctx: Ctx):
    run_dir = ctx.run_copy()
    run_dir.chmod(0o000)
    ctx.argv, ctx.watched = ["report", str(run_dir)], run_dir


CASES: dict[str, Case] = {
    # --- shapes, names, backends: --set ---
    "hidden_not_divisible_by_heads": Case(
        lambda c: _sets(c, "model.hidden_size=130"),
        2,
        "model.hidden_size (130) must be divisible by model.num_attention_heads (4)",
    ),
    "backend_typo": Case(
        lambda c: _sets(c, "variants.fp8.backend=tee"), 2, "variants.fp8.backend must be one of ('auto', 'te'"
    ),
    "backend_te_on_cpu": Case(
        lambda c: _sets(c, "variants.fp8.backend=te"),
        2,
        "variants.fp8.backend='te' cannot run here: backend='te' needs a CUDA device",
        needs="no_cuda",
    ),
    "backend_te_without_transformer_engine": Case(
        _te_without_te, 2, "needs Transformer Engine: pip install 'fp8lab[te]'"
    ),
    "backend_scaled_mm_on_cpu": Case(
        lambda c: _sets(c, "variants.fp8.backend=scaled_mm"), 2, "torch._scaled_mm is never run on CPU", needs="no_cuda"
    ),
    "attention_core_typo": Case(
        lambda c: _sets(c, "model.attention_core=flash"), 2, "model.attention_core must be one of"
    ),
    "device_cuda_without_cuda": Case(
        lambda c: _sets(c, "train.device=cuda"), 2, "no CUDA device is available", needs="no_cuda"
    ),
    "batch_not_divisible_by_nproc": Case(
        _nproc_indivisible, 2, "train.batch_size must be divisible by the number of processes (2)"
    ),
    # --- hyperparameters that cannot train ---
    "seed_over_64_bits": Case(
        lambda c: _sets(c, f"train.seed={2**64}"), 2, "train.seed must be an int in [0, 2**64 - 1]"
    ),
    "seed_negative": Case(lambda c: _sets(c, "train.seed=-1"), 2, "train.seed must be an int >= 0"),
    "lr_inf": Case(lambda c: _sets(c, "train.lr=inf"), 2, "train.lr must be a float >= 0 (finite), got inf"),
    "lr_nan": Case(lambda c: _sets(c, "train.lr=nan"), 2, "train.lr must be a float >= 0 (finite), got nan"),
    "lr_above_one": Case(lambda c: _sets(c, "train.lr=10"), 2, "train.lr must be a float in (0, 1]"),
    "min_lr_nan": Case(lambda c: _sets(c, "train.min_lr=nan"), 2, "train.min_lr must be a float >= 0 (finite)"),
    "grad_clip_zero": Case(
        lambda c: _sets(c, "train.grad_clip=0"),
        2,
        "train.grad_clip must be a float > 0 (inf: no clipping; 0 would zero",
    ),
    "grad_clip_nan": Case(lambda c: _sets(c, "train.grad_clip=nan"), 2, "train.grad_clip must be a float > 0"),
    "weight_decay_zeroes_weights": Case(
        lambda c: _sets(c, "train.weight_decay=1000"), 2, "train.weight_decay must be < 1 / train.lr"
    ),
    "weight_decay_inf": Case(
        lambda c: _sets(c, "train.weight_decay=inf"), 2, "train.weight_decay must be a float >= 0 (finite)"
    ),
    "margin_zeroes_every_cast": Case(
        lambda c: _sets(c, "fp8.margin=30"),
        2,
        "fp8.margin (of variants.fp8) must be <= 17: a larger margin puts even the amax",
    ),
    # --- precision policies ---
    "fp8_variant_all_bf16_by_pattern": Case(
        lambda c: _sets(c, "variants.fp8.keep_bf16=*"),
        2,
        "variants.fp8 has precision 'fp8' but its policy keeps every layer in BF16",
    ),
    "fp8_variant_all_bf16_by_first_last": Case(
        lambda c: _sets(c, "variants.fp8.first_last_bf16=1"),
        2,
        "first_last_bf16=1 of 1 blocks): it would train a BF16 model under an FP8 name",
    ),
    "keep_bf16_pattern_matches_nothing": Case(
        lambda c: _sets(c, "variants.fp8.keep_bf16=lm_head,blocks.0.attn.qvk"),
        2,
        "variants.fp8.keep_bf16 pattern 'blocks.0.attn.qvk' matches no layer",
    ),
    # --- data ---
    "data_source_without_path": Case(
        lambda c: _sets(c, "data.source=text:"), 2, "data.source must be 'text:PATH' with a file path"
    ),
    "data_source_is_a_folder": Case(_data_folder, 2, "is a folder; name a file"),
    # --- memory: refused from the estimate, before anything is allocated ---
    "model_too_large_for_memory": Case(
        lambda c: _sets(c, "model.hidden_size=65536"), 2, "the run is too large for this machine"
    ),
    "eval_batches_too_many_for_memory": Case(
        lambda c: _sets(c, "train.eval_batches=100000000000"), 2, "too large for this machine"
    ),
    "amax_history_too_long_for_memory": Case(
        lambda c: _sets(c, "fp8.amax_history_len=100000000000"), 2, "too large for this machine"
    ),
    # --- recipe files ---
    "recipe_exits_at_import": Case(
        _recipe("import sys\nsys.exit(0)\n"),
        2,
        "exited while loading (SystemExit(0) at line 4); a recipe only defines config()",
    ),
    "recipe_config_raises": Case(
        _recipe("def config():\n    return {}['vocab']\n"), 2, "config() raised at line 4: KeyError: 'vocab'"
    ),
    "recipe_config_exits": Case(
        _recipe("import sys\ndef config():\n    sys.exit(3)\n"), 2, "config() exited (SystemExit(3)"
    ),
    "recipe_is_a_folder": Case(_recipe_is_folder, 2, "is a folder; name a recipe .py file"),
    "recipe_returns_dicts_as_variants": Case(
        _recipe("def config():\n    return RunConfig(name='r', variants=({'name': 'bf16'},))\n"),
        2,
        "variants must be a tuple of Variant",
    ),
    "run_name_escapes_out": Case(
        _recipe("def config():\n    return RunConfig(name='../../escape')\n"), 2, "name must be a folder name"
    ),
    "run_name_absolute": Case(
        _recipe("def config():\n    return RunConfig(name='/tmp/elsewhere')\n"), 2, "name must be a folder name"
    ),
    "variant_named_like_the_checkpoints_folder": Case(
        _recipe(
            "def config():\n    return RunConfig(name='r', variants=(Variant(name='bf16', precision='bf16'), "
            "Variant(name='checkpoints')))\n"
        ),
        2,
        "variant.name must be a name other than 'checkpoints'",
    ),
    "recipe_ctrl_c_at_import": Case(
        _recipe("import os, signal\nos.kill(os.getpid(), signal.SIGINT)\n"),
        130,
        "SIGINT received before training started; nothing was written",
    ),
    # --- output folder ---
    "out_is_a_file": Case(_out_is_file, 2, "is a file, not a folder"),
    "out_under_a_file": Case(_out_under_file, 2, "is a file, not a folder"),
    "out_not_writable": Case(_out_not_writable, 2, "no permission to create folders in", as_user=True),
    "disk_too_small_for_one_checkpoint": Case(
        _disk_too_small, 2, "a checkpoint of this run takes about", needs="tmpfs"
    ),
    # --- unreadable inputs ---
    "data_file_unreadable": Case(_data_unreadable, 2, "cannot read", as_user=True),
    "recipe_file_unreadable": Case(_recipe_unreadable, 2, "cannot be read: Permission denied", as_user=True),
    "resume_folder_not_writable": Case(_resume_not_writable, 2, "no permission to write in", as_user=True),
    # --- faults during a run: saved state intact and resumable ---
    "sigterm_while_loading": Case(
        _signal_while_loading, 143, "SIGTERM received before training started; nothing was written"
    ),
    "sigterm_during_final_checkpoint": Case(
        _signal_during_final_checkpoint,
        143,
        "SIGTERM received at the end of the run: the final checkpoint and summary.json were completed first",
        after=_finished_intact,
    ),
    "sigint_during_summary_write": Case(
        _signal_during_summary,
        130,
        "SIGINT received at the end of the run: the final checkpoint and summary.json were completed first",
        after=_finished_intact,
    ),
    "second_writer_on_a_run_folder": Case(_second_writer, 2, "is in use by process"),
    "disk_full_at_second_checkpoint": Case(_disk_full, 2, "the disk is full", needs="tmpfs", after=_disk_full_resumes),
    # --- fp8lab report ---
    "report_damaged_summary": Case(
        _report(lambda d: (d / "summary.json").write_text('{"recipe": ')), 2, "summary.json is damaged (JSONDecodeError"
    ),
    "report_summary_not_fp8lab": Case(
        _report(lambda d: (d / "summary.json").write_text("[1, 2]")), 2, "summary.json is damaged"
    ),
    "report_damaged_events": Case(_report(_damage_events), 2, "is damaged at byte 0 of 2000 (a record"),
    "report_on_a_file": Case(_report_on_file, 2, "is a file; name a run folder"),
    "report_unreadable_folder": Case(_report_unreadable, 2, "cannot be read (Permission denied)", as_user=True),
}


def _tree(path: Path):
    """Everything under ``path`` (names, sizes, mtimes), or None when it does not exist."""
    if not path.exists():
        return None
    if path.is_file():
        return path.stat().st_size, path.stat().st_mtime_ns
    return sorted((str(p.relative_to(path)), p.lstat().st_size, p.lstat().st_mtime_ns) for p in path.rglob("*"))


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("logs")
    assert main(["run", QUICKSTART, "--out", str(out), "--quiet", *(a for s in TINY for a in ("--set", s))]) == 0
    (run_dir,) = (out / "quickstart").iterdir()
    return run_dir


def _drop_privileges():
    os.setgroups([])
    os.setgid(NOBODY)
    os.setuid(NOBODY)


# root without the capabilities that override file permissions (for when uid 65534 cannot
# reach the Python installation, e.g. one under /root)
NO_DAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--inh-caps", "-dac_override,-dac_read_search"]


def _unprivileged_mode() -> tuple[list[str], Callable | None, str]:
    """(command prefix, preexec_fn, why not) of a way to run without root's override."""
    if os.geteuid() != 0:
        return [], None, ""  # already a plain user
    probe = [sys.executable, "-c", "import fp8lab.run.cli"]
    tried = []
    try:
        if subprocess.run(probe, preexec_fn=_drop_privileges, cwd="/", capture_output=True).returncode == 0:
            return [], _drop_privileges, ""
        tried.append("uid 65534 cannot run this Python or import fp8lab (a folder on the way is private)")
    except (OSError, subprocess.SubprocessError) as err:
        tried.append(f"uid 65534: {err}")
    if shutil.which("setpriv") and subprocess.run(NO_DAC + probe, cwd="/", capture_output=True).returncode == 0:
        return NO_DAC, None, ""
    tried.append("setpriv cannot drop CAP_DAC_OVERRIDE here")
    return [], None, "; ".join(tried)


@pytest.fixture(scope="module")
def unprivileged():
    """(scratch folder, run(argv) -> (code, stderr)) for a user without root's override."""
    prefix, preexec, why_not = _unprivileged_mode()
    if why_not:
        pytest.skip(f"no way to run as a user without root's file-permission override: {why_not}")
    base = Path(tempfile.mkdtemp(prefix="fp8lab-user-"))
    base.chmod(0o777)
    home = base / "home"
    home.mkdir()
    home.chmod(0o777)
    env = {**os.environ, "HOME": str(home), "PYTHONDONTWRITEBYTECODE": "1", "OMP_NUM_THREADS": "1"}

    def run(argv: list[str]) -> tuple[int, str]:
        done = subprocess.run(
            [*prefix, sys.executable, "-m", "fp8lab.run.cli", *argv],
            cwd="/",
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            preexec_fn=preexec,
        )
        return done.returncode, done.stderr

    yield base, run
    shutil.rmtree(base, ignore_errors=True)


def test_the_table_holds_at_least_40_cases():
    assert len(CASES) >= 40


@pytest.mark.parametrize("name", sorted(CASES))
def test_user_error(name, tmp_path, monkeypatch, capsys, finished_run, request):
    case = CASES[name]
    if case.needs == "no_cuda" and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the case is about a machine without it")
    if case.needs == "tmpfs" and os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    if case.as_user:
        base, run = request.getfixturevalue("unprivileged")
        base = Path(tempfile.mkdtemp(dir=base))
        base.chmod(0o777)
    else:
        base = tmp_path
    ctx = Ctx(base=base, monkeypatch=monkeypatch, finished_run=finished_run)
    case.setup(ctx)
    watched = ctx.watched if ctx.watched is not None else base / "logs"
    before = _tree(watched)
    if case.as_user:
        code, err = run(ctx.argv)
    else:
        code, err = main(ctx.argv), capsys.readouterr().err
    try:
        assert code == case.code, err
        for text in [case.message, *ctx.expect]:
            assert text in err, err
        assert "Traceback" not in err, err
        if case.after is not None:
            case.after(ctx, err)
        else:
            assert _tree(watched) == before, "something was written"
    finally:
        for cleanup in ctx.cleanups:
            cleanup()
