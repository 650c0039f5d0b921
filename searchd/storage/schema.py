"""The Parquet schema of evaluation rows: one row per scored candidate.

``EVALUATION_SCHEMA`` is explicit (no type inference from data), carries
``SCHEMA_VERSION`` in its metadata and in a ``schema_version`` column, and is what every part
file under ``<run>/evaluations/`` holds. ``rows_to_table`` validates plain rows (dicts) into
a table, ``table_to_rows`` turns a table back into plain rows, and ``conform_table`` checks
a table read from disk (version, columns, types, required values) and upgrades an older one.

The ``schedule`` column (version 2) holds the whole candidate as JSON, ``Schedule.to_dict()``
with its provenance (``meta``): whatever a ``Schedule`` carries round-trips through it without
a schema change, so per-step data added to schedules later needs no new column. The typed
columns (``sigmas``, ``model_ids``, ``solver``, ``n_steps``, ``origin``, ``parent_ids``) repeat
what readers query most. A row given without ``schedule`` gets it from those columns.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from searchd.storage.errors import SchemaVersionError

SCHEMA_VERSION = 2
STATUSES = ("ok", "failed", "pruned")

# Keys of the schema's (and each part file's) key-value metadata.
META_SCHEMA_VERSION = b"searchd.schema_version"
META_TABLE = b"searchd.table"


def _f(name: str, type_: pa.DataType, doc: str, nullable: bool = False) -> pa.Field:
    return pa.field(name, type_, nullable=nullable, metadata={b"doc": doc.encode()})


EVALUATION_SCHEMA = pa.schema(
    [
        _f("schema_version", pa.int32(), "version of this schema the row was written under"),
        _f("run_id", pa.string(), "id of the search run"),
        _f("candidate_id", pa.string(), "Schedule content hash (solver, sigmas, model ids)"),
        _f("generation", pa.int32(), "generation (or batch) the candidate was scored in"),
        _f("trial_id", pa.string(), "Ray Tune (sub-)trial id"),
        _f("origin", pa.string(), "random/mutation/crossover/baseline/bayes/gits/ld3/..."),
        _f("parent_ids", pa.list_(pa.string()), "candidate ids of the parents (may be empty)"),
        _f("solver", pa.string(), "ODE solver name"),
        _f("n_steps", pa.int32(), "number of solver steps N (len(sigmas) - 1)"),
        _f("nfe", pa.int32(), "network evaluations the schedule actually cost"),
        _f("sigmas", pa.list_(pa.float64()), "noise levels, N+1, strictly decreasing"),
        _f("model_ids", pa.list_(pa.int64()), "zoo member per step (null: one model)", True),
        _f("schedule", pa.string(), "the candidate as JSON: Schedule.to_dict(), meta included"),
        _f("metric", pa.string(), "name of the search objective"),
        _f("value", pa.float64(), "objective value; null when failed or not finite", True),
        _f("metrics", pa.map_(pa.string(), pa.float64()), "all metrics, name -> value"),
        _f("n_samples", pa.int32(), "samples the metrics were computed on"),
        _f("seed_base", pa.int64(), "sample i used seed seed_base + i"),
        _f("fidelity", pa.int32(), "fidelity level for multi-fidelity searches", True),
        _f("status", pa.string(), "ok / failed / pruned"),
        _f("error", pa.string(), "error text of a failed candidate", True),
        _f("wall_s", pa.float64(), "wall-clock seconds the evaluation took"),
        _f("worker", pa.string(), "evaluator actor that scored it"),
        _f("node", pa.string(), "host name of that actor"),
        _f("time", pa.timestamp("us", tz="UTC"), "when the row was made (UTC)"),
    ],
    metadata={META_SCHEMA_VERSION: str(SCHEMA_VERSION).encode(), META_TABLE: b"evaluations"},
)

FIELD_NAMES: tuple[str, ...] = tuple(EVALUATION_SCHEMA.names)
NULLABLE_FIELDS: frozenset[str] = frozenset(f.name for f in EVALUATION_SCHEMA if f.nullable)
REQUIRED_FIELDS: tuple[str, ...] = tuple(
    f.name for f in EVALUATION_SCHEMA
    if not f.nullable and f.name not in ("schema_version", "schedule")
)



def utc_now() -> datetime:
    """The current time, timezone-aware UTC, at microsecond precision."""
    return datetime.now(timezone.utc)


def schedule_json(row: Mapping[str, Any]) -> str:
    """The ``schedule`` column of a row that lacks it, from its typed columns (the schedule
    with the provenance a version-1 row has: origin and parents). Its id is not recomputed:
    ``Schedule.from_dict`` checks the content against ``candidate_id``."""
    meta: dict[str, Any] = {"origin": row.get("origin"), "parents": list(row.get("parent_ids")
                                                                          or [])}
    ids = row.get("model_ids")
    return json.dumps({
        "id": row.get("candidate_id"),
        "sigmas": [float(x) for x in row.get("sigmas") or []],
        "model_ids": None if ids is None else [int(m) for m in ids],
        "solver": row.get("solver"),
        "meta": meta,
    })


def _upgrade_1_to_2(table: pa.Table) -> pa.Table:
    """Version 1 -> 2: the ``schedule`` column, made from the typed columns."""
    rows = table.select(["candidate_id", "sigmas", "model_ids", "solver", "origin",
                         "parent_ids"]).to_pylist()
    col = pa.array([schedule_json(r) for r in rows], type=pa.string())
    at = table.column_names.index("model_ids") + 1
    table = table.add_column(at, "schedule", col)
    versions = pa.array([2] * table.num_rows, type=pa.int32())
    return table.set_column(table.column_names.index("schema_version"), "schema_version",
                            versions)


# Upgrades of tables written under an older schema version: UPGRADES[v] maps a table of
# version v to one of version v + 1.
UPGRADES: dict[int, Callable[[pa.Table], pa.Table]] = {1: _upgrade_1_to_2}


def _normalize_row(i: int, row: Mapping[str, Any]) -> dict[str, Any]:
    """Check one row's fields and values; return it as a dict in schema order."""
    if not isinstance(row, Mapping):
        raise ValueError(f"row {i}: expected a dict, got {type(row).__name__}")
    unknown = sorted(set(row) - set(FIELD_NAMES))
    if unknown:
        raise ValueError(f"row {i}: unknown field(s) {unknown}; the schema has {list(FIELD_NAMES)}")
    missing = [k for k in REQUIRED_FIELDS if row.get(k) is None]
    if missing:
        raise ValueError(f"row {i}: missing required field(s) {missing}")
    out = {name: row.get(name) for name in FIELD_NAMES}
    if out["schedule"] is None:
        out["schedule"] = schedule_json(out)
    if out["schema_version"] is None:
        out["schema_version"] = SCHEMA_VERSION
    elif out["schema_version"] != SCHEMA_VERSION:
        raise ValueError(
            f"row {i}: schema_version = {out['schema_version']!r}; this searchd writes version "
            f"{SCHEMA_VERSION} only"
        )
    cid = out["candidate_id"]
    if out["status"] not in STATUSES:
        raise ValueError(
            f"row {i} (candidate {cid}): status = {out['status']!r}; expected one of {STATUSES}"
        )
    for name in ("sigmas", "parent_ids", "model_ids"):
        v = out[name]
        if v is None:
            continue
        if isinstance(v, str | bytes) or not isinstance(v, Iterable):
            raise ValueError(f"row {i} (candidate {cid}): {name} must be a sequence, got {v!r}")
        out[name] = list(v)
        if any(x is None for x in out[name]):
            raise ValueError(f"row {i} (candidate {cid}): {name} contains null entries")
    try:
        out["sigmas"] = [float(s) for s in out["sigmas"]]
    except (TypeError, ValueError) as e:
        raise ValueError(f"row {i} (candidate {cid}): sigmas are not numbers: {e}") from None
    if not out["sigmas"]:
        raise ValueError(f"row {i} (candidate {cid}): sigmas is empty")
    if out["n_steps"] != len(out["sigmas"]) - 1:
        raise ValueError(
            f"row {i} (candidate {cid}): n_steps = {out['n_steps']!r} but sigmas has "
            f"{len(out['sigmas'])} entries (expected n_steps + 1)"
        )
    if out["model_ids"] is not None and len(out["model_ids"]) != out["n_steps"]:
        raise ValueError(
            f"row {i} (candidate {cid}): model_ids has {len(out['model_ids'])} entries; "
            f"expected one per step ({out['n_steps']})"
        )
    value = out["value"]
    if value is not None:
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"row {i} (candidate {cid}): value = {value!r} is not a number"
            ) from None
        if not math.isfinite(value):
            raise ValueError(
                f"row {i} (candidate {cid}): value = {value!r} is not finite; "
                "store None (null) for a candidate without a finite objective value"
            )
        out["value"] = value
    metrics = out["metrics"]
    if not isinstance(metrics, Mapping):
        raise ValueError(f"row {i} (candidate {cid}): metrics must be a mapping name -> float")
    try:
        out["metrics"] = {str(k): float(v) for k, v in metrics.items()}
    except (TypeError, ValueError) as e:
        raise ValueError(f"row {i} (candidate {cid}): metrics values must be floats: {e}") from None
    t = out["time"]
    if not isinstance(t, datetime) or t.tzinfo is None or t.utcoffset() is None:
        raise ValueError(
            f"row {i} (candidate {cid}): time = {t!r} must be a timezone-aware datetime "
            "(e.g. datetime.now(timezone.utc))"
        )
    return out


