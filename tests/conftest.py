"""Fixtures shared by several test modules."""

from __future__ import annotations

import os

import pytest
import torch

# No cross-run cache of exact references in tests (searchd.evaluation.reference_cache): every
# run computes its own, whatever ran before; tests/test_reference_cache.py turns it on.
os.environ["SEARCHD_CACHE_DIR"] = "off"


def _one_torch_thread():
    """Tiny tensors: one torch thread avoids the thread pool's cost on a shared machine (on
    2 shared cores extra threads make tiny networks many times slower); restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


one_thread = pytest.fixture(_one_torch_thread, name="one_thread")
one_thread_module = pytest.fixture(_one_torch_thread, scope="module", name="one_thread_module")


@pytest.fixture(scope="module")
def k8():
    """The smallest embedded mixture, in float64."""
    from searchd.models import load

    return load("gmm-digits-k8", dtype=torch.float64)
