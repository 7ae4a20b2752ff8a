"""Fixtures shared by the test modules (pytest finds them here; helpers that are plain
functions live in ``tests/helpers.py`` and are imported as ``tests.helpers``)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """One intra-op thread for a training test, restored afterwards: on the shared
    2-core CI machine OpenMP's spinning barriers make 2 threads 4-10x slower than 1
    for these small ops whenever another process is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
