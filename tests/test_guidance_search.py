"""A tiny guidance search end to end, on the in-process engine: configuration keys
(``space.guidance``), the guided baselines, the weights in every Parquet row and in
best.json (with the network calls they cost), ``searchd.sample`` running the winner, the
export's honest refusal of per-step weights, and a model without guidance refused at start."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import searchd
from searchd.config import ConfigError, load_config
from searchd.export import guidance_scale, usage_section
from searchd.export import main as export_main
from searchd.loop.runs import BadInput
from searchd.sample import main as sample_main
from searchd.schedule import Schedule
from searchd.solvers import network_calls

REPO = Path(__file__).resolve().parents[1]
COND = REPO / "configs" / "digits-cond.yaml"
TINY = ["search.evolution.population_num=4", "search.evolution.select_num=2",
        "search.evolution.mutation_num=2", "search.evolution.crossover_num=1",
        "search.evolution.generations=2", "samples.per_candidate=100", "samples.heldout=100",
        "metric.reference=exact:300", "report.plots=false", "nfe=4",
        "baselines=[{family: polynomial, params: {rho: 7}}]"]


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    run = tmp_path_factory.mktemp("guided") / "steps"
    result = searchd.search(str(COND), [*TINY, "space.guidance.kind=steps"], run_dir=str(run),
                            engine="local")
    return run, result


def test_config_keys_and_one_line_errors():
    cfg = load_config(COND, ["space.guidance.kind=interval"])
    assert cfg.space.guidance.kind == "interval" and cfg.space.guidance.w is None
    bad = [
        (["space.guidance.kind=sometimes"], "space.guidance.kind"),
        (["space.guidance.kind=constant"], "space.guidance.w"),
        (["space.guidance.kind=steps", "space.guidance.baseline_w=[5]"],
         "space.guidance.baseline_w"),
        (["space.guidance.kind=steps", "search.algorithm=adaptive"], "space.guidance.kind"),
    ]
    for overrides, key in bad:
        with pytest.raises(ConfigError) as e:
            load_config(COND, overrides)
        assert str(e.value).startswith(key) and "\n" not in str(e.value)


def test_guided_search_records_the_weights(ran):
    run, result = ran
    best = json.loads((run / "best.json").read_text())
    w = best["guidance"]
    assert len(w) == best["n_steps"] == 4
    assert best["schedule"]["guidance"] == w and result.schedule.guidance.tolist() == w
    assert best["network_calls"] == network_calls("dpmpp_2m", 4, True, w)
    assert best["network_calls"] == 4 + sum(x != 1.0 for x in w)
    # The baselines: constant w = 1 and 2 and the paper's interval, each with its weights.
    names = sorted(best["baselines"])
    assert names == ["polynomial(rho=7) interval", "polynomial(rho=7) w=1",
                     "polynomial(rho=7) w=2"]
    assert best["baselines"]["polynomial(rho=7) w=2"]["guidance"] == [2.0] * 4
    # Every Parquet row's schedule carries weights, and they come back as schedules.
    records = searchd.open_run(run).evaluations()
    assert len(records) >= 4
    assert all(s.guidance is not None and s.guidance.size == 4 for s, _ in records)
    assert any(s.guidance.tolist() != w for s, _ in records)


def test_sample_runs_the_guided_winner(ran, tmp_path, capsys):
    run, _ = ran
    assert sample_main(["--schedule", str(run / "best.json"), "--n", "20",
                        "--out", str(tmp_path / "g.png")]) == 0
    out = capsys.readouterr().out
    best = json.loads((run / "best.json").read_text())
    assert "guidance " + " ".join(f"{x:.4g}" for x in best["guidance"]) in out
    assert f"network calls {best['network_calls']}" in out
    # --guidance on a model without an unconditional mode: one line, exit 2.
    code = sample_main(["--model", "gmm-digits-k8", "--sigmas", "80,1,0", "--guidance", "2",
                        "--n", "4", "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and "takes no guidance weights" in err and err.count("\n") == 1


def test_export_carries_constant_weights_and_refuses_per_step_ones(ran, capsys):
    sig = np.array([80.0, 5.0, 0.5, 0.0])
    assert guidance_scale(None) == (None, None)
    const = usage_section(Schedule(sig, guidance=[3.0] * 3))
    assert const["diffusers"]["pipeline_kwargs"]["guidance_scale"] == 3.0
    assert "guidance_scale': 3.0" in const["diffusers"]["code"]
    assert "cond_scale / cfg) = 3" in const["kdiffusion"]["note"]
    for weights, why in (([1.0, 2.0, 1.0], "per-step guidance weights"),
                         ([0.5] * 3, "below 1")):
        u = usage_section(Schedule(sig, guidance=weights))
        assert why in u["diffusers"]["error"] and u["guidance"] == weights
        assert "guidance=[" in u["searchd"]["code"]
        assert "not part of this form" in u["comfy"]["note"]
    # The command on the run: per-step weights are refused with the reason, on one line.
    run, _ = ran
    best = json.loads((run / "best.json").read_text())
    code = export_main([str(run), "--to", "diffusers"])
    cap = capsys.readouterr()
    if len(set(best["guidance"])) > 1:
        assert code == 2 and "per-step guidance weights" in cap.err
        assert cap.err.count("\n") == 1
    else:
        assert code == 0 and f"'guidance_scale': {best['guidance'][0]}" in cap.out


def test_a_model_without_guidance_is_refused_before_searching(tmp_path):
    with pytest.raises(BadInput, match="takes no guidance weights"):
        searchd.search(str(COND), [*TINY, "space.guidance.kind=interval",
                                   "model.name=gmm-digits-k8"],
                       run_dir=str(tmp_path / "r"), engine="local")
    assert not (tmp_path / "r" / "evaluations").exists()


def test_guided_seeds_beyond_the_population_are_one_line_before_searching(tmp_path):
    """Each baseline with each space.guidance.baseline_w (2) and the paper's interval: 5 seeds
    for generation 0, which does not hold them at population_num 4. Their number is known
    only once the space exists; the refusal is still one line, and nothing is left."""
    tiny = [*TINY, "baselines=[{family: polynomial, params: {rho: 7}}, {family: logsnr}]",
            "space.guidance.kind=interval"]
    with pytest.raises(BadInput) as e:
        searchd.search(str(COND), tiny, run_dir=str(tmp_path / "r"), engine="local")
    msg = str(e.value)
    assert msg.startswith("search.evolution.population_num: got 4") and "\n" not in msg
    assert "5 seed schedules" in msg
    assert not (tmp_path / "r").exists()


def test_extending_the_guided_run_continues_from_its_stored_state(ran):
    """A resumed guided run (one more generation): the stored rows come back as guided
    schedules, none is scored again, and the new generation's candidates are guided too.
    (Runs last: it extends the module's run.)"""
    run, _ = ran
    before = searchd.open_run(run).evaluations()
    again = searchd.search(run_dir=str(run), overrides=["search.evolution.generations=3"],
                           resume=True, force=True, engine="local")
    after = searchd.open_run(run).evaluations()
    ids = [r.candidate_id for _, r in after]
    assert len(after) > len(before) and len(set(ids)) == len(ids)
    assert {s.id for s, _ in before} <= {s.id for s, _ in after}
    assert all(s.guidance is not None for s, _ in after)
    assert again.schedule.guidance is not None
