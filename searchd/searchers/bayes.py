"""Bayesian search: Optuna's TPE or GP sampler, through Optuna's ask/tell interface.

``BayesSearcher`` runs an Optuna study over the space's flat parameters (``u0 ..``, each a
``FloatDistribution(0, 1)``) and keeps its own state as plain data instead of a pickle:

- every Optuna trial is recorded in number order as ``{params, state, value, inner_id}``;
- ``set_state`` builds a fresh in-memory study and replays that record in order: finished
  trials through ``optuna.trial.create_trial`` + ``study.add_trial``, running ones by
  enqueueing their parameters and asking again, so the trial numbers and the pending trials
  are exactly those of the original study;
- the sampler is re-created for every trial with a seed derived from (seed, trial number)
  (``TrialSeededSampler``). TPE and GP keep nothing between trials but their random state,
  so with the same history a restored search suggests exactly what the original would have.

The baselines are suggested first, as their exact schedules, with the Optuna trial (an
enqueued one) holding their encoded parameters.

A failed, NaN or inf result is told to Optuna as a failed trial (the samplers ignore it) and
counts as +inf here. A suggestion that decodes to a candidate already proposed is not
handed out again: its Optuna trial is told the known value (or failed, if that candidate is
still pending) and the sampler is asked again, up to ``max_retries`` times, after which a
uniform parameter vector of an unseen candidate, drawn from a generator seeded by (seed, trial
number), is enqueued.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import optuna
from optuna.distributions import BaseDistribution, FloatDistribution
from optuna.samplers import BaseSampler
from optuna.study import Study
from optuna.trial import FrozenTrial, Trial, TrialState

from searchd.schedule import Schedule
from searchd.schedules.spaces import Space, param_names, with_meta
from searchd.searchers.base import FINISHED, Next, ScheduleSearcher

SamplerName = Literal["tpe", "gp"]
SAMPLERS: tuple[str, ...] = ("tpe", "gp")
STUDY_NAME = "searchd"
# Uniform draws tried for an unseen candidate once the sampler keeps repeating itself.
MAX_RANDOM_DRAWS = 100

logger = logging.getLogger(__name__)


def trial_seed(seed: int, number: int) -> int:
    """Seed of the sampler used for Optuna trial ``number`` (independent streams per trial)."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


