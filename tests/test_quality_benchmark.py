"""The quality benchmark (benchmarks/quality.py), tiny: every code path on a few hundred
samples, so that it cannot rot."""

from __future__ import annotations

import json
import math

import pytest

from tests.bench_module import load_benchmark


@pytest.fixture(scope="module")
def quality():
    return load_benchmark("quality")


def test_tiny_quality_benchmark(tmp_path, quality):
    import torch

    torch.set_num_threads(1)
    assert quality.main(["--tiny", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "quality.json").read_text())
    (model,) = res["models"]
    assert model["model"] == "gmm-digits-k64"
    (row,) = model["rows"]
    assert row["nfe"] == 4 and row["n_steps"] == 4
    assert set(row["methods"]) == set(quality.METHODS)
    for name, m in row["methods"].items():
        lo, hi = m["fid_ci"]
        assert math.isfinite(m["fid"]) and lo <= m["fid"] <= hi, name
        assert len(m["sigmas"]) == 5 and m["sigmas"][-1] == 0.0
    best = row["methods"][row["best_fixed"]]
    assert best["diff"] == 0.0 and best["diff_ci"] == [0.0, 0.0]
    # Costs: fixed schedules cost nothing; GITS's calls are counted (Heun over 13 levels
    # and 0, 3 * 14 - 4 calls per warm-up sample); searches stay within the budget.
    assert all(row["methods"][f]["calls"] == 0 for f in quality.FIXED)
    gits = row["methods"]["gits"]["calls"]
    assert gits == (3 * 14 - 4) * 16
    for name in ("evolution", "bayes", "random"):
        m = row["methods"][name]
        assert 0 < m["calls"] <= 12 * gits and m["candidates"] >= 1, name
    evo = row["methods"]["evolution"]
    assert evo["calls"] >= gits + row["methods"]["ld3"]["calls"]  # it paid for its seeds
    # The warm-started evolution keeps the best of its seeds on the search seeds.
    assert row["evolution_cost_over_gits"] == pytest.approx(evo["calls"] / gits)
    # Issue 19: the floor of exact samples beside every FID; two searcher seeds of each
    # variant; racing paid from the evolution's budget; the solver-schedule space.
    floor = row["floor"]
    assert floor["n"] == 300 and floor["fid_ci"][0] <= floor["fid"] <= floor["fid_ci"][1]
    for name, m in row["methods"].items():
        assert m["excess"] == pytest.approx(m["fid"] - floor["fid"]), name
    assert set(row["variants"]) == {"evolution", "race", "strategy"}
    for variant, per in row["variants"].items():
        assert set(per) == {"0", "1"}, variant
        for e in per.values():
            assert e["calls"] <= 12 * gits + 1e-9 and e["cost_over_gits"] <= 12 + 1e-9
            lo, hi = e["minus_ld3"]["ci"]
            assert lo <= e["minus_ld3"]["diff"] <= hi
            assert e["met"] == (all(e[f"vs_{o}"]["improvement"] >= 0.15
                                    and e[f"vs_{o}"]["ci"][0] > 0 for o in ("gits", "ld3"))
                                and e["cost_over_gits"] <= 10 + 1e-9)
            # The flow target's third comparison: over the best non-searched schedule.
            assert e["vs_fixed"]["improvement"] == pytest.approx(1 - e["fid"] / best["fid"])
            lo, hi = e["vs_fixed"]["ci"]
            assert lo <= e["vs_fixed"]["improvement"] <= hi
            assert e["flow_met"] == (e["met"] and e["vs_fixed"]["improvement"] >= 0.25
                                     and lo > 0)
    for e in row["variants"]["race"].values():
        assert e["race"]["rescored"] == 2 and e["race"]["calls"] == 2 * 150 * 4
    assert row["methods"]["evolution"]["fid"] == row["variants"]["evolution"]["0"]["fid"]
    text = (tmp_path / "quality.md").read_text()
    assert "| 4 |" in text and "neural digits zoo" in text and "LD3" in text
    assert "Over searcher seeds (issue 19)" in text and "excess over floor" in text
    assert (tmp_path / "quality.png").stat().st_size > 5000


