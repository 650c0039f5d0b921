"""Fault injection: ``SEARCHD_FAULT`` makes the process kill itself (SIGKILL) at a named point.

This is how the resume tests crash a search at a precise moment; it is a real ``kill -9``
of the running process (no cleanup, no ``finally``, no flush of anything not yet written),
not a simulation. Unset (the default), every hook is a dictionary lookup and nothing else.

``SEARCHD_FAULT=<point>[:<n>]`` kills the process the ``n``-th time (default 1) it reaches
``<point>``, counted in this process:

- ``after_tmp_write``: an evaluation part's temporary file (``evaluations/.part-...tmp-...``)
  is written and fsync'd, and not yet renamed into place (local run directories; an object
  store writes the final key in one PUT and has no such moment);
- ``mid_generation``: an evaluator has started scoring the candidates of the ``n``-th batch
  of the search loop (one batch is one generation of the evolutionary search), and none of
  that batch's rows is stored yet. On Ray the driver watches the actors' counters to see the
  scoring start; if the batch's results reach the driver first, it is killed there, before
  storing them (``searchd.loop.hooks``);
- ``after_generation``: the ``n``-th batch's rows and the searcher state after it are stored,
  and the searcher has not yet learned of the results (the next generation is not built);
- ``during_anchors``: the driver has asked the evaluators for the ``n``-th anchor schedule
  (GITS, LD3: ``search.evolution.warm_start`` or a baseline family) and none is stored yet;
- ``during_heldout``: the driver has asked an evaluator to re-score the winner and the
  baselines on the held-out seeds (the search's rows are all stored; best.json is not);
- ``during_race``: the race (``searchd.loop.racing``) has stored the rows of its ``n``-th
  fresh seed block, and the later blocks are not scored yet.

A kill anywhere in one of these windows leaves the run directory as the kill at its end does
(nothing is written inside a window), so each point stands for its whole window.

One point does not kill: ``disk_full`` makes the ``n``-th write to a local run directory,
and every one after it in this process, fail with ``OSError(ENOSPC)`` once the data (or its
first MiB) is in the temporary file, before the rename (what a full disk does to a write
that needs one more block), so the run's own handling of a full disk (the error, the
temporary removed, nothing half-written left under a final name) is what runs.

Example: ``SEARCHD_FAULT=after_tmp_write:2 python -m searchd.search --config ...`` dies while
writing the second evaluation part; ``python -m searchd.search --resume RUN_DIR`` then
continues the run. A value that names no point is refused by the driver before anything
starts (exit code 2).

This module imports only the standard library (``searchd.storage`` uses it).
"""

from __future__ import annotations

import errno
import os
import signal
import sys

ENV = "SEARCHD_FAULT"

POINTS: dict[str, str] = {
    "after_tmp_write": "an evaluation part's temporary file is written, before its rename",
    "mid_generation": "an evaluator is scoring the n-th batch, none of its rows stored",
    "after_generation": "the n-th batch's rows and searcher state are stored",
    "during_anchors": "the driver is waiting for the n-th anchor schedule (GITS, LD3)",
    "during_heldout": "the driver is waiting for the held-out scores (n-th time)",
    "during_race": "the race stored its n-th seed block's rows, later blocks not scored",
    "disk_full": "the n-th local run-directory write and every later one fail with ENOSPC",
}

_hits: dict[str, int] = {}


def parse(text: str) -> tuple[str, int]:
    """``"<point>[:<n>]"`` -> ``(point, n)``; ``ValueError`` (one line) for anything else."""
    allowed = f"allowed: <point>[:<n>] with point one of {sorted(POINTS)} and n >= 1"
    point, _, count = text.strip().partition(":")
    if point not in POINTS:
        raise ValueError(f"{ENV} = {text!r} names no fault point; {allowed}")
    if not count:
        return point, 1
    try:
        n = int(count)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"{ENV} = {text!r}: the count must be an integer >= 1; {allowed}")
    return point, n


def configured() -> tuple[str, int] | None:
    """The fault ``SEARCHD_FAULT`` asks for, or None (unset or empty)."""
    text = os.environ.get(ENV, "")
    return parse(text) if text.strip() else None


def armed(point: str) -> int | None:
    """``n`` if ``SEARCHD_FAULT`` names ``point`` (this process dies at its ``n``-th hit)."""
    text = os.environ.get(ENV)
    if not text:
        return None
    name, n = parse(text)
    return n if name == point else None


def hit(point: str) -> None:
    """Count one arrival at ``point``; SIGKILL this process at the ``n``-th one if armed."""
    n = armed(point)
    if n is None:
        return
    _hits[point] = _hits.get(point, 0) + 1
    if _hits[point] == n:
        kill(point, n)


def write_fails(path: str) -> None:
    """Count one local write of ``path``; from the ``n``-th on (``disk_full:<n>``) raise
    ``OSError(ENOSPC)`` as a full disk does. Nothing happens when ``disk_full`` is not armed."""
    n = armed("disk_full")
    if n is None:
        return
    _hits["disk_full"] = _hits.get("disk_full", 0) + 1
    if _hits["disk_full"] >= n:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


def reset() -> None:
    """Forget the counts (a test that arms a point again in the same process)."""
    _hits.clear()


def kill(point: str, n: int, detail: str | None = None) -> None:
    """Say so on stderr (``detail``: what exactly was happening), then SIGKILL this process
    (never returns)."""
    try:
        sys.stderr.write(f"searchd: {ENV}: SIGKILL at {point}:{n} ({detail or POINTS[point]})\n")
        sys.stderr.flush()
    finally:
        os.kill(os.getpid(), signal.SIGKILL)
