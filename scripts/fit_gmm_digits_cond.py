"""Fit ``gmm-digits-cond``: one full-covariance Gaussian mixture per digit class.

Writes ``searchd/models/data/gmm-digits-cond.npz``. Each class's digits (scikit-learn's,
pixels scaled to [-1, 1] like the unconditional zoo, ``scripts/fit_gmm_digits.py``) get their
own EM fit with ``--per-class`` components and the same covariance floor (``reg_covar``)
as the zoo; a component's weight in the unconditional model is its class's frequency times
its weight within the class. The conditional model of class c is then the class's mixture,
the unconditional model the mixture of all classes, both exact
(``searchd.models.conditional.ConditionalGaussianMixture``).

    python scripts/fit_gmm_digits_cond.py                      # the shipped file
    python scripts/fit_gmm_digits_cond.py --per-class 4 --out /tmp/cond.npz
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from sklearn.datasets import load_digits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fit_gmm_digits import DEFAULT_OUT, fit_mixture  # noqa: E402  (the zoo's script, beside this)

from searchd.models.conditional import ConditionalGaussianMixture  # noqa: E402

NAME = "gmm-digits-cond"


def fit_conditional(
    per_class: int, reg_covar: float, seed: int, sigma_min: float, sigma_max: float
) -> ConditionalGaussianMixture:
    """EM fits of every class's digits -> the conditional mixture (float64)."""
    d = load_digits()
    data = d.data.astype(np.float64) / 16.0 * 2.0 - 1.0
    weights, means, covs, classes = [], [], [], []
    for c in range(10):
        xc = data[d.target == c]
        gm, _ = fit_mixture(xc, per_class, reg_covar, seed)
        print(f"class {c}: {xc.shape[0]} digits, converged={gm.converged_} "
              f"iterations={gm.n_iter_} mean log-likelihood={gm.score(xc):.2f}")
        weights.append(gm.weights_ * xc.shape[0] / data.shape[0])
        means.append(gm.means_)
        covs.append(gm.covariances_)
        classes.append(np.full(per_class, c, dtype=np.int64))
    return ConditionalGaussianMixture(
        np.concatenate(weights), np.concatenate(means), np.concatenate(covs),
        np.concatenate(classes), 10, sigma_min=sigma_min, sigma_max=sigma_max, name=NAME,
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--per-class", type=int, default=8, help="components per class")
    p.add_argument("--reg-covar", type=float, default=1e-4, help="covariance floor")
    p.add_argument("--seed", type=int, default=0, help="random_state of the EM fits")
    p.add_argument("--sigma-min", type=float, default=0.002)
    p.add_argument("--sigma-max", type=float, default=80.0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT / f"{NAME}.npz")
    args = p.parse_args(argv)
    den = fit_conditional(args.per_class, args.reg_covar, args.seed, args.sigma_min,
                          args.sigma_max)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    den.save_npz(args.out)
    print(f"wrote {args.out} ({den.n_components} components, {args.out.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
