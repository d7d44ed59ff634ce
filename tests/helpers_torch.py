"""Autouse fixtures shared by the model tests. Import one by name into a test module to switch it on there."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def no_grad() -> Iterator[None]:
    """Every test of the module runs without autograd (inference only, less memory)."""
    with torch.no_grad():
        yield


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """One CPU thread for the module: with tiny matmuls extra threads only add synchronisation (and stall badly on a
    busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
