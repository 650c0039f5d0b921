"""Per-step solver strategies, as codes: which variant of its solver each step runs.

The plain-data half of ``searchd.solvers.strategy`` (codes, families, canonical form), kept
beside ``searchd.schedule`` at the bottom of the imports so that a ``Schedule`` can check and
canonicalize its strategy without importing the solvers.

A multistep solver makes one choice per step that costs no denoiser call: how many past
data predictions its step uses (the multistep order, 1 up to what the solver family
supports, never more than the ``i + 1`` predictions step ``i`` has), and, for UniPC,
whether the UniC corrector refines the step's result with the next step's evaluation. A
plain solver fixes these choices by rule (warm-up orders 1, 2, ..., UniPC's lower order in
the last steps, a corrector on every step but the last); a *strategy* chooses them per
step. The NFE is the same for every strategy (USF / S³, Liu et al. 2024, search over the
same kind of per-step choices).

A strategy is written as one code per step: the order as a digit, then ``c`` where the
corrector is on (``"2c"``: UniP of order 2 corrected by UniC, order 3). ``canonical`` maps
a strategy to the one that runs the same arithmetic (an order beyond the history at hand
is that history's; no corrector on the last step, which has no next evaluation; the order
of a step to sigma = 0 of the exponential solvers, which returns the data prediction, is
1), so two strategies that sample the same share a schedule id.

The steppers read the strategy from the trajectory (``Trajectory.strategy``, a
``Strategy``) through ``Stepper.order_at`` and ``Stepper.keep``
(``searchd.solvers.stepping``): the solvers are not copied per strategy.

Families (orders; corrector): dpmpp_2m and dpmpp_3m: 1, 2, 3 (order 2 is DPM-Solver++(2M)'s
step, order 3 the exponential Adams step of DPM-Solver++(3M)); unipc: 1, 2, 3, corrector
on/off; ipndm: 1 to 4; deis: 1 to 3. euler and heun have no per-step variant.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# solver -> (orders allowed, corrector allowed, the step to sigma = 0 returns D)
FAMILIES: dict[str, tuple[tuple[int, ...], bool, bool]] = {
    "dpmpp_2m": ((1, 2, 3), False, True),
    "dpmpp_3m": ((1, 2, 3), False, True),
    "unipc": ((1, 2, 3), True, True),
    "ipndm": ((1, 2, 3, 4), False, False),
    "deis": ((1, 2, 3), False, False),
}
# The longest history any strategy uses (the steppers keep this many predictions).
MAX_ORDER = max(max(o) for o, _, _ in FAMILIES.values())
_CODE = re.compile(r"^([1-9])(c?)$")


@dataclass(frozen=True)
class Strategy:
    """A validated, canonical per-step strategy of ``n_steps`` steps.

    Attributes:
        orders: multistep order of each step [N] (already limited to the history at hand).
        correctors: UniC corrector after each step [N] (False where not offered).
    """

    orders: tuple[int, ...]
    correctors: tuple[bool, ...]

    @property
    def codes(self) -> tuple[str, ...]:
        """One code per step (``"2"``, ``"2c"``)."""
        return tuple(f"{o}{'c' if c else ''}" for o, c in zip(self.orders, self.correctors))

    @property
    def n_steps(self) -> int:
        return len(self.orders)

    def key(self, step: int) -> bytes:
        """The bytes of step ``step``'s choice (prefix-tree keys)."""
        return self.codes[step].encode()


def family(solver: str) -> tuple[tuple[int, ...], bool, bool]:
    """The per-step variants of ``solver``; ``ValueError`` for a solver without any."""
    if solver not in FAMILIES:
        raise ValueError(f"solver {solver!r} has no per-step strategy; solvers with one: "
                         f"{', '.join(FAMILIES)}")
    return FAMILIES[solver]


def parse_code(solver: str, code: Any, step: int) -> tuple[int, bool]:
    """(order, corrector) of one step's code; ``ValueError`` naming the bad code."""
    orders, corrector_ok, _ = family(solver)
    m = _CODE.match(code) if isinstance(code, str) else None
    allowed = ", ".join(f"{o}" for o in orders) + (" (each optionally followed by 'c', the "
                                                   "UniC corrector)" if corrector_ok else "")
    if m is None or int(m.group(1)) not in orders or (m.group(2) and not corrector_ok):
        raise ValueError(f"strategy[{step}] = {code!r} is not a step of {solver}; allowed: "
                         f"{allowed}")
    return int(m.group(1)), bool(m.group(2))


def canonical(solver: str, codes: Sequence[str], n_steps: int, final_zero: bool
              ) -> tuple[str, ...]:
    """The canonical form of a strategy (see the module docstring); ``ValueError`` for a
    wrong length or a code the solver does not have."""
    if isinstance(codes, str) or not isinstance(codes, Sequence):
        raise ValueError(f"strategy must be a list of per-step codes; got {codes!r}")
    if len(codes) != n_steps:
        raise ValueError(f"strategy has {len(codes)} step(s); the schedule has {n_steps}")
    _, _, denoise_last = family(solver)
    out = []
    for i, code in enumerate(codes):
        order, corr = parse_code(solver, code, i)
        order = min(order, i + 1)
        last = i == n_steps - 1
        if last:
            corr = False
            if final_zero and denoise_last:
                order = 1
        out.append(f"{order}{'c' if corr else ''}")
    return tuple(out)


def resolve(solver: str, codes: Sequence[str] | Strategy | None, n_steps: int,
            final_zero: bool) -> Strategy | None:
    """The ``Strategy`` the steppers run for ``codes`` (None stays None)."""
    if codes is None:
        return None
    if isinstance(codes, Strategy):
        codes = codes.codes
    canon = canonical(solver, codes, n_steps, final_zero)
    parsed = [parse_code(solver, c, i) for i, c in enumerate(canon)]
    return Strategy(tuple(o for o, _ in parsed), tuple(c for _, c in parsed))
