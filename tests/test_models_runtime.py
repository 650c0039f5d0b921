"""Execution settings: automatic batch size, autocast, channels_last, compile, chunking.

The GPU paths (CUDA out-of-memory probing, fp16 autocast) cannot run on this CPU-only
machine; ``find_max_batch`` is tested with a real memory limit enforced by the probe."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from searchd.models.generic import NetworkDenoiser, make_parameterization
from searchd.models.runtime import (
    DEFAULT_CPU_BATCH,
    Runtime,
    auto_batch_size,
    find_max_batch,
    is_out_of_memory,
    parse_dtype,
    resolve_device,
)

pytestmark = pytest.mark.usefixtures("one_thread_module")  # tests/conftest.py


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x, t):
        return self.b(torch.nn.functional.silu(self.a(x))) + 0.01 * t.view(-1, 1, 1, 1)


def make(runtime: Runtime) -> NetworkDenoiser:
    return NetworkDenoiser(ConvNet(), make_parameterization("edm_precond"), (3, 8, 8),
                           runtime=runtime)


def data(n: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 8, 8, generator=g) * 3, torch.linspace(0.01, 10, n)


def test_find_max_batch_returns_the_largest_size_under_a_memory_limit():
    tried = []

    def probe(b: int) -> None:
        tried.append(b)
        if b * 1000 > 300_000:  # a 300-row memory limit
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate ...")
        torch.empty(b, 1000)

    size = find_max_batch(probe, refine_steps=8)
    assert size == 300
    assert tried[:10] == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
    assert find_max_batch(probe, refine_steps=0) == 256
    assert find_max_batch(lambda b: None, limit=64) == 64  # nothing fails: the limit


def test_find_max_batch_raises_other_errors_and_a_start_that_does_not_fit():
    def broken(b: int) -> None:
        raise ValueError("shape mismatch")

    with pytest.raises(ValueError, match="shape mismatch"):
        find_max_batch(broken)

    def never(b: int) -> None:
        raise RuntimeError("CUDA error: out of memory")

    assert is_out_of_memory(RuntimeError("CUDA error: out of memory"))
    with pytest.raises(RuntimeError, match="does not fit"):
        find_max_batch(never)


def test_batch_size_on_cpu_is_the_configured_default_and_chunking_is_invisible():
    rt = Runtime()
    assert auto_batch_size(lambda b: None, rt) == DEFAULT_CPU_BATCH
    assert auto_batch_size(lambda b: None, Runtime(cpu_batch_size=7)) == 7
    assert auto_batch_size(lambda b: None, Runtime(batch_size=3)) == 3
    x, s = data(10)
    whole = make(Runtime())(x, s)
    chunked = make(Runtime(batch_size=3))
    calls = []
    chunked.module.register_forward_hook(lambda m, a, k: calls.append(a[0].shape[0]))
    torch.testing.assert_close(chunked(x, s), whole)
    assert calls == [3, 3, 3, 1]


def test_options_are_parsed_and_checked():
    rt = Runtime.from_options({"dtype": "bf16", "autocast": "fp16", "batch_size": 8})
    assert rt.dtype == torch.bfloat16 and rt.autocast == "fp16" and rt.batch_size == 8
    assert rt.autocast_dtype is None  # no autocast on the CPU unless asked
    assert parse_dtype("float32") == torch.float32
    with pytest.raises(ValueError, match="unknown runtime options"):
        Runtime.from_options({"batchsize": 8})
    with pytest.raises(ValueError, match="autocast"):
        Runtime(autocast="int8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="batch_size"):
        Runtime(batch_size=0)
    expected = "cuda" if torch.cuda.is_available() else None
    if expected:
        assert resolve_device("auto").type == "cuda"
    elif not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        assert resolve_device("auto").type == "cpu"


def test_bf16_autocast_on_cpu_changes_precision_only():
    x, s = data()
    ref = make(Runtime())(x, s)
    den = make(Runtime(autocast="bf16", autocast_on_cpu=True))
    seen = []
    den.module.a.register_forward_hook(lambda m, a, out: seen.append(out.dtype))
    out = den(x, s)
    assert seen == [torch.bfloat16] and out.dtype == torch.float32
    assert not torch.equal(out, ref)
    torch.testing.assert_close(out, ref, rtol=3e-2, atol=3e-2)


def test_channels_last_and_compile_give_the_same_result():
    x, s = data()
    ref = make(Runtime())(x, s)
    cl = make(Runtime(channels_last=True))
    assert cl.module.a.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(cl(x, s), ref, rtol=1e-5, atol=1e-5)
    # The compile option wraps the network with torch.compile; the "eager" backend traces
    # with TorchDynamo without generating code, which keeps the test fast on a CPU.
    comp = make(Runtime(compile=True, compile_backend="eager"))
    assert comp.net is not comp.module
    torch.testing.assert_close(comp(x, s), ref, rtol=1e-5, atol=1e-5)


def test_float64_inputs_keep_float64_conversions():
    x, s = data()
    den = make(Runtime())
    out = den(x.double(), s.double())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), den(x, s), rtol=1e-5, atol=1e-5)