def rows_to_table(rows: Iterable[Mapping[str, Any]]) -> pa.Table:
    """Validate rows and build a table of exactly ``EVALUATION_SCHEMA``.

    A row is a dict with the schema's field names (``schema_version`` and ``schedule`` may
    be left out; they are filled in). Raises ``ValueError`` naming the row, the candidate
    and the field: unknown or missing fields, a status outside ``STATUSES``, n_steps not
    matching the sigmas, a non-finite ``value``, a naive ``time``, or a value that does not
    convert to its column type.
    """
    norm = [_normalize_row(i, r) for i, r in enumerate(rows)]
    arrays = []
    for f in EVALUATION_SCHEMA:
        values = [r[f.name] for r in norm]
        if f.name == "metrics":
            values = [list(m.items()) for m in values]
        try:
            arrays.append(pa.array(values, type=f.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, OverflowError) as e:
            raise ValueError(f"field {f.name!r} ({f.type}): {e}") from None
    return pa.Table.from_arrays(arrays, schema=EVALUATION_SCHEMA)


def table_to_rows(table: pa.Table) -> list[dict[str, Any]]:
    """Plain rows of an evaluations table: lists, dicts for ``metrics``, aware datetimes."""
    rows = table.to_pylist()
    for r in rows:
        if "metrics" in r and r["metrics"] is not None:
            r["metrics"] = dict(r["metrics"])
    return rows


def empty_table() -> pa.Table:
    """An evaluations table with no rows."""
    return EVALUATION_SCHEMA.empty_table()


def table_schema_version(metadata: Mapping[bytes, bytes] | None) -> int | None:
    """The schema version recorded in a table's (or file's) key-value metadata, if any."""
    if not metadata or META_SCHEMA_VERSION not in metadata:
        return None
    raw = metadata[META_SCHEMA_VERSION]
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"schema version {raw!r} in the metadata is not an integer") from None


