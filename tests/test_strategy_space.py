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


# Solver strategies with guidance weights ----------------------------------------------------
def guided_space(solver: str = "unipc", n: int = 4) -> StrategySpace:
    from searchd.schedules.guidance_spaces import GuidedSpace, IntervalGuidance

    times = ContinuousSpace(n, 0.002, 80.0, True, solver=solver)
    return StrategySpace(GuidedSpace(times, IntervalGuidance((1.0, 4.0), 0.002, 80.0)))


def test_a_strategy_space_over_a_guided_space_searches_both():
    """Every point carries timesteps, guidance weights and a strategy; the halves round
    trip, mutate and cross over without losing the other; a plain guided schedule (a
    guided baseline) is the plain solver's point, a schedule without weights is refused."""
    sp = guided_space()
    assert sp.dim == 2 + 3 + 4 + 4  # gaps, interval (w, lo, hi), order and corrector per step
    rng = np.random.default_rng(1)
    pts = [sp.sample(rng) for _ in range(12)]
    for s in pts:
        assert s.strategy is not None and s.guidance is not None and len(s.guidance) == 4
        assert sp.check(s) is s
        assert sp.decode(sp.encode(s)) == s
        assert Schedule.from_json(s.to_json()) == s
    for a, b in zip(pts, pts[1:]):
        for c in (sp.mutate(a, rng, 0.5, 0.2), sp.crossover(a, b, rng)):
            assert c.strategy is not None and c.guidance is not None
            assert sp.check(c) is c
    # The id holds both: dropping either changes it.
    s = pts[0]
    import dataclasses

    assert len({s.id, dataclasses.replace(s, strategy=None).id,
                dataclasses.replace(s, guidance=None).id}) == 3
    plain = dataclasses.replace(s, strategy=None)
    assert sp.check(plain) is plain
    assert sp.project(plain).strategy == default_strategy("unipc", 4, True)
    with pytest.raises(ValueError, match="has no guidance weights"):
        sp.check(dataclasses.replace(s, guidance=None))


@pytest.mark.parametrize("solver", ["dpmpp_2m", "unipc"])
def test_strategies_with_guidance_run_bitwise_through_the_prefix_tree(solver):
    """Schedules sharing levels and weights but not strategies (and the reverse) through
    the tree: each is bitwise ``solve`` alone with both."""
    from searchd.models import load
    from searchd.models.conditional import row_conditioning
    from searchd.noise import make_noise
    from searchd.solvers import solve
    from searchd.solvers.prefix import solve_prefix_tree

    den = load("gmm-digits-cond", dtype=torch.float64)
    seeds = list(range(8))
    noise = make_noise(seeds, tuple(den.shape), dtype=torch.float64)
    cond = row_conditioning(den, seeds)
    sig = torch.tensor([80.0, 14.0, 3.0, 0.8, 0.0], dtype=torch.float64)
    weights = [torch.tensor(w, dtype=torch.float64)
               for w in ([2.0, 2.0, 1.0, 1.0], [2.0, 3.0, 1.0, 1.0])]
    strategies = [("1", "2", "2", "1"), ("1", "1", "2", "1"), ("1", "2", "3", "1")]
    if solver == "unipc":
        strategies = [("1c", "2c", "2", "1"), ("1c", "2", "2", "1"), ("1", "2c", "3c", "1")]
    cases = [(w, k) for w in weights for k in strategies]
    with torch.no_grad():
        got = solve_prefix_tree(den, noise, [sig] * len(cases), solver=solver,
                                guidance=[w for w, _ in cases], cond=cond,
                                strategies=[k for _, k in cases])
        for (w, k), g in zip(cases, got):
            want = solve(den, noise, sig, solver=solver, guidance=w, cond=cond, strategy=k)
            assert torch.equal(g, want), (w, k)
        # Both matter: another strategy or other weights give other samples.
        assert not torch.equal(got[0], got[1]) and not torch.equal(got[0], got[3])


def test_a_guided_run_searches_strategies_too(tmp_path):
    """configs/digits-cond.yaml with an interval guidance space and ``space.strategy``: the
    baselines are the plain solver's guided ones, the candidates carry both, best.json
    records both, and ``searchd.sample`` runs them."""
    from pathlib import Path

    import searchd
    from searchd.sample import main as sample_main

    cond = Path(__file__).resolve().parents[1] / "configs" / "digits-cond.yaml"
    run = tmp_path / "run"
    overrides = ["solver.name=unipc", "nfe=4", "space.strategy=true",
                 "space.guidance.kind=interval", "search.evolution.population_num=4",
                 "search.evolution.select_num=2", "search.evolution.mutation_num=2",
                 "search.evolution.crossover_num=1", "search.evolution.generations=2",
                 "samples.per_candidate=60", "samples.heldout=60", "metric.reference=exact:200",
                 "report.plots=false", "baselines=[{family: polynomial, params: {rho: 7}}]"]
    out = searchd.search(str(cond), overrides, run_dir=str(run), engine="local")
    best = json.loads((run / "best.json").read_text())
    records = searchd.open_run(run).evaluations()
    assert all(s.guidance is not None for s, _ in records)
    assert all(s.strategy is None for s, _ in records if s.meta.get("origin") == "baseline")
    assert any(s.strategy is not None for s, _ in records)
    winner = Schedule.from_dict(best["schedule"])
    assert winner == out.schedule and best["guidance"] == winner.guidance.tolist()
    if winner.strategy is not None:
        assert best["strategy"] == list(winner.strategy)
    assert sample_main(["--schedule", str(run / "best.json"), "--n", "8",
                        "--out", str(tmp_path / "g.png")]) == 0


def test_config_refuses_a_strategy_it_cannot_search_on_one_line():
    """Before anything starts (config validation): a solver without per-step variants, an
    order the family lacks, the adaptive method, a model-schedule space."""
    from pathlib import Path

    from searchd.config import ConfigError, load_config

    quick = Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml"
    cfg = load_config(quick, ["space.strategy=true", "space.guidance.kind=none"])
    assert cfg.space.strategy
    bad = [
        (["solver.name=euler"], r"space\.strategy: .*solver 'euler' has no per-step variant"),
        (["space.max_order=4"], r"space\.max_order: .*dpmpp_2m offers orders \[1, 2, 3\]"),
        (["search.algorithm=adaptive"], r"space\.strategy: .*adaptive predicts timesteps only"),
        (["search.evolution.mutation=level"], r"search\.evolution\.mutation: .*space\.strategy "
                                              r"needs mutation: space"),
    ]
    for overrides, msg in bad:
        with pytest.raises(ConfigError, match=msg) as e:
            load_config(quick, ["space.strategy=true", *overrides])
        assert "\n" not in str(e.value)
