"""Untrusted inputs: model files that run code need an explicit opt-in, and a run directory
from someone else is read as data.

Each hostile file here carries a payload that, if executed, writes a marker file: the test
checks the marker is absent where nothing may run, and (for the model files) present once
the user opts in, which shows that the opt-in is the only thing that stopped it.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from searchd.models.edm import load_edm
from searchd.models.generic import UntrustedCodeError, load_entry_point
from searchd.search import main

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
PREFIX = "python -m searchd.search: error: "


class Payload:
    """Unpickling this runs ``open(marker, "w").write("ran")``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):  # noqa: ANN204
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def evil_pickle(path: Path, marker: Path) -> Path:
    path.write_bytes(pickle.dumps({"ema": Payload(marker)}))
    return path


def evil_module(path: Path, marker: Path) -> Path:
    path.write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                    "def make():\n    raise RuntimeError('never a model')\n")
    return path


def config_with(tmp_path: Path, model: dict) -> Path:
    raw = json.loads(json.dumps(QUICKSTART))
    raw["model"] = model
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    return cfg


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(PREFIX), err
    return err[0]


# Model files that run code -----------------------------------------------------------------
def test_an_edm_pickle_is_not_opened_without_trust(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "ran"
    pkl = evil_pickle(tmp_path / "model.pkl", marker)
    monkeypatch.chdir(tmp_path)
    cfg = config_with(tmp_path, {"spec": {"kind": "edm", "path": str(pkl)}})
    assert main(["--config", str(cfg), "--engine", "local", "--quiet"]) == 2
    line = one_error_line(capsys)
    assert "--trust-remote-code" in line and "model.trust_remote_code" in line
    assert str(pkl) in line and "unpickling" in line
    with pytest.raises(UntrustedCodeError, match="trust"):
        load_edm(pkl)
    from searchd.models import load
    from searchd.models.zoo import ModelSpec

    with pytest.raises(UntrustedCodeError):
        load(ModelSpec(kind="edm", path=str(pkl)))
    assert not marker.exists() and sorted(os.listdir(tmp_path)) == ["cfg.yaml", "model.pkl"]
    # Trusted, the file is unpickled (and its payload runs): the opt-in is the only barrier.
    with pytest.raises(ValueError, match="no torch module"):
        load_edm(pkl, trust_remote_code=True)
    assert marker.read_text() == "ran"


def test_a_generic_entry_point_is_not_imported_without_trust(tmp_path, monkeypatch, capsys):
    marker = tmp_path / "ran"
    mod = evil_module(tmp_path / "evil_entry.py", marker)
    monkeypatch.chdir(tmp_path)
    cfg = config_with(tmp_path, {"name": f"generic:{mod}:make"})
    assert main(["--config", str(cfg), "--engine", "local", "--quiet"]) == 2
    assert "--trust-remote-code" in one_error_line(capsys)
    with pytest.raises(UntrustedCodeError):
        load_entry_point(f"{mod}:make")
    assert not marker.exists()
    with pytest.raises(RuntimeError, match="never a model"):
        load_entry_point(f"{mod}:make", trust_remote_code=True)
    assert marker.exists()


def test_a_diffusers_text_encoder_entry_point_needs_trust_too(tmp_path, monkeypatch, capsys):
    (tmp_path / "pipe").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = config_with(tmp_path, {"spec": {"kind": "diffusers", "path": str(tmp_path / "pipe"),
                                          "options": {"text_encoder": "evil_entry:make"}}})
    assert main(["--config", str(cfg), "--engine", "local", "--quiet"]) == 2
    assert "text encoder entry point 'evil_entry:make'" in one_error_line(capsys)


def test_the_flag_sets_the_key_and_an_options_spelling_is_refused(tmp_path, capsys):
    pkl = evil_pickle(tmp_path / "model.pkl", tmp_path / "ran")
    cfg = config_with(tmp_path, {"spec": {"kind": "edm", "path": str(pkl)}})
    assert main(["--config", str(cfg), "--trust-remote-code", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["model"]["trust_remote_code"] is True
    cfg = config_with(tmp_path, {"spec": {"kind": "edm", "path": str(pkl),
                                          "options": {"trust_remote_code": True}}})
    assert main(["--config", str(cfg), "--engine", "local", "--quiet"]) == 2
    assert "trust_remote_code" in one_error_line(capsys)
    assert not (tmp_path / "ran").exists()


def test_the_command_refuses_in_a_real_subprocess(tmp_path):
    marker = tmp_path / "ran"
    pkl = evil_pickle(tmp_path / "model.pkl", marker)
    cfg = config_with(tmp_path, {"name": f"edm:{pkl}"})
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-m", "searchd.search", "--config", str(cfg)],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "--trust-remote-code" in p.stderr and not marker.exists()
    assert sorted(os.listdir(tmp_path)) == ["cfg.yaml", "model.pkl"]  # no run directory


# A run directory from someone else ------------------------------------------------------------
def crafted_run(root: Path, marker: Path, yaml_tag: bool = False) -> Path:
    """A run directory whose files try to run code: YAML tags in config.yaml, a pickle in
    the predictor weights, a Parquet part whose field claims a pickled (Python) extension
    type, and JSON files holding what a naive reader might call."""
    run = root / "someone-elses-run"
    (run / "evaluations").mkdir(parents=True)
    (run / "searcher").mkdir()
    raw = json.loads(json.dumps(QUICKSTART))
    raw["model"] = {"spec": {"kind": "generic", "path": f"{root / 'evil_entry.py'}:make"},
                    "trust_remote_code": True}
    from searchd.config import validate_config
    from searchd.loop.runs import record

    cfg = validate_config(raw).model_copy(update={"run_dir": str(run)})
    (run / "run.json").write_text(json.dumps(record(cfg, run.name)))
    text = cfg.to_yaml()
    if yaml_tag:
        text += f"hook: !!python/object/apply:os.system ['touch {marker}']\n"
    (run / "config.yaml").write_text(text)
    (run / "best.json").write_text(json.dumps({"__reduce__": ["os.system", f"touch {marker}"],
                                               "schedule": {"py/object": "os.system"}}))
    (run / "searcher" / "state-0.json").write_text(json.dumps(
        {"py/reduce": [{"py/function": "os.system"}, [f"touch {marker}"]]}))
    field = pa.field("candidate_id", pa.binary(), metadata={
        b"ARROW:extension:name": b"arrow.py_extension_type",
        b"ARROW:extension:metadata": pickle.dumps(Payload(marker))})
    table = pa.Table.from_arrays([pa.array([b"x"], pa.binary())], schema=pa.schema([field]))
    pq.write_table(table, run / "evaluations" / "part-000000-0badc0de-n1.parquet")
    pred = run / "predictor"
    pred.mkdir()
    torch.save({"kind": Payload(marker)}, pred / "predictor.pt")
    return run


def test_a_crafted_run_directory_is_read_as_data(tmp_path, capsys):
    from searchd import open_run
    from searchd.adaptive.product import load_predictor
    from searchd.report import main as report_main

    marker = tmp_path / "ran"
    evil_module(tmp_path / "evil_entry.py", marker)
    tagged = crafted_run(tmp_path / "a", marker, yaml_tag=True)
    for cmd in (main, report_main):  # the YAML tag is not constructed (safe_load)
        assert cmd(["--resume", str(tagged)] if cmd is main else [str(tagged)]) == 2
        assert "could not determine a constructor" in capsys.readouterr().err
    run = crafted_run(tmp_path, marker)
    # Resuming it: a best.json that is not searchd's is one line (it was a KeyError).
    assert main(["--resume", str(run), "--engine", "local", "--quiet"]) == 2
    assert "is not a best.json that searchd wrote" in one_error_line(capsys)
    # Without it: the run's trust_remote_code: true is not taken from the run, so the entry
    # point is not imported.
    (run / "best.json").rename(run / "best.json.away")
    code = main(["--resume", str(run), "--engine", "local", "--quiet"])
    (run / "best.json.away").rename(run / "best.json")
    line = one_error_line(capsys)
    assert code == 2 and "--trust-remote-code" in line, line
    assert not marker.exists()
    # Reading it: open_run and the report read JSON and Parquet as data.
    try:
        view = open_run(run)
        assert view.rows == [] and view.bad_parts
    except ValueError as e:  # refused on one line is fine too
        assert "\n" not in str(e)
    assert report_main([str(run)]) in (0, 1, 2)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # The predictor weights are loaded with weights_only=True: the pickle is refused.
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported"):
        load_predictor(run / "predictor")
    assert not marker.exists()


def test_resume_takes_trust_from_the_command_not_the_run(tmp_path, capsys):
    """A run made with --trust-remote-code resumes only with the flag again (the entry
    point then runs: it is the user's decision in this invocation)."""
    from searchd.config import validate_config
    from searchd.loop.runs import plan_resume, record

    marker = tmp_path / "ran"
    mod = evil_module(tmp_path / "evil_entry.py", marker)
    raw = json.loads(json.dumps(QUICKSTART))
    raw["model"] = {"name": f"generic:{mod}:make", "trust_remote_code": True}
    cfg = validate_config(raw)
    run = tmp_path / "run"
    run.mkdir()
    cfg = cfg.model_copy(update={"run_dir": str(run)})
    (run / "config.yaml").write_text(cfg.to_yaml())
    (run / "run.json").write_text(json.dumps(record(cfg, "run")))
    assert plan_resume(str(run)).cfg.model.trust_remote_code is False
    plan = plan_resume(str(run), overrides=["model.trust_remote_code=true"])
    assert plan.cfg.model.trust_remote_code is True and plan.changed == ()
    assert main(["--resume", str(run), "--engine", "local", "--quiet"]) == 2
    assert "--trust-remote-code" in one_error_line(capsys)
    assert not marker.exists()
