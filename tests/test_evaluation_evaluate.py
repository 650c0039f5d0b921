"""Population-batched scoring: equivalence with one-at-a-time scoring, common random numbers,
failure isolation, the teacher distance, and plain-data results.

The test model is an analytic Gaussian denoiser with per-pixel variances,
``D(x, s) = mu + v / (v + s^2) (x - mu)``: every row is computed on its own (elementwise), so
any dependence of a result on the batch layout would come from the evaluation code.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from searchd.evaluation import (
    CandidateResult,
    Evaluator,
    FeatureStats,
    ReferenceStats,
    evaluate,
    load_features,
)
from searchd.evaluation.reference import compute_reference
from searchd.noise import make_noise
from searchd.schedule import Schedule
from searchd.schedules import baseline
from searchd.solvers import nfe, solve

SHAPE = (1, 8, 8)


class GaussianDenoiser:
    """Exact denoiser of data N(mu, diag(v)) on 8x8 images, float64.

    ``nan_above``: return NaN for rows whose sigma exceeds it (a model that breaks down at
    high noise); ``raise_above``: raise for such rows instead. ``calls`` counts rows denoised.
    """

    sigma_min, sigma_max, sigma_grid, cost = 0.002, 80.0, None, 1.0
    shape = SHAPE
    dtype = torch.float64
    device = torch.device("cpu")

    def __init__(self, nan_above: float | None = None, raise_above: float | None = None):
        g = torch.Generator().manual_seed(0)
        self.mu = (torch.rand(SHAPE, generator=g, dtype=torch.float64) - 0.5) * 0.8
        self.v = 0.05 + 0.2 * torch.rand(SHAPE, generator=g, dtype=torch.float64)
        self.nan_above, self.raise_above = nan_above, raise_above
        self.calls = 0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **cond) -> torch.Tensor:
        self.calls += x.shape[0]
        s2 = sigma.reshape(-1, 1, 1, 1) ** 2
        out = self.mu + self.v / (self.v + s2) * (x - self.mu)
        if self.raise_above is not None and bool((sigma > self.raise_above).any()):
            raise RuntimeError("model diverged")
        if self.nan_above is not None:
            out = torch.where((sigma > self.nan_above).reshape(-1, 1, 1, 1), torch.nan, out)
        return out

    def sample_data(self, seeds) -> torch.Tensor:
        return self.mu + self.v.sqrt() * make_noise(seeds, SHAPE, dtype=torch.float64)


def schedules(steps: int = 4, rhos=(3.0, 5.0, 7.0, 9.0), top: float = 80.0) -> list[Schedule]:
    return [Schedule(baseline("polynomial", steps, 0.002, top, rho=r)) for r in rhos]


@pytest.fixture(scope="module")
def digits():
    return load_features("digits")


@pytest.fixture(scope="module")
def reference(digits):
    den = GaussianDenoiser()
    batches = [den.sample_data(range(10_000 + a, 10_000 + a + 500)) for a in (0, 500)]
    return compute_reference(batches, digits, {"source": "gaussian"}, keep_features=1000)


def fids(results) -> list[float]:
    assert all(r.status == "ok" for r in results), [r.error for r in results]
    return [r.metrics["fid"] for r in results]


def test_population_batching_equals_scoring_each_candidate_alone(digits, reference):
    cands = schedules() + [Schedule(baseline("polynomial", 6, 0.002, 80.0), solver="euler")]
    ev = Evaluator(GaussianDenoiser(), digits, reference, metrics=("fid", "kid"),
                   batch_size=150, kid_subsets=5, kid_subset_size=100)
    together = ev.evaluate(cands, range(120))
    alone = [ev.evaluate([c], range(120))[0] for c in cands]
    assert fids(together) == fids(alone)
    assert [r.metrics["kid"] for r in together] == [r.metrics["kid"] for r in alone]
    assert [r.nfe for r in together] == [nfe("dpmpp_2m", 4)] * 4 + [nfe("euler", 6)]
    # Distinct schedules give distinct scores (the rows were not mixed up).
    assert len(set(fids(together))) == len(cands)


def test_scores_equal_an_independent_computation(digits, reference):
    """FID of one candidate from its samples (solve, features, scipy-exact Frechet)."""
    from searchd.evaluation import frechet_distance

    den, cand = GaussianDenoiser(), schedules()[1]
    (r,) = evaluate(den, [cand], None, range(300), digits, reference)
    x = solve(den, make_noise(range(300), SHAPE, dtype=torch.float64),
              torch.tensor(np.array(cand.sigmas)), solver="dpmpp_2m")
    f = digits(x).double().numpy()
    exact = frechet_distance(f.mean(0), np.cov(f.T), reference.mu, reference.sigma)
    assert r.metrics["fid"] == pytest.approx(exact, rel=1e-6)
    assert r.seed_base == 0 and r.n_samples == 300 and r.samples_per_s > 0


def test_results_do_not_depend_on_the_batch_size(digits, reference):
    cands = schedules(rhos=(4.0, 7.0))
    expected = Evaluator(GaussianDenoiser(), digits, reference, batch_size=4096).evaluate(
        cands, range(60)
    )
    for batch_size in (1, 7, 256):
        ev = Evaluator(GaussianDenoiser(), digits, reference, batch_size=batch_size)
        got = ev.evaluate(cands, range(60))
        assert fids(got) == fids(expected)
        assert all(g.stats == e.stats for g, e in zip(got, expected))


def test_seeds_split_across_workers_merge_to_the_same_result(digits, reference):
    cands = schedules(rhos=(4.0,))
    # More samples than feature dimensions (128): with fewer, the covariance is singular and
    # the zero eigenvalues' rounding noise (~1e-16) enters the FID through its square root.
    seeds = list(range(50, 350))
    whole = Evaluator(GaussianDenoiser(), digits, reference).feature_stats(cands, seeds)
    workers = [Evaluator(GaussianDenoiser(), digits, reference, batch_size=b) for b in (5, 64, 9)]
    parts = [w.feature_stats(cands, seeds[a:b]) for w, (a, b) in
             zip(workers, [(0, 100), (100, 201), (201, 300)])]
    ref = workers[0].frechet
    for j in range(len(cands)):
        merged = FeatureStats.merge_all([p[j] for p in parts])
        assert merged.n == whole[j].n
        np.testing.assert_allclose(merged.sum_outer, whole[j].sum_outer, rtol=1e-12)
        assert ref(merged) == pytest.approx(ref(whole[j]), rel=1e-9)
    # The order of the seeds does not change the statistics either.
    shuffled = Evaluator(GaussianDenoiser(), digits, reference).feature_stats(
        cands, seeds[::-1]
    )
    assert ref(shuffled[0]) == pytest.approx(ref(whole[0]), rel=1e-9)


def test_common_random_numbers_noise_comes_from_each_seed():
    ev = Evaluator(GaussianDenoiser(), "pixels", None, metrics=("teacher_distance",))
    n1 = ev.noise(range(10, 20))
    n2 = ev.noise([15, 16])
    torch.testing.assert_close(n1[5:7], n2)
    assert ev.noise(range(10, 20)) is n1  # cached


def test_a_nan_candidate_fails_alone(digits, reference):
    """The model returns NaN above sigma 50 (per row): candidates that start at 80 fail with
    the reason; candidates starting at 40 in the same batched pass are scored normally."""
    den = GaussianDenoiser(nan_above=50.0)
    cands = [*schedules(rhos=(5.0, 7.0), top=40.0), *schedules(rhos=(6.0,)),
             schedules(rhos=(7.0,), top=30.0)[0]]
    results = Evaluator(den, digits, reference, batch_size=64).evaluate(cands, range(100))
    assert [r.status for r in results] == ["ok", "ok", "failed", "ok"]
    assert "non-finite sample 0 (seed 0)" in results[2].error
    assert results[2].metrics == {} and results[2].stats is None
    clean = Evaluator(GaussianDenoiser(), digits, reference).evaluate(cands[:2], range(100))
    assert fids(results[:2]) == fids(clean)


def test_a_solver_error_fails_only_its_candidates(digits, reference):
    den = GaussianDenoiser(raise_above=50.0)
    cands = [schedules(rhos=(7.0,), top=40.0)[0], schedules(rhos=(7.0,))[0]]
    results = Evaluator(den, digits, reference, batch_size=128).evaluate(cands, range(100))
    assert [r.status for r in results] == ["ok", "failed"]
    assert "RuntimeError: model diverged" in results[1].error


def test_invalid_candidates_fail_without_stopping_the_others(digits, reference):
    bad_range = Schedule([100.0, 10.0, 0.0])  # above sigma_max
    bad_solver = Schedule([50.0, 1.0, 0.0], solver="nope")
    good = schedules(rhos=(7.0,))[0]
    results = Evaluator(GaussianDenoiser(), digits, reference).evaluate(
        [bad_range, good, bad_solver, {"sigmas": [1.0, 2.0]}], range(20)
    )
    assert [r.status for r in results] == ["failed", "ok", "failed", "failed"]
    assert "sigma_max" in results[0].error and "unknown solver" in results[2].error
    assert results[1].candidate_id == good.id


def test_teacher_distance_is_computed_once_and_matches_a_direct_computation():
    den = GaussianDenoiser()
    cand = schedules(steps=5, rhos=(7.0,))[0]
    ev = Evaluator(den, "pixels", None, metrics=("teacher_distance",),
                   teacher={"solver": "heun", "steps": 64})
    (r,) = ev.evaluate([cand], range(40))
    noise = make_noise(range(40), SHAPE, dtype=torch.float64)
    teacher = solve(den, noise, torch.tensor(baseline("polynomial", 64, 0.002, 80.0)),
                    solver="heun")
    x = solve(den, noise, torch.tensor(np.array(cand.sigmas)), solver="dpmpp_2m")
    direct = (x - teacher).flatten(1).norm(dim=1).mean()
    assert r.metrics["teacher_distance"] == pytest.approx(float(direct), rel=1e-9)
    calls = den.calls
    ev.evaluate(schedules(steps=5, rhos=(3.0, 9.0)), range(40))
    assert den.calls - calls == 2 * 40 * nfe("dpmpp_2m", 5)  # no teacher run the second time
    # More steps bring the candidate closer to the teacher.
    (fine,) = ev.evaluate(schedules(steps=40, rhos=(7.0,)), range(40))
    assert fine.metrics["teacher_distance"] < 0.1 * r.metrics["teacher_distance"]


def test_result_round_trips_through_plain_data(digits, reference):
    (r,) = Evaluator(GaussianDenoiser(), digits, reference).evaluate(schedules()[:1], range(30))
    back = CandidateResult.from_dict(json.loads(json.dumps(r.to_dict())))
    assert back == r


def test_configuration_errors_are_raised_before_any_work(digits, reference):
    den = GaussianDenoiser()
    with pytest.raises(ValueError, match="unknown metric"):
        Evaluator(den, digits, reference, metrics=("fid", "precision"))
    with pytest.raises(ValueError, match="need reference statistics"):
        Evaluator(den, digits, None)
    with pytest.raises(ValueError, match="dimension 128"):
        Evaluator(den, "pixels", reference)
    no_feats = ReferenceStats(reference.mu, reference.sigma, 1000, reference.meta)
    with pytest.raises(ValueError, match="kid needs per-sample reference features"):
        Evaluator(den, digits, no_feats, metrics=("kid",))
    with pytest.raises(ValueError, match="sfid needs spatial features"):
        Evaluator(den, digits, reference, metrics=("sfid",))
    assert den.calls == 0


def test_inception_score_on_digits_logits(digits, reference):
    ev = Evaluator(GaussianDenoiser(), digits, reference, metrics=("fid", "is"))
    (r,) = ev.evaluate(schedules()[:1], range(100))
    assert 1.0 <= r.metrics["is"] <= 10.0 and "is_std" in r.metrics


def test_embedded_model_population_batching(digits):
    """The embedded zoo (float32 Gaussian mixture): batched and one-at-a-time agree."""
    from searchd.evaluation.reference import exact_reference
    from searchd.models import load

    den = load("gmm-digits-k8")
    ref = exact_reference(den, digits, range(10_000, 10_300))
    cands = [Schedule(baseline("polynomial", 4, den.sigma_min, den.sigma_max, rho=r))
             for r in (5.0, 7.0)]
    ev = Evaluator(den, digits, ref, batch_size=256)
    together = fids(ev.evaluate(cands, range(128)))
    alone = [fids(ev.evaluate([c], range(128)))[0] for c in cands]
    np.testing.assert_allclose(together, alone, rtol=1e-4)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_inception_metrics_end_to_end_with_a_standin_network(tmp_path):
    """FID, sFID and IS through the Inception path (random-weight TorchScript stand-in)."""
    from searchd.evaluation.standin import make_standin_inception

    make_standin_inception(tmp_path)
    net = load_features("inception", path=tmp_path, mode="clean")
    den = GaussianDenoiser()
    ref = compute_reference([den.sample_data(range(9000, 9024))], net, {"source": "g"},
                            spatial=True)
    assert ref.spatial_mu.shape == (2023,)
    ev = Evaluator(den, net, ref, metrics=("fid", "sfid", "is"), is_splits=2)
    cands = schedules(steps=3, rhos=(2.0, 7.0))
    results = ev.evaluate(cands, range(16))
    for r in results:
        assert r.status == "ok", r.error
        assert r.metrics["fid"] > 0 and r.metrics["sfid"] > 0 and r.metrics["is"] >= 1.0
    # The same candidate alone gives the same numbers.
    (alone,) = ev.evaluate(cands[1:], range(16))
    assert alone.metrics == results[1].metrics
