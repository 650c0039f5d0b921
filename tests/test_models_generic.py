"""Generic adapter: every parameterization against its formula on a tiny real module, the
``module:function`` entry point, conditioning, guidance and gradients."""

from __future__ import annotations

import math
import textwrap

import numpy as np
import pytest
import torch
from torch import nn

from searchd.models.adapters import load_spec
from searchd.models.base import Denoiser
from searchd.models.generic import (
    ClassLabels,
    ContinuousVPTime,
    DiscreteTime,
    NetworkDenoiser,
    load_entry_point,
    make_parameterization,
)
from searchd.models.runtime import Runtime
from searchd.schedules.baselines import iddpm_cosine_grid, vp_sigma_to_t

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread_module")  # tests/conftest.py


class TinyNet(nn.Module):
    """out = conv(x) * (1 + 0.3 tanh(t / scale)) + 0.1 t / scale, optionally class-shifted.
    ``out_channels`` = 2C mimics ADM/IDDPM's learned variance."""

    def __init__(self, channels: int = 2, out_channels: int | None = None, classes: int = 0,
                 t_scale: float = 1.0, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1)
        self.cls = nn.Linear(classes, out_channels or channels) if classes else None
        self.t_scale = t_scale
        self.img_channels, self.img_resolution = channels, 4

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels=None) -> torch.Tensor:
        tt = (t / self.t_scale).view(-1, 1, 1, 1).to(x.dtype)
        out = self.conv(x) * (1 + 0.3 * torch.tanh(tt)) + 0.1 * tt
        if self.cls is not None and class_labels is not None:
            out = out + self.cls(class_labels).view(x.shape[0], -1, 1, 1)
        return out


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sigma = torch.tensor([0.01, 0.4, 2.0, 35.0], dtype=F64)
    return torch.randn(4, 2, 4, 4, generator=g, dtype=F64) * (1 + sigma.view(-1, 1, 1, 1)), sigma


def raw(net: nn.Module, x: torch.Tensor, t: torch.Tensor, **kw) -> torch.Tensor:
    with torch.no_grad():
        return net(x.float(), t.float(), **kw).double()


def col(v: torch.Tensor) -> torch.Tensor:
    return v.view(-1, 1, 1, 1)


def test_edm_direct_returns_the_network_output():
    net = TinyNet()
    den = NetworkDenoiser(net, make_parameterization("edm"), (2, 4, 4))
    assert isinstance(den, Denoiser)
    x, s = batch()
    torch.testing.assert_close(den(x, s), raw(net, x, s), rtol=1e-5, atol=1e-5)


def test_edm_preconditioning_matches_the_paper():
    net = TinyNet(t_scale=50.0)
    sd = 0.6
    den = NetworkDenoiser(net, make_parameterization(
        {"kind": "edm_precond", "sigma_data": sd, "c_noise_scale": 250.0}), (2, 4, 4))
    x, s = batch(1)
    # Karras et al. 2022, Table 1.
    c_skip = sd**2 / (s**2 + sd**2)
    c_out = s * sd / (s**2 + sd**2).sqrt()
    c_in = 1 / (sd**2 + s**2).sqrt()
    c_noise = 250.0 * s.log()
    expected = col(c_skip) * x + col(c_out) * raw(net, col(c_in) * x, c_noise)
    torch.testing.assert_close(den(x, s), expected, rtol=1e-5, atol=1e-5)


def test_vp_eps_continuous_time_matches_the_vp_sde():
    net = TinyNet(t_scale=999.0)
    den = NetworkDenoiser(net, make_parameterization(
        {"kind": "vp_eps", "beta_min": 0.1, "beta_max": 20.0, "time_scale": 999.0}), (2, 4, 4))
    x, s = batch(2)
    t = torch.from_numpy(vp_sigma_to_t(s.numpy())) * 999.0  # the baselines' independent code
    alpha = 1 / (1 + s**2).sqrt()
    x_vp = col(alpha) * x
    eps = raw(net, x_vp, t)
    sigma_vp = col(s * alpha)
    torch.testing.assert_close(den(x, s), (x_vp - sigma_vp * eps) / col(alpha),
                               rtol=1e-5, atol=1e-5)
    vp = den.param.time
    assert isinstance(vp, ContinuousVPTime)
    torch.testing.assert_close(vp.t_to_sigma(vp.sigma_to_t(s)), s, rtol=1e-12, atol=0)


