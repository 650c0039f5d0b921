"""Class-conditional models and guidance per step: the exact conditional mixture against a
brute-force posterior mean, per-row guidance of network denoisers against constant guidance,
the solvers passing each step's weight, honest network-call counts, the schedule field."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from searchd.models import GaussianMixtureDenoiser, load
from searchd.models.conditional import (
    ClassDigitsData,
    ConditionalGaussianMixture,
    class_labels,
    row_conditioning,
    supports_guidance,
)
from searchd.schedule import HASH_CHARS, Schedule, canonical_sigmas
from searchd.schedules import baseline
from searchd.schedules.spaces import with_meta
from searchd.solvers import SOLVERS, network_calls, nfe, solve

DATA = Path(__file__).resolve().parents[1] / "searchd" / "models" / "data"


# A small exact model --------------------------------------------------------------------------
def small_mixture(seed: int = 0, d: int = 4) -> ConditionalGaussianMixture:
    """2 classes x 2 components (plus a third class of 1) in D = 4, float64."""
    rng = np.random.default_rng(seed)
    k = 5
    a = rng.normal(size=(k, d, d))
    covs = a @ a.transpose(0, 2, 1) * 0.3 + 0.05 * np.eye(d)
    means = rng.normal(size=(k, d)) * 2
    weights = rng.uniform(0.5, 1.5, size=k)
    return ConditionalGaussianMixture(weights, means, covs, [0, 1, 0, 1, 2], 3, shape=(d,),
                                      dtype=torch.float64)


def brute_posterior_mean(weights, means, covs, x: np.ndarray, sigma: float) -> np.ndarray:
    """sum_k r_k [mu_k + S_k (S_k + s^2 I)^-1 (x - mu_k)], r_k ∝ w_k N(x; mu_k, S_k + s^2 I),
    with explicit inverses and determinants (no eigenbasis)."""
    d = means.shape[1]
    logp, post = [], []
    for w, mu, s in zip(weights, means, covs):
        c = s + sigma**2 * np.eye(d)
        ci = np.linalg.inv(c)
        diff = x - mu
        logp.append(np.log(w) - 0.5 * (np.einsum("bi,ij,bj->b", diff, ci, diff)
                                       + np.linalg.slogdet(c)[1]))
        post.append(mu + diff @ (s @ ci).T)
    logp = np.stack(logp, 1)
    r = np.exp(logp - logp.max(1, keepdims=True))
    r /= r.sum(1, keepdims=True)
    return np.einsum("bk,bkd->bd", r, np.stack(post, 1))


@pytest.mark.parametrize("sigma", [0.05, 0.7, 5.0])
def test_conditional_denoiser_is_the_class_components_posterior_mean(sigma):
    den = small_mixture()
    x = torch.randn(64, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 2
    w, mu, cov = den.weights.numpy(), den.means.numpy(), den.covs.numpy()
    cls = den.component_class.numpy()
    for c in range(3):
        s = torch.full((64,), sigma, dtype=torch.float64)
        got = den.conditional_denoiser(x, s, torch.full((64,), c))
        k = cls == c
        want = brute_posterior_mean(w[k], mu[k], cov[k], x.numpy(), sigma)
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-10)
        # The same as a plain mixture of the class's components.
        sub = den.class_mixture(c)(x, s)
        np.testing.assert_allclose(got.numpy(), sub.numpy(), rtol=1e-10, atol=1e-12)
    unc = den.unconditional_denoiser(x, torch.full((64,), sigma, dtype=torch.float64))
    np.testing.assert_allclose(unc.numpy(), brute_posterior_mean(w, mu, cov, x.numpy(), sigma),
                               rtol=1e-9, atol=1e-10)


def test_guidance_is_u_plus_w_c_minus_u_and_w1_is_the_conditional_denoiser():
    den = small_mixture()
    b = 48
    x = torch.randn(b, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 3
    # Per-row levels (the general path) and one shared level (the fast path).
    for sig in (torch.linspace(0.1, 8.0, b, dtype=torch.float64),
                torch.full((b,), 1.3, dtype=torch.float64)):
        labels = torch.arange(b) % 3
        c = den.conditional_denoiser(x, sig, labels)
        u = den.unconditional_denoiser(x, sig)
        w = torch.linspace(0.0, 4.0, b, dtype=torch.float64)
        got = den(x, sig, class_labels=labels, guidance=w)
        torch.testing.assert_close(got, u + w[:, None] * (c - u), rtol=1e-10, atol=1e-10)
        assert torch.equal(den(x, sig, class_labels=labels, guidance=torch.ones(b)), c)
        assert torch.equal(den(x, sig, class_labels=labels), c)  # default scale 1
        torch.testing.assert_close(den(x, sig, class_labels=labels, guidance=0.0), u)
        # sample_index picks the class: index mod C.
        assert torch.equal(den(x, sig, sample_index=torch.arange(b) + 30), c)


def test_grouped_rows_match_row_by_row():
    """Rows of a few candidates (few distinct levels, the grouped path) give the results of
    each row computed alone."""
    den = small_mixture()
    den.to(dtype=torch.float64)
    x = torch.randn(256, 4, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sig = torch.tensor([0.5, 2.0], dtype=torch.float64).repeat_interleave(128)
    w = torch.tensor([1.0, 2.5], dtype=torch.float64).repeat(128)
    idx = torch.arange(256)
    got = den(x, sig, sample_index=idx, guidance=w)
    for r in (0, 1, 128, 255):
        one = den(x[r : r + 1], sig[r : r + 1], sample_index=idx[r : r + 1],
                  guidance=w[r : r + 1])
        torch.testing.assert_close(got[r : r + 1], one, rtol=1e-12, atol=1e-12)


def test_exact_samples_follow_the_class_of_their_seed():
    den = small_mixture()
    seeds = range(100, 100 + 3 * 4000)
    x = den.sample_data(seeds, dtype=torch.float64)
    y = class_labels(seeds, 3)
    cls = den.component_class.numpy()
    w = den.weights.numpy()
    for c in range(3):
        k = cls == c
        mean = (w[k, None] * den.means.numpy()[k]).sum(0) / w[k].sum()
        got = x[torch.as_tensor(y == c)].mean(0).numpy()
        # Mean of 4,000 samples: within 5 standard errors of the class mean.
        sd = np.sqrt(np.diag(den.class_mixture(c).data_cov().numpy()) / 4000)
        assert np.all(np.abs(got - mean) < 5 * sd), (c, got, mean)
    # Row i depends on its seed alone.
    assert torch.equal(den.sample_data([105], dtype=torch.float64)[0], x[5])


def test_shipped_conditional_mixture_loads_and_is_small(tmp_path):
    path = DATA / "gmm-digits-cond.npz"
    assert path.stat().st_size <= 5 * 2**20
    den = load("gmm-digits-cond")
    assert isinstance(den, ConditionalGaussianMixture) and supports_guidance(den)
    assert den.n_classes == 10 and den.shape == (1, 8, 8)
    assert np.bincount(den.component_class.numpy()).min() >= 1
    # Files round-trip.
    den.save_npz(tmp_path / "m.npz")
    again = ConditionalGaussianMixture.from_npz(tmp_path / "m.npz")
    assert torch.equal(again.covs, den.covs) and torch.equal(again.component_class,
                                                            den.component_class)


def test_conditional_mixture_samples_are_their_class():
    """Exact samples and 20-step samples of every class are recognized by the digits
    network as the class asked for (the per-class fits are of the right digits)."""
    from searchd.evaluation.features import load_features
    from searchd.noise import make_noise

    feats = load_features("digits")
    den = load("gmm-digits-cond")
    seeds = range(500)
    y = torch.as_tensor(class_labels(seeds, 10))
    exact = den.sample_data(range(10_000, 10_500))
    assert float((feats.logits(exact).argmax(1) == y).float().mean()) >= 0.95
    sig = baseline("polynomial", 20, den.sigma_min, den.sigma_max, rho=7)
    x = solve(den, make_noise(seeds, den.shape), sig, cond=row_conditioning(den, seeds))
    assert float((feats.logits(x).argmax(1) == y).float().mean()) >= 0.95
    # Unconditional sampling (w = 0) ignores the class: near chance agreement.
    x0 = solve(den, make_noise(seeds, den.shape), sig, guidance=np.zeros(20),
               cond=row_conditioning(den, seeds))
    assert float((feats.logits(x0).argmax(1) == y).float().mean()) < 0.3


def test_class_digits_data_is_balanced_real_digits():
    data = ClassDigitsData()
    x = data(range(0, 20), dtype=torch.float64)
    from searchd.evaluation.digits import digits_images

    images, labels = digits_images()
    for s in (0, 7, 13):
        c = s % 10
        assert torch.equal(x[s], data.by_class[c][s // 10])
    assert x.shape == (20, 1, 8, 8) and len(images) == len(labels)


# Network denoisers: per-row guidance ----------------------------------------------------------
def tiny_cond_unet(path: Path) -> Path:
    """A random class-conditional UNet2DModel saved with a searchd.json declaring 3 classes
    and the null label 3 (as digits-unet-cond-s)."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    net = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, num_class_embeds=4)
    net.save_pretrained(path)
    meta = {"shape": [1, 8, 8], "cost": 1.0,
            "parameterization": {"kind": "edm_precond", "sigma_data": 0.75,
                                 "c_noise_scale": 250.0},
            "conditioning": {"num_classes": 3, "null_label": 3}}
    (path / "searchd.json").write_text(json.dumps(meta))
    return path


