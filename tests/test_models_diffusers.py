"""diffusers adapter: tiny random-weight models saved with save_pretrained to a temp dir.

References are independent of the adapter: the DDPM formulas for x0 written in alpha-bar
form, diffusers' own schedulers (Euler discrete and flow-match Euler) stepping the same
network, and guidance recomputed from separate conditional and unconditional denoisers.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

diffusers = pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    AutoencoderKL,
    DDPMScheduler,
    DiTTransformer2DModel,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    UNet2DConditionModel,
    UNet2DModel,
)
from tiny_models import tiny_unet as _tiny_unet  # noqa: E402
from tiny_models import tiny_vae  # noqa: E402

from searchd.models.adapters import load_spec  # noqa: E402
from searchd.models.base import Denoiser  # noqa: E402
from searchd.models.diffusers import load_diffusers, read_prompts  # noqa: E402
from searchd.schedules.baselines import ddpm_linear_grid, iddpm_cosine_grid  # noqa: E402
from searchd.solvers import solve  # noqa: E402

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread_module")  # tests/conftest.py


def tiny_unet(channels: int = 3, seed: int = 0) -> UNet2DModel:
    return _tiny_unet(channels, seed)


def save_unet(root: Path, scheduler_config: dict, seed: int = 0) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    tiny_unet(seed=seed).save_pretrained(root)
    sched_cls = getattr(diffusers, scheduler_config.pop("_class_name", "DDPMScheduler"))
    sched_cls(**scheduler_config).save_pretrained(root)
    return root


@pytest.fixture(scope="module")
def unet_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("unets")
    return {
        pred: save_unet(root / pred, {"prediction_type": pred, "num_train_timesteps": 1000})
        for pred in ("epsilon", "v_prediction", "sample")
    }


def raw_output(net: nn.Module, x_vp: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return net(x_vp, timestep=t).sample


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction", "sample"])
def test_denoiser_is_the_formula_applied_to_the_network_output(unet_dirs, pred):
    den = load_diffusers(unet_dirs[pred])
    assert isinstance(den, Denoiser) and den.decode is None and den.shape == (3, 8, 8)
    net = UNet2DModel.from_pretrained(unet_dirs[pred]).eval()
    abar_all = DDPMScheduler(num_train_timesteps=1000).alphas_cumprod.double()
    # At grid points the network must be called at the integer timestep of that level.
    idx = torch.tensor([0, 17, 250, 999])
    abar = abar_all[idx]
    sigma = ((1 - abar) / abar).sqrt()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 8, 8, generator=g, dtype=F64) * (1 + sigma.view(-1, 1, 1, 1))
    x_vp = x * abar.sqrt().view(-1, 1, 1, 1)
    out = raw_output(net, x_vp.float(), idx.float()).double()
    a, s = abar.sqrt().view(-1, 1, 1, 1), (1 - abar).sqrt().view(-1, 1, 1, 1)
    expected = {
        "epsilon": (x_vp - s * out) / a,  # DDPM: x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
        "v_prediction": a * x_vp - s * out,  # v = sqrt(abar) eps - sqrt(1 - abar) x0
        "sample": out,
    }[pred]
    got = den(x, sigma)
    assert got.dtype == F64
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4 * float(x.abs().max()))


def test_sigma_grid_matches_the_scheduler_and_an_independent_formula(unet_dirs, tmp_path):
    den = load_diffusers(unet_dirs["epsilon"])
    grid = den.sigma_grid
    assert grid is not None and grid.dtype == F64 and grid.shape == (1000,)
    assert torch.all(grid[1:] > grid[:-1])
    np.testing.assert_allclose(grid.numpy(), ddpm_linear_grid(1000), rtol=1e-6)
    assert den.sigma_min == pytest.approx(float(grid[0])) and den.sigma_max == float(grid[-1])
    # A cosine (squaredcos_cap_v2) checkpoint gets IDDPM's cosine grid (independent code).
    cos = load_diffusers(save_unet(tmp_path / "cos", {"beta_schedule": "squaredcos_cap_v2"}))
    np.testing.assert_allclose(cos.sigma_grid.numpy(), iddpm_cosine_grid(1000), rtol=1e-4)


def test_sigma_to_model_time_round_trips(unet_dirs):
    den = load_diffusers(unet_dirs["epsilon"])
    time = den.param.time
    g = torch.Generator().manual_seed(0)
    logs = torch.empty(2000, dtype=F64).uniform_(
        math.log(den.sigma_min), math.log(den.sigma_max), generator=g)
    sigma = logs.exp()
    t = time.sigma_to_t(sigma)
    assert float(t.min()) >= 0 and float(t.max()) <= 999
    torch.testing.assert_close(time.t_to_sigma(t), sigma, rtol=1e-10, atol=0)
    frac = torch.empty(2000, dtype=F64).uniform_(0, 999, generator=g)
    torch.testing.assert_close(time.sigma_to_t(time.t_to_sigma(frac)), frac, rtol=0, atol=1e-8)
    # Integer timesteps sit exactly on the grid; between grid points log-sigma is linear.
    torch.testing.assert_close(den.model_time(den.sigma_grid[[3, 500]]), torch.tensor(
        [3.0, 500.0], dtype=F64))
    mid = (den.sigma_grid[10].log() + den.sigma_grid[11].log()) / 2
    assert float(den.model_time(mid.exp())) == pytest.approx(10.5, abs=1e-9)


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_euler_through_solve_equals_diffusers_euler_scheduler(unet_dirs, pred):
    """solve(euler) on the adapter == diffusers' EulerDiscreteScheduler loop on the raw UNet
    (integer 'trailing' timesteps, so both call the network at the same times)."""
    den = load_diffusers(unet_dirs[pred])
    net = UNet2DModel.from_pretrained(unet_dirs[pred]).eval()
    sched = EulerDiscreteScheduler.from_config(
        DDPMScheduler(prediction_type=pred).config, timestep_spacing="trailing")
    sched.set_timesteps(8)
    noise = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    x = noise * sched.sigmas[0]
    with torch.no_grad():
        for t in sched.timesteps:
            x = sched.step(net(sched.scale_model_input(x, t), t).sample, t, x).prev_sample
    ours = solve(den, noise, sched.sigmas.double().numpy(), solver="euler")
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4 * float(x.abs().max()))


def test_flow_matching_checkpoint_equals_diffusers_flow_euler(tmp_path):
    d = save_unet(tmp_path / "flow", {"_class_name": "FlowMatchEulerDiscreteScheduler"})
    den = load_diffusers(d)
    assert den.param.kind == "flow" and den.sigma_grid is None
    net = UNet2DModel.from_pretrained(d).eval()
    # D is x_flow - t v with t = sigma / (1 + sigma) and the network fed 1000 t.
    sigma = torch.tensor([0.05, 1.0, 30.0], dtype=F64)
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(3), dtype=F64)
    t = sigma / (1 + sigma)
    x_flow = x / (1 + sigma).view(-1, 1, 1, 1)
    v = raw_output(net, x_flow.float(), (1000 * t).float()).double()
    torch.testing.assert_close(den(x, sigma), x_flow - t.view(-1, 1, 1, 1) * v,
                               rtol=1e-4, atol=1e-4)
    # Euler in EDM sigma equals diffusers' flow-match Euler in t = sigma / (1 + sigma):
    # both keep the predicted x0 and noise from step to step. The solver starts from
    # noise * sigma_0, i.e. x_flow = noise * t_0.
    ts = [0.98, 0.8, 0.55, 0.3, 0.1]
    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(sigmas=ts)
    noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    xf = noise * ts[0]
    with torch.no_grad():
        for tt in sched.timesteps:
            xf = sched.step(net(xf, timestep=tt.expand(2)).sample, tt, xf).prev_sample
    ours = solve(den, noise, np.array([s / (1 - s) for s in ts] + [0.0]), solver="euler")
    torch.testing.assert_close(ours, xf, rtol=1e-4, atol=1e-4)


class TinyTextEncoder(nn.Module):
    """A real (tiny, random) text encoder: bytes -> embeddings -> one transformer layer."""

    def __init__(self, dim: int = 32, length: int = 6):
        super().__init__()
        torch.manual_seed(5)
        self.length = length
        self.embed = nn.Embedding(256, dim)
        self.pos = nn.Parameter(torch.randn(length, dim) * 0.1)
        self.layer = nn.TransformerEncoderLayer(dim, 2, 64, dropout=0.0, batch_first=True)
        self.calls = 0

    def forward(self, prompts: list[str]) -> torch.Tensor:
        self.calls += 1
        ids = torch.zeros(len(prompts), self.length, dtype=torch.int64)
        for i, p in enumerate(prompts):
            b = list(p.encode())[: self.length]
            ids[i, : len(b)] = torch.tensor(b, dtype=torch.int64)
        with torch.no_grad():
            return self.layer(self.embed(ids) + self.pos).detach()


@pytest.fixture(scope="module")
def latent_pipeline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny text-to-image latent pipeline: unet/, vae/, scheduler/ and a prompts file."""
    root = tmp_path_factory.mktemp("ldm")
    torch.manual_seed(6)
    UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        layers_per_block=1, norm_num_groups=4, attention_head_dim=4,
    ).save_pretrained(root / "unet")
    tiny_vae().save_pretrained(root / "vae")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                  prediction_type="epsilon").save_pretrained(root / "scheduler")
    (root / "prompts.txt").write_text("# test prompts\na red fox\n\nthe digit seven\na boat\n")
    return root


