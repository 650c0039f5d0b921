"""EDM pickles: the loading path, with a tiny pickled module that follows EDMPrecond's calling
convention ``forward(x, sigma, class_labels=None, force_fp32=False)``.

``MiniEDMPrecond`` below is NOT NVlabs' network: it is a small stand-in for the file format
(a pickled dict whose ``"ema"`` entry is a preconditioned module with ``img_channels``,
``img_resolution``, ``label_dim`` and ``sigma_data``), so the adapter can be tested without
NVlabs' code or weights. Real EDM snapshots also need ``torch_utils``/``dnnlib`` importable;
that requirement is tested with a pickle that refers to ``torch_utils.persistence``.
"""

from __future__ import annotations

import importlib.util
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from searchd.models.adapters import load_spec
from searchd.models.edm import (
    INSTALL_HINT,
    MissingNVlabsCode,
    load_edm,
    nvlabs_code_available,
    read_edm_pickle,
)
from searchd.solvers import solve

pytestmark = pytest.mark.usefixtures("one_thread_module")  # tests/conftest.py


class MiniEDMPrecond(nn.Module):
    """EDM preconditioning around one conv layer, with EDMPrecond's attributes and call."""

    def __init__(self, img_resolution: int = 8, img_channels: int = 3, label_dim: int = 0,
                 sigma_data: float = 0.5):
        super().__init__()
        torch.manual_seed(0)
        self.img_resolution, self.img_channels = img_resolution, img_channels
        self.label_dim, self.sigma_data = label_dim, sigma_data
        self.sigma_min, self.sigma_max = 0, float("inf")
        self.conv = nn.Conv2d(img_channels, img_channels, 3, padding=1)
        self.label = nn.Linear(label_dim, img_channels) if label_dim else None

    def forward(self, x, sigma, class_labels=None, force_fp32=False):
        x = x.to(torch.float32)
        sigma = sigma.to(torch.float32).reshape(-1, 1, 1, 1)
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        f = self.conv(c_in * x) * (1 + 0.1 * c_noise)
        if self.label is not None:
            labels = (torch.zeros(x.shape[0], self.label_dim) if class_labels is None
                      else class_labels.to(torch.float32))
            f = f + self.label(labels).view(x.shape[0], -1, 1, 1)
        return c_skip * x + c_out * f


def write_snapshot(path, net: nn.Module) -> None:
    with open(path, "wb") as f:
        pickle.dump({"ema": net, "augment_pipe": None, "dataset_kwargs": {}}, f)


def test_unconditional_pickle_is_the_network_itself(tmp_path):
    net = MiniEDMPrecond()
    write_snapshot(tmp_path / "net.pkl", net)
    den = load_edm(tmp_path / "net.pkl", trust_remote_code=True)
    assert den.shape == (3, 8, 8) and den.sigma_min == 0.002 and den.sigma_max == 80.0
    assert den.sigma_grid is None and den.decode is None
    x = torch.randn(4, 3, 8, 8) * 5
    s = torch.tensor([0.002, 0.5, 5.0, 80.0])
    with torch.no_grad():
        expected = net(x, s)
    torch.testing.assert_close(den(x, s), expected)
    # A few Heun steps through solve: finite and deterministic.
    sig = np.array([80.0, 10.0, 1.0, 0.1, 0.0])
    noise = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    a, b = solve(den, noise, sig, solver="heun"), solve(den, noise, sig, solver="heun")
    assert torch.isfinite(a).all() and torch.equal(a, b)


def test_class_conditional_pickle_gets_one_hot_labels_in_turn_and_guidance(tmp_path):
    net = MiniEDMPrecond(label_dim=4)
    write_snapshot(tmp_path / "cond.pkl", net)

    class Spec:
        name, kind, path = "mini", "edm", str(tmp_path / "cond.pkl")
        options = {"guidance_scale": 2.0, "trust_remote_code": True}

    guided = load_spec(Spec())
    plain = load_edm(tmp_path / "cond.pkl", trust_remote_code=True)
    assert guided.cost == 2.0 and plain.cost == 1.0
    x = torch.randn(6, 3, 8, 8)
    s = torch.full((6,), 1.5)
    onehot = torch.eye(4)[[0, 1, 2, 3, 0, 1]]
    with torch.no_grad():
        c, u = net(x, s, onehot), net(x, s, torch.zeros(6, 4))
    torch.testing.assert_close(plain(x, s), c)
    torch.testing.assert_close(guided(x, s), u + 2.0 * (c - u), rtol=1e-5, atol=1e-5)
    fixed = load_edm(tmp_path / "cond.pkl", labels=[3], trust_remote_code=True)
    with torch.no_grad():
        torch.testing.assert_close(fixed(x, s), net(x, s, torch.eye(4)[[3] * 6]))


@pytest.mark.skipif(nvlabs_code_available(), reason="NVlabs' code is importable here")
def test_missing_nvlabs_code_says_what_to_install(tmp_path):
    # What a real snapshot starts with: a reference to torch_utils.persistence (protocol 0
    # GLOBAL opcode); nothing after it is read once the import fails.
    (tmp_path / "snap.pkl").write_bytes(
        b"ctorch_utils.persistence\n_reconstruct_persistent_obj\n.")
    with pytest.raises(MissingNVlabsCode) as err:
        read_edm_pickle(tmp_path / "snap.pkl")
    msg = str(err.value)
    assert msg == INSTALL_HINT and "\n" not in msg
    assert "NVlabs/edm" in msg and "PYTHONPATH" in msg
    assert importlib.util.find_spec("torch_utils") is None


def test_bad_files_are_refused(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_edm(tmp_path / "missing.pkl", trust_remote_code=True)
    with open(tmp_path / "nomodule.pkl", "wb") as f:
        pickle.dump({"ema_typo": MiniEDMPrecond()}, f)
    with pytest.raises(ValueError, match="no torch module under 'ema'"):
        load_edm(tmp_path / "nomodule.pkl", trust_remote_code=True)