def test_network_per_row_guidance_matches_constant_guidance(tmp_path):
    from searchd.models.diffusers import load_diffusers

    path = tiny_cond_unet(tmp_path / "unet")
    plain = load_diffusers(path, runtime={"dtype": "float64"})
    assert plain.conditional and supports_guidance(plain)
    assert plain.conditioning.n == 3 and plain.conditioning.null_label == 3
    x = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sig = torch.tensor([0.3, 0.3, 2.0, 2.0, 9.0, 9.0], dtype=torch.float64)
    idx = torch.arange(6) + 7
    w = torch.tensor([1.0, 2.0, 0.0, 1.0, 3.5, 1.0], dtype=torch.float64)
    got = plain(x, sig, sample_index=idx, guidance=w)
    for r, wr in enumerate(w.tolist()):
        ref = load_diffusers(path, runtime={"dtype": "float64"}, guidance_scale=wr)
        want = ref(x[r : r + 1], sig[r : r + 1], sample_index=idx[r : r + 1])
        torch.testing.assert_close(got[r : r + 1], want, rtol=1e-10, atol=1e-10)
    # w = 1 everywhere: the conditional output alone, one network row per sample.
    rows: list[int] = []
    hook = plain.module.register_forward_pre_hook(lambda m, a, k: rows.append(a[0].shape[0]),
                                                  with_kwargs=True)
    plain(x, sig, sample_index=idx, guidance=torch.ones(6))
    assert rows == [6]
    rows.clear()
    plain(x, sig, sample_index=idx, guidance=w)
    assert rows == [6 + 3]  # the unconditional rows only where w != 1
    hook.remove()


