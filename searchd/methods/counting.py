"""What a published method sees of an evaluator, and the denoiser-call counter.

Cost is counted, not estimated: ``CountingDenoiser`` counts the rows (samples) that go
through the network in forward calls, the unit every search cost of searchd is reported in
(a candidate scored on n samples at NFE k costs n k). ``Counted`` wraps an evaluator (or a
bare denoiser) so that everything a method computes on it, its teacher included, is counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from searchd.evaluation.teacher import TeacherCache
from searchd.models.base import Denoiser
from searchd.noise import make_noise


class CountingDenoiser:
    """A denoiser that counts its forward calls and the samples (rows) they carry.

    Every other attribute (shape, noise range, grid, device, dtype, ...) is the wrapped
    denoiser's. Gradients flow through unchanged.
    """

    def __init__(self, denoiser: Any) -> None:
        self._inner = denoiser
        self.calls = 0  # forward calls
        self.rows = 0  # samples through the network, summed over calls

    def __call__(self, x: Tensor, sigma: Tensor, **cond: Any) -> Tensor:
        """``D(x [B, *shape], sigma [B])``, counted: one call, B rows."""
        self.calls += 1
        self.rows += int(x.shape[0])
        return self._inner(x, sigma, **cond)

    def __getattr__(self, name: str) -> Any:
        if name == "_inner":  # not yet set (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self._inner, name)


class Counted:
    """What ``compute_gits``/``compute_ld3``/``train_predictor`` see of an evaluator: the
    counting denoiser, the feature network (LD3's feature loss), and a teacher cache of its
    own (so the teacher's calls are counted too).

    Args:
        evaluator_or_denoiser: an ``Evaluator`` (its ``denoiser`` and ``features`` are used)
            or a bare denoiser.
    """

    def __init__(self, evaluator_or_denoiser: Any) -> None:
        inner = denoiser_of(evaluator_or_denoiser)
        self.denoiser = CountingDenoiser(inner)
        self.features = getattr(evaluator_or_denoiser, "features", None)
        self.teacher_cache = TeacherCache(self.denoiser)

    def cost(self) -> dict[str, int]:
        """``{"denoiser_calls": samples through the network, "forward_calls": calls}``."""
        return {"denoiser_calls": self.denoiser.rows, "forward_calls": self.denoiser.calls}


def denoiser_of(evaluator_or_denoiser: Any) -> Denoiser:
    """The denoiser of an evaluator (its ``denoiser`` attribute), or the argument itself."""
    return getattr(evaluator_or_denoiser, "denoiser", evaluator_or_denoiser)


def warmup_noise(denoiser: Denoiser, seeds: Sequence[int] | range) -> Tensor:
    """Unit noise [len(seeds), *shape] of ``seeds`` on the denoiser's device and dtype."""
    return make_noise(seeds, tuple(denoiser.shape),
                      device=getattr(denoiser, "device", "cpu"),
                      dtype=getattr(denoiser, "dtype", torch.float32))
