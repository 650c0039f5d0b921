"""``python -m searchd.stats``: every source, the written file, and one-line errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from searchd.evaluation import ReferenceStats, load_features
from searchd.models import load
from searchd.noise import make_noise, seed_range
from searchd.solvers import solve
from searchd.stats import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([*argv, "--no-progress"])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_exact_samples_of_the_embedded_model(tmp_path, capsys):
    code, out, _ = run(capsys, "--model", "gmm-digits-k64", "--exact", "--n", "100",
                       "--seed-base", "7", "--out-dir", str(tmp_path))
    assert code == 0
    path = tmp_path / "gmm-digits-k64-exact-seed7_digits_all_8x8_n100.npz"
    assert f"wrote {path}" in out
    ref = ReferenceStats.load(path)
    assert ref.n == 100 and ref.meta["model"] == "gmm-digits-k64" and ref.meta["exact"]
    # Independent recomputation: the digits features of the same exact samples.
    x = load("gmm-digits-k64").sample_data(range(7, 107))
    f = load_features("digits")(x).double().numpy()
    np.testing.assert_allclose(ref.mu, f.mean(0), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ref.sigma, np.cov(f.T), rtol=1e-5, atol=1e-7)
    assert ref.features.shape == (100, 128)  # kept for KID


def test_samples_under_a_schedule(tmp_path, capsys):
    code, out, _ = run(capsys, "--model", "gmm-digits-k64", "--solver", "euler", "--sigmas",
                       "80,10,1,0", "--n", "50", "--features", "pixels",
                       "--out-dir", str(tmp_path))
    assert code == 0
    (path,) = tmp_path.glob("*.npz")
    assert path.name.startswith("gmm-digits-k64-euler-sigmas-nfe3-")
    assert path.name.endswith("-seed0_pixels_all_8x8_n50.npz")
    den = load("gmm-digits-k64")
    x = solve(den, make_noise(seed_range(0, 50), den.shape), torch.tensor([80.0, 10, 1, 0]),
              solver="euler")
    ref = ReferenceStats.load(path)
    np.testing.assert_allclose(ref.mu, x.reshape(50, 64).double().mean(0).numpy(), atol=1e-6)
    assert ref.meta["schedule"]["sigmas"] == [80.0, 10.0, 1.0, 0.0]


def test_folder_of_pngs_and_an_array_give_the_same_statistics(tmp_path, capsys):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (12, 8, 8), dtype=np.uint8)
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i, im in enumerate(imgs):
        Image.fromarray(im, mode="L").save(folder / f"{i:03d}.png")
    np.save(tmp_path / "imgs.npy", imgs)
    assert run(capsys, "--images", str(folder), "--out-dir", str(tmp_path / "a"))[0] == 0
    assert run(capsys, "--array", str(tmp_path / "imgs.npy"), "--out-dir",
               str(tmp_path / "b"))[0] == 0
    (a,) = (tmp_path / "a").glob("*.npz")
    (b,) = (tmp_path / "b").glob("*.npz")
    assert a.name == "pngs_digits_all_8x8_n12.npz" and b.name == "imgs_digits_all_8x8_n12.npz"
    ra, rb = ReferenceStats.load(a), ReferenceStats.load(b)
    np.testing.assert_array_equal(ra.sigma, rb.sigma)
    assert ra.meta["checksum"] == rb.meta["checksum"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--model", "nope", "--exact"], "unknown model 'nope'"),
        (["--model", "gmm-digits-k64"], "needs a schedule"),
        (["--model", "gmm-digits-k64", "--exact", "--features", "vgg"], "unknown feature network"),
        (["--model", "gmm-digits-k64", "--sigmas", "80,90,0"], "strictly decreasing"),
        (["--model", "gmm-digits-k64", "--sigmas", "90,10,0"], "above the model's sigma_max"),
        (["--model", "gmm-digits-k64", "--schedule", "polynomial"], "exactly one of --nfe"),
        (["--model", "gmm-digits-k64", "--exact", "--n", "1"], "at least 2"),
        (["--images", "/no/such/folder"], "no such folder"),
        (["--exact"], "exactly one source"),
        (["--model", "gmm-digits-k64", "--exact", "--features", "inception",
          "--inception-path", "/no/such/dir"], "Inception weights not found"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path, argv, message):
    code, out, err = run(capsys, *argv, "--out-dir", str(tmp_path))
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err
    assert err.startswith("python -m searchd.stats: error: ")
    assert not list(tmp_path.iterdir())


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0 and "--exact" in capsys.readouterr().out
