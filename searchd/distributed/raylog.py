"""Ray's cluster error messages, kept off the console of a quiet search.

When a worker process of the cluster dies (an evaluator actor SIGKILLed, the OOM killer, a
node lost), the raylet publishes a long message ("A worker died or was killed while
executing a task by an unexpected system error. To troubleshoot ... Worker exit detail:
..."), and every driver prints it to its stdout from a thread of its own
(``ray._private.worker.listen_error_messages``, through ``print_to_stdstream``). Ray 2.60
has no switch for it: ``ray.init(log_to_driver=False)`` stops the workers' output only, and
the messages are printed, not logged, so a logging filter never sees them.

searchd recovers from these deaths itself (``pool._Scoring``), so under ``--quiet`` the
message is noise on the console, but worth keeping: ``route_to_log`` sends each one to the
``searchd`` logger as one INFO line (the run's ``log.txt``) instead. It replaces that one
module function, the only place these messages go through, and leaves every other output of
Ray alone; if a Ray version lacks it, nothing is changed and the messages print as before.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("searchd.ray")

# What listen_error_messages passes as the source of the messages it prints.
SOURCE = "raylet"


def route_to_log() -> bool:
    """Send Ray's cluster error messages to the ``searchd.ray`` logger (INFO, one line each)
    instead of this process's stdout, from now until ``restore``. Returns whether Ray's
    printer was found (and replaced; calling this twice replaces it once)."""
    try:
        import ray._private.worker as worker
    except ImportError:  # pragma: no cover - Ray is a dependency
        return False
    printer = getattr(worker, "print_to_stdstream", None)
    if printer is None:
        return False
    if getattr(printer, "_searchd_original", None) is not None:
        return True

    def to_log(data: dict[str, Any], ignore_prefix: bool) -> None:
        if data.get("pid") != SOURCE:
            printer(data, ignore_prefix)
            return
        for text in data.get("lines", []):
            logger.info("ray: %s", " ".join(str(text).split()))

    to_log._searchd_original = printer  # type: ignore[attr-defined]
    worker.print_to_stdstream = to_log
    return True


def restore() -> None:
    """Print Ray's cluster error messages again (undo ``route_to_log``)."""
    import ray._private.worker as worker

    original: Callable[..., None] | None = getattr(
        getattr(worker, "print_to_stdstream", None), "_searchd_original", None)
    if original is not None:
        worker.print_to_stdstream = original
