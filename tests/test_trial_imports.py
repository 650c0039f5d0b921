"""The Tune trial's process stays free of torch: unpickling what a trial receives (its
function with the pool's client, an actor handle's class module) and the results it passes
on imports neither torch nor searchd's numerical code (``searchd.distributed.trial``)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import ray.cloudpickle as cloudpickle

from searchd.distributed.pool import PoolClient
from searchd.distributed.trial import make_trainable
from searchd.evaluation import CandidateResult

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "searchd.loop.factory", "searchd.evaluation.evaluate")


def test_a_trial_process_does_not_import_torch(tmp_path) -> None:
    # The handles stand in as names: what a real handle's unpickling imports, the module of
    # its actor class, is imported explicitly below.
    client = PoolClient(["actor-0", "actor-1"], ["evaluator-0", "evaluator-1"])
    fn = make_trainable(client, range(4), "fid", "min")
    results = [CandidateResult("abc", "ok", {"fid": 1.5}, 5, 4, 0, 0.1, 40.0, worker="w")]
    blob = tmp_path / "trial.pkl"
    blob.write_bytes(cloudpickle.dumps((fn, results)))
    code = textwrap.dedent(f"""
        import sys
        import ray.cloudpickle as cloudpickle
        import ray.tune  # the trial's process imports Ray Tune itself
        fn, results = cloudpickle.loads(open({str(blob)!r}, "rb").read())
        import searchd.distributed.actor  # the class module of the handles in the client
        assert results[0].value("fid") == 1.5 and fn.__module__ == "searchd.distributed.trial"
        print(",".join(m for m in {HEAVY!r} if m in sys.modules))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get(
        "PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "", f"the trial's process imported {out.stdout.strip()}"


def test_the_package_attribute_evaluate_stays_the_function() -> None:
    """``searchd.evaluation`` resolves its names lazily; importing the submodule
    ``searchd.evaluation.evaluate`` does not turn the package's ``evaluate`` into it."""
    import searchd.evaluation
    import searchd.evaluation.evaluate as submodule_import  # noqa: F401
    from searchd.evaluation import evaluate
    from searchd.evaluation.evaluate import Evaluator

    assert callable(evaluate) and evaluate.__module__ == "searchd.evaluation.evaluate"
    assert searchd.evaluation.evaluate is evaluate
    assert searchd.evaluation.Evaluator is Evaluator
