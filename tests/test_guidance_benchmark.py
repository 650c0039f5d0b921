"""The guidance benchmark (benchmarks/guidance.py), tiny: a guidance search end to end (the
exact conditional mixture, constant and interval baselines, timesteps-only and joint
evolution searches on the constrained objective, held-out class metrics with paired
intervals), so that it cannot rot."""

from __future__ import annotations

import json
import math

import pytest

from searchd.solvers import network_calls
from tests.bench_module import load_benchmark


@pytest.fixture(scope="module")
def guidance_bench():
    return load_benchmark("guidance", "guidance_bench")


def test_tiny_guidance_benchmark(tmp_path, guidance_bench):
    import torch

    torch.set_num_threads(1)
    assert guidance_bench.main(["--tiny", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "guidance.json").read_text())
    (model,) = res["models"]
    assert model["model"] == "gmm-digits-cond"
    (row,) = model["rows"]
    assert row["nfe"] == 4 and set(row["methods"]) == set(guidance_bench.method_names(row))
    assert row["best_constant"] in ("w1", "w2", "w4")
    for name, m in row["methods"].items():
        for k in ("fid_class", "fid", "accuracy"):
            lo, hi = m[f"{k}_ci"]
            assert math.isfinite(m[k]) and lo <= m[k] <= hi, (name, k)
        assert len(m["guidance"]) == 4 and len(m["sigmas"]) == 5
        # Calls counted from the weights: a step with w != 1 costs two.
        assert m["network_calls"] == network_calls("dpmpp_2m", 4, True, m["guidance"])
        assert 0 <= m["accuracy"] <= 1
    best = row["methods"][row["best_constant"]]
    assert best["fid_class_diff"] == 0.0 and best["fid_class_diff_ci"] == [0.0, 0.0]
    assert row["methods"]["w4"]["guidance"] == [4.0] * 4
    assert row["methods"]["interval"]["network_calls"] < 8  # 1 outside the interval
    for name in guidance_bench.SEARCHED:
        m = row["methods"][name]
        assert 1 <= m["candidates"] <= 12 and m["search_calls"] > 0
    # The timesteps-only search keeps the best constant's weight.
    w_best = best["guidance"][0]
    assert row["methods"]["timesteps"]["guidance"] == [w_best] * 4
    assert set(row["target"]) == {"improvement_ge_20pct", "ci_excludes_0",
                                  "accuracy_not_worse", "beats_timesteps_only",
                                  "guidance_contributes"}
    # The ablation: the better joint schedule's timesteps at w = 1.
    joint = row["methods"][row["joint"]]
    assert row["methods"]["joint_w1"]["sigmas"] == joint["sigmas"]
    assert row["methods"]["joint_w1"]["guidance"] == [1.0] * 4
    if row["joint_guided_steps"] == 0:  # no guidance: the ablation is the same schedule
        assert row["joint_vs_joint_w1"]["diff"] == 0.0
    assert {"0.5", "0.75", "1.25", "1.5"} <= set(row["sweep"])
    assert row["objective"]["floor"] == row["search_metrics"][row["best_constant"]]["accuracy"]
    text = (tmp_path / "guidance.md").read_text()
    assert "| 4 |" in text and "paper interval" in text and "class FID" in text


def test_floor_from_a_fixed_schedule_picks_the_best_constant_that_meets_it(guidance_bench):
    """``--floor w1.5``: the floor is w=1.5's accuracy, the penalty's scale its class FID;
    the best constant is the lowest objective, so a better class FID below the floor loses
    to one that meets it (hand computation)."""
    vals = {"w1": {"fid_class": 1.0, "accuracy": 0.990},
            "w1.25": {"fid_class": 1.2, "accuracy": 0.999},
            "w1.5": {"fid_class": 1.4, "accuracy": 0.997},
            "interval": {"fid_class": 6.0, "accuracy": 0.998}}
    best, obj = guidance_bench.choose_floor("w1.5", ["w1", "w1.25", "w1.5"], vals)
    assert (obj.floor, obj.reference_fid) == (0.997, 1.4)
    # w1: 0.7 points below -> 1.0 + 1.4 * 0.7 = 1.98 > 1.2 (w1.25 meets the floor).
    assert obj(vals["w1"]) == pytest.approx(1.0 + 1.4 * 100 * 0.007)
    assert best == "w1.25"
    best, obj = guidance_bench.choose_floor("best", ["w1", "w1.25", "w1.5"], vals)
    assert best == "w1" and obj.floor == 0.990
    best, obj = guidance_bench.choose_floor("0.9985", ["w1", "w1.25", "w1.5"], vals)
    assert best == "w1.25" and obj.floor == 0.9985 and obj.reference_fid == 1.0
    with pytest.raises(SystemExit, match="--floor 'w9'"):
        guidance_bench.choose_floor("w9", ["w1"], vals)


def test_floor_margin_moves_the_searches_threshold_not_the_baseline(guidance_bench):
    """``--floor-margin`` goes to the library's objective as metric.options.floor_margin:
    "1se" at 1000 samples and a floor of 0.997 is sqrt(0.997 * 0.003 / 1000) = 0.001729
    (hand value), so a candidate exactly at the floor is penalised and one at 0.999 is not;
    the best constant is still chosen against the floor itself."""
    vals = {"w1": {"fid_class": 1.0, "accuracy": 0.990},
            "w1.25": {"fid_class": 1.2, "accuracy": 0.9975},
            "w1.5": {"fid_class": 1.4, "accuracy": 0.997},
            "interval": {"fid_class": 6.0, "accuracy": 0.998}}
    consts = ["w1", "w1.25", "w1.5"]
    best, obj = guidance_bench.choose_floor("w1.5", consts, vals, None, "1se", 1000)
    assert obj.margin == pytest.approx(0.0017294, abs=1e-6) and obj.floor == 0.997
    assert best == "w1.25"  # meets 0.997, though not 0.997 + margin
    at_floor = {"fid_class": 0.5, "accuracy": 0.997}
    assert obj(at_floor) == pytest.approx(0.5 + 1.4 * 100 * obj.margin)
    assert obj({"fid_class": 0.5, "accuracy": 0.999}) == 0.5
    _, plain = guidance_bench.choose_floor("w1.5", consts, vals)
    assert plain(at_floor) == 0.5
    _, fixed = guidance_bench.choose_floor("w1.5", consts, vals, None, 0.002, 1000)
    assert fixed.margin == 0.002
    with pytest.raises(SystemExit, match="floor_margin: got '2x'"):
        guidance_bench.choose_floor("w1.5", consts, vals, None, "2x", 1000)
    with pytest.raises(SystemExit, match="--floor-margin.*'2x'"):
        guidance_bench.main(["--tiny", "--floor-margin", "2x", "--out", "/nonexistent/x"])
