"""kill -9 of the search driver at three points, each followed by ``--resume``; the end
result compared with an uninterrupted run of the same seed.

The driver is ``python -m searchd.search`` in its own session and process group, with
``SEARCHD_FAULT`` (searchd/faults.py) making it SIGKILL itself at an exact point. One run is
killed three times, and resumed after each kill (a resume of a resume; four drivers instead
of six keeps the test at a few Ray start-ups):

1. ``after_generation:1``: generation 0 stored (rows and searcher state), generation 1 not
   built yet (between generations);
2. ``mid_generation:2``: an evaluator actor is scoring generation 1, none of its rows stored
   (in the middle of a generation);
3. ``after_tmp_write:2``: generation 2's Parquet part is written to its temporary file and
   not renamed (during a Parquet write).

After each kill the test SIGKILLs the driver's process group (Ray's GCS, raylet, dashboard,
monitors) and every process left in the driver's session (Ray's workers and actors have
their own process groups): exactly those, by pid, so nothing of the dead search runs on.
The last ``--resume`` must finish the search with every candidate in the Parquet exactly
once, and the final result (every candidate's sigmas and metrics, the best schedule and its
held-out scores) bitwise equal to the uninterrupted run's: on CPU, with the same seed, a
resumed search computes exactly what an uninterrupted one does.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from searchd.report import main as report_main
from searchd.storage import RunDir, table_to_rows
from searchd.storage.rundir import KEEP_STATES, is_temp_name

pytestmark = pytest.mark.ray

GENERATIONS = 3
POPULATION = 6
TINY = [
    "--config", "configs/quickstart.yaml",
    "--set", f"search.evolution.population_num={POPULATION}",
    "--set", "search.evolution.select_num=3",
    "--set", "search.evolution.mutation_num=2",
    "--set", "search.evolution.crossover_num=1",
    "--set", f"search.evolution.generations={GENERATIONS}",
    "--set", "samples.per_candidate=200",
    "--set", "samples.heldout=200",
    "--set", "metric.reference=exact:1000",
    "--set", "report.plots=false",
    "--set", "search.racing.top_k=0",  # the search alone (racing's rows: tests/test_racing.py)
    "--set", "workers.num_workers=2",
    "--quiet",
]
# A safety net against a hung child only (not a speed requirement).
HANG_S = 900
REPO = Path(__file__).resolve().parent.parent


# Processes --------------------------------------------------------------------------------
def session_pids(sid: int) -> list[int]:
    """Live (not zombie) processes whose session id is ``sid``."""
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        state, session = fields[0], int(fields[3])
        if session == sid and state not in ("Z", "X"):
            out.append(int(name))
    return out


def kill_session(sid: int) -> list[int]:
    """SIGKILL the process group ``sid`` and then every process left in session ``sid`` (the
    driver started with ``start_new_session``: its pid is both). Returns the pids that the
    per-pid pass had to kill (those outside the process group: Ray's workers and actors)."""
    killed: set[int] = set()
    try:
        os.killpg(sid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for _ in range(300):
        left = session_pids(sid)
        if not left:
            return sorted(killed)
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.1)
    raise AssertionError(f"processes of session {sid} survived SIGKILL: {session_pids(sid)}")


class Driver:
    """``python -m searchd.search`` in its own session, with Ray's temporaries in a short
    private directory (removed by ``cleanup``)."""

    def __init__(self, args: list[str], log: Path, fault: str | None = None) -> None:
        self.tmp = tempfile.mkdtemp(prefix="sdf-", dir="/tmp")
        env = dict(os.environ, TMPDIR=self.tmp, RAY_TMPDIR=self.tmp, PYTHONUNBUFFERED="1")
        env.pop("RAY_ADDRESS", None)
        env.pop("SEARCHD_FAULT", None)
        if fault is not None:
            env["SEARCHD_FAULT"] = fault
        self.log = log
        self._out = open(log, "w")
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "searchd.search", *args], cwd=REPO, env=env,
            stdout=self._out, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait(self) -> int:
        try:
            rc = self.proc.wait(timeout=HANG_S)
        finally:
            self.wall_s = time.monotonic() - self.t0
            self.cleanup()
        return rc

    def cleanup(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.leftovers = kill_session(self.proc.pid)
        self._out.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    @property
    def output(self) -> str:
        return self.log.read_text()


# The run directory ---------------------------------------------------------------------------
def stored(run: Path) -> dict:
    """What a run directory holds: rows by candidate, parts, states, temporaries."""
    rd = RunDir(run)
    rows = table_to_rows(rd.read_evaluations(move_corrupt=False))
    return {
        "rows": rows,
        "parts": rd.list_parts(),
        "states": rd.searcher_state_generations(),
        "temps": sorted(p.name for p in run.rglob("*") if is_temp_name(p.name)),
        "corrupt": sorted(p.name for p in (run / "evaluations" / "_corrupt").glob("*")),
    }


def result_of(run: Path) -> dict:
    """The parts of a finished run that must be bitwise equal between runs."""
    rows = stored(run)["rows"]
    by_id = {
        r["candidate_id"]: (r["generation"], r["origin"], tuple(r["parent_ids"]), r["status"],
                            tuple(r["sigmas"]), r["value"], tuple(sorted(r["metrics"].items())),
                            r["nfe"], r["n_samples"], r["seed_base"])
        for r in rows
    }
    best = json.loads((run / "best.json").read_text())
    return {
        "n_rows": len(rows),
        "candidates": by_id,
        "best_sigmas": best["sigmas"],
        "best_id": best["schedule"]["id"],
        "best_value": best["search"]["value"],
        "heldout": [(s["name"], s["status"], s.get("fid"), s.get("fid_ci"), s.get("diff"),
                     s.get("diff_ci")) for s in best["heldout"]["scores"]],
        "baselines": best["baselines"],
    }


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run = tmp_path_factory.mktemp("uninterrupted") / "run"
    d = Driver([*TINY, "--run-dir", str(run)], run.parent / "out.txt")
    rc = d.wait()
    assert rc == 0, d.output[-4000:]
    print(f"uninterrupted run: {d.wall_s:.1f} s")
    return result_of(run)


def check_stored_rows(rows: list, reference: dict) -> None:
    """Rows stored so far: each candidate once, each bitwise equal to the reference run's."""
    ids = [r["candidate_id"] for r in rows]
    assert len(ids) == len(set(ids))
    for r in rows:
        want = reference["candidates"][r["candidate_id"]]
        assert (r["generation"], r["origin"], tuple(r["parent_ids"]), r["status"],
                tuple(r["sigmas"]), r["value"], tuple(sorted(r["metrics"].items())),
                r["nfe"], r["n_samples"], r["seed_base"]) == want, r["candidate_id"]


def run_killed(args: list[str], fault: str, out: Path) -> tuple[Driver, str]:
    """Run the driver with ``SEARCHD_FAULT=fault``; it must die of SIGKILL at that point."""
    d = Driver(args, out, fault=fault)
    rc = d.wait()
    text = d.output
    assert rc == -signal.SIGKILL, text[-4000:]
    assert f"SEARCHD_FAULT: SIGKILL at {fault}" in text, text[-4000:]
    # Its Ray processes outlived it until the test killed them; none is left now.
    assert d.leftovers and not session_pids(d.proc.pid)
    how = next(ln for ln in text.splitlines() if "SEARCHD_FAULT: SIGKILL" in ln)
    d.summary = (f"{fault}: killed after {d.wall_s:.1f} s; {len(d.leftovers)} Ray processes "
                 f"outside its process group killed by pid; {how}")
    return d, text


def say(capsys, text: str) -> None:
    """Print past pytest's capture (with -s: the test's timings)."""
    with capsys.disabled():
        print(text)


def test_kill9_at_three_points_and_resume_match_an_uninterrupted_run_bitwise(
    uninterrupted, tmp_path, capsys
):
    """One run killed three times (between generations, in the middle of one, during a
    Parquet write), resumed after each kill, finishes exactly as the uninterrupted run."""
    run = tmp_path / "run"
    resume = ["--resume", str(run), "--quiet"]

    # Kill 1, between generations: generation 0 stored (rows, then the searcher state with
    # its candidates pending), generation 1 not built yet.
    d1, _ = run_killed([*TINY, "--run-dir", str(run)], "after_generation:1", tmp_path / "1.txt")
    say(capsys, d1.summary)
    s1 = stored(run)
    assert len(s1["parts"]) == 1 and s1["states"] == [0] and s1["temps"] == []
    assert {r["generation"] for r in s1["rows"]} == {0} and len(s1["rows"]) == POPULATION
    check_stored_rows(s1["rows"], uninterrupted)
    assert (run / "LOCK").exists() and not (run / "best.json").exists()
    # The report reads the killed run as it is (no lock taken, nothing moved).
    assert report_main([str(run), "--no-plots"]) == 0
    text = capsys.readouterr().out
    assert f"state: interrupted (stale lock of pid {d1.proc.pid} " in text
    assert f"{POPULATION} evaluations (0 not ok) in 1 part file(s)" in text
    assert (run / "LOCK").exists() and stored(run)["parts"] == s1["parts"]

    # Kill 2, in the middle of a generation: the resumed search re-reports generation 0
    # from the Parquet (no scoring), builds generation 1 from the restored searcher, and is
    # killed while an evaluator scores it: nothing of generation 1 is stored.
    d2, _ = run_killed(resume, "mid_generation:2", tmp_path / "2.txt")
    say(capsys, d2.summary)
    assert (run / "log.txt").read_text().count(
        f"resuming with {POPULATION} stored evaluations") == 1
    s2 = stored(run)
    assert s2["parts"] == s1["parts"] and s2["temps"] == []
    assert s2["states"] == [0, 1]  # the resumed session numbers its states after the last
    check_stored_rows(s2["rows"], uninterrupted)
    log = (run / "log.txt").read_text()
    assert f"took over the stale lock of pid {d1.proc.pid} " in log, log[-3000:]

    # Kill 3, during a Parquet write: generation 1 is scored (once: it was in flight at
    # kill 2) and stored; generation 2 is scored and its part written to a temporary file,
    # not renamed.
    d3, _ = run_killed(resume, "after_tmp_write:2", tmp_path / "3.txt")
    say(capsys, d3.summary)
    assert (run / "log.txt").read_text().count(
        f"resuming with {POPULATION} stored evaluations") == 2
    s3 = stored(run)
    assert len(s3["parts"]) == 2 and s3["parts"][0] == s1["parts"][0]
    assert {r["generation"] for r in s3["rows"]} == {0, 1} and len(s3["rows"]) == 2 * POPULATION
    check_stored_rows(s3["rows"], uninterrupted)
    (tmp,) = s3["temps"]  # the part exists only as its temporary
    assert tmp.startswith(".part-000003-") and f"-n{POPULATION}.parquet.tmp-" in tmp
    assert (run / "evaluations" / tmp).stat().st_size > 0

    # Resume to the end.
    r = Driver(resume, tmp_path / "4.txt")
    rc = r.wait()
    out = r.output
    assert rc == 0, out[-4000:]
    log = (run / "log.txt").read_text()
    assert f"resuming with {2 * POPULATION} stored evaluations" in log
    assert f"took over the stale lock of pid {d3.proc.pid} " in log
    assert f"removed 1 temporary file(s) of interrupted writes: evaluations/{tmp}" in log
    say(capsys, f"final resume: {r.wall_s:.1f} s")

    # The run directory is intact: every part passes its checks, none set aside, no
    # temporaries, the lock released, the first parts kept as they were.
    done = stored(run)
    assert done["corrupt"] == [] and done["temps"] == [] and not (run / "LOCK").exists()
    assert done["parts"][:2] == s3["parts"] and len(done["parts"]) == GENERATIONS
    # The newest KEEP_STATES states (older ones are pruned), numbered on across sessions.
    assert done["states"] == list(range(done["states"][-1] + 1))[-KEEP_STATES:]
    # Every candidate exactly once: generation 1 (in flight at kill 2) and generation 2
    # (being written at kill 3) were each scored and stored once.
    ids = [row["candidate_id"] for row in done["rows"]]
    assert len(ids) == len(set(ids)) == GENERATIONS * POPULATION
    # Bitwise equal to the uninterrupted run (==, not approx): every candidate's sigmas,
    # metrics and provenance, the best schedule, its value, the held-out scores.
    got = result_of(run)
    for cid, want in uninterrupted["candidates"].items():
        assert got["candidates"].get(cid) == want, cid
    assert got == uninterrupted
    assert json.loads((run / "best.json").read_text())["search"]["evaluations"] == len(ids)

    # The report of the finished run: its winner on top, its generations, its plots redrawn.
    assert report_main([str(run), "--top", "1"]) == 0
    text = capsys.readouterr().out
    assert "state: finished" in text and got["best_id"] in text.split("Top 1 candidates")[1]
    assert f"{GENERATIONS * POPULATION} evaluations (0 not ok) in {GENERATIONS} part" in text
    assert (run / "report" / "schedules.png").read_bytes().startswith(b"\x89PNG")


def test_unknown_fault_point_is_refused_before_ray(tmp_path):
    env = dict(os.environ, SEARCHD_FAULT="after_lunch:2")
    p = subprocess.run(
        [sys.executable, "-m", "searchd.search", *TINY, "--run-dir", str(tmp_path / "r")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG_S,
    )
    assert p.returncode == 2
    err = p.stderr.strip()
    assert len(err.splitlines()) == 1 and "'after_lunch:2'" in err and "after_tmp_write" in err
    assert not (tmp_path / "r").exists()
