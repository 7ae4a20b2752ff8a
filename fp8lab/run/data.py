"""Training data: the corpus (bytes or tokens) and a deterministic batch sampler.

Invariant: nothing is downloaded. The default corpus is the Python standard library's
own source files read as bytes (vocabulary 256), gathered in sorted path order so every
machine with the same Python builds the same corpus; its fingerprint is logged so runs
on different Pythons are never silently compared. A batch is a pure function of
(seed, step, rank split), so the BF16 baseline and every FP8 variant see the same
tokens, and a resumed run continues with exactly the batches it would have seen.
"""

from __future__ import annotations

import hashlib
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DEFAULT_MAX_BYTES = 8 * 2**20  # 8 MiB of stdlib source: ample for CPU-sized models


class DataError(ValueError):
    """The data source cannot be used; the message names ``data.source`` and why."""


@dataclass(frozen=True)
class Corpus:
    train: torch.Tensor  # 1-D uint8 (bytes) or int32 (tokens)
    val: torch.Tensor
    vocab_size: int
    fingerprint: str  # sha256 prefix of the whole corpus, plus its size
    source: str


def _stdlib_bytes(max_bytes: int) -> bytes:
    root = Path(sysconfig.get_paths()["stdlib"])
    chunks, total = [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if "site-packages" in rel or "test" in rel or "tests" in rel or "__pycache__" in rel:
            continue
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if total >= max_bytes:
            break
    return b"".join(chunks)[:max_bytes]


def _read(source: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:  # permissions, an I/O error: say which file and why
        raise DataError(
            f"data.source {source!r}: cannot read {str(path)!r} ({err.strerror or err}); "
            "check that this user may read it"
        ) from None


def _read_tokens(source: str, path: Path) -> np.ndarray:
    raw = _read(source, path)
    if len(raw) % 2:
        raise DataError(f"data.source tokens:{path}: {len(raw)} bytes is not a whole number of uint16 tokens")
    return np.frombuffer(raw, dtype=np.uint16)


def load_corpus(source: str = "stdlib", *, val_fraction: float = 0.1, max_bytes: int = DEFAULT_MAX_BYTES) -> Corpus:
    """Load a corpus and split it deterministically: the last ``val_fraction`` is validation.

    Args:
        source: "stdlib", "text:PATH" (any file read as bytes) or "tokens:PATH" (uint16
            token ids, as nanoGPT's prepare scripts write).
        val_fraction: share of the corpus held out for validation, in (0, 0.5].
        max_bytes: cap on the stdlib corpus size.
    Raises:
        DataError: unknown source kind, missing, unreadable or empty file, or too little data.
    """
    if not 0 < val_fraction <= 0.5:
        raise DataError(f"data.val_fraction must be in (0, 0.5], got {val_fraction}")
    if source == "stdlib":
        tokens = np.frombuffer(_stdlib_bytes(max_bytes), dtype=np.uint8)
        vocab = 256
    elif source.startswith(("text:", "tokens:")):
        kind, _, name = source.partition(":")
        path = Path(name).expanduser()
        if path.is_dir():
            raise DataError(f"data.source {source!r}: {str(path)!r} is a folder; name a file")
        if not path.is_file():
            raise DataError(f"data.source {source!r}: no such file {str(path)!r}")
        if kind == "text":
            tokens, vocab = np.frombuffer(_read(source, path), dtype=np.uint8), 256
        else:
            tokens = _read_tokens(source, path)
            vocab = int(tokens.max()) + 1 if tokens.size else 0
    else:
        raise DataError(f"data.source must be 'stdlib', 'text:PATH' or 'tokens:PATH', got {source!r}")
    if tokens.size < 1024:
        raise DataError(f"data.source {source!r} holds {tokens.size} tokens; at least 1024 are needed")
    digest = hashlib.sha256(tokens.tobytes()).hexdigest()[:16]
    split = int(tokens.size * (1 - val_fraction))
    as_tensor = torch.from_numpy(tokens.astype(np.uint8 if vocab <= 256 else np.int32))
    return Corpus(as_tensor[:split], as_tensor[split:], vocab, f"{digest}-{tokens.size}", source)


class BatchSampler:
    """Random contiguous windows, a pure function of (seed, step).

    Args:
        tokens: 1-D token tensor.
        batch_size: global batch size (sequences per step, over all ranks).
        block_size: tokens per sequence.
        seed: the sampler's seed; two samplers with the same arguments agree everywhere.
    """

    def __init__(self, tokens: torch.Tensor, batch_size: int, block_size: int, seed: int):
        if tokens.numel() <= block_size + 1:
            raise DataError(f"train.block_size {block_size} is too long for a split of {tokens.numel()} tokens")
        self.tokens, self.batch_size, self.block_size, self.seed = tokens, batch_size, block_size, seed

    def batch(self, step: int, rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) int64 (B/world_size, T) for ``step``: this rank's slice of the global batch."""
        # modulo 2**64: a 64-bit train.seed stays a valid generator seed (smaller ones are unchanged)
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + step) % 2**64)
        starts = torch.randint(self.tokens.numel() - self.block_size - 1, (self.batch_size,), generator=gen)
        per_rank = self.batch_size // world_size
        starts = starts[rank * per_rank : (rank + 1) * per_rank]
        offsets = torch.arange(self.block_size + 1)
        windows = self.tokens[starts[:, None] + offsets].long()  # (B, T+1)
        return windows[:, :-1], windows[:, 1:]
