"""FeatureStats and the Frechet distance, against numpy, scipy and clean-fid."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from cleanfid.fid import frechet_distance as cleanfid_frechet
from scipy import linalg

from searchd.evaluation import FeatureStats, FrechetReference, frechet_distance
from searchd.evaluation.frechet import frechet_distance_fast, psd_sqrt


def features(n: int, d: int, seed: int, scale: float = 1.0, shift: float = 0.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    return (rng.standard_normal((n, d)) @ mix) * scale + shift


def gaussian_fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return x.mean(0), np.cov(x, rowvar=False)


# FeatureStats ------------------------------------------------------------------------------------
def test_chunked_stats_equal_numpy_mean_and_cov():
    x = features(1000, 12, 0, shift=3.0).astype(np.float32)
    s = FeatureStats.from_features(x, chunk_size=77)
    x64 = x.astype(np.float64)
    np.testing.assert_allclose(s.mean, x64.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(s.cov, np.cov(x64, rowvar=False), rtol=1e-9, atol=1e-11)
    assert s.n == 1000 and s.sum.dtype == np.float64 and s.sum_outer.dtype == np.float64
    np.testing.assert_array_equal(s.sum_outer, s.sum_outer.T)


def test_merging_partial_stats_equals_the_whole():
    x = features(901, 9, 1)
    whole = FeatureStats.from_features(x)
    parts = [FeatureStats.from_features(p) for p in np.array_split(x, [100, 101, 555])]
    merged = sum(parts)
    assert merged.n == whole.n
    np.testing.assert_allclose(merged.sum, whole.sum, rtol=1e-13, atol=1e-12)
    np.testing.assert_allclose(merged.sum_outer, whole.sum_outer, rtol=1e-13, atol=1e-12)
    assert FeatureStats.merge_all(parts).n == 901
    # In-place accumulation chunk by chunk is the same thing.
    acc = FeatureStats.zeros(9)
    for p in np.array_split(x, 7):
        acc.add(torch.from_numpy(p))
    np.testing.assert_allclose(acc.cov, whole.cov, rtol=1e-11)


def test_stats_round_trip_through_plain_data_and_json():
    s = FeatureStats.from_features(features(50, 5, 2))
    d = s.to_dict()
    back = FeatureStats.from_dict(json.loads(json.dumps(d)))
    assert back == s
    assert FeatureStats.from_dict(s.to_dict(lists=False)) == s


def test_stats_reject_bad_input():
    s = FeatureStats.zeros(4)
    with pytest.raises(ValueError, match="dimensions"):
        s.add(np.zeros((3, 5)))
    with pytest.raises(ValueError, match="merge"):
        s.merge(FeatureStats.zeros(3))
    with pytest.raises(ValueError, match="at least 2"):
        FeatureStats.from_features(np.zeros((1, 4))).cov  # noqa: B018


# Frechet distance --------------------------------------------------------------------------------
def test_exact_path_matches_clean_fid_and_a_shift():
    a, b = features(400, 16, 3), features(500, 16, 4, scale=1.3)
    m1, s1 = gaussian_fit(a)
    m2, s2 = gaussian_fit(b)
    ours = frechet_distance(m1, s1, m2, s2)
    assert ours == pytest.approx(cleanfid_frechet(m1, s1, m2, s2), rel=1e-12)
    # A shift of the mean adds exactly |shift|^2.
    shift = np.full(16, 0.5)
    assert frechet_distance(m1 + shift, s1, m1, s1) == pytest.approx(16 * 0.25, abs=1e-6)


def random_spd(d: int, rng: np.random.Generator, cond: float = 100.0) -> np.ndarray:
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (q * np.geomspace(1.0, cond, d)) @ q.T / cond


@pytest.mark.parametrize("d, pairs", [(8, 3), (64, 3), (128, 1)])
def test_fast_path_agrees_with_exact_on_random_spd_pairs(d, pairs):
    rng = np.random.default_rng(d)
    for _ in range(pairs):
        s1, s2 = random_spd(d, rng), random_spd(d, rng, cond=1e4)
        m1, m2 = rng.standard_normal(d) * 0.1, rng.standard_normal(d) * 0.1
        exact = frechet_distance(m1, s1, m2, s2)
        fast = FrechetReference(m2, s2)
        assert fast.distance(m1, s1) == pytest.approx(exact, rel=1e-6)
        assert frechet_distance_fast(m1, s1, m2, s2) == pytest.approx(exact, rel=1e-6)


@pytest.mark.parametrize("n_gen, n_ref", [(40, 500), (30, 50)])
def test_fast_path_agrees_with_exact_on_singular_covariances(n_gen, n_ref):
    """Fewer samples than dimensions (d = 64): the generated (and maybe the reference)
    covariance is singular."""
    gen, ref = features(n_gen, 64, 5), features(n_ref, 64, 6, scale=0.8, shift=0.1)
    m1, s1 = gaussian_fit(gen)
    m2, s2 = gaussian_fit(ref)
    assert np.linalg.matrix_rank(s1) < 64
    exact = frechet_distance(m1, s1, m2, s2)
    assert FrechetReference(m2, s2).distance(m1, s1) == pytest.approx(exact, rel=1e-6)
    # Independent check: the trace term from scipy's sqrtm of the product directly.
    tr = np.trace(linalg.sqrtm(s1 @ s2)).real
    direct = np.sum((m1 - m2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr
    assert exact == pytest.approx(direct, rel=1e-9)


def test_fast_path_takes_feature_stats_and_is_zero_for_identical_gaussians():
    s = FeatureStats.from_features(features(300, 10, 7))
    ref = FrechetReference.from_stats(s)
    assert abs(ref(s)) < 1e-9
    root = psd_sqrt(torch.as_tensor(s.cov))
    np.testing.assert_allclose((root @ root).numpy(), s.cov, atol=1e-12)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_fast_path_on_gpu_matches_cpu():
    rng = np.random.default_rng(0)
    s1, s2 = random_spd(128, rng), random_spd(128, rng)
    m = np.zeros(128)
    cpu = FrechetReference(m, s2).distance(m, s1)
    gpu = FrechetReference(m, s2, device="cuda").distance(m, s1)
    assert gpu == pytest.approx(cpu, rel=1e-9)


def test_frechet_rejects_mismatched_shapes():
    with pytest.raises(ValueError):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="dimension"):
        FrechetReference(np.zeros(3), np.eye(3)).distance(np.zeros(4), np.eye(4))
