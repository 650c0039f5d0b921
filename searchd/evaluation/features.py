"""Feature networks behind one interface, and the factory that loads them by name.

Every network takes images [B, C, H, W] as float in [-1, 1] (values outside are allowed; each
network applies its own preprocessing) and returns features [B, d]. Some also expose class
logits (Inception Score) and spatial features (sFID):

==========  =======  ======  =======  =====================================================
name        dim      logits  spatial  preprocessing
==========  =======  ======  =======  =====================================================
inception   2048     1008    2023     clean-fid: uint8 levels, RGB, resize to 299 (mode)
digits      128      10      --       none (raw samples, unclamped)
pixels      C*H*W    --      --       none (flattened)
==========  =======  ======  =======  =====================================================
"""

from __future__ import annotations

import math
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from searchd.evaluation.digits import WEIGHTS as DIGITS_WEIGHTS
from searchd.evaluation.digits import load_digits_cnn
from searchd.evaluation.resize import pil_bicubic_resize, to_rgb, to_uint8_levels

OUTPUTS = ("features", "logits", "spatial")


class FeatureNetwork(ABC):
    """A feature extractor for FID-like metrics.

    Attributes:
        name: registry name ("inception", "digits", "pixels").
        dim: feature dimension d.
        mode: preprocessing variant (Inception: "clean" or "legacy_tensorflow"), else None.
        outputs: which of "features", "logits", "spatial" ``extract`` can return.
        n_classes: number of logits (None without logits).
        spatial_dim: dimension of the spatial features (None without them).
        device: where the network runs.
        batch_size: images per forward pass inside ``extract``.
    """

    name: str
    dim: int
    mode: str | None = None
    outputs: frozenset[str] = frozenset({"features"})
    n_classes: int | None = None
    spatial_dim: int | None = None
    device: torch.device = torch.device("cpu")
    batch_size: int = 1024

    @abstractmethod
    def _forward(self, images: Tensor, outputs: frozenset[str]) -> dict[str, Tensor]:
        """One forward pass over images [b, C, H, W] on ``device``."""

    def extract(self, images: Tensor, outputs: Iterable[str] = ("features",)) -> dict[str, Tensor]:
        """Several outputs of one pass: {"features": [B, d], "logits": [B, n_classes],
        "spatial": [B, spatial_dim]} for the requested names (float32, on ``device``)."""
        want = frozenset(outputs)
        missing = want - self.outputs
        if missing:
            raise ValueError(
                f"feature network {self.name!r} has no {sorted(missing)} output; "
                f"it provides {sorted(self.outputs)}"
            )
        if images.ndim != 4:
            raise ValueError(f"images must be [B, C, H, W]; got shape {tuple(images.shape)}")
        parts: dict[str, list[Tensor]] = {k: [] for k in want}
        with torch.inference_mode():
            for start in range(0, images.shape[0], self.batch_size):
                chunk = images[start : start + self.batch_size].to(self.device)
                out = self._forward(chunk, want)
                for k in want:
                    parts[k].append(out[k].to(torch.float32))
        if images.shape[0] == 0:
            empty = {"features": self.dim, "logits": self.n_classes, "spatial": self.spatial_dim}
            return {k: torch.zeros(0, empty[k] or 0, device=self.device) for k in want}
        return {k: torch.cat(v) for k, v in parts.items()}

    def __call__(self, images: Tensor) -> Tensor:
        """Features [B, d] of images [B, C, H, W] in [-1, 1]."""
        return self.extract(images, ("features",))["features"]

    def logits(self, images: Tensor) -> Tensor:
        """Class logits [B, n_classes] (networks with a classifier head only)."""
        return self.extract(images, ("logits",))["logits"]

    def spatial(self, images: Tensor) -> Tensor:
        """Spatial features [B, spatial_dim] (networks that expose them only)."""
        return self.extract(images, ("spatial",))["spatial"]

    @property
    def info(self) -> dict[str, Any]:
        """What identifies the feature space (recorded in reference statistics)."""
        return {"features": self.name, "mode": self.mode, "dim": self.dim}

    def __repr__(self) -> str:
        mode = f", mode={self.mode}" if self.mode else ""
        return f"{type(self).__name__}(dim={self.dim}{mode}, outputs={sorted(self.outputs)})"


