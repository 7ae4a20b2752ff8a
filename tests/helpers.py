"""Shared test helpers: signal-to-quantization-noise ratio against a float64 reference."""

from __future__ import annotations

import math

import pytest
import torch


def sqnr_db(ref: torch.Tensor, test: torch.Tensor) -> float:
    """10 * log10(||ref||^2 / ||ref - test||^2), computed in float64 (inf when equal)."""
    ref64, test64 = ref.detach().to(torch.float64), test.detach().to(torch.float64)
    noise = (ref64 - test64).pow(2).sum()
    signal = ref64.pow(2).sum()
    if noise == 0:
        return math.inf
    return float(10.0 * torch.log10(signal / noise))


@pytest.fixture
def one_thread():
    """One intra-op thread for a training test, restored afterwards: on the shared
    2-core CI machine OpenMP's spinning barriers make 2 threads 4-10x slower than 1
    for these small ops whenever another process is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
