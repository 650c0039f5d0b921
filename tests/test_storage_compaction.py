"""Compaction of evaluation parts: above a bound the parts are merged into one, with the
same rows in the same order, and a kill at any point of it leaves every row exactly once."""

from __future__ import annotations

import os
import signal

from test_storage_support import make_rows, run_child, temp_files

from searchd.storage import RunDir, table_to_rows
from searchd.storage.rundir import COMPACT_ABOVE, PartInfo

SIZES = [1, 3, 2, 5, 1, 1, 2, 4, 1, 1, 3, 2]


def fill(run: RunDir, sizes: list[int], start: int = 0) -> int:
    for n in sizes:
        run.append_evaluations(make_rows(start, n))
        start += n
    return start


def files(root) -> list[str]:
    return sorted(p.name for p in (root / "evaluations").glob("part-*.parquet"))


def test_parts_above_the_bound_merge_into_one_with_the_same_rows(tmp_path):
    run = RunDir(tmp_path / "run")
    n = fill(run, SIZES)
    before = table_to_rows(RunDir(tmp_path / "run").read_evaluations())
    assert run.compact_parts(above=len(SIZES)) is None  # not above: nothing done
    assert len(files(tmp_path / "run")) == len(SIZES)
    rel = run.compact_parts(above=4)
    info = PartInfo.parse(rel)
    assert (info.first, info.seq, info.rows) == (1, len(SIZES), sum(SIZES))
    assert run.list_parts() == [rel] and files(tmp_path / "run") == [rel.split("/")[-1]]
    assert table_to_rows(RunDir(tmp_path / "run").read_evaluations()) == before
    assert temp_files(tmp_path) == []
    # Appends go on after it; the next compaction takes the compacted part in too.
    fill(run, [2, 1, 1, 3, 2], start=n)
    assert PartInfo.parse(run.list_parts()[-1]).seq == len(SIZES) + 5
    again = run.compact_parts(above=4)
    assert PartInfo.parse(again).first == 1 and run.list_parts() == [again]
    rows = table_to_rows(RunDir(tmp_path / "run").read_evaluations())
    assert [r["candidate_id"] for r in rows] == [r["candidate_id"] for r in make_rows(0, n + 9)]
    assert COMPACT_ABOVE >= 8  # the default bound: a compaction rewrites every row


CHILD = """
import os, signal, sys
from searchd.storage import RunDir
from searchd.storage import rundir as rd
run = RunDir(sys.argv[1])
point = sys.argv[2]
if point == "before_rename":  # the compacted part written to its temporary, not renamed
    real = os.replace
    def replace(a, b):
        if "-from" in str(b):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(a, b)
    rd.os.replace = replace
else:  # after the compacted part and some of the deletions
    real_delete = RunDir.delete
    done = []
    def delete(self, rel):
        if len(done) == int(point):
            os.kill(os.getpid(), signal.SIGKILL)
        done.append(rel)
        return real_delete(self, rel)
    RunDir.delete = delete
run.compact_parts(above=4)
print("not killed")
"""


def test_a_kill_during_a_compaction_loses_and_duplicates_nothing(tmp_path):
    for point in ("before_rename", "0", "5"):
        root = tmp_path / point
        run = RunDir(root)
        fill(run, SIZES)
        before = table_to_rows(RunDir(root).read_evaluations())
        child = run_child(CHILD, str(root), point)
        assert child.returncode == -signal.SIGKILL, (child.stdout, child.stderr)
        after = RunDir(root)
        assert table_to_rows(after.read_evaluations()) == before, point
        listed = after.list_parts()
        if point == "before_rename":
            assert len(listed) == len(SIZES) and len(temp_files(root)) == 1
            after.clean_temp_files()
        else:
            # The compacted part is listed alone; the parts it holds that the kill left
            # are on disk but not listed, and the next compaction deletes them.
            assert len(listed) == 1 and "-from000001" in listed[0]
            assert len(files(root)) == 1 + len(SIZES) - int(point)
        fill(after, [1] * 5, start=sum(SIZES))
        after.compact_parts(above=4)
        assert len(files(root)) == 1 and temp_files(root) == []
        rows = table_to_rows(RunDir(root).read_evaluations())
        assert rows[: len(before)] == before and len(rows) == len(before) + 5


def test_a_corrupt_compacted_part_gives_back_the_parts_it_held(tmp_path):
    """Killed before its deletions, then the compacted part found corrupt: it is moved
    aside and the parts it held are read again."""
    root = tmp_path / "run"
    run = RunDir(root)
    fill(run, SIZES)
    before = table_to_rows(RunDir(root).read_evaluations())
    assert run_child(CHILD, str(root), "0").returncode == -signal.SIGKILL
    (compacted,) = [p for p in files(root) if "-from" in p]
    path = root / "evaluations" / compacted
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    again = RunDir(root)
    assert table_to_rows(again.read_evaluations()) == before
    assert os.path.exists(root / "evaluations" / "_corrupt" / compacted)
