"""``search.algorithm: adaptive`` (searchd/adaptive/run.py and the session): configuration
checks, the predictor's training job, its files in a run directory, its paired held-out
score, and the whole command end to end (files, best.json, resume without retraining, and
the TorchScript export used as a user would, beside searchd's own solver)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from searchd.config import ConfigError, load_config
from searchd.models import load
from searchd.noise import make_noise
from searchd.schedule import Schedule
from searchd.schedules.baselines import baseline
from searchd.solvers import solve

QUICK = "configs/quickstart.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py; k8 too


# Configuration --------------------------------------------------------------------------------
def test_adaptive_config_needs_ld3_and_checks_its_settings(tmp_path):
    cfg = load_config(QUICK, ["search.algorithm=adaptive"])
    assert cfg.anchors == ["ld3"] and cfg.search.adaptive.kind == "one_shot"
    cfg = load_config(QUICK, ["search.algorithm=adaptive",
                              "search.adaptive.global_schedule=gits"])
    assert cfg.anchors == ["gits"]
    bad = {
        "search.adaptive.global_schedule=foo": "search.adaptive.global_schedule: got 'foo'; "
                                               "allowed: gits, ld3, or the path",
        "search.adaptive.kind=recursive": "search.adaptive.kind",
        "search.adaptive.train=5000": "search.adaptive.train: got 5000; must be <= "
                                      "samples.per_candidate (2000)",
        "space.kind=discrete": "space.kind: got 'discrete'; search.algorithm adaptive",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError) as e:
            load_config(QUICK, ["search.algorithm=adaptive", override])
        assert message in str(e.value) and "\n" not in str(e.value).strip(), str(e.value)


def test_global_schedule_from_an_earlier_best_json(tmp_path):
    from searchd.loop.adaptive import check_global_best, global_from_best
    from searchd.loop.plan import make_space

    cfg = load_config(QUICK, [])
    space = make_space(cfg, 0.002, 80.0)
    sig = [80.0, 5.0, 1.0, 0.2, 0.01, 0.0]
    path = tmp_path / "best.json"
    path.write_text(json.dumps({"sigmas": sig, "solver": "dpmpp_2m"}))
    sets = ["search.algorithm=adaptive", f"search.adaptive.global_schedule={path}"]
    cfg = load_config(QUICK, sets)
    assert cfg.anchors == []  # nothing to compute: the schedule is read
    got = global_from_best(path, space)
    assert list(got.sigmas) == sig and got.meta["origin"] == "best.json"
    # A best.json that cannot serve this run fails before Ray starts (the preflight's check,
    # beside the adaptive algorithm's run; validation itself reads no other run's files).
    bad = {
        json.dumps({"sigmas": sig, "solver": "euler"}): "for solver 'euler'; this run's",
        json.dumps({"sigmas": sig[:-2] + [0.0], "solver": "dpmpp_2m"}):
            "5 levels ending in 0; this run needs 6 levels",
        json.dumps({"sigmas": sig, "model_ids": [0] * 5}): "it is a model schedule",
        "{not json": "not a best.json with sigmas",
    }
    for text, message in bad.items():
        path.write_text(text)
        with pytest.raises(ConfigError) as e:
            check_global_best(load_config(QUICK, sets))
        assert "search.adaptive.global_schedule" in str(e.value) and message in str(e.value)
        assert len(e.value.lines) == 1
    # Checked against the model's noise range when the run starts.
    path.write_text(json.dumps({"sigmas": [500.0, 5.0, 1.0, 0.2, 0.01, 0.0]}))
    with pytest.raises(ValueError, match="search.adaptive.global_schedule: .*best.json"):
        global_from_best(path, space)


# The training job, the files, the held-out score --------------------------------------------------
@pytest.mark.parametrize("kind", ["one_shot", "delta"])
def test_compute_write_read_and_score_a_predictor(k8, tmp_path, kind):
    from searchd.adaptive.product import (
        compute_predictor,
        predictor_blob,
        predictor_final,
        predictor_from_blob,
    )
    from searchd.evaluation import Evaluator, load_features
    from searchd.evaluation.heldout import heldout_scores
    from searchd.evaluation.reference import exact_reference
    from searchd.loop.adaptive import read_predictor, write_predictor
    from searchd.storage import RunDir

    g = Schedule(baseline("polynomial", 4, k8.sigma_min, k8.sigma_max), solver="dpmpp_2m")
    params = {"kind": kind, "solver": "dpmpp_2m", "teacher_solver": "heun",
              "teacher_steps": 4, "oracle": {"iters": 3}, "fit": {"epochs": 10, "hidden": 8},
              "tune": None}
    out = compute_predictor(k8, g.to_dict(), range(8), params)
    # Counted like an anchor: the teacher (4 Heun steps to 0: 7 calls) and the oracle.
    assert out["denoiser_calls"] > 8 * 7 and out["record"]["n_train"] == 8
    assert out["record"]["oracle_loss"] < out["record"]["global_loss"]
    model = predictor_from_blob(out["blob"])
    assert predictor_blob(model)["args"] == out["blob"]["args"]

    run = RunDir(str(tmp_path / "run"))
    assert read_predictor(run) is None
    info = write_predictor(run, out["blob"], {"n_train": 8})
    assert sorted(run.listdir("predictor")) == ["predictor.json", "predictor.pt",
                                                "predictor.ts"]
    blob, stored = read_predictor(run)
    assert stored == json.loads(json.dumps(info)) and stored["meta"] == {"n_train": 8}
    back = predictor_from_blob(blob)
    noise = make_noise(range(50, 56), k8.shape, dtype=torch.float64)
    with torch.no_grad():
        assert torch.equal(solve(k8, noise, model.policy()), solve(k8, noise, back.policy()))

    ev = Evaluator(k8, "digits", exact_reference(k8, load_features("digits"), range(500, 564)))
    seeds = list(range(100, 116))
    held = predictor_final(ev, blob, g, seeds, 0.9)
    # Paired: the global row is exactly what heldout_scores gives that schedule on these seeds.
    alone = heldout_scores(ev, [g], seeds, level=0.9)
    assert held["scores"][0]["fid"] == alone["scores"][0]["fid"]
    assert held["level"] == 0.9 and held["scores"][1]["status"] == "ok"
    assert held["scores"][1]["diff"] == pytest.approx(
        held["scores"][1]["fid"] - held["scores"][0]["fid"])


# End to end --------------------------------------------------------------------------------------
TINY = ["samples.per_candidate=200", "samples.heldout=400", "metric.reference=exact:1000",
        "report.grid_samples=8", "search.ld3.train=8", "search.ld3.iters=4",
        "search.ld3.teacher_steps=16", "search.ld3.loss=pixels", "search.algorithm=adaptive",
        "search.adaptive.train=32", "search.adaptive.oracle_iters=4",
        "search.adaptive.epochs=30", "search.adaptive.teacher_steps=16",
        "baselines=[polynomial]", "report.plots=false"]


def _cli(*args: str) -> subprocess.CompletedProcess:
    p = subprocess.run([sys.executable, "-m", "searchd.search", *args, "--quiet"],
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


@pytest.mark.ray
def test_cli_adaptive_trains_stores_scores_and_resumes(tmp_path):
    run = tmp_path / "run"
    sets = [a for o in TINY for a in ("--set", o)]
    _cli("--config", QUICK, *sets, "--run-dir", str(run))
    best = json.loads((run / "best.json").read_text())
    ad = best["adaptive"]
    assert best["search"]["algorithm"] == "adaptive" and ad["status"] == "ok"
    # The global schedule is the run's LD3 anchor, scored on the search seeds like any
    # candidate; the predictor's files are in the run.
    ld3 = json.loads((run / "anchors.json").read_text())["anchors"][0]
    assert ad["global_schedule"] == {"source": "ld3", "sigmas": ld3["schedule"]["sigmas"]}
    rows = _rows(run)
    assert sorted(r["origin"] for r in rows) == ["baseline", "ld3"]
    row = next(r for r in rows if r["origin"] == "ld3")
    assert row["sigmas"] == best["anchors"]["ld3"]["sigmas"] and row["status"] == "ok"
    assert best["anchors"]["ld3"]["params"]["loss"] == "pixels"
    assert best["anchors"]["ld3"]["denoiser_calls"] > 0
    for key in ("weights", "torchscript", "description"):
        assert (run / ad[key]).is_file()
    info = json.loads((run / ad["description"]).read_text())
    assert info["global_sigmas"] == ld3["schedule"]["sigmas"]
    assert ad["training"]["n_train"] == 32 and ad["training"]["denoiser_calls"] > 0
    # Paired against the global schedule on the held-out seeds: the global row is the very
    # score the held-out table gives that schedule.
    h = ad["heldout"]
    assert h["n_samples"] == 400 and h["seed_base"] == best["heldout"]["seed_base"]
    table = {s["candidate_id"]: s for s in best["heldout"]["scores"]}
    glob = Schedule(np.asarray(ld3["schedule"]["sigmas"]), solver="dpmpp_2m")
    assert h["global"]["fid"] == table[glob.id]["fid"]
    assert h["diff"] == pytest.approx(h["predictor"]["fid"] - h["global"]["fid"])
    lo, hi = h["diff_ci"]
    assert lo <= h["diff"] <= hi
    assert h["gain"] == pytest.approx(-h["diff"] / h["global"]["fid"])

    # The TorchScript export, as a user loads it beside a sampler: the first denoiser output
    # gives each noise its schedule, which any solver that takes per-sample sigmas runs.
    den = load("gmm-digits")
    scripted = torch.jit.load(str(run / ad["torchscript"]))
    z = make_noise(range(1_000_000, 1_000_016), tuple(den.shape))
    smax = info["global_sigmas"][0]
    with torch.no_grad():
        sig = scripted(den(z * smax, torch.tensor(smax)))
        assert sig.shape == (16, 6) and bool((sig[:, 0] == smax).all())
        from searchd.adaptive.product import load_predictor

        policy = load_predictor(run / "predictor").policy()
        assert torch.equal(solve(den, z, sig, solver="dpmpp_2m"),
                           solve(den, z, policy, solver="dpmpp_2m"))

    # Resume: the stored predictor is read back, not trained again; same result.
    (run / "best.json").unlink()
    weights = (run / ad["weights"]).read_bytes()
    _cli("--resume", str(run))
    log = (run / "log.txt").read_text()
    assert "predictor read back" in log and log.count("training the one_shot predictor") == 1
    again = json.loads((run / "best.json").read_text())["adaptive"]
    assert again["heldout"] == ad["heldout"] and again["training"] == ad["training"]
    assert (run / ad["weights"]).read_bytes() == weights
    assert log.count("adaptive one_shot predictor vs its global schedule (ld3)") == 2


def _rows(run):
    import pyarrow.parquet as pq

    return pq.read_table(run / "evaluations").to_pylist()


def test_adaptive_searcher_proposes_the_global_schedule_then_the_baselines(tmp_path):
    from searchd.loop.plan import make_baselines, make_searcher, make_space

    cfg = load_config(QUICK, ["search.algorithm=adaptive", "baselines=[polynomial, logsnr]"])
    space = make_space(cfg, 0.002, 80.0)
    bases = make_baselines(cfg, space)
    glob = space.check(Schedule(np.array([80.0, 4.0, 1.5, 0.25, 0.05, 0.0]),
                                solver="dpmpp_2m", meta={"origin": "ld3"}))
    s = make_searcher(cfg.search, space, bases, "fid", "min", {"ld3": glob})
    got = [s.ask(f"t{i}") for i in range(4)]
    assert [g.id for g in got[:3]] == [glob.id, *(b.id for b in bases)]
    assert got[0].meta["origin"] == "ld3" and got[3] == "FINISHED"
    assert s.algorithm == "adaptive" and s.schedule.id == glob.id
    with pytest.raises(ValueError, match="the ld3 schedule must be computed"):
        make_searcher(cfg.search, space, bases, "fid", "min", None)
    # A best.json as the global schedule: read, nothing computed.
    path = tmp_path / "best.json"
    path.write_text(json.dumps({"sigmas": list(glob.sigmas), "solver": "dpmpp_2m"}))
    cfg = load_config(QUICK, ["search.algorithm=adaptive",
                              f"search.adaptive.global_schedule={path}"])
    s = make_searcher(cfg.search, space, bases, "fid", "min", {})
    assert s.schedule.id == glob.id and s.schedule.meta["origin"] == "best.json"