def test_prompts_file_skips_comments_and_blank_lines(latent_pipeline):
    assert read_prompts(latent_pipeline / "prompts.txt") == [
        "a red fox", "the digit seven", "a boat"]


def test_text_guided_latent_model_end_to_end_through_solve(latent_pipeline):
    enc = TinyTextEncoder()
    prompts = latent_pipeline / "prompts.txt"
    guided = load_diffusers(latent_pipeline, prompts=prompts, text_encoder=enc,
                            guidance_scale=4.0)
    assert guided.shape == (4, 8, 8) and guided.decode is not None and guided.cost == 2.0
    assert enc.calls == 2  # prompts and the empty negative prompt, once, at load time
    cond = load_diffusers(latent_pipeline, prompts=prompts, text_encoder=enc)
    uncond = load_diffusers(latent_pipeline, prompts=[""], text_encoder=enc)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 4, 8, 8, generator=g)
    sigma = torch.tensor([0.3, 1.0, 2.0, 5.0, 9.0, 14.0])
    # Guidance composed inside: u + w (c - u), from separate conditional/unconditional models.
    d_c, d_u = cond(x, sigma), uncond(x, sigma)
    torch.testing.assert_close(guided(x, sigma), d_u + 4.0 * (d_c - d_u), rtol=1e-4, atol=1e-4)
    # ... in one batched network call of conditional and unconditional rows.
    seen: list[int] = []
    hook = guided.module.register_forward_hook(lambda m, a, k: seen.append(a[0].shape[0]))
    guided(x, sigma)
    hook.remove()
    assert seen == [12]
    # Row r uses prompt r mod 3: rows 0 and 3 share a prompt, so equal inputs give equal x0.
    x_same = x.clone()
    x_same[3] = x[0]
    s_same = sigma.clone()
    s_same[3] = sigma[0]
    out = cond(x_same, s_same)
    torch.testing.assert_close(out[3], out[0])
    assert not torch.allclose(cond(x_same[[0, 1]], s_same[[0, 1]])[1],
                              cond(x_same[[1, 0]], s_same[[1, 0]])[1])
    # sample_index overrides the row position.
    torch.testing.assert_close(
        cond(x[[4]], sigma[[4]], sample_index=torch.tensor([4])), cond(x, sigma)[[4]])
    # End to end: solve in latent space, decode to images in [-1, 1].
    sig = np.array([14.6, 6.0, 2.5, 1.0, 0.3, 0.0])
    noise = torch.randn(6, 4, 8, 8, generator=torch.Generator().manual_seed(8))
    lat = solve(guided, noise, sig, solver="euler")
    assert lat.shape == (6, 4, 8, 8) and torch.isfinite(lat).all()
    images = guided.decode(lat)
    assert images.shape == (6, 3, 16, 16)
    assert float(images.min()) >= -1 and float(images.max()) <= 1
    # The decoder is the VAE with the scaling factor undone.
    vae = AutoencoderKL.from_pretrained(latent_pipeline / "vae").eval()
    with torch.no_grad():
        ref = vae.decode(lat / vae.config.scaling_factor).sample.clamp(-1, 1)
    torch.testing.assert_close(images, ref, rtol=1e-4, atol=1e-4)
    # Guidance changes the result; the unguided run is a different sample.
    assert not torch.allclose(solve(cond, noise, sig, solver="euler"), lat, atol=1e-3)


