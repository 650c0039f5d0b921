"""Train the rectified-flow digits zoo: diffusers ``UNet2DModel``s with the flow-matching loss.

    python scripts/train_digits_flow.py [--widths s,m] [--max-minutes 8,12] [--out DIR]
        [--init-from DIR]   # a further stage, continuing from saved models

The shipped weights (searchd/models/data/digits-flow-{s,m}/) come from these runs, one width
at a time, each under ``nice`` on a shared 2-core machine:

    nice python scripts/train_digits_flow.py --widths s --max-minutes 8
    nice python scripts/train_digits_flow.py --widths m --max-minutes 12

Each model's ``searchd.json`` records its training (iterations, CPU and wall minutes, loss,
the t distribution; earlier stages under ``training.stages``).

Model: rectified flow as SD3 and diffusers' ``FlowMatchEulerDiscreteScheduler`` define it,
``x_t = (1 - t) x0 + t n`` (noise at t = 1), the network predicting the velocity
``v = n - x0`` from ``(x_t, timestep = 1000 t)``; nothing is preconditioned, so the folder
is an ordinary diffusers flow checkpoint. It ships the network (``config.json``,
``diffusion_pytorch_model.safetensors``) and ``scheduler_config.json`` (a
``FlowMatchEulerDiscreteScheduler``, shift 1), and its ``searchd.json`` names *no*
parameterization: searchd's diffusers adapter reads the flow parameterization from the
scheduler config, exactly as it does for a user's SD3-style checkpoint. In searchd's EDM
convention ``x = x0 + sigma n`` this is ``sigma = t / (1 - t)``, ``x = x_t / (1 - t)``.

Loss: ``|F(x_t, 1000 t) - (n - x0)|^2`` (conditional flow matching), with t drawn
**logit-normal**, ``logit(t) ~ N(-0.8, 1.2^2)``, as SD3 draws it (SD3 uses N(0, 1)). Why
logit-normal and these numbers: since ``sigma = t / (1 - t)``, ``logit(t) = ln(sigma)``, so a
logit-normal t *is* EDM's log-normal training noise. The digits EDM zoo
(``scripts/train_digits_unet.py``) was trained with ``ln(sigma) ~ N(-0.8, 1.2^2)`` (EDM's
-1.2 shifted for the digits' larger sigma_data) and reaches the recognizability bar with the
same networks and CPU time; keeping that distribution makes the two zoos differ only in
what the network predicts (a velocity, unweighted, instead of EDM's preconditioned x0), which
is the difference the flow members are for. Uniform t (the original rectified-flow recipe)
spends a quarter of its samples at t > 0.75 (sigma > 3), where the velocity is nearly
``n - mean`` and easy, and as many at t < 0.25 (sigma < 1/3), whose error is scaled by t
in the denoised image; SD3 measured logit-normal to be the better of the two (Esser et al.,
2024, section 5.1). An 8x8 image is destroyed by less noise than SD3's latents, which is why
the location sits below SD3's 0 (SD3 shifts toward more noise for larger images).

Data (scikit-learn's 1,797 digits scaled to [-1, 1], kept at 8x8), networks (the digits
UNet widths s and m), the training loop (``train_digits_unet.fit``: Adam, linear warm-up
then cosine decay following the CPU time used, gradient clipping 1, EMA of the weights, which
is what is saved) and the CPU-time bound (one thread, ``--max-minutes`` of process time) are
those of ``scripts/train_digits_unet.py``, so the flow and EDM zoos compare like for like.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel
from train_digits_unet import (
    DATA_RECORD,
    SHAPE,
    build_unet,
    digits_data,
    fit,
    forward_flops,
    load_stage,
    stage_totals,
)

DATA_DIR = Path(__file__).resolve().parents[1] / "searchd" / "models" / "data"
NUM_TRAIN_TIMESTEPS = 1000  # the network is fed 1000 t, as SD3-style models are
# logit(t) ~ N(T_MEAN, T_STD^2), i.e. ln(sigma) ~ N(-0.8, 1.2^2) (see the docstring).
T_MEAN, T_STD = -0.8, 1.2
WIDTHS = ("s", "m")
# CPU minutes per width of the shipped models (one thread).
MAX_MINUTES: dict[str, float] = {"s": 8.0, "m": 12.0}


def sample_t(b: int, gen: torch.Generator) -> torch.Tensor:
    """Training times t [b] in (0, 1), logit-normal: ``t = sigmoid(T_MEAN + T_STD z)``."""
    return torch.sigmoid(torch.randn(b, generator=gen) * T_STD + T_MEAN)


def flow_loss(net: UNet2DModel, x0: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Conditional flow-matching loss on clean samples x0 [B, 1, 8, 8]: the network, fed
    ``x_t = (1 - t) x0 + t n`` and ``1000 t``, regresses the velocity ``n - x0``."""
    b = x0.shape[0]
    t = sample_t(b, gen)
    n = torch.randn(x0.shape, generator=gen)
    tt = t.view(-1, 1, 1, 1)
    x_t = (1 - tt) * x0 + tt * n
    v = net(x_t, NUM_TRAIN_TIMESTEPS * t).sample
    return (v - (n - x0)).square().mean()


