"""Pixel-space Frechet distance vs NFE for every solver x baseline family on the embedded zoo.

    python benchmarks/solvers.py [--n 4000] [--models gmm-digits-k64] [--out FILE.md]

For each zoo member: the floor (FD between two independent sets of n exact samples), then per
solver a table of FD (n samples on noise seeds 0..n-1 against n exact samples on disjoint
seeds) for each schedule family and NFE budget, where the budget gets the largest step count
whose NFE fits (final_zero=True), and the sampling throughput. The last section is the
acceptance check of the largest member: at NFE 5 with dpmpp_2m the best of polynomial
(rho=7), logsnr and time_uniform must be at least 10x the floor.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from pathlib import Path

import torch

from searchd.models import known_models, load
from searchd.noise import make_noise, seed_range
from searchd.sample import (
    FLOOR_SEED_OFFSET,
    REFERENCE_SEED_OFFSET,
    frechet_distance_pixels,
    steps_for_budget,
)
from searchd.schedules import baseline
from searchd.solvers import SOLVERS, nfe, solve

FAMILIES = ("polynomial", "logsnr", "time_uniform", "time_quadratic")
CHECK_FAMILIES = ("polynomial", "logsnr", "time_uniform")
CHECK_SOLVER, CHECK_NFE, CHECK_RATIO = "dpmpp_2m", 5, 10.0


def zoo_members() -> list[str]:
    """The embedded members, smallest first."""
    names = [n for n in known_models() if n.startswith("gmm-digits-k")]
    return sorted(names, key=lambda n: int(n.removeprefix("gmm-digits-k")))


def family_label(family: str) -> str:
    return "polynomial (rho=7)" if family == "polynomial" else family


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=4000, help="samples per FD (default 4000)")
    p.add_argument("--models", default=",".join(zoo_members()))
    p.add_argument("--solvers", default=",".join(SOLVERS))
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--nfes", default="4,5,6,8,10,20", help="NFE budgets")
    p.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=None, help="also write the markdown here")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    budgets = [int(b) for b in args.nfes.split(",")]
    families = args.families.split(",")
    solvers = args.solvers.split(",")
    models = args.models.split(",")
    seeds = seed_range(0, args.n)
    out: list[str] = []

    def emit(line: str = "") -> None:
        out.append(line)
        print(line, flush=True)

    emit("# Solvers x schedule families on the embedded zoo")
    emit()
    emit(
        f"{datetime.date.today()}, torch {torch.__version__}, {os.cpu_count()} CPU cores, "
        f"torch threads {torch.get_num_threads()}, "
        f"load average at start {os.getloadavg()[0]:.2f}, {args.dtype}. FD: pixel space (64-d), "
        f"float64, {args.n} samples (noise seeds 0..{args.n - 1}) against {args.n} exact "
        f"samples (seeds {REFERENCE_SEED_OFFSET}+i). The floor is the FD between those and "
        f"another {args.n} exact samples (seeds {FLOOR_SEED_OFFSET}+i). NFE is the budget: the "
        "largest step count whose NFE fits, final_zero=True. Solvers with their default options; "
        "samples/s: solver time only (median over families), noise drawn beforehand."
    )
    check: dict[str, float] = {}
    for name in models:
        den = load(name, dtype=dtype)
        noise = make_noise(seeds, den.shape, dtype=dtype)
        ref = den.sample_data(seed_range(REFERENCE_SEED_OFFSET, args.n))
        floor = frechet_distance_pixels(den.sample_data(seed_range(FLOOR_SEED_OFFSET, args.n)), ref)
        emit()
        emit(f"## {name}")
        emit()
        emit(
            f"K = {den.n_components}, cost {den.cost:.3g}, sigma in [{den.sigma_min}, "
            f"{den.sigma_max}]. **Floor: {floor:.4f}**"
        )
        for solver in solvers:
            steps = {}
            for b in budgets:
                try:
                    steps[b] = steps_for_budget(solver, b)
                except ValueError:
                    steps[b] = None
            emit()
            emit(f"### {name} / {solver}")
            emit()
            emit("| family | " + " | ".join(f"NFE {b}" for b in budgets) + " |")
            emit("| --- |" + " ---: |" * len(budgets))
            emit(
                "| steps (NFE spent) | "
                + " | ".join(
                    "-" if steps[b] is None else f"{steps[b]} ({nfe(solver, steps[b])})"
                    for b in budgets
                )
                + " |"
            )
            rates: dict[int, list[float]] = {b: [] for b in budgets}
            best: dict[int, float] = {}
            for family in families:
                cells = []
                for b in budgets:
                    if steps[b] is None:
                        cells.append("-")
                        continue
                    sigmas = baseline(family, steps[b], den.sigma_min, den.sigma_max)
                    t0 = time.perf_counter()
                    x = solve(den, noise, sigmas, solver=solver)
                    rates[b].append(args.n / (time.perf_counter() - t0))
                    fd = frechet_distance_pixels(x, ref)
                    best[b] = min(best.get(b, float("inf")), fd)
                    cells.append(f"{fd:.4f}")
                    if solver == CHECK_SOLVER and b == CHECK_NFE and family in CHECK_FAMILIES:
                        if name == models[-1]:
                            check[family] = fd
                emit(f"| {family_label(family)} | " + " | ".join(cells) + " |")
            emit(
                "| best / floor | "
                + " | ".join(f"{best[b] / floor:.1f}x" if b in best else "-" for b in budgets)
                + " |"
            )
            emit(
                "| samples/s | "
                + " | ".join(
                    f"{statistics.median(rates[b]):,.0f}" if rates[b] else "-" for b in budgets
                )
                + " |"
            )
        if name == models[-1]:
            check["floor"] = floor

    if len(check) == len(CHECK_FAMILIES) + 1:
        floor = check.pop("floor")
        fam, fd = min(check.items(), key=lambda kv: kv[1])
        ratio = fd / floor
        emit()
        emit(f"## Check: {models[-1]}, {CHECK_SOLVER}, NFE {CHECK_NFE}")
        emit()
        emit(
            f"Best of {', '.join(CHECK_FAMILIES)}: {fam} with FD {fd:.4f} = {ratio:.1f}x the "
            f"floor {floor:.4f}, {args.n} samples each (required with 10,000 samples: "
            f">= {CHECK_RATIO:g}x): " + ("PASS" if ratio >= CHECK_RATIO else "FAIL")
        )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(out) + "\n")


if __name__ == "__main__":
    main()
