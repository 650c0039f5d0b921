"""searchd: search for the best sampling schedule of a pretrained diffusion model.

The library's two entry points (``searchd.api``)::

    import searchd
    result = searchd.search("configs/quickstart.yaml", run_dir="runs/demo")
    run = searchd.open_run("runs/demo")

``searchd.search`` is also the module behind ``python -m searchd.search`` (a callable
module); names are imported on first use, so ``import searchd`` stays light.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "open_run": "searchd.api",
    "SearchResult": "searchd.api",
    "RunView": "searchd.api",
    "HeldoutScore": "searchd.api",
    "BadInput": "searchd.api",
}

__all__ = ["__version__", "search", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name == "search":  # the callable module searchd/search.py
        return importlib.import_module("searchd.search")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'searchd' has no attribute {name!r}")
