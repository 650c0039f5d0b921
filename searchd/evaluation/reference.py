"""Reference statistics: ``.npz`` files with ``mu``, ``sigma`` and ``n``, plus metadata.

A file written here holds:

* ``mu`` [d], ``sigma`` [d, d] (float64, unbiased covariance) and ``n``;
* ``meta``: a JSON string with the feature network, its mode and dimension, the image
  resolution, the source, the split, the count and a SHA-256 of the images fed (float32
  bytes in order), and the time;
* optionally ``features`` [k, d] (float32, the first k per-sample features, for KID) and
  ``spatial_mu`` / ``spatial_sigma`` (sFID).

clean-fid's files (``{name}_{mode}_{split}_{res}.npz``) and EDM's (``cifar10-32x32.npz``)
hold only ``mu`` and ``sigma``; they are read as Inception statistics, with the mode taken
from clean-fid's file name, and EDM's taken as ``legacy_tensorflow`` (EDM feeds uint8
images at their own size to the same TorchScript network, which resizes inside). A file
whose feature network, mode or dimension does not match the run is refused with a
``ValueError`` (``ReferenceStats.check``).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from searchd.evaluation.features import FeatureNetwork
from searchd.evaluation.frechet import FrechetReference
from searchd.evaluation.stats import DEFAULT_CHUNK, FeatureStats

_CLEANFID_NAME = re.compile(r"_(clean|legacy_tensorflow|legacy_pytorch)(_[a-z0-9_]+)?_")
_EDM_NAME = re.compile(r"-(\d+)x(\d+)\.npz$")
_INCEPTION_DIM = 2048


def _slug(part: Any) -> str:
    """A name part: lower case, runs of anything but [a-z0-9.] turned into one '-'."""
    return re.sub(r"[^a-z0-9.]+", "-", str(part).lower()).strip("-") or "na"


def reference_name(
    *,
    source: str,
    features: str,
    mode: str | None = None,
    split: str = "all",
    resolution: str | int | tuple[int, ...] = "na",
    count: int,
) -> str:
    """The file name of reference statistics, encoding everything that shaped them.

    ``{source}_{features}[-{mode}]_{split}_{resolution}_n{count}.npz`` with every part
    slugged (lower case, [a-z0-9.-]), so '_' only separates parts; e.g.
    ``gmm-digits-k64-exact_digits_all_8x8_n10000.npz``. Resolution may be "HxW", an int
    (square) or a shape (C, H, W).
    """
    if isinstance(resolution, tuple | list):
        resolution = "x".join(str(int(r)) for r in resolution[-2:])
    elif isinstance(resolution, int):
        resolution = f"{resolution}x{resolution}"
    net = _slug(features) + (f"-{_slug(mode)}" if mode else "")
    return f"{_slug(source)}_{net}_{_slug(split)}_{_slug(resolution)}_n{int(count)}.npz"


@dataclass
class ReferenceStats:
    """Reference statistics of one feature space.

    Attributes:
        mu: mean [d] (float64).
        sigma: covariance [d, d] (float64).
        n: number of samples (None if the file does not say, as clean-fid's and EDM's).
        meta: features, mode, dim, resolution, source, split, count, checksum, ...
        features: per-sample features [k, d] for KID, or None.
        spatial_mu, spatial_sigma: statistics of spatial features (sFID), or None.
        path: the file it was read from, if any.
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    features: np.ndarray | None = None
    spatial_mu: np.ndarray | None = None
    spatial_sigma: np.ndarray | None = None
    path: Path | None = None

    def __post_init__(self) -> None:
        self.mu = np.asarray(self.mu, dtype=np.float64).reshape(-1)
        self.sigma = np.asarray(self.sigma, dtype=np.float64)
        if self.sigma.shape != (self.dim, self.dim):
            raise ValueError(f"reference sigma {self.sigma.shape} does not match mu [{self.dim}]")
        if self.features is not None and self.features.shape[1:] != (self.dim,):
            raise ValueError(f"reference features {self.features.shape} are not [k, {self.dim}]")

    @property
    def dim(self) -> int:
        return int(self.mu.size)

    @property
    def feature_name(self) -> str | None:
        return self.meta.get("features")

    @property
    def mode(self) -> str | None:
        return self.meta.get("mode")

    # Building ------------------------------------------------------------------------------
    @classmethod
    def from_stats(
        cls,
        stats: FeatureStats,
        meta: Mapping[str, Any] | None = None,
        *,
        features: np.ndarray | Tensor | None = None,
        spatial: FeatureStats | None = None,
    ) -> ReferenceStats:
        """Reference statistics from accumulated ``FeatureStats`` (and optional extras)."""
        meta = dict(meta or {})
        meta.setdefault("count", stats.n)
        meta.setdefault("dim", stats.dim)
        feats = None
        if features is not None:
            feats = torch.as_tensor(features).detach().cpu().numpy().astype(np.float32)
        return cls(
            stats.mean,
            stats.cov,
            stats.n,
            meta,
            feats,
            None if spatial is None else spatial.mean,
            None if spatial is None else spatial.cov,
        )

    @classmethod
    def from_feature_stats(
        cls,
        stats: FeatureStats,
        *,
        features: str,
        source: str,
        mode: str | None = None,
        **meta: Any,
    ) -> ReferenceStats:
        """Shorthand of ``from_stats`` naming the feature network, source and mode."""
        info = {"features": features, "source": source, "mode": mode or None, **meta}
        return cls.from_stats(stats, info)

    def frechet(self, device: str | torch.device = "cpu") -> FrechetReference:
        """The fast-path Frechet reference (its factor computed once)."""
        return FrechetReference(self.mu, self.sigma, device=device)

    # Files ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write the ``.npz`` atomically (temporary name, then rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **self._arrays())
        os.replace(tmp, path)
        self.path = path
        return path

    def _arrays(self) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {
            "mu": self.mu,
            "sigma": self.sigma,
            "n": np.asarray(-1 if self.n is None else self.n, dtype=np.int64),
            "meta": np.asarray(json.dumps(self.meta, sort_keys=True)),
        }
        if self.features is not None:
            arrays["features"] = np.asarray(self.features, dtype=np.float32)
        if self.spatial_mu is not None and self.spatial_sigma is not None:
            arrays["spatial_mu"] = self.spatial_mu
            arrays["spatial_sigma"] = self.spatial_sigma
        return arrays

    def to_dict(self) -> dict[str, Any]:
        """Plain data (numpy arrays kept as arrays: cheap through Ray's object store)."""
        return {
            "mu": self.mu,
            "sigma": self.sigma,
            "n": self.n,
            "meta": dict(self.meta),
            "features": self.features,
            "spatial_mu": self.spatial_mu,
            "spatial_sigma": self.spatial_sigma,
            "path": None if self.path is None else str(self.path),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ReferenceStats:
        """Inverse of ``to_dict``."""
        return cls(
            np.asarray(d["mu"]),
            np.asarray(d["sigma"]),
            d.get("n"),
            dict(d.get("meta") or {}),
            None if d.get("features") is None else np.asarray(d["features"]),
            None if d.get("spatial_mu") is None else np.asarray(d["spatial_mu"]),
            None if d.get("spatial_sigma") is None else np.asarray(d["spatial_sigma"]),
            None if d.get("path") is None else Path(d["path"]),
        )

    def to_bytes(self) -> bytes:
        """The ``.npz`` file's content (for storage backends that write bytes)."""
        buf = io.BytesIO()
        np.savez(buf, **self._arrays())
        return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes, name: str = "reference.npz") -> ReferenceStats:
        """Inverse of ``to_bytes`` (``name`` is used to infer metadata of foreign files)."""
        return cls._from_npz(io.BytesIO(data), Path(name), path=None)

    @classmethod
    def load(cls, path: str | Path) -> ReferenceStats:
        """Read a file written here, by clean-fid, or by EDM (``mu`` and ``sigma``).

        Raises:
            FileNotFoundError: no such file.
            ValueError: the file lacks ``mu``/``sigma`` or they are inconsistent.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"reference statistics {path} do not exist")
        return cls._from_npz(path, path, path=path)

    @classmethod
    def _from_npz(cls, source: Any, name: Path, path: Path | None) -> ReferenceStats:
        with np.load(source, allow_pickle=False) as z:
            keys = set(z.files)
            if not {"mu", "sigma"} <= keys:
                raise ValueError(
                    f"{name} is not a reference-statistics file: it needs arrays 'mu' and "
                    f"'sigma'; it has {sorted(keys)}"
                )
            mu, sigma = z["mu"], z["sigma"]
            n = int(z["n"]) if "n" in keys else None
            meta = json.loads(str(z["meta"])) if "meta" in keys else infer_meta(name, mu.size)
            feats = z["features"] if "features" in keys else None
            smu = z["spatial_mu"] if "spatial_mu" in keys else None
            ssig = z["spatial_sigma"] if "spatial_sigma" in keys else None
        if n is not None and n < 0:
            n = None
        return cls(mu, sigma, n, meta, feats, smu, ssig, path)

    # Checks --------------------------------------------------------------------------------
    def check(
        self,
        network: FeatureNetwork | Mapping[str, Any] | None = None,
        *,
        features: str | None = None,
        mode: str | None = None,
        dim: int | None = None,
    ) -> None:
        """Refuse (``ValueError``) statistics made in another feature space than the run's.

        The run's space is a ``FeatureNetwork`` (or its ``info`` dict), or given by name
        (``features=``, optionally ``mode=`` and ``dim=``). Compared: the dimension when
        known; the feature network name and mode when the file records or implies them.
        """
        if network is not None:
            info = network.info if isinstance(network, FeatureNetwork) else dict(network)
        else:
            if features is None:
                raise ValueError("check() needs a feature network or features=<name>")
            info = {"features": features, "mode": mode, "dim": dim}
        where = f"reference {self.path}" if self.path else "reference statistics"
        if info.get("dim") is not None and int(info["dim"]) != self.dim:
            raise ValueError(
                f"{where} have dimension {self.dim} ({self.feature_name or 'unknown network'}); "
                f"the run's feature network {info['features']!r} gives {info['dim']}"
            )
        name = self.feature_name
        if name is not None and name != info["features"]:
            raise ValueError(
                f"{where} were made with feature network {name!r}; the run uses "
                f"{info['features']!r}"
            )
        mode = self.mode
        if mode is not None and info.get("mode") is not None and mode != info["mode"]:
            raise ValueError(
                f"{where} were made with {name} mode {mode!r}; the run uses mode {info['mode']!r}"
            )


def infer_meta(path: Path, dim: int) -> dict[str, Any]:
    """Metadata of a file without any (clean-fid's or EDM's), from its name and dimension."""
    meta: dict[str, Any] = {"dim": int(dim), "source": path.name, "inferred": True}
    if dim != _INCEPTION_DIM:
        return meta
    meta["features"] = "inception"
    m = _CLEANFID_NAME.search(path.name.lower())
    if m:
        meta["mode"] = m.group(1)
        meta["origin"] = "clean-fid"
    elif _EDM_NAME.search(path.name):
        meta["mode"] = "legacy_tensorflow"
        meta["origin"] = "edm"
    return meta


def compute_reference(
    batches: Iterable[Tensor],
    network: FeatureNetwork,
    meta: Mapping[str, Any] | None = None,
    *,
    keep_features: int = 0,
    spatial: bool = False,
    progress: Any = None,
) -> ReferenceStats:
    """Reference statistics of image batches [b, C, H, W] in [-1, 1], in order.

    Args:
        batches: the images, in a fixed order (the checksum depends on it).
        network: the feature network.
        meta: metadata to record (source, split, ...); features, mode, dim, resolution,
            count and checksum are filled in.
        keep_features: store the first this many per-sample features (for KID).
        spatial: also accumulate spatial-feature statistics (sFID).
        progress: optional object with ``update(n)`` (a tqdm bar).

    Accumulation runs in fixed blocks of ``DEFAULT_CHUNK`` samples, so the result does not
    depend on how the images are batched.
    """
    outputs = ("features", "spatial") if spatial else ("features",)
    pairs = ((images, network.extract(images, outputs)) for images in batches)
    return reference_from_outputs(pairs, network.dim, network.info, meta,
                                  keep_features=keep_features, spatial=spatial,
                                  progress=progress)


def reference_from_outputs(
    pairs: Iterable[tuple[Tensor, Mapping[str, Tensor]]],
    dim: int,
    network_info: Mapping[str, Any],
    meta: Mapping[str, Any] | None = None,
    *,
    keep_features: int = 0,
    spatial: bool = False,
    progress: Any = None,
) -> ReferenceStats:
    """``compute_reference`` from the feature network's outputs already computed: pairs of
    (images [b, C, H, W], ``network.extract(images, outputs)``), in order; ``dim`` and
    ``network_info`` are the network's. The images feed the checksum, the outputs the
    statistics, accumulated exactly as ``compute_reference`` does (so the images and their
    features may come from several workers, joined in seed order)."""
    outputs = ("features", "spatial") if spatial else ("features",)
    stats = FeatureStats.zeros(dim)
    sstats: FeatureStats | None = None
    kept: list[Tensor] = []
    n_kept = 0
    digest = hashlib.sha256()
    resolution: tuple[int, ...] | None = None
    pending: dict[str, list[Tensor]] = {k: [] for k in outputs}
    pending_n = 0

    def flush(final: bool) -> None:
        nonlocal pending_n, sstats
        while pending_n >= DEFAULT_CHUNK or (final and pending_n > 0):
            cat = {k: torch.cat(v) for k, v in pending.items()}
            take = min(DEFAULT_CHUNK, pending_n)
            stats.add(cat["features"][:take])
            if spatial:
                if sstats is None:
                    sstats = FeatureStats.zeros(cat["spatial"].shape[1])
                sstats.add(cat["spatial"][:take])
            for k in outputs:
                pending[k] = [cat[k][take:]]
            pending_n -= take

    for images, out in pairs:
        if images.shape[0] == 0:
            continue
        resolution = tuple(int(s) for s in images.shape[1:])
        digest.update(images.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        if not torch.isfinite(out["features"]).all():
            raise ValueError("non-finite features in the reference images")
        if n_kept < keep_features:
            take = out["features"][: keep_features - n_kept].cpu()
            kept.append(take)
            n_kept += take.shape[0]
        for k in outputs:
            pending[k].append(out[k].cpu())
        pending_n += images.shape[0]
        flush(final=False)
        if progress is not None:
            progress.update(images.shape[0])
    flush(final=True)
    if stats.n < 2:
        raise ValueError(f"reference statistics need at least 2 images; got {stats.n}")
    full = dict(meta or {})
    full.update(network_info)
    full.update(
        {
            "count": stats.n,
            "resolution": list(resolution or ()),
            "checksum": "sha256:" + digest.hexdigest(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
    )
    feats = torch.cat(kept).numpy() if kept else None
    return ReferenceStats.from_stats(stats, full, features=feats, spatial=sstats)


# Samples per batch of an exact reference: the batches are what the pool splits among its
# evaluators (``exact_reference_part``), so that the split computes the very same batches.
EXACT_BATCH = 1000


def exact_reference(
    denoiser: Any,
    network: FeatureNetwork,
    seeds: Iterable[int],
    *,
    batch_size: int = EXACT_BATCH,
    keep_features: int = 0,
    spatial: bool = False,
    meta: Mapping[str, Any] | None = None,
    progress: Any = None,
) -> ReferenceStats:
    """Reference statistics of exact data samples of an embedded model (``sample_data``).

    Sample i is drawn from seed ``seeds[i]``; use seeds disjoint from the noise seeds.
    """
    sample = getattr(denoiser, "sample_data", None)
    if sample is None:
        raise ValueError(f"{denoiser!r} has no exact samples (no sample_data)")
    seeds = [int(s) for s in seeds]
    batches = (sample(seeds[i : i + batch_size]) for i in range(0, len(seeds), batch_size))
    info = {
        "source": f"{getattr(denoiser, 'name', 'model')}-exact",
        "split": "all",
        "seed_base": seeds[0] if seeds else None,
    }
    info.update(meta or {})
    return compute_reference(
        batches, network, info, keep_features=keep_features, spatial=spatial, progress=progress
    )


def exact_reference_part(
    denoiser: Any, network: FeatureNetwork, seeds: Iterable[int], *,
    batch_size: int = EXACT_BATCH,
) -> dict[str, Any]:
    """One worker's share of ``exact_reference``: the exact samples of ``seeds`` and their
    features, as plain data for ``exact_reference_join`` (``images`` float32 [m, C, H, W],
    ``features`` [m, d], the network's ``dim`` and ``info``, the ``source`` label).

    Parts of contiguous seed ranges that start on a batch boundary of the whole (a multiple
    of ``batch_size`` after the first seed: ``split_batches``), joined in seed order, are
    bit for bit what one worker computes whole: the same batches go through the same
    networks (a network's output may depend on the batch's size, e.g. the digits CNN's
    for batches under 4), and the statistics are accumulated in fixed blocks."""
    sample = getattr(denoiser, "sample_data", None)
    if sample is None:
        raise ValueError(f"{denoiser!r} has no exact samples (no sample_data)")
    seeds = [int(s) for s in seeds]
    images, feats = [], []
    for i in range(0, len(seeds), batch_size):
        x = sample(seeds[i : i + batch_size])
        images.append(x.detach().to("cpu", torch.float32))
        feats.append(network.extract(x, ("features",))["features"].cpu())
    shape = tuple(int(s) for s in getattr(denoiser, "shape", ()))
    return {
        "images": torch.cat(images).numpy() if images else np.zeros((0, *shape), np.float32),
        "features": torch.cat(feats).numpy() if feats else np.zeros((0, network.dim)),
        "dim": int(network.dim),
        "info": dict(network.info),
        "source": f"{getattr(denoiser, 'name', 'model')}-exact",
    }


def exact_reference_join(parts: Sequence[Mapping[str, Any]], seed_base: int) -> ReferenceStats:
    """``exact_reference`` from the ``exact_reference_part`` of contiguous seed ranges, in
    seed order (the first range starting at ``seed_base``)."""
    if not parts:
        raise ValueError("no parts to join")
    # Parts that crossed Ray's object store are read-only arrays: copied (a few MiB).
    pairs = ((torch.from_numpy(np.array(p["images"])),
              {"features": torch.from_numpy(np.array(p["features"]))}) for p in parts)
    info = {"source": parts[0]["source"], "split": "all", "seed_base": int(seed_base)}
    return reference_from_outputs(pairs, int(parts[0]["dim"]), parts[0]["info"], info)


def split_batches(n: int, seed_base: int, parts: int, batch_size: int = EXACT_BATCH
                  ) -> list[tuple[int, int]]:
    """Contiguous seed ranges ``[lo, hi)`` covering ``seed_base + [0, n)`` for at most
    ``parts`` workers, each a run of whole batches of ``exact_reference`` (balanced to one
    batch)."""
    batches = -(-n // batch_size)
    k = max(1, min(parts, batches))
    cuts = [min(n, batch_size * ((batches * i) // k)) for i in range(k + 1)]
    return [(seed_base + a, seed_base + b) for a, b in zip(cuts[:-1], cuts[1:])]
