"""``python -m searchd.sample``: the grid, the NFE accounting, the FD, and its error messages."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from searchd.models import load
from searchd.noise import seed_range
from searchd.sample import frechet_distance_pixels, main, steps_for_budget
from searchd.solvers import SOLVERS, nfe


def run_module(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "searchd.sample", *args], capture_output=True, text=True
    )


def test_command_writes_a_grid_and_reports_nfe_and_fd(tmp_path):
    out = tmp_path / "grid.png"
    proc = run_module(
        "--model", "gmm-digits-k8", "--solver", "dpmpp_2m", "--schedule", "logsnr",
        "--nfe", "6", "--n", "200", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "NFE spent 6 (budget 6)" in proc.stdout
    assert re.search(r"FD \(pixels, vs 200 exact samples\) \d+\.\d+", proc.stdout)
    img = np.asarray(Image.open(out))
    # 8 x 8 digits of 8 x 8 pixels, enlarged 8 times, one-pixel gaps.
    assert img.shape == (8 * 65 + 1, 8 * 65 + 1) and img.dtype == np.uint8
    assert img.std() > 30  # not blank


def _fd_of_run(capsys, *args: str) -> tuple[float, float]:
    assert main(list(args)) == 0
    text = capsys.readouterr().out
    fd = float(re.search(r"FD \(pixels[^)]*\) (\S+)", text).group(1))
    floor = float(re.search(r"floor \([^)]*\) (\S+)", text).group(1))
    return fd, floor


def test_fd_falls_with_nfe_towards_the_floor(tmp_path, capsys):
    common = ["--model", "gmm-digits", "--schedule", "logsnr", "--n", "1500"]
    fd4, floor = _fd_of_run(capsys, *common, "--nfe", "4", "--out", str(tmp_path / "a.png"))
    fd20, floor20 = _fd_of_run(capsys, *common, "--nfe", "20", "--out", str(tmp_path / "b.png"))
    assert floor == floor20
    # 1,500 samples: the floor is about 0.17, NFE 4 is several times above it, NFE 20 at it.
    assert fd4 > 5 * floor
    assert fd20 < 1.5 * floor


def test_pixel_frechet_distance_matches_an_eigen_formula_and_a_shift():
    den = load("gmm-digits-k8", dtype=torch.float64)
    a = den.sample_data(seed_range(0, 3000))
    b = den.sample_data(seed_range(10_000, 3000))
    shift = torch.full((1, 1, 8, 8), 0.05, dtype=torch.float64)
    base = frechet_distance_pixels(a, b)
    assert frechet_distance_pixels(a + shift, b) == pytest.approx(
        base + float((shift**2).sum()) + 2 * float(((a.mean(0) - b.mean(0)) * shift).sum()),
        rel=1e-9,
    )
    assert frechet_distance_pixels(a, a) == pytest.approx(0.0, abs=1e-9)
    # tr sqrt(Ca Cb) through the symmetric matrix Ca^(1/2) Cb Ca^(1/2) (no general sqrtm).
    xa, xb = a.reshape(3000, 64).numpy(), b.reshape(3000, 64).numpy()
    ca, cb = np.cov(xa, rowvar=False), np.cov(xb, rowvar=False)
    w, v = np.linalg.eigh(ca)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root @ cb @ root), 0, None)).sum()
    want = ((xa.mean(0) - xb.mean(0)) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * cross
    assert base == pytest.approx(want, rel=1e-6)


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_budget_gets_the_largest_step_count_that_fits(solver):
    for budget in range(nfe(solver, 1, final_zero=True), 21):
        n = steps_for_budget(solver, budget)
        assert nfe(solver, n, final_zero=True) <= budget < nfe(solver, n + 1, final_zero=True)


@pytest.mark.parametrize(
    ("flag", "value", "listed"),
    [
        ("--model", "gmm-nope", "gmm-digits-k64"),
        ("--solver", "rk45", "dpmpp_2m"),
        ("--schedule", "cosine", "logsnr"),
    ],
)
def test_unknown_names_list_the_known_ones_and_exit_2(flag, value, listed, capsys):
    assert main([flag, value, "--n", "10"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "unknown" in err and repr(value) in err and listed in err


def test_unknown_name_from_the_shell_has_no_traceback():
    proc = run_module("--solver", "rk45")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "known solvers: " in proc.stderr


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    assert "--nfe" in capsys.readouterr().out


def test_bad_values_exit_2_with_one_line(capsys):
    for args in (["--nfe", "0"], ["--schedule", "logsnr", "--rho", "5"], ["--n", "1"]):
        assert main(args) == 2  # each fails before any sampling
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert err.startswith("python -m searchd.sample: error: "), err
