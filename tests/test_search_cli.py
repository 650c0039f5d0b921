"""``python -m searchd.search`` end to end: bad configuration fails fast on one line, a tiny
search runs through Ray Tune and the actors (the model loaded once per actor, the held-out
scoring on them), and leaves best.json, Parquet rows and plots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from searchd.loop.runs import config_diff
from searchd.search import main

TINY = [
    "--set", "search.evolution.population_num=6",
    "--set", "search.evolution.select_num=3",
    "--set", "search.evolution.mutation_num=2",
    "--set", "search.evolution.crossover_num=1",
    "--set", "search.evolution.generations=2",
    "--set", "samples.per_candidate=300",
    "--set", "samples.heldout=600",
    "--set", "metric.reference=exact:2000",
    "--set", "report.grid_samples=16",
]


def run_cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "searchd.search", *args],
        capture_output=True, text=True, timeout=timeout,
    )


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("search.algorithm=annealing", "search.algorithm"),
        ("solver.name=rk4", "solver.name"),
        ("samples.heldout_seed_base=100", "overlap"),
        ("search.evolutionn.population_num=3", "evolutionn"),
    ],
)
def test_bad_configuration_is_one_line_before_ray(override, message, capsys):
    t0 = time.monotonic()
    code = main(["--config", "configs/quickstart.yaml", "--set", override])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("python -m searchd.search: error: ")
    assert message in err and len(err.splitlines()) == 1, err
    assert time.monotonic() - t0 < 60  # no Ray, no model: fails before any expensive work


def test_unknown_model_names_the_known_ones(capsys):
    assert main(["--config", "configs/quickstart.yaml", "--set", "model.name=sd99"]) == 2
    err = capsys.readouterr().err
    assert "model.name = 'sd99'" in err and "gmm-digits-k64" in err


def test_print_config_resolves_steps_and_defaults_and_invents_no_directory(
        capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "quickstart.yaml")
    assert main(["--config", config, "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "steps: 5" in out and "algorithm: evolution" in out
    assert "run_dir: null" in out and not (tmp_path / "runs").exists()


def test_config_diff_lists_dotted_keys():
    a = {"search": {"seed": 0, "evolution": {"generations": 3}}, "nfe": 5}
    b = {"search": {"seed": 1, "evolution": {"generations": 3}}, "nfe": 6}
    assert config_diff(a, b) == ["nfe", "search.seed"]


@pytest.mark.ray
def test_tiny_search_end_to_end(tmp_path):
    run = tmp_path / "run"
    p = run_cli("--config", "configs/quickstart.yaml", *TINY, "--run-dir", str(run))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert "Token authentication" not in p.stdout + p.stderr  # Ray's banner stays quiet
    assert "Resume experiment with" not in p.stdout + p.stderr
    assert p.stdout.splitlines()[1] == "searchd: starting a local Ray ..."
    best = json.loads((run / "best.json").read_text())
    table = pq.read_table(run / "evaluations")
    rows = table.to_pylist()
    # The race (search.racing, on by default): the top 3 (a quarter of the budget of 12)
    # re-scored on a fresh block of search seeds, stored as rows of their own.
    race = [r for r in rows if r["trial_id"].startswith("race/")]
    rows = [r for r in rows if not r["trial_id"].startswith("race/")]
    assert len(race) == 3 and {(r["fidelity"], r["seed_base"]) for r in race} == {(1, 300)}
    # Every candidate scored once by the search (the budget less the race); generation 0
    # holds the three baselines.
    ids = [r["candidate_id"] for r in rows]
    assert len(ids) == len(set(ids)) == 9
    assert {r["candidate_id"] for r in race} <= set(ids)
    assert sum(r["origin"] == "baseline" for r in rows) == 3
    assert {r["generation"] for r in rows} == {0, 1}
    assert all(r["status"] == "ok" and r["nfe"] == 5 for r in rows)
    # The winner is the race's (the lowest mean over the search block and the race's), and
    # the search found one better than every baseline (they are far from the optimum here).
    assert best["racing"]["winner"] == best["schedule"]["id"]
    assert best["search"]["evaluations"] == 12
    winner = next(r for r in rows if r["candidate_id"] == best["schedule"]["id"])
    assert best["search"]["value"] == winner["value"]
    assert winner["origin"] != "baseline"
    assert best["search"]["value"] < min(r["value"] for r in rows if r["origin"] == "baseline")
    # Held-out scores: the winner and 3 baselines, with intervals and paired differences.
    held = best["heldout"]
    assert held["n_samples"] == 600 and held["seed_base"] == 1_000_000
    assert [s["name"] for s in held["scores"]][0] == "searched"
    assert all(s["fid_ci"][0] <= s["fid_ci"][1] for s in held["scores"])
    assert held["scores"][0]["significant"] is True  # far better than polynomial here
    assert best["usage"]["sigmas"] == best["sigmas"] and "pipe.scheduler" in (
        best["usage"]["diffusers"]["code"])
    for name in ("metric_per_generation.png", "schedules.png", "samples_best.png"):
        assert (run / "report" / name).stat().st_size > 1000
    assert (run / "config.yaml").exists() and (run / "log.txt").exists()
    assert list((run / "searcher").glob("state-*.json"))
    # The run's id is its directory's name.
    assert best["run_id"] == "run" and {r["run_id"] for r in rows} == {"run"}
    # The model was loaded once per actor and never in the driver; the exact reference and
    # the held-out scores were computed on the actors (no other load).
    log = (run / "log.txt").read_text()
    assert "the model was loaded 2 time(s), once per evaluator (evaluator-0 1, evaluator-1 1)" \
        "; in the driver: 0" in log
    assert "model loads: {'evaluator-0': 1, 'evaluator-1': 1} (driver: 0)" in log
