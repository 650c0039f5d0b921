"""RunDir on the local disk: layout, atomic writes, part ordering, searcher states, URIs."""

from __future__ import annotations

import json
import os
import time

import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from test_storage_support import make_rows, run_child, storage_warnings, temp_files

from searchd.storage import RunDir, table_to_rows
from searchd.storage.rundir import PART_RE, open_location


def test_layout_and_generic_files(tmp_path):
    run = RunDir(tmp_path / "run")
    assert not run.exists()
    run.write_text("config.yaml", "seed: 1\n")
    run.write_json("best.json", {"fid": 1.5, "sigmas": [80.0, 0.0]})
    run.write_bytes("report/fid.png", b"\x89PNG...")
    assert run.read_text("config.yaml") == "seed: 1\n"
    assert run.read_json("best.json") == {"fid": 1.5, "sigmas": [80.0, 0.0]}
    assert (tmp_path / "run" / "report" / "fid.png").read_bytes() == b"\x89PNG..."
    assert run.exists("report") and run.exists("best.json") and not run.exists("nope.json")
    assert run.listdir() == ["best.json", "config.yaml", "report"]
    assert run.local_path("best.json") == str(tmp_path / "run" / "best.json")
    with pytest.raises(FileNotFoundError):
        run.read_text("missing.yaml")
    with pytest.raises(ValueError, match="not a path inside the run directory"):
        run.write_text("../escape.txt", "x")
    with pytest.raises(ValueError, match="not a path inside the run directory"):
        run.write_text("/etc/passwd", "x")


def test_overwrite_is_atomic_and_leaves_no_temporary(tmp_path):
    run = RunDir(tmp_path / "run")
    run.write_json("best.json", {"v": 1})
    ino = os.stat(tmp_path / "run" / "best.json").st_ino
    run.write_json("best.json", {"v": 2})
    assert run.read_json("best.json") == {"v": 2}
    # A new inode: the file was replaced by a rename, never rewritten in place.
    assert os.stat(tmp_path / "run" / "best.json").st_ino != ino
    assert temp_files(tmp_path) == []


def test_parts_are_numbered_in_order_and_carry_their_row_count(tmp_path):
    run = RunDir(tmp_path / "run")
    sizes = [1, 3, 2, 5, 1, 1, 2, 4, 1, 1, 3, 2]
    paths = []
    start = 0
    for n in sizes:
        paths.append(run.append_evaluations(make_rows(start, n)))
        start += n
    assert run.list_parts() == paths
    for i, (rel, n) in enumerate(zip(paths, sizes), start=1):
        m = PART_RE.match(rel.split("/")[-1])
        assert m and int(m["seq"]) == i and int(m["rows"]) == n
        md = pq.ParquetFile(tmp_path / "run" / rel).metadata
        assert md.num_rows == n and md.metadata[b"searchd.rows"] == str(n).encode()
    table = RunDir(tmp_path / "run").read_evaluations()
    assert table.column("seed_base").to_pylist() == [1000 + i for i in range(start)]
    assert run.append_evaluations([]) is None
    assert len(run.list_parts()) == len(sizes)


def test_part_numbering_continues_after_a_restart(tmp_path):
    RunDir(tmp_path / "run").append_evaluations(make_rows(0, 2))
    RunDir(tmp_path / "run").append_evaluations(make_rows(2, 2))
    again = RunDir(tmp_path / "run")
    rel = again.append_evaluations(make_rows(4, 1))
    assert rel.startswith("evaluations/part-000003-")
    assert [r["seed_base"] for r in table_to_rows(again.read_evaluations())] == [
        1000, 1001, 1002, 1003, 1004
    ]