def check_version(version: int, source: str) -> None:
    """Refuse a schema version this searchd cannot read (newer, or older without upgrade)."""
    if version > SCHEMA_VERSION:
        raise SchemaVersionError(
            f"{source} has evaluation schema version {version}, newer than this searchd reads "
            f"(version {SCHEMA_VERSION}); upgrade searchd to read this run",
            path=source,
        )
    for v in range(version, SCHEMA_VERSION):
        if v not in UPGRADES:
            raise SchemaVersionError(
                f"{source} has evaluation schema version {version}; this searchd reads version "
                f"{SCHEMA_VERSION} and has no upgrade from version {v}",
                path=source,
            )


def conform_table(table: pa.Table, version: int, source: str) -> pa.Table:
    """A stored table, upgraded to the current version and checked against the schema.

    Raises ``SchemaVersionError`` for a version that cannot be read and ``ValueError`` for a
    table that does not match the schema (missing or extra columns, types that do not cast,
    nulls in required columns, unknown status values, a wrong ``schema_version`` column).
    """
    check_version(version, source)
    for v in range(version, SCHEMA_VERSION):
        table = UPGRADES[v](table)
    names = set(table.column_names)
    missing = [n for n in FIELD_NAMES if n not in names]
    extra = sorted(names - set(FIELD_NAMES))
    if missing or extra:
        raise ValueError(
            f"{source}: columns do not match the schema (missing {missing}, extra {extra})"
        )
    table = table.select(list(FIELD_NAMES))
    if not table.schema.equals(EVALUATION_SCHEMA, check_metadata=False):
        try:
            table = table.cast(EVALUATION_SCHEMA)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as e:
            raise ValueError(f"{source}: column types do not match the schema: {e}") from None
    table = table.replace_schema_metadata(EVALUATION_SCHEMA.metadata)
    for f in EVALUATION_SCHEMA:
        if not f.nullable and table.column(f.name).null_count:
            raise ValueError(f"{source}: required column {f.name!r} has null values")
    if table.num_rows:
        ok = pc.all(pc.is_in(table.column("status"), value_set=pa.array(STATUSES))).as_py()
        if not ok:
            bad = sorted(set(table.column("status").to_pylist()) - set(STATUSES))
            raise ValueError(f"{source}: unknown status values {bad}")
        sv = pc.unique(table.column("schema_version")).to_pylist()
        if sv != [SCHEMA_VERSION]:
            raise ValueError(
                f"{source}: schema_version column holds {sv}, expected [{SCHEMA_VERSION}]"
            )
    return table
