"""GITS and LD3 wired into searchd: configuration, cost counting, baselines, searchers and
warm start (no Ray); ``python -m searchd.search`` end to end with each of them (Ray)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from searchd.config import ConfigError, load_config
from searchd.loop.plan import anchor_job, make_baselines, make_searcher, make_space
from searchd.methods.anchors import anchors_from_results, compute_anchor
from searchd.methods.counting import CountingDenoiser
from searchd.models import load
from searchd.schedule import Schedule
from searchd.schedules.spaces import DiscreteSpace

QUICK = "configs/quickstart.yaml"
# Small GITS/LD3 settings: a 13-point teacher grid on 16 warm-up samples; LD3 for 4 steps.
SMALL = ["search.gits.warmup=16", "search.gits.grid_points=13", "search.ld3.train=8",
         "search.ld3.iters=4", "search.ld3.teacher_steps=16", "search.ld3.loss=pixels"]


@pytest.fixture(scope="module")
def denoiser():
    torch.set_num_threads(1)
    return load("gmm-digits-k64")


# Configuration --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["search.algorithm=gits", "search.gits.warmup=5000"],
         "search.gits.warmup: got 5000; must be <= samples.per_candidate (2000)"),
        (["search.evolution.warm_start=[ld3]", "search.ld3.train=2001"],
         "search.ld3.train: got 2001; must be <= samples.per_candidate"),
        (["search.ld3.optimizer=sgd"], "search.ld3.optimizer: got 'sgd'"),
        (["search.gits.metric=l3"], "search.gits.metric: got 'l3'"),
        (["search.gits.teacher_solver=rk4"], "search.gits.teacher_solver: got 'rk4'"),
        (["search.evolution.warm_start=[cmaes]"], "search.evolution.warm_start: got ['cmaes']"),
        (["search.evolution.warm_start=[gits, gits]"], "each of gits, ld3 at most once"),
        (["search.algorithm=gits", "search.gits.grid_points=5"],
         "a grid of 5 points allows at most 4 steps; steps = 5"),
        (["search.evolution.population_num=4", "search.evolution.select_num=2",
          "search.evolution.mutation_num=1", "search.evolution.crossover_num=1",
          "search.evolution.warm_start=[gits, ld3]"],
         "5 baselines and warm-start seeds do not fit in search.evolution.population_num = 4"),
        (["baselines=[gits, {family: gits, name: g2}]"], "family 'gits' at most once"),
    ],
)
def test_bad_anchor_settings_are_one_line_each(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(QUICK, overrides)
    assert len(e.value.lines) == 1 and message in e.value.lines[0], e.value.lines


def test_anchors_a_configuration_needs():
    assert load_config(QUICK).anchors == []
    assert load_config(QUICK, ["search.algorithm=ld3"]).anchors == ["ld3"]
    cfg = load_config(QUICK, ["baselines=[polynomial, ld3]",
                              "search.evolution.warm_start=[gits]"])
    assert cfg.anchors == ["gits", "ld3"]
    # The sections round-trip through the resolved configuration.
    again = load_config(None, [f"{k}={json.dumps(v)}" for k, v in cfg.resolve().items()])
    assert again.search.gits == cfg.search.gits and again.search.ld3 == cfg.search.ld3


# Computing, counting -------------------------------------------------------------------------
def test_counting_denoiser_counts_rows_and_passes_attributes(denoiser):
    c = CountingDenoiser(denoiser)
    x = torch.zeros(7, *denoiser.shape)
    c(x, torch.full((7,), 1.0))
    c(x[:3], torch.full((3,), 2.0))
    assert (c.calls, c.rows) == (2, 10)
    assert c.shape == denoiser.shape and c.sigma_max == denoiser.sigma_max


def test_gits_cost_is_counted_call_by_call(denoiser):
    """Heun over a grid of G levels ending in 0: per interval one denoised output at the
    node plus Heun's 2 evaluations (1 for the step to 0): 3 G - 4 calls per sample."""
    cfg = load_config(QUICK, ["search.algorithm=gits", *SMALL])
    space = make_space(cfg, denoiser.sigma_min, denoiser.sigma_max)
    job = anchor_job(cfg, space, "gits")
    r = compute_anchor(denoiser, *job)
    g = 13 + 1  # 13 positive levels and the final 0
    assert r["forward_calls"] == 3 * g - 4
    assert r["denoiser_calls"] == (3 * g - 4) * 16
    s = Schedule.from_dict(r["schedule"])
    assert s.meta["origin"] == "gits" and s.n_steps == 5 and s.sigmas[0] == space.sigma_max
    assert s.meta["cost"]["denoiser_calls"] == r["denoiser_calls"]
    # Deterministic: the same job gives the same schedule.
    assert compute_anchor(denoiser, *job)["schedule"]["id"] == s.id


