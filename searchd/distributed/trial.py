"""The Tune trial of one batch (``make_trainable``), in a module without torch.

A trial runs in a Ray worker process of its own that Tune starts when the search starts: it
decodes its schedules, scores them with the pool's client (``PoolClient``: requests to the
evaluator actors) and reports the results once. It computes nothing itself, so its process
imports only Ray Tune and what unpickling its function, the client and the results needs:
this module, ``searchd.schedule``, ``searchd.distributed.pool`` and
``searchd.evaluation.result``, none of which imports torch. The first trial's start is on
the critical path of every search (the evaluators wait for it): with torch and searchd's
numerical code imported there it took 3.1 s on a quiet 2-core machine (tested:
``tests/test_trial_imports.py`` unpickles a real trial's function in a fresh process and
checks that torch is not imported).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

from ray import tune

from searchd.schedule import Schedule

# Result key carrying the results from the trial to the driver's callback, which removes it
# before Tune's loggers and the trial's stored result see it.
PAYLOAD_KEY = "_searchd_results"
# The payload of a trial whose batch the driver scored itself while the trial's process
# started (the search's first batch: ``searchd.distributed.tune``, ``prefetch_first``).
PREFETCHED = "prefetched"


def best_value(values: Sequence[float | None], mode: str) -> float:
    """Best finite value under ``mode`` ("min" or "max"); NaN when there is none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan
    return min(finite) if mode == "min" else max(finite)


def make_trainable(scorer: Any, seeds: Sequence[int], metric: str, mode: str
                   ) -> Callable[[dict[str, Any]], None]:
    """The Tune function trainable of one batch: decode, score, report once (a batch the
    driver scores itself, ``config[PREFETCHED]``: report at once, the driver's callback
    takes the results from the driver's own scoring).

    Args:
        scorer: the scoring protocol (``searchd.loop.scoring.Scorer``: the pool's
            ``PoolClient``, possibly wrapped); picklable.
        seeds: the search seeds every candidate is scored on.
        metric, mode: the reported metric (the batch's best value) and its direction.
    """
    seeds = [int(s) for s in seeds]

    def score_batch(config: dict[str, Any]) -> None:
        if config.get(PREFETCHED):  # the driver scores this batch: report at once
            tune.report({metric: math.nan, "n_candidates": 0, "eval_s": 0.0,
                         "score_cpu_s": 0.0, PAYLOAD_KEY: PREFETCHED})
            return
        schedules = [Schedule.from_dict(d) for d in config["candidates"]]
        t0, c0 = time.perf_counter(), time.process_time()
        results = scorer.score(schedules, seeds) if schedules else []
        eval_s = time.perf_counter() - t0
        tune.report({
            metric: best_value([r.value(metric) for r in results], mode),
            "n_candidates": len(results),
            "eval_s": eval_s,
            # CPU the trial's process spent sending and gathering (the driver's side of
            # the scoring, beside the driver itself): benchmarks/scale.py's capacity.
            "score_cpu_s": time.process_time() - c0,
            PAYLOAD_KEY: results,
        })

    return score_batch
