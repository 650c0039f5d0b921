"""The export and sampling commands on a searched schedule: ``python -m searchd.export`` and
``python -m searchd.sample --schedule best.json / --sigmas``."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from searchd.export import main as export_main
from searchd.export import usage_section
from searchd.models import load
from searchd.noise import seed_range
from searchd.plots import save_image_grid
from searchd.sample import _parser, explicit_schedule, generate
from searchd.sample import main as sample_main
from searchd.schedule import Schedule

SIGMAS = [62.71, 8.1, 1.93, 0.52, 0.0]


def write_best(path: Path, sigmas=SIGMAS, solver: str = "dpmpp_2m", options=None,
               model: str = "gmm-digits-k8") -> Path:
    """A best.json as the search writes it (the keys the commands read)."""
    sched = Schedule(sigmas, solver=solver)
    best = {"model": model, "solver": solver, "solver_options": options or {},
            "n_steps": sched.n_steps, "schedule": sched.to_dict(),
            "sigmas": [float(x) for x in sigmas], "usage": usage_section(sched, options)}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(best, indent=2))
    return path


def run(module: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True)


# python -m searchd.export ---------------------------------------------------------------------
def test_export_prints_each_form_from_a_run_directory(tmp_path, capsys):
    pytest.importorskip("diffusers")
    run_dir = tmp_path / "run"
    write_best(run_dir / "best.json")
    assert export_main([str(run_dir), "--to", "diffusers"]) == 0
    code = capsys.readouterr().out
    assert "diffusers.DPMSolverMultistepScheduler.from_config(" in code
    assert "pin_schedule(scheduler, [62.71, 8.1, 1.93, 0.52, 0.0])" in code
    compile(code, "<diffusers>", "exec")
    assert export_main([str(run_dir / "best.json"), "--to", "kdiffusion"]) == 0
    code = capsys.readouterr().out
    assert "sample_dpmpp_2m(model" in code and "[62.71, 8.1, 1.93, 0.52, 0.0]" in code
    assert export_main([str(run_dir), "--to", "comfy"]) == 0
    out = capsys.readouterr().out
    assert "62.71, 8.1, 1.93, 0.52, 0" in out and "ManualSigmas" in out
    assert "p.sampler_noise_scheduler_override" in out
    assert export_main([str(run_dir), "--to", "comfy", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["json"] == SIGMAS


def test_an_old_best_json_gets_its_usage_from_the_schedule(tmp_path, capsys):
    path = write_best(tmp_path / "best.json", solver="euler")
    best = json.loads(path.read_text())
    best["usage"] = {"diffusers": "pipe(..., sigmas=[62.71, 8.1])"}  # the old one-liner
    path.write_text(json.dumps(best))
    assert export_main([str(path), "--to", "comfy", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sampler"] == "euler"


@pytest.mark.parametrize("args,message", [
    (["{missing}", "--to", "diffusers"], "no such file or directory"),
    (["{empty_dir}", "--to", "diffusers"], "no best.json in this directory"),
    (["{not_json}", "--to", "diffusers"], "not a readable JSON file"),
    (["{best}", "--to", "onnx"], "invalid choice: 'onnx'"),
    (["{best}"], "the following arguments are required: --to"),
    (["{deis}", "--to", "diffusers"], "nearest is DEISMultistepScheduler"),
])
def test_export_errors_are_one_line_with_exit_2(tmp_path, capsys, args, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.json").write_text("{not json")
    paths = {"missing": str(tmp_path / "nope"), "empty_dir": str(tmp_path / "empty"),
             "not_json": str(tmp_path / "bad.json"),
             "best": str(write_best(tmp_path / "b" / "best.json")),
             "deis": str(write_best(tmp_path / "d" / "best.json", solver="deis"))}
    assert export_main([a.format(**paths) for a in args]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and lines[0].startswith("searchd.export: error: ")
    assert message in lines[0]


def test_export_module_entry_point(tmp_path):
    best = write_best(tmp_path / "best.json", solver="euler")
    proc = run("searchd.export", str(best), "--to", "kdiffusion")
    assert proc.returncode == 0 and "sample_euler(model" in proc.stdout
    proc = run("searchd.export", str(tmp_path / "none"), "--to", "comfy")
    assert proc.returncode == 2 and proc.stderr.startswith("searchd.export: error: ")
    assert len(proc.stderr.strip().splitlines()) == 1


# python -m searchd.sample --schedule best.json / --sigmas --------------------------------------
def test_sample_takes_a_best_json_and_explicit_sigmas(tmp_path, capsys):
    best = write_best(tmp_path / "run" / "best.json", solver="unipc", options={"order": 1})
    args = _parser().parse_args(["--schedule", str(best)])
    given = explicit_schedule(args)
    assert given["sigmas"].tolist() == SIGMAS and given["solver"] == "unipc"
    assert given["options"] == {"order": 1} and given["model"] == "gmm-digits-k8"
    assert sample_main(["--schedule", str(best), "--n", "16", "--seed-base", "3",
                        "--out", str(tmp_path / "a.png")]) == 0
    text = capsys.readouterr().out
    assert "model gmm-digits-k8  solver unipc" in text and "NFE spent 4 (budget 4)" in text
    # The grid shows searchd's samples of that schedule, solver and options (order 1).
    den = load("gmm-digits-k8")
    for order, same in ((1, True), (2, False)):
        x = generate(den, "unipc", np.array(SIGMAS), seed_range(3, 16), order=order)
        save_image_grid(-x.double().numpy(), tmp_path / "ref.png", ncols=8, scale=8)
        a, b = (np.asarray(Image.open(tmp_path / n)) for n in ("a.png", "ref.png"))
        assert np.array_equal(a, b) == same
    assert sample_main(["--model", "gmm-digits-k8", "--solver", "heun", "--sigmas",
                        "62.71, 8.1,1.93,0.52", "--n", "16",
                        "--out", str(tmp_path / "b.png")]) == 0
    text = capsys.readouterr().out
    assert "steps 3  NFE spent 6 (budget 6)" in text  # ends above 0: Heun corrects the last


@pytest.mark.parametrize("args,message", [
    (["--sigmas", "80,3,x,0"], "--sigmas entry 2 = 'x' is not a number"),
    (["--sigmas", "80,3,5,0"], "sigmas[2] = 5.0 is not below sigmas[1] = 3.0"),
    (["--sigmas", "80,3,-1"], "sigmas[2] = -1.0 is negative"),
    (["--sigmas", "500,3,0"], "sigmas[0] = 500.0 is above the model's sigma_max"),
    (["--sigmas", "80,3,0", "--nfe", "6"], "--nfe applies to baseline families"),
    (["--sigmas", "80,3,0", "--schedule", "logsnr"], "give --sigmas or --schedule, not both"),
    (["--schedule", "nope/best.json"], "no such file or directory"),
    (["--schedule", "{other}"], "its model 'checkpoints-x' is not a zoo name; give --model"),
])
def test_sample_schedule_errors_are_one_line(tmp_path, capsys, args, message):
    other = write_best(tmp_path / "o" / "best.json", model="checkpoints-x")
    code = sample_main([a.format(other=other) for a in args] + ["--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "x.png").exists()


def test_sample_default_family_still_works(tmp_path, capsys):
    assert sample_main(["--model", "gmm-digits-k8", "--nfe", "4", "--n", "16",
                        "--out", str(tmp_path / "f.png")]) == 0
    text = capsys.readouterr().out
    assert re.search(r"schedule polynomial  samples 16", text) and "NFE spent 4 (budget 4)" in text
