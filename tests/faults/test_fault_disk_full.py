"""A full disk: every write to the run directory from some point on fails with ENOSPC
(``SEARCHD_FAULT=disk_full:<n>``, searchd/faults.py: the error is raised at the write, with
the data in the temporary file and before the rename, as a disk with no block left does).

Expected: the search stops with one line naming the file in the run directory and the
cause; no file is left half-written under its final name (every part passes its integrity
check, every JSON parses) and no temporary stays; once space is back, ``--resume``
finishes with every candidate stored exactly once, and the result equals that of an
uninterrupted run of the same seed. benchmarks/reliability.py does the same on a real
size-limited tmpfs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from campaign import TINY, compare
from test_storage_support import make_rows

from searchd import faults
from searchd.search import main
from searchd.storage import RunDir, StorageError, verify_part
from searchd.storage.rundir import is_temp_name

REPO = Path(__file__).resolve().parents[2]
PREFIX = "python -m searchd.search: error: "


@pytest.fixture
def disk(monkeypatch):
    """``fill(n)``: the n-th write from now on and every later one fail; ``free()``."""
    faults.reset()

    class Disk:
        def fill(self, n: int) -> None:
            faults.reset()
            monkeypatch.setenv(faults.ENV, f"disk_full:{n}")

        def free(self) -> None:
            monkeypatch.delenv(faults.ENV, raising=False)
            faults.reset()

    d = Disk()
    yield d
    d.free()


def test_a_part_written_on_a_full_disk_is_not_left_half_written(tmp_path, disk):
    run = RunDir(str(tmp_path / "run"))
    run.write_text("config.yaml", "x: 1\n")
    first = run.append_evaluations(make_rows(0, 2))
    disk.fill(1)
    with pytest.raises(StorageError) as e:
        run.append_evaluations(make_rows(2, 2))
    msg = str(e.value)
    assert "\n" not in msg and str(tmp_path / "run" / "evaluations") in msg
    assert "No space left on device" in msg and e.value.errno == 28
    assert ".tmp-" not in msg  # the temporary's name is not what the user needs
    with pytest.raises(StorageError):
        run.write_json("searcher/state-000001.json", {"a": 1})
    left = sorted(p.name for p in (tmp_path / "run").rglob("*") if p.is_file())
    assert left == ["config.yaml", first.rsplit("/", 1)[-1]]  # no temporary, no new file
    disk.free()
    second = run.append_evaluations(make_rows(2, 2))
    assert [p.rsplit("/", 1)[-1][:11] for p in run.list_parts()] == ["part-000001",
                                                                   "part-000002"]
    assert second in run.list_parts()


def _files_are_whole(run: Path) -> None:
    for p in run.rglob("*"):
        assert not is_temp_name(p.name), p
        if p.suffix == ".parquet":
            verify_part(p.read_bytes(), str(p))
        elif p.suffix == ".json":
            json.loads(p.read_text())


def test_a_search_on_a_full_disk_stops_on_one_line_and_resumes_with_nothing_lost(
        tmp_path, disk, capsys, monkeypatch, one_thread):
    monkeypatch.chdir(REPO)
    local = ["--engine", "local", "--quiet"]
    ref, run = tmp_path / "uninterrupted", tmp_path / "run"
    assert main([*TINY, *local, "--run-dir", str(ref)]) == 0
    # Writes of a run: config.yaml, run.json, reference.npz, then per generation its part
    # and its searcher state; the 6th is generation 1's part.
    disk.fill(6)
    assert main([*TINY, *local, "--run-dir", str(run)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(PREFIX), err
    assert f"cannot write {run}/evaluations/part-000002-" in err[0]
    assert "No space left on device" in err[0]
    _files_are_whole(run)
    assert len(list((run / "evaluations").glob("part-*.parquet"))) == 1
    assert not (run / "run.lock").exists() and not (run / "best.json").exists()
    # The disk is still full: the resume fails the same way, on one line.
    disk.fill(1)
    assert main(["--resume", str(run), *local]) == 1
    assert "No space left on device" in capsys.readouterr().err
    _files_are_whole(run)
    disk.free()
    assert main(["--resume", str(run), *local]) == 0
    diff = compare(run, ref)
    assert diff["lost"] == diff["duplicated"] == diff["extra"] == diff["differ"] == []
    assert diff["rows"] == diff["reference_rows"] == 18 and diff["best_equal"], diff
    assert diff["temporaries"] == []
