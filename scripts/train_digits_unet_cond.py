"""Train ``digits-unet-cond-s``: a class-conditional digits UNet with label dropout, on CPU.

    nice python scripts/train_digits_unet_cond.py [--max-minutes 12] [--out DIR]

The shipped weights (searchd/models/data/digits-unet-cond-s/) come from the command above
with its defaults (one thread, under ``nice``, on the shared 2-core machine).

What differs from the unconditional zoo (``scripts/train_digits_unet.py``, whose width ``s``,
EDM preconditioning, loss, optimizer, learning-rate decay and EMA this reuses):

- the network is a diffusers ``UNet2DModel`` with ``num_class_embeds = 11``: the ten digit
  classes and one more row, label 10, the "no class" label;
- each training example's label is replaced by the no-class label with probability
  ``--label-dropout`` (0.1), so the same network is also an unconditional model and
  classifier-free guidance ``u + w (c - u)`` needs no second network (Ho & Salimans 2022);
- ``searchd.json`` records the conditioning (``conditioning: {num_classes: 10,
  null_label: 10}``), which the diffusers adapter reads, so the model loads through
  ``searchd.models.diffusers.load_diffusers`` like any class-conditional diffusers UNet
  (label of sample i: class ``i mod 10``; guidance composed on the raw network output).

The CPU budget (``--max-minutes``, process time on one thread) is twice the unconditional
``s`` member's 6 minutes: the network has to learn ten conditionals and the unconditional
mode from the same 1,797 digits.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import UNet2DModel
from sklearn.datasets import load_digits
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_digits_unet as base  # noqa: E402  (the unconditional zoo's script, beside this)

from searchd.models.generic import EDMPreconditioned  # noqa: E402

NAME = "digits-unet-cond-s"
N_CLASSES = 10
NULL_LABEL = N_CLASSES  # the extra embedding row: "no class"
MAX_MINUTES = 12.0


def build_cond_unet(width: str = "s") -> UNet2DModel:
    """A fresh class-conditional UNet2DModel (10 classes + the no-class label)."""
    cfg = base.WIDTHS[width]
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
        num_class_embeds=N_CLASSES + 1,
    )


def digits_with_labels() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as float32 [1797, 1, 8, 8] in [-1, 1] and their labels int64 [1797]."""
    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 8.0 - 1.0).unsqueeze(1)
    return x, torch.from_numpy(d.target.astype(np.int64))


def forward_flops(net: UNet2DModel) -> float:
    """FLOPs of one forward pass per sample (batch of 16, divided by 16)."""
    x, t = torch.zeros(16, *base.SHAPE), torch.zeros(16)
    labels = torch.zeros(16, dtype=torch.int64)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        net(x, t, class_labels=labels)
    return counter.get_total_flops() / 16


def cond_edm_loss(
    net: UNet2DModel,
    param: EDMPreconditioned,
    x0: torch.Tensor,
    labels: torch.Tensor,
    gen: torch.Generator,
) -> torch.Tensor:
    """EDM training loss on clean samples x0 [B, 1, 8, 8] with labels [B] (already dropped)."""
    b = x0.shape[0]
    sigma = (torch.randn(b, generator=gen) * base.P_STD + base.P_MEAN).exp()
    x = x0 + sigma.view(-1, 1, 1, 1) * torch.randn(x0.shape, generator=gen)
    c_skip, c_out, c_in, c_noise = param.coefficients(sigma)
    f = net(c_in.view(-1, 1, 1, 1) * x, c_noise, class_labels=labels).sample
    target = (x0 - c_skip.view(-1, 1, 1, 1) * x) / c_out.view(-1, 1, 1, 1)
    return (f - target).square().mean()


