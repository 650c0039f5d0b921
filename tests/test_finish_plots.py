"""The run's plots drawn in a thread while the evaluators do the held-out phase
(``finish.SearchPlots``): the same files as drawn in line, an error of the drawing raised in
the driver, and no scratch directory left behind either way."""

from __future__ import annotations

import os

import numpy as np
import pytest

from searchd.loop.finish import SearchPlots, write_plots
from searchd.schedule import Schedule
from searchd.storage import RunDir

WINNER = Schedule(np.array([40.0, 3.0, 1.5, 0.3, 0.19, 0.0]))
BASE = Schedule(np.array([80.0, 17.5, 2.5, 0.17, 0.002, 0.0]), meta={"family": "polynomial"})
ROWS = [{"generation": g, "value": 1.0 / (1 + g + i)} for g in range(3) for i in range(4)]
IMAGES = {0: np.zeros((4, 1, 8, 8), np.float32), 1: np.ones((4, 1, 8, 8), np.float32)}


def _scratch(tmp_path) -> set[str]:
    return {p for p in os.listdir(tmp_path) if p.startswith("searchd-report-")}


@pytest.fixture
def scratch(tmp_path, monkeypatch):
    """Scratch directories go to tmp_path, where the test can see them."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_drawn_in_a_thread_the_same_files_as_in_line(scratch):
    a, b = RunDir(str(scratch / "a")), RunDir(str(scratch / "b"))
    os.makedirs(scratch / "a"), os.makedirs(scratch / "b")
    inline = write_plots(a, WINNER, [BASE], 0, ROWS, {"polynomial": 2.0}, IMAGES, "fid", 5)
    plots = SearchPlots(WINNER, [BASE], lambda: ROWS, {"polynomial": 2.0}, "fid", 5)
    threaded = plots.finish(b, IMAGES, 0)
    assert sorted(inline) == sorted(threaded)
    assert {os.path.basename(p) for p in threaded} == {
        "metric_per_generation.png", "schedules.png", "samples_best.png",
        "samples_best_baseline.png"}
    assert not _scratch(scratch)


def test_an_error_of_the_drawing_is_raised_by_finish_and_nothing_is_left(scratch):
    os.makedirs(scratch / "run")

    def rows():
        raise OSError("evaluations unreadable")

    plots = SearchPlots(WINNER, [BASE], rows, {"polynomial": 2.0}, "fid", 5)
    with pytest.raises(OSError, match="evaluations unreadable"):
        plots.finish(RunDir(str(scratch / "run")), IMAGES, 0)
    assert not _scratch(scratch)
    assert not os.path.exists(scratch / "run" / "report")


def test_discarded_when_the_heldout_phase_fails(scratch):
    plots = SearchPlots(WINNER, [BASE], lambda: ROWS, {"polynomial": 2.0}, "fid", 5)
    plots.discard()
    assert not _scratch(scratch)
