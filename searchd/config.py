"""The whole search as typed configuration: pydantic models, YAML loading, ``--set`` overrides.

``load_config(path, overrides)`` reads a YAML file, applies ``key.path=value`` overrides
(the value is parsed as YAML: a scalar, a list ``[a, b]`` or a mapping ``{k: v}``), and
validates everything before anything starts. Every problem becomes one line naming the key,
the bad value and what is allowed (``ConfigError.lines``). ``SearchConfig.resolve()`` is the
configuration as run, with every default and derived value filled in (steps and NFE, the
candidate budget, candidates per trial, the run directory); it loads back unchanged.

Sections (see ``docs/notes-search.md`` for the reasoning):

- ``model``: ``name`` (zoo name) or ``spec`` (``path``, ``kind``, ``options``) or ``zoo`` (the
  members of a model schedule, smallest to largest); ``device``; ``dtype``.
- ``solver``: ``name`` (a solver of ``searchd.solvers``), ``options``.
- ``nfe`` or ``steps``: the budget of network evaluations, or the number of steps.
- ``space``: ``kind`` continuous | discrete | models | joint; ``budget_ms`` / ``budget_nfe``
  and ``timesteps`` (model schedules); ``warp`` logsnr | rho (``rho``) | flow (``shift``);
  ``endpoints`` fixed | free (``endpoint_range``); ``gap_ratio``; ``final_zero``;
  ``sigma_min``/``sigma_max`` overrides; ``grid`` (discrete).
- ``search``: ``algorithm`` evolution | random | bayes | gits | ld3 | adaptive; ``seed``;
  ``budget`` (candidates); ``candidates_per_trial``; ``evolution`` (O2TDM's parameters,
  ``warm_start``); ``bayes`` (sampler); ``gits`` and ``ld3`` (the published methods'
  parameters); ``adaptive`` (a per-sample timestep predictor over a global schedule);
  ``predictor`` (OMS-DPM's pre-screen of offspring, evolution only).
- ``baselines``: schedule families with their parameters; ``gits`` and ``ld3`` are computed
  at run start with the ``search.gits`` / ``search.ld3`` settings.
- ``metric``: ``name`` fid | kid | teacher_distance; ``features`` digits | inception |
  pixels; ``reference`` (an ``.npz`` path or ``exact:<n>``).
- ``samples``: per candidate; search, held-out and reference seed bases (disjoint ranges).
- ``workers``: ``num_workers``, ``num_gpus_per_worker``, ``cpus_per_worker``.
- ``run_dir``: where the run is written (default ``runs/<time>-<id>``).
- ``report``: plots, sample grid, confidence level, progress display.

This module imports neither Ray nor torch at import time, so a bad configuration fails fast.
"""

from __future__ import annotations

import importlib
import os
import re
import time
import types
import typing
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from searchd.schedules.baselines import AYS_TABLES, FAMILIES, FLOW_FAMILY_PARAMS, GRIDS

# Solvers and what one step costs, for when searchd.solvers does not (yet) provide them.
# DESIGN.md's list; Heun's last step to sigma = 0 is an Euler step (EDM), hence 2N - 1.
FALLBACK_SOLVERS: tuple[str, ...] = (
    "euler", "heun", "dpmpp_2m", "dpmpp_3m", "unipc", "ipndm", "deis",
)
ALGORITHMS: tuple[str, ...] = ("evolution", "random", "bayes", "gits", "ld3", "adaptive")
# Schedules computed from the model at run start (searchd.search.anchors): usable as
# search.algorithm, as baseline families and as warm-start seeds of the evolution.
ANCHORS: tuple[str, ...] = ("gits", "ld3")
# Parameters each baseline family takes (besides n_steps, sigma_min, sigma_max, final_zero).
FAMILY_PARAMS: dict[str, tuple[str, ...]] = {
    "polynomial": ("rho",),
    "logsnr": (),
    "time_uniform": (),
    "time_quadratic": (),
    "discrete": ("grid",),
    "ays": ("model",),
    "gits": (),  # computed with search.gits
    "ld3": (),  # computed with search.ld3
    **FLOW_FAMILY_PARAMS,  # flow_uniform, flow_shift, flow_flux, flow_beta
}
EXACT_REFERENCE = re.compile(r"^exact:(\d+)$")
DEVICE = re.compile(r"^(cpu|auto|mps|cuda(:\d+)?)$")


class ConfigError(ValueError):
    """A configuration problem; ``lines`` holds one line per problem."""

    def __init__(self, lines: Iterable[str]) -> None:
        self.lines = list(lines)
        super().__init__("\n".join(self.lines))


