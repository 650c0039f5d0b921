"""A cache of exact reference statistics (``metric.reference: exact:<n>``) across runs.

The exact reference of an embedded model is the same file every time the same inputs are
used: the model's parameters, the feature network's weights, the code that samples and
accumulates, the sample count and seeds, torch and numpy. Computing it takes a few seconds
of one evaluator (10,000 samples for the quickstart) before the search can start, so the
first run stores it under the user's cache directory and later runs with the same inputs
read it back instead, bit for bit the file the run would have computed.

The key (``cache_key``) is a SHA-256 over everything the statistics depend on:

- the configuration's ``model`` section (name or zoo members, dtype, device) and
  ``workers`` placement (CPUs and GPUs per evaluator: torch's thread count), the feature
  network's name, the sample count and the first seed;
- the bytes of every file of the embedded models' and the feature network's data
  directories (``searchd/models/data``, ``searchd/evaluation/data``);
- the source of ``searchd/models`` and ``searchd/evaluation`` (any change of the code that
  samples, extracts or accumulates misses the cache);
- the versions of searchd's Python, torch and numpy.

Only what can be keyed this way is cached: an embedded model (a zoo name, or zoo members)
on the CPU, with the ``digits`` or ``pixels`` features. A checkpoint path, a GPU or an
``auto`` device, or Inception features are always computed.

The cache lives in ``$SEARCHD_CACHE_DIR/reference`` (``SEARCHD_CACHE_DIR=off``: no cache),
else ``$XDG_CACHE_HOME/searchd/reference``, else ``~/.cache/searchd/reference``; never in a
run directory. Files are written atomically (a temporary file renamed); a file that does not
read back is ignored and overwritten. A cache that cannot be read or written never fails a
run: it is computed as without a cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import tempfile
from functools import lru_cache
from pathlib import Path
from typing import Any

logger = logging.getLogger("searchd")

CACHE_ENV = "SEARCHD_CACHE_DIR"
_PACKAGE = Path(__file__).resolve().parents[1]  # searchd/
# What the statistics depend on, besides the configuration: data files and source.
_DATA_DIRS = ("models/data", "evaluation/data")
_SOURCE_DIRS = ("models", "evaluation")
_CACHEABLE_FEATURES = ("digits", "pixels")
# Bumped when the file layout or the key's meaning changes.
_FORMAT = 1


def cache_dir() -> Path | None:
    """Where cached references go (None: caching is off, ``SEARCHD_CACHE_DIR=off``)."""
    root = os.environ.get(CACHE_ENV)
    if root is not None:
        if root.strip().lower() in ("", "off", "0", "none"):
            return None
        return Path(root).expanduser() / "reference"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "searchd" / "reference"


@lru_cache(maxsize=8)
def _tree_digest(root: str, rel: tuple[str, ...], suffixes: tuple[str, ...] | None) -> str:
    """SHA-256 of the names and bytes of the files under ``root/rel[i]`` (recursively, in
    sorted order; only names ending in one of ``suffixes`` when given)."""
    h = hashlib.sha256()
    for r in rel:
        base = Path(root) / r
        files = sorted(p for p in base.rglob("*") if p.is_file())
        for p in files:
            if "__pycache__" in p.parts:
                continue
            if suffixes is not None and not p.name.endswith(suffixes):
                continue
            h.update(str(p.relative_to(root)).encode())
            h.update(b"\0")
            h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


def cache_inputs(cfg: Any, package: Path = _PACKAGE) -> dict[str, Any] | None:
    """Everything the exact reference of ``cfg`` (a ``SearchConfig``) depends on, as plain
    data; None when it is not cacheable (see the module docstring)."""
    import numpy
    import torch

    n = cfg.metric.exact_reference
    model = cfg.model
    if n is None or model.spec is not None or (model.name is not None and ":" in model.name):
        return None
    if model.device != "cpu" or cfg.metric.features not in _CACHEABLE_FEATURES:
        return None
    if cfg.metric.name not in ("fid", "kid"):  # class_fid's per-class reference: not cached
        return None
    return {
        "format": _FORMAT,
        "model": {"name": model.name, "zoo": model.zoo, "dtype": model.dtype,
                  "device": model.device},
        "workers": {"cpus_per_worker": cfg.workers.cpus_per_worker,
                    "num_gpus_per_worker": cfg.workers.num_gpus_per_worker},
        "features": cfg.metric.features,
        "n": int(n),
        "seed_base": int(cfg.samples.reference_seed_base),
        "data": _tree_digest(str(package), _DATA_DIRS, None),
        "source": _tree_digest(str(package), _SOURCE_DIRS, (".py",)),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "numpy": numpy.__version__},
    }


def cache_key(cfg: Any, package: Path = _PACKAGE) -> str | None:
    """The cache key of ``cfg``'s exact reference (hex SHA-256), or None (not cacheable)."""
    inputs = cache_inputs(cfg, package)
    if inputs is None:
        return None
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def cache_path(cfg: Any) -> Path | None:
    """The file ``cfg``'s exact reference is cached in (None: not cacheable, or no cache)."""
    root = cache_dir()
    key = cache_key(cfg) if root is not None else None
    if root is None or key is None:
        return None
    return root / f"exact-{cfg.metric.exact_reference}-{key[:32]}.npz"


def load(cfg: Any) -> tuple[dict[str, Any], Path] | None:
    """The cached exact reference of ``cfg`` (``ReferenceStats.to_dict()``) and its file, or
    None: not cached, not cacheable, or unreadable (then it is computed again)."""
    from searchd.evaluation.reference import ReferenceStats

    try:
        path = cache_path(cfg)
        if path is None or not path.is_file():
            return None
        ref = ReferenceStats.from_bytes(path.read_bytes(), path.name)
        if ref.n != cfg.metric.exact_reference or ref.feature_name != cfg.metric.features:
            return None
        return ref.to_dict(), path
    except Exception as e:  # a cache never fails a run
        logger.warning("reference cache: not read (%s: %s); computing it",
                       type(e).__name__, e)
        return None


def store(cfg: Any, reference: dict[str, Any]) -> Path | None:
    """Store ``cfg``'s computed exact reference (plain data); returns its file, or None
    (not cacheable, no cache, or the write failed: logged, never raised)."""
    from searchd.evaluation.reference import ReferenceStats

    try:
        path = cache_path(cfg)
        if path is None:
            return None
        path.parent.mkdir(parents=True, exist_ok=True)
        data = ReferenceStats.from_dict(reference).to_bytes()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path
    except Exception as e:
        logger.warning("reference cache: not written (%s: %s)", type(e).__name__, e)
        return None
