"""The shipped neural digits zoo: files, loading through the registry and a configuration,
the data as exact samples, and trained behaviour checked with the digits feature network."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from searchd.config import load_config
from searchd.models import load
from searchd.models.adapters import NEURAL_ZOO, DigitsData
from searchd.schedules import baseline
from searchd.solvers import nfe, solve

pytest.importorskip("diffusers")

ROOT = Path(__file__).resolve().parents[1]
MAX_TOTAL_BYTES = 20 * 2**20
# "Confident": the digits network's largest class probability is at least 0.5, i.e. the
# class is more likely than all others together. The network is trained with label
# smoothing, so its probabilities are compressed: on the 1,797 real digits 99.8% reach 0.5,
# 95.5% reach 0.8 and only 86% reach 0.9 (benchmarks/results/neural_zoo.md).
CONFIDENT = 0.5


pytestmark = pytest.mark.usefixtures("one_thread_module")  # tests/conftest.py


def test_weights_ship_within_the_size_budget():
    total = 0
    for name, path in NEURAL_ZOO.items():
        files = {p.name for p in path.iterdir()}
        assert {"config.json", "diffusion_pytorch_model.safetensors", "searchd.json"} <= files
        total += sum(p.stat().st_size for p in path.iterdir())
        meta = json.loads((path / "searchd.json").read_text())
        assert meta["parameterization"]["kind"] == "edm_precond", name
        assert meta["training"]["threads"] == 1
    assert total <= MAX_TOTAL_BYTES


def test_members_load_through_the_registry_with_costs_in_width_order():
    dens = {n: load(n) for n in NEURAL_ZOO}
    for d in dens.values():
        assert d.shape == (1, 8, 8) and d.sigma_min == 0.002 and d.sigma_max == 80.0
        assert d.sigma_grid is None and d.decode is None
        assert hasattr(d, "sample_data")
    costs = [dens[f"digits-unet-{w}"].cost for w in "sml"]
    assert costs[0] < costs[1] < costs[2] == pytest.approx(1.0)
    params = [sum(p.numel() for p in dens[f"digits-unet-{w}"].module.parameters()) for w in "sml"]
    assert params[0] < params[1] < params[2]


def test_exact_samples_are_the_dataset():
    data = DigitsData()
    block = data(range(5, 5 + 1797), dtype=torch.float64)
    assert block.shape == (1797, 1, 8, 8)
    # Any 1,797 consecutive seeds give every digit once: the same rows, permuted.
    flat = block.reshape(1797, -1)
    ref = data.images.reshape(1797, -1)
    assert torch.equal(torch.sort(flat, 0).values, torch.sort(ref, 0).values)
    assert float(block.min()) == -1.0 and float(block.max()) == 1.0


def test_config_loads_the_member_and_its_exact_reference():
    """configs/digits-unet.yaml as the evaluators see it: the model's facts and the
    exact:1797 reference (the dataset in the digits feature space), on one host that loads
    the model once."""
    from searchd.loop.factory import EvaluatorFactory

    cfg = load_config(ROOT / "configs" / "digits-unet.yaml")
    assert cfg.model.name == "digits-unet-s" and cfg.metric.reference == "exact:1797"
    host = EvaluatorFactory(cfg.resolve()).host()
    assert host.loads == 1 and host.evaluator is None  # no reference yet
    info = host.facts()
    assert info["shape"] == [1, 8, 8] and info["sigma_grid"] is None and info["exact_samples"]
    ref = host.exact_reference(1797, cfg.samples.reference_seed_base)
    ref2 = host.exact_reference(1797, 0)
    host.set_reference(ref)
    assert host.evaluator is not None and host.loads == 1
    assert ref["n"] == 1797
    # The whole dataset whatever the seed base: the same statistics.
    np.testing.assert_allclose(np.asarray(ref["mu"]), np.asarray(ref2["mu"]), atol=1e-6)


def test_trained_denoiser_at_high_noise_returns_the_data_mean():
    """E[x0 | x] tends to E[x0] as sigma grows: at sigma = 80 every member must return
    roughly the mean digit, whatever the noise. Measured mean absolute deviations: s 0.16,
    m 0.19, l 0.22 (sigma = 80 lies 4.3 standard deviations above the mean of the training
    noise distribution, ln sigma ~ N(-0.8, 1.2^2), so it is rarely trained); returning the
    noisy input scaled to the data range, or zeros, would be off by 0.5 or more."""
    mean = DigitsData().images.float().mean(0)
    x = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 80
    for name in NEURAL_ZOO:
        d = load(name)(x, torch.full((64,), 80.0))
        assert float((d - mean).abs().mean()) < 0.25, name
        assert float((torch.zeros_like(mean) - mean).abs().mean()) > 0.5  # the bar is not loose


def test_samples_are_recognized_by_the_digits_network():
    """1,000 samples of the smallest member at 35 NFE with Heun (EDM's schedule): the
    digits network gives >= 90% of them a confident class, and every digit appears
    (benchmarks/neural_zoo.py measures all three widths)."""
    from searchd.evaluation.features import load_features
    from searchd.noise import make_noise

    feats = load_features("digits")
    den = load("digits-unet-s")
    sig = baseline("polynomial", 18, 0.002, 80.0, rho=7)
    assert nfe("heun", 18) == 35
    x = solve(den, make_noise(range(1000), (1, 8, 8)), sig, solver="heun")
    p = torch.softmax(feats.logits(x), 1)
    assert float((p.max(1).values >= CONFIDENT).float().mean()) >= 0.9
    counts = np.bincount(p.argmax(1).numpy(), minlength=10)
    assert counts.min() >= 30, counts  # every digit, none nearly missing (100 each if even)
