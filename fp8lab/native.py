"""fp8lab's C kernels: compiled at first use, cached per user, loaded through ctypes.

Invariant: a shared library loaded is built from exactly the source file named, with exactly the
flags in its cache key (source hash, flags, the compiler's version line, machine), so a stale or
foreign build is never loaded. Building never raises: ``build`` returns the library or one line
saying why there is none, and the caller decides what to do about it (every kernel has a torch
path computing the same bits).

ISA: ``-march=native``, except ``-mavx2 -mfma`` when torch's own ``ATEN_CPU_CAPABILITY=avx2`` is set
(``benchmarks/common.py``'s AVX2 imitation then imitates the kernels too) and no ISA flag for
``ATEN_CPU_CAPABILITY=default``. OpenMP when the compiler has it: the library then needs
``libgomp.so.1``, which resolves to the copy torch has already loaded (torch's wheel ships its
libgomp under that soname), so torch and the kernels share one OpenMP runtime and thread pool.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

BASE_FLAGS = ("-O3", "-shared", "-fPIC", "-ffp-contract=off")  # no contraction: every FMA is written out


def isa_flags() -> tuple[str, ...]:
    capability = os.environ.get("ATEN_CPU_CAPABILITY", "").lower()
    if capability == "avx2":
        return ("-mavx2", "-mfma")
    if capability == "default":
        return ()
    return ("-march=native",)


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/fp8lab`` (``~/.cache/fp8lab``), or a per-user temp folder where that is read-only."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fp8lab"
    try:
        base.mkdir(parents=True, exist_ok=True)
        if os.access(base, os.W_OK):
            return base
    except OSError:
        pass
    fallback = Path(tempfile.gettempdir()) / f"fp8lab-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    fallback.mkdir(parents=True, exist_ok=True)
    return fallback


def compiler_version(compiler: str) -> str:
    out = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
    return (out.stdout or out.stderr).splitlines()[0].strip() if out.returncode == 0 else ""


def _compile(compiler: str, flags: tuple[str, ...], source: Path, target: Path) -> str:
    """Compile ``source`` into ``target`` (atomically); returns "" or the compiler's last error lines."""
    tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    cmd = [compiler, *flags, str(source), "-o", str(tmp), "-lm"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if out.returncode != 0:
        tmp.unlink(missing_ok=True)
        return " ".join((out.stderr or out.stdout).strip().splitlines()[-2:])[:300]
    os.replace(tmp, target)  # concurrent builders each write their own tmp; the last rename wins
    return ""


def build(source: Path, stem: str, load: Callable, compiler: str | None = None, extra: tuple[str, ...] = ()):
    """Build ``source`` (or find it in the cache) and ``load(ctypes.CDLL, file, version, flags)`` it:
    ``(loaded, "")`` or ``(None, why not)``.

    Tries OpenMP with the ISA flags, then without OpenMP, then without ISA flags; a build that
    compiles but fails to load counts as a failure. ``compiler`` defaults to ``cc`` (or ``gcc``);
    ``extra`` flags follow the base ones (and are in the cache key).
    """
    compiler = compiler or shutil.which("cc") or shutil.which("gcc")
    if not compiler or not shutil.which(compiler):
        return None, f"no C compiler found ({compiler or 'cc/gcc'} not on PATH)"
    try:
        version = compiler_version(compiler)
        if not version:
            return None, f"{compiler} --version failed"
        source_hash = hashlib.sha256(source.read_bytes()).hexdigest()
        errors = []
        base = BASE_FLAGS + extra
        for flags in (base + isa_flags() + ("-fopenmp",), base + isa_flags(), base):
            key = hashlib.sha256("\n".join([source_hash, version, platform.machine(), *flags]).encode()).hexdigest()
            target = cache_dir() / f"{stem}_{key[:20]}.so"
            if not target.exists():
                error = _compile(compiler, flags, source, target)
                if error:
                    errors.append(f"{' '.join(flags)}: {error}")
                    continue
            try:
                return load(ctypes.CDLL(str(target)), target, version, flags), ""
            except OSError as err:  # e.g. a libgomp that does not load
                errors.append(f"{' '.join(flags)}: loading failed: {err}")
        return None, f"{compiler} could not build the kernel: " + "; ".join(errors)
    except (OSError, subprocess.SubprocessError) as err:
        return None, f"building with {compiler} failed: {type(err).__name__}: {err}"
