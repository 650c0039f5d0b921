"""Images per second of batched sampling against the bare forward pass of the same network.

    python benchmarks/gpu_throughput.py [--device auto] [--batches 64,256,1024] [--nfe 10]
        [--solver dpmpp_2m] [--autocast bf16] [--channels-last] [--compile]
        [--runtime-batch auto] [--out FILE.md]

The network is diffusers' DDPM CIFAR-10 UNet (the architecture of google/ddpm-cifar10-32,
35.7M parameters, 3x32x32) with random weights: throughput does not depend on the weights.
For each batch size it measures

- ``forward``: images/s of the bare ``unet(x, t)`` call (what the GPU can do at best);
- ``denoiser``: images/s of one ``D(x, sigma)`` call through the adapter (VP conversion,
  fractional timesteps, chunking, autocast/inference-mode context);
- ``sampling``: images/s of ``solve(D, noise, sigmas)`` at ``--nfe`` evaluations, and its
  efficiency ``sampling * nfe / forward`` (1.0 means the solver and the adapter cost nothing
  beyond the network calls). Target: >= 0.9 at the largest batch.

``--runtime-batch`` sets the rows per network call of the denoiser (default: the largest
batch; ``auto``: found by probing GPU memory, as a GPU user's ``batch_size: auto`` does, and
printed). The autocast actually in effect is printed too (on a CPU, autocast is off unless
``--autocast-on-cpu``).

It runs anywhere: on a CPU use small batches (``--batches 4,16 --nfe 4``). The device, its
name, the settings and the torch version are printed with the table.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from searchd.models.generic import NetworkDenoiser, call_timestep_keyword, make_parameterization
from searchd.models.runtime import Runtime
from searchd.schedules import baseline
from searchd.solvers import SOLVERS, nfe, solve

# google/ddpm-cifar10-32's config.json (diffusers' conversion of Ho et al.'s CIFAR-10 model).
DDPM_CIFAR10 = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": (128, 256, 256, 256),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "layers_per_block": 2,
    "attention_head_dim": None,
    "norm_num_groups": 32,
    "norm_eps": 1e-6,
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
}


def ddpm_cifar10_unet(seed: int = 0) -> torch.nn.Module:
    """The DDPM CIFAR-10 UNet with random weights."""
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    return UNet2DModel(**DDPM_CIFAR10)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up."""
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def steps_for(solver: str, n_evals: int) -> int:
    """Most steps of ``solver`` (schedule ending in 0) within ``n_evals`` evaluations."""
    best = 1
    for n in range(1, n_evals + 1):
        if nfe(solver, n) <= n_evals:
            best = n
    return best


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--batches", default="64,256,1024", help="batch sizes, comma-separated")
    p.add_argument("--nfe", type=int, default=10)
    p.add_argument("--solver", default="dpmpp_2m", choices=list(SOLVERS))
    p.add_argument("--autocast", default=None, choices=["bf16", "fp16"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (inductor)")
    p.add_argument("--autocast-on-cpu", action="store_true", help="allow autocast on a CPU")
    p.add_argument("--runtime-batch", default=None,
                   help="rows per network call: an int, or auto (default: the largest batch)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    batches = [int(b) for b in args.batches.split(",")]
    rt_batch: int | str = max(batches)
    if args.runtime_batch is not None:
        rt_batch = "auto" if args.runtime_batch == "auto" else int(args.runtime_batch)
    runtime = Runtime(device=args.device, autocast=args.autocast,
                      autocast_on_cpu=args.autocast_on_cpu, channels_last=args.channels_last,
                      compile=args.compile, batch_size=rt_batch).resolve()
    device = runtime.torch_device
    unet = ddpm_cifar10_unet()
    n_params = sum(q.numel() for q in unet.parameters())
    den = NetworkDenoiser(unet, make_parameterization({"kind": "vp_eps", "grid": "ddpm_linear"}),
                          (3, 32, 32), call=call_timestep_keyword, runtime=runtime,
                          name="ddpm-cifar10-arch")
    t0 = time.perf_counter()
    rows_per_call = den.batch_size  # probes GPU memory once with "auto"
    probe_s = time.perf_counter() - t0
    steps = steps_for(args.solver, args.nfe)
    evals = nfe(args.solver, steps)
    sigmas = baseline("polynomial", steps, den.sigma_min, den.sigma_max)

    rows = []
    for b in batches:
        x = torch.randn(b, 3, 32, 32, device=device)
        t = torch.full((b,), 500.0, device=device)
        sigma = torch.full((b,), 2.0, device=device)

        def forward(x: torch.Tensor = x, t: torch.Tensor = t) -> object:
            with runtime.context():
                return den.net(runtime.input_tensor(x), timestep=t)

        fwd = b / timed(forward, device, args.repeats)
        call = b / timed(lambda x=x, sigma=sigma: den(x, sigma), device, args.repeats)
        samp = b / timed(lambda x=x: solve(den, x, sigmas, solver=args.solver), device,
                         max(1, args.repeats // 2))
        rows.append((b, fwd, call, samp, samp * evals / fwd))
        print(f"batch {b}: forward {fwd:.1f} img/s, denoiser {call:.1f} img/s, "
              f"sampling {samp:.2f} img/s ({evals} NFE)", flush=True)

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    lines = [
        f"device: {device} ({name or platform.machine()}), torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}",
        f"network: DDPM CIFAR-10 UNet (random weights, {n_params / 1e6:.1f}M parameters); "
        f"autocast {args.autocast} (in effect: {runtime.autocast_dtype}), channels_last "
        f"{args.channels_last}, compile {args.compile}; rows per network call "
        f"{rows_per_call} ({args.runtime_batch or 'the largest batch'}"
        + (f", found in {probe_s:.1f} s" if rt_batch == "auto" else "") + ")",
        f"sampling: {args.solver}, {steps} steps = {evals} NFE, median of {args.repeats} runs",
        "",
        "| batch | forward img/s | denoiser img/s | sampling img/s | sampling x NFE / forward |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {b} | {f:.1f} | {c:.1f} | {s:.2f} | {e:.3f} |" for b, f, c, s, e in rows]
    eff = rows[-1][4]
    lines += ["", f"target: sampling x NFE / forward >= 0.9 at the largest batch: {eff:.3f} "
              f"({'met' if eff >= 0.9 else 'not met'})"]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
    return table


if __name__ == "__main__":
    main()
