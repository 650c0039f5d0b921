"""Prefix sharing: many schedules on common noise, each shared prefix integrated once.

All candidates of a search are scored on the same noise (common random numbers). Two
schedules that agree on their first ``k + 1`` levels (and on the models, the guidance
weights and any other per-step input of their first ``k + 1`` steps) reach the same solver
state after step ``k``'s first denoiser call: the sample, the data predictions and the
multistep history (``searchd.solvers.stepping``). ``solve_prefix_tree`` arranges the
schedules in a tree of shared prefixes and runs every node once:

- the root's children group the schedules by their first level (the start ``noise *
  sigma_0`` and the first call ``D(x_0, sigma_0)`` are shared);
- a node at depth k holds the state observed at level k; each child (the schedules that
  also agree on level k + 1) continues it with ``advance`` to level k + 1 and ``observe``s
  there;
- a leaf (depth N) is the final sample of every schedule in it (duplicates share it).

Each node runs exactly the code, on exactly the tensors, that ``solve`` runs for any one of
its schedules alone (its levels are read from a representative schedule of the node, whose
levels up to the node's agree bit for bit with every other's), so every result is bitwise
equal to solving that schedule alone on the same noise rows. Agreement is bitwise: levels
that differ in the last bit are different prefixes.

Traversal is depth-first, so at most one state per depth is alive at a time (plus the
children of the node being expanded). A failure (an exception in a node) fails the
schedules below that node only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from searchd.models.base import Denoiser
from searchd.solvers._core import Trajectory, trajectory
from searchd.solvers.stepping import SolverState, Stepper


@dataclass
class PrefixStats:
    """Work done by one ``solve_prefix_tree`` call, in solver phases over the whole batch.

    Attributes:
        observes: ``observe`` phases run (one denoiser call each).
        advances: ``advance`` phases run (a Heun step other than the last adds a call).
        observes_alone, advances_alone: the same counts if every schedule ran alone.
    """

    observes: int = 0
    advances: int = 0
    observes_alone: int = 0
    advances_alone: int = 0

    @property
    def shared_fraction(self) -> float:
        """Fraction of the schedules' observe phases (first denoiser calls) not re-run."""
        if self.observes_alone == 0:
            return 0.0
        return 1.0 - self.observes / self.observes_alone

    def add(self, other: PrefixStats) -> None:
        self.observes += other.observes
        self.advances += other.advances
        self.observes_alone += other.observes_alone
        self.advances_alone += other.advances_alone


def step_inputs(traj: Trajectory, k: int) -> tuple[np.ndarray, ...]:
    """What step ``k`` of a trajectory hands the solver and the denoiser, apart from the state.

    The level ``sigma_k`` [B] and, when present, the step's models [B], guidance weights
    [B] and the solver strategy's code of the step arriving at level k. A new per-step
    input of ``Trajectory`` must be added here, or schedules differing only in it would be
    taken as one prefix (``tests/test_prefix.py`` checks that the trajectory holds nothing
    unlisted). The per-row keywords ``cond`` are not keyed: they are the same for every step
    and every schedule of a tree (one argument of ``solve_prefix_tree``).
    """
    cols: list[np.ndarray] = [traj.sigmas[:, k].detach().cpu().numpy()]
    if traj.model_ids is not None and k < traj.n_steps:
        cols.append(traj.model_ids[:, k].cpu().numpy())
    if traj.guidance is not None and k < traj.n_steps:
        cols.append(traj.guidance[:, k].cpu().numpy())
    if traj.strategy is not None:
        # The per-step strategy of the step that arrives at level k (its order and
        # corrector make the state there); a marker at level 0 (a strategy keeps a longer
        # history than the plain solver, so the two never share a state).
        code = traj.strategy.key(k - 1) if k > 0 else b"strategy"
        cols.append(np.frombuffer(code, dtype=np.uint8))
    return tuple(cols)


def _key(traj: Trajectory, k: int) -> bytes:
    """The bytes of step ``k``'s inputs (level ``k`` alone for the last level, k = N)."""
    return b"|".join(c.tobytes() for c in step_inputs(traj, k))


