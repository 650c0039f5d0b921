"""The options a GPU user needs, exercised on the CPU so that a GPU only has to confirm them:
automatic batch size (the CUDA branch, with the device calls stubbed and a memory limit
enforced by the network), bf16 autocast and torch.compile through a whole solver run."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from searchd.models import runtime as rt_module
from searchd.models.generic import NetworkDenoiser, make_parameterization
from searchd.models.runtime import Runtime, auto_batch_size, find_max_batch
from searchd.schedules import baseline
from searchd.solvers import solve

pytestmark = pytest.mark.usefixtures("one_thread_module")  # tests/conftest.py


class LimitedNet(nn.Module):
    """A small conv net that runs out of "memory" above ``limit`` rows per call."""

    def __init__(self, limit: int | None = None) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 3, 3, padding=1)
        self.limit = limit
        self.rows: list[int] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        self.rows.append(x.shape[0])
        if self.limit is not None and x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.b(torch.nn.functional.silu(self.a(x))) + 0.01 * t.view(-1, 1, 1, 1)


def make(runtime: Runtime, limit: int | None = None) -> NetworkDenoiser:
    return NetworkDenoiser(LimitedNet(limit), make_parameterization("edm_precond"), (3, 8, 8),
                           runtime=runtime)


def test_auto_batch_size_probes_memory_on_cuda(monkeypatch):
    """The CUDA branch of ``batch_size: auto``: probes by doubling then bisecting, syncing
    after every probe and emptying the cache after every failure."""
    calls = {"sync": 0, "empty": 0}
    monkeypatch.setattr(torch.cuda, "synchronize",
                        lambda device=None: calls.__setitem__("sync", calls["sync"] + 1))
    monkeypatch.setattr(torch.cuda, "empty_cache",
                        lambda: calls.__setitem__("empty", calls["empty"] + 1))
    tried = []

    def forward(b: int) -> None:
        tried.append(b)
        if b > 300:
            raise torch.OutOfMemoryError("CUDA out of memory")

    size = auto_batch_size(forward, Runtime(device="cuda", batch_size="auto"))
    # 1 .. 256 fit, 512 does not; bisection: 384 no, 320 no, 288 yes.
    assert tried == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 384, 320, 288]
    assert size == 288
    assert calls["sync"] == 10  # after every probe that ran: 1 .. 256 and 288
    assert calls["empty"] == 3 + 1  # after each failure, and once at the end
    assert auto_batch_size(forward, Runtime(device="cuda", batch_size=64)) == 64
    assert rt_module.MAX_AUTO_BATCH >= 1 << 14


def test_denoiser_probe_finds_the_largest_batch_and_chunks_by_it():
    """The denoiser's own probe (one network call of b rows) under a memory limit, and its
    calls chunked to the size found."""
    den = make(Runtime(), limit=40)
    assert find_max_batch(den._probe, refine_steps=8) == 40
    den = make(Runtime(batch_size=40), limit=40)
    x = torch.randn(100, 3, 8, 8)
    out = den(x, torch.full((100,), 2.0))
    assert out.shape == x.shape and den.module.rows == [40, 40, 20]


def test_bf16_autocast_and_compile_through_a_solver_run():
    """A whole dpmpp_2m run: bf16 autocast changes the samples by rounding only, returns
    float32; the compiled network (TorchDynamo, eager backend) gives the plain result."""
    sigmas = baseline("polynomial", 4, 0.002, 80.0, True, rho=7)
    noise = torch.randn(12, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = solve(make(Runtime()), noise, sigmas, solver="dpmpp_2m")
        bf16 = solve(make(Runtime(autocast="bf16", autocast_on_cpu=True)), noise, sigmas,
                     solver="dpmpp_2m")
        comp = solve(make(Runtime(compile=True, compile_backend="eager")), noise, sigmas,
                     solver="dpmpp_2m")
    assert bf16.dtype == torch.float32 and not torch.equal(bf16, ref)
    torch.testing.assert_close(bf16, ref, rtol=5e-2, atol=5e-2)
    torch.testing.assert_close(comp, ref, rtol=1e-5, atol=1e-5)
