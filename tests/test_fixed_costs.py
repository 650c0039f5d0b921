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