class FieldError(ValueError):
    """Raised by validators: names the key (relative to the model validated), its value and
    what is allowed, so the formatter can print them on one line."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key} = {value!r}: {allowed}")


# Solver registry (lazy) ---------------------------------------------------------------------
def _solvers_module() -> Any:
    """``searchd.solvers`` if it is importable, else None (imported only when needed)."""
    try:
        return importlib.import_module("searchd.solvers")
    except ModuleNotFoundError as e:
        if e.name and (e.name == "searchd.solvers" or e.name.startswith("searchd.solvers.")):
            return None
        raise


def solver_names() -> list[str]:
    """Known solver names: ``searchd.solvers.SOLVERS`` when available, else DESIGN.md's."""
    mod = _solvers_module()
    registry = getattr(mod, "SOLVERS", None) if mod is not None else None
    return list(registry) if registry is not None else list(FALLBACK_SOLVERS)


def solver_nfe(solver: str, n_steps: int, final_zero: bool = True) -> int:
    """Network evaluations a schedule of ``n_steps`` costs with ``solver``."""
    mod = _solvers_module()
    fn: Callable[..., int] | None = getattr(mod, "nfe", None) if mod is not None else None
    if fn is not None:
        return int(fn(solver, n_steps, final_zero=final_zero))
    if solver == "heun":
        return 2 * n_steps - (1 if final_zero else 0)
    return n_steps


def steps_for_nfe(solver: str, nfe: int, final_zero: bool = True) -> int | None:
    """Most steps whose cost fits in ``nfe`` evaluations (None if not even one step fits)."""
    best = None
    for n in range(1, nfe + 1):
        if solver_nfe(solver, n, final_zero) <= nfe:
            best = n
    return best