def test_ld3_started_from_gits_pays_for_gits(denoiser):
    cfg = load_config(QUICK, ["search.algorithm=ld3", "search.ld3.init=gits", *SMALL])
    space = make_space(cfg, denoiser.sigma_min, denoiser.sigma_max)
    gits = compute_anchor(denoiser, *anchor_job(cfg, space, "gits"))
    ld3 = compute_anchor(denoiser, *anchor_job(cfg, space, "ld3"))
    plain = load_config(QUICK, ["search.algorithm=ld3", *SMALL])
    ld3_plain = compute_anchor(denoiser, *anchor_job(plain, space, "ld3"))
    assert ld3["denoiser_calls"] == gits["denoiser_calls"] + ld3_plain["denoiser_calls"]
    assert ld3["schedule"]["meta"]["params"]["init"] == pytest.approx(
        gits["schedule"]["sigmas"])
    space.check(Schedule.from_dict(ld3["schedule"]))


def test_discrete_space_gets_grid_schedules(denoiser):
    cfg = load_config(QUICK, ["search.algorithm=gits", "space.kind=discrete",
                              "space.grid=ddpm_linear", "space.endpoints=fixed",
                              "baselines=[polynomial, ld3]", *SMALL])
    space = make_space(cfg, denoiser.sigma_min, denoiser.sigma_max)
    assert isinstance(space, DiscreteSpace)
    job = anchor_job(cfg, space, "gits")
    assert job[4]["free_end"] is False
    results = [compute_anchor(denoiser, *anchor_job(cfg, space, n)) for n in cfg.anchors]
    anchors = anchors_from_results(results, space)
    pool = set(np.asarray(space.grid)[space.pool].tolist())
    for s in anchors.values():  # on the grid, with the space's fixed top and bottom
        assert set(s.sigmas[:-1].tolist()) <= pool
        assert s.sigmas[0] == max(pool) and s.sigmas[-2] == min(pool)
        space.check(s)


# Baselines, searchers, warm start -------------------------------------------------------------
def _anchors(cfg, space):
    a = Schedule(np.array([space.sigma_max, 3.0, 1.0, 0.4, 0.1, 0.0]), solver=space.solver,
                 meta={"origin": "gits", "family": "gits", "params": {"coeff": 1.15}})
    b = Schedule(np.array([space.sigma_max, 5.0, 1.5, 0.3, 0.05, 0.0]), solver=space.solver,
                 meta={"origin": "ld3", "family": "ld3"})
    return {"gits": a, "ld3": b}


def test_computed_baselines_searchers_and_warm_start(denoiser):
    cfg = load_config(QUICK, ["baselines=[polynomial, gits]",
                              "search.evolution.warm_start=[gits, ld3]"])
    space = make_space(cfg, denoiser.sigma_min, denoiser.sigma_max)
    anchors = _anchors(cfg, space)
    bases = make_baselines(cfg, space, anchors)
    assert [b.meta["family"] for b in bases] == ["polynomial", "gits"]
    assert bases[1].meta["origin"] == "baseline" and bases[1].id == anchors["gits"].id
    with pytest.raises(ValueError, match="gits schedule must be computed"):
        make_baselines(cfg, space, {})
    # Warm start: generation 0 holds the baselines, then LD3 (GITS is already a baseline).
    evo = make_searcher(cfg.search, space, bases, "fid", "min", anchors)
    gen0 = [evo.ask(f"t{i}") for i in range(cfg.search.evolution.population_num)]
    origins = [g.meta["origin"] for g in gen0]
    assert origins[:3] == ["baseline", "baseline", "ld3"]
    assert set(origins[3:]) == {"random"}
    assert gen0[2].id == anchors["ld3"].id
    # GITS / LD3 as the algorithm: the computed schedule, then the baselines, then done.
    for name in ("gits", "ld3"):
        cfg.search.algorithm = name
        s = make_searcher(cfg.search, space, bases, "fid", "min", anchors)
        got = [s.ask(f"t{i}") for i in range(4)]
        ids = [g.id for g in got if isinstance(g, Schedule)]
        want = [anchors[name].id] + [b.id for b in bases if b.id != anchors[name].id]
        assert ids == want and got[len(want)] == "FINISHED"
        with pytest.raises(ValueError, match=f"the {name} schedule must be computed"):
            make_searcher(cfg.search, space, bases, "fid", "min", None)


