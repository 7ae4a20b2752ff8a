"""Fake CUDA on a CPU-only torch: fp8lab's GPU path run with real autograd on fake tensors.

What is real and what is fake (test-only, never imported by fp8lab):
- tensors: ``FakeTensorMode`` tensors on device "cuda" (meta tensors underneath: shapes,
  strides, dtypes, storage offsets, no values, no memory). Every op runs torch's own meta
  kernel or decomposition, so ``torch._scaled_mm`` gets torch's ``meta_scaled_mm`` checks.
- autograd, autocast("cuda"), fp8lab's layers, scaling, telemetry: the real code.
- the device: a C++ shim (``fake_cuda_guard.cpp``: a CUDA device guard and CUDA hooks,
  built here against the installed torch's headers into a cache folder) loaded before
  ``import torch`` in a child process, and the few ``torch.cuda`` facts fp8lab asks for
  (capability, name, CUDA version) answered by ``tests.fake_cuda.device.install``.
- what cuBLASLt refuses beyond the meta kernel: ``tests.fake_cuda.strict_scaled_mm``.
- host syncs: counted by ``tests.fake_cuda.d2h.D2HCounter``.

Parent side (this module): ``shim()`` builds the shim once per torch version and source
(seconds, g++), ``run_child(scenario, **args)`` runs ``tests.fake_cuda.child`` in a fresh
interpreter and returns its JSON result; ``skip_reason()`` says why none of it can run here.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

# No `import torch` at module level: the child imports this package before it loads the
# shim, which must come before torch (functions below import torch when called).

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
SOURCE = HERE / "fake_cuda_guard.cpp"
RESULT_MARK = "FAKE_CUDA_RESULT "  # the child's last stdout line: this mark, then JSON


def _cache_dir() -> Path:
    base = os.environ.get("FP8LAB_TEST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fp8lab-tests")
    return Path(base)


def _compiler() -> str | None:
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"])
    return shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")


@functools.cache
def skip_reason() -> str | None:
    """Why fake-CUDA tests cannot run on this machine, or None."""
    import torch

    if torch.backends.cuda.is_built():
        # A CUDA build registers its own (real) device guard: the shim would clash with it,
        # and the real GPU tests (marker "gpu") are what such a machine runs.
        return f"torch {torch.__version__} is a CUDA build; the fake-CUDA shim is for CPU-only builds"
    if _compiler() is None:
        return "no C++ compiler (g++, c++ or clang++; or $CXX) to build the fake-CUDA shim"
    include = Path(torch.__file__).parent / "include"
    if not (include / "c10" / "core" / "impl" / "DeviceGuardImplInterface.h").exists():
        return f"torch's C++ headers are not installed ({include} lacks c10/core/impl/DeviceGuardImplInterface.h)"
    try:
        shim()
    except subprocess.CalledProcessError as err:
        return f"building the fake-CUDA shim failed: {err.stderr.strip()[-400:]}"
    except OSError as err:
        return f"building the fake-CUDA shim failed: {err}"
    return None


@functools.cache
def shim() -> Path:
    """The built shim library (cached by torch version and source hash)."""
    import torch

    torch_dir = Path(torch.__file__).parent
    key = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + str(torch_dir).encode()).hexdigest()[:16]
    out = _cache_dir() / f"fake_cuda_guard-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(f".{os.getpid()}.tmp")
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [
        _compiler(),
        "-O1",
        "-std=c++20",
        "-shared",
        "-fPIC",
        "-w",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        f"-I{torch_dir / 'include'}",
        str(SOURCE),
        f"-L{torch_dir / 'lib'}",
        "-lc10",
        "-ltorch_cpu",
        f"-Wl,-rpath,{torch_dir / 'lib'}",
        "-o",
        str(tmp),
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    os.replace(tmp, out)  # atomic: concurrent test processes never load a half-written file
    return out


def run_child(scenario: str, timeout: float = 300, **args) -> dict:
    """Run ``tests.fake_cuda.child`` SCENARIO with ``args`` (JSON) in a fresh interpreter.

    Returns the scenario's JSON result; raises AssertionError with the child's output tail
    when it fails (a crash of the process included).
    """
    env = dict(os.environ)
    env["FAKE_CUDA_SHIM"] = str(shim())
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["TORCHDYNAMO_DISABLE"] = "1"  # fp8lab's torch.compile'd CUDA casts run eagerly here (no Triton)
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.fake_cuda.child", scenario, json.dumps(args)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_MARK)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout[-3000:] + "\n--- stderr ---\n" + proc.stderr[-6000:]).strip()
        raise AssertionError(f"fake-CUDA child {scenario!r} exited {proc.returncode}:\n{tail}")
    return json.loads(lines[-1][len(RESULT_MARK) :])