# Sections -----------------------------------------------------------------------------------
class Section(BaseModel):
    """Base of every section: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid")


class ModelSpec(Section):
    """A checkpoint outside the embedded zoo."""

    path: str  # file, directory, hub id, or module:function (kind generic)
    kind: str  # adapter in searchd.models: diffusers | edm | generic | gmm
    options: dict[str, Any] = {}  # adapter-specific (e.g. prompts, guidance_scale, runtime)

    @field_validator("kind", "path")
    @classmethod
    def _not_empty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v


class ModelConfig(Section):
    """Which model, on which device, in which precision.

    ``name`` is a zoo name (``gmm-digits``, ``digits-unet-s``) or the shorthand
    ``kind:path`` (``diffusers:checkpoints/ddpm``, ``edm:model.pkl``,
    ``generic:pkg.mod:make``), which the configuration resolves to ``spec`` (the long form,
    which also takes ``options``).
    """

    name: str | None = None  # zoo name, e.g. "gmm-digits", or "kind:path"
    spec: ModelSpec | None = None  # or a checkpoint
    zoo: list[str] | None = None  # or the members of a model schedule (the last: reference)
    latency_batch_size: int | None = Field(None, ge=1)  # zoo latency; null: evaluator batch
    device: str = "cpu"  # cpu | cuda | cuda:<i> | mps | auto
    dtype: Literal["float32", "float64", "float16", "bfloat16"] = "float32"

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not DEVICE.match(v):
            raise ValueError("must be cpu, cuda, cuda:<index>, mps or auto")
        return v

    @model_validator(mode="after")
    def _one_model(self) -> ModelConfig:
        given = [k for k in ("name", "spec", "zoo") if getattr(self, k) is not None]
        if len(given) != 1:
            raise FieldError("name", self.name,
                             "give exactly one of model.name, model.spec and model.zoo")
        if self.zoo is not None:
            if len(self.zoo) < 2:
                raise FieldError("zoo", self.zoo, "a model schedule needs >= 2 zoo members")
            if len(set(self.zoo)) != len(self.zoo):
                raise FieldError("zoo", self.zoo, "zoo members must be distinct")
        if self.name is not None and ":" in self.name:
            kind, _, path = self.name.partition(":")
            if not kind or not path:
                raise FieldError("name", self.name, "a checkpoint is 'kind:path', e.g. "
                                 "'diffusers:checkpoints/ddpm' or 'edm:model.pkl'")
            self.spec = ModelSpec(kind=kind, path=path)
            self.name = None
        return self


def _solver_name(v: str) -> str:
    known = solver_names()
    if v not in known:
        raise ValueError(f"allowed solvers: {', '.join(known)}")
    return v


SolverName = Annotated[str, AfterValidator(_solver_name)]  # a solver of searchd.solvers


class SolverConfig(Section):
    """The ODE solver that runs every schedule."""

    name: SolverName = "dpmpp_2m"
    options: dict[str, Any] = {}  # passed to solve(..., **options)


class SpaceConfig(Section):
    """The search space (searchd.schedules.spaces)."""

    kind: Literal["continuous", "discrete", "models", "joint"] = "continuous"
    # models: fixed timesteps, a zoo member per step; joint: timesteps (continuous) + members
    budget_ms: float | None = Field(None, gt=0)  # model schedules: ms per sample, or
    budget_nfe: float | None = Field(None, gt=0)  # NFE-equivalents of the slowest member
    timesteps: dict[str, Any] = {"family": "polynomial", "params": {"rho": 7}}  # kind models
    warp: Literal["logsnr", "rho", "flow"] = "logsnr"  # continuous: coordinate of uniform gaps
    rho: float = Field(7.0, gt=0)  # exponent of warp "rho" (sigma^(1/rho))
    shift: float = Field(1.0, gt=0)  # warp "flow": SD3's shift of flow time t
    endpoints: Literal["fixed", "free"] = "fixed"  # free: the top/bottom levels are searched
    endpoint_range: float = Field(0.3, gt=0, lt=0.5)  # free: reach, as a fraction of the span
    gap_ratio: float = Field(10.0, gt=1)  # continuous: max ratio of a gap to the last gap
    final_zero: bool = True  # schedules end in 0 (the last step denoises)
    sigma_min: float | None = Field(None, gt=0)  # override the model's noise range
    sigma_max: float | None = Field(None, gt=0)
    grid: str | None = None  # discrete: a named grid; null: the model's own grid

    @field_validator("grid")
    @classmethod
    def _grid(cls, v: str | None) -> str | None:
        if v is not None and v not in GRIDS:
            raise ValueError(f"allowed grids: {', '.join(sorted(GRIDS))} (or null)")
        return v

    @field_validator("timesteps")
    @classmethod
    def _timesteps(cls, v: dict[str, Any]) -> dict[str, Any]:
        BaselineConfig(**v)  # the fixed timesteps of kind "models": a baseline family
        return v

    @property
    def model_schedule(self) -> bool:
        return self.kind in ("models", "joint")

    @model_validator(mode="after")
    def _range(self) -> SpaceConfig:
        if self.model_schedule and (self.budget_ms is None) == (self.budget_nfe is None):
            raise FieldError("budget_ms", self.budget_ms,
                             f"space.kind = {self.kind!r} needs exactly one of budget_ms "
                             "(ms per sample) and budget_nfe (NFE of the slowest member)")
        if not self.model_schedule and (self.budget_ms is not None
                                        or self.budget_nfe is not None):
            raise FieldError("budget_ms", self.budget_ms or self.budget_nfe,
                             "latency budgets apply to space.kind models or joint only")
        if self.sigma_min is not None and self.sigma_max is not None:
            if not self.sigma_min < self.sigma_max:
                raise FieldError("sigma_min", self.sigma_min,
                                 f"must be below sigma_max = {self.sigma_max}")
        return self


class EvolutionConfig(Section):
    """O2TDM/AutoDiffusion evolutionary search."""

    population_num: int = Field(32, ge=1)  # candidates per generation
    select_num: int = Field(8, ge=1)  # parents: best candidates scored so far
    mutation_num: int = Field(16, ge=0)  # mutants per generation
    crossover_num: int = Field(8, ge=0)  # crossover children per generation
    m_prob: float = Field(0.25, ge=0, le=1)  # per-parameter mutation probability
    # Continuous spaces: std of a mutation step in [0, 1]; a pair [lo, hi] (the default)
    # draws each mutant's step log-uniformly in [lo, hi] (mixed-scale mutation; see
    # benchmarks/results/quality.md). Discrete spaces: the move's radius, a fraction of the pool.
    mutation_scale: float | tuple[float, float] = (0.02, 0.3)
    generations: int = Field(12, ge=1)  # generations in all, generation 0 included
    random_fill: bool = True  # fill each generation with random candidates
    warm_start: list[Literal["gits", "ld3"]] = []  # computed schedules opening generation 0

    @field_validator("warm_start")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError("each of gits, ld3 at most once")
        return v

    @field_validator("mutation_scale")
    @classmethod
    def _scale(cls, v: float | tuple[float, float]) -> float | tuple[float, float]:
        if isinstance(v, tuple):
            if not 0 < v[0] <= v[1]:
                raise ValueError(
                    f"a mixed mutation_scale [lo, hi] needs 0 < lo <= hi; got {list(v)}")
        elif not v > 0:
            raise ValueError(f"must be > 0; got {v}")
        return v

    @model_validator(mode="after")
    def _sizes(self) -> EvolutionConfig:
        if self.select_num > self.population_num:
            raise FieldError("select_num", self.select_num,
                             f"must be <= population_num ({self.population_num})")
        if self.mutation_num + self.crossover_num > self.population_num:
            raise FieldError(
                "mutation_num", self.mutation_num,
                f"mutation_num + crossover_num ({self.crossover_num}) must be <= "
                f"population_num ({self.population_num})",
            )
        return self


class BayesConfig(Section):
    """Optuna through Ray Tune's OptunaSearch."""

    sampler: Literal["tpe", "gp"] = "tpe"
    n_startup_trials: int = Field(10, ge=0)  # random trials before the model takes over


class PredictorSection(Section):
    """OMS-DPM's predictor: pre-screens each generation's offspring (evolution only).

    On by default: on timestep schedules it is what lets a short warm-started evolution get
    past LD3 (benchmarks/results/quality_variants.md, 3 seeds per case: mean gain over LD3
    at NFE 4 from 6% to 26% with ipndm, from 39% to 53% with euler; better in 6 of 8 cases,
    worse with dpmpp_2m at NFE 6, 31% to 18%). The other algorithms ignore it, as they
    ignore ``search.evolution``.
    """

    enabled: bool = True
    top_fraction: float = Field(0.1, gt=0, le=1)  # offspring drawn 1/top_fraction x, best kept
    min_train: int = Field(10, ge=2)  # scored candidates before the predictor is used
    hidden: int = Field(32, ge=1)  # GRU and MLP width
    steps: int = Field(300, ge=1)  # optimizer steps per (re)training