def test_searcher_state_save_and_latest(tmp_path):
    run = RunDir(tmp_path / "run")
    assert run.latest_searcher_state() is None
    for gen in (0, 1, 2, 10):
        run.save_searcher_state(gen, {"gen": gen, "population": [[1.0, 0.5]], "best": float("inf")})
    # The three newest are kept (each holds the whole history); keep=None keeps all.
    assert run.searcher_state_generations() == [1, 2, 10]
    run.save_searcher_state(11, {"gen": 11}, keep=None)
    run.save_searcher_state(0, {"gen": 0}, keep=None)
    assert run.searcher_state_generations() == [0, 1, 2, 10, 11]
    run.save_searcher_state(10, {"gen": 10, "population": [[1.0, 0.5]], "best": float("inf")},
                            keep=2)
    assert run.searcher_state_generations() == [10, 11]
    (tmp_path / "run" / "searcher" / "state-000011.json").unlink()
    gen, state = RunDir(tmp_path / "run").latest_searcher_state()
    assert gen == 10 and state == {"gen": 10, "population": [[1.0, 0.5]], "best": float("inf")}
    doc = json.loads((tmp_path / "run" / "searcher" / "state-000010.json").read_text())
    assert doc["generation"] == 10 and doc["schema_version"] == 1


def test_unreadable_latest_state_falls_back_to_the_previous_one(tmp_path):
    run = RunDir(tmp_path / "run")
    run.save_searcher_state(3, {"gen": 3})
    run.save_searcher_state(4, {"gen": 4})
    path = tmp_path / "run" / "searcher" / "state-000004.json"
    path.write_bytes(path.read_bytes()[:20])  # truncated by some outside tool
    with storage_warnings() as warnings:
        assert run.latest_searcher_state() == (3, {"gen": 3})
    assert any("state-000004.json is unreadable" in w.getMessage() for w in warnings)
    assert (tmp_path / "run" / "searcher" / "corrupt" / "state-000004.json").exists()
    assert run.searcher_state_generations() == [3]


def test_s3_uri_with_region_or_endpoint_builds_the_filesystem_without_network():
    t = time.monotonic()
    fs, base, uri = open_location(
        "s3://bucket/runs/a?region=eu-west-3&endpoint_override=127.0.0.1:9&scheme=http"
    )
    assert isinstance(fs, pafs.S3FileSystem)
    assert fs.region == "eu-west-3" and base == "bucket/runs/a" and uri == "s3://bucket/runs/a"
    fs, base, _ = open_location("s3://bucket/r?endpoint_override=127.0.0.1:9&scheme=http")
    assert fs.region == "us-east-1" and base == "bucket/r"
    # Port 9 (discard) is closed: a network call would fail, not return; none is made.
    assert time.monotonic() - t < 1.0
    with pytest.raises(ValueError, match=r"unknown query key\(s\) \['regoin'\]"):
        open_location("s3://bucket/r?regoin=us-east-1")
    with pytest.raises(ValueError, match="scheme must be http or https"):
        open_location("s3://bucket/r?region=us-east-1&scheme=ftp")


def test_explicit_filesystem_and_file_uri(tmp_path):
    run = RunDir(f"file://{tmp_path}/a")
    run.write_text("x.txt", "1")
    assert (tmp_path / "a" / "x.txt").read_text() == "1"
    sub = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    other = RunDir("b", filesystem=sub)
    other.write_text("y.txt", "2")
    assert other.read_text("y.txt") == "2" and (tmp_path / "b" / "y.txt").read_text() == "2"
    assert other.is_local  # the subtree is unwrapped: local, fsync'd writes


def test_other_filesystems_round_trip_and_leave_no_temporary():
    fsspec = pytest.importorskip("fsspec")
    mem = fsspec.filesystem("memory")
    run = RunDir("bucket/run", filesystem=pafs.PyFileSystem(pafs.FSSpecHandler(mem)))
    assert not run.is_local and not run.is_object_store
    rel = run.append_evaluations(make_rows(0, 3))
    run.write_json("best.json", {"v": 1})
    names = sorted(p.rsplit("/", 1)[-1] for p in mem.find("/bucket/run"))
    assert names == sorted(["best.json", rel.split("/")[-1]])  # no temporary left behind
    assert run.read_evaluations().num_rows == 3


def test_storage_imports_neither_torch_nor_ray():
    r = run_child("import sys, searchd.storage; "
                  "print(sorted(m for m in ('torch', 'ray', 'pandas') if m in sys.modules))")
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "[]"