def train(
    out_root: Path,
    *,
    iters: int,
    batch: int,
    lr: float,
    ema_halflife: float,
    seed: int,
    max_minutes: float,
    label_dropout: float,
    log_every: int = 200,
) -> dict:
    """Train the conditional model and save it under ``out_root/digits-unet-cond-s``."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data, targets = digits_with_labels()
    net = build_cond_unet("s")
    ema = copy.deepcopy(net).requires_grad_(False)
    param = EDMPreconditioned(base.SIGMA_DATA, base.C_NOISE_SCALE)
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.99), fused=True)
    ema_params, net_params = list(ema.parameters()), list(net.parameters())
    warmup = max(1, min(100, iters // 20))
    start, cpu_start = time.perf_counter(), time.process_time()
    losses: list[float] = []
    done = 0
    for step in range(iters):
        # Warm-up, then cosine decay over the larger of the iteration and CPU-time progress.
        progress = max(step / iters, (time.process_time() - cpu_start) / (max_minutes * 60))
        if progress >= 1.0:
            print(f"stopping at step {step}: {max_minutes} CPU minutes used", flush=True)
            break
        frac = min(1.0, (step + 1) / warmup)
        cos = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress))
        for g in opt.param_groups:
            g["lr"] = lr * frac * cos
        idx = torch.randint(0, data.shape[0], (batch,), generator=gen)
        # Label dropout: the no-class label trains the unconditional mode.
        drop = torch.rand(batch, generator=gen) < label_dropout
        labels = torch.where(drop, torch.full_like(targets[idx], NULL_LABEL), targets[idx])
        loss = cond_edm_loss(net, param, data[idx], labels, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()
        decay = 0.5 ** (1.0 / max(1.0, min(ema_halflife, (step + 1) / 4)))
        with torch.no_grad():
            torch._foreach_lerp_(ema_params, net_params, 1 - decay)
        losses.append(float(loss.detach()))
        done = step + 1
        if done % log_every == 0:
            print(
                f"step {done}/{iters} loss {np.mean(losses[-log_every:]):.4f} "
                f"lr {opt.param_groups[0]['lr']:.2e} "
                f"{(time.perf_counter() - start) / 60:.1f} min "
                f"({(time.process_time() - cpu_start) / 60:.1f} CPU min)",
                flush=True,
            )
    minutes = (time.perf_counter() - start) / 60
    cpu_minutes = (time.process_time() - cpu_start) / 60
    out = out_root / NAME
    out.mkdir(parents=True, exist_ok=True)
    ema.save_pretrained(out, safe_serialization=True)
    flops = forward_flops(ema)
    record = {
        "format": "searchd-digits-unet",
        "shape": list(base.SHAPE),
        # Relative cost of one (unguided) call: forward FLOPs over the unconditional l's.
        "cost": flops / base.forward_flops(base.build_unet("l")),
        "parameterization": {
            "kind": "edm_precond",
            "sigma_data": base.SIGMA_DATA,
            "c_noise_scale": base.C_NOISE_SCALE,
            "sigma_min": 0.002,
            "sigma_max": 80.0,
        },
        "conditioning": {"num_classes": N_CLASSES, "null_label": NULL_LABEL},
        "data": {
            "dataset": "sklearn.datasets.load_digits",
            "n": int(data.shape[0]),
            "scaling": "x / 8 - 1",
            "resolution": 8,
            "labels": "load_digits().target",
        },
        "training": {
            "iterations": done,
            "planned_iterations": iters,
            "batch": batch,
            "lr": lr,
            "ema_halflife_iters": ema_halflife,
            "seed": seed,
            "p_mean": base.P_MEAN,
            "p_std": base.P_STD,
            "label_dropout": label_dropout,
            "minutes": round(minutes, 2),
            "cpu_minutes": round(cpu_minutes, 2),
            "final_loss": float(np.mean(losses[-200:])),
            "threads": 1,
        },
        "parameters": sum(p.numel() for p in net.parameters()),
    }
    (out / "searchd.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"saved to {out} ({done} steps, {minutes:.1f} min, {cpu_minutes:.1f} CPU min)")
    return record


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--iters", type=int, default=40000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ema-halflife", type=float, default=250.0, help="in iterations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--max-minutes", type=float, default=MAX_MINUTES,
                   help="CPU minutes (process time, one thread)")
    p.add_argument("--out", type=Path, default=base.DATA_DIR)
    args = p.parse_args(argv)
    if not 0 < args.label_dropout < 1:
        raise SystemExit(f"--label-dropout {args.label_dropout}: it must be in (0, 1)")
    torch.set_num_threads(1)
    train(args.out, iters=args.iters, batch=args.batch, lr=args.lr,
          ema_halflife=args.ema_halflife, seed=args.seed, max_minutes=args.max_minutes,
          label_dropout=args.label_dropout)


if __name__ == "__main__":
    main()
