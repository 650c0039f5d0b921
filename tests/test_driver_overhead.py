"""The driver's fixed and per-candidate overhead: the in-process engine's torch threads,
and what the report and a finished run's resume import."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from searchd.loop import local

REPO = Path(__file__).resolve().parents[1]


class _Workers:
    """Stands in for ``LocalWorkers`` (no model is loaded): records the thread count."""

    def __init__(self, factory: object) -> None:
        self.threads = torch.get_num_threads()


@pytest.mark.parametrize("cpus, expected", [(0.9, 1), (1.0, 1), (2.5, 2)])
def test_the_local_engine_uses_a_ray_actors_threads_and_restores_them(monkeypatch, cpus,
                                                                      expected):
    """As Ray sets OMP_NUM_THREADS for an actor: max(1, floor(cpus_per_worker))."""
    monkeypatch.setattr(local, "LocalWorkers", _Workers)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    eng = local.LocalEngine()
    workers = eng.start(None, SimpleNamespace(cpus_per_worker=cpus))  # type: ignore[arg-type]
    assert workers.threads == expected
    eng.close()
    assert torch.get_num_threads() == before


def test_the_local_engine_leaves_an_explicit_omp_num_threads_alone(monkeypatch):
    monkeypatch.setattr(local, "LocalWorkers", _Workers)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    before = torch.get_num_threads()
    eng = local.LocalEngine()
    workers = eng.start(None, SimpleNamespace(cpus_per_worker=0.5))  # type: ignore[arg-type]
    assert workers.threads == before
    eng.close()
    assert torch.get_num_threads() == before


def test_the_report_imports_neither_torch_nor_ray():
    """``python -m searchd.report`` reads Parquet and JSON: torch and Ray (seconds of
    imports at every start) stay out of it, and ``import searchd.loop`` stays light."""
    code = ("import sys, searchd.report, searchd.loop, searchd.loop.runs, searchd.loop.finish; "
            "bad = [m for m in ('torch', 'ray') if m in sys.modules]; "
            "assert not bad, bad; from searchd.loop import SearchLoop; "
            "assert 'searchd.loop.loop' in sys.modules; "
            # the probe sees torch where it is imported: the evaluator's factory
            "import searchd.loop.factory; assert 'torch' in sys.modules")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO, env=env)
