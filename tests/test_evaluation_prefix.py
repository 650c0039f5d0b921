"""The evaluator's prefix-tree path against scoring every candidate alone: bitwise equal
metrics and statistics, failures isolated, the work saved counted."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from searchd.evaluation import Evaluator, load_features
from searchd.evaluation.reference import exact_reference
from searchd.models import load
from searchd.schedule import Schedule
from searchd.schedules import baseline

SEEDS = range(150)


@pytest.fixture(scope="module")
def case():
    den = load("gmm-digits-k8")
    feats = load_features("digits")
    return den, feats, exact_reference(den, feats, range(10_000, 10_300))


def shared_prefix_candidates(den) -> list[Schedule]:
    """dpmpp_2m and heun candidates sharing prefixes of every length, and a duplicate."""
    base = baseline("polynomial", 4, den.sigma_min, den.sigma_max, True, rho=7)
    out = [Schedule(base)]
    for j in range(4):
        s = base.copy()
        upper = s[j - 1] if j else den.sigma_max
        s[j] = s[j + 1] + 0.5 * (upper - s[j + 1]) if j < 3 else 0.5 * (s[2] + s[3])
        out.append(Schedule(s))
    out.append(Schedule(base.copy()))
    out += [Schedule(out[k].sigmas, solver="heun") for k in (0, 3, 4)]
    return out


def test_tree_scores_are_bitwise_alone(case, one_thread):
    den, feats, ref = case
    cands = shared_prefix_candidates(den)
    cands.insert(2, Schedule([100.0, 1.0, 0.0]))  # above sigma_max: fails alone
    tree = Evaluator(den, feats, ref, metrics=("fid", "teacher_distance"), batch_size=64,
                     teacher={"n_steps": 8}, prefix_sharing=True)
    plain = Evaluator(den, feats, ref, metrics=("fid", "teacher_distance"), batch_size=64,
                      teacher={"n_steps": 8})
    got = tree.evaluate(cands, SEEDS)
    want = [plain.evaluate([c], SEEDS)[0] for c in cands]
    assert [r.status for r in got] == [r.status for r in want]
    assert [r.status for r in got].count("failed") == 1
    for g, w in zip(got, want):
        assert (g.candidate_id, g.nfe, g.n_samples, g.error) == (
            w.candidate_id, w.nfe, w.n_samples, w.error)
        assert g.metrics == w.metrics  # exact floats
        assert g.stats == w.stats
    # Work: 3 chunks (64 + 64 + 22 samples); dpmpp_2m's 6 candidates (5 distinct) share
    # levels 0.. of the base; heun's 3 share theirs.
    s = tree.prefix_stats
    assert s.observes_alone == 3 * 9 * 4
    assert 0 < s.observes < s.observes_alone
    # Per chunk: dpmpp_2m prefixes 1 + 2 + 3 + 4 (base/dup, and moves at levels 0..3),
    # heun's 1 + 1 + 2 + 3 (moves at levels 2 and 3 and the base).
    assert s.observes == 3 * ((2 + 3 + 4 + 5) + (1 + 1 + 2 + 3))


def test_tree_agrees_with_the_batched_pass(case, one_thread):
    """The default population-batched pass and the tree give the same scores (up to the
    denoiser's row-grouping rounding: the mixture groups rows by level)."""
    den, feats, ref = case
    cands = shared_prefix_candidates(den)
    tree = Evaluator(den, feats, ref, prefix_sharing=True).evaluate(cands, SEEDS)
    batched = Evaluator(den, feats, ref).evaluate(cands, SEEDS)
    np.testing.assert_allclose([r.metrics["fid"] for r in tree],
                               [r.metrics["fid"] for r in batched], rtol=1e-4)


class Flaky:
    """The mixture, but NaN for rows above ``nan_above`` and an error above ``raise_above``."""

    def __init__(self, den, nan_above: float, raise_above: float) -> None:
        self.den, self.nan_above, self.raise_above = den, nan_above, raise_above
        self.shape, self.dtype, self.device = den.shape, den.dtype, den.device
        self.sigma_min, self.sigma_max, self.sigma_grid, self.cost = (
            den.sigma_min, den.sigma_max, None, 1.0)

    def __call__(self, x, sigma, **cond):
        if bool((sigma > self.raise_above).any()):
            raise RuntimeError("model diverged")
        out = self.den(x, sigma, **cond)
        return torch.where((sigma > self.nan_above).reshape(-1, 1, 1, 1), torch.nan, out)


def test_failures_stay_with_their_candidates(case, one_thread):
    den, feats, ref = case
    ok = [Schedule(baseline("polynomial", 4, 0.002, 30.0, True, rho=r)) for r in (5.0, 7.0)]
    nan = Schedule(baseline("polynomial", 4, 0.002, 50.0, True, rho=7))
    err = Schedule(baseline("polynomial", 4, 0.002, 80.0, True, rho=7))
    ev = Evaluator(Flaky(den, 40.0, 60.0), feats, ref, batch_size=64, prefix_sharing=True)
    got = ev.evaluate([ok[0], nan, err, ok[1]], SEEDS)
    assert [r.status for r in got] == ["ok", "failed", "failed", "ok"]
    assert "non-finite sample 0 (seed 0)" in got[1].error
    assert "RuntimeError: model diverged" in got[2].error
    clean = Evaluator(den, feats, ref, batch_size=64)
    assert [got[0].metrics, got[3].metrics] == [clean.evaluate([c], SEEDS)[0].metrics
                                                for c in ok]


def test_model_schedules_through_the_tree(case, one_thread):
    """Candidates with model schedules (a composed zoo): the models of each step are part of
    the prefix; scores bitwise those of scoring each alone."""
    from searchd.models.compose import ComposedDenoiser

    _, feats, ref = case
    den = ComposedDenoiser([load("gmm-digits-k1"), load("gmm-digits-k8")])
    sig = baseline("polynomial", 4, den.sigma_min, den.sigma_max, True, rho=7)
    cands = [Schedule(sig, model_ids=m) for m in
             ([0, 0, 1, 1], [0, 0, 1, 0], [0, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0])]
    tree = Evaluator(den, feats, ref, batch_size=64, prefix_sharing=True)
    plain = Evaluator(den, feats, ref, batch_size=64)
    got = tree.evaluate(cands, SEEDS)
    want = [plain.evaluate([c], SEEDS)[0] for c in cands]
    assert [g.metrics for g in got] == [w.metrics for w in want]
    assert all(g.ok for g in got)
    # Per chunk: prefixes {0,1} | {00,01,11} | {001,011,111,000} | all 5 distinct.
    assert tree.prefix_stats.observes == 3 * (2 + 3 + 4 + 5)