# End to end ---------------------------------------------------------------------------------------
TINY = ["--set", "samples.per_candidate=200", "--set", "samples.heldout=400",
        "--set", "metric.reference=exact:1000", "--set", "report.grid_samples=8",
        *[a for o in SMALL for a in ("--set", o)]]


def run_cli(run, *sets: str) -> dict:
    args = [a for o in sets for a in ("--set", o)]
    p = subprocess.run(
        [sys.executable, "-m", "searchd.search", "--config", QUICK, *TINY, *args,
         "--run-dir", str(run), "--quiet"],
        capture_output=True, text=True, timeout=900,
    )
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return json.loads((run / "best.json").read_text())


def _rows(run):
    return pq.read_table(run / "evaluations").to_pylist()


@pytest.mark.ray
def test_cli_gits_algorithm_with_an_ld3_baseline(tmp_path):
    run = tmp_path / "run"
    best = run_cli(run, "search.algorithm=gits", "baselines=[polynomial, ld3]")
    stored = {a["name"]: a for a in json.loads((run / "anchors.json").read_text())["anchors"]}
    assert sorted(stored) == ["gits", "ld3"]
    rows = {r["origin"]: r for r in _rows(run)}
    assert sorted(rows) == ["baseline", "gits"] and len(_rows(run)) == 3
    # The GITS candidate is the computed schedule, scored like any other.
    assert rows["gits"]["sigmas"] == stored["gits"]["schedule"]["sigmas"]
    assert rows["gits"]["status"] == "ok" and rows["gits"]["n_samples"] == 200
    # LD3 is a baseline: scored, re-scored on held-out seeds, in best.json with its family.
    assert best["baselines"]["ld3"]["family"] == "ld3"
    assert best["baselines"]["ld3"]["sigmas"] == stored["ld3"]["schedule"]["sigmas"]
    assert best["baselines"]["ld3"]["search_value"] is not None
    assert [s["name"] for s in best["heldout"]["scores"]] == ["searched", "polynomial", "ld3"]
    assert all(s["status"] == "ok" for s in best["heldout"]["scores"])
    assert best["search"]["algorithm"] == "gits"
    assert best["anchors"]["gits"]["denoiser_calls"] == (3 * 14 - 4) * 16
    winner = min((r for r in _rows(run)), key=lambda r: r["value"])
    assert best["schedule"]["id"] == winner["candidate_id"]


# search.algorithm=ld3 end to end: the LD3 anchor computed on the actors and proposed by a
# PrecomputedSearcher is what tests/test_adaptive_run.py's CLI run does (algorithm adaptive,
# global schedule ld3); make_searcher's ld3 searcher is checked above.


@pytest.mark.ray
def test_cli_evolution_warm_started_from_gits_and_ld3(tmp_path):
    run = tmp_path / "run"
    best = run_cli(
        run, "search.evolution.warm_start=[gits, ld3]", "search.evolution.population_num=7",
        "search.evolution.select_num=3", "search.evolution.mutation_num=3",
        "search.evolution.crossover_num=1", "search.evolution.generations=2",
        "report.plots=false",
    )
    rows = _rows(run)
    # The race (on by default): the top 3 (a quarter of the budget of 14) re-scored on a
    # fresh block of search seeds; the search had the other 11 candidates.
    race = [r for r in rows if r["trial_id"].startswith("race/")]
    rows = [r for r in rows if not r["trial_id"].startswith("race/")]
    assert len(race) == 3 and best["racing"]["winner"] == best["schedule"]["id"]
    gen0 = [r for r in rows if r["generation"] == 0]
    assert sorted(r["origin"] for r in gen0) == ["baseline"] * 3 + ["gits", "ld3", "random",
                                                                    "random"]
    assert len(rows) == 11 and len({r["candidate_id"] for r in rows}) == 11
    # The seeds are the computed schedules; the winner is at least as good as all of them
    # (on the pooled blocks where a seed was raced, else on the search seeds).
    pooled = {c["id"]: c["pooled"] for c in best["racing"]["candidates"]}
    for name in ("gits", "ld3"):
        r = next(r for r in gen0 if r["origin"] == name)
        assert r["sigmas"] == best["anchors"][name]["sigmas"]
        if r["candidate_id"] in pooled:
            assert pooled[best["schedule"]["id"]] <= pooled[r["candidate_id"]]
        else:
            assert best["search"]["value"] <= r["value"]
    assert best["search"]["warm_start"] == ["gits", "ld3"]
    # Warm-start seeds are not baselines: the held-out comparison is against the families.
    assert len(best["heldout"]["scores"]) == 4
