"""A searched schedule in the forms the samplers people use take: diffusers, k-diffusion, ComfyUI.

searchd's schedules are EDM noise levels ``sigma`` (``x = x0 + sigma n``) and its solvers
start from ``noise * sigmas[0]``. Each form below reproduces that run in another sampler:

- **diffusers** (``diffusers_export``; ``diffusers_scheduler`` builds it): the scheduler
  class that runs the same update as the searched solver, the constructor arguments that make
  it do exactly searchd's steps, and the way in for the levels: the scheduler's public
  ``set_timesteps(sigmas=...)`` or ``(timesteps=...)`` where it takes them, else
  ``pin_schedule`` (a documented override, tested against the installed diffusers).
  Flow-matching models (SD3/Flux style) get the levels in flow time ``t = sigma / (1 +
  sigma)``, what ``FlowMatchEulerDiscreteScheduler`` takes.
- **k-diffusion** (``kdiffusion_export``): the sigma tensor for ``sample_*(model, x, sigmas)``.
- **ComfyUI / A1111** (``comfy_export``): the text the ``ManualSigmas`` node parses, the JSON
  list, and A1111's ``p.sampler_noise_scheduler_override`` line.

``usage_section`` builds ``best.json``'s ``usage`` from these; ``python -m searchd.export
RUN_OR_BEST_JSON --to diffusers|kdiffusion|comfy`` prints one of them.

Counterparts (docs/notes-export.md has the derivations and the measured differences):

======== ===================================== =========================================
solver   diffusers                             k-diffusion / ComfyUI sampler
======== ===================================== =========================================
euler    EulerDiscreteScheduler (flow: Flow-   sample_euler / euler
         MatchEulerDiscreteScheduler)
heun     HeunDiscreteScheduler                 sample_heun / heun
dpmpp_2m DPMSolverMultistepScheduler (order 2) sample_dpmpp_2m / dpmpp_2m
unipc    UniPCMultistepScheduler (bh2)         none / uni_pc_bh2 (not checked)
ipndm    LMSDiscreteScheduler, variable_step   sample_lms / lms (variable_step, order 4)
         only
dpmpp_3m none (a different third-order term)   none
deis     none (diffusers' DEIS integrates in   none
         log-rho with its own coefficients)
======== ===================================== =========================================
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from searchd.schedule import Schedule, validate_sigmas
from searchd.solvers import get as get_solver
from searchd.solvers.exponential import UNIPC_LOWER_ORDER_FINAL_BELOW

TARGETS = ("diffusers", "kdiffusion", "comfy")

# Scheduler classes by what their sample is: the EDM sample x (k-diffusion style), the
# variance-preserving sample x / sqrt(1 + sigma^2), or the flow sample x / (1 + sigma).
EDM_STATE = ("EulerDiscreteScheduler", "HeunDiscreteScheduler", "LMSDiscreteScheduler")
VP_STATE = ("DPMSolverMultistepScheduler", "UniPCMultistepScheduler")
FLOW_STATE = ("FlowMatchEulerDiscreteScheduler",)

# Arguments that switch off every built-in schedule family, so that nothing reshapes the levels.
_NO_FAMILIES = {"use_karras_sigmas": False, "use_exponential_sigmas": False,
                "use_beta_sigmas": False}
# A flow scheduler must take t as given: no shift, no dynamic (resolution) shift, no stretch.
_FLOW_AS_GIVEN = {"shift": 1.0, "use_dynamic_shifting": False, "shift_terminal": None,
                  "invert_sigmas": False, "stochastic_sampling": False, **_NO_FAMILIES}
_MULTISTEP_FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction",
                   "flow_shift": 1.0, "use_dynamic_shifting": False}


class ExportError(ValueError):
    """A schedule or solver that a target cannot run exactly (the message names the nearest)."""


# Levels ------------------------------------------------------------------------------------
def flow_time(sigmas: Sequence[float] | np.ndarray) -> np.ndarray:
    """Flow time ``t = sigma / (1 + sigma)`` of EDM levels (``x_t = (1 - t) x0 + t n``)."""
    s = np.asarray(sigmas, dtype=np.float64)
    return s / (1.0 + s)


def sigma_of_flow_time(t: Sequence[float] | np.ndarray) -> np.ndarray:
    """EDM levels ``sigma = t / (1 - t)`` of flow times t in [0, 1)."""
    t = np.asarray(t, dtype=np.float64)
    return t / (1.0 - t)


def grid_indices(sigmas: np.ndarray, sigma_grid: Sequence[float] | np.ndarray | None,
                 rtol: float = 1e-9) -> list[int] | None:
    """Indices into an ascending discrete grid of the positive levels, or None if any level
    is off the grid (a level within ``rtol`` of a grid point is on it)."""
    if sigma_grid is None:
        return None
    grid = np.asarray(sigma_grid, dtype=np.float64)
    out = []
    for s in sigmas[sigmas > 0]:
        k = int(np.argmin(np.abs(np.log(grid) - math.log(s))))
        if abs(grid[k] - s) > rtol * s:
            return None
        out.append(k)
    return out


def _fmt(x: float) -> str:
    """A float as Python source that reads back exactly (``repr``)."""
    return repr(float(x))


def _fmt_list(xs: Sequence[float]) -> str:
    return "[" + ", ".join(_fmt(x) for x in xs) + "]"


def _fmt_value(v: Any) -> str:
    if isinstance(v, float):
        return _fmt(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_fmt_value(x) for x in v) + "]"
    return repr(v)


# diffusers ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class DiffusersExport:
    """How to run a searched schedule with a diffusers scheduler.

    Attributes:
        solver: the searchd solver this reproduces.
        scheduler: the diffusers scheduler class name.
        arguments: keyword arguments for ``scheduler.from_config(config, **arguments)``: they
            fix the update rule and switch off whatever would reshape the levels (a model's
            ``prediction_type``, betas and ``variance_type`` stay those of its config).
        sigmas: the levels the scheduler steps through, N+1 values, in its own units: EDM
            sigma, or flow time t for flow models (``flow``); the last is 0 or the level at
            which the sample is taken as it stands.
        flow: the model is a flow-matching model (levels in t).
        route: how the levels get in: ``"sigmas"`` (public ``set_timesteps(sigmas=...)``, i.e.
            ``pipe(..., sigmas=...)``), ``"timesteps"`` (public ``timesteps=``, integer grid
            timesteps of a discrete model) or ``"pinned"`` (``pin_schedule``).
        timesteps: the integer grid timesteps (route ``"timesteps"``), else None.
        init_noise_sigma: searchd's start in the scheduler's space: latents are unit noise
            times this (sigma_0; sigma_0 / sqrt(1 + sigma_0^2) for VP schedulers; t_0 for flow).
        output_scale: the scheduler's final sample times this is searchd's sample (1 unless
            the schedule ends above 0 and the scheduler holds a VP or flow sample).
        step_kwargs: keywords for ``scheduler.step`` (LMS: ``order``); ``pin_schedule`` makes
            them the defaults.
        guidance_scale: a guided schedule's one constant weight, for the pipeline's
            ``guidance_scale`` (None: the schedule has no weights).
    """

    solver: str
    scheduler: str
    arguments: dict[str, Any]
    sigmas: tuple[float, ...]
    flow: bool
    route: str
    timesteps: tuple[int, ...] | None
    init_noise_sigma: float
    output_scale: float
    step_kwargs: dict[str, Any] = field(default_factory=dict)
    guidance_scale: float | None = None

    @property
    def n_steps(self) -> int:
        return len(self.sigmas) - 1

    def pipeline_kwargs(self) -> dict[str, Any]:
        """What a diffusers pipeline call takes to run these levels (with this scheduler)."""
        g = {} if self.guidance_scale is None else {"guidance_scale": self.guidance_scale}
        if self.route == "timesteps":
            return {"timesteps": list(self.timesteps or ()), **g}
        if self.route == "sigmas":
            # FlowMatch schedulers append the final 0 themselves; Euler takes it in the list.
            levels = self.sigmas[:-1] if self.flow else self.sigmas
            return {"sigmas": list(levels), **g}
        return {"num_inference_steps": self.n_steps, **g}

    def make_scheduler(self, config: Mapping[str, Any] | None = None) -> Any:
        """The configured scheduler, built from a model's scheduler ``config`` (e.g.
        ``pipe.scheduler.config``; default: the class defaults), ready to run: a pinned one
        for the ``"pinned"`` route, else a plain diffusers scheduler (then pass
        ``pipeline_kwargs()`` to ``set_timesteps`` or to the pipeline)."""
        diffusers = _diffusers()
        cls = getattr(diffusers, self.scheduler)
        sched = cls.from_config(dict(config or {}), **self.arguments)
        if self.route == "pinned":
            return pin_schedule(sched, self.sigmas, **self.step_kwargs)
        if self.route == "timesteps" and self.scheduler in VP_STATE:
            sched.init_noise_sigma = self.init_noise_sigma
        return sched

    def code(self) -> str:
        """Python that sets ``pipe.scheduler`` for this schedule and defines
        ``pipeline_kwargs`` for the pipeline call; it runs as written (``pipe`` is the
        user's pipeline)."""
        args = "".join(f"    {k}={_fmt_value(v)},\n" for k, v in self.arguments.items())
        build = (f"diffusers.{self.scheduler}.from_config(\n    pipe.scheduler.config,\n{args})")
        lines = ["import diffusers"]
        if self.route == "pinned":
            lines.append("from searchd.export import pin_schedule")
        lines.append("")
        lines.append(f"# searchd {self.solver}, {self.n_steps} steps, levels in "
                     f"{'flow time t' if self.flow else 'EDM sigma'}; diffusers "
                     f"{_diffusers_version()}")
        if self.route == "pinned":
            extra = "".join(f", {k}={_fmt_value(v)}" for k, v in self.step_kwargs.items())
            lines.append(f"scheduler = {build}")
            lines.append(f"pipe.scheduler = pin_schedule(scheduler, {_fmt_list(self.sigmas)}"
                         f"{extra})")
        else:
            lines.append(f"pipe.scheduler = {build}")
            if self.route == "timesteps" and self.scheduler in VP_STATE:
                lines.append(f"pipe.scheduler.init_noise_sigma = {_fmt(self.init_noise_sigma)}"
                             "  # searchd's start: noise * sigma_0 / sqrt(1 + sigma_0**2)")
        kw = ", ".join(f"{k!r}: {_fmt_value(v)}" for k, v in self.pipeline_kwargs().items())
        lines.append(f"pipeline_kwargs = {{{kw}}}")
        lines.append("# images = pipe(prompt, **pipeline_kwargs).images")
        if self.flow:
            lines.append(f"# Start from latents = randn(...) * {_fmt(self.init_noise_sigma)} "
                         "(t_0; flow pipelines take latents= as given).")
        else:
            lines.append(f"# Pipelines start from randn(...) * pipe.scheduler.init_noise_sigma"
                         f" = {_fmt(self.init_noise_sigma)}, searchd's start.")
        if self.output_scale != 1.0:
            lines.append(f"# The schedule ends above 0: the final latents times "
                         f"{_fmt(self.output_scale)} are searchd's sample.")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """Plain data for ``best.json`` (full-precision floats)."""
        return {
            "scheduler": self.scheduler,
            "arguments": dict(self.arguments),
            "sigmas": [float(x) for x in self.sigmas],
            "levels": "flow time t" if self.flow else "sigma",
            "route": self.route,
            "timesteps": None if self.timesteps is None else list(self.timesteps),
            "pipeline_kwargs": self.pipeline_kwargs(),
            "init_noise_sigma": float(self.init_noise_sigma),
            "output_scale": float(self.output_scale),
            "step_kwargs": dict(self.step_kwargs),
            "code": self.code(),
        }


def diffusers_export(
    sigmas: Sequence[float] | np.ndarray,
    solver: str = "dpmpp_2m",
    options: Mapping[str, Any] | None = None,
    *,
    flow: bool = False,
    sigma_grid: Sequence[float] | np.ndarray | None = None,
) -> DiffusersExport:
    """The diffusers scheduler that runs ``solver`` on ``sigmas`` exactly as searchd does.

    Args:
        sigmas: EDM levels [N+1], strictly decreasing, ending in 0 or not.
        solver: a searchd solver name; ``options`` its options (defaults filled in).
        flow: the model is a flow-matching model (the levels are exported in t).
        sigma_grid: the ascending training grid of a discrete-time model; when every
            positive level lies on it, schedulers that take ``timesteps=`` get grid timesteps.

    Raises:
        ExportError: the solver (or this combination) has no exact diffusers counterpart;
            the message names the nearest one.
    """
    sig = validate_sigmas(sigmas)
    opts = get_solver(solver).resolve(dict(options or {}))
    n, final_zero = sig.size - 1, bool(sig[-1] == 0.0)
    ending = {"final_sigmas_type": "zero" if final_zero else "sigma_min"}
    idx = None if flow else grid_indices(sig, sigma_grid)
    # Schedulers with timesteps= make the last level 0 or the grid's lowest (sigma_min).
    grid_ok = idx is not None and (final_zero or idx[-1] == 0)
    step_kwargs: dict[str, Any] = {}

    if solver == "euler":
        if flow:
            name, args = "FlowMatchEulerDiscreteScheduler", dict(_FLOW_AS_GIVEN)
            route = "sigmas" if final_zero else "pinned"
        else:
            name = "EulerDiscreteScheduler"
            # trailing spacing makes init_noise_sigma = sigma_0 (linspace would too; leading,
            # SD's default, would make it sqrt(sigma_0^2 + 1)).
            args = {"timestep_spacing": "trailing", "interpolation_type": "linear",
                    "timestep_type": "discrete", **_NO_FAMILIES, **ending}
            route = "timesteps" if grid_ok else "sigmas"
    elif solver == "heun":
        if flow:
            raise ExportError(
                "heun on a flow model has no exact diffusers counterpart: "
                "FlowMatchHeunDiscreteScheduler averages the slopes in flow time t, searchd "
                "in sigma, and the two differ; the nearest is FlowMatchHeunDiscreteScheduler, "
                "or search with euler, dpmpp_2m or unipc to export exactly")
        name = "HeunDiscreteScheduler"
        args = {"timestep_spacing": "trailing", "clip_sample": False, **_NO_FAMILIES}
        # Heun's timesteps= always appends a final 0.
        route = "timesteps" if (idx is not None and final_zero) else "pinned"
    elif solver == "dpmpp_2m":
        name = "DPMSolverMultistepScheduler"
        args = {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint",
                "lower_order_final": False, "euler_at_final": False, "thresholding": False,
                "use_lu_lambdas": False, **_NO_FAMILIES, **ending}
        args.update(_MULTISTEP_FLOW if flow else {"use_flow_sigmas": False})
        route = "timesteps" if grid_ok else "pinned"
    elif solver == "unipc":
        order = int(opts["order"])
        lowers = bool(opts["lower_order_final"]) and n < UNIPC_LOWER_ORDER_FINAL_BELOW
        if final_zero and not lowers and order >= 3 and n >= 3:
            # diffusers must lower the last step onto 0 (an order-2+ step there divides by
            # an infinite log-SNR step), and its rule then lowers step N-2 too.
            raise ExportError(
                f"unipc order={order} on {n} steps ending in 0 without searchd's "
                "lower_order_final has no exact diffusers counterpart: "
                "UniPCMultistepScheduler(lower_order_final=True) lowers the order of its last "
                f"two steps; the nearest is that scheduler (or unipc with fewer than "
                f"{UNIPC_LOWER_ORDER_FINAL_BELOW} steps, or order 2)")
        name = "UniPCMultistepScheduler"
        args = {"solver_order": order, "solver_type": "bh2", "predict_x0": True,
                "lower_order_final": bool(lowers or final_zero), "disable_corrector": [],
                "thresholding": False, **_NO_FAMILIES, **ending}
        args.update(_MULTISTEP_FLOW if flow else {"use_flow_sigmas": False})
        route = "pinned"
    elif solver == "ipndm":
        if flow:
            raise ExportError(
                "ipndm on a flow model has no exact diffusers counterpart: "
                "LMSDiscreteScheduler (ipndm with variable_step=True) feeds the network "
                "variance-preserving inputs; the nearest is FlowMatchEulerDiscreteScheduler, or "
                "search with euler, dpmpp_2m or unipc to export exactly")
        if not opts["variable_step"]:
            raise ExportError(
                "ipndm with fixed equal-step Adams-Bashforth coefficients has no exact "
                "diffusers counterpart; the nearest is LMSDiscreteScheduler, which is ipndm "
                "with variable_step=True (search with --set solver.options.variable_step=true "
                "to export exactly)")
        name = "LMSDiscreteScheduler"
        args = {"timestep_spacing": "trailing", **_NO_FAMILIES}
        route = "pinned"
        step_kwargs = {"order": int(opts["order"])}
    elif solver == "dpmpp_3m":
        raise ExportError(
            "dpmpp_3m has no exact diffusers counterpart: "
            "DPMSolverMultistepScheduler(solver_order=3) uses DPM-Solver's third-order term, "
            "half of the quadratic term searchd integrates (docs/notes-solvers.md); that "
            "scheduler is the nearest, or search with dpmpp_2m or unipc to export exactly")
    elif solver == "deis":
        raise ExportError(
            "deis has no exact diffusers counterpart: DEISMultistepScheduler extrapolates in "
            "log-rho with its own coefficients, searchd's deis in VP time; the nearest is "
            "DEISMultistepScheduler(solver_order=3), or search with unipc or dpmpp_2m to "
            "export exactly")
    else:  # pragma: no cover - get_solver refused unknown names already
        raise ExportError(f"solver {solver!r} has no diffusers counterpart")

    levels = flow_time(sig) if flow else sig
    if flow:
        start, out_scale = float(levels[0]), 1.0 / (1.0 - float(levels[-1]))
    elif name in VP_STATE:
        start = float(sig[0] / math.sqrt(1.0 + sig[0] ** 2))
        out_scale = math.sqrt(1.0 + float(sig[-1]) ** 2)
    else:
        start, out_scale = float(sig[0]), 1.0
    return DiffusersExport(
        solver=solver, scheduler=name, arguments=args,
        sigmas=tuple(float(x) for x in levels), flow=flow, route=route,
        timesteps=tuple(idx[:n]) if route == "timesteps" and idx is not None else None,
        init_noise_sigma=start, output_scale=out_scale, step_kwargs=step_kwargs,
    )


def diffusers_scheduler(
    sigmas: Sequence[float] | np.ndarray,
    solver: str = "dpmpp_2m",
    options: Mapping[str, Any] | None = None,
    *,
    config: Mapping[str, Any] | None = None,
    flow: bool = False,
) -> Any:
    """A diffusers scheduler that runs ``solver`` on ``sigmas`` exactly as searchd does, in a
    loop or a pipeline, whatever its class's ``set_timesteps`` accepts: the class and
    arguments of ``diffusers_export``, built from the model's scheduler ``config`` (e.g.
    ``pipe.scheduler.config``), with the levels pinned (``pin_schedule``). Call
    ``set_timesteps()`` (or ``set_timesteps(N)``), start from ``noise *
    init_noise_sigma``, and multiply the result by ``diffusers_export(...).output_scale``
    (1 unless the schedule ends above 0 on a VP or flow scheduler)."""
    form = diffusers_export(sigmas, solver, options, flow=flow)
    sched = getattr(_diffusers(), form.scheduler).from_config(dict(config or {}),
                                                              **form.arguments)
    return pin_schedule(sched, form.sigmas, **form.step_kwargs)


def _diffusers() -> Any:
    try:
        import diffusers
    except ImportError as e:  # pragma: no cover - depends on the installation
        raise ImportError(
            "the diffusers export needs diffusers: pip install 'searchd[diffusers]'") from e
    return diffusers


def _diffusers_version() -> str:
    try:
        return str(_diffusers().__version__)
    except ImportError:  # pragma: no cover - depends on the installation
        return "(not installed)"


# Pinned schedules --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Pin:
    """A pinned schedule: the scheduler's levels [N+1] (float64), the model timesteps [N]
    searchd's adapter feeds at them, the start scale, and ``step`` defaults."""

    levels: np.ndarray
    timesteps: np.ndarray
    start: float
    step_defaults: dict[str, Any]

    @property
    def n_steps(self) -> int:
        return int(self.levels.size - 1)


PINNABLE = (*EDM_STATE, *VP_STATE, *FLOW_STATE)
_PINNED_CLASSES: dict[type, type] = {}


def _is_flow_scheduler(scheduler: Any) -> bool:
    return type(scheduler).__name__ in FLOW_STATE or bool(
        getattr(scheduler.config, "use_flow_sigmas", False))


def model_timesteps(scheduler: Any, levels: np.ndarray) -> np.ndarray:
    """The timesteps [N] the network gets at the scheduler's levels [N+1] (float32), the
    same values searchd's diffusers adapter feeds it at those noise levels: flow models
    ``num_train_timesteps * t``; VP models the fractional index of ``sigma`` on the training
    grid (log-sigma interpolation over float64 ``alphas_cumprod``)."""
    import torch

    from searchd.models.diffusers import parameterization_from_scheduler
    from searchd.models.generic import Flow

    config = dict(scheduler.config)
    config["_class_name"] = type(scheduler).__name__
    if _is_flow_scheduler(scheduler):
        sig = sigma_of_flow_time(levels[:-1])
        param: Any = Flow(time_scale=float(config.get("num_train_timesteps", 1000)))
    else:
        sig = np.asarray(levels[:-1], dtype=np.float64)
        param = parameterization_from_scheduler(config)
    # As searchd feeds it: the level in float32, its model time in float32.
    t = param.model_time(torch.tensor(sig, dtype=torch.float32))
    return t.numpy().astype(np.float32)


def pin_schedule(scheduler: Any, sigmas: Sequence[float] | np.ndarray, **step_defaults: Any
                 ) -> Any:
    """Make ``scheduler`` run exactly the levels ``sigmas``, in a pipeline or in a loop.

    For schedulers whose public ``set_timesteps`` takes no custom levels (DPMSolverMultistep,
    UniPCMultistep, Heun, LMS; a flow schedule ending above 0), this is the way in. The
    returned scheduler (same class name and config, a subclass of the given one) answers
    ``set_timesteps(...)`` by running the class's own ``set_timesteps(N)`` (which resets its
    multistep state) and then setting its ``sigmas`` and ``timesteps`` (Heun: each inner
    level twice, as diffusers lays them out, one more model call at a final level above
    0). Its ``init_noise_sigma`` is searchd's start, so pipelines that start from ``randn *
    init_noise_sigma`` start where searchd does. ``step_defaults`` become the defaults of
    ``step`` (LMS: ``order``). Checked against diffusers 0.42 in tests/test_export.py.

    Args:
        scheduler: a diffusers scheduler of a class in ``PINNABLE``, configured (e.g. by
            ``DiffusersExport.arguments``).
        sigmas: the levels [N+1] in the scheduler's units (EDM sigma; flow time t for flow
            schedulers), ending in 0 or not.

    Returns:
        The pinned scheduler. ``set_timesteps`` then accepts ``num_inference_steps`` None or
        N, and ``sigmas``/``timesteps`` only equal to the pinned ones.
    """
    name = type(scheduler).__name__
    base = type(scheduler)
    if base in _PINNED_CLASSES.values():
        base = base.__mro__[1]
        name = base.__name__
    if name not in PINNABLE:
        raise ExportError(f"pin_schedule: scheduler {name} is not supported; supported: "
                          f"{', '.join(PINNABLE)}")
    levels = validate_sigmas(sigmas)
    if _is_flow_scheduler(scheduler) and not levels[0] < 1.0:
        raise ExportError(f"pin_schedule: flow levels must lie in [0, 1); got t_0 = "
                          f"{float(levels[0])!r}")
    if name in VP_STATE and not _is_flow_scheduler(scheduler):
        start = float(levels[0] / math.sqrt(1.0 + levels[0] ** 2))
    else:
        start = float(levels[0])
    pin = _Pin(np.array(levels, dtype=np.float64), model_timesteps(scheduler, levels), start,
               dict(step_defaults))
    cls = _pinned_class(base)
    pinned = cls.from_config(scheduler.config)
    pinned._searchd_pin = pin
    pinned.set_timesteps()
    return pinned


def _pinned_class(base: type) -> type:
    """The subclass of ``base`` that runs a pinned schedule (one per diffusers class)."""
    if base in _PINNED_CLASSES:
        return _PINNED_CLASSES[base]
    import torch

    heun = base.__name__ == "HeunDiscreteScheduler"

    class Pinned(base):  # type: ignore[valid-type, misc]
        _searchd_pin: _Pin | None = None

        @property
        def init_noise_sigma(self) -> Any:
            if self._searchd_pin is not None:
                return self._searchd_pin.start
            if "_searchd_init_noise_sigma" in self.__dict__:
                return self.__dict__["_searchd_init_noise_sigma"]
            return super().init_noise_sigma

        @init_noise_sigma.setter
        def init_noise_sigma(self, value: Any) -> None:
            # Some classes set it in __init__; the pinned start wins once pinned.
            self.__dict__["_searchd_init_noise_sigma"] = value

        def set_timesteps(self, num_inference_steps: int | None = None,
                          device: Any = None, *args: Any, timesteps: Any = None,
                          sigmas: Any = None, **kwargs: Any) -> None:
            pin = self._searchd_pin
            if pin is None:
                more = {k: v for k, v in (("timesteps", timesteps), ("sigmas", sigmas))
                        if v is not None}
                return super().set_timesteps(num_inference_steps, device, *args,
                                             **more, **kwargs)
            n = pin.n_steps
            if num_inference_steps is not None and int(num_inference_steps) != n:
                raise ValueError(
                    f"this scheduler runs searchd's pinned schedule of {n} steps; got "
                    f"num_inference_steps={num_inference_steps} (pass {n} or nothing)")
            if timesteps is not None:
                raise ValueError("this scheduler runs searchd's pinned schedule; custom "
                                 "timesteps cannot be set (pass num_inference_steps or nothing)")
            if sigmas is not None and not _same_levels(sigmas, pin.levels):
                raise ValueError("this scheduler runs searchd's pinned schedule; the sigmas "
                                 "passed differ from the pinned ones")
            # The class's own reset of its multistep state (model outputs, counters, ...).
            base.set_timesteps(self, n, device=device)
            levels = torch.as_tensor(pin.levels, dtype=torch.float32)
            steps = torch.as_tensor(pin.timesteps, dtype=torch.float32)
            if heun:
                # Heun's layout: every inner level twice (Euler step, then its correction);
                # a final level above 0 gets its correction too (one more model call).
                inner = levels[1:-1].repeat_interleave(2)
                if bool(levels[-1] > 0):
                    levels = torch.cat([levels[:1], inner, levels[-1:].repeat(2)])
                    steps = torch.cat([steps[:1], steps[1:].repeat_interleave(2),
                                       _last_time(self, pin)])
                else:
                    levels = torch.cat([levels[:1], inner, levels[-1:]])
                    steps = torch.cat([steps[:1], steps[1:].repeat_interleave(2)])
            self.sigmas = levels
            self.timesteps = steps.to(device=device)
            self.num_inference_steps = n

        def step(self, *args: Any, **kwargs: Any) -> Any:
            pin = self._searchd_pin
            if pin is not None:
                for k, v in pin.step_defaults.items():
                    kwargs.setdefault(k, v)
            return super().step(*args, **kwargs)

        def __reduce__(self) -> tuple[Any, ...]:
            # Pickled as "pin these levels into this diffusers class and config" (the class
            # itself is made at run time); the sampling state is not kept.
            pin = self._searchd_pin
            if pin is None:
                return (base.from_config, (dict(self.config),))
            return (_repin, (base, dict(self.config), pin.levels.tolist(), pin.step_defaults))

    Pinned.__name__ = base.__name__
    Pinned.__qualname__ = base.__qualname__
    Pinned.__doc__ = f"{base.__name__} running a schedule pinned by searchd.export.pin_schedule."
    _PINNED_CLASSES[base] = Pinned
    return Pinned


def _repin(base: type, config: dict[str, Any], levels: list[float],
           step_defaults: dict[str, Any]) -> Any:
    """Unpickle a pinned scheduler."""
    return pin_schedule(base.from_config(config), levels, **step_defaults)


def _last_time(scheduler: Any, pin: _Pin) -> Any:
    """The model time [1] at the final level (a Heun correction there)."""
    import torch

    t = model_timesteps(scheduler, np.array([pin.levels[-1], 0.0]))
    return torch.as_tensor(t, dtype=torch.float32)


def _same_levels(given: Any, levels: np.ndarray) -> bool:
    g = np.asarray(given.cpu() if hasattr(given, "cpu") else given, dtype=np.float64)
    for want in (levels, levels[:-1]):
        if g.shape == want.shape and np.allclose(g, want, rtol=1e-6, atol=1e-9):
            return True
    return False


# k-diffusion -------------------------------------------------------------------------------
KDIFFUSION_SAMPLERS = {"euler": "sample_euler", "heun": "sample_heun",
                       "dpmpp_2m": "sample_dpmpp_2m"}


@dataclass(frozen=True)
class KDiffusionExport:
    """The schedule as k-diffusion's samplers take it: ``sample_x(model, x, sigmas)``.

    Attributes:
        sigmas: the levels [N+1] (EDM sigma; flow time t for flow models, as ComfyUI's flow
            models take them), ending in 0 (the last step denoises) or not.
        sampler: the ``k_diffusion.sampling`` function that runs the searched solver
            exactly, or None.
        sampler_kwargs: its extra keywords (``sample_lms``: ``order``).
        note: what is exact and what is not.
    """

    solver: str
    sigmas: tuple[float, ...]
    sampler: str | None
    sampler_kwargs: dict[str, Any]
    note: str

    def code(self) -> str:
        """Python that runs the sampler (``model``: a k-diffusion denoiser; ``noise``: unit
        Gaussian noise [B, ...])."""
        lines = ["import torch"]
        if self.sampler is not None:
            lines.append(f"from k_diffusion.sampling import {self.sampler}")
        lines += ["", f"sigmas = torch.tensor({_fmt_list(self.sigmas)}, dtype=torch.float64)",
                  "# model: a k-diffusion denoiser model(x, sigma) -> x0, e.g. "
                  "k_diffusion.external.CompVisDenoiser(ldm)",
                  "# noise: unit Gaussian [B, C, H, W]; searchd starts from noise * sigmas[0]"]
        if self.sampler is not None:
            extra = "".join(f", {k}={_fmt_value(v)}" for k, v in self.sampler_kwargs.items())
            lines.append(f"samples = {self.sampler}(model, noise * sigmas[0].to(noise.dtype), "
                         f"sigmas.to(noise.dtype){extra})")
        else:
            lines.append(f"# {self.note}")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        return {"sigmas": [float(x) for x in self.sigmas], "sampler": self.sampler,
                "sampler_kwargs": dict(self.sampler_kwargs), "note": self.note,
                "code": self.code()}


def kdiffusion_export(sigmas: Sequence[float] | np.ndarray, solver: str = "dpmpp_2m",
                      options: Mapping[str, Any] | None = None, *, flow: bool = False
                      ) -> KDiffusionExport:
    """The k-diffusion form of a schedule (the sigma tensor, and the sampler that matches)."""
    sig = validate_sigmas(sigmas)
    opts = get_solver(solver).resolve(dict(options or {}))
    levels = flow_time(sig) if flow else sig
    sampler: str | None = KDIFFUSION_SAMPLERS.get(solver)
    kwargs: dict[str, Any] = {}
    if solver == "ipndm" and opts["variable_step"]:
        sampler, kwargs = "sample_lms", {"order": int(opts["order"])}
    if flow and solver != "euler":
        sampler = None
        note = (f"{solver} on a flow model: k-diffusion-style samplers step the flow sample in "
                "t, which only Euler does exactly as searchd; the levels are exact")
    elif sampler is None:
        note = {
            "dpmpp_3m": "k-diffusion's sample_dpmpp_3m_sde(eta=0) uses a different "
                        "third-order term (docs/notes-solvers.md): no exact sampler",
            "unipc": "k-diffusion has no UniPC sampler (ComfyUI's uni_pc_bh2 is the nearest, "
                     "not checked here)",
            "ipndm": "k-diffusion has no fixed-coefficient iPNDM (sample_lms is ipndm with "
                     "variable_step=True)",
            "deis": "k-diffusion has no DEIS sampler (ComfyUI's deis is the nearest, not "
                    "checked here)",
        }.get(solver, f"no k-diffusion sampler runs {solver}")
    else:
        note = f"{sampler} runs searchd's {solver} on these levels"
    return KDiffusionExport(solver, tuple(float(x) for x in levels), sampler, kwargs, note)


# ComfyUI and A1111 -------------------------------------------------------------------------
COMFY_SAMPLERS = {"euler": "euler", "heun": "heun", "dpmpp_2m": "dpmpp_2m", "unipc": "uni_pc_bh2",
                  "dpmpp_3m": "dpmpp_3m_sde", "deis": "deis"}


def comfy_number(x: float) -> str:
    """A float in positional notation that reads back exactly (ComfyUI's ManualSigmas reads
    numbers with ``[-+]?(?:\\d*\\.*\\d+)``, which has no exponent)."""
    return np.format_float_positional(float(x), unique=True, trim="-")


@dataclass(frozen=True)
class ComfyExport:
    """The schedule for ComfyUI's and A1111's custom-sigma inputs.

    ``text`` goes into ComfyUI's core ``ManualSigmas`` node (experimental/custom_sampling),
    whose SIGMAS output feeds the ``sigmas`` input of ``SamplerCustom`` or
    ``SamplerCustomAdvanced``, with the sampler chosen by ``KSamplerSelect`` (``sampler``).
    ``a1111`` is the line for an A1111/Forge script's ``process(self, p)``: the web UI's
    k-diffusion samplers then use these levels (``steps`` must be N).
    """

    solver: str
    sigmas: tuple[float, ...]
    sampler: str | None
    exact: bool
    note: str

    @property
    def text(self) -> str:
        return ", ".join(comfy_number(x) for x in self.sigmas)

    @property
    def workflow_node(self) -> dict[str, Any]:
        """The node in ComfyUI's API (prompt) JSON format."""
        return {"class_type": "ManualSigmas", "inputs": {"sigmas": self.text}}

    @property
    def a1111(self) -> str:
        return ("p.sampler_noise_scheduler_override = lambda steps: torch.tensor("
                f"{_fmt_list(self.sigmas)})")

    def to_dict(self) -> dict[str, Any]:
        return {"node": "ManualSigmas", "text": self.text,
                "json": [float(x) for x in self.sigmas], "workflow_node": self.workflow_node,
                "sampler": self.sampler, "exact_sampler": self.exact, "a1111": self.a1111,
                "note": self.note}


def comfy_export(sigmas: Sequence[float] | np.ndarray, solver: str = "dpmpp_2m",
                 options: Mapping[str, Any] | None = None, *, flow: bool = False
                 ) -> ComfyExport:
    """The ComfyUI / A1111 form of a schedule (levels in t for flow models)."""
    sig = validate_sigmas(sigmas)
    opts = get_solver(solver).resolve(dict(options or {}))
    levels = flow_time(sig) if flow else sig
    sampler = COMFY_SAMPLERS.get(solver)
    if solver == "ipndm":
        sampler = "ipndm_v" if opts["variable_step"] else "ipndm"
        if opts["variable_step"] and opts["order"] == 4:
            sampler = "lms"
    exact = solver in ("euler", "heun", "dpmpp_2m") or sampler == "lms"
    if flow and solver != "euler":
        exact = False
    note = ("ComfyUI runs k-diffusion's samplers: "
            + (f"{sampler} is searchd's {solver}" if exact else
               f"{sampler} is the nearest to searchd's {solver}, not checked to be the same")
            + ". ComfyUI starts from noise * sqrt(1 + sigma_0^2) when sigma_0 is the model's "
              "highest level (EPS/V models), searchd from noise * sigma_0: the levels are "
              "the same, the start differs by that factor.")
    return ComfyExport(solver, tuple(float(x) for x in levels), sampler, exact, note)


# best.json -----------------------------------------------------------------------------------
def usage_section(
    schedule: Schedule,
    solver_options: Mapping[str, Any] | None = None,
    *,
    flow: bool = False,
    sigma_grid: Sequence[float] | np.ndarray | None = None,
) -> dict[str, Any]:
    """``best.json``'s ``usage``: the schedule in every form, each usable as written.

    Keys: ``sigmas`` (full precision, with the final 0 if any), ``solver`` and
    ``solver_options``, ``flow`` (levels exported in t), ``t`` (flow models only: the
    levels in flow time ``t = sigma / (1 + sigma)``), ``discrete`` (all levels on the
    model's grid), ``diffusers`` (``DiffusersExport.to_dict()``, or ``{"error": ...}``
    naming the nearest counterpart), ``kdiffusion``, ``comfy``, and ``searchd`` (the lines
    that sample it with searchd itself).
    """
    options = dict(solver_options or {})
    sig = [float(x) for x in schedule.sigmas]
    out: dict[str, Any] = {
        "sigmas": sig,
        "solver": schedule.solver,
        "solver_options": options,
        "flow": bool(flow),
        "discrete": grid_indices(schedule.sigmas, sigma_grid) is not None,
    }
    if flow:  # the levels in flow time, with the final 0: what flow users set (issue 20)
        out["t"] = [float(x) for x in flow_time(schedule.sigmas)]
    scale, refusal = guidance_scale(schedule.guidance)
    if schedule.guidance is not None:
        out["guidance"] = [float(w) for w in schedule.guidance]
    strategy = schedule.strategy
    if strategy is not None:
        # A per-step strategy (searchd.solvers.strategy): no scheduler of these tools changes
        # its multistep order or corrector step by step as the strategy does.
        why = (f"a per-step solver strategy ({schedule.solver} steps {','.join(strategy)}) "
               "has no {tool} counterpart: its schedulers fix the multistep order for every "
               "step; sample it with searchd (python -m searchd.sample --schedule best.json)")
        out["diffusers"] = {"error": why.format(tool="diffusers")}
        out["kdiffusion"] = {"error": why.format(tool="k-diffusion")}
        out["comfy"] = {"error": why.format(tool="ComfyUI")}
    elif schedule.model_ids is not None:
        out["diffusers"] = {"error": "a model schedule switches networks per step; diffusers "
                                     "schedulers drive one network (the levels are exported "
                                     "below)"}
    elif refusal is not None:
        out["diffusers"] = {"error": refusal}
    else:
        try:
            exp = diffusers_export(schedule.sigmas, schedule.solver, options, flow=flow,
                                   sigma_grid=sigma_grid)
            if scale is not None:
                exp = replace(exp, guidance_scale=scale)
            out["diffusers"] = exp.to_dict()
        except ExportError as e:
            out["diffusers"] = {"error": str(e)}
    if strategy is None:
        out["kdiffusion"] = kdiffusion_export(schedule.sigmas, schedule.solver, options,
                                              flow=flow).to_dict()
        out["comfy"] = comfy_export(schedule.sigmas, schedule.solver, options,
                                    flow=flow).to_dict()
        if schedule.guidance is not None:
            say = (f"guidance: the sampler's CFG scale (cond_scale / cfg) = {_fmt(scale)}"
                   if scale is not None else
                   "guidance: these levels only; the per-step weights are not part of this "
                   "form (its CFG wrappers take one scale): run them with searchd")
            for key in ("kdiffusion", "comfy"):
                out[key]["note"] = f"{out[key]['note']}; {say}"
    extra = "" if strategy is None else f", strategy={list(strategy)!r}"
    g = "" if schedule.guidance is None else f", guidance={_fmt_list(schedule.guidance)}"
    out["searchd"] = {
        "code": ("from searchd.solvers import solve\n"
                 + ("" if not g else "# cond={'sample_index': seeds} gives sample i the class "
                    "(or prompt) seeds[i] mod C\n")
                 + f"x = solve(denoiser, noise, {_fmt_list(sig)}, solver={schedule.solver!r}"
                 + extra + g
                 + "".join(f", {k}={_fmt_value(v)}" for k, v in options.items()) + ")\n"),
        "command": "python -m searchd.sample --schedule best.json",
    }
    return out


def guidance_scale(weights: Sequence[float] | np.ndarray | None
                   ) -> tuple[float | None, str | None]:
    """A guided schedule's diffusers ``guidance_scale``, or why there is none.

    diffusers pipelines take one ``guidance_scale`` for every step and run the
    unconditional branch only when it is above 1, so a schedule whose weights are one
    constant w > 1 (or all 1: no guidance) is exact as ``guidance_scale = w``; per-step
    weights, or a constant in [0, 1), are refused with the reason. Returns (scale, None),
    (None, reason), or (None, None) without weights.
    """
    if weights is None:
        return None, None
    w = np.asarray(weights, dtype=np.float64)
    if np.all(w == w[0]):
        if w[0] == 1.0 or w[0] > 1.0:
            return float(w[0]), None
        return None, (f"constant guidance w = {_fmt(w[0])} below 1 has no diffusers pipeline "
                      "form: pipelines guide only when guidance_scale > 1; run it with "
                      "python -m searchd.sample --schedule best.json")
    return None, ("per-step guidance weights have no diffusers pipeline form: a pipeline "
                  "takes one guidance_scale for every step; run the schedule with python -m "
                  "searchd.sample --schedule best.json or searchd.solvers.solve(..., "
                  "guidance=...) (the levels alone are in the kdiffusion and comfy forms)")


# What a run's model is, without loading it ----------------------------------------------------
def model_levels(model: Any) -> str:
    """``"flow"`` if the configured model is a flow-matching model, else ``"sigma"``.

    Reads the model's description files only (no weights): the ``searchd.json`` or the
    scheduler config of a diffusers directory (a checkpoint path, or a zoo member shipped
    as one in ``searchd/models/data/``), or the ``parameterization`` option. ``model`` is a
    ``ModelConfig``-like object or mapping (``name``, ``spec``, ``zoo``).
    """
    get = (model.get if isinstance(model, Mapping)
           else lambda k, d=None: getattr(model, k, d))
    spec = get("spec")
    zoo = get("zoo")
    if zoo:
        return _levels_of_name(str(zoo[-1]))
    if spec is None:
        name = get("name")
        return _levels_of_name(str(name)) if name else "sigma"
    sget = (spec.get if isinstance(spec, Mapping) else lambda k, d=None: getattr(spec, k, d))
    options = dict(sget("options") or {})
    if "parameterization" in options:
        p = options["parameterization"]
        kind = p if isinstance(p, str) else dict(p).get("kind")
        return "flow" if kind == "flow" else "sigma"
    if sget("kind") == "diffusers" and sget("path"):
        return _levels_of_directory(Path(str(sget("path"))).expanduser(), options.get("subfolder"))
    return "sigma"


def _levels_of_name(name: str) -> str:
    from searchd.models.zoo import DATA_DIR

    path = DATA_DIR / name
    return _levels_of_directory(path, None) if path.is_dir() else "sigma"


def _levels_of_directory(path: Path, subfolder: str | None) -> str:
    if not path.is_dir():
        return "sigma"
    try:
        from searchd.models.diffusers import (
            SEARCHD_META,
            Source,
            find_denoiser_folder,
            find_scheduler_config,
        )

        src = Source(path)
        folder = find_denoiser_folder(src, subfolder)
        meta_rel = f"{folder}/{SEARCHD_META}" if folder else SEARCHD_META
        if src.exists(meta_rel):
            p = src.read_json(meta_rel).get("parameterization")
            if p is not None:
                kind = p if isinstance(p, str) else dict(p).get("kind")
                return "flow" if kind == "flow" else "sigma"
        config = find_scheduler_config(src, folder) or {}
    except (ValueError, OSError, json.JSONDecodeError):
        return "sigma"
    flow = "FlowMatch" in str(config.get("_class_name", "")) or config.get("use_flow_sigmas")
    return "flow" if flow else "sigma"


# The command -----------------------------------------------------------------------------------
PROG = "searchd.export"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise _BadInput(message)


class _BadInput(Exception):
    pass


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog=f"python -m {PROG}",
        description="Print a searched schedule in the form a sampler takes: a diffusers "
        "scheduler, k-diffusion's sigma tensor, or ComfyUI's / A1111's custom sigmas.",
    )
    p.add_argument("source", metavar="RUN_OR_BEST_JSON",
                   help="a run directory (with best.json) or a best.json file")
    p.add_argument("--to", required=True, choices=TARGETS, help="the target sampler")
    p.add_argument("--json", action="store_true",
                   help="print the whole form as JSON instead of the snippet")
    return p