class TrialSeededSampler(BaseSampler):
    """An Optuna sampler re-created, with its own seed, for every trial.

    ``factory(seed)`` builds the real sampler (TPE, GP). What it suggests for trial n then
    depends only on the study's trials and on (seed, n), never on the samplers' past, which
    is what lets a search restored from plain data continue exactly.
    """

    def __init__(self, factory: Callable[[int], BaseSampler], seed: int) -> None:
        self._factory = factory
        self._seed = seed
        self._number: int | None = None
        self._sampler: BaseSampler | None = None

    def _for(self, trial: FrozenTrial) -> BaseSampler:
        if self._sampler is None or self._number != trial.number:
            self._sampler = self._factory(trial_seed(self._seed, trial.number))
            self._number = trial.number
        return self._sampler

    def infer_relative_search_space(
        self, study: Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return self._for(trial).infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return self._for(trial).sample_relative(study, trial, search_space)

    def sample_independent(
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        return self._for(trial).sample_independent(study, trial, param_name, param_distribution)

    def before_trial(self, study: Study, trial: FrozenTrial) -> None:
        self._for(trial).before_trial(study, trial)

    def after_trial(
        self,
        study: Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self._for(trial).after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        """Nothing to do: every trial gets its own seed by construction."""


class BayesSearcher(ScheduleSearcher):
    """Optuna TPE/GP search on a space's flat parameters, through ``OptunaSearch``.

    Args:
        space: search space (any space of flat parameters in [0, 1]^dim).
        metric, mode: what to optimize.
        sampler: "tpe" or "gp".
        num_samples: candidates in all, seeds included.
        seed: seed of the samplers (per trial, see ``TrialSeededSampler``).
        seeds: schedules suggested first (the baselines).
        n_startup_trials: random trials before the model-based sampler takes over.
        max_retries: re-asks when a suggestion repeats a known candidate.
    """

    algorithm = "bayes"

    def __init__(
        self,
        space: Space,
        metric: str = "fid",
        mode: str = "min",
        sampler: SamplerName = "tpe",
        num_samples: int = 100,
        seed: int = 0,
        seeds: Sequence[Schedule] = (),
        *,
        n_startup_trials: int = 10,
        max_retries: int = 8,
    ) -> None:
        super().__init__(space, metric, mode)
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler = {sampler!r}; allowed: {list(SAMPLERS)}")
        if space.dim == 0:
            raise ValueError("the space has no parameters; there is nothing to optimize")
        if num_samples < 1:
            raise ValueError(f"num_samples = {num_samples}; it must be >= 1")
        self.sampler = sampler
        self.num_samples = num_samples
        self.seed = seed
        self.n_startup_trials = n_startup_trials
        self.max_retries = max_retries
        self._names = param_names(space.dim)
        self._seed_queue = self._prepare_seeds(seeds, "baseline")
        self._trials: list[dict[str, Any]] = []  # one per Optuna trial, by trial number
        self._next_inner = 0
        self._build_study()

    # Optuna plumbing ----------------------------------------------------------------------
    def _make_sampler(self, seed: int) -> BaseSampler:
        if self.sampler == "tpe":
            return optuna.samplers.TPESampler(seed=seed, n_startup_trials=self.n_startup_trials)
        # The objective is a deterministic function of the schedule (every candidate is
        # scored on the same noise seeds), and fitting the kernel without a noise term is
        # what keeps a GP fitted from scratch at every trial from failing.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.GPSampler(
                seed=seed, n_startup_trials=self.n_startup_trials, deterministic_objective=True
            )

    def _build_study(self) -> None:
        """A fresh in-memory study over the space's parameters, and no trial asked yet."""
        optuna.logging.set_verbosity(optuna.logging.WARNING)  # no line per trial
        sampler = TrialSeededSampler(self._make_sampler, self.seed)
        self._study = optuna.create_study(
            storage=optuna.storages.InMemoryStorage(),
            sampler=sampler,
            pruner=optuna.pruners.NopPruner(),
            study_name=STUDY_NAME,
            direction="minimize" if self.mode == "min" else "maximize",
        )
        self._distributions = {name: FloatDistribution(0.0, 1.0) for name in self._names}
        self._running: dict[str, Trial] = {}  # inner id -> the Optuna trial being scored

    @property
    def study(self) -> Study:
        """The Optuna study (read it; do not add trials behind the searcher's back)."""
        return self._study

    def _ask(self, fixed: dict[str, float] | None = None) -> tuple[str, dict[str, float]]:
        """Create the next Optuna trial (with ``fixed`` parameters if given)."""
        if fixed is not None:
            self._study.enqueue_trial(fixed)
        inner_id = f"optuna-{self._next_inner}"
        self._next_inner += 1
        trial = self._study.ask(fixed_distributions=self._distributions)
        self._running[inner_id] = trial
        params = {k: float(v) for k, v in trial.params.items()}
        self._trials.append(
            {"inner_id": inner_id, "params": params, "state": "running", "value": None}
        )
        return inner_id, params

    def _tell(self, inner_id: str, value: float | None) -> None:
        """Report a finished Optuna trial: a finite value, or None for a failure."""
        trial = self._running.pop(inner_id)
        if value is None:
            self._study.tell(trial, None, state=TrialState.FAIL)
        else:
            self._study.tell(trial, value, state=TrialState.COMPLETE)
        rec = next(t for t in reversed(self._trials) if t["inner_id"] == inner_id)
        rec["state"], rec["value"] = ("fail", None) if value is None else ("complete", value)

    # Algorithm ---------------------------------------------------------------------------
    def _next(self, trial_id: str) -> Next:
        if self.num_suggested >= self.num_samples:
            return FINISHED
        known = {h["id"]: h["value"] for h in self._history}
        for attempt in range(self.max_retries + 1):
            if self._seed_queue:
                base = self._seed_queue.pop(0)
                inner_id, _ = self._ask(self.space.params(base))
                sched = with_meta(base, searcher=self.algorithm, parents=[])
            elif attempt == self.max_retries:
                params = self._unseen_random_params()
                if params is None:
                    return FINISHED  # even random draws repeat: the space is exhausted
                inner_id, params = self._ask(params)
                sched = with_meta(self.space.decode(params), origin="random",
                                  searcher=self.algorithm, parents=[])
            else:
                inner_id, params = self._ask()
                sched = with_meta(self.space.decode(params), origin="bayes",
                                  searcher=self.algorithm, sampler=self.sampler, parents=[])
            if sched.id in self._seen:
                # Nothing is scored twice: tell Optuna what is known, and ask again.
                self._tell(inner_id, known.get(sched.id))
                continue
            return sched, {"inner_id": inner_id}
        return FINISHED

    def _unseen_random_params(self) -> dict[str, float] | None:
        """Uniform parameters of a candidate not proposed yet (seeded by the trial number)."""
        rng = np.random.default_rng([self.seed, len(self._trials)])
        for _ in range(MAX_RANDOM_DRAWS):
            u = rng.random(self.space.dim)
            if self.space.decode(u).id not in self._seen:
                return dict(zip(self._names, (float(v) for v in u)))
        return None

    def _on_result(self, trial_id: str, record: dict[str, Any], value: float | None) -> None:
        self._tell(record["extra"]["inner_id"], value)

    # State -------------------------------------------------------------------------------
    def _algo_state(self) -> dict[str, Any]:
        return {
            "trials": [dict(t, params=dict(t["params"])) for t in self._trials],
            "next_inner": self._next_inner,
            "seed_queue": [s.to_dict() for s in self._seed_queue],
            "params": {"sampler": self.sampler, "num_samples": self.num_samples,
                       "seed": self.seed, "n_startup_trials": self.n_startup_trials},
        }

    def _set_algo_state(self, state: Mapping[str, Any]) -> None:
        self._build_study()
        self._trials = []
        for t in state["trials"]:
            params = {k: float(v) for k, v in t["params"].items()}
            if t["state"] == "running":
                # Same number, same parameters, pending again under the same inner id.
                self._study.enqueue_trial(params)
                self._running[t["inner_id"]] = self._study.ask(
                    fixed_distributions=self._distributions)
            else:
                failed = t["state"] == "fail"
                self._study.add_trial(optuna.trial.create_trial(
                    state=TrialState.FAIL if failed else TrialState.COMPLETE,
                    value=None if failed else t["value"], params=params,
                    distributions=self._distributions,
                ))
            self._trials.append(dict(t, params=params))
        self._next_inner = int(state["next_inner"])
        self._seed_queue = [Schedule.from_dict(d) for d in state["seed_queue"]]
