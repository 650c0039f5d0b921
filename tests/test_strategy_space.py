"""The solver-schedule space (searchd.schedules.strategy_space) and what carries a strategy:
the searchers, the OMS-DPM predictor, best.json's export and ``searchd.sample``."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

from searchd.evaluation import CandidateResult
from searchd.loop import SearchLoop
from searchd.schedule import Schedule
from searchd.schedules.spaces import ContinuousSpace, DiscreteSpace
from searchd.schedules.strategy_space import StrategySpace
from searchd.searchers.bayes import BayesSearcher
from searchd.searchers.evolution import EvolutionSearcher
from searchd.searchers.predictor import SchedulePredictor, kendall_tau
from searchd.searchers.random_search import RandomSearcher
from searchd.solvers.strategy import default_strategy


def space(solver: str = "unipc", n: int = 5) -> StrategySpace:
    return StrategySpace(ContinuousSpace(n, 0.002, 80.0, True, solver=solver))


def test_decode_encode_and_canonical_points():
    sp = space("unipc")
    assert sp.dim == 3 + 5 + 5  # gaps, order per step, corrector per step
    rng = np.random.default_rng(0)
    for _ in range(20):
        s = sp.sample(rng)
        assert s.strategy is not None and len(s.strategy) == 5
        assert sp.check(s) is s
        again = sp.decode(sp.encode(s))
        assert again == s  # the same sigmas and the same strategy: the same id
        assert sp.decode(sp.params(s)) == s
        assert sp.decode({"schedule": s.to_dict()}) == s
    # The corner of the cube with every order 3 and every corrector on.
    u = np.concatenate([np.full(3, 0.5), np.ones(10)])
    assert sp.decode(u).strategy == ("1c", "2c", "3c", "3c", "1")
    # A plain schedule (a baseline) is the plain solver's point of the space.
    plain = Schedule(sp.timesteps.decode(np.full(3, 0.5)).sigmas, solver="unipc")
    assert sp.check(plain) is plain
    assert sp.project(plain).strategy == default_strategy("unipc", 5, True)
    with pytest.raises(ValueError, match="has no per-step strategy"):
        StrategySpace(ContinuousSpace(4, 0.002, 80.0, solver="euler"))
    small = StrategySpace(ContinuousSpace(4, 0.002, 80.0, solver="dpmpp_2m"), max_order=2)
    with pytest.raises(ValueError, match=r"strategy\[2\] = '3' uses order 3; this space "
                                         r"offers \[1, 2\]"):
        small.check(Schedule(plain.sigmas[[0, 1, 2, 3, 5]], solver="dpmpp_2m",
                             strategy=("1", "2", "3", "1")))


def test_mutation_and_crossover_stay_in_the_space():
    grid = np.geomspace(0.002, 80.0, 100)
    for sp in (space("dpmpp_2m"), space("ipndm"),
               StrategySpace(DiscreteSpace(5, grid, solver="unipc"))):
        rng = np.random.default_rng(1)
        a, b = sp.sample(rng), sp.sample(rng)
        seen = set()
        for _ in range(30):
            m = sp.mutate(a, rng, 0.3, 0.1)
            c = sp.crossover(a, b, rng)
            for x in (m, c):
                sp.check(x)
                seen.add(x.strategy)
        assert len(seen) > 3  # the strategy half moves


def _objective(s: Schedule) -> float:
    """Lower for higher orders (a stand-in with a known optimum): the strategy's mean
    order, negated, plus a small pull of sigma_1 towards 10."""
    codes = s.strategy or default_strategy(s.solver, s.n_steps, s.final_zero)
    orders = [int(c[0]) for c in codes]
    return -float(np.mean(orders)) + 0.01 * abs(np.log(s.sigmas[1] / 10.0))


class Scorer:
    def score(self, schedules, seeds):
        return [CandidateResult(s.id, "ok", {"fid": _objective(s)}, nfe=5,
                                n_samples=len(seeds), seed_base=seeds[0], wall_s=0.0,
                                samples_per_s=0.0) for s in schedules]


@pytest.mark.parametrize("algorithm", ["evolution", "random", "bayes"])
def test_every_searcher_searches_the_strategies(algorithm):
    sp = space("dpmpp_2m")
    base = [Schedule(sp.timesteps.decode(np.full(3, 0.5)).sigmas, solver="dpmpp_2m",
                     meta={"origin": "baseline", "name": "plain"})]
    if algorithm == "evolution":
        searcher = EvolutionSearcher(sp, "fid", "min", population_num=8, select_num=3,
                                     mutation_num=3, crossover_num=2, max_epochs=4, seed=0,
                                     seeds=base, predictor_top_fraction=0.5,
                                     predictor_min_train=6)
    elif algorithm == "random":
        searcher = RandomSearcher(sp, "fid", "min", num_samples=32, seed=0, seeds=base)
    else:
        searcher = BayesSearcher(sp, "fid", "min", num_samples=32, seed=0, seeds=base,
                                 n_startup_trials=8)
    loop = SearchLoop(searcher, range(4), batch_size=8)
    loop.run(Scorer())
    scored = loop.scored()
    strategies = {s.strategy for s, _ in scored if s.strategy is not None}
    assert len(strategies) > 5
    best = searcher.best
    assert best["value"] == min(v for _, v in scored)
    assert best["value"] < _objective(Schedule(base[0].sigmas, solver="dpmpp_2m",
                                               strategy=default_strategy("dpmpp_2m", 5)))


def test_the_predictor_sees_the_per_step_choices():
    """Same sigmas, values set by the strategy alone: a predictor with strategy tokens
    ranks unseen strategies; one without sees identical schedules."""
    sp = space("unipc")
    rng = np.random.default_rng(3)
    sig = sp.timesteps.decode(np.full(3, 0.5)).sigmas
    pool = list({s.id: s for s in (Schedule(sig, solver="unipc",
                                            strategy=sp._codes_of_u(rng.random(10)))
                                   for _ in range(200))}.values())
    value = [sum(int(c[0]) + 2 * c.endswith("c") for c in s.strategy) for s in pool]
    train, test = pool[:40], pool[40:]
    with_s = SchedulePredictor(1, 0, strategies=True).fit(train, value[:40])
    tau = kendall_tau(with_s.score(test), value[40:])
    assert tau > 0.6, tau
    without = SchedulePredictor(1, 0).fit(train, value[:40]).score(test)
    assert np.ptp(without) < 1e-9  # it cannot tell them apart


def test_best_json_export_and_sample_run_the_strategy(tmp_path, capsys):
    from searchd.export import export_best, snippet, usage_section
    from searchd.models import load
    from searchd.noise import make_noise, seed_range
    from searchd.sample import main
    from searchd.solvers import solve

    den = load("gmm-digits-k8")
    sig = np.array([80.0, 8.0, 1.0, 0.1, 0.0])
    s = Schedule(sig, solver="unipc", strategy=("1c", "2", "3c", "1"))
    usage = usage_section(s, {})
    for tool in ("diffusers", "kdiffusion", "comfy"):
        assert "per-step solver strategy (unipc steps 1c,2,3c,1)" in usage[tool]["error"]
    assert "strategy=['1c', '2', '3c', '1']" in usage["searchd"]["code"]
    best = {"sigmas": list(sig), "solver": "unipc", "strategy": list(s.strategy),
            "schedule": s.to_dict(), "model": "gmm-digits-k8", "usage": usage}
    with pytest.raises(ValueError, match="per-step solver strategy"):
        snippet(export_best(best, "diffusers"), "diffusers")
    with pytest.raises(ValueError, match="has no k-diffusion counterpart"):
        snippet(export_best(best, "kdiffusion"), "kdiffusion")
    path = tmp_path / "best.json"
    path.write_text(json.dumps(best))
    out = tmp_path / "grid.png"
    assert main(["--schedule", str(path), "--n", "64", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "strategy 1c 2 3c 1" in text
    fd = float(re.search(r"FD \(pixels, vs 64 exact samples\) (\S+)", text).group(1))
    # The same samples as solve with the strategy (and not the plain solver's).
    noise = make_noise(seed_range(0, 64), tuple(den.shape), dtype=torch.float32)
    x = solve(den, noise, torch.as_tensor(sig), solver="unipc", strategy=s.strategy)
    plain = solve(den, noise, torch.as_tensor(sig), solver="unipc")
    from searchd.sample import REFERENCE_SEED_OFFSET, frechet_distance_pixels

    ref = den.sample_data(seed_range(REFERENCE_SEED_OFFSET, 64))
    assert fd == pytest.approx(frechet_distance_pixels(x, ref), abs=5e-5)
    assert not torch.equal(x, plain)
    assert main(["--schedule", str(path), "--solver", "dpmpp_2m", "--n", "8",
                 "--out", str(out)]) == 2
    assert "cannot run it" in capsys.readouterr().err


def test_a_run_searches_the_strategy_space_and_records_it(tmp_path):
    from pathlib import Path

    import searchd
    from searchd.storage import RunDir, table_to_rows

    quick = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    overrides = ["solver.name=unipc", "nfe=4", "space.strategy=true",
                 "search.algorithm=random", "search.budget=12",
                 "search.candidates_per_trial=6", "samples.per_candidate=40",
                 "samples.heldout=40", "metric.reference=exact:200", "report.plots=false",
                 f"run_dir={tmp_path / 'run'}"]
    out = searchd.search(str(quick), overrides, engine="local")
    best = json.loads((tmp_path / "run" / "best.json").read_text())
    rows = table_to_rows(RunDir(str(tmp_path / "run")).read_evaluations())
    stored = [Schedule.from_dict(json.loads(r["schedule"])) for r in rows]
    assert sum(s.strategy is not None for s in stored) >= 6  # the baselines have none
    winner = Schedule.from_dict(best["schedule"])
    assert winner == out.schedule
    if winner.strategy is not None:
        assert best["strategy"] == list(winner.strategy)
        assert "error" in best["usage"]["diffusers"]
