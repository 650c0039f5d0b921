"""Integrity of evaluation parts: corrupt files are detected and moved aside; a crash in the
middle of a write (a real SIGKILL, a real SIGXFSZ) never leaves a partial part under its
final name."""

from __future__ import annotations

import os
import shutil
import signal
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_storage_support import (
    CHILD_APPEND,
    make_rows,
    run_child,
    start_child,
    storage_warnings,
    temp_files,
)

from searchd.storage import RunDir, RunLock, table_to_rows

CORRUPT = Path("evaluations") / "_corrupt"


def _three_parts(tmp_path: Path) -> tuple[RunDir, list[str]]:
    run = RunDir(tmp_path / "run")
    paths = [run.append_evaluations(make_rows(10 * k, 4 + k)) for k in range(3)]
    return run, paths


def _seeds(run: RunDir) -> list[int]:
    return [r["seed_base"] for r in table_to_rows(RunDir(run.uri).read_evaluations())]


def _check_moved_aside(tmp_path: Path, run: RunDir, rel: str, warnings: list) -> None:
    name = rel.split("/")[-1]
    assert (tmp_path / "run" / CORRUPT / name).exists()
    assert rel not in run.list_parts()
    msgs = [w.getMessage() for w in warnings]
    assert any(name in m and "is corrupt" in m and "will be scored again" in m for m in msgs), msgs


