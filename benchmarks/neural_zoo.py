"""The neural digits zoo: recognizability at 35 NFE and FID against the data vs NFE.

    python benchmarks/neural_zoo.py [--members digits-unet-s,digits-unet-m,digits-unet-l,
        digits-flow-s,digits-flow-m] [--nfe 5,10,20] [--n 1000]
        [--out benchmarks/results/neural_zoo.md]

For each member (and, for comparison, the embedded ``gmm-digits-k64``); the rectified-flow
members (``digits-flow-*``) are sampled on the same schedules, in searchd's noise levels (a
flow model is the same ODE in sigma = t / (1 - t)):

- **Recognizability**: 1,000 samples (seeds 0..999) drawn with Heun, 18 steps = 35 NFE, on
  EDM's schedule (polynomial, rho 7, sigma 0.002..80); the ``digits`` feature network
  (``searchd.evaluation.features``) classifies them, and a sample counts as *confident* when
  its largest softmax probability is >= 0.5 (the class is more likely than all others
  together; also reported at 0.8 and 0.9). The fractions for the 1,797 real digits are
  printed alongside: that network is trained with label smoothing, so its probabilities are
  compressed and even real digits are not all above 0.9 (86% are).
- **FID vs NFE**: ``--n`` samples (seeds 0..n-1) with DPM-Solver++(2M) on the same EDM
  schedule at each NFE (one evaluation per step; the last step goes to sigma = 0), and the
  1,000 Heun 35-NFE samples above (converged reference). FID is taken in the digits network's
  128-d
  feature space against the statistics of *all 1,797 digits of scikit-learn's dataset*,
  i.e. the exact statistics of the data the UNets were trained on (no held-out split: the
  zoo models the whole dataset, as the Gaussian-mixture zoo does). With n = 1,000 the
  finite-sample bias of FID is part of every number alike (the real-data row: 1,000 digits
  drawn from the dataset itself, a floor for that bias).

Runs on one CPU thread by default (``--threads``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch

from searchd.evaluation import FeatureStats, frechet_distance
from searchd.evaluation.digits import digits_images
from searchd.evaluation.features import load_features
from searchd.models import load
from searchd.models.adapters import FLOW_ZOO, NEURAL_ZOO
from searchd.models.diffusers import load_diffusers
from searchd.noise import make_noise
from searchd.schedules import baseline
from searchd.solvers import nfe, solve

SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
# Shipped members: the EDM-trained UNets and the rectified-flow ones (same networks).
ZOO = {**NEURAL_ZOO, **FLOW_ZOO}
THRESHOLDS = (0.5, 0.8, 0.9)
CONFIDENCE_SAMPLES = 1000
HEUN_STEPS = 18  # 35 NFE


def sample(den, n: int, solver: str, steps: int, batch: int = 1000) -> torch.Tensor:
    """n samples [n, 1, 8, 8] (seeds 0..n-1) on EDM's schedule with ``steps`` steps."""
    sig = baseline("polynomial", steps, SIGMA_MIN, SIGMA_MAX, rho=7)
    out = []
    for lo in range(0, n, batch):
        noise = make_noise(range(lo, min(n, lo + batch)), (1, 8, 8))
        out.append(solve(den, noise, sig, solver=solver))
    return torch.cat(out)


def confidence(feats, images: torch.Tensor) -> tuple[dict[float, float], np.ndarray]:
    """Fraction of images whose largest class probability is >= each threshold, and the
    class histogram of the predictions."""
    p = torch.softmax(feats.logits(images.float()), 1)
    top = p.max(1).values
    hist = np.bincount(p.argmax(1).numpy(), minlength=10)
    return {t: float((top >= t).float().mean()) for t in THRESHOLDS}, hist


def fid(feats, images: torch.Tensor, ref: FeatureStats) -> float:
    """FID of images against reference statistics in the digits feature space."""
    st = FeatureStats.from_features(feats(images.float()))
    return float(frechet_distance(st.mean, st.cov, ref.mean, ref.cov))


def weights_digest(name: str, folder: Path | None) -> str:
    """What a member's results depend on: its weights file (first 16 hex of SHA-256)."""
    import hashlib

    if folder is None:
        return "embedded"
    return hashlib.sha256(
        (folder / "diffusion_pytorch_model.safetensors").read_bytes()
    ).hexdigest()[:16]


def member_facts(name: str, folder: Path | None) -> dict:
    """Cost and (zoo members) size and training record of one member."""
    den = load_diffusers(folder, name=name) if folder is not None else load(name)
    out: dict = {"cost": float(getattr(den, "cost", 1.0)), "training": None}
    if folder is not None:
        meta = json.loads((folder / "searchd.json").read_text())
        tr = meta["training"]
        size = sum(f.stat().st_size for f in folder.iterdir()) / 2**20
        out["training"] = [name, meta["parameters"], size, tr["total_iterations"], tr["batch"],
                           tr["total_cpu_minutes"], tr["minutes"], tr["final_loss"]]
    return out


