"""Schedule policies: noise levels chosen while sampling, from the state reached so far.

``solve(denoiser, noise, policy, ...)`` accepts a ``SchedulePolicy`` where it accepts a
fixed schedule. The solver asks the policy for the next level right after the first
denoiser call of each step, when it knows the state ``x_i``, the level ``sigma_i`` and the
data prediction ``D(x_i, sigma_i)``; the policy answers with one or more further levels.
A per-sample adaptive schedule therefore costs no denoiser call beyond the solver's own.

- A one-shot predictor answers once, at step 0, with every remaining level (or in
  ``start``, from the noise alone).
- A recursive (delta) predictor answers one level per step.

With a final 0 the last level is 0 and the policy is not asked for it. Every level a
policy returns is checked as a fixed schedule is (finite, > 0, strictly below the previous
one), and may carry an autograd graph, so a policy can be trained through the solver.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import Tensor


class SchedulePolicy(ABC):
    """Chooses the noise levels of ``n_steps`` steps while ``solve`` runs.

    Attributes:
        n_steps: steps N (N + 1 levels in all).
        final_zero: the last level is 0 (the last step denoises); else the policy chooses it.
    """

    n_steps: int
    final_zero: bool

    @abstractmethod
    def start(self, noise: Tensor) -> Tensor:
        """The first levels, float64 [B, k] with 1 <= k <= N + 1 (column 0: the top level).

        ``noise`` is the unit noise [B, *shape] the solver starts from (times level 0).
        """

    @abstractmethod
    def advance(self, step: int, x: Tensor, sigmas: Tensor, denoised: Tensor) -> Tensor:
        """Further levels [B, m], m >= 1, after the first denoiser call of step ``step``.

        Called only when level ``step + 1`` is not yet known.

        Args:
            step: the step i about to be taken (0-based).
            x: the state x_i [B, *shape] at level sigma_i.
            sigmas: the levels known so far, float64 [B, i + 1] (autograd graph kept).
            denoised: ``D(x_i, sigma_i)`` [B, *shape].
        """
