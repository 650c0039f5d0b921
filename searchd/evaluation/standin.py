"""A random-weight stand-in for clean-fid's Inception TorchScript, for tests and measurements.

The real file (``inception-2015-12-05.pt``) cannot be downloaded everywhere. This builds a
small TorchScript network with the same interface, so that the loading path, the clean-fid
preprocessing emulation and the metrics can be exercised and measured without it:

* ``layers``: a ``Sequential`` taking 299 x 299 inputs normalized as (x - 128) / 128 and
  returning [B, 2048, 1, 1]; its children are named like the real file's (``conv``, ...,
  ``mixed_5``, ``mixed_6`` with a ``conv`` branch giving 17 x 17 maps, ...), so spatial
  features (first 7 channels of ``mixed_6.conv``) exist;
* ``output``: a ``Linear(2048, 1008)``;
* ``forward(img, return_features=False)`` on uint8 levels 0..255 at any size, resizing to
  299 inside (bilinear) as the real file does in clean-fid's legacy_tensorflow mode.

Its features mean nothing; it is never used for a reported FID of a model.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _ConvReLU(nn.Module):
    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, padding: int = 0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv(x))


class _Mixed(nn.Module):
    """Two branches concatenated, the first named ``conv`` as in the real ``mixed_6``."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = _ConvReLU(cin, cout, 1)
        self.tower = _ConvReLU(cin, cout, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([self.conv(x), self.tower(x)], 1)


class StandinInception(nn.Module):
    """Random-weight network with the interface of clean-fid's Inception TorchScript."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            OrderedDict(
                conv=_ConvReLU(3, 8, 3, stride=2),  # 149
                conv_1=_ConvReLU(8, 16, 3, stride=2),  # 74
                pool0=nn.MaxPool2d(3, stride=2),  # 36
                mixed_5=_ConvReLU(16, 32, 3, stride=2),  # 17
                mixed_6=_Mixed(32, 16),  # 17, 32 channels
                mixed_7=_ConvReLU(32, 2048, 1),
                pool2=nn.AdaptiveAvgPool2d(1),
            )
        )
        self.output = nn.Linear(2048, 1008)

    def forward(self, img: Tensor, return_features: bool = False) -> Tensor:
        x = F.interpolate(
            img.to(torch.float32), size=(299, 299), mode="bilinear", align_corners=False
        )
        x = (x - 128.0) / 128.0
        features = self.layers(x).reshape(-1, 2048)
        if return_features:
            return features
        return F.softmax(self.output(features), dim=1)


def make_standin_inception(path: str | Path, seed: int = 0) -> Path:
    """Write a scripted ``StandinInception`` with weights drawn from ``seed`` to ``path``.

    ``path`` may be a folder (the file is then named ``inception-2015-12-05.pt``, so clean-fid's
    own ``InceptionV3W`` can load it from that folder).
    """
    from searchd.evaluation.features import INCEPTION_FILE

    path = Path(path)
    if path.is_dir():
        path = path / INCEPTION_FILE
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        net = StandinInception().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.script(net).save(str(path))
    return path
