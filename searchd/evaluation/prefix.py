"""The evaluator's prefix-tree path: a group of candidates sampled through a tree of shared
prefixes (``searchd.solvers.prefix``) instead of one population-batched pass.

``Evaluator(..., prefix_sharing=True)`` routes every group of candidates (same solver,
number of steps, ending, model-schedule and guidance-schedule kind) through
``run_group_tree``. The seeds are cut into chunks of ``batch_size`` samples, exactly as when
a candidate is scored alone, and each chunk is one tree over the group's candidates that
have not failed. So every candidate's samples, features and metrics are bitwise those of
scoring it alone with the same evaluator (``evaluate([c], seeds)``), whatever the other
candidates are; candidates that share their first levels (and steps' models and guidance
weights) share the solver work of those steps.

It pays where candidates share prefixes (level-local mutations, ``searchd.schedules.local``,
and duplicates); on candidates that share nothing it does the same denoiser work as scoring
them one by one, which on a compute-bound denoiser costs about what the batched pass costs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from searchd.models.conditional import row_conditioning
from searchd.schedule import Schedule
from searchd.solvers.prefix import PrefixStats, solve_prefix_tree

if TYPE_CHECKING:
    from searchd.evaluation.evaluate import Evaluator, _Accumulator


def run_group_tree(
    ev: Evaluator,
    solver: str,
    schedules: list[Schedule],
    js: list[int],
    accs: dict[int, _Accumulator],
    noise: Tensor,
) -> PrefixStats:
    """Sample a group of candidates chunk by chunk through the prefix tree and hand each
    candidate's samples to its accumulator, in sample order.

    Args:
        ev: the evaluator (its denoiser, batch size and solver options are used).
        solver: the group's solver.
        schedules: the group's candidates; ``js[c]`` is candidate c's index in ``accs``.
        accs: per-candidate accumulators; a failed candidate gets ``error`` set and is
            left out of later chunks.
        noise: the seeds' noise [n, *shape].

    Returns:
        The work done and the work saved (``PrefixStats``), summed over the chunks.
    """
    n = noise.shape[0]
    stats = PrefixStats()
    sig = [torch.tensor(np.asarray(s.sigmas), dtype=torch.float64) for s in schedules]
    mids = None
    if schedules[0].model_ids is not None:
        mids = [torch.tensor(np.asarray(s.model_ids), dtype=torch.int64) for s in schedules]
    guid = None
    if schedules[0].guidance is not None:
        guid = [torch.tensor(np.asarray(s.guidance), dtype=torch.float64) for s in schedules]
    for a in range(0, n, ev.batch_size):
        b = min(a + ev.batch_size, n)
        live = [c for c in range(len(schedules)) if accs[js[c]].error is None]
        if not live:
            break
        try:
            outs: list[Tensor | Exception] = solve_prefix_tree(
                ev.denoiser,
                noise[a:b],
                [sig[c] for c in live],
                solver=solver,
                model_ids=None if mids is None else [mids[c] for c in live],
                guidance=None if guid is None else [guid[c] for c in live],
                cond=row_conditioning(ev.denoiser, ev._seeds_now[a:b]),
                stats=stats,
                strategies=[schedules[c].strategy for c in live],
                **ev.solver_options,
            )
        except Exception as e:  # noqa: BLE001 - e.g. bad options: every live candidate fails
            outs = [e] * len(live)
        for c, x in zip(live, outs):
            acc = accs[js[c]]
            if isinstance(x, Exception):
                acc.error = f"solver error: {type(x).__name__}: {x}"
                continue
            x = x.detach()
            bad = ~torch.isfinite(x.flatten(1)).all(1)
            if bad.any():
                i = a + int(bad.nonzero()[0, 0])
                acc.error = f"non-finite sample {i} (seed {ev._seeds_now[i]})"
                continue
            acc.push(x, a)
    return stats