def test_network_without_an_unconditional_input_refuses_guidance(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    from searchd.models.diffusers import load_diffusers

    net = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4)
    net.save_pretrained(tmp_path / "u")
    (tmp_path / "u" / "searchd.json").write_text(json.dumps(
        {"parameterization": {"kind": "edm_precond"}}))
    den = load_diffusers(tmp_path / "u")
    assert not supports_guidance(den)
    with pytest.raises(ValueError, match="unconditional input"):
        den(torch.zeros(2, 1, 8, 8), torch.ones(2), guidance=torch.full((2,), 2.0))


# Solvers ---------------------------------------------------------------------------------------
class Recorder:
    """A denoiser that records the keywords of every call (and returns x / (1 + s^2))."""

    shape = (2,)
    sigma_min, sigma_max, sigma_grid, cost = 0.002, 80.0, None, 1.0

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, x, sigma, **kw):
        self.calls.append({k: v.clone() for k, v in kw.items()})
        return x / (1 + sigma[:, None] ** 2)


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_solvers_pass_each_steps_weight_to_every_call_of_the_step(solver):
    den = Recorder()
    sig = baseline("polynomial", 5, 0.002, 80.0, rho=7)
    g = np.array([1.0, 2.0, 3.0, 1.0, 4.0])
    noise = torch.randn(3, 2, dtype=torch.float64)
    idx = {"sample_index": torch.tensor([5, 6, 7])}
    solve(den, noise, sig, solver=solver, guidance=g, cond=idx)
    assert len(den.calls) == nfe(solver, 5)
    # Calls in order: each step's calls carry that step's weight (Heun: two per step).
    per_step = SOLVERS[solver].step_calls(5)
    want = np.repeat(g, per_step)
    got = [float(c["guidance"][0]) for c in den.calls]
    assert got == want.tolist()
    assert all(torch.equal(c["sample_index"], idx["sample_index"]) for c in den.calls)
    # Without guidance the denoiser sees no such keyword, and the result is unchanged
    # from a guidance schedule of ones on a model that ignores it.
    den2 = Recorder()
    a = solve(den2, noise, sig, solver=solver)
    assert all("guidance" not in c for c in den2.calls)
    b = solve(Recorder(), noise, sig, solver=solver, guidance=np.ones(5))
    assert torch.equal(a, b)


