"""Search the best sampling schedule: ``searchd.search(...)`` and ``python -m searchd.search``.

As a function (this module is callable: ``searchd.search(config, ...)`` is
``searchd.api.search``)::

    import searchd
    result = searchd.search("configs/quickstart.yaml", run_dir="runs/demo")
    result.schedule, result.value, result.heldout

As a command::

    python -m searchd.search --config FILE [--set key=value ...] [--run-dir DIR]
    python -m searchd.search --resume RUN_DIR [--set key=value ...] [--force]

The command is a thin layer over the function: it prints the progress lines, sets up the
console logging, and turns errors into one line and an exit status (0 done, 2 bad input,
1 a runtime failure, 130 interrupted: the rows so far are stored; resume the run).
"""

from __future__ import annotations

import argparse
import sys
import types
from collections.abc import Sequence
from typing import Any

PROG = "python -m searchd.search"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Search the best sampling schedule of a diffusion model (Ray Tune + actors).",
    )
    p.add_argument("--config", help="YAML configuration (e.g. configs/quickstart.yaml)")
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one configuration key, e.g. --set search.algorithm=random (repeatable)",
    )
    p.add_argument("--run-dir", help="where the run is written: a new or empty directory "
                   "(default: runs/<run id>)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the search stored in RUN_DIR")
    p.add_argument(
        "--force", action="store_true",
        help="with --resume: accept changed keys that are safe to change (workers, report, "
        "generations, budget), and take over a run lock left by another host (a lost head node)",
    )
    p.add_argument("--print-config", action="store_true",
                   help="print the resolved configuration and exit")
    p.add_argument("--address", help="Ray address (default: $RAY_ADDRESS, else a local Ray)")
    p.add_argument("--engine", choices=("ray", "local"), default="ray",
                   help="ray: Ray Tune and evaluator actors (default); local: this process")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.add_argument(
        "--trust-remote-code", action="store_true",
        help="load models whose loading runs code from their file (an EDM pickle, a generic "
        "entry point): sets model.trust_remote_code; only for files you trust",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """The command; returns its exit status."""
    from searchd import cli
    from searchd.config import ConfigError
    from searchd.loop.runs import BadInput
    from searchd.storage import StorageError

    args = build_parser().parse_args(argv)
    return cli.run_command(PROG, lambda: _run(args), bad=(BadInput, ConfigError),
                           failure=(StorageError, RuntimeError))


def _run(args: argparse.Namespace) -> int:
    from searchd import cli
    from searchd.api import search
    from searchd.config import load_config
    from searchd.loop.runs import BadInput

    if args.resume and args.run_dir:
        raise BadInput("give --run-dir (a new run) or --resume RUN_DIR (a stored one), not both")
    if not args.resume and not args.config:
        raise BadInput("give --config FILE (for example configs/quickstart.yaml) or --resume")
    if args.force and not args.resume:
        raise BadInput("--force goes with --resume")
    if args.trust_remote_code:
        args.overrides = [*args.overrides, "model.trust_remote_code=true"]
    if args.print_config:
        if args.resume:
            raise BadInput("--print-config shows a configuration file's: give --config")
        print(load_config(args.config, args.overrides).to_yaml(), end="")
        return 0
    cli.console_logging(args.quiet)
    result = search(args.config, args.overrides, run_dir=args.resume or args.run_dir,
                    resume=bool(args.resume), force=args.force, engine=args.engine,
                    address=args.address, progress=cli.printer(not args.quiet))
    return 0 if result.status == "finished" else cli.EXIT_INTERRUPTED


class _SearchModule(types.ModuleType):
    """This module, callable: ``searchd.search(...)`` runs ``searchd.api.search``."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from searchd.api import search

        return search(*args, **kwargs)


sys.modules[__name__].__class__ = _SearchModule

if __name__ == "__main__":
    from searchd import cli

    cli.exit_now(main())