def test_tiny_quality_ceiling(tmp_path, quality):
    """The long-search ceiling (benchmarks/quality_ceiling.py), tiny: its best re-scored
    schedule is a searched one, not an anchor, and the held-out comparison is paired."""
    import torch

    torch.set_num_threads(1)
    mod = load_benchmark("quality_ceiling")
    out = tmp_path / "c"
    assert mod.main(["--tiny", "--candidates", "12", "--top", "2", "--out", str(out)]) == 0
    (row,) = json.loads((out / "quality_ceiling.json").read_text())["rows"]
    assert row["nfe"] == 4 and row["solver"] == "dpmpp_2m"
    assert {s: v["candidates"] for s, v in row["search"].items()} == {"evolution": 12,
                                                                      "bayes": 12}
    assert len(row["top"]) == 2
    for t in row["top"]:
        assert t["sigmas"] != row["ld3"]["sigmas"] and t["found_by"] in ("evolution", "bayes")
        lo, hi = t["vs_ld3_ci"]
        assert lo <= t["vs_ld3"] <= hi
        assert t["vs_ld3"] == pytest.approx(1 - t["fid"] / row["ld3"]["fid"])
    # Ranked by search FID; the best held out is the one reported.
    assert [t["search_fid"] for t in row["top"]] == sorted(t["search_fid"] for t in row["top"])
    assert row["top"][row["best"]]["fid"] == min(t["fid"] for t in row["top"])
    merged = tmp_path / "m"
    assert mod.main(["--merge", str(out / "quality_ceiling.json"), "--out", str(merged)]) == 0
    assert "| gmm-digits-k64 | dpmpp_2m | 4 | 12 |" in (merged / "quality_ceiling.md").read_text()