def test_solve_checks_guidance():
    sig = baseline("polynomial", 3, 0.002, 80.0, rho=7)
    noise = torch.zeros(2, 2)
    with pytest.raises(ValueError, match="one weight per step"):
        solve(Recorder(), noise, sig, guidance=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"guidance\[1, 2\] = -1.0"):
        solve(Recorder(), noise, sig, guidance=[[1, 1, 1], [1, 1, -1.0]])
    with pytest.raises(ValueError, match="cond"):
        solve(Recorder(), noise, sig, cond={"sample_index": torch.arange(3)})


def test_network_calls_count_guided_steps_twice():
    assert network_calls("dpmpp_2m", 6) == 6
    assert network_calls("dpmpp_2m", 6, guided=True) == 12
    assert network_calls("dpmpp_2m", 6, guidance=[1, 2, 2, 1, 1, 1]) == 8
    # Heun: 2 calls per step, 1 on the last step to 0.
    assert network_calls("heun", 3, guidance=[2, 1, 2]) == 2 * 2 + 2 + 1 * 2
    assert network_calls("heun", 3, final_zero=False, guidance=[1, 1, 3]) == 2 + 2 + 4
    for name, spec in SOLVERS.items():
        assert sum(spec.step_calls(7)) == nfe(name, 7)
        assert network_calls(name, 7, guidance=np.ones(7)) == nfe(name, 7)
    with pytest.raises(ValueError, match="6 steps"):
        network_calls("euler", 6, guidance=[2.0])


# The schedule field ----------------------------------------------------------------------------
def test_schedule_ids_without_guidance_are_unchanged_and_guidance_is_identity():
    import hashlib

    sig = baseline("polynomial", 4, 0.002, 80.0, rho=7)
    s = Schedule(sig, solver="euler")
    canon = np.ascontiguousarray(canonical_sigmas(sig), dtype="<f8").tobytes()
    h = hashlib.sha256(b"euler" + b"|s|" + canon)
    assert s.id == h.hexdigest()[:HASH_CHARS]  # the formula of every stored id
    assert "guidance" not in s.to_dict()
    g = Schedule(sig, solver="euler", guidance=[1, 2, 2, 1])
    w = np.ascontiguousarray(canonical_sigmas(np.array([1.0, 2, 2, 1])), dtype="<f8").tobytes()
    assert g.id == hashlib.sha256(b"euler" + b"|s|" + canon + b"|g|" + w).hexdigest()[:HASH_CHARS]
    # Weights that differ by floating-point noise are one candidate, as levels are.
    assert Schedule(sig, solver="euler", guidance=[1, 2 * (1 + 1e-13), 2, 1]).id == g.id
    assert g.id != s.id and g.id != Schedule(sig, solver="euler", guidance=[1, 2, 2, 2]).id
    back = Schedule.from_json(g.to_json())
    assert back == g and back.guidance.tolist() == [1, 2, 2, 1]
    assert with_meta(g, origin="x").guidance.tolist() == [1, 2, 2, 1]
    assert g.guided_steps.tolist() == [False, True, True, False] and s.guided_steps is None


