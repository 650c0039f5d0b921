"""benchmarks/quality_flow_probe.py: the flow misses' probes on a tiny scale."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tests.bench_module import load_benchmark


@pytest.fixture(scope="module")
def probe():
    return load_benchmark("quality_flow_probe")


def test_schedule_of_round_trips_flow_times(probe):
    s = probe.schedule_of([0.6, 0.4, 0.2], 80.0)
    t = s.sigmas / (1 + s.sigmas)
    assert s.sigmas[0] == 80.0 and s.sigmas[-1] == 0.0 and len(s.sigmas) == 5
    np.testing.assert_allclose(t[1:4], [0.6, 0.4, 0.2], rtol=1e-12)
    assert probe.valid([0.6, 0.4, 0.2], 0.988, 0.002)
    assert not probe.valid([0.4, 0.6, 0.2], 0.988, 0.002)
    assert not probe.valid([0.6, 0.4, 0.001], 0.988, 0.002)
    pts = probe.grid_points(4)
    assert len(pts) == 36 and all(probe.valid(x, 0.988, 0.002) for x in pts)
    with pytest.raises(ValueError, match="nfe = 6"):
        probe.grid_points(6)


@pytest.mark.parametrize("args, says", [
    (["--points", "[[0.5, 0.2]]"], "lists of 3 flow times"),
    (["--nelder-mead"], "--nelder-mead needs --start with 3"),
    (["--nelder-mead", "--start", "0.5"], "--nelder-mead needs --start with 3")])
def test_bad_input_is_refused_before_work(probe, args, says, capsys):
    with pytest.raises(SystemExit) as e:
        probe.main(["--tiny", "--nfe", "4", *args])
    assert e.value.code == 2 and says in capsys.readouterr().err


def test_tiny_probe_runs_and_never_loses_its_start(probe, tmp_path):
    import torch

    torch.set_num_threads(1)
    out = tmp_path / "probe.json"
    assert probe.main(["--tiny", "--nfe", "4", "--samples", "64", "--points",
                       "[[0.65, 0.5, 0.29], [0.7, 0.54, 0.4]]", "--nelder-mead", "--start",
                       "0.65", "0.5", "0.29", "--max-evals", "5", "--heldout",
                       "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    pts = {tuple(e["t"]): e["fid"] for e in res["points"]}
    nm = res["nelder_mead"]
    # Nelder-Mead scores its start first on the same seeds: its best is never worse.
    assert nm["evals"] >= 1 and nm["fid"] <= pts[(0.65, 0.5, 0.29)] + 1e-9
    held = res["heldout"]
    assert set(held) == {"uniform t, to 0", "GITS", "nelder-mead best", "point 0", "point 1"}
    for name, e in held.items():
        lo, hi = e["fid_ci"]
        assert lo <= e["fid"] <= hi, name
        g = e["vs uniform t, to 0"]
        assert g["improvement"] == pytest.approx(1 - e["fid"] / held["uniform t, to 0"]["fid"])
    assert held["GITS"]["vs GITS"]["improvement"] == 0.0


def test_replay_scores_shared_prefixes_once_and_validates_off_the_search_seeds(probe, tmp_path,
                                                                               capsys):
    import torch

    torch.set_num_threads(1)
    with pytest.raises(SystemExit):
        probe.main(["--tiny", "--replay", "--configs", "refine=2 colour=red"])
    assert "'colour=red' is not KEY=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # the validation block overlaps the search seeds
        probe.main(["--tiny", "--replay", "--samples", "64", "--validation", "32", "64"])
    out = tmp_path / "replay.json"
    assert probe.main(["--tiny", "--nfe", "6", "--samples", "48", "--replay",
                       "--searcher-seeds", "0", "--configs", "population_num=10",
                       "population_num=10 refine=4 refine_batch=1",
                       "--validation", "5000", "48", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["replay"]
    assert [r["config"] for r in rows] == ["population_num=10",
                                           "population_num=10 refine=4 refine_batch=1"]
    for r in rows:
        assert r["candidates"] == r["n_evo"] and r["t"][-1] == 0.0
        assert r["validation_fid"] > 0 and r["search_fid"] > 0
    # The second search repeats the first's candidates up to its local phase (the last 4):
    # those are scored once, so at most 4 new candidates and 1 validation were scored.
    import re

    fresh = [int(n) for n in re.findall(r"\((\d+) scored so far\)", capsys.readouterr().out)]
    n = rows[0]["n_evo"]
    assert fresh[0] <= n + 1 and fresh[1] - fresh[0] <= 4 + 1