def test_tiny_quality_variants(tmp_path, quality):
    """Evolution variants over searcher seeds (benchmarks/quality_variants.py), tiny: every
    run is re-scored against LD3 on the same held-out samples, and a bad --variant is a
    one-line error."""
    import torch

    torch.set_num_threads(1)
    mod = load_benchmark("quality_variants")
    with pytest.raises(SystemExit):
        mod.main(["--tiny", "--variant", "no-json-here", "--out", str(tmp_path)])
    assert mod.main(["--tiny", "--seeds", "0", "1", "--variant", 'step={"mutation_scale": 0.2}',
                     "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "quality_variants.json").read_text())
    evo = quality.plain(quality.tiny_settings().evolution)
    assert res["variants"] == {"benchmark": evo, "step": {**evo, "mutation_scale": 0.2}}
    (row,) = res["rows"]
    assert [(r["variant"], r["seed"]) for r in row["runs"]] == [
        ("benchmark", 0), ("benchmark", 1), ("step", 0), ("step", 1)]
    for r in row["runs"]:
        assert r["candidates"] == row["budget_candidates"]
        assert r["vs_ld3"] == pytest.approx(1 - r["fid"] / row["ld3"]["fid"])
        lo, hi = r["vs_ld3_ci"]
        assert lo <= r["vs_ld3"] <= hi
    assert "| step |" in (tmp_path / "quality_variants.md").read_text()
    # Merging: a variant is its settings (same settings under another name are one variant,
    # a name reused for other settings gets a suffix); a run already there is kept once.
    other = json.loads((tmp_path / "quality_variants.json").read_text())
    other["variants"] = {"again": evo, "benchmark": {**evo, "m_prob": 0.9}}
    for r in other["rows"][0]["runs"]:
        r["variant"] = {"benchmark": "again", "step": "benchmark"}[r["variant"]]
    merged = mod.merge([res, other])
    assert list(merged["variants"]) == ["benchmark", "step", "benchmark-2"]
    assert [(r["variant"], r["seed"]) for r in merged["rows"][0]["runs"]] == [
        ("benchmark", 0), ("benchmark", 1), ("step", 0), ("step", 1), ("benchmark-2", 0),
        ("benchmark-2", 1)]


@pytest.mark.parametrize("arg", ["mutation", "seed=3", "max_candidates=9", "speed=2"])
def test_quality_evolution_option_refuses_bad_keywords(arg, quality, capsys):
    """--evolution takes only EvolutionSearcher keywords the benchmark lets change (not its
    seed or budget), and says so before any work starts."""
    with pytest.raises(SystemExit) as e:
        quality.main(["--tiny", "--evolution", arg, "--out", "/nonexistent/never-made"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--evolution" in err and ("allowed: crossover_num" in err or "KEY=VALUE" in err)


def test_tiny_quality_benchmark_on_a_flow_model(tmp_path, quality, monkeypatch):
    """The flow case: digits-flow-s, the flow baselines, a space warped in flow time, the
    warm-started evolution only; the flow target's comparisons are in the row and the table."""
    import torch

    torch.set_num_threads(1)
    tiny = quality.tiny_settings

    def tiny_flow():  # a population that holds the 6 flow baselines, GITS and LD3
        s = tiny()
        s.evolution = dict(s.evolution, population_num=8, mutation_num=4)
        s.searcher_seeds, s.variants = [0], ["evolution"]  # issue 19's variants: elsewhere
        return s

    monkeypatch.setattr(quality, "tiny_settings", tiny_flow)
    assert quality.main(["--tiny", "--models", "digits-flow-s", "--solvers", "euler",
                         "--baselines", "flow", "--searches", "evolution",
                         "--space", "warp=flow", "shift=3", "--evolution", "mutation=level",
                         "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "quality.json").read_text())
    (model,) = res["models"]
    assert model["model"] == "digits-flow-s" and model["solver"] == "euler"
    (row,) = model["rows"]
    # --evolution's keywords reach the searcher and the row (level-local mutation here).
    assert row["evolution_settings"]["mutation"] == "level"
    assert "mutation" not in quality.tiny_settings().evolution
    assert list(row["methods"]) == [*quality.BASELINE_SETS["flow"], "gits", "ld3", "evolution"]
    assert row["settings"] == {"baselines": "flow", "space": {
        **quality.plain(quality.tiny_settings().space), "warp": "flow", "shift": 3}}
    assert row["best_fixed"] in quality.BASELINE_SETS["flow"]
    vf = row["evolution_vs_fixed"]
    best = row["methods"][row["best_fixed"]]["fid"]
    assert vf["improvement"] == pytest.approx(1 - row["methods"]["evolution"]["fid"] / best)
    assert isinstance(row["flow_target_met"], bool)
    text = (tmp_path / "quality.md").read_text()
    assert "Target (flow)" in text and "SD3 shift 3" in text and "--baselines flow" in text
    # Its GITS and LD3 comparisons are in the flow table; the mixture's second table is not
    # repeated, and a miss points at the floor measurement, not the mixture's diagnosis.
    assert "Target: warm-started evolution vs GITS and LD3" not in text
    assert "quality-diagnosis.md` (" not in text

    # Merging it into an earlier merged result keeps that result's commands and processes.
    prev = tmp_path / "prev"
    prev.mkdir()
    old = {k: v for k, v in res.items() if k != "command"}
    old["models"] = [dict(model, model="gmm-digits-k64")]
    old["parts"] = ["/runs/a/quality.json", "/runs/b/quality.json"]
    (prev / "quality.json").write_text(json.dumps(old))
    (prev / "quality.md").write_text("# Quality\n\nCommand: `cmd a ; cmd b`\n")
    assert quality.main(["--merge", str(tmp_path / "quality.json"), "--out", str(prev)]) == 0
    merged = json.loads((prev / "quality.json").read_text())
    assert merged["parts"] == [*old["parts"], str(tmp_path / "quality.json")]
    assert merged["command"] == "cmd a ; cmd b ; " + res["command"]
    assert [m["model"] for m in merged["models"]] == ["gmm-digits-k64", "digits-flow-s"]
    assert f"Command: `cmd a ; cmd b ; {res['command']}`" in (prev / "quality.md").read_text()
