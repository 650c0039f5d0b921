"""Train the neural digits zoo: small diffusers ``UNet2DModel``s with the EDM loss, on CPU.

    python scripts/train_digits_unet.py [--widths s,m,l] [--max-minutes 6,2.2,2.2] [--out DIR]
        [--init-from DIR]   # a further stage, continuing from saved models

The shipped weights (searchd/models/data/digits-unet-{s,m,l}/) come from these runs, one
width per process (run side by side, each under ``nice``, on a shared 2-core machine):

    nice python scripts/train_digits_unet.py --widths s --max-minutes 6
    nice python scripts/train_digits_unet.py --widths m --max-minutes 2.2
    nice python scripts/train_digits_unet.py --widths l --max-minutes 2.2
    # second stage of m and l, continuing from the first (written to DIR, then copied):
    nice python scripts/train_digits_unet.py --widths m --max-minutes 9 \
        --init-from searchd/models/data --out DIR
    nice python scripts/train_digits_unet.py --widths l --max-minutes 11 \
        --init-from searchd/models/data --out DIR

Each model's ``searchd.json`` records its training (iterations, CPU and wall minutes, loss;
earlier stages under ``training.stages``). The budgets are unequal for want of machine time,
not by design: the first stage ran at load average 15-25 on 2 cores, where each ``nice``d
process got 6-10% of a core, so m and l were cut to 2.2 CPU minutes (undertrained: 82-83%
confident samples); the second stage (11.2 and 13.2 CPU minutes in all) brought them above
the 90% bar. Larger widths with the same
CPU time take fewer steps (one step of l costs ~2.3x one of s).

Data: scikit-learn's 1,797 handwritten digits, 8x8 pixels with 17 grey levels, scaled to
[-1, 1] (``x / 8 - 1``) and kept at their native 8x8 (the embedded Gaussian-mixture zoo and
the digits feature network use the same shape, so every member of both zoos is scored
the same way). No augmentation: a one-pixel shift at 8x8 moves a digit by an eighth of the
image and would change the distribution the FID reference describes.

Model: EDM preconditioning (Karras et al. 2022, Table 1) around a diffusers ``UNet2DModel``:
``D(x, sigma) = c_skip x + c_out F(c_in x, c_noise)`` with ``c_noise = 250 log(sigma)``
(EDM's ``log(sigma) / 4`` times 1000, the timestep range diffusers' sinusoidal embedding
is made for). Loss: EDM's with ``ln(sigma) ~ N(-0.8, 1.2^2)`` (EDM's -1.2 shifted by
ln(0.75 / 0.5) for the larger sigma_data), weight ``(sigma^2 + sd^2) /
(sigma sd)^2``, i.e. ``|F - (x0 - c_skip x) / c_out|^2``. Adam, linear warm-up then cosine
decay, EMA of the weights (what is saved).

Output per width: ``<out>/digits-unet-<w>/`` with the diffusers model (``config.json``,
``diffusion_pytorch_model.safetensors``) and ``searchd.json`` (parameterization, sample
shape, relative cost, training record), loadable with
``searchd.models.adapters.load_spec`` / ``searchd.models.diffusers.load_diffusers``.

Runs on one thread (``torch.set_num_threads(1)``) so it leaves the machine's other cores
to others; ``--max-minutes`` bounds each width's CPU time (process time: on a shared machine
the wall time is longer), and the learning-rate decay follows it, so a run's result depends
on the CPU time it got, not on how busy the machine was (up to the order of floating-point
work, which is deterministic on one thread).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DModel
from sklearn.datasets import load_digits
from torch.utils.flop_counter import FlopCounterMode

from searchd.models.generic import EDMPreconditioned

DATA_DIR = Path(__file__).resolve().parents[1] / "searchd" / "models" / "data"
SIGMA_DATA = 0.75  # per-pixel standard deviation of the scaled digits (0.752)
C_NOISE_SCALE = 250.0
# EDM's lognormal training noise (-1.2, 1.2) for sigma_data = 0.5, shifted by ln(0.75 / 0.5).
P_MEAN, P_STD = -0.8, 1.2
SHAPE = (1, 8, 8)
DATA_RECORD = {
    "dataset": "sklearn.datasets.load_digits",
    "n": 1797,
    "scaling": "x / 8 - 1",
    "resolution": 8,
}

# Widths: channels per resolution (8x8, 4x4, 2x2); self-attention at 4x4 and 2x2.
WIDTHS: dict[str, dict] = {
    "s": {"block_out_channels": (16, 32, 32), "layers_per_block": 1},
    "m": {"block_out_channels": (24, 48, 48), "layers_per_block": 1},
    "l": {"block_out_channels": (32, 64, 64), "layers_per_block": 1},
}


# CPU minutes per width of the shipped models (one thread).
MAX_MINUTES: dict[str, float] = {"s": 6.0, "m": 2.2, "l": 2.2}


def build_unet(width: str) -> UNet2DModel:
    """A fresh UNet2DModel of the given width for 1x8x8 images."""
    cfg = WIDTHS[width]
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        block_out_channels=cfg["block_out_channels"],
        layers_per_block=cfg["layers_per_block"],
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        attention_head_dim=None,
    )


def digits_data() -> torch.Tensor:
    """All 1,797 digits as float32 [1797, 1, 8, 8] in [-1, 1]."""
    images = load_digits().images.astype(np.float32)
    return torch.from_numpy(images / 8.0 - 1.0).unsqueeze(1)


def forward_flops(net: UNet2DModel) -> float:
    """FLOPs of one forward pass per sample (batch of 16, divided by 16)."""
    x = torch.zeros(16, *SHAPE)
    t = torch.zeros(16)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(x, t)
    return counter.get_total_flops() / 16


def edm_loss(
    net: UNet2DModel, param: EDMPreconditioned, x0: torch.Tensor, gen: torch.Generator
) -> torch.Tensor:
    """EDM training loss on a batch of clean samples x0 [B, 1, 8, 8]."""
    b = x0.shape[0]
    sigma = (torch.randn(b, generator=gen) * P_STD + P_MEAN).exp()
    x = x0 + sigma.view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=gen)
    c_skip, c_out, c_in, c_noise = param.coefficients(sigma)
    f = net(c_in.view(-1, 1, 1, 1) * x, c_noise).sample
    # Effective target of the raw network: (x0 - c_skip x) / c_out (EDM eq. 8).
    target = (x0 - c_skip.view(-1, 1, 1, 1) * x) / c_out.view(-1, 1, 1, 1)
    return (f - target).square().mean()


def fit(
    net: UNet2DModel,
    loss_fn: Callable[[UNet2DModel, torch.Tensor, torch.Generator], torch.Tensor],
    data: torch.Tensor,
    gen: torch.Generator,
    *,
    iters: int,
    batch: int,
    lr: float,
    ema_halflife: float,
    max_minutes: float,
    tag: str,
    log_every: int = 200,
) -> tuple[UNet2DModel, dict]:
    """The training loop both digits zoos share: Adam, linear warm-up then cosine decay to 5%
    over the larger of the iterations done and the CPU time used, gradient clipping at 1, an
    EMA of the weights with a half-life in iterations.

    ``loss_fn(net, x0 [batch, 1, 8, 8], gen)`` is the model's loss on a batch of digits drawn
    from ``data`` with ``gen``. Returns the EMA network and the run's record (iterations, CPU
    and wall minutes, final loss).
    """
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.99), fused=True)
    ema_params, net_params = list(ema.parameters()), list(net.parameters())
    warmup = max(1, min(100, iters // 20))
    start, cpu_start = time.perf_counter(), time.process_time()
    losses: list[float] = []
    done = 0
    for step in range(iters):
        # Warm-up, then cosine decay to 5% of the peak over the run's progress: the larger of
        # the iterations done and the CPU time used (so a time-bounded run still decays).
        progress = max(step / iters, (time.process_time() - cpu_start) / (max_minutes * 60))
        if progress >= 1.0:
            print(f"[{tag}] stopping at step {step}: {max_minutes} CPU minutes used", flush=True)
            break
        frac = min(1.0, (step + 1) / warmup)
        cos = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))
        for g in opt.param_groups:
            g["lr"] = lr * frac * cos
        idx = torch.randint(0, data.shape[0], (batch,), generator=gen)
        loss = loss_fn(net, data[idx], gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        # EMA with a half-life in iterations (shorter at the start).
        decay = 0.5 ** (1.0 / max(1.0, min(ema_halflife, (step + 1) / 4)))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, net_params, 1 - decay)
        losses.append(float(loss.detach()))
        done = step + 1
        elapsed = time.perf_counter() - start
        if done % log_every == 0:
            print(
                f"[{tag}] step {done}/{iters} loss {np.mean(losses[-log_every:]):.4f} "
                f"lr {opt.param_groups[0]['lr']:.2e} {elapsed / 60:.1f} min "
                f"({(time.process_time() - cpu_start) / 60:.1f} CPU min)",
                flush=True,
            )
    record = {
        "iterations": done,
        "planned_iterations": iters,
        "batch": batch,
        "lr": lr,
        "ema_halflife_iters": ema_halflife,
        "minutes": round((time.perf_counter() - start) / 60, 2),
        "cpu_minutes": round((time.process_time() - cpu_start) / 60, 2),
        "final_loss": float(np.mean(losses[-200:])),
        "threads": 1,
    }
    return ema, record


def load_stage(src: Path) -> tuple[UNet2DModel, list[dict]]:
    """A saved model to continue training (another stage) and its earlier stages' records."""
    net = UNet2DModel.from_pretrained(src, low_cpu_mem_usage=False).train()
    prev = json.loads((src / "searchd.json").read_text())["training"]
    return net, [*prev.pop("stages", []), prev]


