"""The embedded feature network: a small CNN trained on scikit-learn's 8x8 digits.

Its penultimate layer (``FEATURE_DIM`` values, after a SiLU, so no unit is dead and the
covariance stays full rank) gives the features for FID and KID on the embedded zoo, and its
10 class logits give an Inception Score. Weights and metadata ship in ``data/``; they are
produced by ``scripts/train_digits_features.py`` (fixed seed, CPU).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

DATA_DIR = Path(__file__).resolve().parent / "data"
WEIGHTS = DATA_DIR / "digits-cnn.pt"
METADATA = DATA_DIR / "digits-cnn.json"
FEATURE_DIM = 128
N_CLASSES = 10


def digits_images() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits as float32 images [1797, 1, 8, 8] in [-1, 1] and labels [1797].

    Pixels 0..16 are scaled by ``x / 8 - 1``, the scaling of the embedded zoo's data.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data.astype(np.float64) / 16.0 * 2.0 - 1.0).astype(np.float32)
    return x.reshape(-1, 1, 8, 8), d.target.astype(np.int64)


class ChannelsLastMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` computed on a channels-last copy of its input [B, C, H, W]; returns
    a contiguous (NCHW) tensor [B, C, H / k, W / k].

    The same values bit for bit (a maximum is exact whatever the memory layout), so the
    next layer sees the very same input; but torch's CPU kernel for small NCHW images is
    slow: on the digits network's [256, 64, 8, 8] activations the channels-last kernel plus
    both copies is about 20x faster, a third of the whole network's time
    (benchmarks/results/end_to_end.md). The module has no parameters: the state dict is
    that of ``nn.MaxPool2d``.
    """

    def forward(self, x: Tensor) -> Tensor:
        if x.ndim != 4:
            return super().forward(x)
        return super().forward(x.contiguous(memory_format=torch.channels_last)).contiguous()


class DigitsCNN(nn.Module):
    """Conv(32) -> Conv(64) -> pool -> Conv(128) -> pool -> Linear(FEATURE_DIM) -> Linear(10).

    Input: images [B, 1, 8, 8] in [-1, 1] (values outside pass through unclamped).
    ``forward`` returns (features [B, FEATURE_DIM], logits [B, 10]).
    """

    def __init__(self, feature_dim: int = FEATURE_DIM) -> None:
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.ReLU(),
            ChannelsLastMaxPool2d(2),  # 4x4
            nn.Conv2d(64, 128, 3, padding=1),
            nn.ReLU(),
            ChannelsLastMaxPool2d(2),  # 2x2
        )
        self.embed = nn.Linear(128 * 2 * 2, feature_dim)
        self.act = nn.SiLU()
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(feature_dim, N_CLASSES)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = self.conv(x).flatten(1)
        feats = self.act(self.embed(h))
        return feats, self.head(self.dropout(feats))


def load_digits_cnn(
    weights: str | Path = WEIGHTS, device: str | torch.device = "cpu"
) -> tuple[DigitsCNN, dict[str, Any]]:
    """The shipped network (eval mode, on ``device``) and its metadata dict.

    Raises:
        FileNotFoundError: the weights are missing (say how to make them).
    """
    weights = Path(weights)
    if not weights.is_file():
        raise FileNotFoundError(
            f"digits feature weights not found at {weights}; "
            "run `python scripts/train_digits_features.py` to create them"
        )
    meta_path = weights.with_suffix(".json")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    net = DigitsCNN(int(meta.get("feature_dim", FEATURE_DIM)))
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return net.to(device).eval(), meta
