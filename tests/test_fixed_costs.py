"""The quickstart's fixed costs that a change could bring back silently: what the end of a run
imports (benchmarks/end_to_end.py measures the time; these check the behaviour)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_best_json_reads_the_diffusers_version_without_importing_it():
    code = ("import sys; from searchd.export import _diffusers_version; "
            "v = _diffusers_version(); print(v); print('diffusers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout.split()
    import diffusers

    assert out == [diffusers.__version__, "False"]


def test_exit_now_flushes_runs_atexit_and_keeps_the_status():
    code = ("import atexit, sys; from searchd import cli; "
            "atexit.register(lambda: print('atexit ran')); "
            "print('buffered', end=' '); sys.stderr.write('err'); cli.exit_now(3)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 3
    assert proc.stdout == "buffered atexit ran\n" and proc.stderr == "err"


def test_the_search_command_exits_with_its_status_and_all_its_output():
    from searchd.config import load_config

    config = REPO / "configs" / "quickstart.yaml"
    proc = subprocess.run([sys.executable, "-m", "searchd.search", "--config", str(config),
                           "--print-config"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout == load_config(config).to_yaml()
    bad = subprocess.run([sys.executable, "-m", "searchd.search", "--config", str(config),
                          "--set", "nfe=0"], capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


def test_importing_the_engine_leaves_ray_tune_for_later():
    code = ("import sys; import searchd.distributed.engine; "
            "print('ray.tune' in sys.modules, 'searchd.distributed.tune' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout.split()
    assert out == ["False", "False"]
