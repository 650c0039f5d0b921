"""``python -m searchd.sample``: sample a model with one solver and one baseline schedule.

Writes a PNG grid of the samples and prints the NFE spent and, for models with exact
samples (the embedded Gaussian mixtures), the pixel-space Frechet distance against as many
exact samples, with the floor (the same distance between two independent exact sets).

    python -m searchd.sample --model gmm-digits-k64 --solver dpmpp_2m --schedule polynomial \\
        --nfe 6 --out grid.png
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from searchd.evaluation import FeatureStats, frechet_distance
from searchd.models import Denoiser, known_models, load
from searchd.noise import make_noise, seed_range
from searchd.plots import save_image_grid
from searchd.schedules.baselines import FAMILIES, baseline
from searchd.solvers import SOLVERS, nfe, solve

# Exact reference samples use seeds far from the noise seeds (seed_base + i), so the two never
# share a generator stream; the floor's second reference set uses another disjoint block.
REFERENCE_SEED_OFFSET = 1_000_000_000
FLOOR_SEED_OFFSET = 2_000_000_000

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def steps_for_budget(solver: str, budget: int, final_zero: bool = True) -> int:
    """The largest step count whose NFE fits ``budget``; ``ValueError`` if none does."""
    if nfe(solver, 1, final_zero=final_zero) > budget:
        raise ValueError(
            f"an NFE budget of {budget} is too small for {solver} "
            f"(one step costs {nfe(solver, 1, final_zero=final_zero)})"
        )
    n = 1
    while nfe(solver, n + 1, final_zero=final_zero) <= budget:
        n += 1
    return n


def frechet_distance_pixels(a: Tensor, b: Tensor) -> float:
    """Frechet distance between Gaussians fitted to two sample sets [N, ...], flattened.

    Pixel space: the identity feature map. Float64 statistics (``FeatureStats``) and the
    exact distance of ``searchd.evaluation``.
    """
    sa = FeatureStats.from_features(a.reshape(a.shape[0], -1))
    sb = FeatureStats.from_features(b.reshape(b.shape[0], -1))
    return frechet_distance(sa.mean, sa.cov, sb.mean, sb.cov)


def generate(
    den: Denoiser, solver: str, sigmas: np.ndarray, seeds: Sequence[int] | range, **opts
) -> Tensor:
    """Samples [len(seeds), *shape] of ``den`` along ``sigmas`` [N+1], noise per seed."""
    dtype = getattr(den, "dtype", torch.float32)
    device = getattr(den, "device", "cpu")
    noise = make_noise(seeds, tuple(den.shape), device=device, dtype=dtype)
    return solve(den, noise, torch.as_tensor(sigmas, dtype=torch.float64), solver=solver, **opts)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Sample a model with one solver and one baseline schedule; write a PNG "
        "grid and print the NFE spent and the pixel-space Frechet distance to exact samples.",
    )
    p.add_argument("--model", default="gmm-digits", help="zoo name (default: gmm-digits)")
    p.add_argument("--solver", default="dpmpp_2m", help="ODE solver (default: dpmpp_2m)")
    p.add_argument("--schedule", default="polynomial", help="baseline family")
    p.add_argument("--rho", type=float, default=None, help="rho of the polynomial family")
    p.add_argument("--nfe", type=int, default=10, help="NFE budget (default: 10)")
    p.add_argument("--n", type=int, default=1000, help="number of samples (default: 1000)")
    p.add_argument("--seed-base", type=int, default=0, help="sample i uses seed seed_base + i")
    p.add_argument("--out", default="grid.png", help="PNG grid of the first 64 samples")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    return p


PROG = "python -m searchd.sample"


def _fail(message: str) -> int:
    from searchd import cli

    return cli.fail(PROG, message, cli.EXIT_BAD_INPUT)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; returns the exit status (2 for bad input, 1 for a failure; one line
    on stderr: ``python -m searchd.sample: error: ...``)."""
    from searchd import cli

    args = _parser().parse_args(argv)
    return cli.run_command(PROG, lambda: _run(args), bad=(ValueError,))