def test_text_model_without_prompts_is_refused(latent_pipeline):
    with pytest.raises(ValueError, match="needs prompts"):
        load_diffusers(latent_pipeline, text_encoder=TinyTextEncoder())


def test_dit_transformer_class_conditional_with_guidance(tmp_path):
    torch.manual_seed(9)
    d = tmp_path / "dit"
    DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
        num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10,
    ).save_pretrained(d / "transformer")
    DDPMScheduler(beta_schedule="linear", prediction_type="epsilon").save_pretrained(
        d / "scheduler")
    den = load_diffusers(d, guidance_scale=1.5, labels=[7, 2])
    net = DiTTransformer2DModel.from_pretrained(d / "transformer").eval()
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(10), dtype=F64)
    sigma = torch.tensor([0.1, 0.8, 4.0, 40.0], dtype=F64)
    t = den.model_time(sigma).float()
    x_vp = (x / (1 + sigma**2).sqrt().view(-1, 1, 1, 1)).float()
    with torch.no_grad():
        c = net(x_vp, timestep=t, class_labels=torch.tensor([7, 2, 7, 2])).sample[:, :4]
        u = net(x_vp, timestep=t, class_labels=torch.full((4,), 10)).sample[:, :4]
    eps = (u + 1.5 * (c - u)).double()
    torch.testing.assert_close(den(x, sigma), x - sigma.view(-1, 1, 1, 1) * eps,
                               rtol=1e-4, atol=1e-3)