def test_schedule_refuses_bad_guidance():
    sig = baseline("polynomial", 3, 0.002, 80.0, rho=7)
    with pytest.raises(ValueError, match=r"expected \(3,\)"):
        Schedule(sig, guidance=[1.0, 2.0])
    with pytest.raises(ValueError, match=r"guidance\[2\] = nan"):
        Schedule(sig, guidance=[1.0, 2.0, float("nan")])
    with pytest.raises(ValueError, match=r"guidance\[0\] = -0.5"):
        Schedule(sig, guidance=[-0.5, 1, 1])


def test_model_schedule_latency_counts_guided_steps():
    from searchd.schedules.model_spaces import ModelSpace

    sig = baseline("polynomial", 4, 0.002, 80.0, rho=7)
    space = ModelSpace(sig, [1.0, 3.0], 13.0)
    s = Schedule(sig, model_ids=[1, 1, 1, 1])
    assert space.latency(s) == 12.0
    guided = Schedule(sig, model_ids=[1, 1, 1, 1], guidance=[1, 2, 1, 1])
    assert space.latency(guided) == 15.0
    space.check(s)
    with pytest.raises(ValueError, match="budget"):
        space.check(guided)


def test_gmm_plain_mixture_is_unchanged_by_the_guidance_plumbing():
    """The unconditional mixture's calls go through the same code with no bias: the same
    result as the posterior mean computed by brute force."""
    den = small_mixture()
    plain = GaussianMixtureDenoiser(den.weights, den.means, den.covs, shape=(4,),
                                    dtype=torch.float64)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    got = plain(x, torch.full((8,), 0.9, dtype=torch.float64))
    want = brute_posterior_mean(den.weights.numpy(), den.means.numpy(), den.covs.numpy(),
                                x.numpy(), 0.9)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-9, atol=1e-10)


# The shipped class-conditional UNet -----------------------------------------------------------
def test_conditional_unet_ships_and_loads_through_the_registry():
    pytest.importorskip("diffusers")
    path = DATA / "digits-unet-cond-s"
    files = {p.name for p in path.iterdir()}
    assert {"config.json", "diffusion_pytorch_model.safetensors", "searchd.json"} <= files
    assert sum(p.stat().st_size for p in path.iterdir()) <= 5 * 2**20
    meta = json.loads((path / "searchd.json").read_text())
    assert meta["conditioning"] == {"num_classes": 10, "null_label": 10}
    assert meta["training"]["label_dropout"] == 0.1 and meta["training"]["threads"] == 1
    den = load("digits-unet-cond-s")
    assert den.conditional and supports_guidance(den) and not den.guided
    assert den.conditioning.n == 10 and den.conditioning.null_label == 10
    assert isinstance(den.sample_data, ClassDigitsData)


def test_conditional_unet_follows_its_class_and_has_an_unconditional_mode():
    """300 samples at 35 NFE (Heun, EDM's schedule): with w = 1 the digits network agrees
    with the requested class (seed mod 10) on >= 90% of them; with w = 0 (the unconditional
    mode, the no-class label) agreement falls to near chance while the samples remain
    digits the network is confident about."""
    pytest.importorskip("diffusers")
    from searchd.evaluation.features import load_features
    from searchd.noise import make_noise

    feats = load_features("digits")
    den = load("digits-unet-cond-s")
    seeds = range(300)
    y = torch.as_tensor(class_labels(seeds, 10))
    sig = baseline("polynomial", 18, 0.002, 80.0, rho=7)
    noise = make_noise(seeds, (1, 8, 8))
    cond = row_conditioning(den, seeds)
    x1 = solve(den, noise, sig, solver="heun", cond=cond)
    p1 = torch.softmax(feats.logits(x1), 1)
    assert float((p1.argmax(1) == y).float().mean()) >= 0.9
    x0 = solve(den, noise, sig, solver="heun", guidance=np.zeros(18), cond=cond)
    p0 = torch.softmax(feats.logits(x0), 1)
    assert float((p0.argmax(1) == y).float().mean()) < 0.3
    assert float((p0.max(1).values >= 0.5).float().mean()) >= 0.8
