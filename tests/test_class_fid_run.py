"""metric.name class_fid end to end: a tiny guidance search on gmm-digits-cond scored by the
class-conditional metrics, with an accuracy floor taken from a baseline. Checked: every
Parquet row's value against a hand computation of the objective from the row's own
metrics; the recorded floor against the baseline's row; the held-out table against the
benchmark's independent scorer (``ConditionalEvaluator``) on the same seeds; the one-line
refusals; the resume (the recorded objective is kept); the Ray engine gives the local
engine's numbers."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import searchd
from searchd.config import ConfigError, load_config
from searchd.evaluation import CandidateResult
from searchd.evaluation.conditional import (
    ClassReference,
    GuidanceObjective,
    floor_margin,
    objective_from_dict,
    resolve_objective,
)
from searchd.evaluation.conditional_evaluator import ConditionalEvaluator
from searchd.loop.runs import BadInput
from searchd.schedule import Schedule

REPO = Path(__file__).resolve().parents[1]
COND = REPO / "configs" / "digits-cond.yaml"
FLOOR_FROM = "polynomial(rho=7) w=2"
TINY = ["search.evolution.population_num=4", "search.evolution.select_num=2",
        "search.evolution.mutation_num=2", "search.evolution.crossover_num=1",
        "search.evolution.generations=2", "samples.per_candidate=100", "samples.heldout=100",
        "metric.reference=exact:300", "report.plots=false", "nfe=4",
        "baselines=[{family: polynomial, params: {rho: 7}}]", "metric.name=class_fid",
        "space.guidance.kind=interval",
        f"metric.options={{accuracy_floor: '{FLOOR_FROM}', penalty_per_point: 2.0}}"]


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    run = tmp_path_factory.mktemp("classfid") / "local"
    result = searchd.search(str(COND), TINY, run_dir=str(run), engine="local")
    return run, result


def _rows(run: Path) -> list[tuple[Schedule, CandidateResult]]:
    return searchd.open_run(run).evaluations()


def test_rows_hold_the_class_metrics_and_the_objective(ran):
    run, _ = ran
    best = json.loads((run / "best.json").read_text())
    obj = best["search"]["objective"]
    assert best["search"]["metric"] == "class_fid"
    assert obj == json.loads((run / "objective.json").read_text())
    assert obj["floor_from"] == FLOOR_FROM and obj["penalty_per_point"] == 2.0
    rows = _rows(run)
    base = [r for s, r in rows if s.meta.get("name") == FLOOR_FROM]
    assert base, "the floor's baseline is scored by the search too"
    # The floor is the baseline's accuracy on the search seeds, its class FID the scale.
    assert obj["floor"] == base[0].metrics["accuracy"]
    assert obj["reference_fid"] == base[0].metrics["fid_class"]
    # floor_margin's default, 1se: one binomial standard error of the floor at the run's 100
    # search samples.
    p = obj["floor"]
    assert obj["margin"] == pytest.approx(math.sqrt(p * (1 - p) / 100), rel=1e-12)
    assert obj["margin_from"] == "1se at 100 search samples"
    below = 0
    for s, r in rows:
        m = r.metrics
        assert r.ok and {"fid", "fid_class", "accuracy", "class_fid", "network_calls"} <= set(m)
        # Mean over the 10 classes of the per-class FIDs; 100 samples: accuracy in 1/100.
        assert m["fid_class"] == pytest.approx(np.mean([m[f"fid_class_{c}"]
                                                        for c in range(10)]), rel=1e-12)
        assert round(m["accuracy"] * 100) == pytest.approx(m["accuracy"] * 100, abs=1e-9)
        short = max(0.0, obj["floor"] + obj["margin"] - m["accuracy"])
        below += short > 0
        hand = m["fid_class"] + 2.0 * obj["reference_fid"] * 100 * short
        assert m["class_fid"] == pytest.approx(hand, rel=1e-12)
        assert r.value("class_fid") == m["class_fid"]
        assert m["network_calls"] == 4 + sum(w != 1.0 for w in s.guidance)
    assert best["search"]["value"] == min(r.value("class_fid") for _, r in rows)
    assert below >= 0  # (informative)


def test_heldout_table_matches_an_independent_scorer(ran):
    run, _ = ran
    best = json.loads((run / "best.json").read_text())
    held = best["heldout"]
    assert held["metric"] == "fid_class" and held["n_samples"] == 100
    scores = {s["name"]: s for s in held["scores"]}
    base = scores[best["best_baseline"]]
    assert base["diff"] == 0 and base["accuracy_diff"] == 0 and base["significant"] is None
    for s in held["scores"]:
        for k in ("fid_class", "fid", "accuracy"):
            lo, hi = s[f"{k}_ci"]
            assert lo <= s[k] <= hi, (s["name"], k)
        assert s["accuracy_diff"] == pytest.approx(s["accuracy"] - base["accuracy"])
        assert s["fid_diff"] == pytest.approx(s["fid"] - base["fid"])
    # The benchmark's scorer, built apart from the run's evaluator, on the run's reference.
    ref = ClassReference.from_bytes((run / "reference.npz").read_bytes())
    ev = ConditionalEvaluator("gmm-digits-cond", ref, "digits", solver=None)
    winner = Schedule.from_dict(best["schedule"])
    seeds = list(range(held["seed_base"], held["seed_base"] + 100))
    (r,) = ev.evaluate([winner], seeds)
    assert r.metrics["fid_class"] == pytest.approx(scores["searched"]["fid_class"], rel=1e-6)
    assert r.metrics["fid"] == pytest.approx(scores["searched"]["fid"], rel=1e-6)
    assert r.metrics["accuracy"] == scores["searched"]["accuracy"]


def test_resume_keeps_the_recorded_objective(ran, tmp_path):
    import shutil

    run, _ = ran
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    before = (copy / "objective.json").read_text()
    n = len(_rows(copy))
    searchd.search(str(COND), [*TINY, "search.evolution.generations=3"], run_dir=str(copy),
                   resume=True, force=True, engine="local")
    assert (copy / "objective.json").read_text() == before
    obj = json.loads(before)
    rows = _rows(copy)
    assert len(rows) > n
    for _, r in rows[n:]:  # the new rows: the same floor, the same formula
        m = r.metrics
        short = max(0.0, obj["floor"] + obj["margin"] - m["accuracy"])
        assert m["class_fid"] == pytest.approx(
            m["fid_class"] + 2.0 * obj["reference_fid"] * 100 * short, rel=1e-12)


def test_ray_engine_gives_the_local_numbers(ran, tmp_path):
    run, _ = ran
    ray_run = tmp_path / "ray"
    searchd.search(str(COND), [*TINY, "workers.num_workers=2"], run_dir=str(ray_run),
                   engine="ray")
    a = json.loads((run / "best.json").read_text())
    b = json.loads((ray_run / "best.json").read_text())
    assert b["search"]["objective"] == a["search"]["objective"]
    local = {s.id: r.metrics for s, r in _rows(run)}
    pooled = {s.id: r.metrics for s, r in _rows(ray_run)}
    assert set(pooled) == set(local)
    for cid, m in pooled.items():
        for k in ("class_fid", "fid_class", "fid", "accuracy"):
            assert m[k] == pytest.approx(local[cid][k], rel=1e-6, abs=1e-12), (cid, k)
    for x, y in zip(a["heldout"]["scores"], b["heldout"]["scores"]):
        for k in ("fid_class", "fid", "accuracy", "accuracy_diff"):
            assert y[k] == pytest.approx(x[k], rel=1e-6, abs=1e-12)


# The objective -----------------------------------------------------------------------------
def test_objective_floor_resolution_by_hand():
    sched = {"a": Schedule(np.array([80.0, 1.0, 0.0])), "b": Schedule(np.array([80.0, 2.0, 0.0]))}

    def score(s: Schedule) -> CandidateResult:
        acc = 0.97 if s is sched["a"] else 0.5
        return CandidateResult(s.id, "ok", {"accuracy": acc, "fid_class": 3.0}, 2, 10, 0, 1.0,
                               10.0)

    o = resolve_objective({"accuracy_floor": "a", "penalty_per_point": 0.5,
                           "floor_margin": 0.01}, sched, score)
    assert (o["floor"], o["reference_fid"], o["floor_from"]) == (0.97, 3.0, "a")
    f = GuidanceObjective(o["floor"], o["reference_fid"], o["penalty_per_point"], o["margin"])
    # 0.95 is 3 points under 0.97 + 0.01: 2.0 + 0.5 * 3.0 * 3 = 6.5; above the floor: as is.
    assert f({"fid_class": 2.0, "accuracy": 0.95}) == pytest.approx(6.5)
    assert f({"fid_class": 2.0, "accuracy": 0.99}) == 2.0
    a = resolve_objective({"accuracy_floor": 0.9}, sched, score, samples=100)
    assert (a["floor"], a["reference_fid"], a["floor_from"]) == (0.9, 1.0, "absolute")
    # The default margin is 1se: sqrt(0.9 * 0.1 / 100) = 0.03.
    assert a["margin"] == pytest.approx(0.03) and a["margin_from"] == "1se at 100 search samples"
    assert resolve_objective({}, sched, score)["floor"] is None
    with pytest.raises(ValueError, match="accuracy_floor: got 'c'.*'a', 'b'"):
        resolve_objective({"accuracy_floor": "c"}, sched, score)


def test_floor_margin_in_standard_errors_moves_the_threshold_by_hand():
    """floor_margin '<k>se' = k * sqrt(p (1 - p) / n) at the floor p and the search's n
    samples (hand value: p = 0.96, n = 600 -> 0.008), and the penalty starts there."""
    sched = {"a": Schedule(np.array([80.0, 1.0, 0.0]))}

    def score(s: Schedule) -> CandidateResult:
        return CandidateResult(s.id, "ok", {"accuracy": 0.96, "fid_class": 2.0}, 2, 10, 0, 1.0,
                               10.0)

    o = resolve_objective({"accuracy_floor": "a", "floor_margin": "2se"}, sched, score,
                          samples=600)
    assert o["margin"] == pytest.approx(2 * 0.008)
    assert o["margin_from"] == "2se at 600 search samples"
    f = objective_from_dict(o)
    # At the floor itself: 1.6 points short of 0.96 + 0.016 -> 1.0 + 2.0 * 1.6; at the floor
    # plus the margin: no penalty. Without a margin the floor itself is free.
    assert f({"fid_class": 1.0, "accuracy": 0.96}) == pytest.approx(1.0 + 2.0 * 1.6)
    assert f({"fid_class": 1.0, "accuracy": 0.976}) == pytest.approx(1.0)
    plain = objective_from_dict(resolve_objective({"accuracy_floor": "a", "floor_margin": 0},
                                                  sched, score))
    assert plain({"fid_class": 1.0, "accuracy": 0.96}) == 1.0
    assert floor_margin(0.003, 0.9, None) == 0.003
    assert floor_margin(" 1.5 se", 0.5, 100) == pytest.approx(1.5 * 0.05)
    for bad, says in (("2sd", "got '2sd'"), (-0.1, "got -0.1"), ("1se", "sample count")):
        with pytest.raises(ValueError, match=says):
            floor_margin(bad, 0.9, None)


# Refusals ----------------------------------------------------------------------------------
def test_config_refusals_are_one_line():
    bad = [
        (["metric.name=class_fid", "metric.features=inception"], "metric.features"),
        (["metric.name=class_fid", "metric.options={accuracy_floor: 1.5}"],
         "metric.options.accuracy_floor"),
        (["metric.name=class_fid", "metric.options={penalty_per_point: -1}"],
         "metric.options.penalty_per_point"),
        (["metric.name=class_fid", "metric.options={floor_margin: 2sd}"],
         "metric.options.floor_margin"),
        (["metric.options={accuracy_floor: 0.9}"], "metric.options.accuracy_floor"),
    ]
    for overrides, key in bad:
        with pytest.raises(ConfigError) as e:
            load_config(COND, overrides)
        assert str(e.value).startswith(key) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize("overrides, says", [
    (["model.name=gmm-digits", "space.guidance.kind=none"], "is not class-conditional"),
    (["samples.per_candidate=105"], "samples.per_candidate: got 105; class_fid needs a "
                                    "multiple of the model's 10 classes"),
    (["metric.reference=exact:305"], "metric.reference: got 305"),
    (["metric.options={accuracy_floor: nosuch}"], "accuracy_floor: got 'nosuch'"),
    (["search.halving.rungs=4"], "samples.per_candidate / search.halving.rungs: got 25"),
])
def test_run_refusals_leave_no_run(tmp_path, overrides, says):
    run = tmp_path / "r"
    with pytest.raises(BadInput) as e:
        searchd.search(str(COND), [*TINY, *overrides], run_dir=str(run), engine="local")
    assert says in str(e.value) and "\n" not in str(e.value)
    assert not run.exists() or not any(run.iterdir())


def test_cli_refuses_an_unconditional_model_with_exit_2(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "searchd.search", "--config", str(COND), "--engine", "local",
         "--run-dir", str(tmp_path / "r"), "--set", "metric.name=class_fid",
         "--set", "model.name=gmm-digits"],
        capture_output=True, text=True, cwd=REPO, timeout=300)
    assert p.returncode == 2, p.stderr
    lines = [x for x in p.stderr.splitlines() if "class-conditional" in x]
    assert len(lines) == 1 and "gmm-digits" in lines[0]
    assert math.isfinite(len(p.stderr))


def test_heldout_parts_on_several_workers_pair_like_one(ran):
    """The pool's held-out phase (schedules split over workers, parts joined) gives the
    table of one evaluator doing it all: the stratified resamples depend on the seeds only,
    so the parts pair. (Up to float32 rounding: the guided mixture's rows of schedules
    sampled together share matrix products whose shapes depend on the group.)"""
    from searchd.evaluation import Evaluator
    from searchd.loop.finish import final_jobs, join_final

    run, _ = ran
    best = json.loads((run / "best.json").read_text())
    ref = ClassReference.from_bytes((run / "reference.npz").read_bytes())
    ev = Evaluator("gmm-digits-cond", "digits", None, metrics=("class_fid", "fid"),
                   class_reference=ref)
    scheds = [Schedule.from_dict(best["schedule"]),
              *(s for s, _ in _rows(run) if s.meta.get("origin") == "baseline")]
    seeds = list(range(1_000_000, 1_000_060))
    tables = []
    for workers in (1, 3):
        jobs = final_jobs(scheds, seeds, 0.95, [], [], [0, 1], None, workers=workers)
        tables.append(join_final([fn(ev, *args) for fn, args in jobs], seeds, 1, 0.95))
    one, three = (t["heldout"] for t in tables)
    assert one["metric"] == three["metric"] == "fid_class"
    for x, y in zip(one["scores"], three["scores"]):
        for k in ("fid_class", "fid", "accuracy", "diff", "fid_diff", "accuracy_diff"):
            assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-9), k
        for k in ("fid_class_ci", "diff_ci", "accuracy_diff_ci"):
            assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-9), k
    assert {"accuracy_diff_ci", "fid_diff_ci", "fid_class_ci"} <= set(one["scores"][0])
