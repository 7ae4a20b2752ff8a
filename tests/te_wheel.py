"""Transformer Engine's pure-Python wheel, fetched for tests: its recipe module and sources.

The registry's ``transformer-engine`` wheel (about 1 MB, no CUDA code) holds TE's whole
Python tree. ``wheel(version)`` downloads it with pip (``--no-deps``) once into a cache
folder shared by the tests of a session and later sessions, and unpacks it; nothing is
installed anywhere. ``recipe_module(root)`` imports
``transformer_engine/common/recipe/__init__.py`` standalone (it needs only the standard
library and pydantic). Nothing here executes TE's PyTorch code: ``source(root, path)``
returns a file's text for the tests to read.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

# The oldest and the newest Transformer Engine fp8lab supports (pyproject.toml's te extra).
OLDEST, NEWEST = "2.1.0", "2.20.2"


def _cache() -> Path:
    base = os.environ.get("FP8LAB_TEST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "fp8lab-tests")
    return Path(base) / "te-wheels"


@functools.cache
def wheel(version: str) -> Path | str:
    """The unpacked wheel's root (holding ``transformer_engine/``), or why it is not there."""
    root = _cache() / version
    if (root / "transformer_engine" / "common" / "recipe" / "__init__.py").exists():
        return root
    download = _cache() / f"download-{version}-{os.getpid()}"
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--quiet",
        "--no-deps",
        "--only-binary=:all:",
        "--dest",
        str(download),
        f"transformer-engine=={version}",
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"pip download transformer-engine=={version} failed: {err}"
    wheels = sorted(download.glob("transformer_engine-*.whl"))
    if proc.returncode != 0 or not wheels:
        return f"pip download transformer-engine=={version} failed: {proc.stderr.strip()[-300:]}"
    tmp = root.with_name(f"{version}.{os.getpid()}.tmp")
    with zipfile.ZipFile(wheels[0]) as zf:
        zf.extractall(tmp)
    try:
        os.replace(tmp, root)  # atomic; a concurrent process may have won the race
    except OSError:
        pass
    for leftover in download.iterdir():
        leftover.unlink()
    download.rmdir()
    return root


@functools.cache
def recipe_module(root: Path):
    """``transformer_engine.common.recipe`` of the wheel at ``root``, imported standalone under
    a private name (TE's package ``__init__`` would load CUDA libraries)."""
    path = root / "transformer_engine" / "common" / "recipe" / "__init__.py"
    name = f"_te_recipe_{root.name.replace('.', '_')}"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # pydantic resolves the module's annotations through it
    spec.loader.exec_module(module)
    return module


def source(root: Path, *candidates: str) -> tuple[str, str]:
    """(path, text) of the first of ``candidates`` (paths under ``transformer_engine/pytorch``)
    that exists in the wheel."""
    for rel in candidates:
        path = root / "transformer_engine" / "pytorch" / rel
        if path.exists():
            return rel, path.read_text()
    raise FileNotFoundError(f"none of {candidates} in {root}")