def scheduler() -> FlowMatchEulerDiscreteScheduler:
    """The scheduler config shipped beside each network (what diffusers and searchd read)."""
    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=1.0)


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
    cost: float,
    init_from: Path | None = None,
    log_every: int = 200,
) -> dict:
    """Train one width and save it under ``out_root/digits-flow-<width>``; returns its record.

    With ``init_from``, training continues from the model saved in
    ``init_from/digits-flow-<width>`` (fresh optimizer and warm-up; earlier stages' records
    kept in ``training.stages``).
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    data = digits_data()
    stages: list[dict] = []
    if init_from is not None:
        net, stages = load_stage(init_from / f"digits-flow-{width}")
    else:
        net = build_unet(width)
    ema, run = fit(net, flow_loss, data, gen, iters=iters, batch=batch, lr=lr,
                   ema_halflife=ema_halflife, max_minutes=max_minutes, tag=width,
                   log_every=log_every)
    out = out_root / f"digits-flow-{width}"
    out.mkdir(parents=True, exist_ok=True)
    ema.save_pretrained(out, safe_serialization=True)
    scheduler().save_pretrained(out)
    run["seed"] = seed
    run["t_sampling"] = {"kind": "logit_normal", "mean": T_MEAN, "std": T_STD}
    record = {
        "format": "searchd-digits-flow",
        "shape": list(SHAPE),
        "cost": cost,
        "model": {
            "kind": "rectified_flow",
            "x_t": "(1 - t) x0 + t n",
            "prediction": "velocity n - x0",
            "timestep": f"{NUM_TRAIN_TIMESTEPS} t",
            "scheduler": "scheduler_config.json (FlowMatchEulerDiscreteScheduler)",
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
    p.add_argument("--widths", default="s,m")
    p.add_argument("--iters", type=int, default=20000, help="iterations per width (an upper "
                   "bound: --max-minutes usually binds first)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ema-halflife", type=float, default=250.0, help="in iterations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-minutes", default=None,
                   help="CPU minutes per width (process time, one thread): one value, or one "
                   f"per width (default: {MAX_MINUTES})")
    p.add_argument("--out", type=Path, default=DATA_DIR)
    p.add_argument("--init-from", type=Path, default=None,
                   help="continue training the models saved in this folder (another stage)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    widths = [w.strip() for w in args.widths.split(",")]
    unknown = [w for w in widths if w not in WIDTHS]
    if unknown:
        raise SystemExit(f"unknown widths {unknown}; known: {list(WIDTHS)}")
    if args.max_minutes is None:
        minutes = [MAX_MINUTES[w] for w in widths]
    else:
        minutes = [float(v) for v in args.max_minutes.split(",")]
        minutes = minutes * len(widths) if len(minutes) == 1 else minutes
    if len(minutes) != len(widths):
        raise SystemExit("--max-minutes needs one value or one per width")
    # Relative cost of one call: forward FLOPs over the largest digits UNet's (width l), the
    # unit of the EDM zoo's costs, so both zoos share it.
    flops_l = forward_flops(build_unet("l"))
    for w, m in zip(widths, minutes):
        train_width(
            w, args.out, iters=args.iters, batch=args.batch, lr=args.lr,
            ema_halflife=args.ema_halflife, seed=args.seed, max_minutes=m,
            cost=forward_flops(build_unet(w)) / flops_l, init_from=args.init_from,
        )


if __name__ == "__main__":
    main()
