"""Analytic Gaussian-mixture denoisers and the embedded zoo, against independent references."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from searchd.models import (
    Denoiser,
    GaussianMixtureDenoiser,
    ModelSpec,
    known_models,
    load,
    zoo,
)
from searchd.models.zoo import DATA_DIR

F64 = torch.float64


def random_mixture(k: int, d: int, seed: int, floor: float = 1e-3) -> GaussianMixtureDenoiser:
    """A mixture with random weights, means and (anisotropic) covariances, float64."""
    rng = np.random.default_rng(seed)
    weights = rng.uniform(0.2, 1.0, k)
    means = rng.normal(0.0, 1.0, (k, d))
    a = rng.normal(0.0, 1.0, (k, d, d)) * rng.uniform(0.05, 0.6, (k, 1, d))
    covs = a @ a.transpose(0, 2, 1) + floor * np.eye(d)
    return GaussianMixtureDenoiser(weights, means, covs, shape=(d,), dtype=F64)


def dense_posterior_mean(m: GaussianMixtureDenoiser, x: np.ndarray, sigma: float) -> np.ndarray:
    """E[x0 | x] by dense linear algebra (solves and log-determinants, no eigenbasis)."""
    w, mu, covs = m.weights.numpy(), m.means.numpy(), m.covs.numpy()
    d = mu.shape[1]
    logp, means = [], []
    for k in range(len(w)):
        s = covs[k] + sigma**2 * np.eye(d)
        diff = x - mu[k]
        sol = np.linalg.solve(s, diff.T).T
        logp.append(np.log(w[k]) - 0.5 * (diff * sol).sum(1) - 0.5 * np.linalg.slogdet(s)[1])
        means.append(mu[k] + sol @ covs[k])  # Sigma_k is symmetric
    logp = np.stack(logp, 1)
    r = np.exp(logp - logp.max(1, keepdims=True))
    r /= r.sum(1, keepdims=True)
    return np.einsum("bk,bkd->bd", r, np.stack(means, 1))


# Closed form -------------------------------------------------------------------------------
def test_single_gaussian_matches_the_wiener_filter():
    m = random_mixture(1, 6, seed=1)
    mu, cov = m.means[0].numpy(), m.covs[0].numpy()
    x = np.random.default_rng(2).normal(0, 2, (50, 6))
    for sigma in (0.003, 0.1, 1.0, 30.0):
        want = mu + (cov @ np.linalg.solve(cov + sigma**2 * np.eye(6), (x - mu).T)).T
        got = m(torch.from_numpy(x), torch.tensor(sigma, dtype=F64)).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("sigma", [0.002, 0.05, 0.7, 80.0])
def test_mixture_matches_dense_linear_algebra(sigma):
    m = random_mixture(5, 7, seed=3)
    rng = np.random.default_rng(4)
    # Noisy data points (where solvers evaluate) and points far from all components.
    x0 = m.sample_data(range(60)).numpy()
    x = np.concatenate([x0 + sigma * rng.normal(size=x0.shape), rng.normal(0, 4, (20, 7))])
    got = m(torch.from_numpy(x), torch.full((len(x),), sigma, dtype=F64)).numpy()
    np.testing.assert_allclose(got, dense_posterior_mean(m, x, sigma), rtol=1e-7, atol=1e-8)


def test_two_components_in_2d_match_numerical_integration():
    weights = np.array([0.3, 0.7])
    means = np.array([[-1.0, 0.5], [1.0, -0.3]])
    covs = np.array([[[0.3, 0.1], [0.1, 0.2]], [[0.15, -0.05], [-0.05, 0.4]]])
    m = GaussianMixtureDenoiser(weights, means, covs, shape=(2,), dtype=F64)
    # E[x0 | x] = int x0 p(x0) N(x; x0, s^2 I) dx0 / int p(x0) N(x; x0, s^2 I) dx0 on a grid.
    g = np.linspace(-5, 5, 801)
    grid = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
    prior = np.zeros(len(grid))
    for w, mu, c in zip(weights, means, covs):
        diff = grid - mu
        q = np.einsum("ni,ij,nj->n", diff, np.linalg.inv(c), diff)
        prior += w * np.exp(-0.5 * q) / (2 * np.pi * np.sqrt(np.linalg.det(c)))
    x = np.array([[0.0, 0.0], [-1.2, 0.4], [0.9, 1.5], [2.0, -1.0]])
    for sigma in (0.3, 1.0, 2.5):
        want = []
        for xi in x:
            lik = prior * np.exp(-0.5 * ((grid - xi) ** 2).sum(1) / sigma**2)
            want.append((grid * lik[:, None]).sum(0) / lik.sum())
        got = m(torch.from_numpy(x), torch.full((4,), sigma, dtype=F64)).numpy()
        np.testing.assert_allclose(got, np.array(want), atol=1e-6)


def test_limits_identity_at_small_sigma_and_data_mean_at_large_sigma():
    m = random_mixture(4, 5, seed=5)
    x = m.sample_data(range(100))
    np.testing.assert_allclose(m(x, torch.tensor(1e-6, dtype=F64)), x, atol=1e-6)
    far = m(x, torch.tensor(1e5, dtype=F64))
    np.testing.assert_allclose(far, m.data_mean().expand_as(far), atol=1e-4)


def test_per_sample_sigma_equals_calls_one_level_at_a_time():
    m = load("gmm-digits-k8", dtype=F64)
    x = m.sample_data(range(300)) + torch.randn(300, 1, 8, 8, dtype=F64, generator=_gen(6))
    # All levels distinct (per-row path) and two levels (grouped path).
    for sigma in (
        torch.rand(300, dtype=F64, generator=_gen(7)) * 3 + 0.002,
        torch.tensor([0.05, 2.0], dtype=F64).repeat_interleave(150)[_perm(300)],
    ):
        got = m(x, sigma)
        for i in range(0, 300, 37):
            np.testing.assert_allclose(got[i], m(x[i : i + 1], sigma[i : i + 1])[0], atol=1e-12)
        for level in sigma.unique()[:3]:
            rows = sigma == level
            np.testing.assert_allclose(got[rows], m(x[rows], level), atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_cache_sized_pieces_change_no_bit(monkeypatch, dtype):
    """The CPU pieces (a speed setting) change no bit: every output equals that of the
    512-row chunks computed whole (pieces as large as the chunks), for the quickstart's
    model on the shared-level, grouped and per-row paths, at row counts whose last chunk
    has 1-3 rows (which MKL rounds differently) or just over a piece."""
    import searchd.models.gmm as gmm

    m = load("gmm-digits", dtype=dtype)  # K = D = 64: 512-row chunks, 256-row pieces
    assert m._chunk_rows() == 512 and m._piece_rows(512) == 256
    for n in (700, 513, 515, 511, 509, 257, 1025, 3):
        x = m.sample_data(range(n)) + 2 * torch.randn(n, 1, 8, 8, dtype=dtype,
                                                      generator=_gen(n))
        sigmas = (
            torch.tensor(0.7, dtype=dtype),
            torch.tensor([0.02, 1.5], dtype=dtype).repeat(n)[:n][_perm(n)],
            torch.rand(n, dtype=dtype, generator=_gen(12)) * 5 + 0.002,
        )
        now = [m(x, s) for s in sigmas]
        monkeypatch.setattr(gmm, "_PIECE_ELEMENTS", gmm._CHUNK_ELEMENTS)
        assert m._piece_rows(512) == 512
        whole = [m(x, s) for s in sigmas]
        monkeypatch.undo()
        for a, b in zip(now, whole):
            assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_scratch_buffers_change_no_bit(dtype):
    """The shared-level path writes its intermediates into one scratch buffer per call (a
    speed setting): the same values as fresh tensors, piece by piece, and autograd in x
    still works (it takes the fresh path)."""
    from searchd.models.gmm import _pieces

    m = load("gmm-digits", dtype=dtype)
    for n, level in ((700, 0.7), (2000, 0.02), (5, 3.0)):
        x = m.sample_data(range(n)) + torch.randn(n, 1, 8, 8, dtype=dtype, generator=_gen(n))
        got = m(x, torch.tensor(level, dtype=dtype))
        s2 = torch.tensor(level, dtype=dtype).square()
        flat = x.reshape(n, 64)
        fresh = torch.cat([m._denoise_shared(flat[sl], s2) for sl in _pieces(n, 512, 256)])
        assert torch.equal(got.reshape(n, 64), fresh)
    x = x.clone().requires_grad_(True)
    m(x, torch.tensor(0.5, dtype=dtype)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_pieces_cover_the_chunks_in_near_equal_parts():
    from searchd.models.gmm import _pieces, _slices

    for n in (1, 3, 255, 256, 257, 512, 513, 700, 2000):
        pieces = _pieces(n, 512, 256)
        assert [i for p in pieces for i in range(p.start, p.stop)] == list(range(n))
        sizes = [p.stop - p.start for p in pieces]
        assert max(sizes) <= 256 + 3
        # A piece never crosses a chunk; a chunk of <= 256 rows stays whole; larger ones are
        # cut into pieces of >= 128 rows, all but the last a multiple of 4.
        for c in _slices(n, 512):
            inside = [p.stop - p.start for p in pieces if c.start <= p.start < c.stop]
            assert sum(inside) == c.stop - c.start
            assert inside == [c.stop - c.start] or min(inside) >= 128
            assert all(k % 4 == 0 for k in inside[:-1])


def test_autograd_in_sigma_and_x_matches_central_differences():
    m = load("gmm-digits-k8", dtype=F64)
    g = _gen(14)
    x = m.sample_data(range(128)) + 0.5 * torch.randn(128, 1, 8, 8, dtype=F64, generator=g)
    w = torch.randn(128, 1, 8, 8, dtype=F64, generator=g)
    direction = torch.randn(128, 1, 8, 8, dtype=F64, generator=g)
    h = 1e-6
    for sigma in (
        torch.full((128,), 0.7, dtype=F64),
        torch.tensor([0.3, 1.1], dtype=F64).repeat(64),
        torch.rand(128, dtype=F64, generator=g) + 0.05,
    ):
        s, xx = sigma.clone().requires_grad_(True), x.clone().requires_grad_(True)
        gs, gx = torch.autograd.grad((m(xx, s) * w).sum(), (s, xx))
        # Row i depends only on sigma_i, so one pair of shifted calls gives every derivative.
        up, down = m(x, sigma + h), m(x, sigma - h)
        fd = ((up - down) * w).flatten(1).sum(1) / (2 * h)
        np.testing.assert_allclose(gs, fd, rtol=1e-5, atol=1e-6)
        up, down = m(x + h * direction, sigma), m(x - h * direction, sigma)
        fdx = ((up - down) * w).sum() / (2 * h)
        assert float((gx * direction).sum()) == pytest.approx(float(fdx), rel=1e-6)


def test_float32_agrees_with_float64_on_the_largest_member():
    m64 = load("gmm-digits", dtype=F64)
    m32 = load("gmm-digits", dtype=torch.float32)
    x0 = m64.sample_data(range(500))
    n = torch.randn(500, 1, 8, 8, dtype=F64, generator=_gen(8))
    for sigma in (0.002, 0.02, 0.2, 2.0, 80.0):
        x = x0 + sigma * n
        want = m64(x, torch.tensor(sigma, dtype=F64))
        got = m32(x.float(), torch.tensor(sigma))
        assert got.dtype == torch.float32
        # Observed: mean <= 1e-6, max <= 6e-6 over these inputs.
        err = (got.double() - want).abs()
        assert err.mean() < 1e-5 and err.max() < 1e-4, (sigma, err.mean(), err.max())


def test_calls_accept_other_dtypes_and_scalar_sigma():
    m = load("gmm-digits-k1")  # float32 working buffers
    x = torch.randn(10, 1, 8, 8, dtype=F64, generator=_gen(9))
    out = m(x, 0.5)
    assert out.dtype == F64 and out.shape == x.shape
    np.testing.assert_allclose(out, m.to(dtype=F64)(x, 0.5), atol=1e-5)
    with pytest.raises(ValueError, match="expected"):
        m(torch.zeros(3, 64), torch.ones(3))
    with pytest.raises(ValueError, match="sigma has shape"):
        m(torch.zeros(3, 1, 8, 8), torch.ones(2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    cpu = load("gmm-digits", dtype=F64)
    gpu = load("gmm-digits", device="cuda", dtype=F64)
    x = cpu.sample_data(range(2000)) + 0.3 * torch.randn(2000, 1, 8, 8, dtype=F64)
    sigma = torch.rand(2000, dtype=F64) + 0.01
    got = gpu(x.cuda(), sigma.cuda())
    assert got.is_cuda
    np.testing.assert_allclose(got.cpu(), cpu(x, sigma), atol=1e-10)


# Sampling the data distribution ------------------------------------------------------------
def test_sample_statistics_match_the_mixture():
    m = random_mixture(3, 4, seed=10)
    n = 40_000
    x = m.sample_data(range(n)).numpy()
    w, mu, covs = m.weights.numpy(), m.means.numpy(), m.covs.numpy()
    mean = w @ mu
    cov = np.einsum("k,kij->ij", w, covs + np.einsum("ki,kj->kij", mu - mean, mu - mean))
    sd = np.sqrt(np.diag(cov))
    assert np.all(np.abs(x.mean(0) - mean) < 5 * sd / np.sqrt(n))
    # Covariance entries: standard error about sd_i sd_j sqrt(2 / n) for these sizes.
    assert np.all(np.abs(np.cov(x, rowvar=False) - cov) < 5 * np.outer(sd, sd) * np.sqrt(2 / n))
    np.testing.assert_allclose(m.data_mean().numpy(), mean, atol=1e-12)
    np.testing.assert_allclose(m.data_cov().numpy(), cov, atol=1e-12)


def test_sample_component_frequencies_match_the_weights():
    # Components 30 standard deviations apart: each sample's component is unambiguous.
    weights = np.array([0.1, 0.6, 0.3])
    means = np.array([[0.0, 0.0], [30.0, 0.0], [0.0, 30.0]])
    covs = np.stack([np.eye(2), np.diag([0.5, 2.0]), np.eye(2) * 0.1])
    m = GaussianMixtureDenoiser(weights, means, covs, shape=(2,), dtype=F64)
    n = 20_000
    x = m.sample_data(range(n)).numpy()
    comp = np.argmin(((x[:, None, :] - means) ** 2).sum(-1), 1)
    counts = np.bincount(comp, minlength=3) / n
    # Binomial standard error is at most 0.0035 here.
    assert np.all(np.abs(counts - weights) < 0.015), counts
    for k in range(3):
        np.testing.assert_allclose(np.cov(x[comp == k], rowvar=False), covs[k], atol=0.12)


def test_sample_rows_depend_only_on_their_seed():
    m = load("gmm-digits-k8", dtype=F64)
    block = m.sample_data(range(100, 120))
    np.testing.assert_array_equal(m.sample_data([105])[0], block[5])
    np.testing.assert_array_equal(m.sample_data(range(119, 99, -1)), block.flip(0))
    assert block.shape == (20, 1, 8, 8)
    assert not torch.equal(block[0], block[1])
    as32 = load("gmm-digits-k8").sample_data(range(100, 120))
    assert as32.dtype == torch.float32
    np.testing.assert_allclose(as32, block, atol=1e-6)
    with pytest.raises(ValueError, match="negative"):
        m.sample_data([-1])


# Files and the zoo -------------------------------------------------------------------------
def test_npz_round_trip(tmp_path):
    m = random_mixture(3, 4, seed=11)
    m.cost, m.name, m.sigma_min = 0.25, "tiny", 0.01
    m.save_npz(tmp_path / "tiny.npz")
    back = GaussianMixtureDenoiser.from_npz(tmp_path / "tiny.npz", dtype=F64)
    for attr in ("weights", "means", "covs"):
        np.testing.assert_array_equal(getattr(back, attr), getattr(m, attr))
    assert (back.shape, back.cost, back.name, back.sigma_min, back.sigma_max) == (
        (4,),
        0.25,
        "tiny",
        0.01,
        80.0,
    )
    x = torch.randn(8, 4, dtype=F64, generator=_gen(12))
    np.testing.assert_array_equal(back(x, 0.3), m(x, 0.3))
    spec = load(ModelSpec(kind="gmm", path=str(tmp_path / "tiny.npz")), dtype=F64)
    assert spec.name == "tiny" and spec.shape == (4,)


def test_invalid_parameters_are_rejected():
    covs = np.stack([np.eye(3), np.diag([1.0, 0.0, 1.0])])
    with pytest.raises(ValueError, match="covariance 1 is not positive definite"):
        GaussianMixtureDenoiser([0.5, 0.5], np.zeros((2, 3)), covs, shape=(3,))
    with pytest.raises(ValueError, match="shape"):
        GaussianMixtureDenoiser([1.0], np.zeros((1, 3)), np.eye(3)[None], shape=(1, 2, 2))
    with pytest.raises(ValueError, match="positive"):
        GaussianMixtureDenoiser(
            [1.0, -1.0], np.zeros((2, 3)), np.stack([np.eye(3)] * 2), shape=(3,)
        )


def test_zoo_names_alias_costs_and_errors():
    names = known_models()
    members = [n for n in names if n.startswith("gmm-digits-k")]
    ks = sorted(int(n.removeprefix("gmm-digits-k")) for n in members)
    assert len(ks) == 3 and "gmm-digits" in names
    assert {p.stem for p in DATA_DIR.glob("gmm-digits-k*.npz")} == set(members)
    models = zoo([f"gmm-digits-k{k}" for k in ks])
    assert all(isinstance(m, Denoiser) for m in models)
    assert [m.n_components for m in models] == ks
    assert [m.cost for m in models] == sorted(m.cost for m in models)
    assert models[-1].cost == 1.0
    assert all(m.shape == (1, 8, 8) and m.sigma_grid is None for m in models)
    largest = load("gmm-digits")
    assert largest.name == f"gmm-digits-k{ks[-1]}"
    assert load("gmm-digits", dtype=F64).dtype == F64
    with pytest.raises(ValueError, match=r"unknown model 'gmm-digitz'.*gmm-digits-k"):
        load("gmm-digitz")
    with pytest.raises(ValueError, match="unknown model kind 'sdxl'.*gmm"):
        load(ModelSpec(kind="sdxl", path="x.pt"))


# Helpers -----------------------------------------------------------------------------------
def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _perm(n: int) -> torch.Tensor:
    return torch.randperm(n, generator=_gen(13))


def test_largest_member_makes_the_schedule_matter():
    """Issue 2's acceptance check: at NFE 5 with dpmpp_2m the best of polynomial (rho=7),
    logsnr and time_uniform is at least 10x the floor (10,000 samples each)."""
    from searchd.noise import make_noise, seed_range
    from searchd.sample import FLOOR_SEED_OFFSET, REFERENCE_SEED_OFFSET, frechet_distance_pixels
    from searchd.schedules import baseline
    from searchd.solvers import solve

    den = load("gmm-digits")
    n = 10_000
    ref = den.sample_data(seed_range(REFERENCE_SEED_OFFSET, n))
    floor = frechet_distance_pixels(den.sample_data(seed_range(FLOOR_SEED_OFFSET, n)), ref)
    noise = make_noise(seed_range(0, n), den.shape)
    fds = {
        fam: frechet_distance_pixels(
            solve(den, noise, baseline(fam, 5, den.sigma_min, den.sigma_max), solver="dpmpp_2m"),
            ref,
        )
        for fam in ("polynomial", "logsnr", "time_uniform")
    }
    assert min(fds.values()) >= 10 * floor, (fds, floor)
