"""``benchmarks/gpu_throughput.py`` on the CPU: what a lent GPU will only confirm. The table
has images/s of the bare forward pass, of one denoiser call and of batched sampling, and the
efficiency ``sampling x NFE / forward`` computed from them."""

from __future__ import annotations

import math
import re

from tests.bench_module import load_benchmark


def test_gpu_throughput_runs_on_cpu_and_reports_sampling_against_forward(tmp_path):
    mod = load_benchmark("gpu_throughput")
    out = tmp_path / "gpu.md"
    table = mod.main(["--device", "cpu", "--batches", "2", "--nfe", "2", "--repeats", "1",
                      "--threads", "1", "--out", str(out)])
    assert out.read_text() == table
    assert "device: cpu" in table and "autocast None (in effect: None)" in table
    row = re.search(r"^\| 2 \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \|$", table, re.M)
    assert row is not None, table
    fwd, call, samp, eff = (float(x) for x in row.groups())
    evals = int(re.search(r"= (\d+) NFE", table).group(1))
    assert 1 <= evals <= 2
    assert all(math.isfinite(v) and v > 0 for v in (fwd, call, samp))
    # The efficiency is sampling x NFE / forward (the table rounds each to a few digits).
    assert abs(eff - samp * evals / fwd) <= 0.05 * eff
    assert "target: sampling x NFE / forward >= 0.9" in table
