"""Per-step solver strategies: which variant of its solver each step of a schedule runs.

The codes, the families and the canonical form live in ``searchd.strategy_codes`` (re-exported
here); this module adds what needs the solvers: the plain solver's own choices as a strategy
(``default_strategy``) and the convergence order a strategy implies (``implied_order``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from searchd.strategy_codes import (
    FAMILIES,
    MAX_ORDER,
    Strategy,
    canonical,
    family,
    parse_code,
    resolve,
)

__all__ = ["FAMILIES", "MAX_ORDER", "Strategy", "canonical", "default_strategy", "family",
           "implied_order", "parse_code", "resolve", "step_order"]


def default_strategy(solver: str, n_steps: int, final_zero: bool = True,
                     options: Mapping[str, Any] | None = None) -> tuple[str, ...]:
    """The per-step choices the plain solver makes (its options resolved): running it as a
    strategy reproduces the plain solver bitwise."""
    from searchd.solvers import get
    from searchd.solvers.exponential import UNIPC_LOWER_ORDER_FINAL_BELOW

    spec = get(solver)
    family(solver)
    o = spec.resolve(dict(options or {}))
    codes = []
    for i in range(n_steps):
        if solver == "unipc":
            p = min(o["order"], i + 1)
            if o["lower_order_final"] and n_steps < UNIPC_LOWER_ORDER_FINAL_BELOW:
                p = min(p, n_steps - i)
            codes.append(f"{p}c")
        else:
            history = {"dpmpp_2m": 2, "dpmpp_3m": 3}.get(solver, o.get("order", 1))
            codes.append(str(min(history, i + 1)))
    return canonical(solver, codes, n_steps, final_zero)


def step_order(solver: str, code: str, options: Mapping[str, Any] | None = None) -> int:
    """The local order of accuracy one step of this code implies (global order of a
    strategy that repeats it): the multistep order, plus one with UniPC's corrector.
    ipndm's fixed coefficients are of order <= 2 on graded schedules (variable_step lifts
    it), as for the plain solver."""
    order, corr = parse_code(solver, code, 0)
    if solver == "ipndm" and not dict(options or {}).get("variable_step", False):
        order = min(order, 2)
    return order + int(corr)


def implied_order(solver: str, codes: Sequence[str],
                  options: Mapping[str, Any] | None = None) -> int:
    """The convergence order a strategy repeated along ever finer schedules has: that of
    its lowest-order step."""
    return min(step_order(solver, c, options) for c in codes)