class GitsConfig(Section):
    """GITS (searchd.search.gits): DP over a teacher trajectory on a fine grid."""

    warmup: int = Field(256, ge=1)  # warm-up samples: search seeds seed_base + [0, warmup)
    grid_points: int = Field(61, ge=3)  # levels of the teacher grid (polynomial rho)
    rho: float = Field(7.0, gt=0)  # exponent of the teacher grid
    teacher_solver: SolverName = "heun"  # solver of the teacher trajectory
    teacher_substeps: int = Field(1, ge=1)  # teacher steps per grid interval
    metric: Literal["dev", "l1", "l2"] = "dev"  # cost of a one-step jump
    coeff: float = Field(1.15, gt=0)  # DP weight ratio of consecutive steps
    student_solver: SolverName | None = None  # jumps costed with this solver; null: solver.name


class Ld3Config(Section):
    """LD3 (searchd.search.ld3): the schedule learned by gradient descent through the solver."""

    train: int = Field(64, ge=1)  # training samples: search seeds seed_base + [0, train)
    iters: int = Field(100, ge=1)  # optimizer iterations
    lr: float = Field(0.1, gt=0)  # learning rate
    optimizer: Literal["adam", "rmsprop"] = "adam"
    space: Literal["logsnr", "rho"] = "logsnr"  # coordinate the logits share out
    rho: float = Field(7.0, gt=0)  # exponent of space "rho"
    loss: Literal["auto", "lpips", "features", "pixels"] = "auto"  # auto: lpips > features
    teacher_solver: SolverName = "heun"  # teacher: this solver over a polynomial schedule
    teacher_steps: int = Field(64, ge=1)  # steps of the teacher
    batch_size: int | None = Field(None, ge=1)  # null: full batch
    slack: float = Field(0.0, ge=0)  # radius of LD3's noise relaxation (0: off)
    patience: int | None = Field(5, ge=1)  # plateau rule: back to the best, lr x lr_decay
    lr_decay: float = Field(0.8, gt=0, le=1)
    init: Literal["uniform", "gits"] = "uniform"  # start: uniform in space, or GITS's result


class AdaptiveConfig(Section):
    """Per-sample adaptive schedules (searchd.adaptive): a predictor over a global schedule."""

    kind: Literal["one_shot", "delta"] = "one_shot"  # one schedule per noise, or step by step
    # The global schedule the predictor offsets: a computed anchor (ld3, gits, with their
    # search.* settings) or a best.json of an earlier run (same solver and steps).
    global_schedule: str = "ld3"
    train: int = Field(256, ge=2)  # training noises: search seeds seed_base + [0, train)
    oracle_iters: int = Field(16, ge=1)  # Adam steps of each noise's own (oracle) schedule
    oracle_lr: float = Field(0.1, gt=0)
    epochs: int = Field(300, ge=1)  # predictor regression epochs (full batch, AdamW)
    hidden: int = Field(64, ge=1)  # predictor width
    tune_epochs: int = Field(0, ge=0)  # then end-to-end epochs through the solver (0: off)
    teacher_solver: SolverName = "heun"  # the oracle's target: this solver, polynomial schedule
    teacher_steps: int = Field(64, ge=1)

    @field_validator("global_schedule")
    @classmethod
    def _global(cls, v: str) -> str:
        if v in ANCHORS:
            return v
        if v.endswith(".json") and Path(v).is_file():
            return v
        raise ValueError(f"allowed: {', '.join(ANCHORS)}, or the path of an existing best.json")

    @property
    def global_anchor(self) -> str | None:
        return self.global_schedule if self.global_schedule in ANCHORS else None


class SearchSection(Section):
    """Which algorithm, its parameters, and the candidate budget."""

    algorithm: Literal["evolution", "random", "bayes", "gits", "ld3", "adaptive"] = "evolution"
    seed: int = 0  # the searcher's random seed
    budget: int | None = Field(None, ge=1)  # candidates in all; null: population x generations
    candidates_per_trial: int | None = Field(None, ge=1)  # per Tune trial; null: population
    evolution: EvolutionConfig = Field(default_factory=EvolutionConfig)
    bayes: BayesConfig = Field(default_factory=BayesConfig)
    predictor: PredictorSection = Field(default_factory=PredictorSection)
    gits: GitsConfig = Field(default_factory=GitsConfig)
    ld3: Ld3Config = Field(default_factory=Ld3Config)
    adaptive: AdaptiveConfig = Field(default_factory=AdaptiveConfig)

    @model_validator(mode="after")
    def _defaults(self) -> SearchSection:
        ev = self.evolution
        if self.budget is None:
            self.budget = ev.population_num * ev.generations
        if self.candidates_per_trial is None:
            self.candidates_per_trial = ev.population_num
        return self


