"""The whole search as typed configuration: the pydantic schema, validated before anything
starts.

Every problem becomes one line naming the key, the bad value and what is allowed
(``searchd.config.errors``); ``searchd.config.overrides`` assembles a configuration from a
YAML file and ``--set`` overrides. ``SearchConfig.resolve()`` is the configuration as run,
with every default and derived value filled in (steps and NFE, the candidate budget,
candidates per trial); it loads back unchanged. ``run_dir`` stays as given (null: the run
directory is chosen when a run starts, never by validation).

Names are validated against their registries, one source each: solvers against
``searchd.solvers.SOLVERS``, algorithms against ``searchd.searchers.SEARCHERS``, baseline
families and their parameters against ``searchd.schedules.baselines`` and computed schedules
against ``searchd.methods.ANCHORS``. Each algorithm's section checks what it needs of the
rest of the configuration itself (its ``check(config)``).

Sections (see ``docs/notes-search.md`` for the reasoning):

- ``model``: ``name`` (zoo name) or ``spec`` (``path``, ``kind``, ``options``) or ``zoo`` (the
  members of a model schedule, smallest to largest); ``device``; ``dtype``.
- ``solver``: ``name`` (a solver of ``searchd.solvers``), ``options`` (checked against the
  solver's options).
- ``nfe`` or ``steps``: the budget of network evaluations, or the number of steps.
- ``space``: ``kind`` continuous | discrete | models | joint; ``budget_ms`` / ``budget_nfe``
  and ``timesteps`` (model schedules); ``warp`` logsnr | rho (``rho``) | flow (``shift``);
  ``endpoints`` fixed | free (``endpoint_range``); ``gap_ratio``; ``final_zero``;
  ``sigma_min``/``sigma_max`` overrides; ``grid`` (discrete); ``guidance`` (``kind`` none |
  constant | interval | steps: classifier-free guidance weights searched with the timesteps,
  ``w``, ``w_range``, ``one_band``, ``baseline_w``, ``paper_interval``).
- ``search``: ``algorithm`` (a searcher of ``SEARCHERS``); ``seed``; ``budget``
  (candidates); ``candidates_per_trial``; ``evolution`` (O2TDM's parameters,
  ``warm_start``); ``bayes`` (sampler); ``gits`` and ``ld3`` (the published methods'
  parameters); ``adaptive`` (a per-sample timestep predictor over a global schedule);
  ``predictor`` (OMS-DPM's pre-screen of offspring, evolution only).
- ``baselines``: schedule families with their parameters; ``gits`` and ``ld3`` are computed
  at run start with the ``search.gits`` / ``search.ld3`` settings.
- ``metric``: ``name`` fid | kid | teacher_distance | class_fid (class-conditional models:
  mean per-class FID, with an optional accuracy floor in ``options``); ``features`` digits |
  inception | pixels; ``reference`` (an ``.npz`` path or ``exact:<n>``).
- ``samples``: per candidate; search, held-out and reference seed bases (disjoint ranges).
- ``workers``: ``num_workers``, ``num_gpus_per_worker``, ``cpus_per_worker``.
- ``run_dir``: where the run is written (null: ``runs/<run id>``, chosen when it starts).
- ``report``: plots, sample grid, confidence level, progress display.

This module imports neither Ray nor torch at import time (the solver registry is imported
when a solver name is validated).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
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

from searchd.config.errors import ConfigError, FieldError, format_validation_error
from searchd.methods import ANCHORS
from searchd.schedules.baselines import AYS_TABLES, FAMILIES, GRIDS, family_params
from searchd.searchers.registry import SEARCHERS

EXACT_REFERENCE = re.compile(r"^exact:(\d+)$")
DEVICE = re.compile(r"^(cpu|auto|mps|cuda(:\d+)?)$")


# The largest nfe or steps a configuration may ask for.
MAX_NFE = 1000


# Solvers (searchd.solvers, imported when first needed) ------------------------------------------
def solver_names() -> list[str]:
    """The solver registry's names (``searchd.solvers.SOLVERS``)."""
    from searchd.solvers import SOLVERS

    return list(SOLVERS)


def solver_nfe(solver: str, n_steps: int, final_zero: bool = True) -> int:
    """Network evaluations a schedule of ``n_steps`` costs with ``solver``."""
    from searchd.solvers import nfe

    return int(nfe(solver, n_steps, final_zero=final_zero))


