"""Stable Diffusion 3-style checkpoints through the diffusers adapter: a tiny random
``SD3Transformer2DModel`` with a ``FlowMatchEulerDiscreteScheduler`` (shift 3) saved in the
pipeline layout. References: the flow formula applied to the raw transformer, and the SD3
pipeline's denoising loop (guidance on the velocity, then the scheduler's step) written out
with diffusers' own scheduler."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from searchd.models.diffusers import load_diffusers
from searchd.models.generic import Flow, flow_parameterization
from searchd.schedules import baseline
from searchd.schedules.baselines import scheduler_sigmas
from searchd.solvers import solve

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")  # tests/conftest.py

JOINT, POOLED = 16, 8  # text embedding widths of the tiny model


def tiny_text_encoder():
    """An SD3-style text encoder stand-in: prompt -> (hidden [P, 5, 16], pooled [P, 8]),
    a fixed function of the prompt's bytes (what the adapter does with them is under test,
    not the encoder)."""
    def encode(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(7)
        table = torch.randn(256, JOINT, generator=g)
        proj = torch.randn(JOINT, POOLED, generator=g)
        ids = torch.zeros(len(prompts), 5, dtype=torch.int64)
        for i, p in enumerate(prompts):
            b = list(p.encode())[:5]
            ids[i, : len(b)] = torch.tensor(b, dtype=torch.int64)
        hidden = table[ids]
        return hidden, hidden.mean(1) @ proj

    return encode


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sd3")
    torch.manual_seed(3)
    SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=JOINT,
        caption_projection_dim=16, pooled_projection_dim=POOLED, pos_embed_max_size=8,
    ).save_pretrained(root / "transformer")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(root / "scheduler")
    return root


PROMPTS = ["a red cube", "two cats"]


def load(sd3_dir: Path, guidance: float = 1.0):
    return load_diffusers(sd3_dir, prompts=PROMPTS, text_encoder=tiny_text_encoder(),
                          guidance_scale=guidance)


def test_sd3_denoiser_is_the_flow_formula_on_the_transformer(sd3_dir):
    den = load(sd3_dir)
    flow = flow_parameterization(den)
    assert flow is not None and den.shape == (4, 8, 8)
    assert flow.shift == 3.0 and not flow.dynamic_shifting  # the scheduler config's
    net = SD3Transformer2DModel.from_pretrained(sd3_dir / "transformer").eval()
    hidden, pooled = tiny_text_encoder()(PROMPTS)
    sigma = torch.tensor([0.1, 2.0, 40.0, 0.7], dtype=torch.float64)
    x = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = sigma / (1 + sigma)
    x_flow = x / (1 + sigma).view(-1, 1, 1, 1)
    rows = torch.arange(4) % 2  # row r gets prompt r mod P
    with torch.no_grad():
        v = net(x_flow.float(), encoder_hidden_states=hidden[rows],
                pooled_projections=pooled[rows], timestep=(1000 * t).float()).sample.double()
    torch.testing.assert_close(den(x, sigma), x_flow - t.view(-1, 1, 1, 1) * v,
                               rtol=1e-4, atol=1e-4)


def test_guided_euler_is_the_sd3_pipeline_loop(sd3_dir):
    """solve(euler) on the guided denoiser == SD3's loop: the transformer on [cond, uncond]
    rows, ``uncond + w (cond - uncond)`` on the velocity, FlowMatchEulerDiscreteScheduler's
    step. The checkpoint's scheduler (shift 3) shifts the ``sigmas=`` it is given, as the
    SD3 pipeline passes them on: ``scheduler_sigmas`` gives the values that land it on
    searchd's schedule."""
    w = 4.5
    den = load(sd3_dir, guidance=w)
    assert den.cost == 2.0
    net = SD3Transformer2DModel.from_pretrained(sd3_dir / "transformer").eval()
    enc = tiny_text_encoder()
    hidden, pooled = enc(PROMPTS)
    h0, p0 = enc([""])
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(sd3_dir / "scheduler")
    sigmas = baseline("flow_shift", 5, den.sigma_min, den.sigma_max, shift=3.0)
    given = scheduler_sigmas(sigmas, shift=flow_parameterization(den).shift)
    sched.set_timesteps(sigmas=given.tolist())
    np.testing.assert_allclose(sched.sigmas[:-1].double().numpy(),
                               Flow.sigma_to_t(sigmas[:-1]), rtol=2e-6)
    # Sampling starts from noise * t_0 (searchd's sigma_max is t = 80 / 81, not 1).
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    lat = noise * float(Flow.sigma_to_t(sigmas[0]))
    with torch.no_grad():
        for ts in sched.timesteps:
            out = net(torch.cat([lat, lat]), encoder_hidden_states=torch.cat(
                [hidden, h0.expand(2, -1, -1)]), pooled_projections=torch.cat(
                [pooled, p0.expand(2, -1)]), timestep=ts.expand(4)).sample
            c, u = out.chunk(2)
            lat = sched.step(u + w * (c - u), ts, lat).prev_sample
    ours = solve(den, noise, sigmas, solver="euler")
    torch.testing.assert_close(ours, lat, rtol=1e-4, atol=1e-4)


def test_sd3_needs_prompts_and_matching_negative_embeddings(sd3_dir):
    with pytest.raises(ValueError, match="needs prompts"):
        load_diffusers(sd3_dir)
    from searchd.models.generic import TextEmbeddings

    h, p = tiny_text_encoder()(PROMPTS)
    with pytest.raises(ValueError, match="negative prompt's too"):
        TextEmbeddings(h, h[:1], pooled=p)
    with pytest.raises(ValueError, match="pooled embeddings must be"):
        TextEmbeddings(h, pooled=p[:1])
    assert np.isclose(float(Flow.t_to_sigma(0.5)), 1.0)
