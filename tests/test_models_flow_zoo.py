"""The shipped rectified-flow digits zoo (digits-flow-s, -m): ordinary diffusers flow
checkpoints, loaded through the diffusers adapter as a user's SD3-style folder is, sampled
as diffusers' own flow-match Euler loop samples them, and trained well enough that the
digits network recognizes their samples."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from searchd.config import load_config
from searchd.models import load
from searchd.models.adapters import FLOW_ZOO, NEURAL_ZOO
from searchd.models.generic import Flow, flow_parameterization
from searchd.schedules import baseline
from searchd.solvers import nfe, solve

diffusers = pytest.importorskip("diffusers")
from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DModel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAX_TOTAL_BYTES = 10 * 2**20  # the flow members together
CONFIDENT = 0.5  # as tests/test_models_neural_zoo.py: the class beats all others together

pytestmark = pytest.mark.usefixtures("one_thread_module")  # tests/conftest.py


def test_members_ship_as_diffusers_flow_checkpoints_within_the_size_budget():
    total = 0
    for name, path in FLOW_ZOO.items():
        files = {p.name for p in path.iterdir()}
        assert files == {"config.json", "diffusion_pytorch_model.safetensors",
                         "scheduler_config.json", "searchd.json"}, name
        total += sum(p.stat().st_size for p in path.iterdir())
        meta = json.loads((path / "searchd.json").read_text())
        # No parameterization of searchd's own: it must come from the scheduler config.
        assert "parameterization" not in meta, name
        assert meta["training"]["threads"] == 1
        assert meta["training"]["t_sampling"]["kind"] == "logit_normal"
        sched = FlowMatchEulerDiscreteScheduler.from_pretrained(path)
        assert sched.config.num_train_timesteps == 1000
    assert total <= MAX_TOTAL_BYTES
    assert not set(FLOW_ZOO) & set(NEURAL_ZOO)


def test_members_load_through_the_diffusers_adapter_as_a_users_checkpoint():
    dens = {n: load(n) for n in FLOW_ZOO}
    for name, d in dens.items():
        flow = flow_parameterization(d)
        assert flow is not None and flow.time_scale == 1000.0 and not flow.data_at_one
        assert flow.shift == 1.0 and not flow.dynamic_shifting  # its scheduler config's
        assert d.shape == (1, 8, 8) and d.sigma_min == 0.002 and d.sigma_max == 80.0
        assert d.sigma_grid is None and hasattr(d, "sample_data")
        # The same folder given as a user's checkpoint (kind diffusers): the same denoiser.
        user = load(f"diffusers:{FLOW_ZOO[name]}")
        assert flow_parameterization(user) is not None
        x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 3
        s = torch.tensor([0.01, 0.5, 3.0, 80.0])
        torch.testing.assert_close(user(x, s), d(x, s), rtol=0, atol=0)
    assert dens["digits-flow-s"].cost < dens["digits-flow-m"].cost
    # An EDM member is not a flow model; a composed zoo of flow members is.
    assert flow_parameterization(load("digits-unet-s")) is None
    from searchd.models.compose import ComposedDenoiser

    assert flow_parameterization(ComposedDenoiser(list(dens.values()))) is not None


def test_sigma_and_flow_time_convert_both_ways():
    sigma = np.array([0.002, 0.3, 1.0, 80.0])
    t = Flow.sigma_to_t(sigma)
    np.testing.assert_allclose(t, [0.002 / 1.002, 0.3 / 1.3, 0.5, 80 / 81], rtol=1e-15)
    np.testing.assert_allclose(Flow.t_to_sigma(t), sigma, rtol=1e-12)
    assert Flow.sigma_to_t(0.0) == 0.0
    tt = Flow.sigma_to_t(torch.tensor([1.0, 3.0], dtype=torch.float64))
    assert isinstance(tt, torch.Tensor) and tt.tolist() == [0.5, 0.75]


def test_searchd_euler_is_diffusers_flow_match_euler_loop_on_the_shipped_model():
    """The pipeline-style loop: diffusers' scheduler, read from the shipped folder, given the
    schedule in flow time (``sigmas=``), stepping the raw shipped UNet, equals searchd's
    Euler on the loaded denoiser from the same noise."""
    path = FLOW_ZOO["digits-flow-s"]
    den = load("digits-flow-s")
    net = UNet2DModel.from_pretrained(path).eval()
    sched = FlowMatchEulerDiscreteScheduler.from_pretrained(path)
    sigmas = baseline("flow_shift", 6, den.sigma_min, den.sigma_max, shift=3.0)
    t = Flow.sigma_to_t(sigmas[:-1])
    sched.set_timesteps(sigmas=t.tolist())
    noise = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    x = noise * float(t[0])  # flow state at t_0: noise * sigma_0 / (1 + sigma_0)
    with torch.no_grad():
        for ts in sched.timesteps:
            x = sched.step(net(x, ts.expand(8)).sample, ts, x).prev_sample
    ours = solve(den, noise, sigmas, solver="euler")
    torch.testing.assert_close(ours, x, rtol=1e-4, atol=1e-4)


def test_trained_denoiser_at_high_noise_returns_the_data_mean():
    """At sigma = 80 (t = 0.988) the denoised image must be close to the mean digit (E[x0 | x]
    tends to E[x0]); zeros or the noisy input would be off by 0.5 or more."""
    from searchd.models.adapters import DigitsData

    mean = DigitsData().images.float().mean(0)
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 80
    for name in FLOW_ZOO:
        d = load(name)(x, torch.full((64,), 80.0))
        assert float((d - mean).abs().mean()) < 0.25, name


def test_samples_are_recognized_by_the_digits_network():
    """1,000 samples of digits-flow-s at 35 NFE with Heun (EDM's schedule, as the EDM members
    are measured): >= 90% get a confident class, and every digit appears
    (benchmarks/neural_zoo.py measures both widths)."""
    from searchd.evaluation.features import load_features
    from searchd.noise import make_noise

    feats = load_features("digits")
    den = load("digits-flow-s")
    sig = baseline("polynomial", 18, 0.002, 80.0, rho=7)
    assert nfe("heun", 18) == 35
    x = solve(den, make_noise(range(1000), (1, 8, 8)), sig, solver="heun")
    p = torch.softmax(feats.logits(x), 1)
    assert float((p.max(1).values >= CONFIDENT).float().mean()) >= 0.9
    counts = np.bincount(p.argmax(1).numpy(), minlength=10)
    assert counts.min() >= 30, counts


def test_flow_config_names_the_member_and_the_flow_space():
    cfg = load_config(ROOT / "configs" / "digits-flow.yaml")
    assert cfg.model.name == "digits-flow-s" and cfg.metric.reference == "exact:1797"
    assert cfg.space.warp == "flow"
    assert any(b.family.startswith("flow_") for b in cfg.baselines)
