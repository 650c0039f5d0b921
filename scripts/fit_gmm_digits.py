"""Fit the embedded zoo: full-covariance Gaussian mixtures of scikit-learn's 8x8 digits.

Writes ``searchd/models/data/gmm-digits-k{K}.npz`` for each size. Pixels (0..16) are scaled
to [-1, 1]; every covariance gets a floor added to its diagonal (scikit-learn's
``reg_covar``), which sets how sharp the components are and so how much the sampling
schedule matters (see docs/notes-gmm.md for the tuning). ``cost`` of each member is its
measured time per call on ``--timing-batch`` samples (float32, CPU, median of
``--timing-repeats``) divided by that of the largest member, so the largest costs 1.0.

    python scripts/fit_gmm_digits.py                 # the shipped files
    python scripts/fit_gmm_digits.py --sizes 1,8,64 --reg-covar 1e-4 --out-dir /tmp/zoo
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.mixture import GaussianMixture

from searchd.models.gmm import GaussianMixtureDenoiser

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "searchd" / "models" / "data"


def digits_pixels() -> np.ndarray:
    """scikit-learn's digits as float64 [1797, 64], pixel values 0..16 scaled to [-1, 1]."""
    return load_digits().data.astype(np.float64) / 16.0 * 2.0 - 1.0


def fit_mixture(
    data: np.ndarray, n_components: int, reg_covar: float, seed: int
) -> tuple[GaussianMixture, GaussianMixtureDenoiser]:
    """EM fit of a full-covariance mixture [N, 64] -> (the sklearn model, the denoiser)."""
    gm = GaussianMixture(
        n_components=n_components,
        covariance_type="full",
        reg_covar=reg_covar,
        max_iter=1000,
        n_init=1,
        random_state=seed,
    )
    gm.fit(data)
    den = GaussianMixtureDenoiser(
        gm.weights_, gm.means_, gm.covariances_, name=f"gmm-digits-k{n_components}"
    )
    return gm, den


def time_per_call(den: GaussianMixtureDenoiser, batch: int, repeats: int) -> float:
    """Median seconds of one float32 CPU call on ``batch`` samples at sigma = 1."""
    x = torch.randn(batch, *den.shape, generator=torch.Generator().manual_seed(0))
    sigma = torch.ones(batch)
    den(x, sigma)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        den(x, sigma)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="1,8,64", help="component counts, comma-separated")
    p.add_argument("--reg-covar", type=float, default=1e-4, help="covariance floor")
    p.add_argument("--seed", type=int, default=0, help="random_state of the EM fit")
    p.add_argument("--sigma-min", type=float, default=0.002)
    p.add_argument("--sigma-max", type=float, default=80.0)
    p.add_argument("--timing-batch", type=int, default=10_000)
    p.add_argument("--timing-repeats", type=int, default=7)
    p.add_argument("--out-dir", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)

    data = digits_pixels()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    members = []
    for k in sizes:
        gm, den = fit_mixture(data, k, args.reg_covar, args.seed)
        den.sigma_min, den.sigma_max = args.sigma_min, args.sigma_max
        seconds = time_per_call(den, args.timing_batch, args.timing_repeats)
        members.append((den, seconds))
        print(
            f"{den.name}: converged={gm.converged_} iterations={gm.n_iter_} "
            f"mean log-likelihood={gm.score(data):.2f} "
            f"min eigenvalue={float(den.eigvals.min()):.3g} "
            f"time per call ({args.timing_batch} samples)={seconds * 1e3:.1f} ms"
        )
    largest = members[-1][1]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for den, seconds in members:
        den.cost = seconds / largest
        path = args.out_dir / f"{den.name}.npz"
        den.save_npz(path)
        print(f"wrote {path} (cost {den.cost:.4f})")


if __name__ == "__main__":
    main()
