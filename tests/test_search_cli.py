"""``python -m searchd.search`` end to end: bad input fails fast, a tiny search runs through
Ray Tune and the actors, and leaves best.json, Parquet rows and plots."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest

from searchd.search.driver import config_diff, main

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
    assert message in err and len(err.splitlines()) == 1, err
    assert time.monotonic() - t0 < 60  # no Ray, no model: fails before any expensive work


def test_unknown_model_names_the_known_ones(capsys):
    assert main(["--config", "configs/quickstart.yaml", "--set", "model.name=sd99"]) == 2
    err = capsys.readouterr().err
    assert "model.name = 'sd99'" in err and "gmm-digits-k64" in err


def test_print_config_resolves_steps_and_defaults(capsys):
    assert main(["--config", "configs/quickstart.yaml", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "steps: 5" in out and "algorithm: evolution" in out


def test_config_diff_lists_dotted_keys():
    a = {"search": {"seed": 0, "evolution": {"generations": 3}}, "nfe": 5}
    b = {"search": {"seed": 1, "evolution": {"generations": 3}}, "nfe": 6}
    assert config_diff(a, b) == ["nfe", "search.seed"]


@pytest.mark.ray
def test_tiny_search_end_to_end(tmp_path):
    run = tmp_path / "run"
    p = run_cli("--config", "configs/quickstart.yaml", *TINY, "--run-dir", str(run), "--quiet")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    best = json.loads((run / "best.json").read_text())
    table = pq.read_table(run / "evaluations")
    rows = table.to_pylist()
    # Every candidate scored once; generation 0 holds the three baselines.
    ids = [r["candidate_id"] for r in rows]
    assert len(ids) == len(set(ids)) == 12
    assert sum(r["origin"] == "baseline" for r in rows) == 3
    assert {r["generation"] for r in rows} == {0, 1}
    assert all(r["status"] == "ok" and r["nfe"] == 5 for r in rows)
    # The winner is the best scored candidate, never worse than the best baseline.
    ok = [r for r in rows if r["value"] is not None]
    winner = min(ok, key=lambda r: r["value"])
    assert best["schedule"]["id"] == winner["candidate_id"]
    assert best["search"]["value"] == winner["value"]
    base = min(r["value"] for r in rows if r["origin"] == "baseline")
    assert best["search"]["value"] <= base
    # Held-out scores: the winner and 3 baselines, with intervals and paired differences.
    held = best["heldout"]
    assert held["n_samples"] == 600 and held["seed_base"] == 1_000_000
    assert [s["name"] for s in held["scores"]][0] == "searched"
    assert all(s["fid_ci"][0] <= s["fid_ci"][1] for s in held["scores"])
    assert best["usage"]["sigmas"] == best["sigmas"] and "pipe.scheduler" in (
        best["usage"]["diffusers"]["code"])
    for name in ("metric_per_generation.png", "schedules.png", "samples_best.png"):
        assert (run / "report" / name).stat().st_size > 1000
    assert (run / "config.yaml").exists() and (run / "log.txt").exists()
    assert list((run / "searcher").glob("state-*.json"))
