"""``RunDir``: a search's run directory, on a local disk or an object store.

Layout (DESIGN.md, "Storage"; paths relative to the run directory)::

    config.yaml                              resolved configuration, as run
    evaluations/part-<seq>-<uuid8>-n<rows>.parquet   append-only evaluation rows
    evaluations/part-<seq>-<uuid8>-n<rows>-from<first>.parquet   parts <first>..<seq> compacted
    evaluations/_corrupt/                     parts that failed the integrity check
    searcher/state-<gen>.json                searcher state after each generation
    best.json                                winner, baselines, held-out scores
    report/                                  plots
    log.txt                                  the driver's log (local runs)
    LOCK                                     who is running the search (see lock.py)

Writes are atomic. Locally: the bytes go to a hidden temporary file in the same directory
(``.<name>.tmp-<uuid8>``), are fsync'd, renamed over the final name with ``os.replace``, and
the directory is fsync'd; a crash leaves the old file (or none) plus an ignorable temporary.
On an object store a PUT of the final key is itself atomic (the object appears whole or not
at all), so the final key is written directly; there is no rename.

Part files carry their row count twice: in the file name (``-n<rows>``) and in the Parquet
key-value metadata; their pages carry CRC checksums. Reading checks the footer, both counts
and the checksums, and moves a part that fails to ``evaluations/_corrupt/`` with a warning.

Compaction (``compact_parts``) keeps the number of parts bounded: above ``COMPACT_ABOVE``
parts, the listed parts are merged, in order, into one part named after the range of part
numbers it holds (``-from<first>``), written atomically; then the parts it holds are deleted.
A part whose number lies in the range of a compacted part is not listed (nor read), so a
kill between the write and the deletions leaves the same rows, once; the next compaction
deletes what is left. A compacted part that fails its check is moved aside like any part,
and the parts it held (if still there) are listed again.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from searchd import faults
from searchd.storage.errors import SchemaVersionError, StorageError, one_line
from searchd.storage.schema import (
    EVALUATION_SCHEMA,
    META_SCHEMA_VERSION,
    SCHEMA_VERSION,
    check_version,
    conform_table,
    empty_table,
    rows_to_table,
    table_schema_version,
)

logger = logging.getLogger("searchd.storage")

# Object stores: how long an operation is retried while the store cannot be reached.
RETRY_ENV = "SEARCHD_STORAGE_RETRY_S"
DEFAULT_RETRY_S = 300.0
_RETRY_FIRST_S, _RETRY_MAX_S = 1.0, 30.0
# What marks an object-store error as transient (AWS SDK error names as pyarrow reports
# them, and the curl layer's): the store is down or overloaded, not the request wrong.
_TRANSIENT = re.compile(
    r"NETWORK_CONNECTION|curlCode|Could not connect|Connection reset|timed out|"
    r"SLOW_DOWN|SERVICE_UNAVAILABLE|INTERNAL_FAILURE|REQUEST_TIMEOUT|THROTTLING|"
    r"HTTP response code: 5\d\d", re.I)
T = TypeVar("T")


def retry_limit() -> float:
    """Seconds an object-store operation is retried (``$SEARCHD_STORAGE_RETRY_S``, default
    300); ``ValueError`` (one line) for a value that is not a number >= 0."""
    text = os.environ.get(RETRY_ENV, "").strip()
    if not text:
        return DEFAULT_RETRY_S
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:  # also NaN
        raise ValueError(f"{RETRY_ENV} = {text!r}: give the seconds to retry an unreachable "
                         "object store, a number >= 0")
    return value


def is_transient(err: BaseException) -> bool:
    """Whether an object-store error says the store was unreachable or overloaded."""
    return bool(_TRANSIENT.search(str(err)))

CONFIG_FILE = "config.yaml"
BEST_FILE = "best.json"
REPORT_DIR = "report"
LOG_FILE = "log.txt"
EVALUATIONS_DIR = "evaluations"
CORRUPT_DIR = "evaluations/_corrupt"
SEARCHER_DIR = "searcher"
LOCK_FILE = "LOCK"

# Version of the searcher state documents (``searcher/state-<n>.json``).
STATE_VERSION = 1

# Key-value metadata of a part file, besides the schema version.
META_ROWS = b"searchd.rows"
META_SEQ = b"searchd.part_seq"

PART_RE = re.compile(r"^part-(?P<seq>\d{6,})-(?P<uid>[0-9a-f]{8})-n(?P<rows>\d+)"
                     r"(?:-from(?P<first>\d{6,}))?\.parquet$")
# More parts than this are merged into one (``RunDir.compact_parts``): a run of one part per
# batch otherwise grows without bound (a 20,000-candidate search of 24 per batch: 834 parts,
# each read, checked and listed again at every append).
COMPACT_ABOVE = 32
STATE_RE = re.compile(r"^state-(?P<gen>\d+)\.json$")
# Searcher states kept (the newest, and two to fall back on if it cannot be read).
KEEP_STATES = 3
TMP_MARK = ".tmp-"

# pyarrow filesystem type names of object stores (atomic PUT, no rename).
OBJECT_STORES = frozenset({"s3", "gcs", "abfs"})

# Query keys of an ``s3://`` URI that ``RunDir`` understands (everything else is refused).
S3_QUERY_KEYS = ("region", "endpoint_override", "scheme")

_WRITE_CHUNK = 1 << 20

# What checking a part's bytes (already in memory) raises for a corrupt part.
CORRUPT_ERRORS: tuple[type[BaseException], ...] = (
    pa.ArrowException, OSError, ValueError, KeyError, TypeError, IndexError,
)


def is_temp_name(name: str) -> bool:
    """Whether a file name is a temporary left by an atomic write (``.<name>.tmp-<uuid8>``)."""
    return name.startswith(".") and TMP_MARK in name


@dataclass(frozen=True)
class PartInfo:
    """A part file's name parsed: sequence number, expected row count, and the first part
    number it holds (``first < seq`` for a compacted part, else ``first == seq``)."""

    relpath: str
    seq: int
    rows: int
    first: int = -1

    def __post_init__(self) -> None:
        if self.first < 0:
            object.__setattr__(self, "first", self.seq)

    @classmethod
    def parse(cls, relpath: str) -> PartInfo | None:
        m = PART_RE.match(relpath.rsplit("/", 1)[-1])
        if m is None:
            return None
        first = int(m["first"]) if m["first"] is not None else int(m["seq"])
        if first > int(m["seq"]):
            return None
        return cls(relpath, int(m["seq"]), int(m["rows"]), first)

    def holds(self, other: PartInfo) -> bool:
        """Whether ``other``'s part numbers lie in this (compacted) part's wider range."""
        return (self.first <= other.first and other.seq <= self.seq
                and (self.first, self.seq) != (other.first, other.seq))


def _visible(parts: list[PartInfo]) -> list[PartInfo]:
    """The parts no compacted part of ``parts`` holds, in order (``parts`` is ordered)."""
    wide = [c for c in parts if c.first < c.seq]
    return [p for p in parts if not any(c.holds(p) for c in wide)]


# Locations ---------------------------------------------------------------------------------
def open_location(
    uri_or_path: str | os.PathLike[str], filesystem: pafs.FileSystem | None = None
) -> tuple[pafs.FileSystem, str, str]:
    """The filesystem, the base path inside it, and a display URI for a run location.

    - a local path (or ``file://``): the local filesystem;
    - ``s3://bucket/path?region=R&endpoint_override=HOST:PORT&scheme=http``: an
      ``S3FileSystem`` built from the query, with no network call. Without ``region`` and
      ``endpoint_override`` the bucket's region is looked up over the network (what pyarrow's
      ``FileSystem.from_uri`` does; offline, that fails after about 7 s);
    - any other URI (``gs://``, ``hdfs://``, ...): ``pyarrow.fs.FileSystem.from_uri``;
    - with an explicit ``filesystem``: the path (a URI's scheme and query are dropped) is used
      in that filesystem as it stands.
    """
    text = os.fspath(uri_or_path)
    if filesystem is not None:
        if "://" in text:
            parts = urlsplit(text)
            text = parts.netloc + parts.path
        display = text
        path = text.rstrip("/") or text
        # A SubTreeFileSystem is unwrapped, so that a local one gets local (fsync'd) writes.
        while isinstance(filesystem, pafs.SubTreeFileSystem):
            path = filesystem.base_path.rstrip("/") + "/" + path.lstrip("/")
            filesystem = filesystem.base_fs
        if isinstance(filesystem, pafs.LocalFileSystem):
            path = os.path.abspath(path)
        return filesystem, path.rstrip("/") or path, display
    if "://" not in text:
        path = os.path.abspath(os.path.expanduser(text))
        return pafs.LocalFileSystem(), path, path
    parts = urlsplit(text)
    scheme = parts.scheme.lower()
    if scheme == "file":
        path = os.path.abspath(unquote(parts.path))
        return pafs.LocalFileSystem(), path, path
    if scheme == "s3":
        return _open_s3(text)
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except (OSError, pa.ArrowException) as e:
        raise StorageError.from_os_error("open", text, e) from e
    return fs, path.rstrip("/"), text


def _open_s3(uri: str) -> tuple[pafs.FileSystem, str, str]:
    """An ``S3FileSystem`` from an ``s3://`` URI's query (region, endpoint_override, scheme)."""
    parts = urlsplit(uri)
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(query) - set(S3_QUERY_KEYS))
    if unknown:
        raise ValueError(f"{uri}: unknown query key(s) {unknown}; known: {list(S3_QUERY_KEYS)}")
    opts = {k: v[-1] for k, v in query.items()}
    bucket = parts.netloc
    if not bucket:
        raise ValueError(f"{uri}: no bucket; expected s3://bucket/path")
    key = parts.path.strip("/")
    base = f"{bucket}/{key}" if key else bucket
    display = f"s3://{base}"
    region = opts.get("region")
    if not region:
        if opts.get("endpoint_override"):
            # S3-compatible servers (MinIO, moto, Ceph) accept the default region.
            region = "us-east-1"
        else:
            try:
                region = pafs.resolve_s3_region(bucket)
            except (OSError, pa.ArrowException) as e:
                raise StorageError(
                    f"cannot find the region of bucket {bucket!r}; give it in the URI, e.g. "
                    f"s3://{base}?region=us-east-1 ({one_line(e)})",
                    path=display,
                ) from e
    kwargs: dict[str, Any] = {"region": region, "allow_delayed_open": True}
    if opts.get("endpoint_override"):
        kwargs["endpoint_override"] = opts["endpoint_override"]
    if opts.get("scheme"):
        if opts["scheme"] not in ("http", "https"):
            raise ValueError(f"{uri}: scheme must be http or https, got {opts['scheme']!r}")
        kwargs["scheme"] = opts["scheme"]
    # allow_delayed_open: a small object is sent as one PutObject when the stream closes
    # (instead of a multipart upload opened up front): one request, atomic. pyarrow < 21
    # does not take the option; writes there are multipart uploads (atomic on S3 as well).
    try:
        fs = pafs.S3FileSystem(**kwargs)
    except TypeError:
        del kwargs["allow_delayed_open"]
        fs = pafs.S3FileSystem(**kwargs)
    return fs, base, display


def _short_cause(err: BaseException) -> str:
    """The part of an object-store error that says what went wrong (its AWS error name)."""
    text = one_line(err)
    m = re.search(r"AWS Error \w+|curlCode: \d+, [^;]+", text)
    return m.group(0) if m else text[:200]


def _check_relpath(relpath: str) -> str:
    """A normalized relative path inside the run directory (no absolute path, no '..')."""
    rel = relpath.replace(os.sep, "/").strip("/")
    if relpath.startswith("/") or any(p in ("..",) for p in rel.split("/")):
        raise ValueError(f"{relpath!r} is not a path inside the run directory")
    return rel


def _fsync_dir(path: str) -> None:
    """Make a rename in ``path`` durable (filesystems that cannot fsync a directory are skipped)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# The run directory ----------------------------------------------------------------------------
class RunDir:
    """One search's run directory: atomic writes, evaluation parts, searcher states.

    ``RunDir(uri_or_path, filesystem=None)``; see ``open_location`` for the accepted forms.
    All methods take paths relative to the run directory (``"best.json"``,
    ``"report/fid.png"``). Write errors raise ``StorageError`` (one line: path and cause);
    reading a missing file raises ``FileNotFoundError``.
    """

    def __init__(
        self, uri_or_path: str | os.PathLike[str], filesystem: pafs.FileSystem | None = None
    ) -> None:
        self.filesystem, self.base, self.uri = open_location(uri_or_path, filesystem)
        # As given (an S3 URI keeps its query): what to open it again with, e.g. --resume.
        self.location = self.uri if filesystem is not None else os.fspath(uri_or_path)
        self.is_local = isinstance(self.filesystem, pafs.LocalFileSystem)
        # Object stores: a PUT is atomic and there is no rename (only copy + delete).
        self.is_object_store = self.filesystem.type_name in OBJECT_STORES
        self._verified: dict[str, pa.Table] = {}
        self.retry_s = retry_limit()
        self.retries = 0  # operations retried (object stores), for tests and reports

    def __repr__(self) -> str:
        return f"RunDir({self.uri!r})"

    def __str__(self) -> str:
        return self.uri

    # Paths -------------------------------------------------------------------------------------
    def full_path(self, relpath: str = "") -> str:
        """The path of ``relpath`` inside the filesystem (local: an absolute path)."""
        rel = _check_relpath(relpath)
        return f"{self.base}/{rel}" if rel else self.base

    def local_path(self, relpath: str = "") -> str | None:
        """The local path of ``relpath``, or None when the run is not on the local disk."""
        return self.full_path(relpath) if self.is_local else None

    def display(self, relpath: str = "") -> str:
        """``relpath`` as a URI (or local path) for messages."""
        rel = _check_relpath(relpath)
        return f"{self.uri.rstrip('/')}/{rel}" if rel else self.uri

    # Retries (object stores) ---------------------------------------------------------------
    def _retrying(self, action: str, what: str, fn: Callable[[], T]) -> T:
        """``fn()``; on an object store, a transient error (the store unreachable or
        overloaded) is retried with exponential backoff (1 s doubling to 30 s) and a
        warning per retry, for up to ``retry_s`` seconds; then the error is raised, one line,
        saying the run can be resumed. Local filesystems and other errors: raised at once."""
        if not self.is_object_store:
            return fn()
        start, delay, attempt = time.monotonic(), _RETRY_FIRST_S, 0
        while True:
            try:
                return fn()
            except FileNotFoundError:
                raise
            except (OSError, pa.ArrowException) as e:
                attempt += 1
                waited = time.monotonic() - start
                if not is_transient(e):
                    raise
                if waited + delay > self.retry_s:
                    raise StorageError(
                        f"cannot {action} {what}: the object store did not answer for "
                        f"{waited:.0f} s ({attempt} attempt(s); {RETRY_ENV}="
                        f"{self.retry_s:g}): {_short_cause(e)}; what is stored is kept: "
                        f"resume with --resume {self.location}") from e
                self.retries += 1
                logger.warning("cannot %s %s (%s); retrying in %.0f s (attempt %d, giving up "
                               "after %.0f s)", action, what, _short_cause(e), delay, attempt,
                               self.retry_s)
                time.sleep(delay)
                delay = min(2 * delay, _RETRY_MAX_S)

    # Generic files -----------------------------------------------------------------------------
    def exists(self, relpath: str = "") -> bool:
        """Whether ``relpath`` (a file or a directory) exists."""
        path = self.full_path(relpath)
        try:
            return self._retrying("check", self.display(relpath), lambda: (
                self.filesystem.get_file_info(path).type != pafs.FileType.NotFound))
        except StorageError:
            raise
        except (OSError, pa.ArrowException) as e:
            raise StorageError.from_os_error("check", self.display(relpath), e) from e

    def listdir(self, relpath: str = "") -> list[str]:
        """Names in a directory of the run, sorted, without temporaries (empty if missing)."""
        return sorted(i.base_name for i in self._list(relpath) if not is_temp_name(i.base_name))

    def _list(self, relpath: str) -> list[pafs.FileInfo]:
        sel = pafs.FileSelector(self.full_path(relpath), allow_not_found=True, recursive=False)
        try:
            return self._retrying("list", self.display(relpath),
                                  lambda: self.filesystem.get_file_info(sel))
        except StorageError:
            raise
        except (OSError, pa.ArrowException) as e:
            raise StorageError.from_os_error("list", self.display(relpath), e) from e

    def write_bytes(self, relpath: str, data: bytes) -> str:
        """Write a file atomically (see the module docstring); returns ``relpath``."""
        rel = _check_relpath(relpath)
        if not rel:
            raise ValueError("write_bytes needs a file path inside the run directory")
        if self.is_local:
            self._write_local(rel, bytes(data))
        elif self.is_object_store:
            self._write_object(rel, bytes(data))
        else:
            self._write_renamed(rel, bytes(data))
        return rel

    def write_text(self, relpath: str, text: str) -> str:
        """Write a UTF-8 text file atomically; returns ``relpath``."""
        return self.write_bytes(relpath, text.encode("utf-8"))

    def write_json(self, relpath: str, obj: Any, *, indent: int | None = 2) -> str:
        """Write ``obj`` as JSON atomically; returns ``relpath``.

        Non-finite floats are written as ``Infinity``/``NaN`` (what Python's json reads back).
        """
        try:
            text = json.dumps(obj, indent=indent)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{relpath}: not JSON-serializable: {e}") from None
        return self.write_text(relpath, text + "\n")

    def write_files(self, folder: str, names: Iterable[str], into: str) -> list[str]:
        """Write files of a local ``folder`` to ``into/<name>`` in the run, each atomically
        (also to an object store); returns the relative paths written."""
        out = []
        for name in names:
            with open(os.path.join(folder, name), "rb") as f:
                out.append(self.write_bytes(f"{into}/{name}", f.read()))
        return out

    def read_bytes(self, relpath: str) -> bytes:
        """The content of a file of the run."""
        path = self.full_path(relpath)

        def read() -> bytes:
            with self.filesystem.open_input_stream(path) as f:
                return f.read()

        try:
            return self._retrying("read", self.display(relpath), read)
        except (FileNotFoundError, StorageError):
            raise
        except (OSError, pa.ArrowException) as e:
            if not self.exists(relpath):
                raise FileNotFoundError(errno.ENOENT, "no such file", self.display(relpath)) from e
            raise StorageError.from_os_error("read", self.display(relpath), e) from e

    def read_text(self, relpath: str) -> str:
        """The content of a UTF-8 text file of the run."""
        return self.read_bytes(relpath).decode("utf-8")

    def read_json(self, relpath: str) -> Any:
        """A JSON file of the run, parsed."""
        return json.loads(self.read_bytes(relpath))

    def delete(self, relpath: str) -> None:
        """Remove a file of the run (missing is fine)."""
        path = self.full_path(relpath)
        try:
            if self.is_local:
                os.unlink(path)
            else:
                self.filesystem.delete_file(path)
        except FileNotFoundError:
            pass
        except (OSError, pa.ArrowException) as e:
            raise StorageError.from_os_error("delete", self.display(relpath), e) from e

    def move(self, src: str, dst: str) -> None:
        """Rename a file of the run (object stores: copy, then delete)."""
        a, b = self.full_path(src), self.full_path(dst)
        try:
            if self.is_local:
                os.makedirs(os.path.dirname(b), exist_ok=True)
                os.replace(a, b)
                _fsync_dir(os.path.dirname(b))
            else:
                self.filesystem.move(a, b)
        except (OSError, pa.ArrowException) as e:
            raise StorageError.from_os_error(
                "move", f"{self.display(src)} to {self.display(dst)}", e
            ) from e

    def _write_local(self, rel: str, data: bytes) -> None:
        """Temporary file in the same directory, write, fsync, rename, fsync the directory."""
        final = self.full_path(rel)
        folder, name = os.path.split(final)
        tmp = os.path.join(folder, f".{name}{TMP_MARK}{uuid.uuid4().hex[:8]}")
        try:
            os.makedirs(folder, exist_ok=True)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    n = os.write(fd, view[:_WRITE_CHUNK])
                    view = view[n:]
                    # SEARCHD_FAULT=disk_full[:n]: ENOSPC with part of the file written.
                    faults.write_fails(tmp)
                os.fsync(fd)
            finally:
                os.close(fd)
            if rel.startswith(f"{EVALUATIONS_DIR}/part-"):
                # SEARCHD_FAULT=after_tmp_write[:n]: a real SIGKILL here (searchd/faults.py).
                faults.hit("after_tmp_write")
            os.replace(tmp, final)
            _fsync_dir(folder)
        except OSError as e:
            _remove_quietly(tmp)
            raise StorageError.from_os_error("write", final, e, hide=tmp) from e

    def _write_object(self, rel: str, data: bytes) -> None:
        """One PUT of the final key (atomic on S3 and GCS: the object appears whole or not)."""
        path = self.full_path(rel)

        def put() -> None:  # the same key and bytes again: a retry is idempotent
            out = self.filesystem.open_output_stream(path)
            out.write(data)
            out.close()

        try:
            self._retrying("write", self.display(rel), put)
        except StorageError:
            raise
        except (OSError, pa.ArrowException) as e:
            raise StorageError.from_os_error("write", self.display(rel), e) from e

    def _write_renamed(self, rel: str, data: bytes) -> None:
        """Other filesystems (HDFS, fsspec): temporary name, then the filesystem's rename."""
        final = self.full_path(rel)
        folder, name = final.rsplit("/", 1)
        tmp = f"{folder}/.{name}{TMP_MARK}{uuid.uuid4().hex[:8]}"
        try:
            self.filesystem.create_dir(folder, recursive=True)
            out = self.filesystem.open_output_stream(tmp)
            out.write(data)
            out.close()
            self.filesystem.move(tmp, final)
        except (OSError, pa.ArrowException) as e:
            try:
                self.filesystem.delete_file(tmp)
            except (OSError, pa.ArrowException):
                pass
            raise StorageError.from_os_error("write", self.display(rel), e) from e

    def clean_temp_files(self) -> list[str]:
        """Remove temporaries left by writes that crashed; returns their relative paths.

        Only the one process that holds the run's lock may call this (``RunLock`` does on
        acquiring): another process's write in progress would lose its temporary. Object
        stores leave no temporaries (an interrupted upload never becomes an object).
        """
        if self.is_object_store:
            return []
        sel = pafs.FileSelector(self.base, allow_not_found=True, recursive=True)
        try:
            infos = self.filesystem.get_file_info(sel)
        except (OSError, pa.ArrowException) as e:
            raise StorageError.from_os_error("list", self.uri, e) from e
        removed = []
        for info in infos:
            if info.type == pafs.FileType.File and is_temp_name(info.base_name):
                rel = info.path[len(self.base):].lstrip("/")
                try:
                    self.delete(rel)
                except StorageError as e:
                    logger.warning("could not remove a temporary: %s", e)
                    continue
                removed.append(rel)
        if removed:
            logger.info("removed %d temporary file(s) of interrupted writes: %s",
                        len(removed), ", ".join(removed))
        return sorted(removed)

    # Evaluations -------------------------------------------------------------------------------
    def list_parts(self) -> list[str]:
        """Relative paths of the evaluation part files, in write order.

        Temporaries and files that are not named like parts are left out (the latter with a
        warning); ``evaluations/_corrupt/`` is not listed; nor are parts a compacted part
        holds (left by a compaction that was interrupted before deleting them).
        """
        return [p.relpath for p in _visible(self._part_infos())]

    def _part_infos(self) -> list[PartInfo]:
        """Every file named like a part, compacted parts' leftovers included, in order."""
        parts: list[PartInfo] = []
        for info in self._list(EVALUATIONS_DIR):
            name = info.base_name
            if info.type != pafs.FileType.File or is_temp_name(name):
                continue
            p = PartInfo.parse(f"{EVALUATIONS_DIR}/{name}")
            if p is None:
                logger.warning("ignoring %s: not named like an evaluation part",
                               self.display(f"{EVALUATIONS_DIR}/{name}"))
                continue
            parts.append(p)
        parts.sort(key=lambda p: (p.seq, p.relpath))
        return parts

    def append_evaluations(
        self, rows: Iterable[Mapping[str, Any]] | pa.Table
    ) -> str | None:
        """Write rows as a new part file; returns its relative path (None for no rows).

        Rows are validated first (``ValueError``, nothing written). When this returns, the
        part is complete under its final name and, locally, fsync'd: the rows are durable.
        """
        if isinstance(rows, pa.Table):
            table = conform_table(rows, SCHEMA_VERSION, "the appended table")
        else:
            table = rows_to_table(rows)
        n = table.num_rows
        if n == 0:
            return None
        seq = self._next_seq()
        rel = f"{EVALUATIONS_DIR}/part-{seq:06d}-{uuid.uuid4().hex[:8]}-n{n}.parquet"
        self._write_part(rel, table, seq)
        return rel

    def _write_part(self, rel: str, table: pa.Table, seq: int) -> None:
        """Write a conformed table as the part ``rel`` (atomically), and keep it verified."""
        n = table.num_rows
        meta = dict(EVALUATION_SCHEMA.metadata)
        meta[META_ROWS] = str(n).encode()
        meta[META_SEQ] = str(seq).encode()
        sink = pa.BufferOutputStream()
        pq.write_table(
            table.replace_schema_metadata(meta),
            sink,
            compression="zstd",
            write_page_checksum=True,
        )
        self.write_bytes(rel, sink.getvalue().to_pybytes())
        self._verified[rel] = table

    def _next_seq(self) -> int:
        """One more than the highest part number present (listed anew: parts are few)."""
        return max((p.seq for p in self._part_infos()), default=0) + 1

    def compact_parts(self, above: int = COMPACT_ABOVE) -> str | None:
        """Merge the listed parts into one when there are more than ``above`` (see the
        module docstring); returns the compacted part's relative path, or None (nothing
        to do). The rows and their order are unchanged; a corrupt part is moved aside
        first (its rows were not readable either way). Safe to interrupt at any point."""
        infos = self._part_infos()
        listed = _visible(infos)
        if len(listed) <= above:
            return None
        tables, merged = [], []
        for p in listed:
            table = self._verified.get(p.relpath)
            if table is None:
                table = self._load_part(p.relpath, move_corrupt=True)
                if table is None:
                    continue
            tables.append(table)
            merged.append(p)
        if not merged:
            return None
        table = pa.concat_tables(tables)
        first, seq = merged[0].first, merged[-1].seq
        rel = (f"{EVALUATIONS_DIR}/part-{seq:06d}-{uuid.uuid4().hex[:8]}-n{table.num_rows}"
               f"-from{first:06d}.parquet")
        self._write_part(rel, table, seq)
        # The rows are durable in the new part: what it holds is deleted (leftovers of an
        # interrupted compaction too); a kill from here on leaves files that are not listed.
        new = PartInfo.parse(rel)
        for p in infos:
            if new is not None and new.holds(p):
                self.delete(p.relpath)
                self._verified.pop(p.relpath, None)
        logger.info("compacted %d evaluation parts (%d rows) into %s", len(merged),
                    table.num_rows, self.display(rel))
        return rel

    def read_evaluations(self, *, move_corrupt: bool = True) -> pa.Table:
        """All evaluation rows, part by part in write order, as one ``EVALUATION_SCHEMA`` table.

        Every part is checked (Parquet footer, row count in its name and in its metadata,
        page checksums, schema). A part that fails is left out of the result and, with
        ``move_corrupt``, moved to ``evaluations/_corrupt/``, with a warning: its candidates
        then count as not scored. A part written under a newer schema version raises
        ``SchemaVersionError``; a read error of the storage itself raises ``StorageError``.
        """
        infos = self._part_infos()
        bad: set[str] = set()  # corrupt parts: a compacted one gives back what it held
        while True:
            tables, again = [], False
            listed = _visible([p for p in infos if p.relpath not in bad])
            for p in listed:
                table = self._verified.get(p.relpath)
                if table is None:
                    table = self._load_part(p.relpath, move_corrupt=move_corrupt)
                    if table is None:
                        bad.add(p.relpath)
                        again = again or p.first < p.seq
                        continue
                    self._verified[p.relpath] = table
                tables.append(table)
            if not again:
                break
        if not tables:
            return empty_table()
        return pa.concat_tables(tables)

    def _load_part(self, rel: str, *, move_corrupt: bool) -> pa.Table | None:
        """Read and check one part; None (after moving it aside) when it is corrupt."""
        # Read the bytes first: an I/O error of the storage is not a corrupt file.
        data = self.read_bytes(rel)
        try:
            table = verify_part(data, rel)
        except SchemaVersionError:
            raise
        except CORRUPT_ERRORS as e:
            self._quarantine(rel, one_line(e), move=move_corrupt)
            return None
        return table

    def _quarantine(self, rel: str, reason: str, *, move: bool) -> None:
        info = PartInfo.parse(rel)
        lost = f"{info.rows} row(s)" if info else "its rows"
        dst = f"{CORRUPT_DIR}/{rel.rsplit('/', 1)[-1]}"
        where = "left in place"
        if move:
            try:
                self.move(rel, dst)
                where = f"moved to {self.display(dst)}"
            except StorageError as e:
                where = f"left in place ({e})"
        logger.warning(
            "evaluation part %s is corrupt (%s); %s; %s will be scored again",
            self.display(rel), reason, where, lost,
        )

    # Searcher state ----------------------------------------------------------------------------
    def save_searcher_state(self, generation: int, state: Mapping[str, Any],
                            keep: int | None = KEEP_STATES) -> str:
        """Save a searcher's plain-data state after ``generation``; returns the relative path.

        Then only the ``keep`` newest states are kept (None: all): each holds the whole
        history, so keeping every one grew the run by O(batches^2) (234 MiB of states for
        3.3 MiB of Parquet at 20,000 candidates in batches of 500). The older ones kept
        are the fallback when the newest cannot be read (``latest_searcher_state``)."""
        if int(generation) < 0:
            raise ValueError(f"generation must be >= 0, got {generation}")
        if keep is not None and keep < 1:
            raise ValueError(f"keep = {keep}; it must be >= 1 (or None: keep all)")
        doc = {
            "schema_version": STATE_VERSION,
            "generation": int(generation),
            "time": datetime.now(timezone.utc).isoformat(),
            "state": state,
        }
        # Compact JSON: a third of the CPU of an indented dump and 40% fewer bytes (a state
        # holds the whole history: 12 MiB indented at 20,000 candidates).
        rel = self.write_json(f"{SEARCHER_DIR}/state-{int(generation):06d}.json", doc,
                              indent=None)
        if keep is not None:
            gens = self.searcher_state_generations()
            for g in gens[: max(0, len(gens) - keep)]:
                self.delete(f"{SEARCHER_DIR}/state-{g:06d}.json")
        return rel

    def searcher_state_generations(self) -> list[int]:
        """Generations that have a saved searcher state, ascending."""
        gens = []
        for name in self.listdir(SEARCHER_DIR):
            m = STATE_RE.match(name)
            if m:
                gens.append(int(m["gen"]))
        return sorted(gens)

    def latest_searcher_state(self) -> tuple[int, dict[str, Any]] | None:
        """``(generation, state)`` of the newest readable searcher state, or None.

        A state file that cannot be parsed is moved to ``searcher/corrupt/`` with a warning
        and the previous one is used (the evaluations after it are replayed by the caller).
        """
        names = {int(m["gen"]): n for n in self.listdir(SEARCHER_DIR) if (m := STATE_RE.match(n))}
        for gen in sorted(names, reverse=True):
            rel = f"{SEARCHER_DIR}/{names[gen]}"
            try:
                doc = json.loads(self.read_bytes(rel))
                if not isinstance(doc, dict) or not isinstance(doc.get("state"), dict):
                    raise ValueError("no 'state' object")
                if doc.get("generation") != gen:
                    raise ValueError(f"generation {doc.get('generation')!r} != {gen} of its name")
                version = int(doc.get("schema_version", 0))
            except ValueError as e:
                dst = f"{SEARCHER_DIR}/corrupt/{names[gen]}"
                try:
                    self.move(rel, dst)
                    where = f"moved to {self.display(dst)}"
                except StorageError as err:
                    where = f"left in place ({err})"
                logger.warning("searcher state %s is unreadable (%s); %s; using an older one",
                               self.display(rel), one_line(e), where)
                continue
            if version > STATE_VERSION:
                raise SchemaVersionError(
                    f"{self.display(rel)} was written by a newer searchd (state version "
                    f"{version}, this searchd reads {STATE_VERSION}); upgrade searchd to resume",
                    path=self.display(rel),
                )
            return gen, doc["state"]
        return None


def verify_part(data: bytes, source: str) -> pa.Table:
    """Check a part file's bytes and return its rows as an ``EVALUATION_SCHEMA`` table.

    Checks, in order: the Parquet footer parses; the row count in the footer equals the one
    in the file name (if ``source`` is named like a part) and the one in the key-value
    metadata; every page's CRC checksum while decoding; the decoded row count; the schema
    version and the schema. Raises ``ValueError`` or a pyarrow error for a corrupt file and
    ``SchemaVersionError`` for a version this searchd cannot read.
    """
    pf = pq.ParquetFile(pa.BufferReader(data), page_checksum_verification=True)
    footer_rows = pf.metadata.num_rows
    kv = pf.metadata.metadata or {}
    if META_ROWS not in kv:
        raise ValueError("no searchd row count in the file metadata (not a searchd part)")
    meta_rows = int(kv[META_ROWS])
    info = PartInfo.parse(source)
    if info is not None and info.rows != footer_rows:
        raise ValueError(f"footer has {footer_rows} rows, the file name says {info.rows}")
    if meta_rows != footer_rows:
        raise ValueError(f"footer has {footer_rows} rows, the metadata says {meta_rows}")
    version = table_schema_version(kv)
    if version is None:
        raise ValueError(f"no {META_SCHEMA_VERSION.decode()} in the file metadata")
    check_version(version, source)
    table = pf.read()
    if table.num_rows != footer_rows:
        raise ValueError(f"decoded {table.num_rows} rows, the footer says {footer_rows}")
    return conform_table(table, version, source)