@pytest.mark.parametrize("kind", ["vp_v", "vp_x0"])
def test_vp_v_and_x0_on_a_given_alphas_cumprod(kind):
    abar = np.cumprod(1 - np.linspace(1e-3, 0.1, 40))
    net = TinyNet(t_scale=40.0)
    den = NetworkDenoiser(net, make_parameterization(
        {"kind": kind, "alphas_cumprod": abar.tolist()}), (2, 4, 4))
    grid = np.sqrt((1 - abar) / abar)
    np.testing.assert_allclose(den.sigma_grid.numpy(), grid, rtol=1e-12)
    assert den.sigma_min == pytest.approx(grid[0]) and den.sigma_max == pytest.approx(grid[-1])
    idx = [0, 7, 20, 39]
    s = torch.tensor(grid[idx])
    x = torch.randn(4, 2, 4, 4, generator=torch.Generator().manual_seed(3), dtype=F64)
    a = torch.tensor(np.sqrt(abar[idx]))
    x_t = col(a) * x
    out = raw(net, x_t, torch.tensor(idx, dtype=F64))  # grid points: integer timesteps
    expected = col(a) * x_t - col((1 - a**2).sqrt()) * out if kind == "vp_v" else out
    torch.testing.assert_close(den(x, s), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("data_at_one", [False, True])
def test_flow_velocity_to_x0(data_at_one):
    net = TinyNet(t_scale=1000.0)
    den = NetworkDenoiser(net, make_parameterization(
        {"kind": "flow", "time_scale": 1000.0, "data_at_one": data_at_one}), (2, 4, 4))
    x, s = batch(4)
    t = s / (1 + s)  # x_t = (1 - t) x0 + t n  <=>  x / (1 + sigma)
    x_t = x / col(1 + s)
    if data_at_one:  # x_t' = t' x0 + (1 - t') n, t' = 1 - t, velocity u = x0 - n
        u = raw(net, x_t, 1000.0 * (1 - t))
        expected = x_t + col(1 - (1 - t)) * u
    else:  # velocity v = n - x0
        v = raw(net, x_t, 1000.0 * t)
        expected = x_t - col(t) * v
    torch.testing.assert_close(den(x, s), expected, rtol=1e-5, atol=1e-5)


def test_flow_x0_is_exact_for_the_true_velocity():
    """With the true velocity n - x0 the flow conversion recovers x0 exactly."""
    x0 = torch.randn(3, 2, 4, 4, dtype=F64)
    n = torch.randn(3, 2, 4, 4, dtype=F64)
    s = torch.tensor([0.1, 1.0, 20.0], dtype=F64)
    p = make_parameterization("flow")
    x = x0 + col(s) * n
    torch.testing.assert_close(p.to_x0(x, s, n - x0), x0)
    vp = make_parameterization({"kind": "vp_v", "grid": "ddpm_linear"})
    alpha = col(1 / (1 + s**2).sqrt())
    v = alpha * n - col(s) * alpha * x0  # v = alpha eps - sigma_vp x0
    torch.testing.assert_close(vp.to_x0(x, s, v), x0)


ENTRY = textwrap.dedent('''
    import torch
    from torch import nn

    class IDDPMLike(nn.Module):
        """eps and a learned-variance half, like ADM/IDDPM (2C output channels)."""

        def __init__(self, width):
            super().__init__()
            torch.manual_seed(11)
            self.conv = nn.Conv2d(1, 2, 3, padding=1)
            self.width = width

        def forward(self, x, t):
            return self.conv(x) * (1 + t.view(-1, 1, 1, 1) / 1000)

    def build(width=4):
        return IDDPMLike(width), {"kind": "vp_eps", "grid": "iddpm_cosine",
                                  "time_scale": 0.25, "shape": [1, 8, 8]}

    def wrong():
        return "not a module"
''')


def test_entry_point_covers_iddpm_with_its_grid_and_learned_variance(tmp_path, monkeypatch):
    (tmp_path / "my_iddpm.py").write_text(ENTRY)
    monkeypatch.syspath_prepend(str(tmp_path))
    den = load_entry_point("my_iddpm:build", {"args": {"width": 3}}, trust_remote_code=True)
    by_file = load_entry_point(f"{tmp_path / 'my_iddpm.py'}:build", trust_remote_code=True)
    assert den.shape == (1, 8, 8) and den.module.width == 3
    np.testing.assert_allclose(den.sigma_grid.numpy(), iddpm_cosine_grid(4000), rtol=1e-9)
    idx = torch.tensor([0, 1000, 3999])
    s = den.sigma_grid[idx]
    x = torch.randn(3, 1, 8, 8, dtype=F64) * col(1 + s)
    # IDDPM's rescale_timesteps: the network sees index * 1000 / 4000; keep the eps half.
    eps = raw(den.module, x / col((1 + s**2).sqrt()), idx.double() * 0.25)[:, :1]
    torch.testing.assert_close(den(x, s), x - col(s) * eps, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(by_file(x, s), den(x, s))
    with pytest.raises(ValueError, match="must return"):
        load_entry_point("my_iddpm:wrong", trust_remote_code=True)
    with pytest.raises(ValueError, match="module:function"):
        load_entry_point("my_iddpm", trust_remote_code=True)

    class Spec:
        name, kind, path = "iddpm", "generic", "my_iddpm:build"
        options = {"parameterization": {"time_scale": 1.0}, "runtime": {"batch_size": 2},
                   "trust_remote_code": True}

    spec_den = load_spec(Spec())  # options override the returned parameterization
    assert spec_den.batch_size == 2
    assert float(spec_den.model_time(s[1:2])) == pytest.approx(1000.0, abs=1e-6)


def test_unknown_parameterization_and_parameters_are_refused():
    with pytest.raises(ValueError, match="allowed"):
        make_parameterization("ve")
    with pytest.raises(ValueError, match="unknown parameters"):
        make_parameterization({"kind": "vp_eps", "grid": "ddpm_linear", "rho": 7})
    with pytest.raises(ValueError, match="unknown grid"):
        make_parameterization({"kind": "vp_eps", "grid": "edm"})


def test_class_labels_guidance_and_row_assignment():
    net = TinyNet(classes=3)
    labels = ClassLabels(3, one_hot=True)
    p = make_parameterization("edm")
    guided = NetworkDenoiser(net, p, (2, 4, 4), conditioning=labels, guidance_scale=2.5)
    plain = NetworkDenoiser(net, p, (2, 4, 4), conditioning=labels)
    x, s = batch(5)
    onehot = torch.eye(3)[[0, 1, 2, 0]]  # row r -> class r mod 3
    c = raw(net, x, s, class_labels=onehot)
    u = raw(net, x, s, class_labels=torch.zeros(4, 3))
    torch.testing.assert_close(plain(x, s), c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(guided(x, s), u + 2.5 * (c - u), rtol=1e-5, atol=1e-5)
    idx = torch.tensor([2, 2, 2, 2])
    torch.testing.assert_close(
        plain(x, s, sample_index=idx), raw(net, x, s, class_labels=torch.eye(3)[[2] * 4]),
        rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unconditional"):
        NetworkDenoiser(net, p, (2, 4, 4), conditioning=ClassLabels(3), guidance_scale=2.0)


def test_gradients_flow_to_sigma_and_outputs_are_ordinary_tensors():
    net = TinyNet(t_scale=50.0)
    den = NetworkDenoiser(net, make_parameterization(
        {"kind": "vp_eps", "grid": "ddpm_linear"}), (2, 4, 4),
        runtime=Runtime(dtype=torch.float64))
    x, _ = batch(6)
    out = den(x, torch.full((4,), 1.3, dtype=F64))
    assert not out.is_inference() and not out.requires_grad
    s = torch.full((4,), 1.3, dtype=F64, requires_grad=True)
    den(x, s).sum().backward()
    h = 1e-6
    fd = (den(x, torch.full((4,), 1.3 + h, dtype=F64)).sum((1, 2, 3))
          - den(x, torch.full((4,), 1.3 - h, dtype=F64)).sum((1, 2, 3))) / (2 * h)
    # A float64 network: the central difference is good to ~1e-9 relative.
    torch.testing.assert_close(s.grad, fd, rtol=1e-6, atol=1e-6 * float(fd.abs().max()))


def test_discrete_time_rejects_bad_grids():
    with pytest.raises(ValueError, match="decreasing"):
        DiscreteTime([0.9, 0.95, 0.5])
    with pytest.raises(ValueError, match="sigma = 0"):
        DiscreteTime([1.0, 0.5])
    t = DiscreteTime.from_sigmas([0.1, 1.0, 10.0])
    # Log-sigma interpolation: the geometric mean of neighbours is halfway.
    assert float(t.sigma_to_t(torch.tensor([math.sqrt(0.1)], dtype=F64))) == pytest.approx(0.5)
    # Outside the grid the time clamps to its ends.
    torch.testing.assert_close(t.sigma_to_t(torch.tensor([0.01, 50.0], dtype=F64)),
                               torch.tensor([0.0, 2.0], dtype=F64))