def _baseline_shorthand(v: Any) -> Any:
    """Allow ``- logsnr`` for ``- {family: logsnr}``."""
    return {"family": v} if isinstance(v, str) else v


class BaselineConfig(Section):
    """One baseline family (searchd.schedules.baselines) and its parameters."""

    family: str
    params: dict[str, Any] = {}
    name: str | None = None  # label in reports; default family(params)

    @field_validator("family")
    @classmethod
    def _family(cls, v: str) -> str:
        if v not in FAMILIES and v not in ANCHORS:
            raise ValueError(f"allowed families: {', '.join((*FAMILIES, *ANCHORS))}")
        return v

    @model_validator(mode="after")
    def _params(self) -> BaselineConfig:
        allowed = FAMILY_PARAMS.get(self.family, ())
        for k, v in self.params.items():
            if k not in allowed:
                raise FieldError(
                    f"params.{k}", v,
                    f"family {self.family!r} takes " + (", ".join(allowed) or "no parameters"),
                )
        if self.family == "ays" and self.params.get("model", "sd15") not in AYS_TABLES:
            raise FieldError("params.model", self.params["model"],
                             f"allowed: {', '.join(sorted(AYS_TABLES))}")
        grid = self.params.get("grid")
        if self.family == "discrete" and grid is not None and grid not in GRIDS:
            raise FieldError("params.grid", grid, f"allowed: {', '.join(sorted(GRIDS))}")
        if self.family == "polynomial" and "rho" in self.params:
            rho = self.params["rho"]
            if not isinstance(rho, (int, float)) or isinstance(rho, bool) or not rho > 0:
                raise FieldError("params.rho", rho, "must be a number > 0")
        return self

    @property
    def label(self) -> str:
        """``name``, or ``family(params)``: how reports and meta name this baseline."""
        if self.name is not None:
            return self.name
        inner = ", ".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.family}({inner})" if inner else self.family


Baseline = Annotated[BaselineConfig, BeforeValidator(_baseline_shorthand)]

DEFAULT_BASELINES: list[dict[str, Any]] = [
    {"family": "polynomial", "params": {"rho": 7}},
    {"family": "logsnr"},
    {"family": "time_uniform"},
]


class MetricConfig(Section):
    """What a candidate is scored by."""

    name: Literal["fid", "kid", "teacher_distance"] = "fid"
    features: Literal["digits", "inception", "pixels"] = "digits"
    reference: str | None = None  # .npz with mu/sigma, or "exact:<n>" (embedded models)
    options: dict[str, Any] = {}  # metric-specific (e.g. the teacher's solver and steps)

    @field_validator("reference")
    @classmethod
    def _reference(cls, v: str | None) -> str | None:
        if v is None:
            return v
        m = EXACT_REFERENCE.match(v)
        if v.startswith("exact:"):
            if not m or int(m.group(1)) < 2:
                raise ValueError("exact references are written exact:<n> with n >= 2")
            return v
        if "://" not in v and not Path(v).is_file():
            raise ValueError("no such file; give an .npz with mu and sigma, or exact:<n>")
        return v

    @model_validator(mode="after")
    def _needs_reference(self) -> MetricConfig:
        if self.name in ("fid", "kid") and self.reference is None:
            raise FieldError("reference", None,
                             f"{self.name} needs reference statistics: a path or exact:<n>")
        return self

    @property
    def exact_reference(self) -> int | None:
        """n of ``exact:<n>`` (reference statistics from n exact model samples), else None."""
        m = EXACT_REFERENCE.match(self.reference or "")
        return int(m.group(1)) if m else None


class SamplesConfig(Section):
    """How many samples score a candidate, and which noise seeds they use.

    Sample i of a candidate uses seed ``seed_base + i``; the held-out re-scoring uses
    ``heldout_seed_base + i``; exact reference samples use ``reference_seed_base + i``.
    The three ranges must not overlap.
    """

    per_candidate: int = Field(2000, ge=2)
    seed_base: int = Field(0, ge=0)
    heldout: int = Field(10000, ge=2)
    heldout_seed_base: int = Field(1_000_000, ge=0)
    reference_seed_base: int = Field(2_000_000, ge=0)


class WorkersConfig(Section):
    """Evaluator actors."""

    num_workers: int | None = Field(None, ge=1)  # null: one per GPU, else per CPU slot
    num_gpus_per_worker: float = Field(0.0, ge=0)
    cpus_per_worker: float = Field(1.0, gt=0)


class ReportConfig(Section):
    """What the end of a run shows and writes."""

    plots: bool = True  # plots in <run>/report/
    grid_samples: int = Field(64, ge=0)  # samples in each sample grid (0: none)
    ci_level: float = Field(0.95, gt=0, lt=1)  # confidence level of the held-out CI
    progress: bool = True  # live progress display


def default_run_dir() -> str:
    """A new directory under runs/, named by local time and a short random id."""
    return f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