def load_best(source: str | Path) -> dict[str, Any]:
    """``best.json`` of a run directory, or the file itself; ``ValueError`` naming the
    problem otherwise."""
    path = Path(source).expanduser()
    if path.is_dir():
        path = path / "best.json"
        if not path.is_file():
            raise ValueError(f"{source}: no best.json in this directory (is the search "
                             "finished? a run writes best.json at its end)")
    elif not path.is_file():
        raise ValueError(f"{source}: no such file or directory; give a run directory or a "
                         "best.json file")
    try:
        best = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(best, dict) or "sigmas" not in best or "solver" not in best:
        raise ValueError(f"{path}: not a searchd best.json (no 'sigmas' and 'solver')")
    return best


def export_best(best: Mapping[str, Any], to: str, *, run_dir: Path | None = None
                ) -> dict[str, Any]:
    """The ``to`` form of a best.json (``usage_section``'s entry), from its schedule.

    The model facts (flow model, discrete grid) come from the best.json's own ``usage``; a
    best.json written before the export existed falls back to the run's ``config.yaml``
    beside it (flow or not; a discrete grid cannot be read without the model).
    """
    if to not in TARGETS:
        raise ValueError(f"--to {to!r}; allowed: {', '.join(TARGETS)}")
    weights = best.get("guidance")
    if weights is None and isinstance(best.get("schedule"), Mapping):
        weights = best["schedule"].get("guidance")
    sched = Schedule(best["sigmas"], best.get("model_ids"), solver=str(best["solver"]),
                     strategy=best.get("strategy"), guidance=weights)
    usage = best.get("usage") if isinstance(best.get("usage"), Mapping) else {}
    options = dict(best.get("solver_options") or usage.get("solver_options") or {})
    if "flow" in usage:
        flow = bool(usage["flow"])
    else:
        flow = _flow_from_config(run_dir)
    section = usage_section(sched, options, flow=flow)
    if usage.get("discrete") and isinstance(usage.get(to), Mapping):
        # Grid timesteps need the model's grid, which best.json's own usage recorded.
        return dict(usage[to])
    return section[to]


def _flow_from_config(run_dir: Path | None) -> bool:
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        return False
    import yaml

    try:
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return False
    return model_levels(cfg.get("model") or {}) == "flow"


def snippet(form: Mapping[str, Any], to: str) -> str:
    """The text ``python -m searchd.export`` prints for one form."""
    if "error" in form:
        raise ExportError(str(form["error"]))
    if to == "comfy":
        return (f"# ComfyUI: ManualSigmas node (experimental/custom_sampling) -> SamplerCustom "
                f"sigmas; sampler {form['sampler']}\n{form['text']}\n"
                f"# JSON\n{json.dumps(form['json'])}\n"
                f"# A1111 / Forge script, in process(self, p):\n{form['a1111']}\n"
                f"# {form['note']}\n")
    return str(form["code"])


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; 0 on success, 2 on bad input (one line on stderr)."""
    try:
        args = _parser().parse_args(argv)
        source = Path(args.source).expanduser()
        best = load_best(source)
        form = export_best(best, args.to, run_dir=source if source.is_dir() else source.parent)
        text = json.dumps(form, indent=2) if args.json else snippet(form, args.to)
    except (_BadInput, ValueError) as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
