"""Paired comparison of the searched winners of two guidance-benchmark runs (e.g. the same
floor without and with a floor margin): each winner re-scored on the search seeds (its
accuracy there against the floor) and on the held-out seeds, with paired differences on the
benchmark's stratified bootstrap (the same resamples for every schedule).

    nice python benchmarks/guidance_floor_paired.py A/guidance.json B/guidance.json --out X.json

Both runs must be of one model and NFE (the first row of each is used); differences are B - A.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import guidance as g  # noqa: E402  (the benchmark beside this)

from searchd.evaluation.features import load_features  # noqa: E402
from searchd.models import load  # noqa: E402
from searchd.schedule import Schedule  # noqa: E402

SEARCHED = ("timesteps", "joint_interval", "joint_steps")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="the first run's guidance.json")
    p.add_argument("b", help="the second run's guidance.json")
    p.add_argument("--out", required=True, help="where the comparison's json goes")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    a = p.parse_args(argv)
    rows = [json.loads(Path(f).read_text())["models"][0] for f in (a.a, a.b)]
    model = rows[0]["model"]
    if rows[1]["model"] != model or rows[0]["rows"][0]["nfe"] != rows[1]["rows"][0]["nfe"]:
        raise SystemExit(f"{a.a} and {a.b}: give two runs of one model and NFE")
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    st = g.Settings()
    den = load(model)
    feats = load_features("digits")
    scorer = g.ConditionalEvaluator(den, g.class_reference(model, den, feats, st), feats,
                                    solver=st.solver)
    sched: dict[str, Schedule] = {}
    for tag, m in (("A", rows[0]), ("B", rows[1])):
        for k in SEARCHED:
            e = m["rows"][0]["methods"][k]
            sched[f"{tag}:{k}"] = Schedule(np.array(e["sigmas"]), solver=st.solver,
                                           guidance=np.array(e["guidance"]))
    out: dict[str, Any] = {"runs": [a.a, a.b], "model": model, "search": {}, "heldout": {},
                           "b_minus_a": {}}
    seeds = list(range(g.SEED_BASE, g.SEED_BASE + st.per_candidate))
    for (name, _), r in zip(sched.items(), scorer.evaluate(list(sched.values()), seeds)):
        out["search"][name] = {k: float(r.metrics[k]) for k in ("fid_class", "accuracy")}
    held = g.heldout(scorer, sched, list(range(g.HELDOUT_SEED_BASE,
                                               g.HELDOUT_SEED_BASE + st.heldout)), st)
    for name, h in held.items():
        out["heldout"][name] = {k: float(h["metrics"][k]) for k in ("fid_class", "accuracy")}
    for k in SEARCHED:
        x, y = held[f"A:{k}"], held[f"B:{k}"]
        out["b_minus_a"][k] = {
            met: {"diff": float(y["metrics"][met] - x["metrics"][met]),
                  "ci": g._ci(y["boot"][met] - x["boot"][met],
                              float(y["metrics"][met] - x["metrics"][met]))}
            for met in ("fid_class", "accuracy")}
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
