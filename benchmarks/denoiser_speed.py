"""Time one call of each embedded denoiser: batch size, precision, shared or per-sample sigma.

    python benchmarks/denoiser_speed.py [--batches 1000,10000] [--repeats 7] [--out FILE.md]

Prints a markdown table (median seconds per call and samples per second) and, with --out,
writes it there too. "shared" means one noise level for the whole batch (what a solver step
over one schedule does); "per-sample" means every row has its own level (the general path
that per-sample schedules of many different candidates fall back to).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from searchd.models import known_models, load


def median_call_seconds(
    den, x: torch.Tensor, sigma: torch.Tensor, repeats: int
) -> tuple[float, float]:
    """Median wall time and median process CPU time of ``den(x, sigma)`` over ``repeats``
    calls, after one warm-up.

    The CPU time (all threads of this process) does not count time spent waiting for cores
    that other jobs hold, so with one thread it measures the work itself on a busy machine.
    """
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    den(x, sigma)
    sync()
    wall, cpu = [], []
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        den(x, sigma)
        sync()
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batches", default="1000,10000", help="batch sizes, comma-separated")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--devices", default="cpu" + (",cuda" if torch.cuda.is_available() else ""))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    members = sorted(
        (n for n in known_models() if n.startswith("gmm-digits-k")),
        key=lambda n: int(n.removeprefix("gmm-digits-k")),
    )
    lines = [
        "# Denoiser call time",
        "",
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, "
        f"load average at start {os.getloadavg()[0]:.2f}"
        + (f", GPU {torch.cuda.get_device_name()}" if "cuda" in args.devices else ""),
        f"median of {args.repeats} calls after one warm-up; inputs are noisy exact samples; "
        "CPU s: process CPU time (all threads); samples/s from wall time",
        "",
        "| model | device | dtype | batch | sigma | wall s / call | CPU s / call | samples / s |",
        "| --- | --- | --- | ---: | --- | ---: | ---: | ---: |",
    ]
    print("\n".join(lines), flush=True)
    gen = torch.Generator().manual_seed(0)
    for name in members:
        for device in args.devices.split(","):
            for dtype in (torch.float32, torch.float64):
                den = load(name, device=device, dtype=dtype)
                for batch in (int(b) for b in args.batches.split(",")):
                    x0 = den.sample_data(range(batch))
                    sig = torch.exp(torch.empty(batch).uniform_(-6, 4.4, generator=gen))
                    x = x0 + sig.to(x0)[:, None, None, None] * torch.randn(
                        x0.shape, generator=gen
                    ).to(x0)
                    for label, s in (
                        ("shared", torch.ones(batch)),
                        ("per-sample", sig),
                    ):
                        s = s.to(device, dtype)
                        sec, cpu = median_call_seconds(den, x, s, args.repeats)
                        line = (
                            f"| {name} | {device} | {str(dtype).removeprefix('torch.')} | "
                            f"{batch} | {label} | {sec:.4f} | {cpu:.4f} | {batch / sec:,.0f} |"
                        )
                        lines.append(line)
                        print(line, flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