@pytest.mark.parametrize("cut", ["half", "last_byte", "empty"])
def test_truncated_part_is_moved_aside_and_its_rows_dropped(tmp_path, cut):
    run, paths = _three_parts(tmp_path)
    f = tmp_path / "run" / paths[1]
    data = f.read_bytes()
    f.write_bytes({"half": data[: len(data) // 2], "last_byte": data[:-1], "empty": b""}[cut])
    with storage_warnings() as warnings:
        seeds = _seeds(run)
    # Parts 0 and 2 survive; part 1's candidates are simply absent (scored again on resume).
    assert seeds == [1000 + i for i in range(0, 4)] + [1000 + i for i in range(20, 26)]
    _check_moved_aside(tmp_path, run, paths[1], warnings)
    # The run goes on: the next part is numbered after the survivors, and reads are clean.
    nxt = run.append_evaluations(make_rows(10, 5))
    assert nxt.startswith("evaluations/part-000004-")
    with storage_warnings() as warnings:
        assert len(_seeds(run)) == 15
    assert warnings == []


def test_flipped_byte_in_a_data_page_is_caught_by_the_page_checksum(tmp_path):
    run, paths = _three_parts(tmp_path)
    f = tmp_path / "run" / paths[2]
    md = pq.ParquetFile(f).metadata
    sig = next(md.row_group(0).column(c) for c in range(md.num_columns)
               if md.row_group(0).column(c).path_in_schema == "sigmas.list.element")
    # A byte in the middle of the dictionary page, which holds the sigma values themselves.
    assert sig.has_dictionary_page and sig.dictionary_page_offset < sig.data_page_offset
    pos = (sig.dictionary_page_offset + sig.data_page_offset) // 2
    data = bytearray(f.read_bytes())
    data[pos] ^= 0xFF
    f.write_bytes(bytes(data))
    # The footer is intact: only the content check can tell.
    assert pq.ParquetFile(f).metadata.num_rows == 6
    with storage_warnings() as warnings:
        seeds = _seeds(run)
    assert seeds == [1000 + i for i in range(0, 4)] + [1000 + i for i in range(10, 15)]
    _check_moved_aside(tmp_path, run, paths[2], warnings)
    assert any("CRC checksum verification failed" in w.getMessage() for w in warnings)


def test_row_count_in_the_name_must_match_the_footer(tmp_path):
    run, paths = _three_parts(tmp_path)
    src = tmp_path / "run" / paths[0]
    wrong = src.with_name(src.name.replace("-n4.parquet", "-n5.parquet"))
    src.rename(wrong)
    with storage_warnings() as warnings:
        seeds = _seeds(run)
    assert len(seeds) == 5 + 6
    rel = f"evaluations/{wrong.name}"
    _check_moved_aside(tmp_path, run, rel, warnings)
    assert any("footer has 4 rows, the file name says 5" in w.getMessage() for w in warnings)


def test_parquet_file_that_is_not_a_searchd_part_is_moved_aside(tmp_path):
    run, paths = _three_parts(tmp_path)
    foreign = tmp_path / "run" / "evaluations" / "part-000009-aaaaaaaa-n1.parquet"
    pq.write_table(pa.table({"x": [1]}), foreign)
    with storage_warnings() as warnings:
        assert len(_seeds(run)) == 4 + 5 + 6
    _check_moved_aside(tmp_path, run, f"evaluations/{foreign.name}", warnings)


def test_temporaries_are_ignored_by_readers_and_removed_by_the_lock_holder(tmp_path):
    run, paths = _three_parts(tmp_path)
    ev = tmp_path / "run" / "evaluations"
    partial = (ev / paths[0].split("/")[-1]).read_bytes()[:100]
    (ev / ".part-000004-deadbeef-n9.parquet.tmp-0badc0de").write_bytes(partial)
    (tmp_path / "run" / ".best.json.tmp-12345678").write_text("{")
    with storage_warnings() as warnings:
        assert len(_seeds(run)) == 15
        assert run.list_parts() == paths
    assert warnings == []  # a temporary is not a corrupt part
    assert len(temp_files(tmp_path / "run")) == 2  # a reader never deletes them
    with RunLock(run, heartbeat_s=None):
        assert temp_files(tmp_path / "run") == []




def test_sigkill_during_a_part_write_leaves_the_complete_file_or_none(tmp_path):
    run = RunDir(tmp_path / "run")
    first = run.append_evaluations(make_rows(0, 5))
    ev = tmp_path / "run" / "evaluations"
    child = start_child(CHILD_APPEND, str(tmp_path / "run"), "4000", "plain")
    assert child.stdout.readline().strip() == "ready"
    seen = None
    deadline = time.monotonic() + 60
    while seen is None and child.poll() is None and time.monotonic() < deadline:
        tmps = [n for n in os.listdir(ev) if ".tmp-" in n]
        if tmps:
            seen = (tmps[0], os.stat(ev / tmps[0]).st_size if (ev / tmps[0]).exists() else -1)
            child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert seen is not None, "the child finished before its temporary file was seen"
    assert child.returncode == -signal.SIGKILL
    parts = RunDir(tmp_path / "run").list_parts()
    with storage_warnings() as warnings:
        n = RunDir(tmp_path / "run").read_evaluations().num_rows
    assert warnings == []
    if parts == [first]:
        # Killed before the rename: the partial temporary is all there is, and it is ignored.
        assert n == 5
        print(f"killed mid-write: temporary {seen[0]} was {seen[1]} bytes when killed")
    else:
        # Killed just after the rename: the part is complete.
        assert len(parts) == 2 and n == 4005
        print("killed after the rename: the part is complete")
    with RunLock(tmp_path / "run", heartbeat_s=None):
        assert temp_files(tmp_path / "run") == []


def test_sigxfsz_mid_write_kills_the_writer_and_no_partial_part_appears(tmp_path):
    """RLIMIT_FSIZE = 1 MiB with SIGXFSZ's default action: the kernel kills the child the
    moment its write of an ~8 MB part crosses 1 MiB: a crash at a known point mid-write."""
    run = RunDir(tmp_path / "run")
    first = run.append_evaluations(make_rows(0, 5))
    r = run_child(CHILD_APPEND, str(tmp_path / "run"), "1000", "sigxfsz")
    assert r.returncode == -signal.SIGXFSZ, r.stderr[-2000:]
    tmps = temp_files(tmp_path / "run")
    assert len(tmps) == 1 and (tmp_path / "run" / tmps[0]).stat().st_size == 1 << 20
    assert RunDir(tmp_path / "run").list_parts() == [first]
    assert _seeds(run) == [1000 + i for i in range(5)]
    with RunLock(tmp_path / "run", heartbeat_s=None):
        assert temp_files(tmp_path / "run") == []
    shutil.rmtree(tmp_path / "run")


def test_no_single_byte_flip_changes_the_rows_unnoticed(tmp_path):
    """Flip every 11th byte of a part, one at a time: each flip is either detected (the part
    is refused) or leaves the decoded rows exactly as written (e.g. a flip in page-header
    statistics). Never different rows passed off as good ones."""
    from searchd.storage import verify_part
    from searchd.storage.rundir import CORRUPT_ERRORS

    run = RunDir(tmp_path / "run")
    rel = run.append_evaluations(make_rows(20, 6))
    data = (tmp_path / "run" / rel).read_bytes()
    want = verify_part(data, rel)
    outcomes = {"detected": 0, "same rows": 0}
    for pos in range(0, len(data), 11):
        flipped = bytearray(data)
        flipped[pos] ^= 0xFF
        try:
            got = verify_part(bytes(flipped), rel)
        except CORRUPT_ERRORS:  # exactly what read_evaluations treats as corrupt
            outcomes["detected"] += 1
            continue
        assert got.equals(want), f"byte {pos}: changed rows were not detected"
        outcomes["same rows"] += 1
    assert outcomes["detected"] > 0.7 * (len(data) // 11)
    print(outcomes)
