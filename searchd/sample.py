"""``python -m searchd.sample``: sample a model with one solver and one schedule.

The schedule is a baseline family (``--schedule polynomial --nfe 6``), a searched schedule
(``--schedule runs/x/best.json``: its levels, solver, model and guidance weights), or levels
given on the command line (``--sigmas 80,3.1,0.9,0.2,0``, optionally ``--guidance 1,2,2,1``).
A conditional model's sample i gets class (or prompt) ``seed mod C``, as in a search.
Writes a PNG grid of the samples and prints the NFE spent and, for models with exact samples
(the embedded Gaussian mixtures), the pixel-space Frechet distance against as many exact
samples, with the floor (the same distance between two independent exact sets).

    python -m searchd.sample --model gmm-digits-k64 --solver dpmpp_2m --schedule polynomial \\
        --nfe 6 --out grid.png
    python -m searchd.sample --schedule runs/quickstart/best.json --out best.png
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from searchd.evaluation import FeatureStats, frechet_distance
from searchd.models import Denoiser, known_models, load
from searchd.noise import make_noise, seed_range
from searchd.plots import save_image_grid
from searchd.schedule import validate_sigmas
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
    den: Denoiser, solver: str, sigmas: np.ndarray, seeds: Sequence[int] | range,
    guidance: np.ndarray | None = None, strategy: Sequence[str] | None = None, **opts
) -> Tensor:
    """Samples [len(seeds), *shape] of ``den`` along ``sigmas`` [N+1], noise per seed; a
    conditional model's row i gets the class or prompt of ``seeds[i]``, and ``guidance``
    [N] (None: the model as loaded) the weight of each step; ``strategy``: the solver's
    variant per step (``searchd.solvers.strategy``), or None."""
    from searchd.models.conditional import row_conditioning

    dtype = getattr(den, "dtype", torch.float32)
    device = getattr(den, "device", "cpu")
    noise = make_noise(seeds, tuple(den.shape), device=device, dtype=dtype)
    g = None if guidance is None else torch.as_tensor(guidance, dtype=torch.float64)
    return solve(den, noise, torch.as_tensor(sigmas, dtype=torch.float64), solver=solver,
                 guidance=g, cond=row_conditioning(den, list(seeds)), strategy=strategy,
                 **opts)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Sample a model with one solver and one schedule (a baseline family, a "
        "best.json, or explicit --sigmas); write a PNG grid and print the NFE spent and the "
        "pixel-space Frechet distance to exact samples.",
    )
    p.add_argument("--model", default=None,
                   help="zoo name (default: best.json's model, else gmm-digits)")
    p.add_argument("--solver", default=None,
                   help="ODE solver (default: best.json's solver, else dpmpp_2m)")
    p.add_argument("--schedule", default=None,
                   help="a baseline family (default: polynomial) or a best.json file, whose "
                   "levels, solver and solver options are used")
    p.add_argument("--sigmas", default=None,
                   help="explicit noise levels, comma-separated and decreasing, e.g. "
                   "80,3.1,0.9,0.2,0 (a final 0 makes the last step denoise)")
    p.add_argument("--guidance", default=None,
                   help="classifier-free guidance weight per step, comma-separated (one "
                   "value: every step), e.g. 1,2,2,1; a conditional model only (default: "
                   "best.json's weights, else the model as loaded)")
    p.add_argument("--rho", type=float, default=None, help="rho of the polynomial family")
    p.add_argument("--nfe", type=int, default=None,
                   help="NFE budget of a baseline family (default: 10)")
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


def parse_sigmas(text: str) -> np.ndarray:
    """``--sigmas 80,3.1,0.9,0``: float64 levels [N+1]; ``ValueError`` naming the bad entry."""
    parts = [p.strip() for p in text.split(",")]
    vals = []
    for i, p in enumerate(parts):
        try:
            vals.append(float(p))
        except ValueError:
            raise ValueError(
                f"--sigmas entry {i} = {p!r} is not a number; give comma-separated decreasing "
                "levels, e.g. 80,3.1,0.9,0.2,0"
            ) from None
    try:
        return np.array(validate_sigmas(vals))
    except ValueError as e:
        raise ValueError(f"--sigmas: {e}") from None


def parse_guidance(text: str, n_steps: int) -> np.ndarray:
    """``--guidance 1,2,2,1`` (or one value for every step): float64 weights [N];
    ``ValueError`` naming the bad entry."""
    from searchd.schedule import validate_guidance

    vals = []
    for i, p in enumerate(t.strip() for t in text.split(",")):
        try:
            vals.append(float(p))
        except ValueError:
            raise ValueError(f"--guidance entry {i} = {p!r} is not a number; give one weight "
                             "per step (or one for all), e.g. 1,2,2,1") from None
    if len(vals) == 1:
        vals = vals * n_steps
    try:
        return np.array(validate_guidance(vals, n_steps))
    except ValueError as e:
        raise ValueError(f"--guidance: {e}") from None


def explicit_schedule(args: argparse.Namespace) -> dict | None:
    """The schedule given by ``--sigmas`` or ``--schedule FILE`` (levels, solver, options,
    model, label), or None for a baseline family. ``ValueError`` for conflicting options or
    a bad file, before anything is loaded."""
    is_file = args.schedule is not None and args.schedule not in FAMILIES and (
        args.schedule.endswith(".json") or Path(args.schedule).exists()
    )
    if args.sigmas is None and not is_file:
        return None
    if args.sigmas is not None and args.schedule is not None:
        raise ValueError("give --sigmas or --schedule, not both")
    for flag, value in (("--nfe", args.nfe), ("--rho", args.rho)):
        if value is not None:
            raise ValueError(f"{flag} applies to baseline families; the given schedule fixes "
                             "the steps")
    if args.sigmas is not None:
        return {"sigmas": parse_sigmas(args.sigmas), "solver": args.solver or "dpmpp_2m",
                "options": {}, "model": args.model, "label": "given", "guidance": None}
    from searchd.export import load_best

    best = load_best(args.schedule)
    if best.get("model_ids") is not None:
        raise ValueError(f"{args.schedule}: a model schedule (zoo {best.get('model')}); "
                         "searchd.sample runs one model")
    solver = args.solver or str(best["solver"])
    options = dict(best.get("solver_options") or {}) if solver == best["solver"] else {}
    strategy = best.get("strategy")
    if strategy is not None and solver != best["solver"]:
        raise ValueError(f"{args.schedule}: its per-step strategy is one of {best['solver']}; "
                         f"--solver {solver} cannot run it (leave --solver out)")
    model = args.model
    if model is None:
        model = str(best.get("model"))
        if model not in known_models():
            raise ValueError(f"{args.schedule}: its model {model!r} is not a zoo name; give "
                             "--model")
    sched = best.get("schedule") if isinstance(best.get("schedule"), dict) else {}
    weights = best.get("guidance", sched.get("guidance"))
    return {"sigmas": np.array(validate_sigmas(best["sigmas"])), "solver": solver,
            "options": options, "model": model, "label": args.schedule,
            "strategy": strategy,
            "guidance": None if weights is None else np.asarray(weights, dtype=np.float64)}


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
        return (f"--out {out}: folder {folder} is not writable "
                f"(creating a file there: {e.strerror})")
    return None


def _check_device(device: str) -> str | None:
    """Why ``--device`` is not usable here (None: it is)."""
    if device.startswith("cuda") and not torch.cuda.is_available():
        return f"--device {device}: CUDA is not available on this machine; use --device cpu"
    if device == "mps" and not torch.backends.mps.is_available():
        return "--device mps: MPS is not available on this machine; use --device cpu"
    return None


def _run(args: Any) -> int:
    given = explicit_schedule(args)  # a ValueError: one line, exit 2
    if given is not None:
        args.model, args.solver = given["model"] or "gmm-digits", given["solver"]
    args.model = args.model or "gmm-digits"
    args.solver = args.solver or "dpmpp_2m"
    args.schedule = args.schedule if given is None and args.schedule else "polynomial"
    if args.model not in known_models():
        return _fail(f"unknown model {args.model!r}; known models: {', '.join(known_models())}")
    if args.solver not in SOLVERS:
        return _fail(f"unknown solver {args.solver!r}; known solvers: {', '.join(SOLVERS)}")
    if given is None and args.schedule not in FAMILIES:
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
    budget = 10 if args.nfe is None else args.nfe
    options: dict = {}
    strategy = None if given is None else given.get("strategy")
    guidance = None if given is None else given["guidance"]
    try:
        if given is None:
            steps = steps_for_budget(args.solver, budget)
            sigmas = baseline(args.schedule, steps, den.sigma_min, den.sigma_max, **params)
        else:
            sigmas, options = given["sigmas"], given["options"]
            steps = sigmas.size - 1
            validate_sigmas(sigmas, den.sigma_min, den.sigma_max)
            SOLVERS[args.solver].resolve(options)
            budget = nfe(args.solver, steps, final_zero=bool(sigmas[-1] == 0))
        if args.guidance is not None:
            guidance = parse_guidance(args.guidance, steps)
        if guidance is not None:
            from searchd.schedule import validate_guidance

            validate_guidance(guidance, steps)
    except ValueError as e:
        return _fail(str(e))
    from searchd.models.conditional import supports_guidance

    if guidance is not None and not supports_guidance(den):
        return _fail(f"model {args.model!r} takes no guidance weights (it is not class- or "
                     "text-conditional with an unconditional mode); drop --guidance or give "
                     "--model gmm-digits-cond / digits-unet-cond-s")
    spent = nfe(args.solver, steps, final_zero=bool(sigmas[-1] == 0))

    t0 = time.perf_counter()
    try:
        x = generate(den, args.solver, sigmas, seed_range(args.seed_base, args.n), guidance,
                     strategy, **options)
    except ValueError as e:  # a strategy that does not fit the schedule
        return _fail(str(e))
    seconds = time.perf_counter() - t0
    label = (args.schedule + (f"(rho={args.rho:g})" if args.rho is not None else "")
             if given is None else given["label"])
    print(f"model {args.model}  solver {args.solver}  schedule {label}  samples {args.n}")
    print(f"steps {steps}  NFE spent {spent} (budget {budget})")
    print("sigmas " + " ".join(f"{s:.4g}" for s in sigmas))
    if strategy is not None:
        print("strategy " + " ".join(strategy))
    if guidance is not None:
        from searchd.solvers import network_calls

        calls = network_calls(args.solver, steps, bool(sigmas[-1] == 0), guidance)
        print("guidance " + " ".join(f"{w:.4g}" for w in guidance)
              + f"  network calls {calls} (a step at w != 1 calls the model twice)")
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
