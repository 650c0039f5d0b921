"""Fixtures shared by several test modules."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny tensors: one torch thread avoids the thread pool's cost on a shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def k8():
    """The smallest embedded mixture, in float64."""
    from searchd.models import load

    return load("gmm-digits-k8", dtype=torch.float64)
