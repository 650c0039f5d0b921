"""Model schedules: one denoiser built from the members of a zoo (OMS-DPM).

``ComposedDenoiser(members)`` is a ``Denoiser`` whose calls take ``model_id`` (an int64 [B]
tensor, the zoo member of each row) as the solvers pass it for a model schedule
(``solve(..., model_ids=...)``). Rows are grouped by member within the call, so a
population-batched pass that mixes candidates with different model schedules is one solver
run, with one member call per distinct id per denoiser call. Solvers do not change.

Which member a second-order solver's extra evaluation uses: the solvers pass the model of
the *step* to every call of that step (``Trajectory.denoise``), so Heun's correction at the
next level uses the same member as the step's first evaluation; a step's cost is therefore
its number of calls times its member's latency (``calls_per_step``). Multistep solvers
(dpmpp_2m, ...) make one call per step, with that step's member.

A call without ``model_id`` (a plain timestep schedule, the teacher of ``teacher_distance``)
uses the reference member: the last one listed (by convention the full model, whose exact
samples, if it has any, are the data distribution: ``sample_data`` is the reference
member's).

Latency: ``measure_latency`` times each member on its own device, at a given batch size
(warm-up calls, then the median of repeats, synchronizing CUDA around each call), and
returns milliseconds per sample per call. A schedule's latency is
``sum_i calls_i * latency_ms[model_ids[i]]`` (``schedule_latency_ms``). Budgets are given in
milliseconds per sample or in NFE-equivalents of the largest (slowest) member
(``budget_ms``).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from searchd.models.base import Denoiser, sigma_per_sample

# A schedule's cost (calls per step, latency, budgets) is in searchd.schedules.cost;
# re-exported for the callers that know it as a part of model schedules.
from searchd.schedules.cost import budget_ms, calls_per_step, schedule_latency_ms  # noqa: F401

# Latency measurement defaults: warm-up calls, timed repeats, noise level of the calls.
LATENCY_WARMUP = 2
LATENCY_REPEATS = 7
LATENCY_SIGMA = 1.0


class ComposedDenoiser:
    """A denoiser that routes each row of a call to the zoo member ``model_id`` names.

    Args:
        members: the zoo members (``Denoiser``s of the same sample shape), in index order;
            the last is the reference member (calls without ``model_id``, ``sample_data``).
        names: their names (default: each member's ``name`` attribute, else ``m<i>``).
        latency_ms: measured ms per sample per call of each member (see
            ``measure_latency``), or None until measured.

    The noise range is the intersection of the members' ranges. Discrete-time members must
    share one grid (it is then the composed model's grid).
    """

    def __init__(
        self,
        members: Sequence[Denoiser],
        names: Sequence[str] | None = None,
        latency_ms: Sequence[float] | None = None,
    ) -> None:
        members = list(members)
        if len(members) < 1:
            raise ValueError("a composed denoiser needs at least one member; got 0")
        shapes = {tuple(m.shape) for m in members}
        if len(shapes) != 1:
            raise ValueError(f"zoo members must share one sample shape; got {sorted(shapes)}")
        self.members = members
        self.names = [
            str(n) for n in (names or [getattr(m, "name", f"m{i}") for i, m in enumerate(members)])
        ]
        if len(self.names) != len(members):
            raise ValueError(f"{len(self.names)} names for {len(members)} zoo members")
        self.shape = tuple(members[0].shape)
        self.sigma_min = max(float(m.sigma_min) for m in members)
        self.sigma_max = min(float(m.sigma_max) for m in members)
        if not self.sigma_min < self.sigma_max:
            raise ValueError(
                f"the zoo members' noise ranges do not overlap (sigma_min {self.sigma_min} >= "
                f"sigma_max {self.sigma_max})"
            )
        grids = [m.sigma_grid for m in members if getattr(m, "sigma_grid", None) is not None]
        self.sigma_grid: Tensor | None = None
        if grids:
            g0 = grids[0]
            if len(grids) != len(members) or any(
                g.shape != g0.shape or not torch.allclose(g.cpu(), g0.cpu()) for g in grids
            ):
                raise ValueError("discrete-time zoo members must share one sigma grid")
            self.sigma_grid = g0
        self.reference = len(members) - 1
        self.name = "+".join(self.names)
        self.device = torch.device(getattr(members[self.reference], "device", "cpu"))
        self.dtype = getattr(members[self.reference], "dtype", torch.float32)
        self.latency_ms: list[float] | None = None
        self.latency_info: dict[str, Any] = {}
        if latency_ms is not None:
            self.set_latency(latency_ms)

    # Denoiser protocol ----------------------------------------------------------------------
    @property
    def n_models(self) -> int:
        return len(self.members)

    @property
    def cost(self) -> float:
        """Relative cost of a call without ``model_id`` (the reference member's): 1.0."""
        return 1.0

    @property
    def costs(self) -> list[float]:
        """Each member's cost relative to the slowest member (measured latencies if known,
        else the members' own ``cost`` attributes)."""
        lat = self.latency_ms or [float(getattr(m, "cost", 1.0)) for m in self.members]
        top = max(lat)
        return [v / top for v in lat]

    def __call__(self, x: Tensor, sigma: Tensor | float, model_id: Any = None, **cond) -> Tensor:
        """Denoise row b of ``x`` with member ``model_id[b]`` at ``sigma[b]``.

        ``model_id``: None (the reference member), an int, or an integer [B] tensor.
        """
        sigma = sigma_per_sample(sigma, x)
        if model_id is None:
            return self.members[self.reference](x, sigma, **cond)
        ids = torch.as_tensor(model_id, device=x.device)
        if ids.is_floating_point() or ids.dtype == torch.bool:
            raise ValueError(f"model_id must be integers; got dtype {ids.dtype}")
        if ids.ndim == 0:
            ids = ids.expand(x.shape[0])
        if ids.shape != (x.shape[0],):
            raise ValueError(
                f"model_id has shape {tuple(ids.shape)}; expected () or ({x.shape[0]},)"
            )
        present = torch.unique(ids).tolist()
        for m in present:
            if not 0 <= m < self.n_models:
                raise ValueError(
                    f"model_id {m} is out of range; this zoo has models 0..{self.n_models - 1} "
                    f"({', '.join(self.names)})"
                )
        if len(present) == 1:
            return self.members[present[0]](x, sigma, **cond)
        out = torch.empty_like(x)
        b = x.shape[0]
        for m in present:
            rows = (ids == m).nonzero().squeeze(1)
            # Per-row keywords (guidance weights, sample indices) follow their rows.
            kw = {k: v[rows.to(v.device)] if isinstance(v, Tensor) and v.ndim >= 1
                  and v.shape[0] == b else v for k, v in cond.items()}
            out[rows] = self.members[m](x[rows], sigma[rows], **kw).to(out.dtype)
        return out

    @property
    def conditional(self) -> bool:
        """Every member conditions its rows on ``sample_index``."""
        return all(bool(getattr(m, "conditional", False)) for m in self.members)

    @property
    def supports_guidance(self) -> bool:
        """Every member takes per-row guidance weights."""
        return all(bool(getattr(m, "supports_guidance", False)) for m in self.members)

    def sample_data(self, seeds: Sequence[int], **kw: Any) -> Tensor:
        """Exact data samples of the reference member (the data distribution)."""
        ref = self.members[self.reference]
        if not hasattr(ref, "sample_data"):
            raise ValueError(f"the reference member {self.names[-1]!r} has no exact samples")
        return ref.sample_data(seeds, **kw)

    # Latency ------------------------------------------------------------------------------
    def set_latency(self, latency_ms: Sequence[float], info: Mapping[str, Any] | None = None
                    ) -> None:
        lat = [float(v) for v in latency_ms]
        if len(lat) != self.n_models:
            raise ValueError(f"{len(lat)} latencies for {self.n_models} zoo members")
        for i, v in enumerate(lat):
            if not (np.isfinite(v) and v > 0):
                raise ValueError(f"latency_ms[{i}] = {v!r}; latencies must be finite and > 0")
        self.latency_ms = lat
        self.latency_info = dict(info or {})

    def measure_latency(
        self,
        batch_size: int,
        warmup: int = LATENCY_WARMUP,
        repeats: int = LATENCY_REPEATS,
        sigma: float = LATENCY_SIGMA,
    ) -> list[float]:
        """Time each member: ms per sample of one call on ``batch_size`` rows (median of
        ``repeats`` after ``warmup`` calls), on its own device and dtype. Stores and returns
        the latencies (``latency_ms``; details in ``latency_info``)."""
        if batch_size < 1 or repeats < 1 or warmup < 0:
            raise ValueError(
                f"batch_size = {batch_size}, repeats = {repeats}, warmup = {warmup}; need "
                "batch_size >= 1, repeats >= 1, warmup >= 0"
            )
        gen = torch.Generator().manual_seed(0)
        x = torch.randn((batch_size, *self.shape), generator=gen, dtype=torch.float64)
        x = x.to(self.device, self.dtype) * float(np.hypot(1.0, sigma))
        s = torch.full((batch_size,), float(sigma), device=self.device, dtype=self.dtype)
        per_call: list[list[float]] = []
        for m in self.members:
            times = []
            with torch.no_grad():
                for i in range(warmup + repeats):
                    _sync(self.device)
                    t0 = time.perf_counter()
                    m(x, s)
                    _sync(self.device)
                    if i >= warmup:
                        times.append(time.perf_counter() - t0)
            per_call.append(times)
        lat = [1000.0 * statistics.median(t) / batch_size for t in per_call]
        self.set_latency(lat, {
            "batch_size": int(batch_size), "warmup": int(warmup), "repeats": int(repeats),
            "sigma": float(sigma), "device": str(self.device), "dtype": str(self.dtype),
            "call_s": [[float(v) for v in t] for t in per_call],
        })
        return lat

    def latency_report(self) -> dict[str, Any]:
        """Names, latencies (ms per sample per call) and how they were measured."""
        if self.latency_ms is None:
            raise ValueError("latency not measured yet; call measure_latency first")
        return {"members": list(self.names), "latency_ms": list(self.latency_ms),
                **self.latency_info}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def compose(
    names: Sequence[Any], device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> ComposedDenoiser:
    """Load the zoo members ``names`` (zoo names or specs) and compose them."""
    from searchd.models.zoo import as_spec, zoo

    members = zoo(names, device, dtype)
    labels = [str(as_spec(n).name) for n in names]
    return ComposedDenoiser(members, labels)
