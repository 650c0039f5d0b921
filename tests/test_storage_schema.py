"""The evaluation schema: round trips through Parquet, validation, schema versions."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_storage_support import make_row, make_rows

from searchd.schedule import Schedule
from searchd.storage import (
    EVALUATION_SCHEMA,
    SCHEMA_VERSION,
    RunDir,
    SchemaVersionError,
    rows_to_table,
    table_to_rows,
)
from searchd.storage.rundir import META_ROWS


def test_schema_is_explicit_and_versioned():
    assert SCHEMA_VERSION == 2
    assert EVALUATION_SCHEMA.metadata[b"searchd.schema_version"] == b"2"
    types = {f.name: f.type for f in EVALUATION_SCHEMA}
    assert types["schema_version"] == pa.int32()
    assert types["schedule"] == pa.string()
    assert types["sigmas"] == pa.list_(pa.float64())
    assert types["model_ids"] == pa.list_(pa.int64())
    assert types["metrics"] == pa.map_(pa.string(), pa.float64())
    assert types["time"] == pa.timestamp("us", tz="UTC")
    nullable = {f.name for f in EVALUATION_SCHEMA if f.nullable}
    assert nullable == {"model_ids", "value", "fidelity", "error"}


def test_rows_round_trip_through_parquet_exactly(tmp_path):
    rows = make_rows(0, 7) + [make_row(7, status="failed"), make_row(8, status="pruned")]
    run = RunDir(tmp_path / "run")
    run.append_evaluations(rows[:4])
    run.append_evaluations(rows[4:])
    back = table_to_rows(RunDir(tmp_path / "run").read_evaluations())
    assert len(back) == len(rows)
    for want, got in zip(rows, back):
        assert got == {"schema_version": SCHEMA_VERSION, **want}
        # Floats are stored bit-exactly: the sigmas read back hash to the same candidate.
        ids = got["model_ids"]
        same = Schedule(got["sigmas"], model_ids=ids, solver=got["solver"])
        assert same.id == want["candidate_id"]


def test_a_row_without_its_schedule_gets_it_from_the_typed_columns():
    d = make_row(3)
    bare = {k: v for k, v in d.items() if k != "schedule"}
    assert table_to_rows(rows_to_table([bare])) == table_to_rows(rows_to_table([d]))
    stored = json.loads(table_to_rows(rows_to_table([bare]))[0]["schedule"])
    s = Schedule.from_dict(stored)  # the id checks the content
    assert s.meta == {"origin": d["origin"], "parents": d["parent_ids"]}


def test_version_1_parts_are_upgraded_with_their_schedule(tmp_path):
    """A part written before the ``schedule`` column (version 1) reads back as version 2."""
    rows = [{k: v for k, v in r.items() if k != "schedule"} for r in make_rows(0, 3)]
    v2 = rows_to_table(rows)
    v1 = v2.drop_columns(["schedule"]).set_column(
        0, "schema_version", pa.array([1] * 3, type=pa.int32()))
    meta = dict(EVALUATION_SCHEMA.metadata)
    meta[b"searchd.schema_version"] = b"1"
    meta[META_ROWS] = b"3"
    sink = pa.BufferOutputStream()
    pq.write_table(v1.replace_schema_metadata(meta), sink)
    run = RunDir(tmp_path / "run")
    run.write_bytes("evaluations/part-000001-0123abcd-n3.parquet", sink.getvalue().to_pybytes())
    back = table_to_rows(run.read_evaluations())
    assert back == table_to_rows(v2)


def test_non_finite_metrics_survive_but_value_must_be_finite():
    t = rows_to_table([make_row(0, metrics={"fid": math.inf, "kid": -math.inf})])
    assert table_to_rows(t)[0]["metrics"] == {"fid": math.inf, "kid": -math.inf}
    with pytest.raises(ValueError, match=r"value = nan is not finite"):
        rows_to_table([make_row(0, value=math.nan)])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"status": "done"}, r"row 0 \(candidate [0-9a-f]{16}\): status = 'done'; expected one of"),
        ({"run_id": None}, r"row 0: missing required field\(s\) \['run_id'\]"),
        ({"colour": "red"}, r"unknown field\(s\) \['colour'\]"),
        ({"n_steps": 99}, r"n_steps = 99 but sigmas has \d+ entries"),
        ({"model_ids": [0]}, r"model_ids has 1 entries; expected one per step"),
        ({"time": datetime(2026, 1, 1)}, r"must be a timezone-aware datetime"),
        ({"nfe": "seven"}, r"field 'nfe' \(int32\)"),
        ({"schema_version": 3}, r"schema_version = 3; this searchd writes version 2 only"),
        ({"sigmas": [1.0, None]}, r"sigmas contains null entries"),
    ],
)
def test_invalid_rows_are_refused_with_a_clear_message(tmp_path, override, message):
    bad = {**make_row(0), **override}
    with pytest.raises(ValueError, match=message):
        rows_to_table([bad])
    # A batch with one bad row writes nothing.
    run = RunDir(tmp_path / "run")
    with pytest.raises(ValueError, match=message.replace("row 0", "row 1")):
        run.append_evaluations([make_row(1), bad])
    assert run.list_parts() == []


def _write_part_with_version(run: RunDir, version: int) -> str:
    """A part file as a future (or past) searchd would write it: same layout, other version."""
    table = rows_to_table(make_rows(0, 2))
    meta = dict(EVALUATION_SCHEMA.metadata)
    meta[b"searchd.schema_version"] = str(version).encode()
    meta[META_ROWS] = b"2"
    sink = pa.BufferOutputStream()
    pq.write_table(table.replace_schema_metadata(meta), sink)
    rel = "evaluations/part-000001-0123abcd-n2.parquet"
    run.write_bytes(rel, sink.getvalue().to_pybytes())
    return rel


def test_newer_schema_version_is_refused_not_moved_aside(tmp_path):
    run = RunDir(tmp_path / "run")
    rel = _write_part_with_version(run, SCHEMA_VERSION + 1)
    with pytest.raises(SchemaVersionError, match=r"schema version 3, newer than this searchd"):
        run.read_evaluations()
    assert run.list_parts() == [rel]  # still there: the file is fine, searchd is too old


def test_older_schema_version_without_upgrade_is_refused(tmp_path):
    run = RunDir(tmp_path / "run")
    _write_part_with_version(run, 0)
    with pytest.raises(SchemaVersionError, match=r"no upgrade from version 0"):
        run.read_evaluations()


def test_newer_searcher_state_is_refused(tmp_path):
    run = RunDir(tmp_path / "run")
    run.save_searcher_state(0, {"x": 1})
    run.write_json("searcher/state-000001.json",
                   {"schema_version": 9, "generation": 1, "state": {"x": 2}})
    with pytest.raises(SchemaVersionError, match=r"newer searchd"):
        run.latest_searcher_state()


def test_time_is_utc_microseconds():
    t = datetime(2026, 5, 6, 7, 8, 9, 654321, tzinfo=timezone.utc)
    back = table_to_rows(rows_to_table([make_row(0, time=t)]))[0]["time"]
    assert back == t and back.utcoffset().total_seconds() == 0
