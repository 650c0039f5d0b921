"""What the command-line tools share: one-line errors with the right exit status, and the
console logging (only the command-line tools configure logging; the library does not).

Exit statuses: 0 done; 2 bad input (one line on stderr, before any expensive work); 1 a
runtime failure (a storage error, a model that fails to load, a run that fails); 130
interrupted.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130


def one_line(error: BaseException | str) -> str:
    """An error's text on one line (whitespace folded; colour codes dropped)."""
    import re

    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    return " ".join(text.split()) or type(error).__name__


def fail(prog: str, error: BaseException | str, code: int) -> int:
    """Print ``<prog>: error: <one line>`` on stderr and return ``code``."""
    print(f"{prog}: error: {one_line(error)}", file=sys.stderr, flush=True)
    return code


def exit_now(code: int) -> None:
    """End the command with ``code`` once its work is done, without the interpreter's
    finalization: after a search, tearing down torch, Ray's core worker and thousands of
    modules took 2-10 s on 2 cores (after ``done in`` was printed), and nothing of the run
    depends on it: the run's files, its lock and Ray (``RayEngine.close``) are closed by then.
    Output is flushed, logging shut down, Ray disconnected if still connected (a cluster
    run) and the ``atexit`` handlers run first."""
    import atexit
    import os

    try:
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()
        atexit._run_exitfuncs()
        logging.shutdown()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:  # a closed pipe: nothing more can be said
                pass
        os._exit(code)


def console_logging(quiet: bool = False) -> None:
    """The ``searchd`` logger's warnings (and errors) on stderr, one line each."""
    logger = logging.getLogger("searchd")
    for h in list(logger.handlers):
        if getattr(h, "_searchd_console", False):
            logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    handler.setLevel(logging.ERROR if quiet else logging.WARNING)
    handler.setFormatter(logging.Formatter("searchd: %(levelname)s: %(message)s"))
    handler._searchd_console = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.propagate = False


def run_command(prog: str, body: Callable[[], int], *, bad: tuple[type[BaseException], ...],
                failure: tuple[type[BaseException], ...] = ()) -> int:
    """Run a command's ``body``: ``bad`` exceptions are bad input (exit 2), ``failure`` ones
    and ``OSError`` runtime failures (exit 1), KeyboardInterrupt exit 130; each one line."""
    try:
        return body()
    except bad as e:
        return fail(prog, e, EXIT_BAD_INPUT)
    except (*failure, OSError) as e:
        return fail(prog, e, EXIT_FAILURE)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def printer(enabled: bool) -> Callable[[str], None] | None:
    """``print`` (flushed) when enabled, else None."""
    if not enabled:
        return None

    def out(line: str) -> None:
        print(line, flush=True)

    return out