def steps_for_nfe(solver: str, nfe: int, final_zero: bool = True) -> int | None:
    """Most steps whose cost fits in ``nfe`` evaluations (None if not even one step fits).

    A solver's cost grows with its steps, so this is a bisection: O(log nfe) cost queries."""
    if solver_nfe(solver, 1, final_zero) > nfe:
        return None
    lo, hi = 1, max(1, int(nfe))  # cost(lo) <= nfe; every step costs >= 1 call
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if solver_nfe(solver, mid, final_zero) <= nfe:
            lo = mid
        else:
            hi = mid - 1
    return lo


# Sections -----------------------------------------------------------------------------------
def _is_file(path: str) -> bool:
    """``Path(path).is_file()``, False for a name the OS refuses (too long, a NUL byte)."""
    try:
        return Path(path).is_file()
    except (OSError, ValueError):
        return False


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
    # kind edm / generic run code from their file (unpickling, importing): load them only
    # when true (the command's --trust-remote-code sets it)
    trust_remote_code: bool = False

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
    options: dict[str, Any] = {}  # passed to solve(..., **options); the solver's own options

    @model_validator(mode="after")
    def _options(self) -> SolverConfig:
        from searchd.solvers import SOLVERS

        try:
            SOLVERS[self.name].resolve(self.options)
        except ValueError as e:
            raise FieldError("options", self.options, str(e)) from None
        return self


