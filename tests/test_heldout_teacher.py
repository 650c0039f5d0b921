"""Held-out scoring by teacher distance (a teacher_distance search without reference
statistics, e.g. Stable Diffusion without reference images): the table's values against the
mean of per-sample distances computed independently with the solver, the paired bootstrap,
failed schedules, FID tables that also carry the teacher distance, runs written before the
table named its metric, and a whole run on the in-process engine."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from test_evaluation_heldout import Gaussian  # exact, elementwise: rows are independent

from searchd.api import HeldoutScore
from searchd.evaluation import Evaluator, heldout_scores
from searchd.evaluation.heldout import (
    bootstrap_counts,
    bootstrap_mean,
    heldout_metric,
    scores_from_distances,
)
from searchd.evaluation.reference import compute_reference
from searchd.evaluation.teacher import TeacherSettings
from searchd.loop.finish import summary_lines
from searchd.noise import make_noise
from searchd.schedule import Schedule
from searchd.schedules import baseline
from searchd.solvers import solve

TEACHER = TeacherSettings(n_steps=24)
SEEDS = list(range(7000, 7160))


def schedules() -> list[Schedule]:
    return [Schedule(baseline("polynomial", 4, 0.002, 80.0, rho=r), solver="euler")
            for r in (7.0, 3.0, 1.5)]


def teacher_evaluator(den: Gaussian, reference=None) -> Evaluator:
    metrics = ("teacher_distance",) if reference is None else ("fid", "teacher_distance")
    return Evaluator(den, "pixels", reference, metrics=metrics, teacher=TEACHER)


def independent_distances(den: Gaussian, sched: Schedule, seeds: list[int]) -> np.ndarray:
    """||student_i - teacher_i|| per seed, from the noise and the solver alone."""
    noise = make_noise(seeds, den.shape, dtype=torch.float64)
    teacher = solve(den, noise, TEACHER.sigmas(den), solver=TEACHER.solver)
    student = solve(den, noise, np.array(sched.sigmas), solver=sched.solver)
    return (student - teacher).flatten(1).norm(dim=1).numpy()


def test_heldout_teacher_distance_is_the_mean_of_independent_distances():
    den = Gaussian()
    ev = teacher_evaluator(den)
    assert heldout_metric(ev) == "teacher_distance"
    scheds = schedules()
    out = heldout_scores(ev, scheds, SEEDS, baseline_index=0, resamples=300,
                         search_seeds=range(0, 1000))
    assert out["metric"] == "teacher_distance" and out["n_samples"] == len(SEEDS)
    assert out["baseline_id"] == scheds[0].id
    means = [float(independent_distances(den, s, SEEDS).mean()) for s in scheds]
    for row, s, m in zip(out["scores"], scheds, means):
        assert row["status"] == "ok" and row["candidate_id"] == s.id
        assert row["metric"] == "teacher_distance" and "fid" not in row
        assert row["teacher_distance"] == pytest.approx(m, rel=1e-10)
        lo, hi = row["teacher_distance_ci"]
        assert lo < row["teacher_distance"] < hi  # the interval contains the point
        assert row["diff"] == pytest.approx(m - means[0], rel=1e-9, abs=1e-12)
    # The same value the search scores candidates by (the evaluator's metric) on these seeds.
    assert [r.metrics["teacher_distance"] for r in ev.evaluate(scheds, SEEDS)] == [
        row["teacher_distance"] for row in out["scores"]]
    # rho = 1.5 is far worse than rho = 7 at 4 Euler steps: its difference is significant.
    assert out["scores"][2]["diff_ci"][0] > 0
    # Deterministic: a fresh evaluator gives the same table, bit for bit.
    assert heldout_scores(teacher_evaluator(den), scheds, SEEDS, resamples=300) == out


def test_bootstrap_mean_is_the_mean_of_each_resampled_set_and_paired():
    rng = np.random.default_rng(0)
    d = rng.gamma(2.0, 1.0, 120)
    counts = bootstrap_counts(120, 5, seed=4)
    boot = bootstrap_mean(d, counts)
    for b in range(5):
        resampled = np.repeat(d, counts[b].numpy().astype(int))  # the resampled set
        assert float(boot[b]) == pytest.approx(resampled.mean(), rel=1e-12)
    other = d + rng.normal(0.0, 0.3, 120)
    out = scores_from_distances([d, other, d], ["a", "b", "a2"], range(500, 620),
                                resamples=400, bootstrap_seed=2)
    a, b, same = out["scores"]
    # A schedule against itself: a difference of exactly 0 with a zero-width interval.
    assert same["diff"] == 0.0 and same["diff_ci"] == [0.0, 0.0]
    assert a["diff"] == 0.0 and a["diff_ci"] == [0.0, 0.0]
    # Paired: the difference's interval is that of the per-sample differences' mean, far
    # narrower than the two values' intervals (independent resampling would not shrink it).
    paired = scores_from_distances([other - d], ["delta"], range(500, 620), resamples=400,
                                   bootstrap_seed=2)["scores"][0]
    assert b["diff"] == pytest.approx(paired["teacher_distance"], rel=1e-12)
    np.testing.assert_allclose(b["diff_ci"], paired["teacher_distance_ci"], rtol=1e-9)
    width = b["diff_ci"][1] - b["diff_ci"][0]
    assert width < 0.5 * (a["teacher_distance_ci"][1] - a["teacher_distance_ci"][0])


def test_a_failed_schedule_keeps_the_table():
    den = Gaussian()
    ev = teacher_evaluator(den)
    good = schedules()
    bad = Schedule([500.0, 10.0, 1.0, 0.0], solver="euler")  # above the model's sigma_max
    out = heldout_scores(ev, [good[0], bad, good[1]], SEEDS, baseline_index=0, resamples=200)
    base, failed, ok = out["scores"]
    assert failed["status"] == "failed" and "invalid candidate" in failed["error"]
    assert failed["teacher_distance"] is None and failed["diff"] is None
    assert base["status"] == ok["status"] == "ok" and ok["diff_ci"] is not None
    # The failed baseline: values and intervals stay, the differences are None.
    out = heldout_scores(ev, [good[0], bad], SEEDS, baseline_index=1, resamples=200)
    assert out["scores"][0]["teacher_distance"] is not None and out["scores"][0]["diff"] is None
    # The printed table names the failure and keeps the other rows.
    best = {"heldout": copy.deepcopy(out), "best_baseline": "bad",
            "search": {"metric": "teacher_distance"}}
    for row, name in zip(best["heldout"]["scores"], ["searched", "bad"]):
        row["name"] = name
    lines = summary_lines(best)
    assert lines[0].startswith("searchd: held-out teacher_distance on 160 samples")
    assert lines[1].startswith("  searched") and "failed: invalid candidate" in lines[2]


def test_fid_table_with_a_teacher_also_carries_the_teacher_distance():
    den = Gaussian()
    plain = Evaluator(den, "pixels", None, metrics=("teacher_distance",), teacher=TEACHER)
    ref = compute_reference([den.sample(1000, 0)], plain.features, {"source": "gaussian"})
    both = teacher_evaluator(den, ref)
    assert heldout_metric(both) == "fid"
    scheds = schedules()
    out = heldout_scores(both, scheds, SEEDS, resamples=200)
    fid_only = heldout_scores(Evaluator(den, "pixels", ref), scheds, SEEDS, resamples=200)
    td_only = heldout_scores(plain, scheds, SEEDS, resamples=200)
    assert out["metric"] == "fid"
    for row, f, t in zip(out["scores"], fid_only["scores"], td_only["scores"]):
        # The FID columns are those of an evaluator without a teacher, exactly.
        assert {k: row[k] for k in f} == f
        assert row["teacher_distance"] == t["teacher_distance"]
        assert row["teacher_distance_ci"] == t["teacher_distance_ci"]
        assert row["teacher_distance_diff"] == t["diff"]
        assert row["teacher_distance_diff_ci"] == t["diff_ci"]
    best = {"heldout": copy.deepcopy(out), "best_baseline": "rho7",
            "search": {"metric": "teacher_distance"}}
    for row, name in zip(best["heldout"]["scores"], ["rho7", "rho3", "rho1.5"]):
        row["name"] = name
    lines = summary_lines(best)
    assert lines[0].startswith("searchd: held-out fid on 160 samples")
    k = lines.index("searchd: held-out teacher_distance (the searched metric), same samples "
                    "and resamples:")
    assert k == 4 and lines[k + 3].startswith("  rho1.5") and "diff +" in lines[k + 3]


def test_runs_written_before_the_metric_key_read_as_fid():
    old = {"name": "searched", "candidate_id": "abc", "status": "ok", "fid": 1.25,
           "fid_ci": [1.0, 1.5], "diff": -2.5, "diff_ci": [-3.0, -2.0], "n_samples": 400,
           "seed_base": 1_000_000, "error": None, "significant": True}
    h = HeldoutScore.from_dict(old)
    assert h.metric == "fid" and h.value == h.fid == 1.25 and h.ci == h.fid_ci == (1.0, 1.5)
    best = {"heldout": {"level": 0.95, "n_samples": 400, "seed_base": 1_000_000,
                        "scores": [old]}, "best_baseline": "polynomial(rho=7)",
            "search": {"metric": "fid"}}
    lines = summary_lines(best)
    assert lines[0].startswith("searchd: held-out fid on 400 samples")
    assert lines[1].split() == ["searched", "1.2500", "[1.0000,", "1.5000]", "diff", "-2.5000",
                                "[-3.0000,", "-2.0000]"]
    new = {**{k: v for k, v in old.items() if not k.startswith("fid")},
           "metric": "teacher_distance", "teacher_distance": 0.5, "teacher_distance_ci": [0.4, 0.6]}
    h = HeldoutScore.from_dict(new)
    assert h.metric == "teacher_distance" and h.value == 0.5 and h.ci == (0.4, 0.6)
    assert h.fid is None


def test_teacher_distance_search_without_reference_ends_with_the_table(tmp_path, capsys):
    """The bug: a teacher_distance search without reference statistics (what configs/sd15.yaml
    does) ran the whole search and then failed at the held-out phase."""
    from searchd.search import main

    run = tmp_path / "td"
    code = main(["--config", "configs/quickstart.yaml", "--engine", "local",
                 "--run-dir", str(run),
                 "--set", "model.name=gmm-digits-k8",
                 "--set", "metric.name=teacher_distance", "--set", "metric.reference=null",
                 "--set", "search.evolution.population_num=4",
                 "--set", "search.evolution.select_num=2",
                 "--set", "search.evolution.mutation_num=1",
                 "--set", "search.evolution.crossover_num=1",
                 "--set", "search.evolution.generations=1",
                 "--set", "samples.per_candidate=50", "--set", "samples.heldout=100",
                 "--set", "report.plots=false"])
    out = capsys.readouterr()
    assert code == 0, out.out[-3000:] + out.err[-3000:]
    best = json.loads((run / "best.json").read_text())
    held = best["heldout"]
    assert held["metric"] == "teacher_distance" and held["n_samples"] == 100
    names = [s["name"] for s in held["scores"]]
    assert names == ["searched", "polynomial(rho=7)", "logsnr", "time_uniform"]
    for s in held["scores"]:
        assert s["status"] == "ok"
        assert s["teacher_distance_ci"][0] <= s["teacher_distance"] <= s["teacher_distance_ci"][1]
    base = held["scores"][names.index(best["best_baseline"])]
    assert base["diff"] == 0.0 and base["diff_ci"] == [0.0, 0.0] and base["significant"] is None
    assert ("searchd: held-out teacher_distance on 100 samples (seeds from 1000000)"
            in out.out)
    for s in held["scores"]:
        assert f"  {s['name']:<26} {s['teacher_distance']:.4f}" in out.out
    # The library and the report read it back, naming the metric.
    import searchd
    from searchd.report import main as report_main

    result = searchd.open_run(run).result()
    assert result.heldout[0].metric == "teacher_distance"
    assert result.heldout_value == held["scores"][0]["teacher_distance"]
    assert report_main([str(run)]) == 0
    rep = capsys.readouterr().out
    assert "Held-out scores, teacher_distance (100 samples" in rep


def test_report_prints_the_teacher_distance_rows_of_a_fid_table(tmp_path, capsys):
    from test_report import write_run

    from searchd.report import main as report_main

    made = write_run(tmp_path / "run", finished=True)
    best = made["best"]
    best["heldout"]["metric"] = "fid"
    for i, s in enumerate(best["heldout"]["scores"]):
        s.update(teacher_distance=0.5 + i, teacher_distance_ci=[0.25 + i, 0.75 + i],
                 teacher_distance_diff=None if i == 0 else 0.125,
                 teacher_distance_diff_ci=None if i == 0 else [-0.5, 0.75])
    made["run"].write_json("best.json", best)
    assert report_main([str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    fid = out.split("Held-out scores, fid (100 samples")[1].split("Held-out teacher_distance")[0]
    assert "[1, 1.5]" in fid and "-2.5" in fid
    td = out.split("Held-out teacher_distance (the searched metric")[1].split("Failures")[0]
    assert "[0.25, 0.75]" in td and "no (CI contains 0)" in td and "[-0.5, +0.75]" in td