# Pixels ------------------------------------------------------------------------------------------
class PixelFeatures(FeatureNetwork):
    """The identity: each image flattened to a vector of C*H*W values.

    Args:
        shape: shape of one image (C, H, W); fixes ``dim``.
    """

    name = "pixels"

    def __init__(
        self,
        shape: tuple[int, ...] = (1, 8, 8),
        device: str | torch.device = "cpu",
        batch_size: int = 65536,
    ) -> None:
        self.shape = tuple(int(s) for s in shape)
        self.dim = math.prod(self.shape)
        self.device = torch.device(device)
        self.batch_size = batch_size

    def _forward(self, images: Tensor, outputs: frozenset[str]) -> dict[str, Tensor]:
        if tuple(images.shape[1:]) != self.shape:
            raise ValueError(
                f"pixels features were set up for images {self.shape}; "
                f"got {tuple(images.shape[1:])}"
            )
        return {"features": images.reshape(images.shape[0], -1)}


# Digits ------------------------------------------------------------------------------------------
class DigitsFeatures(FeatureNetwork):
    """The embedded CNN of ``searchd.evaluation.digits`` (8x8 grey images).

    Args:
        weights: state-dict file (default: the shipped ``data/digits-cnn.pt``).
    """

    name = "digits"
    outputs = frozenset({"features", "logits"})

    def __init__(
        self,
        weights: str | Path = DIGITS_WEIGHTS,
        device: str | torch.device = "cpu",
        batch_size: int = 4096,
    ) -> None:
        self.device = torch.device(device)
        self.net, self.meta = load_digits_cnn(weights, self.device)
        self.dim = self.net.embed.out_features
        self.n_classes = self.net.head.out_features
        self.batch_size = batch_size

    def _forward(self, images: Tensor, outputs: frozenset[str]) -> dict[str, Tensor]:
        if tuple(images.shape[1:]) != (1, 8, 8):
            raise ValueError(f"digits features take images [B, 1, 8, 8]; got {tuple(images.shape)}")
        feats, logits = self.net(images.to(torch.float32))
        return {"features": feats, "logits": logits}


# Inception ---------------------------------------------------------------------------------------
INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = (
    "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/" + INCEPTION_FILE
)
# clean-fid keeps the file in /tmp (the current directory on Windows).
CLEANFID_CACHE = Path("." if os.name == "nt" else "/tmp") / INCEPTION_FILE
INCEPTION_MODES = ("clean", "legacy_tensorflow")
INCEPTION_SIZE = 299
# sFID (Nash et al.): the first 7 channels of mixed_6/conv, 17 x 17 each.
SPATIAL_CHANNELS = 7


def inception_path(path: str | Path | None = None) -> Path:
    """Where the Inception TorchScript is looked for: ``path`` (a file, or a folder holding
    ``inception-2015-12-05.pt``), else clean-fid's cache location."""
    if path is None:
        return CLEANFID_CACHE
    p = Path(path).expanduser()
    return p / INCEPTION_FILE if p.is_dir() else p


def missing_inception_message(where: Path) -> str:
    """The one-line error for a missing Inception file: where to put what, fetched from where."""
    return (
        f"Inception weights not found: put {INCEPTION_FILE} at {where} (clean-fid's cache) "
        f"or pass path=<file>; fetch it on a machine with internet from {INCEPTION_URL}"
    )


