"""KID and the Inception Score against clean-fid, brute force and closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from cleanfid.fid import kernel_distance

from searchd.evaluation import KIDReference, inception_score, kid, mmd2_unbiased


def gaussian(n: int, d: int, seed: int, shift: float = 0.0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, d)) + shift


def test_kid_without_subsampling_equals_clean_fid_and_the_whole_set_mmd():
    """With subsets as large as both sets, every subset is the whole set (in some order), so
    clean-fid's random subsets give exactly the unbiased MMD of the sets."""
    x, y = gaussian(120, 6, 0), gaussian(120, 6, 1, shift=0.4)
    ours = kid(x, y, num_subsets=3, max_subset_size=1000)
    np.random.seed(0)
    assert ours == pytest.approx(kernel_distance(y, x, num_subsets=3), rel=1e-9)
    assert ours == pytest.approx(mmd2_unbiased(x, y), rel=1e-9)


def test_kid_subsets_equal_a_brute_force_loop_over_the_same_subsets():
    x, y = gaussian(90, 5, 2), gaussian(70, 5, 3, shift=0.3)
    subsets, m = 6, 40
    ours = kid(x, y, num_subsets=subsets, max_subset_size=m, seed=11)
    # The same draws as KIDReference: per subset, reference indices then generated indices.
    rng = np.random.default_rng(11)
    total = 0.0
    for _ in range(subsets):
        yi = rng.choice(len(y), m, replace=False)
        xi = rng.choice(len(x), m, replace=False)
        a, b = x[xi], y[yi]
        k = lambda u, v: (u @ v.T / u.shape[1] + 1) ** 3  # noqa: E731
        kxx, kyy, kxy = k(a, a), k(b, b), k(a, b)
        total += (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
        total += (kyy.sum() - np.trace(kyy)) / (m * (m - 1)) - 2 * kxy.mean()
    assert ours == pytest.approx(total / subsets, rel=1e-10)


def test_kid_is_unbiased_for_equal_distributions():
    """Over independent pairs of sets from one distribution, the unbiased estimate averages
    to 0 (within its standard error) and takes both signs; a real shift is detected."""
    values = [mmd2_unbiased(gaussian(60, 4, 2 * i), gaussian(60, 4, 2 * i + 1)) for i in range(60)]
    mean, se = np.mean(values), np.std(values) / np.sqrt(len(values))
    assert abs(mean) < 3 * se
    assert min(values) < 0 < max(values)
    assert mmd2_unbiased(gaussian(60, 4, 0), gaussian(60, 4, 1, shift=1.0)) > 10 * se


def test_kid_reference_reuses_its_subsets_for_every_candidate():
    ref = KIDReference(gaussian(200, 4, 0), num_subsets=5, max_subset_size=50, seed=0)
    x = gaussian(100, 4, 1)
    assert ref(x) == ref(torch.from_numpy(x))
    with pytest.raises(ValueError, match="dimensions"):
        ref(gaussian(10, 3, 0))


def test_inception_score_closed_forms():
    n, c = 100, 10
    # Every sample certain of its class, classes balanced: IS = number of classes.
    logits = torch.full((n, c), -1e4)
    logits[torch.arange(n), torch.arange(n) % c] = 0.0
    mean, std = inception_score(logits, splits=1)
    assert mean == pytest.approx(c, rel=1e-9) and std == 0.0
    # Uninformative predictions: IS = 1.
    assert inception_score(torch.zeros(n, c), splits=5)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        inception_score(torch.zeros(3, c), splits=10)
