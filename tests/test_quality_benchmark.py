"""The quality benchmark (benchmarks/quality.py), tiny: every code path on a few hundred
samples, so that it cannot rot."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality", ROOT / "benchmarks" / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["quality"] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


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
        assert 0 < m["calls"] <= 10 * gits and m["candidates"] >= 1, name
    evo = row["methods"]["evolution"]
    assert evo["calls"] >= gits + row["methods"]["ld3"]["calls"]  # it paid for its seeds
    # The warm-started evolution keeps the best of its seeds on the search seeds.
    assert row["evolution_cost_over_gits"] == pytest.approx(evo["calls"] / gits)
    text = (tmp_path / "quality.md").read_text()
    assert "| 4 |" in text and "neural digits zoo" in text and "LD3" in text
    assert (tmp_path / "quality.png").stat().st_size > 5000