class GuidanceConfig(Section):
    """Guidance weights per step searched with the timesteps
    (``searchd.schedules.guidance_spaces``); the model must be conditional with an
    unconditional mode (checked when it is loaded)."""

    kind: Literal["none", "constant", "interval", "steps"] = "none"
    # constant: every step w; interval: w inside a searched (sigma_lo, sigma_hi], 1 outside;
    # steps: a free weight per step
    w: float | None = Field(None, ge=0)  # constant: the weight; interval: fixed w (null: search)
    w_range: tuple[float, float] = (0.0, 4.0)  # interval with w null, and steps: searched range
    one_band: float = Field(0.05, ge=0)  # steps: weights this close to 1 become 1 (no uncond.)
    baseline_w: list[float] = [1.0, 2.0]  # constant-guidance baselines, on every family
    # (kind constant: its own w only)
    paper_interval: bool = True  # also the NeurIPS 2024 interval (w 2 on (0.28, 1.61])

    @field_validator("baseline_w")
    @classmethod
    def _baseline_w(cls, v: list[float]) -> list[float]:
        bad = [w for w in v if not (0 <= w < float("inf"))]
        if bad:
            raise ValueError(f"weights must be finite and >= 0; got {bad[0]!r}")
        return v

    @model_validator(mode="after")
    def _family(self) -> GuidanceConfig:
        lo, hi = self.w_range
        if not 0 <= lo < hi < float("inf"):
            raise FieldError("w_range", list(self.w_range), "need 0 <= w_min < w_max")
        if self.kind == "constant" and self.w is None:
            raise FieldError("w", None, "guidance kind 'constant' needs the weight w")
        searched = self.kind == "steps" or (self.kind == "interval" and self.w is None)
        allowed = ([1.0, self.w] if self.kind == "interval" and self.w is not None else None)
        for w in self.baseline_w:
            if searched and not lo <= w <= hi:
                raise FieldError("baseline_w", self.baseline_w,
                                 f"{w:g} is outside w_range [{lo:g}, {hi:g}]: the searched "
                                 "family cannot hold it")
            if allowed is not None and w not in allowed:
                raise FieldError("baseline_w", self.baseline_w,
                                 f"{w:g}: an interval of fixed w = {self.w:g} holds constant "
                                 "weights 1 and w only")
        if self.kind == "steps" and not self.one_band < (hi - lo) / 2:
            raise FieldError("one_band", self.one_band,
                             f"must be below (w_max - w_min) / 2 = {(hi - lo) / 2:g}")
        return self


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
    guidance: GuidanceConfig = Field(default_factory=GuidanceConfig)  # searched guidance
    # The solver's per-step strategy searched with the timesteps (searchd.solvers.strategy):
    # continuous/discrete spaces of dpmpp_2m, dpmpp_3m, unipc, ipndm, deis.
    strategy: bool = False
    max_order: int | None = Field(None, ge=1, le=4)  # strategy: highest multistep order

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
        if self.strategy and self.model_schedule:
            raise FieldError("strategy", True, f"a per-step strategy goes with space.kind "
                             f"continuous or discrete, not {self.kind!r}")
        if self.guidance.kind != "none" and self.kind not in ("continuous", "discrete"):
            raise FieldError("guidance", self.guidance.kind,
                             f"guidance is searched with space.kind continuous or discrete, "
                             f"not {self.kind!r}")
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
    warm_start: list[str] = []  # computed schedules (gits, ld3) opening generation 0
    # space: the space's own mutation (each parameter moves with m_prob); level: one level
    # moves between its neighbours and the evaluators share the common prefixes (issue 22:
    # measured 1.13-1.22x faster, held-out worse on short warm-started searches; an option)
    mutation: Literal["space", "level"] = "space"
    # The last ``refine`` candidates of the budget: a local (1 + refine_batch) search around
    # the best candidate so far, its step from refine_scale[0] to refine_scale[1] (decay:
    # log-linearly; success: the 1/5 rule). 0: off. benchmarks/results/quality.md (flow).
    refine: int = Field(0, ge=0)
    refine_batch: int = Field(1, ge=1)  # 1: sequential (what was measured); more: parallel
    refine_scale: tuple[float, float] = (0.1, 0.01)
    refine_rule: Literal["decay", "success"] = "decay"

    @field_validator("refine_scale")
    @classmethod
    def _refine_scale(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not v[0] >= v[1] > 0:
            raise ValueError("a pair [first, last] with first >= last > 0")
        return v

    @field_validator("warm_start")
    @classmethod
    def _anchors(cls, v: list[str]) -> list[str]:
        unknown = [a for a in v if a not in ANCHORS]
        if unknown:
            raise ValueError(f"unknown {unknown}; allowed: {', '.join(ANCHORS)}")
        if len(set(v)) != len(v):
            raise ValueError(f"each of {', '.join(ANCHORS)} at most once")
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

    def check(self, cfg: SearchConfig) -> None:
        """With ``search.algorithm: evolution``: generation 0 holds the baselines and the
        warm-start schedules."""
        if cfg.search.algorithm != "evolution":
            return
        if self.mutation == "level" and cfg.space.kind in ("models", "joint"):
            raise FieldError("search.evolution.mutation", self.mutation,
                             f"the level-local mutation moves noise levels only; space.kind "
                             f"{cfg.space.kind!r} needs mutation: space")
        if self.mutation == "level" and cfg.space.guidance.kind != "none":
            raise FieldError("search.evolution.mutation", self.mutation,
                             f"the level-local mutation moves noise levels only; "
                             f"space.guidance.kind {cfg.space.guidance.kind!r} needs "
                             f"mutation: space")
        names = [b.label for b in cfg.baselines]
        n_seeds = len(names) + len([a for a in self.warm_start
                                    if a not in cfg.baseline_families])
        if n_seeds > self.population_num:
            raise FieldError(
                "baselines", names + list(self.warm_start),
                f"{n_seeds} baselines and warm-start seeds do not fit in "
                f"search.evolution.population_num = {self.population_num}",
            )

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
    steps: int = Field(300, ge=1)  # optimizer steps of the first fit (from scratch)
    warm_steps: int = Field(60, ge=0)  # steps of each later fit, from the last one's weights
    # (0: every fit from scratch); benchmarks/results/predictor_warm.md


class RacingConfig(Section):
    """Racing before the winner is fixed (searchd.loop.racing): the top_k candidates
    re-scored on ``blocks`` fresh blocks of search seeds; the winner chosen on the pooled
    blocks. Evolution, random and Bayes; 0 turns it off."""

    top_k: int = Field(8, ge=0)
    blocks: int = Field(1, ge=1)


class HalvingConfig(Section):
    """Successive halving on samples per candidate within each batch
    (searchd.loop.racing.HalvingScorer); rungs 1 turns it off."""

    rungs: int = Field(1, ge=1)
    eta: int = Field(2, ge=2)


class GitsConfig(Section):
    """GITS (searchd.methods.gits): DP over a teacher trajectory on a fine grid."""

    warmup: int = Field(256, ge=1)  # warm-up samples: search seeds seed_base + [0, warmup)
    grid_points: int = Field(61, ge=3)  # levels of the teacher grid (polynomial rho)
    rho: float = Field(7.0, gt=0)  # exponent of the teacher grid
    teacher_solver: SolverName = "heun"  # solver of the teacher trajectory
    teacher_substeps: int = Field(1, ge=1)  # teacher steps per grid interval
    metric: Literal["dev", "l1", "l2"] = "dev"  # cost of a one-step jump
    coeff: float = Field(1.15, gt=0)  # DP weight ratio of consecutive steps
    student_solver: SolverName | None = None  # jumps costed with this solver; null: solver.name

    def check(self, cfg: SearchConfig) -> None:
        """When the run computes GITS (itself, or to start LD3): its warm-up noise comes
        from the search seeds, and its grid has a point per step at least."""
        anchors = cfg.anchors
        if "gits" in anchors and self.warmup > cfg.samples.per_candidate:
            raise FieldError("search.gits.warmup", self.warmup,
                             f"must be <= samples.per_candidate ({cfg.samples.per_candidate}): "
                             "warm-up noise comes from the search seeds")
        needs = "gits" in anchors or ("ld3" in anchors and cfg.search.ld3.init == "gits")
        if needs and self.grid_points - 1 < cfg.n_steps:
            raise FieldError("search.gits.grid_points", self.grid_points,
                             f"a grid of {self.grid_points} points allows at most "
                             f"{self.grid_points - 1} steps; steps = {cfg.n_steps}")


class Ld3Config(Section):
    """LD3 (searchd.methods.ld3): the schedule learned by gradient descent through the solver."""

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

    def check(self, cfg: SearchConfig) -> None:
        """When the run computes LD3: its training noise comes from the search seeds."""
        if "ld3" in cfg.anchors and self.train > cfg.samples.per_candidate:
            raise FieldError("search.ld3.train", self.train,
                             f"must be <= samples.per_candidate ({cfg.samples.per_candidate}): "
                             "training noise comes from the search seeds")


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
        if v.endswith(".json") and _is_file(v):
            return v
        raise ValueError(f"allowed: {', '.join(ANCHORS)}, or the path of an existing best.json")

    @property
    def global_anchor(self) -> str | None:
        return self.global_schedule if self.global_schedule in ANCHORS else None

    def check(self, cfg: SearchConfig) -> None:
        """With ``search.algorithm: adaptive``: a continuous space, training noise from the
        search seeds, and reference statistics to score the predictor by. (An earlier run's
        best.json as the global schedule is checked against this run before Ray starts:
        ``searchd.loop.adaptive.check_global_best``.)"""
        if cfg.search.algorithm != "adaptive":
            return
        n = cfg.samples.per_candidate
        if cfg.space.kind != "continuous":
            raise FieldError("space.kind", cfg.space.kind,
                             "search.algorithm adaptive predicts continuous noise levels: "
                             "allowed: continuous")
        if self.train > n:
            raise FieldError("search.adaptive.train", self.train,
                             f"must be <= samples.per_candidate ({n}): training noise comes "
                             "from the search seeds")
        if cfg.metric.reference is None:
            raise FieldError("metric.reference", None,
                             "search.algorithm adaptive scores its predictor by held-out FID: "
                             "give reference statistics (a path or exact:<n>)")


class SearchSection(Section):
    """Which algorithm, its parameters, and the candidate budget."""

    algorithm: str = "evolution"  # a searcher of searchd.searchers.SEARCHERS
    seed: int = 0  # the searcher's random seed
    budget: int | None = Field(None, ge=1)  # candidates in all; null: population x generations
    candidates_per_trial: int | None = Field(None, ge=1)  # per Tune trial; null: population
    evolution: EvolutionConfig = Field(default_factory=EvolutionConfig)
    bayes: BayesConfig = Field(default_factory=BayesConfig)
    predictor: PredictorSection = Field(default_factory=PredictorSection)
    gits: GitsConfig = Field(default_factory=GitsConfig)
    ld3: Ld3Config = Field(default_factory=Ld3Config)
    adaptive: AdaptiveConfig = Field(default_factory=AdaptiveConfig)
    racing: RacingConfig = Field(default_factory=RacingConfig)
    halving: HalvingConfig = Field(default_factory=HalvingConfig)

    @property
    def race_k(self) -> int:
        """Candidates the race re-scores: ``racing.top_k``, at most a quarter of the budget
        (a small search is not spent on its race); 0 (no race) below 2 or for the
        algorithms without a search of their own."""
        searched = self.algorithm in ("evolution", "random", "bayes")
        k = min(self.racing.top_k, int(self.budget or 0) // 4)
        return k if searched and k >= 2 else 0

    @property
    def race_blocks(self) -> int:
        """Fresh blocks of search seeds the race uses (0: no race)."""
        return self.racing.blocks if self.race_k else 0

    @field_validator("algorithm")
    @classmethod
    def _algorithm(cls, v: str) -> str:
        if v not in SEARCHERS:
            raise ValueError(f"allowed algorithms: {', '.join(SEARCHERS)}")
        return v

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
        # A computed schedule (gits, ld3) takes its parameters from search.gits / search.ld3.
        allowed = () if self.family in ANCHORS else family_params(self.family)
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


CLASS_FID_OPTIONS = ("accuracy_floor", "floor_margin", "penalty_per_point")


class MetricConfig(Section):
    """What a candidate is scored by."""

    name: Literal["fid", "kid", "teacher_distance", "class_fid"] = "fid"
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
        if "://" not in v and not _is_file(v):
            raise ValueError("no such file; give an .npz with mu and sigma, or exact:<n>")
        return v

    @model_validator(mode="after")
    def _needs_reference(self) -> MetricConfig:
        if self.name in ("fid", "kid", "class_fid") and self.reference is None:
            raise FieldError("reference", None,
                             f"{self.name} needs reference statistics: a path or exact:<n>")
        self._class_fid()
        return self

    def _class_fid(self) -> None:
        """class_fid (searchd.evaluation.conditional): the digits classifier, and its
        objective's options (``accuracy_floor``, ``floor_margin``, ``penalty_per_point``)."""
        given = [k for k in CLASS_FID_OPTIONS if k in self.options]
        if self.name != "class_fid":
            if given:
                raise FieldError(f"options.{given[0]}", self.options[given[0]],
                                 "applies to metric.name class_fid only")
            return
        if self.features != "digits":
            raise FieldError("features", self.features, "class_fid needs a classifier of the "
                             "conditioning classes: the digits network (features: digits)")
        floor = self.options.get("accuracy_floor")
        if floor is not None and not (
                (isinstance(floor, str) and floor.strip())
                or (isinstance(floor, int | float) and not isinstance(floor, bool)
                    and 0 <= floor <= 1)):
            raise FieldError("options.accuracy_floor", floor, "give a number in [0, 1] (an "
                             "absolute floor) or a baseline's name (its accuracy), or null")
        margin = self.options.get("floor_margin")  # '<k>se': conditional.MARGIN_SE's form
        if isinstance(margin, str) and not re.match(r"^\s*(\d+(\.\d*)?|\.\d+)\s*se\s*$",
                                                    margin):
            raise FieldError("options.floor_margin", margin, "give a finite number >= 0 or "
                             "'<k>se' (k standard errors of the floor's accuracy)")
        for k in ("floor_margin", "penalty_per_point"):
            v = self.options.get(k)
            if k == "floor_margin" and isinstance(v, str):
                continue
            if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)
                                  or not 0 <= v < float("inf")):
                raise FieldError(f"options.{k}", v, "must be a finite number >= 0")

    @property
    def class_objective(self) -> dict[str, Any]:
        """The objective options of class_fid (``conditional.resolve_objective``)."""
        return {k: self.options[k] for k in CLASS_FID_OPTIONS if k in self.options}

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