def solve_prefix_tree(
    denoiser: Denoiser,
    noise: Tensor,
    schedules: Sequence[Tensor | np.ndarray],
    *,
    solver: str = "dpmpp_2m",
    model_ids: Sequence[Tensor | np.ndarray | None] | None = None,
    guidance: Sequence[Tensor | np.ndarray | None] | None = None,
    cond: dict[str, Tensor] | None = None,
    stats: PrefixStats | None = None,
    strategies: Sequence[Sequence[str] | None] | None = None,
    **opts: Any,
) -> list[Tensor | Exception]:
    """Sample every schedule on the same noise, integrating each shared prefix once.

    Args:
        denoiser: ``D(x [B, *shape], sigma [B]) -> x0_hat``.
        noise: unit Gaussian noise [B, *shape] shared by all schedules.
        schedules: C schedules, each [N+1] or per sample [B, N+1], with the same N and the
            same ending (all end in 0 or none does).
        solver: a name of ``SOLVERS``; ``**opts`` its options, for every schedule.
        model_ids: None, or per schedule None / [N] / [B, N] (all None or none None).
        guidance: None, or per schedule None / [N] / [B, N] guidance weights (all None or
            none None), as ``solve``'s ``guidance``.
        cond: per-row denoiser keywords {name: [B, ...]} shared by every schedule, as
            ``solve``'s ``cond``.
        strategies: None, or per schedule None or its per-step strategy codes [N]
            (``searchd.solvers.strategy``); part of the prefix keys.
        stats: if given, the work done is added to it.

    Returns:
        Per schedule, in order: the sample [B, *shape] (bitwise what ``solve`` returns for
        that schedule alone on ``noise``), or the exception that failed its subtree.
        Invalid input (bad schedule, mixed N or endings) raises ``ValueError`` at once.
    """
    from searchd.solvers import get

    spec = get(solver)
    stepper = spec.stepper(**spec.resolve(opts))
    if len(schedules) == 0:
        return []
    if model_ids is None:
        model_ids = [None] * len(schedules)
    if len(model_ids) != len(schedules):
        raise ValueError(f"{len(model_ids)} model schedules for {len(schedules)} schedules")
    if len({m is None for m in model_ids}) > 1:
        raise ValueError("model_ids must be given for every schedule or for none")
    if guidance is None:
        guidance = [None] * len(schedules)
    if len(guidance) != len(schedules):
        raise ValueError(f"{len(guidance)} guidance schedules for {len(schedules)} schedules")
    if len({g is None for g in guidance}) > 1:
        raise ValueError("guidance must be given for every schedule or for none")
    if strategies is None:
        strategies = [None] * len(schedules)
    if len(strategies) != len(schedules):
        raise ValueError(f"{len(strategies)} strategies for {len(schedules)} schedules")
    trajs = [
        trajectory(denoiser, noise, s, m, g, cond, strategy=k, solver=solver)
        for s, m, g, k in zip(schedules, model_ids, guidance, strategies)
    ]
    n_steps, final_zero = trajs[0].n_steps, trajs[0].final_zero
    for c, t in enumerate(trajs):
        if (t.n_steps, t.final_zero) != (n_steps, final_zero):
            raise ValueError(
                f"schedule {c} has {t.n_steps} steps (final_zero={t.final_zero}); schedule 0 "
                f"has {n_steps} (final_zero={final_zero}): a prefix tree holds one shape"
            )
    keys = [[_key(t, k) for k in range(n_steps + 1)] for t in trajs]
    run = _TreeRun(stepper, trajs, keys, noise)
    with torch.no_grad():
        for members in _groups(range(len(trajs)), keys, 0):
            run.root(members)
    if stats is not None:
        run.stats.observes_alone = len(trajs) * n_steps
        run.stats.advances_alone = len(trajs) * n_steps
        stats.add(run.stats)
    return run.out  # type: ignore[return-value]


def _groups(members: Sequence[int], keys: list[list[bytes]], k: int) -> list[list[int]]:
    """``members`` split by their key at depth ``k``, in order of first appearance."""
    out: dict[bytes, list[int]] = {}
    for c in members:
        out.setdefault(keys[c][k], []).append(c)
    return list(out.values())


class _TreeRun:
    """One depth-first pass over the prefix tree of a batch of trajectories."""

    def __init__(
        self, stepper: Stepper, trajs: list[Trajectory], keys: list[list[bytes]], noise: Tensor
    ) -> None:
        self.stepper = stepper
        self.trajs = trajs
        self.keys = keys
        self.noise = noise
        self.n_steps = trajs[0].n_steps
        self.out: list[Tensor | Exception | None] = [None] * len(trajs)
        self.stats = PrefixStats()

    def _fail(self, members: Sequence[int], error: Exception) -> None:
        for c in members:
            self.out[c] = error

    def root(self, members: list[int]) -> None:
        """Schedules sharing level 0 (and step 0's inputs): start, then descend."""
        traj = self.trajs[members[0]]
        noise = self.noise
        # The start of ``solve``: the noise times the first level.
        x = noise * traj.sigmas[:, 0].to(noise.dtype).reshape((-1,) + (1,) * (noise.ndim - 1))
        self._node(members, 0, self.stepper.start(traj, x))

    def _node(self, members: list[int], k: int, state: SolverState) -> None:
        """Schedules sharing levels 0..k and steps 0..k's inputs, at level k (not observed)."""
        try:
            state = self.stepper.observe(self.trajs[members[0]], state)
        except Exception as e:  # noqa: BLE001 - fail this subtree only
            self._fail(members, e)
            return
        self.stats.observes += 1
        for child in _groups(members, self.keys, k + 1):
            try:
                nxt = self.stepper.advance(self.trajs[child[0]], state)
            except Exception as e:  # noqa: BLE001
                self._fail(child, e)
                continue
            self.stats.advances += 1
            if k + 1 == self.n_steps:
                for c in child:
                    self.out[c] = nxt.x
            else:
                self._node(child, k + 1, nxt)