def test_load_spec_dispatches_and_checks_options(unet_dirs):
    class Spec:
        name, kind, path = "tiny", "diffusers", str(unet_dirs["epsilon"])
        options = {"runtime": {"batch_size": 2}}

    den = load_spec(Spec())
    assert den.batch_size == 2 and den.name == "tiny"
    x = torch.randn(5, 3, 8, 8)
    s = torch.full((5,), 2.0)
    # Chunking (2 rows per call) gives the same result as one call.
    torch.testing.assert_close(den(x, s), load_diffusers(unet_dirs["epsilon"])(x, s))
    with pytest.raises(ValueError, match="not text-conditioned"):
        load_diffusers(unet_dirs["epsilon"], prompts=["a cat"])
    Spec.options = {"guidnace_scale": 2.0}
    with pytest.raises(ValueError, match="unknown options"):
        load_spec(Spec())
    Spec.kind = "onnx"
    with pytest.raises(ValueError, match="known kinds"):
        load_spec(Spec())


def test_missing_scheduler_needs_an_explicit_parameterization(tmp_path):
    tiny_unet().save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match="parameterization"):
        load_diffusers(tmp_path / "bare")
    den = load_diffusers(tmp_path / "bare", parameterization={"kind": "vp_eps",
                                                             "grid": "ddpm_linear"})
    np.testing.assert_allclose(den.sigma_grid.numpy(), ddpm_linear_grid(), rtol=1e-12)