class SearchConfig(Section):
    """A whole search."""

    model: ModelConfig
    solver: SolverConfig = Field(default_factory=SolverConfig)
    # The evaluation budget (resolved to the actual cost) or the number of steps. Bounded:
    # searchd searches few-step schedules, and an unbounded value (a fuzzed nfe=10**9) made
    # the resolution below loop for minutes before any message.
    nfe: int | None = Field(None, ge=1, le=MAX_NFE)
    steps: int | None = Field(None, ge=1, le=MAX_NFE)
    space: SpaceConfig = Field(default_factory=SpaceConfig)
    search: SearchSection = Field(default_factory=SearchSection)
    baselines: list[Baseline] = Field(
        default_factory=lambda: [BaselineConfig(**b) for b in DEFAULT_BASELINES]
    )
    metric: MetricConfig = Field(default_factory=lambda: MetricConfig(reference="exact:10000"))
    samples: SamplesConfig = Field(default_factory=SamplesConfig)
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    run_dir: str | None = None  # null: runs/<run id>, chosen when the run starts
    report: ReportConfig = Field(default_factory=ReportConfig)

    @model_validator(mode="after")
    def _cross(self) -> SearchConfig:
        self._resolve_steps()
        levels = self.steps if self.space.final_zero else self.steps + 1  # type: ignore[operator]
        if self.space.kind == "continuous" and levels < 2:
            raise FieldError("steps", self.steps,
                             "a continuous space needs >= 2 noise levels besides the final 0")
        self._check_baselines()
        # Each algorithm's own cross-checks, beside its section.
        sections = self.search
        for section in (sections.evolution, sections.gits, sections.ld3, sections.adaptive):
            section.check(self)
        self._check_seed_ranges()
        if (self.model.zoo is not None) != self.space.model_schedule:
            raise FieldError("space.kind", self.space.kind,
                             "model.zoo goes with space.kind models or joint, and they need it")
        if self.space.guidance.kind != "none" and self.search.algorithm in ("adaptive",):
            raise FieldError("space.guidance.kind", self.space.guidance.kind,
                             "search.algorithm adaptive predicts timesteps only; set none")
        if self.space.strategy:
            self._check_strategy()
        if self.space.kind == "joint" and self.space.grid is not None:
            raise FieldError("space.grid", self.space.grid,
                             "a joint space searches continuous timesteps; set null")
        if self.model.device.startswith("cuda") and self.workers.num_gpus_per_worker == 0:
            raise FieldError("workers.num_gpus_per_worker", 0.0,
                             f"must be > 0 for model.device = {self.model.device!r}")
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

    def _check_baselines(self) -> None:
        names = [b.label for b in self.baselines]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise FieldError("baselines", dup, "baseline names must be unique; set name:")
        fams = self.baseline_families
        for a in ANCHORS:
            if fams.count(a) > 1:
                raise FieldError("baselines", fams, f"family {a!r} at most once")
        if len(names) > (self.search.budget or 0):
            raise FieldError("search.budget", self.search.budget,
                             f"must be >= the number of baselines ({len(names)})")

    def _check_strategy(self) -> None:
        """``space.strategy``: a solver with per-step variants, an order it offers, and a
        searching algorithm (``searchd.strategy_codes.FAMILIES``)."""
        from searchd.strategy_codes import FAMILIES

        family = FAMILIES.get(self.solver.name)
        if family is None:
            raise FieldError("space.strategy", True,
                             f"solver {self.solver.name!r} has no per-step variant; allowed "
                             f"solvers: {', '.join(FAMILIES)} (or space.strategy: false)")
        if self.space.max_order is not None and self.space.max_order not in family[0]:
            raise FieldError("space.max_order", self.space.max_order,
                             f"{self.solver.name} offers orders {list(family[0])}")
        if self.search.algorithm == "adaptive":
            raise FieldError("space.strategy", True,
                             "search.algorithm adaptive predicts timesteps only; set false")
        if self.search.algorithm == "evolution" and self.search.evolution.mutation == "level":
            raise FieldError("search.evolution.mutation", "level",
                             "the level-local mutation moves noise levels only; "
                             "space.strategy needs mutation: space")

    def _check_seed_ranges(self) -> None:
        s = self.samples
        ranges = [
            ("samples.seed_base", s.seed_base, s.per_candidate),
            ("samples.heldout_seed_base", s.heldout_seed_base, s.heldout),
        ]
        if self.search.race_blocks:  # the race's fresh blocks follow the search's seeds
            ranges.append(("search.racing.blocks", s.seed_base + s.per_candidate,
                           s.per_candidate * self.search.race_blocks))
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


# Loading --------------------------------------------------------------------------------------


def validate_config(raw: Mapping[str, Any]) -> SearchConfig:
    """Validate a raw mapping; problems raise ``ConfigError`` (one line each)."""
    try:
        return SearchConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, SearchConfig)) from None
