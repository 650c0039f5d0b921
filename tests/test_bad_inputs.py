"""Bad input as a new user gives it: every case is one line ``<command>: error: ...``, exit
status 2 (1 for a runtime failure), before any expensive work where the check needs no
model, and nothing is written to an existing run.

Most searches here run on the in-process engine (``--engine local``: the same checks, no
Ray start-up); the cases that are about Ray itself (its address, the actors' resources) start
a local Ray."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from searchd import sample, stats
from searchd import search as search_cli
from searchd.report import main as report_main

REPO = Path(__file__).resolve().parents[1]
QUICK = str(REPO / "configs" / "quickstart.yaml")
# A search of a few seconds on the in-process engine.
TINY = ["search.evolution.population_num=4", "search.evolution.select_num=2",
        "search.evolution.mutation_num=1", "search.evolution.crossover_num=1",
        "search.evolution.generations=1", "samples.per_candidate=100", "samples.heldout=200",
        "metric.reference=exact:500", "report.plots=false", "search.predictor.enabled=false"]


def sets(*overrides: str) -> list[str]:
    return [a for o in overrides for a in ("--set", o)]


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    code = search_cli.main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err.strip()


def one_line(err: str, prog: str = "python -m searchd.search") -> str:
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"{prog}: error: "), err
    return err


def snapshot(path: Path) -> dict[str, str]:
    """Every file of a directory and a hash of its content."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A tiny finished run (in-process engine)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    code = search_cli.main(["--config", QUICK, *sets(*TINY), "--run-dir", str(run),
                            "--engine", "local", "--quiet"])
    assert code == 0 and (run / "best.json").exists()
    return run


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst


# Data mixed or lost: a run directory is sacred ------------------------------------------------
def test_a_new_run_into_a_finished_runs_directory_is_refused(run_copy, capsys):
    before = snapshot(run_copy)
    code, _, err = cli(["--config", QUICK, *sets(*TINY), "--run-dir", str(run_copy),
                        "--engine", "local"], capsys)
    assert code == 2 and "is not empty" in one_line(err) and "--resume" in err
    assert snapshot(run_copy) == before


