"""``python -m searchd.report``: finished runs, runs in progress (lock held by another
process), runs with a corrupt part, and paths that are not run directories. The run
directories are written with ``searchd.storage`` (no Ray); a report of a real search's run
is checked in tests/test_resume_faults.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_storage_support import REPO, child_env, make_row, start_child

from searchd.api import open_run
from searchd.config import load_config
from searchd.report import main
from searchd.storage import RunDir, read_lock

BASELINES = ["polynomial(rho=7)", "logsnr", "time_uniform"]
CHILD_HOLDS_LOCK = """
import sys
from searchd.storage import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
sys.stdin.read()
lock.release()
"""


def write_run(loc: str | Path, *, finished: bool) -> dict:
    """A run directory as the driver leaves it: config, run.json, two generations of rows
    (three baselines, one failure), searcher states, and (finished) best.json."""
    run = RunDir(loc)
    cfg = load_config(str(REPO / "configs/quickstart.yaml"), [])
    run.write_text("config.yaml", cfg.to_yaml())
    run.write_json("run.json", {"run_id": "run-test"})
    gen0 = [make_row(i, generation=0, origin="baseline" if i < 3 else "random")
            for i in range(6)]
    for name, r in zip(BASELINES, gen0):  # the rows' schedules carry the baselines' names
        sched = json.loads(r["schedule"])
        sched["meta"].update(name=name)
        r["schedule"] = json.dumps(sched)
    gen1 = [make_row(i, generation=1, origin="mutation") for i in range(6, 11)]
    gen1.append(make_row(11, generation=1, origin="crossover", status="failed",
                         error="RuntimeError: CUDA out of memory"))
    history = [{"schedule": {"id": r["candidate_id"], "sigmas": r["sigmas"],
                             "meta": {"origin": "baseline", "name": BASELINES[i]}}}
               for i, r in enumerate(gen0[:3])]
    run.append_evaluations(gen0)
    run.save_searcher_state(0, {"history": history})
    run.append_evaluations(gen1)
    run.save_searcher_state(1, {"history": history, "pending": {}})
    rows = gen0 + gen1
    ok = sorted((r for r in rows if r["status"] == "ok"), key=lambda r: r["value"])
    best = None
    if finished:
        scores = [{"name": "searched", "candidate_id": ok[0]["candidate_id"], "status": "ok",
                   "fid": 1.25, "fid_ci": [1.0, 1.5], "diff": -2.5, "diff_ci": [-3.0, -2.0]}]
        for name, r in zip(BASELINES, gen0[:3]):
            scores.append({"name": name, "candidate_id": r["candidate_id"], "status": "ok",
                           "fid": 3.75, "fid_ci": [3.0, 4.5], "diff": 0.0, "diff_ci": [0, 0]})
        best = {"sigmas": ok[0]["sigmas"], "solver": ok[0]["solver"],
                "best_baseline": BASELINES[0],
                "heldout": {"level": 0.95, "n_samples": 100, "seed_base": 1_000_000,
                            "scores": scores}}
        run.write_json("best.json", best)
    return {"run": run, "rows": rows, "ok": ok, "best": best}


def test_finished_run_tables_and_redrawn_plots(tmp_path, capsys):
    made = write_run(tmp_path / "run", finished=True)
    assert main([str(tmp_path / "run"), "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "state: finished" in out and "run run-test" in out
    assert "12 evaluations (1 not ok) in 2 part file(s)" in out
    # Evaluations per generation: generation 1 has one failure.
    gen_lines = [ln.split() for ln in out.splitlines() if ln.strip().startswith(("0 ", "1 "))]
    assert ["0", "6", "6", "0", "0"] == gen_lines[0][:5]
    assert ["1", "6", "5", "1", "0"] == gen_lines[1][:5]
    # The top 3, best first.
    top = out.split("Top 3 candidates")[1].split("Baselines")[0]
    ids = [r["candidate_id"] for r in made["ok"][:3]]
    assert top.index(ids[0]) < top.index(ids[1]) < top.index(ids[2])
    assert made["ok"][3]["candidate_id"] not in top
    # Baselines by name, with their held-out value; held-out scores; the failure's reason.
    base = out.split("Baselines")[1].split("Held-out scores")[0]
    assert all(name in base for name in BASELINES) and "3.75" in base
    held = out.split("Held-out scores")[1].split("Failures")[0]
    assert "searched" in held and "[1, 1.5]" in held and "-2.5" in held
    fail = out.split("Failures (1)")[1]
    assert made["rows"][11]["candidate_id"] in fail and "RuntimeError: CUDA out of memory" in fail
    # Plots redrawn into report/.
    for name in ("metric_per_generation.png", "schedules.png"):
        data = (tmp_path / "run" / "report" / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000
    assert "plots: " in out


def test_run_in_progress_is_read_without_its_lock_and_nothing_is_moved(tmp_path, capsys):
    made = write_run(tmp_path / "run", finished=False)
    run = made["run"]
    # A part that fails its integrity check (a truncated copy under a part name).
    good = tmp_path / "run" / run.list_parts()[0]
    bad = tmp_path / "run" / "evaluations" / "part-000003-0badc0de-n6.parquet"
    bad.write_bytes(good.read_bytes()[:-100])
    holder = start_child(CHILD_HOLDS_LOCK, str(tmp_path / "run"))
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main([str(tmp_path / "run")]) == 0
        out = capsys.readouterr().out
        assert f"state: running (lock held by pid {holder.pid} " in out
        assert "Held-out scores: none yet" in out
        assert "part-000003-0badc0de-n6.parquet fails its integrity check" in out
        assert "12 evaluations (1 not ok) in 3 part file(s)" in out
        # Baselines named from their rows' schedules; the best so far drawn.
        assert all(name in out for name in BASELINES)
        assert (tmp_path / "run" / "report" / "schedules.png").exists()
        # The running search's lock and files are untouched.
        assert read_lock(run).pid == holder.pid
        assert bad.exists() and not (tmp_path / "run" / "evaluations" / "_corrupt").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert read_lock(run) is None


def test_interrupted_run_names_the_resume_command(tmp_path, capsys):
    write_run(tmp_path / "run", finished=False)
    assert main([str(tmp_path / "run"), "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "state: interrupted" in out
    assert f"python -m searchd.search --resume {tmp_path / 'run'}" in out
    assert not (tmp_path / "run" / "report").exists()  # --no-plots writes nothing


def test_open_run_gives_plain_rows(tmp_path):
    made = write_run(tmp_path / "run", finished=True)
    rep = open_run(str(tmp_path / "run"))
    assert [r["candidate_id"] for r in rep.ok_rows()] == [r["candidate_id"] for r in made["ok"]]
    assert rep.metric == "fid" and rep.state == "finished"
    assert rep.baseline_names == {r["candidate_id"]: n
                                  for n, r in zip(BASELINES, made["rows"][:3])}


@pytest.mark.parametrize("kind", ["missing", "empty", "file", "other"])
def test_not_a_run_directory_is_one_line_naming_it(tmp_path, capsys, kind):
    path = tmp_path / "x"
    if kind == "empty":
        path.mkdir()
    elif kind == "file":
        path.write_text("{}")
    elif kind == "other":
        path.mkdir()
        (path / "notes.txt").write_text("hello")
    assert main([str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(path) in err, err
    assert "run directory" in err


def test_command_line_module(tmp_path):
    write_run(tmp_path / "run", finished=True)
    p = subprocess.run([sys.executable, "-m", "searchd.report", str(tmp_path / "run"),
                        "--no-plots"], env=child_env(), capture_output=True, text=True,
                       timeout=120, cwd=REPO)
    assert p.returncode == 0 and "state: finished" in p.stdout, p.stderr
    p = subprocess.run([sys.executable, "-m", "searchd.report", str(tmp_path / "nope")],
                       env=child_env(), capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "nope" in p.stderr
    p = subprocess.run([sys.executable, "-m", "searchd.report", str(tmp_path / "run"),
                        "--top", "0"], env=child_env(), capture_output=True, text=True,
                       timeout=120, cwd=REPO)
    assert p.returncode == 2 and "--top = 0" in p.stderr
    assert json.loads((tmp_path / "run" / "best.json").read_text())["solver"]
