"""Held-out scoring: the vectorized bootstrap against an explicit one, its spread against
Monte Carlo, its coverage, and paired differences through an Evaluator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from searchd.evaluation import Evaluator, FrechetReference, frechet_distance, heldout_scores
from searchd.evaluation.heldout import bootstrap_counts, bootstrap_fid, bootstrap_interval
from searchd.evaluation.reference import compute_reference
from searchd.schedule import Schedule
from searchd.schedules import baseline

M_GEN, S_GEN = np.array([0.3, 0.0]), np.diag([1.5, 0.7])
REF = FrechetReference(np.zeros(2), np.eye(2))
TRUTH = frechet_distance(M_GEN, S_GEN, np.zeros(2), np.eye(2))


def draw(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).multivariate_normal(M_GEN, S_GEN, n)


def test_vectorized_bootstrap_equals_recomputing_each_resample():
    rng = np.random.default_rng(0)
    f = rng.standard_normal((150, 6)) @ rng.standard_normal((6, 6))
    ref_feats = rng.standard_normal((400, 6))
    ref = FrechetReference(ref_feats.mean(0), np.cov(ref_feats.T))
    counts = bootstrap_counts(150, 4, seed=3)
    assert torch.equal(counts.sum(1), torch.full((4,), 150.0, dtype=torch.float64))
    fast = bootstrap_fid(f, ref, counts)
    brute = []
    for b in range(4):
        x = np.repeat(f, counts[b].numpy().astype(int), axis=0)  # the resampled set
        exact = frechet_distance(x.mean(0), np.cov(x.T), ref_feats.mean(0), np.cov(ref_feats.T))
        assert float(fast[b]) == pytest.approx(exact, rel=1e-8)
        brute.append(exact)
    # The interval is that of the brute-force resampled FIDs (its definition).
    est = frechet_distance(f.mean(0), np.cov(f.T), ref_feats.mean(0), np.cov(ref_feats.T))
    lo, hi = np.quantile(brute, [0.025, 0.975]) + (est - np.mean(brute))
    assert bootstrap_interval(fast, est) == pytest.approx((lo, hi), rel=1e-8)


def test_mixed_precision_bootstrap_gives_the_brute_force_interval(monkeypatch):
    """From ``_MIXED_MIN_SAMPLES`` samples on, the resample's deviation is summed in float32:
    each bootstrap FID stays within 1e-6 of the brute-force resample's, and so does the
    interval (here forced on a small case)."""
    from searchd.evaluation import heldout

    monkeypatch.setattr(heldout, "_MIXED_MIN_SAMPLES", 0)
    rng = np.random.default_rng(4)
    f = 2.0 + rng.standard_normal((400, 5)) @ rng.standard_normal((5, 5))
    ref_feats = rng.standard_normal((600, 5))
    ref = FrechetReference(ref_feats.mean(0), np.cov(ref_feats.T))
    counts = bootstrap_counts(400, 40, seed=1)
    fast = bootstrap_fid(f, ref, counts)
    brute = [frechet_distance(*(lambda x: (x.mean(0), np.cov(x.T)))(
        np.repeat(f, counts[b].numpy().astype(int), axis=0)),
        ref_feats.mean(0), np.cov(ref_feats.T)) for b in range(40)]
    np.testing.assert_allclose(fast.numpy(), brute, rtol=1e-6)
    est = frechet_distance(f.mean(0), np.cov(f.T), ref_feats.mean(0), np.cov(ref_feats.T))
    lo, hi = np.quantile(brute, [0.025, 0.975]) + (est - np.mean(brute))
    assert bootstrap_interval(fast, est) == pytest.approx((lo, hi), rel=1e-6)


def test_bootstrap_spread_matches_the_sampling_spread():
    """The bootstrap standard deviation of FID estimates the standard deviation of FID over
    independent data sets (Monte Carlo)."""
    n = 400
    mc = [REF.distance(x.mean(0), np.cov(x.T)) for x in (draw(n, s) for s in range(300))]
    counts = bootstrap_counts(n, 400, seed=0)
    boot = np.mean([bootstrap_fid(draw(n, 1000 + s), REF, counts).std().item() for s in range(6)])
    assert 0.75 < boot / np.std(mc) < 1.33


def test_intervals_cover_the_truth():
    """Centered intervals cover the expected FID at n (Monte Carlo); basic intervals cover the
    population distance; both near the nominal 95% over repeated experiments."""
    n, reps = 300, 40
    expected = np.mean([REF.distance(x.mean(0), np.cov(x.T)) for x in
                        (draw(n, 5000 + s) for s in range(400))])
    counts = bootstrap_counts(n, 200, seed=1)
    centered = basic = 0
    for r in range(reps):
        x = draw(n, r)
        est, boot = REF.distance(x.mean(0), np.cov(x.T)), bootstrap_fid(x, REF, counts)
        lo, hi = bootstrap_interval(boot, est, method="centered")
        centered += lo <= expected <= hi
        lo, hi = bootstrap_interval(boot, est, method="basic")
        basic += lo <= TRUTH <= hi
    assert centered / reps >= 0.85 and basic / reps >= 0.85
    with pytest.raises(ValueError, match="unknown interval"):
        bootstrap_interval(boot, est, method="bca")


class Gaussian:
    """Exact denoiser of N(mu, diag(v)) on 8x8 images (see test_evaluation_evaluate.py)."""

    sigma_min, sigma_max, sigma_grid, cost = 0.002, 80.0, None, 1.0
    shape, dtype, device = (1, 8, 8), torch.float64, torch.device("cpu")

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.mu = (torch.rand(self.shape, generator=g, dtype=torch.float64) - 0.5) * 0.8
        self.v = 0.05 + 0.2 * torch.rand(self.shape, generator=g, dtype=torch.float64)

    def __call__(self, x, sigma, **cond):
        return self.mu + self.v / (self.v + sigma.reshape(-1, 1, 1, 1) ** 2) * (x - self.mu)

    def sample(self, n: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return self.mu + self.v.sqrt() * torch.randn((n, *self.shape), generator=g,
                                                     dtype=torch.float64)


def test_heldout_scores_with_paired_differences():
    den = Gaussian()
    ev = Evaluator(den, "pixels", None, metrics=("teacher_distance",))
    ev_ref = compute_reference([den.sample(2000, 0)], ev.features, {"source": "gaussian"})
    ev = Evaluator(den, "pixels", ev_ref)
    scheds = [Schedule(baseline("polynomial", 4, 0.002, 80.0, rho=r)) for r in (7.0, 6.0, 2.0)]
    seeds = range(5000, 5400)
    out = heldout_scores(ev, scheds, seeds, baseline_index=0, resamples=300,
                         search_seeds=range(0, 1000))
    base, near, far = out["scores"]
    assert out["baseline_id"] == scheds[0].id and out["n_samples"] == 400
    assert base["diff"] == 0.0 and base["diff_ci"] == [0.0, 0.0]
    for s in out["scores"]:
        assert s["status"] == "ok" and s["fid_ci"][0] <= s["fid"] <= s["fid_ci"][1]
    # The point FID is the evaluator's FID on the same seeds.
    (r,) = ev.evaluate(scheds[2:], seeds)
    assert far["fid"] == pytest.approx(r.metrics["fid"], rel=1e-9)
    # Paired: the interval of a difference is narrower than the two intervals combined.
    width = near["diff_ci"][1] - near["diff_ci"][0]
    assert width < (near["fid_ci"][1] - near["fid_ci"][0]) + (base["fid_ci"][1] - base["fid_ci"][0])
    assert far["diff_ci"][0] > 0  # rho = 2 is clearly worse than rho = 7 at 4 steps
    with pytest.raises(ValueError, match="overlap the search seeds"):
        heldout_scores(ev, scheds, range(900, 1100), search_seeds=range(0, 1000))


def test_heldout_parts_on_several_workers_equal_one_pass():
    """The held-out phase split over workers (``heldout_part`` per group of schedules,
    ``combine_parts`` in the driver) gives bitwise the values of ``heldout_scores`` on one
    evaluator; a failed schedule stays failed with its reason."""
    from searchd.evaluation.heldout import combine_parts, heldout_part

    den = Gaussian()
    ev = Evaluator(den, "pixels", None, metrics=("teacher_distance",))
    ev_ref = compute_reference([den.sample(2000, 0)], ev.features, {"source": "gaussian"})
    ev = Evaluator(den, "pixels", ev_ref, batch_size=150)  # chunks cross schedules
    scheds = [Schedule(baseline("polynomial", 4, 0.002, 80.0, rho=r)) for r in (7.0, 6.0, 2.0)]
    bad = Schedule([200.0, 1.0, 0.0])  # above the model's sigma_max: fails alone
    seeds = range(5000, 5400)
    whole = heldout_scores(ev, [*scheds, bad], seeds, baseline_index=1, resamples=120)
    parts = heldout_part(ev, scheds[:1], seeds, resamples=120) + \
        heldout_part(ev, [scheds[1]], seeds, resamples=120) + \
        heldout_part(ev, [scheds[2], bad], seeds, resamples=120)
    assert combine_parts(parts, seeds, baseline_index=1, resamples=120) == whole
    assert whole["scores"][3]["status"] == "failed" and "invalid" in whole["scores"][3]["error"]


@pytest.mark.parametrize("outer_elements", [1 << 22, 40])
@pytest.mark.parametrize("max_dim,mixed", [(256, False), (256, True), (0, False)])
def test_weighted_grams_equal_the_direct_products(monkeypatch, outer_elements, max_dim,
                                                  mixed):
    """Both paths (packed outer products, in one block or in many with a ragged last one,
    their deviation part in float32; the batched product in float64) give
    ``G^T diag(c) G`` for every resample, to float32's rounding of the deviation."""
    from searchd.evaluation import heldout

    monkeypatch.setattr(heldout, "_OUTER_ELEMENTS", outer_elements)
    monkeypatch.setattr(heldout, "_PACKED_MAX_DIM", max_dim)
    monkeypatch.setattr(heldout, "_MIXED_MIN_SAMPLES", 0 if mixed else 1 << 30)
    rng = np.random.default_rng(1)
    g = torch.as_tensor(3.0 + rng.standard_normal((103, 7)))  # features with a mean
    counts = bootstrap_counts(103, 5, seed=2)
    got = heldout.weighted_grams(g, counts)
    assert got.dtype == torch.float64
    tol = 1e-6 if mixed else 1e-12
    for b in range(5):
        want = g.numpy().T @ np.diag(counts[b].numpy()) @ g.numpy()
        np.testing.assert_allclose(got[b].numpy(), want, rtol=0, atol=tol * np.abs(want).max())


def test_paired_table_takes_read_only_bootstrap_values_without_sharing_them():
    """Bootstrap values that crossed Ray's object store are read-only NumPy views: the table
    copies them (no torch warning about non-writable arrays) and gives the same numbers."""
    import warnings

    from searchd.evaluation.heldout import paired_table

    rng = np.random.default_rng(0)
    boots = [rng.normal(1.0, 0.1, 200), rng.normal(1.5, 0.1, 200)]
    frozen = [b.copy() for b in boots]
    for b in frozen:
        b.setflags(write=False)
    kw = dict(ids=["a", "b"], seeds=range(100), metric="fid", resamples=200)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = paired_table([1.0, 1.5], frozen, **kw)
    assert got == paired_table([1.0, 1.5], boots, **kw)
    assert got["scores"][1]["diff"] == pytest.approx(0.5)
