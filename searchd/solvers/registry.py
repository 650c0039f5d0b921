"""The solver registry: name -> function, options, theoretical order and cost in NFE."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from searchd.solvers._core import Trajectory
from searchd.solvers.exponential import DPMpp2M, ExponentialAdams, UniPC
from searchd.solvers.linear_multistep import DEIS, IPNDM
from searchd.solvers.single_step import Euler, Heun
from searchd.solvers.stepping import Stepper, run


@dataclass(frozen=True)
class Option:
    """One keyword option of a solver: its default and the values allowed."""

    default: Any
    allowed: tuple[Any, ...]
    doc: str

    def check(self, solver: str, name: str, value: Any) -> Any:
        if isinstance(value, bool) != isinstance(self.default, bool) or value not in self.allowed:
            allowed = ", ".join(repr(v) for v in self.allowed)
            raise ValueError(
                f"{solver}: option {name} = {value!r} is not allowed; allowed: {allowed}"
            )
        return value


@dataclass(frozen=True)
class SolverSpec:
    """A solver: ``stepper(**options) -> Stepper``, its options and properties.

    Attributes:
        name: registry key.
        stepper: builds the solver's ``Stepper`` (``searchd.solvers.stepping``) from its
            resolved options.
        order: theoretical convergence order as a function of the resolved options.
        evals_per_step: denoiser calls per step (Heun: 2, none on a step to sigma = 0).
        options: keyword options, with defaults and allowed values.
    """

    name: str
    stepper: Callable[..., Stepper]
    order: Callable[[Mapping[str, Any]], int]
    evals_per_step: int = 1
    options: Mapping[str, Option] = field(default_factory=dict)

    def resolve(self, opts: Mapping[str, Any]) -> dict[str, Any]:
        """Options with defaults filled in; ``ValueError`` for unknown names or values."""
        unknown = sorted(set(opts) - set(self.options))
        if unknown:
            allowed = ", ".join(self.options) or "none"
            raise ValueError(
                f"{self.name}: unknown option(s) {unknown}; allowed options: {allowed}"
            )
        return {k: o.check(self.name, k, opts.get(k, o.default)) for k, o in self.options.items()}

    def fn(self, traj: Trajectory, x: Tensor, **options: Any) -> Tensor:
        """The whole solver loop along ``traj`` from ``x`` (resolved options)."""
        return run(self.stepper(**options), traj, x)

    def theoretical_order(self, **opts: Any) -> int:
        """Global order of accuracy with these options (defaults for the missing ones).

        The order of the steady-state step on a smooth graded schedule; the lower-order
        warm-up steps at sigma_max are not counted (docs/notes-solvers.md).
        """
        return self.order(self.resolve(opts))

    def nfe(self, n_steps: int, final_zero: bool = True) -> int:
        """Denoiser calls for ``n_steps`` steps."""
        extra = 1 if (self.evals_per_step == 2 and final_zero) else 0
        return self.evals_per_step * n_steps - extra

    def step_calls(self, n_steps: int, final_zero: bool = True) -> list[int]:
        """Denoiser calls of each step (their sum is ``nfe``): two-call solvers make one on
        a last step to 0."""
        calls = [self.evals_per_step] * n_steps
        if self.evals_per_step == 2 and final_zero:
            calls[-1] = 1
        return calls


SOLVERS: dict[str, SolverSpec] = {
    spec.name: spec
    for spec in (
        SolverSpec("euler", Euler, lambda o: 1),
        SolverSpec("heun", Heun, lambda o: 2, evals_per_step=2),
        SolverSpec("dpmpp_2m", DPMpp2M, lambda o: 2),
        SolverSpec("dpmpp_3m", lambda: ExponentialAdams(3), lambda o: 3),
        SolverSpec(
            "unipc",
            UniPC,
            lambda o: o["order"] + 1,
            options={
                "order": Option(2, (1, 2, 3), "UniP order p (the corrector UniC makes it p + 1)"),
                "lower_order_final": Option(
                    True, (True, False), "lower the order of the last steps when N < 15"
                ),
            },
        ),
        SolverSpec(
            "ipndm",
            IPNDM,
            lambda o: o["order"] if o["variable_step"] else min(o["order"], 2),
            options={
                "order": Option(4, (1, 2, 3, 4), "Adams-Bashforth order"),
                "variable_step": Option(
                    False, (False, True), "variable-step coefficients (diff-sampler's ipndm_v)"
                ),
            },
        ),
        SolverSpec(
            "deis",
            DEIS,
            lambda o: o["order"],
            options={"order": Option(3, (1, 2, 3), "degree + 1 of the polynomial in VP time")},
        ),
    )
}