def test_a_new_run_into_any_non_empty_directory_is_refused(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    code, _, err = cli(["--config", QUICK, "--run-dir", str(tmp_path)], capsys)
    assert code == 2 and "is not empty (notes.txt)" in one_line(err)
    assert os.listdir(tmp_path) == ["notes.txt"]


@pytest.mark.parametrize(("edit", "key"), [
    (("samples", "per_candidate", 50), "samples.per_candidate"),
    (("solver", "name", "euler"), "solver.name"),
])
def test_resume_refuses_a_hand_edited_config_naming_the_keys(run_copy, capsys, edit, key):
    import yaml

    raw = yaml.safe_load((run_copy / "config.yaml").read_text())
    raw[edit[0]][edit[1]] = edit[2]
    (run_copy / "config.yaml").write_text(yaml.safe_dump(raw))
    (run_copy / "best.json").unlink()  # an interrupted run
    before = snapshot(run_copy)
    for force in ([], ["--force"]):
        code, _, err = cli(["--resume", str(run_copy), *force, "--engine", "local"], capsys)
        assert code == 2 and key in one_line(err) and "cannot change" in err
    assert snapshot(run_copy) == before


def test_resume_refuses_overrides_of_keys_that_shape_the_numbers(run_copy, capsys):
    before = snapshot(run_copy)
    code, _, err = cli(["--resume", str(run_copy), *sets("search.seed=3"), "--force"], capsys)
    assert code == 2 and "search.seed" in one_line(err)
    code, _, err = cli(["--resume", str(run_copy), *sets("workers.num_workers=1")], capsys)
    assert code == 2 and "pass --force" in one_line(err)
    assert snapshot(run_copy) == before


def test_resuming_a_finished_run_says_so_and_does_nothing(run_copy, capsys):
    before = snapshot(run_copy)
    t0 = time.monotonic()
    code, out, err = cli(["--resume", str(run_copy)], capsys)
    assert code == 0 and err == ""
    assert "is finished" in out and "nothing to do" in out
    assert time.monotonic() - t0 < 30  # no Ray, no model
    assert snapshot(run_copy) == before


def test_a_forced_budget_extension_really_extends_the_run(run_copy, capsys):
    best0 = json.loads((run_copy / "best.json").read_text())
    n0 = best0["search"]["evaluations"]
    code, out, err = cli(["--resume", str(run_copy), *sets("search.evolution.generations=2"),
                          "--force", "--engine", "local"], capsys)
    assert code == 0, err
    best = json.loads((run_copy / "best.json").read_text())
    assert best["search"]["evaluations"] > n0  # a second generation was scored
    import pyarrow.parquet as pq

    rows = pq.read_table(run_copy / "evaluations").to_pylist()
    assert len(rows) == best["search"]["evaluations"]  # the race's rows (racing) included
    search_rows = [r for r in rows if not r["trial_id"].startswith("race/")]
    assert {r["generation"] for r in search_rows} == {0, 1}
    import yaml

    cfg = yaml.safe_load((run_copy / "config.yaml").read_text())
    assert cfg["search"]["evolution"]["generations"] == 2 and cfg["search"]["budget"] == 8
    meta = json.loads((run_copy / "run.json").read_text())
    assert meta["config"]["search"]["evolution"]["generations"] == 2


def test_a_broken_config_yaml_in_a_run_is_one_line_on_resume_and_report(run_copy, capsys):
    (run_copy / "config.yaml").write_text("model: {name: gmm-digits\nsolver: [\n")
    before = snapshot(run_copy)
    code, _, err = cli(["--resume", str(run_copy)], capsys)
    assert code == 2 and "config.yaml:" in one_line(err) and "invalid YAML" in err
    assert report_main([str(run_copy), "--no-plots"]) == 2
    err = capsys.readouterr().err.strip()
    assert "invalid YAML" in one_line(err, "python -m searchd.report")
    assert snapshot(run_copy) == before


def test_print_config_and_its_run_dir(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, _ = cli(["--config", QUICK, "--print-config"], capsys)
    assert code == 0 and "run_dir: null" in out and os.listdir(tmp_path) == []


# Bad settings: one line, before the search (before Ray where no model is needed) --------------
@pytest.mark.parametrize(("override", "message"), [
    ("solver.options.foo=1", "solver.options: got {'foo': 1}; dpmpp_2m: unknown option(s) "
                             "['foo']; allowed options: none"),
    ("metric.features=inception", "Inception weights not found"),
])
def test_settings_checked_before_anything_starts(override, message, capsys, tmp_path):
    t0 = time.monotonic()
    code, _, err = cli(["--config", QUICK, "--set", override, "--run-dir",
                        str(tmp_path / "run")], capsys)
    assert code == 2 and message in one_line(err)
    assert time.monotonic() - t0 < 60 and not (tmp_path / "run").exists()


@pytest.mark.parametrize(("override", "message"), [
    ("space.sigma_min=100", "space.sigma_min: got 100.0; the model's noise range is "
                            "[0.002, 80]"),
    ("space.sigma_max=1e30", "space.sigma_max: got 1e+30; the model's noise range"),
    ("space.kind=discrete", "space.kind: got 'discrete'; the model 'gmm-digits-k64' has no "
                            "sigma grid"),
])
def test_settings_that_need_the_model_are_checked_once_it_is_loaded(
        override, message, capsys, tmp_path):
    code, _, err = cli(["--config", QUICK, "--set", override, "--run-dir",
                        str(tmp_path / "run"), "--engine", "local"], capsys)
    assert code == 2 and message in one_line(err)
    assert not (tmp_path / "run").exists()  # the new run leaves nothing behind


def test_a_reference_file_without_mu_and_sigma(tmp_path, capsys):
    bad = tmp_path / "stats.npz"
    np.savez(bad, mean=np.zeros(3))
    code, _, err = cli(["--config", QUICK, "--set", f"metric.reference={bad}"], capsys)
    assert code == 2 and "needs arrays 'mu' and 'sigma'" in one_line(err)


def test_a_pixel_space_reference_with_digits_features(tmp_path, capsys):
    from searchd.evaluation.features import load_features
    from searchd.evaluation.reference import exact_reference
    from searchd.models import load

    ref = exact_reference(load("gmm-digits-k8"), load_features("pixels", shape=(1, 8, 8)),
                          range(100))
    path = tmp_path / "pixels.npz"
    ref.save(path)
    code, _, err = cli(["--config", QUICK, "--set", f"metric.reference={path}",
                        "--run-dir", str(tmp_path / "run"), "--engine", "local"], capsys)
    assert code == 2 and "metric.reference" in one_line(err) and "pixels" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(("uri", "message"), [
    ("s3://bucket/run?colour=red", "unknown query key(s) ['colour']"),
    ("s3://bucket/run?region=us-east-1&scheme=ftp", "scheme must be http or https"),
])
def test_bad_s3_run_directories(uri, message, capsys):
    code, _, err = cli(["--config", QUICK, "--run-dir", uri], capsys)
    assert code == 2 and message in one_line(err)


def test_an_s3_run_directory_without_a_findable_region(capsys):
    """Without ``?region=`` the bucket's region is looked up (pyarrow); offline, or for a
    bucket that does not exist, that fails: one line saying to give it in the URI."""
    t0 = time.monotonic()
    code, _, err = cli(["--config", QUICK, "--run-dir",
                        "s3://searchd-test-no-such-bucket-6f1c2e/run"], capsys)
    assert code == 2 and "give it in the URI" in one_line(err) and "?region=" in err
    assert time.monotonic() - t0 < 60


def test_an_unknown_engine_and_conflicting_options(capsys, tmp_path):
    code, _, err = cli(["--resume", str(tmp_path), "--run-dir", str(tmp_path)], capsys)
    assert code == 2 and "not both" in one_line(err)
    code, _, err = cli(["--config", QUICK, "--force"], capsys)
    assert code == 2 and "--force goes with --resume" in one_line(err)
    code, _, err = cli(["--resume", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "not a searchd run directory" in one_line(err)


# Ray: its address and its resources -----------------------------------------------------------
def test_a_ray_address_nothing_answers_at_is_refused_at_once(capsys, tmp_path):
    t0 = time.monotonic()
    code, _, err = cli(["--config", QUICK, "--address", "127.0.0.1:1", "--run-dir",
                        str(tmp_path / "run")], capsys)
    assert code == 2 and "nothing answers at 127.0.0.1:1" in one_line(err)
    assert time.monotonic() - t0 < 30 and not (tmp_path / "run").exists()


@pytest.mark.ray
def test_more_workers_than_a_local_ray_holds_are_refused_at_once(tmp_path):
    t0 = time.monotonic()
    p = subprocess.run(
        [sys.executable, "-m", "searchd.search", "--config", QUICK, "--set",
         "workers.num_workers=64", "--run-dir", str(tmp_path / "run"), "--quiet"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )
    err = p.stderr.strip()
    assert p.returncode == 2, err
    assert "workers.num_workers = 64 evaluator actors need 57.7 CPUs" in one_line(err)
    assert "Token authentication" not in p.stdout + p.stderr
    assert time.monotonic() - t0 < 120 and not (tmp_path / "run").exists()


# The other commands ---------------------------------------------------------------------------
def unwritable(tmp_path: Path) -> Path:
    """A folder no one can write into: /proc (even root cannot create a file there), else
    a folder without write permission."""
    if Path("/proc/self").is_dir():
        return Path("/proc")
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    return ro


def test_sample_errors_are_one_line(tmp_path, capsys):
    ro = unwritable(tmp_path)
    try:
        cases = [
            (["--out", str(ro / "grid.png"), "--n", "4"], "is not writable"),
            (["--out", str(tmp_path / "nope" / "grid.png")], "does not exist"),
            (["--out", str(tmp_path / "g.png"), "--device", "cuda"], "CUDA is not available"),
            (["--model", "sd99"], "unknown model 'sd99'"),
        ]
        for argv, message in cases:
            if "CUDA" in message and __import__("torch").cuda.is_available():
                continue
            code = sample.main(argv)
            err = capsys.readouterr().err.strip()
            assert code == 2 and message in one_line(err, "python -m searchd.sample"), err
    finally:
        if ro != Path("/proc"):
            ro.chmod(0o700)


def test_stats_errors_are_one_line(tmp_path, capsys):
    ro = unwritable(tmp_path)
    try:
        code = stats.main(["--model", "gmm-digits-k8", "--exact", "--n", "10",
                           "--out-dir", str(ro / "refs")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and "is not writable" in one_line(err, "python -m searchd.stats")
        assert not (ro / "refs").exists()
    finally:
        if ro != Path("/proc"):
            ro.chmod(0o700)
    code = stats.main(["--images", str(tmp_path / "none")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "no such folder" in one_line(err, "python -m searchd.stats")