def _check_out(out: str) -> str | None:
    """Why ``--out`` cannot be written (None: it can)."""
    import os
    import tempfile

    folder = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out):
        return f"--out {out} is a folder; give a .png file name"
    if not os.path.isdir(folder):
        return f"--out {out}: folder {folder} does not exist"
    try:  # the one sure test, whoever runs it: write a scratch file there
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".searchd-"):
            pass
    except OSError as e:
        return f"--out {out}: folder {folder} is not writable (creating a file there: {e.strerror})"
    return None


def _check_device(device: str) -> str | None:
    """Why ``--device`` is not usable here (None: it is)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        return f"--device {device}: CUDA is not available on this machine; use --device cpu"
    if device == "mps" and not torch.backends.mps.is_available():
        return "--device mps: MPS is not available on this machine; use --device cpu"
    return None


def _run(args: Any) -> int:
    if args.model not in known_models():
        return _fail(f"unknown model {args.model!r}; known models: {', '.join(known_models())}")
    if args.solver not in SOLVERS:
        return _fail(f"unknown solver {args.solver!r}; known solvers: {', '.join(SOLVERS)}")
    if args.schedule not in FAMILIES:
        return _fail(
            f"unknown schedule family {args.schedule!r}; known families: {', '.join(FAMILIES)}"
        )
    if args.rho is not None and args.schedule != "polynomial":
        return _fail("--rho applies to the polynomial family only")
    if args.n < 2:
        return _fail(f"--n {args.n}: at least 2 samples are needed for a Frechet distance")
    if args.seed_base < 0:
        return _fail(f"--seed-base {args.seed_base} must be >= 0")
    problem = _check_out(args.out) or _check_device(args.device)
    if problem is not None:
        return _fail(problem)

    den = load(args.model, device=args.device, dtype=DTYPES[args.dtype])
    params = {} if args.rho is None else {"rho": args.rho}
    try:
        steps = steps_for_budget(args.solver, args.nfe)
        sigmas = baseline(args.schedule, steps, den.sigma_min, den.sigma_max, **params)
    except ValueError as e:
        return _fail(str(e))
    spent = nfe(args.solver, steps, final_zero=True)

    t0 = time.perf_counter()
    x = generate(den, args.solver, sigmas, seed_range(args.seed_base, args.n))
    seconds = time.perf_counter() - t0
    label = args.schedule + (f"(rho={args.rho:g})" if args.rho is not None else "")
    print(f"model {args.model}  solver {args.solver}  schedule {label}  samples {args.n}")
    print(f"steps {steps}  NFE spent {spent} (budget {args.nfe})")
    print("sigmas " + " ".join(f"{s:.4g}" for s in sigmas))
    print(f"sampling {seconds:.2f} s ({args.n / seconds:.0f} samples/s)")

    sample_data = getattr(den, "sample_data", None)
    if sample_data is not None:
        ref = sample_data(seed_range(REFERENCE_SEED_OFFSET + args.seed_base, args.n))
        ref2 = sample_data(seed_range(FLOOR_SEED_OFFSET + args.seed_base, args.n))
        fd = frechet_distance_pixels(x, ref)
        floor = frechet_distance_pixels(ref2, ref)
        print(f"FD (pixels, vs {args.n} exact samples) {fd:.4f}")
        print(f"floor (FD of {args.n} exact vs {args.n} exact samples) {floor:.4f}")
    else:
        print("FD: this model has no exact samples")

    if len(den.shape) == 3:
        # Ink dark on white (the grey_r look of the digits data set): pass -x.
        grid = -x[:64].to("cpu", torch.float64).numpy()
        print(f"wrote {save_image_grid(grid, args.out, ncols=8, scale=8)}")
    else:
        print(f"no grid written: samples of shape {tuple(den.shape)} are not images")
    return 0


if __name__ == "__main__":
    sys.exit(main())
