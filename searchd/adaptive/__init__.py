"""Per-sample adaptive schedules: the per-noise oracle and timestep predictors.

- ``oracle_schedules``: each noise's own schedule by gradient descent through the solver
  against the teacher's sample on that noise (an upper bound, not a user result).
- ``OneShotPredictor`` / ``DeltaPredictor``: small networks that choose a per-sample
  schedule at sampling time, as offsets over the global schedule; ``.policy()`` goes to
  ``searchd.solvers.solve`` in place of a schedule. ``fit_one_shot`` / ``fit_delta`` train
  them on oracle schedules of training noises.

Decisions and measurements: docs/architecture.md ("Adaptive schedules") and
benchmarks/results/adaptive.md.
"""

from searchd.adaptive.oracle import OracleResult, batched_sigmas, oracle_schedules
from searchd.adaptive.predictors import (
    DeltaPredictor,
    OffsetHead,
    OneShotPredictor,
    ReplayPolicy,
    fine_tune,
    first_denoised,
    fit_delta,
    fit_one_shot,
)

__all__ = [
    "DeltaPredictor", "OffsetHead", "OneShotPredictor", "OracleResult", "ReplayPolicy",
    "batched_sigmas", "fine_tune", "first_denoised", "fit_delta", "fit_one_shot",
    "oracle_schedules",
]
