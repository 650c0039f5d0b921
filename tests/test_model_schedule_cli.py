"""``python -m searchd.search`` with a model-schedule space: the actors time the zoo, the
run records the latencies, and no scored schedule (nor the winner) exceeds the budget."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq

from searchd.schedules.cost import calls_per_step
from searchd.search import main
from tests.test_search_cli import run_cli

TINY = [
    "--set", "steps=4",
    "--set", "space.budget_nfe=2.5",
    "--set", "search.evolution.population_num=6",
    "--set", "search.evolution.select_num=2",
    "--set", "search.evolution.mutation_num=2",
    "--set", "search.evolution.crossover_num=1",
    "--set", "search.evolution.generations=2",
    "--set", "search.predictor.enabled=true",
    "--set", "search.predictor.min_train=4",
    "--set", "search.predictor.steps=5",
    "--set", "baselines=[logsnr]",
    "--set", "model.latency_batch_size=256",
    "--set", "samples.per_candidate=200",
    "--set", "samples.heldout=300",
    "--set", "metric.reference=exact:500",
    "--set", "workers.num_workers=1",
    "--set", "report.plots=false",
]


def test_model_schedule_search_never_exceeds_its_budget(tmp_path):
    run = tmp_path / "run"
    p = run_cli("--config", "configs/model-schedule.yaml", "--run-dir", str(run), "--quiet",
                *TINY)
    assert p.returncode == 0, p.stderr[-3000:]
    zoo = json.loads((run / "run.json").read_text())["zoo"]
    lat = np.asarray(zoo["latency_ms"])
    assert zoo["members"] == ["gmm-digits-k1", "gmm-digits-k8", "gmm-digits-k64"]
    assert np.all(lat > 0) and zoo["per_worker"][0]["batch_size"] == 256
    budget = 2.5 * lat.max()
    rows = pq.read_table(run / "evaluations").to_pylist()
    assert len(rows) == 12
    calls = calls_per_step("dpmpp_2m", 4)
    for r in rows:
        assert r["model_ids"] is not None and len(r["model_ids"]) == 4
        assert float(np.sum(calls * lat[r["model_ids"]])) <= budget * (1 + 1e-9)
    best = json.loads((run / "best.json").read_text())
    assert best["zoo"]["budget_ms"] == budget
    assert best["zoo"]["winner_ms"] <= budget * (1 + 1e-9)
    assert len(best["model_ids"]) == 4 and best["schedule"]["model_ids"] == best["model_ids"]
    assert best["heldout"]["scores"][0]["status"] == "ok"


def test_model_schedule_config_errors_are_one_line(capsys):
    code = main(["--config", "configs/model-schedule.yaml", "--set", "space.budget_nfe=null"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "budget_ms" in err, err
    code = main(["--config", "configs/model-schedule.yaml", "--set", "model.zoo=[gmm-digits-k1,"
                 "nope]"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "model.zoo.1 = 'nope'" in err and "gmm-digits-k8" in err, err
