"""The digest of a checkpoint payload: one SHA-256 over everything a resume would use.

Invariant: ``payload_digest`` is a pure function of the payload's *values*: every tensor's
dtype, shape and bytes (in row-major order, wherever it lives) and every non-tensor value
with its type, walked in the payload's own order (dicts keep insertion order through
pickle). Any flipped bit that changes what ``torch.load`` returns changes the digest; a
flipped bit that changes nothing that is loaded (zip padding, a CRC field torch never
checks) leaves it equal, and then nothing damaged is used either. Computed when a
checkpoint is saved and again when it is loaded (cost: one read of the tensors, about
1 GB/s; a CUDA payload is copied to the host, which ``torch.save`` does anyway).
"""

from __future__ import annotations

import hashlib
import struct

import torch

KEY = "digest"  # the payload field that holds it (a hex string), left out of the digest itself
ALGORITHM = "sha256"


def _feed(h, value) -> None:
    """Hash ``value`` with a type tag and its length first, so no two values encode alike."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous().reshape(-1)
        h.update(b"T" + str(t.dtype).encode() + repr(tuple(value.shape)).encode() + b";")
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, dict):
        h.update(b"d%d;" % len(value))
        for key, item in value.items():
            _feed(h, key)
            _feed(h, item)
    elif isinstance(value, (list, tuple)):
        h.update((b"l%d;" if isinstance(value, list) else b"t%d;") % len(value))
        for item in value:
            _feed(h, item)
    elif value is None or isinstance(value, bool):
        h.update(b"n;" if value is None else b"b%d;" % value)
    elif isinstance(value, int):
        h.update(b"i%d;" % value)
    elif isinstance(value, float):
        h.update(b"f" + struct.pack("<d", value))  # exact: nan, inf and -0.0 included
    elif isinstance(value, str):
        data = value.encode("utf-8", "surrogatepass")
        h.update(b"s%d;" % len(data) + data)
    elif isinstance(value, bytes):
        h.update(b"y%d;" % len(value) + value)
    else:  # torch.dtype, torch.device, ...: what weights_only lets through, by its repr
        text = f"{type(value).__module__}.{type(value).__qualname__}:{value!r}".encode()
        h.update(b"o%d;" % len(text) + text)


def payload_digest(payload: dict) -> str:
    """``sha256:<hex>`` of every field of ``payload`` except ``KEY``."""
    h = hashlib.new(ALGORITHM)
    _feed(h, {k: v for k, v in payload.items() if k != KEY})
    return f"{ALGORITHM}:{h.hexdigest()}"


def sealed(payload: dict) -> dict:
    """``payload`` with its digest added (a new dict; the values are not copied)."""
    return {**{k: v for k, v in payload.items() if k != KEY}, KEY: payload_digest(payload)}