def measure(name: str, folder: Path | None, part: str, feats, ref: FeatureStats,
            n: int) -> dict:
    """One part of a member's numbers: ``heun`` (1,000 samples at Heun 35 NFE: confidence,
    classes, FID) or an NFE of DPM-Solver++(2M) (FID of ``n`` samples)."""
    t0 = time.perf_counter()
    den = load_diffusers(folder, name=name) if folder is not None else load(name)
    if part == "heun":
        assert nfe("heun", HEUN_STEPS) == 35
        x = sample(den, CONFIDENCE_SAMPLES, "heun", HEUN_STEPS)
        conf, hist = confidence(feats, x)
        out = {"confident": {str(t): v for t, v in conf.items()}, "classes": hist.tolist(),
               "fid": fid(feats, x, ref)}
    else:
        out = {"fid": fid(feats, sample(den, n, "dpmpp_2m", int(part)), ref)}
    out["seconds"] = time.perf_counter() - t0
    print(f"{name} {part}: {out}", flush=True)
    return out


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--members", default=",".join([*ZOO, "gmm-digits-k64"]))
    p.add_argument("--zoo-dir", type=Path, default=None,
                   help="read digits-unet-*/digits-flow-* from this folder instead of the "
                   "shipped weights")
    p.add_argument("--nfe", default="5,10,20")
    p.add_argument("--n", type=int, default=1000, help="samples per FID")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--cache", default=None,
                   help="JSON files (comma-separated) of measured parts, reused when the weights "
                   "are unchanged; new parts are written to the first")
    p.add_argument("--parts", default=None,
                   help="measure only these parts (heun and/or NFE values) into --cache and "
                   "write no table: to split the work over processes")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    members = [m.strip() for m in args.members.split(",") if m.strip()]
    nfes = [int(v) for v in args.nfe.split(",")]

    feats = load_features("digits")
    data, _ = digits_images()
    data_t = torch.from_numpy(data)
    ref = FeatureStats.from_features(feats(data_t))
    data_conf, _ = confidence(feats, data_t)

    # The FID floor: n real digits (a fixed random subset) against all of them.
    pick = torch.randperm(data_t.shape[0], generator=torch.Generator().manual_seed(0))
    floor = fid(feats, data_t[pick[: min(args.n, data_t.shape[0])]], ref)
    floor_heun = fid(feats, data_t[pick[:CONFIDENCE_SAMPLES]], ref)
    caches = [Path(c) for c in (args.cache or "").split(",") if c]
    cache: dict = {}
    for c in caches:
        if c.exists():
            cache.update(json.loads(c.read_text()))
    parts = ["heun", *map(str, nfes)] if args.parts is None else args.parts.split(",")
    conf_rows, fid_rows, train_rows = [], [], []
    for name in members:
        folder = (args.zoo_dir or ZOO[name].parent) / name if name in ZOO else None
        digest = weights_digest(name, folder)
        got = {}
        for part in parts:
            key = f"{name}|{digest}|{part}|n={CONFIDENCE_SAMPLES if part == 'heun' else args.n}"
            if key not in cache:
                cache[key] = measure(name, folder, part, feats, ref, args.n)
                if caches:
                    caches[0].write_text(json.dumps(cache, indent=1) + "\n")
            got[part] = cache[key]
        if args.parts is not None:
            continue  # a partial run (one process of several): the table comes from a full one
        facts = member_facts(name, folder)
        h = got["heun"]
        conf = {float(t): v for t, v in h["confident"].items()}
        conf_rows.append((name, conf, np.asarray(h["classes"]), facts["cost"]))
        row = [got[str(k)]["fid"] for k in nfes] + [h["fid"]]
        fid_rows.append((name, row, sum(r["seconds"] for r in got.values())))
        if facts["training"] is not None:
            train_rows.append(tuple(facts["training"]))
    if args.parts is not None:
        return ""

    lines = [
        f"Machine: {platform.machine()} CPU, torch {torch.__version__}, "
        f"{torch.get_num_threads()} thread(s); no GPU.",
        "",
        f"## Recognizability: {CONFIDENCE_SAMPLES} samples, Heun 35 NFE, EDM schedule",
        "",
        "Fraction of samples whose largest class probability under the `digits` feature "
        "network is at least the threshold (real digits: all 1,797 images of the dataset).",
        "",
        "| model | cost | " + " | ".join(f"p >= {t}" for t in THRESHOLDS)
        + " | samples per predicted class 0..9 |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
        "| real digits | - | "
        + " | ".join(f"{data_conf[t]:.3f}" for t in THRESHOLDS) + " | - |",
    ]
    lines += [f"| {n} | {c:.3f} | " + " | ".join(f"{cf[t]:.3f}" for t in THRESHOLDS)
              + f" | {' '.join(map(str, h))} |" for n, cf, h, c in conf_rows]
    lines += [
        "",
        f"## FID vs NFE: {args.n} samples vs the 1,797 digits (digits features)",
        "",
        "DPM-Solver++(2M) on EDM's schedule (polynomial, rho 7, sigma 0.002..80, final step "
        "to 0); last column Heun 35 NFE.",
        "",
        "| model | " + " | ".join(f"NFE {k}" for k in nfes) + " | Heun 35 | seconds |",
        "| --- | " + " | ".join("---:" for _ in nfes) + " | ---: | ---: |",
    ]
    lines += [f"| {n} | " + " | ".join(f"{v:.3f}" for v in row) + f" | {s:.0f} |"
              for n, row, s in fid_rows]
    lines += [
        "",
        f"FID floor: {min(args.n, data_t.shape[0])} real digits (a random subset) against all "
        f"1,797: {floor:.3f} ({CONFIDENCE_SAMPLES}, the Heun column's sample count: "
        f"{floor_heun:.3f}). Seconds: wall time of a member's parts, summed (a shared "
        "machine under load).",
        "",
        "## Members: size and training (scripts/train_digits_unet.py, "
        "scripts/train_digits_flow.py; one CPU thread)",
        "",
        "| model | parameters | files (MB) | iterations | batch | CPU minutes | wall minutes "
        "| final loss |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    lines += [f"| {n} | {pc:,} | {mb:.2f} | {it} | {b} | {cpu:.1f} | {wall:.1f} | {loss:.4f} |"
              for n, pc, mb, it, b, cpu, wall, loss in train_rows]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(table)
    return table


if __name__ == "__main__":
    main()
