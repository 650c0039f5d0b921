"""Run directories: the evaluation schema, atomic writes, integrity checks, the run lock.

``searchd.storage`` depends on pyarrow only (no torch, no ray), so a run can be read
anywhere pyarrow installs. See ``docs/notes-storage.md`` for the decisions and
``docs/reading-runs.md`` for reading a run with pyarrow, pandas and duckdb.
"""

from searchd.storage.errors import LockError, SchemaVersionError, StorageError
from searchd.storage.lock import LockInfo, RunLock, read_lock
from searchd.storage.rundir import (
    BEST_FILE,
    CONFIG_FILE,
    CORRUPT_DIR,
    EVALUATIONS_DIR,
    LOCK_FILE,
    LOG_FILE,
    REPORT_DIR,
    SEARCHER_DIR,
    RunDir,
    open_location,
    verify_part,
)
from searchd.storage.schema import (
    EVALUATION_SCHEMA,
    SCHEMA_VERSION,
    STATUSES,
    rows_to_table,
    table_to_rows,
)

__all__ = [
    "BEST_FILE",
    "CONFIG_FILE",
    "CORRUPT_DIR",
    "EVALUATIONS_DIR",
    "EVALUATION_SCHEMA",
    "LOCK_FILE",
    "LOG_FILE",
    "REPORT_DIR",
    "SCHEMA_VERSION",
    "SEARCHER_DIR",
    "STATUSES",
    "LockError",
    "LockInfo",
    "RunDir",
    "RunLock",
    "SchemaVersionError",
    "StorageError",
    "open_location",
    "read_lock",
    "rows_to_table",
    "table_to_rows",
    "verify_part",
]
