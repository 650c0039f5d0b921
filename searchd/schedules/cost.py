"""What a schedule costs: denoiser calls per step of a solver, a model schedule's latency,
and latency budgets.

A step of a model schedule costs its number of denoiser calls (``calls_per_step``, from the
solver registry's NFE) times its zoo member's latency; a schedule costs the sum
(``schedule_latency_ms``). Budgets are in ms per sample, or in NFE-equivalents of the
slowest member (``budget_ms``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from searchd.solvers import nfe


def calls_per_step(solver: str, n_steps: int, final_zero: bool = True) -> np.ndarray:
    """Denoiser calls of each step [n_steps] (int64), consistent with ``solvers.nfe``.

    One per step for the single-call solvers; Heun makes two, except a last step to 0.
    """
    total = nfe(solver, n_steps, final_zero)
    calls = np.ones(n_steps, dtype=np.int64)
    if total == n_steps:
        return calls
    if total == 2 * n_steps:
        return calls * 2
    if total == 2 * n_steps - 1 and final_zero:
        calls[:-1] = 2
        return calls
    raise ValueError(
        f"solver {solver!r} makes {total} calls for {n_steps} steps; model schedules support "
        "solvers making 1 or 2 calls per step"
    )


def schedule_latency_ms(
    model_ids: Sequence[int] | np.ndarray,
    latency_ms: Sequence[float],
    calls: Sequence[int] | np.ndarray,
) -> float:
    """Milliseconds per sample of a model schedule: sum of calls x member latency."""
    ids = np.asarray(model_ids, dtype=np.int64)
    lat = np.asarray(latency_ms, dtype=np.float64)
    return float(np.sum(np.asarray(calls, dtype=np.float64) * lat[ids]))


def budget_ms(
    latency_ms: Sequence[float], *, ms: float | None = None, nfe: float | None = None
) -> float:
    """A latency budget in ms per sample, from ``ms`` itself or ``nfe`` NFE-equivalents of
    the slowest member. Exactly one must be given."""
    if (ms is None) == (nfe is None):
        raise ValueError("give exactly one of a budget in ms per sample and in NFE-equivalents")
    if ms is not None:
        if not ms > 0:
            raise ValueError(f"budget_ms = {ms!r}; it must be > 0")
        return float(ms)
    if not nfe > 0:  # type: ignore[operator]
        raise ValueError(f"budget_nfe = {nfe!r}; it must be > 0")
    return float(nfe) * max(float(v) for v in latency_ms)  # type: ignore[arg-type]
