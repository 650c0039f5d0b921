"""Reference statistics: files, foreign formats (clean-fid, EDM), checks, naming."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from searchd.evaluation import FeatureStats, ReferenceStats, compute_reference, load_features
from searchd.evaluation.reference import exact_reference, reference_name
from searchd.models import load


def fake_inception_stats(path, d=2048):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((8, d))
    np.savez(path, mu=a.mean(0), sigma=a.T @ a / 7)
    return path


def test_round_trip_keeps_arrays_and_metadata(tmp_path):
    feats = np.random.default_rng(0).standard_normal((30, 4))
    ref = ReferenceStats.from_stats(
        FeatureStats.from_features(feats), {"features": "pixels", "dim": 4, "source": "x"},
        features=feats[:10],
    )
    path = ref.save(tmp_path / "r.npz")
    back = ReferenceStats.load(path)
    np.testing.assert_array_equal(back.mu, ref.mu)
    np.testing.assert_array_equal(back.sigma, ref.sigma)
    assert back.n == 30 and back.meta == ref.meta and back.features.shape == (10, 4)
    assert not list(tmp_path.glob(".*tmp"))  # the temporary file was renamed into place
    again = ReferenceStats.from_bytes(ref.to_bytes())
    np.testing.assert_array_equal(again.sigma, ref.sigma)
    np.testing.assert_array_equal(ReferenceStats.from_dict(ref.to_dict()).mu, ref.mu)


def test_reads_clean_fid_and_edm_files_and_infers_their_mode(tmp_path):
    clean = ReferenceStats.load(fake_inception_stats(tmp_path / "cifar10_clean_train_32.npz"))
    assert clean.feature_name == "inception" and clean.mode == "clean" and clean.n is None
    legacy = ReferenceStats.load(
        fake_inception_stats(tmp_path / "cifar10_legacy_tensorflow_train_32.npz")
    )
    assert legacy.mode == "legacy_tensorflow"
    edm = ReferenceStats.load(fake_inception_stats(tmp_path / "cifar10-32x32.npz"))
    assert edm.mode == "legacy_tensorflow" and edm.meta["origin"] == "edm"
    # Checks against a run's feature space.
    edm.check(features="inception", mode="legacy_tensorflow", dim=2048)
    with pytest.raises(ValueError, match="mode 'legacy_tensorflow'; the run uses mode 'clean'"):
        edm.check(features="inception", mode="clean", dim=2048)
    with pytest.raises(ValueError, match="dimension 2048"):
        edm.check(load_features("digits"))


def test_refuses_statistics_of_another_network(tmp_path):
    ref = ReferenceStats(np.zeros(64), np.eye(64), 10, {"features": "pixels", "dim": 64})
    with pytest.raises(ValueError, match="feature network 'pixels'; the run uses 'digits'"):
        ref.check(features="digits")
    ref.check(load_features("pixels", shape=(1, 8, 8)))
    path = tmp_path / "bad.npz"
    np.savez(path, mean=np.zeros(3))
    with pytest.raises(ValueError, match="needs arrays 'mu' and 'sigma'"):
        ReferenceStats.load(path)
    with pytest.raises(FileNotFoundError):
        ReferenceStats.load(tmp_path / "missing.npz")


def test_name_encodes_what_shaped_the_file():
    name = reference_name(source="gmm-digits-k64-exact", features="inception",
                          mode="legacy_tensorflow", split="train", resolution=(1, 8, 8),
                          count=10000)
    assert name == "gmm-digits-k64-exact_inception-legacy-tensorflow_train_8x8_n10000.npz"
    other = reference_name(source="gmm-digits-k64-exact", features="inception", mode="clean",
                           split="train", resolution=(1, 8, 8), count=10000)
    assert other != name
    assert reference_name(source="My Data/set", features="digits", resolution=32,
                          count=5) == "my-data-set_digits_all_32x32_n5.npz"


def test_computed_reference_does_not_depend_on_batching():
    net = load_features("pixels", shape=(1, 8, 8))
    x = torch.randn(5000, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    a = compute_reference([x], net, {"source": "t"}, keep_features=10)
    b = compute_reference(torch.split(x, 777), net, {"source": "t"}, keep_features=10)
    np.testing.assert_array_equal(a.sigma, b.sigma)
    assert a.meta["checksum"] == b.meta["checksum"] and a.meta["count"] == 5000
    np.testing.assert_allclose(a.sigma, np.cov(x.reshape(5000, 64).double().numpy().T),
                               rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(a.features, x[:10].reshape(10, 64).numpy())
    c = compute_reference([x + 1e-3], net, {"source": "t"})
    assert c.meta["checksum"] != a.meta["checksum"]


def test_exact_reference_of_the_embedded_model_matches_its_moments():
    den = load("gmm-digits-k64")
    ref = exact_reference(den, load_features("pixels", shape=(1, 8, 8)), range(5000, 5600))
    assert ref.meta["features"] == "pixels" and ref.n == 600
    # The sample mean is close to the mixture's exact mean (standard error about 0.04).
    assert np.abs(ref.mu - den.data_mean().numpy()).max() < 0.25