class InceptionFeatures(FeatureNetwork):
    """clean-fid's Inception-v3 (the TorchScript file of StyleGAN2-ADA), batched on the device.

    Args:
        mode: "clean" (uint8 levels, PIL-bicubic resize to 299, as clean-fid's default) or
            "legacy_tensorflow" (uint8 levels fed at their own size to the network, which
            resizes inside, as TF-FID, EDM and clean-fid's legacy mode do).
        path: the TorchScript file or its folder (default: clean-fid's cache, ``/tmp``).
        download: fetch the file to ``path`` with clean-fid's downloader when missing.

    Raises:
        FileNotFoundError: the file is missing (one line: where to put it, and its URL).
        ValueError: unknown mode, or the file is not clean-fid's Inception TorchScript.
    """

    name = "inception"
    dim = 2048

    def __init__(
        self,
        mode: str = "clean",
        path: str | Path | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
        download: bool = False,
    ) -> None:
        if mode not in INCEPTION_MODES:
            raise ValueError(
                f"unknown inception mode {mode!r}; modes: {', '.join(INCEPTION_MODES)}"
            )
        self.mode = mode
        self.device = torch.device(device)
        self.batch_size = batch_size
        file = inception_path(path)
        if not file.is_file() and download:
            from cleanfid.downloads_helper import check_download_inception

            try:
                check_download_inception(fpath=str(file.parent))
            except OSError:
                pass
        if not file.is_file():
            raise FileNotFoundError(missing_inception_message(file))
        self.path = file
        try:
            with warnings.catch_warnings():
                # torch.jit is deprecated in favour of torch.export; the file is TorchScript.
                warnings.simplefilter("ignore", FutureWarning)
                self.base = torch.jit.load(str(file), map_location=self.device).eval()
        except RuntimeError as e:
            raise ValueError(f"{file} is not a TorchScript file: {str(e).splitlines()[0]}") from e
        if not hasattr(self.base, "layers"):
            raise ValueError(f"{file} is not clean-fid's Inception TorchScript (no `layers`)")
        outputs = {"features"}
        output_layer = getattr(self.base, "output", None)
        if output_layer is not None and hasattr(output_layer, "weight"):
            # Logits as StyleGAN2-ADA's Inception Score takes them: the output layer
            # without its bias (1008 classes, as in the TF graph).
            self._logit_weight = output_layer.weight.detach().to(self.device, torch.float32)
            self.n_classes = int(self._logit_weight.shape[0])
            outputs.add("logits")
        self._children = dict(self.base.layers.named_children())
        mixed6 = self._children.get("mixed_6")
        if mode == "clean" and "mixed_5" in self._children and hasattr(mixed6, "conv"):
            outputs.add("spatial")
        self.outputs = frozenset(outputs)
        self._spatial_checked = False

    def preprocess(self, images: Tensor) -> Tensor:
        """Images in [-1, 1] [B, C, H, W] -> the network's input (float32).

        clean: levels 0..255 resized to 299 x 299 by the PIL-bicubic emulation;
        legacy_tensorflow: levels 0..255 at their own size.
        """
        x = to_rgb(to_uint8_levels(images))
        if self.mode == "clean" and tuple(x.shape[2:]) != (INCEPTION_SIZE, INCEPTION_SIZE):
            x = pil_bicubic_resize(x, (INCEPTION_SIZE, INCEPTION_SIZE))
        return x.contiguous()

    def _layers_in_steps(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Run ``layers`` child by child, also taking mixed_6/conv's output: (pool, spatial)."""
        spatial = None
        for name, child in self._children.items():
            if name == "mixed_6":
                s = child.conv(x)
                spatial = s[:, :SPATIAL_CHANNELS].reshape(x.shape[0], -1)
            x = child(x)
        assert spatial is not None
        return x, spatial

    def _check_spatial(self) -> None:
        """Once: running the children one by one must give the features ``layers`` gives."""
        if self._spatial_checked:
            return
        g = torch.Generator().manual_seed(0)
        x = (torch.rand(2, 3, INCEPTION_SIZE, INCEPTION_SIZE, generator=g) * 2 - 1).to(self.device)
        whole = self.base.layers(x).reshape(2, -1)
        steps, spatial = self._layers_in_steps(x)
        if not torch.allclose(whole, steps.reshape(2, -1), rtol=1e-4, atol=1e-5):
            raise ValueError(
                f"{self.path}: the children of `layers` do not compose to `layers`; "
                "spatial features are unavailable for this file"
            )
        self.spatial_dim = int(spatial.shape[1])
        self._spatial_checked = True

    def _forward(self, images: Tensor, outputs: frozenset[str]) -> dict[str, Tensor]:
        x = self.preprocess(images)
        b = x.shape[0]
        out: dict[str, Tensor] = {}
        if self.mode == "legacy_tensorflow":
            feats = self.base(x, return_features=True).reshape(b, self.dim)
        elif "spatial" in outputs:
            self._check_spatial()
            pooled, out["spatial"] = self._layers_in_steps((x - 128.0) / 128.0)
            feats = pooled.reshape(b, self.dim)
        else:
            feats = self.base.layers((x - 128.0) / 128.0).reshape(b, self.dim)
        out["features"] = feats
        if "logits" in outputs:
            out["logits"] = feats.to(torch.float32) @ self._logit_weight.T
        return out

    @property
    def info(self) -> dict[str, Any]:
        return {"features": self.name, "mode": self.mode, "dim": self.dim, "file": self.path.name}


# Registry ----------------------------------------------------------------------------------------
FEATURES: dict[str, Callable[..., FeatureNetwork]] = {
    "inception": InceptionFeatures,
    "digits": DigitsFeatures,
    "pixels": PixelFeatures,
}


def load_features(name: str, **opts: Any) -> FeatureNetwork:
    """The feature network ``name`` built with ``opts`` (device, batch_size, and per network:
    inception: mode, path, download; digits: weights; pixels: shape).

    Raises:
        ValueError: unknown name (listing the known ones) or bad options.
    """
    if name not in FEATURES:
        raise ValueError(f"unknown feature network {name!r}; known: {', '.join(sorted(FEATURES))}")
    try:
        return FEATURES[name](**opts)
    except TypeError as e:
        raise ValueError(f"bad options for feature network {name!r}: {e}") from None