class SearchConfig(Section):
    """A whole search."""

    model: ModelConfig
    solver: SolverConfig = Field(default_factory=SolverConfig)
    nfe: int | None = Field(None, ge=1)  # evaluation budget; resolved to the actual cost
    steps: int | None = Field(None, ge=1)  # or the number of steps
    space: SpaceConfig = Field(default_factory=SpaceConfig)
    search: SearchSection = Field(default_factory=SearchSection)
    baselines: list[Baseline] = Field(
        default_factory=lambda: [BaselineConfig(**b) for b in DEFAULT_BASELINES]
    )
    metric: MetricConfig = Field(default_factory=lambda: MetricConfig(reference="exact:10000"))
    samples: SamplesConfig = Field(default_factory=SamplesConfig)
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    run_dir: str | None = None  # null: default_run_dir()
    report: ReportConfig = Field(default_factory=ReportConfig)

    @model_validator(mode="after")
    def _cross(self) -> SearchConfig:
        self._resolve_steps()
        levels = self.steps if self.space.final_zero else self.steps + 1  # type: ignore[operator]
        if self.space.kind == "continuous" and levels < 2:
            raise FieldError("steps", self.steps,
                             "a continuous space needs >= 2 noise levels besides the final 0")
        n_base = len(self.baselines)
        names = [b.label for b in self.baselines]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise FieldError("baselines", dup, "baseline names must be unique; set name:")
        ev = self.search.evolution
        n_seeds = n_base + len([a for a in ev.warm_start if a not in self.baseline_families])
        if self.search.algorithm == "evolution" and n_seeds > ev.population_num:
            raise FieldError(
                "baselines", names + list(ev.warm_start),
                f"{n_seeds} baselines and warm-start seeds do not fit in "
                f"search.evolution.population_num = {ev.population_num}",
            )
        self._check_anchors()
        self._check_adaptive()
        if n_base > (self.search.budget or 0):
            raise FieldError("search.budget", self.search.budget,
                             f"must be >= the number of baselines ({n_base})")
        self._check_seed_ranges()
        if (self.model.zoo is not None) != self.space.model_schedule:
            raise FieldError("space.kind", self.space.kind,
                             "model.zoo goes with space.kind models or joint, and they need it")
        if self.space.kind == "joint" and self.space.grid is not None:
            raise FieldError("space.grid", self.space.grid,
                             "a joint space searches continuous timesteps; set null")
        if self.model.device.startswith("cuda") and self.workers.num_gpus_per_worker == 0:
            raise FieldError("workers.num_gpus_per_worker", 0.0,
                             f"must be > 0 for model.device = {self.model.device!r}")
        if self.run_dir is None:
            self.run_dir = default_run_dir()
        return self

    def _resolve_steps(self) -> None:
        solver, fz = self.solver.name, self.space.final_zero
        if self.nfe is None and self.steps is None:
            raise FieldError("nfe", None, "set nfe (evaluation budget) or steps")
        if self.steps is None:
            steps = steps_for_nfe(solver, self.nfe, fz)  # type: ignore[arg-type]
            if steps is None:
                raise FieldError("nfe", self.nfe,
                                 f"one step of {solver} costs {solver_nfe(solver, 1, fz)}")
            self.steps = steps
            self.nfe = solver_nfe(solver, steps, fz)
        elif self.nfe is None:
            self.nfe = solver_nfe(solver, self.steps, fz)
        elif solver_nfe(solver, self.steps, fz) != self.nfe:
            raise FieldError(
                "nfe", self.nfe,
                f"steps = {self.steps} with {solver} cost {solver_nfe(solver, self.steps, fz)}"
                " evaluations; give one of nfe and steps, or matching values",
            )

    @property
    def baseline_families(self) -> list[str]:
        return [b.family for b in self.baselines]

    @property
    def anchors(self) -> list[str]:
        """The computed schedules (gits, ld3) this run needs, in a fixed order."""
        wanted = {self.search.algorithm, *self.baseline_families,
                  *self.search.evolution.warm_start}
        if self.search.algorithm == "adaptive" and self.search.adaptive.global_anchor:
            wanted.add(self.search.adaptive.global_anchor)
        return [a for a in ANCHORS if a in wanted]

    def _check_anchors(self) -> None:
        fams = self.baseline_families
        for a in ANCHORS:
            if fams.count(a) > 1:
                raise FieldError("baselines", fams, f"family {a!r} at most once")
        anchors = self.anchors
        n = self.samples.per_candidate
        g, ld3 = self.search.gits, self.search.ld3
        if "gits" in anchors and g.warmup > n:
            raise FieldError("search.gits.warmup", g.warmup,
                             f"must be <= samples.per_candidate ({n}): warm-up noise comes "
                             "from the search seeds")
        if "ld3" in anchors and ld3.train > n:
            raise FieldError("search.ld3.train", ld3.train,
                             f"must be <= samples.per_candidate ({n}): training noise comes "
                             "from the search seeds")
        if ("gits" in anchors or ld3.init == "gits" and "ld3" in anchors) and \
                g.grid_points - 1 < self.n_steps:
            raise FieldError("search.gits.grid_points", g.grid_points,
                             f"a grid of {g.grid_points} points allows at most "
                             f"{g.grid_points - 1} steps; steps = {self.n_steps}")

    def _check_adaptive(self) -> None:
        if self.search.algorithm != "adaptive":
            return
        a, n = self.search.adaptive, self.samples.per_candidate
        if self.space.kind != "continuous":
            raise FieldError("space.kind", self.space.kind,
                             "search.algorithm adaptive predicts continuous noise levels: "
                             "allowed: continuous")
        if a.train > n:
            raise FieldError("search.adaptive.train", a.train,
                             f"must be <= samples.per_candidate ({n}): training noise comes "
                             "from the search seeds")
        if self.metric.reference is None:
            raise FieldError("metric.reference", None,
                             "search.algorithm adaptive scores its predictor by held-out FID: "
                             "give reference statistics (a path or exact:<n>)")
        if a.global_anchor is None:
            self._check_global_best(a.global_schedule)

    def _check_global_best(self, path: str) -> None:
        """An earlier run's best.json as the global schedule: its solver, steps and ending
        must be this run's (the noise range is checked against the model at run start)."""
        import json

        key = "search.adaptive.global_schedule"
        try:
            best = json.loads(Path(path).read_text())
            sigmas = [float(x) for x in best["sigmas"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise FieldError(key, path, f"not a best.json with sigmas ({type(e).__name__})"
                             ) from None
        solver = best.get("solver", self.solver.name)
        if solver != self.solver.name:
            raise FieldError(key, path, f"its schedule is for solver {solver!r}; this run's "
                             f"solver.name is {self.solver.name!r}")
        if best.get("model_ids") is not None:
            raise FieldError(key, path, "it is a model schedule; allowed: a timestep schedule")
        want = self.steps + 1  # type: ignore[operator]
        if len(sigmas) != want or (sigmas[-1] == 0.0) != self.space.final_zero:
            raise FieldError(key, path, f"{len(sigmas)} levels ending in {sigmas[-1]:g}; this "
                             f"run needs {want} levels (steps = {self.steps}, final_zero = "
                             f"{self.space.final_zero})")

    def _check_seed_ranges(self) -> None:
        s = self.samples
        ranges = [
            ("samples.seed_base", s.seed_base, s.per_candidate),
            ("samples.heldout_seed_base", s.heldout_seed_base, s.heldout),
        ]
        n_ref = self.metric.exact_reference
        if n_ref is not None:
            ranges.append(("samples.reference_seed_base", s.reference_seed_base, n_ref))
        for i, (key_a, a, na) in enumerate(ranges):
            for key_b, b, nb in ranges[i + 1:]:
                if a < b + nb and b < a + na:
                    raise FieldError(
                        key_b, b,
                        f"seeds [{b}, {b + nb}) overlap {key_a} seeds [{a}, {a + na}); "
                        "search, held-out and reference seeds must be disjoint",
                    )

    # Derived values ----------------------------------------------------------------------
    @property
    def mode(self) -> str:
        """Every metric here is minimized."""
        return "min"

    @property
    def n_steps(self) -> int:
        return int(self.steps)  # type: ignore[arg-type]

    def resolve(self) -> dict[str, Any]:
        """The configuration as run: every default and derived value, as plain data."""
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        """``resolve()`` as YAML (what ``--print-config`` shows and ``config.yaml`` holds)."""
        return yaml.safe_dump(self.resolve(), sort_keys=False)


# Error messages -------------------------------------------------------------------------------
def _unwrap(annotation: Any) -> Any:
    """The model class (or dict/list marker) behind Optional/Annotated/list annotations."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _unwrap(args[0]) if len(args) == 1 else annotation
    return annotation


def _model_at(root: type[BaseModel], loc: Iterable[str | int]) -> Any:
    """What the schema holds at ``loc``: a model class, ``dict`` (free-form), or None."""
    node: Any = root
    for part in loc:
        if isinstance(node, type) and issubclass(node, BaseModel):
            if not isinstance(part, str) or part not in node.model_fields:
                return None
            node = _unwrap(node.model_fields[part].annotation)
        elif typing.get_origin(node) is list and isinstance(part, int):
            node = _unwrap(typing.get_args(node)[0])
        elif typing.get_origin(node) is dict or node is dict:
            return dict
        else:
            return None
    if typing.get_origin(node) is dict:
        return dict
    return node


def _allowed_keys(root: type[BaseModel], loc: Iterable[str | int]) -> list[str]:
    node = _model_at(root, loc)
    if isinstance(node, type) and issubclass(node, BaseModel):
        return list(node.model_fields)
    return []


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _dotted(loc: Iterable[str | int]) -> str:
    return ".".join(str(p) for p in loc)


def format_validation_error(
    err: ValidationError, root: type[BaseModel] | None = None
) -> list[str]:
    """One line per problem: the key path, the bad value, and what is allowed."""
    root = root or SearchConfig
    lines: list[str] = []
    for e in err.errors(include_url=False):
        loc = tuple(e["loc"])
        path = _dotted(loc)
        kind = e["type"]
        value = e.get("input")
        ctx = e.get("ctx") or {}
        exc = ctx.get("error")
        if isinstance(exc, FieldError):
            key = ".".join(p for p in (path, exc.key) if p)
            lines.append(f"{key}: got {_short(exc.value)}; {exc.allowed}")
        elif kind == "extra_forbidden":
            where = _dotted(loc[:-1]) or "the top level"
            keys = ", ".join(_allowed_keys(root, loc[:-1]))
            lines.append(
                f"{path}: unknown key (value {_short(value)}); allowed keys at {where}: {keys}"
            )
        elif kind == "missing":
            lines.append(f"{path}: required key is missing")
        else:
            msg = str(e["msg"]).removeprefix("Value error, ").replace("Input should be", "must be")
            if isinstance(value, Mapping):
                lines.append(f"{path or 'top level'}: {msg}")
            else:
                lines.append(f"{path or 'top level'}: got {_short(value)}; {msg}")
    return lines


# Loading --------------------------------------------------------------------------------------
def parse_override(item: str) -> tuple[list[str], Any]:
    """``"a.b.c=value"`` -> (["a", "b", "c"], value parsed as YAML)."""
    if "=" not in item:
        raise ConfigError([f"--set {item!r}: expected key.path=value"])
    key, _, text = item.partition("=")
    parts = [p.strip() for p in key.strip().split(".")]
    if not all(parts):
        raise ConfigError([f"--set {item!r}: empty key in {key!r}"])
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError([f"--set {key}: value {text!r} is not valid YAML ({e})"]) from None
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """Apply ``key.path=value`` overrides to a raw configuration mapping (in place).

    Every key must exist in the schema; list entries are addressed by index
    (``baselines.0.params.rho=5``); under free-form mappings (``solver.options``) any key goes.
    """
    for item in overrides:
        parts, value = parse_override(item)
        node: Any = raw
        schema: Any = SearchConfig
        for i, part in enumerate(parts):
            here = ".".join(parts[:i]) or "the top level"
            key_path = ".".join(parts[: i + 1])
            if isinstance(schema, type) and issubclass(schema, BaseModel):
                if part not in schema.model_fields:
                    raise ConfigError([
                        f"--set {key_path}: unknown key; allowed keys at {here}: "
                        + ", ".join(schema.model_fields)
                    ])
                child_schema = _unwrap(schema.model_fields[part].annotation)
                index: str | int = part
                if (
                    typing.get_origin(child_schema) is list
                    and isinstance(node, dict)
                    and node.get(part) is None
                    and i < len(parts) - 1
                ):
                    node[part] = _plain_default(schema, part)  # address default entries
            elif typing.get_origin(schema) is list:
                if not part.isdigit() or not isinstance(node, list) or int(part) >= len(node):
                    size = len(node) if isinstance(node, list) else 0
                    entries = f"indices 0..{size - 1}" if size else "no entries"
                    raise ConfigError([
                        f"--set {key_path}: {here} is a list of {size} ({entries}); "
                        f"set the whole list with {here}=[...]"
                    ])
                child_schema = _unwrap(typing.get_args(schema)[0])
                index = int(part)
            elif schema is dict or typing.get_origin(schema) is dict:
                child_schema = Any
                index = part
            else:
                raise ConfigError([f"--set {key_path}: {here} is a value, not a section"])
            if not isinstance(node, (dict, list)):
                raise ConfigError([f"--set {key_path}: {here} is not a section in this file"])
            if i == len(parts) - 1:
                node[index] = value
            else:
                if isinstance(node, dict) and node.get(index) is None:
                    node[index] = {}
                if isinstance(node, list) and isinstance(node[index], str):
                    node[index] = _baseline_shorthand(node[index])  # "- logsnr" entries
                node = node[index]
                schema = child_schema if child_schema is not Any else dict
    return raw


def _plain_default(model: type[BaseModel], name: str) -> Any:
    """A field's default as plain data (so overrides can address its entries)."""
    value = model.model_fields[name].get_default(call_default_factory=True)
    if isinstance(value, list):
        return [v.model_dump() if isinstance(v, BaseModel) else v for v in value]
    return value.model_dump() if isinstance(value, BaseModel) else value


def validate_config(raw: Mapping[str, Any]) -> SearchConfig:
    """Validate a raw mapping; problems raise ``ConfigError`` (one line each)."""
    try:
        return SearchConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """A YAML file's top-level mapping; unreadable or malformed files raise ConfigError."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError([f"{path}: cannot read the configuration ({e.strerror})"]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e)
        raise ConfigError([f"{where}: invalid YAML ({problem})"]) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: the configuration must be a mapping of sections"])
    return raw


def load_config(
    path: str | os.PathLike[str] | None, overrides: Iterable[str] = ()
) -> SearchConfig:
    """Read a YAML configuration, apply ``--set key.path=value`` overrides, validate.

    ``path=None`` starts from the defaults (``model`` must then come from an override).
    """
    raw = read_yaml(path) if path is not None else {}
    return validate_config(apply_overrides(raw, overrides))
