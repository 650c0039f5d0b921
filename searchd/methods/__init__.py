"""The published schedule methods, Ray-free: they take a denoiser (or an evaluator) and
return a schedule.

- ``searchd.methods.gits``: GITS, dynamic programming over a teacher trajectory.
- ``searchd.methods.ld3``: LD3, a schedule learned by gradient descent through the solver.
- ``searchd.methods.anchors``: ``compute_anchor`` (either method, its cost counted).
- ``searchd.methods.counting``: ``CountingDenoiser`` and ``Counted``, the denoiser-call
  counter every method's cost is measured with.
- ``ANCHORS``: the names of the computed schedules (the one source the configuration
  validates ``gits``/``ld3`` against).

The teacher they are measured against is the evaluator's (``searchd.evaluation.teacher``);
the per-sample oracle and predictors are in ``searchd.adaptive``. Nothing here imports Ray,
Tune, pyarrow or the configuration. Names are imported lazily (they need torch).
"""

from __future__ import annotations

import importlib
from typing import Any

# The registry of computed schedules: the names a run may use as an algorithm, a baseline
# family or a warm start (``compute_anchor`` dispatches on them).
ANCHORS: tuple[str, ...] = ("gits", "ld3")

_LAZY = {
    "compute_anchor": "searchd.methods.anchors",
    "anchors_from_results": "searchd.methods.anchors",
    "fit_to_space": "searchd.methods.anchors",
    "Counted": "searchd.methods.counting",
    "CountingDenoiser": "searchd.methods.counting",
    "denoiser_of": "searchd.methods.counting",
    "warmup_noise": "searchd.methods.counting",
    "compute_gits": "searchd.methods.gits",
    "gits_dp": "searchd.methods.gits",
    "gits_plan": "searchd.methods.gits",
    "gits_schedule": "searchd.methods.gits",
    "compute_ld3": "searchd.methods.ld3",
    "ld3_schedule": "searchd.methods.ld3",
}

__all__ = ["ANCHORS", *sorted(_LAZY)]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'searchd.methods' has no attribute {name!r}")