def stage_totals(record: dict, stages: list[dict]) -> dict:
    """A training record with its earlier stages and the totals over all of them."""
    return {
        **record,
        "stages": stages,
        "total_cpu_minutes": round(record["cpu_minutes"]
                                   + sum(st["cpu_minutes"] for st in stages), 2),
        "total_iterations": record["iterations"] + sum(st["iterations"] for st in stages),
    }


def train_width(
    width: str,
    out_root: Path,
    *,
    iters: int,
    batch: int,
    lr: float,
    ema_halflife: float,
    seed: int,
    max_minutes: float,
    costs: dict[str, float],
    init_from: Path | None = None,
    log_every: int = 200,
) -> dict:
    """Train one width and save it under ``out_root/digits-unet-<width>``; returns its record.

    With ``init_from``, training continues from the model saved in
    ``init_from/digits-unet-<width>`` (a further stage: fresh optimizer and warm-up, the
    earlier stages' records kept in ``training.stages``).
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data = digits_data()
    stages: list[dict] = []
    if init_from is not None:
        net, stages = load_stage(init_from / f"digits-unet-{width}")
    else:
        net = build_unet(width)
    param = EDMPreconditioned(SIGMA_DATA, C_NOISE_SCALE)

    def loss_fn(n: UNet2DModel, x0: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return edm_loss(n, param, x0, g)

    ema, run = fit(net, loss_fn, data, gen, iters=iters, batch=batch, lr=lr,
                   ema_halflife=ema_halflife, max_minutes=max_minutes, tag=width,
                   log_every=log_every)
    out = out_root / f"digits-unet-{width}"
    out.mkdir(parents=True, exist_ok=True)
    ema.save_pretrained(out, safe_serialization=True)
    run["seed"] = seed
    run.update(p_mean=P_MEAN, p_std=P_STD)
    record = {
        "format": "searchd-digits-unet",
        "shape": list(SHAPE),
        "cost": costs[width],
        "parameterization": {
            "kind": "edm_precond",
            "sigma_data": SIGMA_DATA,
            "c_noise_scale": C_NOISE_SCALE,
            "sigma_min": 0.002,
            "sigma_max": 80.0,
        },
        "data": DATA_RECORD,
        "training": stage_totals(run, stages),
        "parameters": sum(p.numel() for p in net.parameters()),
    }
    (out / "searchd.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"[{width}] saved to {out} ({run['iterations']} steps, {run['minutes']:.1f} min)",
          flush=True)
    return record


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--widths", default="s,m,l")
    p.add_argument(
        "--iters",
        default="20000",
        help="iterations per width (one value, or one per width)",
    )
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ema-halflife", type=float, default=250.0, help="in iterations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--max-minutes",
        default=None,
        help="CPU minutes per width (process time, one thread): one value, or one per width "
        f"(default: {','.join(str(MAX_MINUTES[w]) for w in WIDTHS)} for s,m,l); the "
        "learning-rate decay follows the CPU time when this binds first",
    )
    p.add_argument("--out", type=Path, default=DATA_DIR)
    p.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="continue training the models saved in this folder (another stage)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    widths = [w.strip() for w in args.widths.split(",")]
    unknown = [w for w in widths if w not in WIDTHS]
    if unknown:
        raise SystemExit(f"unknown widths {unknown}; known: {list(WIDTHS)}")
    iters = [int(v) for v in args.iters.split(",")]
    if len(iters) == 1:
        iters = iters * len(widths)
    if len(iters) != len(widths):
        raise SystemExit("--iters needs one value or one per width")
    if args.max_minutes is None:
        minutes = [MAX_MINUTES[w] for w in widths]
    else:
        minutes = [float(v) for v in args.max_minutes.split(",")]
        if len(minutes) == 1:
            minutes = minutes * len(widths)
    if len(minutes) != len(widths):
        raise SystemExit("--max-minutes needs one value or one per width")
    # Relative cost of one call: forward FLOPs over the largest width's.
    flops = {w: forward_flops(build_unet(w)) for w in WIDTHS}
    costs = {w: flops[w] / flops["l"] for w in WIDTHS}
    print("forward MFLOPs per sample:", {w: round(f / 1e6, 2) for w, f in flops.items()})
    for w, n, m in zip(widths, iters, minutes):
        train_width(
            w,
            args.out,
            iters=n,
            batch=args.batch,
            lr=args.lr,
            ema_halflife=args.ema_halflife,
            seed=args.seed,
            max_minutes=m,
            costs=costs,
            init_from=args.init_from,
        )


if __name__ == "__main__":
    main()
