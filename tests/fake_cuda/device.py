"""The fake device, child side: load the shim, then answer the ``torch.cuda`` facts fp8lab asks.

Must run before ``import torch`` (``load_shim``): ATen looks its CUDA hooks up once. The facts
patched are only those a CPU-only torch cannot answer and fp8lab (or torch.autocast) reads:
``get_device_capability``, ``get_device_name``, ``current_device``, ``device_count``,
``is_bf16_supported``, ``torch.version.cuda``, and autocast's "is CUDA there" check.
``torch.cuda.is_available`` is left False on purpose: FakeTensorMode reads it to decide
whether to initialise a real device.
"""

from __future__ import annotations

import ctypes
import os


def load_shim() -> None:
    ctypes.CDLL(os.environ["FAKE_CUDA_SHIM"], mode=ctypes.RTLD_GLOBAL)


def install(capability: tuple[int, int], name: str | None = None, cuda: str = "12.9") -> None:
    """Make this process's CUDA device 0 look like a GPU of ``capability`` (e.g. (9, 0))."""
    import torch
    import torch.cuda.amp.common

    name = name or {(8, 0): "NVIDIA A100 (fake)", (8, 9): "NVIDIA L4 (fake)", (9, 0): "NVIDIA H100 (fake)"}.get(
        tuple(capability), f"fake sm_{capability[0]}{capability[1]}"
    )
    cap = tuple(capability)
    torch.cuda.get_device_capability = lambda device=None: cap
    torch.cuda.get_device_name = lambda device=None: name
    torch.cuda.current_device = lambda: 0
    torch.cuda.device_count = lambda: 1
    torch.cuda.is_bf16_supported = lambda including_emulation=True: True
    torch.version.cuda = cuda
    torch.cuda.amp.common.amp_definitely_not_available = lambda: False  # autocast("cuda") stays enabled


_FAKE_TOLIST = None


def fake_mode():
    """A FakeTensorMode in which real CPU tensors may meet fake ones (e.g. a CPU-built model
    moved with ``.to("cuda")``), and whose meta-kernel failures are not logged as errors."""
    import logging

    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    global _FAKE_TOLIST
    if _FAKE_TOLIST is None:
        _FAKE_TOLIST = FakeTensor.tolist
    logging.getLogger("torch._subclasses.fake_tensor").setLevel(logging.CRITICAL)
    FakeTensor.tolist = _tolist
    return FakeTensorMode(allow_non_fake_inputs=True)


def _tolist(self):
    """``tolist`` as a real CUDA tensor does it: ONE copy to the CPU, then read there (torch's
    C++ ``tensor_to_list``). FakeTensor's own ``tolist`` reads element by element (an
    ``item()`` each), which would count n host reads where a GPU makes one copy."""
    from torch._subclasses.fake_tensor import FakeTensor

    if self.device.type == "cpu":
        return _FAKE_TOLIST(self)
    host = self.cpu()
    return host.tolist() if not isinstance(host, FakeTensor) else _FAKE_TOLIST(host)
