"""``RunLock``: one search per run directory.

The ``LOCK`` file of a run records who holds it (pid, host, start time, last heartbeat, a
random token) as JSON.

Local disk: the lock is an exclusive ``flock`` on ``LOCK``, held for as long as the search
runs. The kernel drops it when the process dies, however it dies, so on the same host a lock
whose ``flock`` can be taken is stale by definition: it is taken over with a warning naming
the dead holder. A second search (another process, or a second ``RunLock`` in the same one)
fails to take the ``flock`` and is refused with a ``LockError`` naming the holder's pid and
host. Content naming another host (a shared filesystem) is taken over only with
``force=True``: this host cannot tell whether that process still runs. Where ``flock`` is not
supported (some network or FUSE filesystems) the record alone decides: a holder on this host
whose pid is not alive is stale; the check-then-write is then not race-free.

Object stores (S3, GCS): there is no ``flock`` and no conditional create in pyarrow, so the
lock is best effort: read ``LOCK``; if a live holder is recorded (same host and pid alive, or
another host without ``force``) refuse; else write our record, wait ``settle_s`` and read it
back, refusing if another writer's token is there. Two searches started within about one
request's latency of each other can both pass; the heartbeat age in the refusal message lets
a user judge a lock left by a crashed machine.

The holder refreshes ``heartbeat`` every ``heartbeat_s`` seconds from a daemon thread.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone

from searchd.storage.errors import LockError, StorageError, one_line
from searchd.storage.rundir import LOCK_FILE, RunDir

logger = logging.getLogger("searchd.storage")


def _now() -> datetime:
    return datetime.now(timezone.utc)


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (a zombie counts as alive)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class LockInfo:
    """What ``LOCK`` records about its holder."""

    pid: int
    host: str
    started: str
    heartbeat: str
    token: str

    @classmethod
    def mine(cls) -> LockInfo:
        t = _now().isoformat()
        return cls(os.getpid(), socket.gethostname(), t, t, uuid.uuid4().hex)

    def to_json(self) -> str:
        return json.dumps(asdict(self)) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> LockInfo:
        """Parse a ``LOCK`` record; ``ValueError`` if it is not one."""
        d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        try:
            info = cls(int(d["pid"]), str(d["host"]), str(d["started"]), str(d["heartbeat"]),
                       str(d["token"]))
            datetime.fromisoformat(info.heartbeat)
        except (KeyError, TypeError) as e:
            raise ValueError(f"missing or bad field: {e}") from None
        return info

    def with_heartbeat(self) -> LockInfo:
        return LockInfo(self.pid, self.host, self.started, _now().isoformat(), self.token)

    def heartbeat_age_s(self) -> float:
        """Seconds since the last heartbeat, by this host's clock."""
        return (_now() - datetime.fromisoformat(self.heartbeat)).total_seconds()

    def describe(self) -> str:
        return (
            f"pid {self.pid} on host {self.host} (started {self.started}, last heartbeat "
            f"{self.heartbeat_age_s():.0f} s ago)"
        )


def read_lock(run: RunDir | str | os.PathLike[str]) -> LockInfo | None:
    """The recorded holder of a run's lock, or None (no ``LOCK``, or unreadable content).

    A record can outlive its holder (a crash); ``RunLock`` decides whether it still holds.
    """
    run = run if isinstance(run, RunDir) else RunDir(run)
    try:
        return LockInfo.from_json(run.read_bytes(LOCK_FILE))
    except (FileNotFoundError, ValueError):
        return None


class RunLock:
    """Exclusive use of a run directory by one search, as a context manager.

    ``with RunLock(run): ...`` acquires on entry (raising ``LockError`` if another search
    holds the run), removes temporaries of interrupted writes, and releases on exit.
    ``taken_over`` is the stale record that was replaced, if any; ``removed_temps`` the
    temporaries of interrupted writes that acquiring removed (relative paths).
    """

    settle_s = 0.3  # object stores: wait before reading our record back

    def __init__(
        self,
        run: RunDir | str | os.PathLike[str],
        *,
        force: bool = False,
        heartbeat_s: float | None = 30.0,
    ) -> None:
        self.run = run if isinstance(run, RunDir) else RunDir(run)
        self.force = force
        self.heartbeat_s = heartbeat_s
        self.info: LockInfo | None = None
        self.taken_over: LockInfo | None = None
        self.removed_temps: list[str] = []  # temporaries of interrupted writes removed
        self._fd: int | None = None
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self.info is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

    # Acquire -----------------------------------------------------------------------------------
    def acquire(self) -> RunLock:
        """Take the lock or raise ``LockError``; returns self."""
        if self.held:
            raise LockError(f"this RunLock already holds {self.run.display(LOCK_FILE)}")
        if self.run.is_local:
            self._acquire_local()
        else:
            self._acquire_object()
        try:
            self.removed_temps = self.run.clean_temp_files()
        except BaseException:
            self.release()
            raise
        if self.heartbeat_s:
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._beat, name="searchd-lock-heartbeat", daemon=True
            )
            self._thread.start()
        return self

    def _decide(self, prev: LockInfo | None, raw: bytes, liveness_known: bool) -> None:
        """Refuse (LockError) or accept taking over what ``LOCK`` records.

        ``liveness_known``: we hold the flock, so no process on this host holds the lock.
        """
        where = self.run.display(LOCK_FILE)
        if prev is None:
            if raw.strip() and not liveness_known and not self.force:
                raise LockError(
                    f"{where} exists but is not a searchd lock record; if no search uses "
                    "this run, delete it or pass force=True",
                    path=where,
                )
            if raw.strip():
                logger.warning("taking over %s with unreadable content", where)
            return
        if prev.host == socket.gethostname():
            if not liveness_known and pid_alive(prev.pid):
                raise LockError(
                    f"run directory {self.run} is in use by another search: {prev.describe()}"
                    f"{_this_process(prev)}; stop it or wait for it to finish",
                    path=where,
                )
            why = "not running" if not pid_alive(prev.pid) else "running but not holding it"
            logger.warning("taking over the stale lock of %s: %s (%s)", self.run,
                           prev.describe(), why)
        else:
            if not self.force:
                raise LockError(
                    f"run directory {self.run} is locked by {prev.describe()}; this host "
                    f"({socket.gethostname()}) cannot tell whether that search still runs; "
                    "if it does not, take the lock over with force=True",
                    path=where,
                )
            logger.warning("forced takeover of the lock of %s from %s", self.run, prev.describe())
        self.taken_over = prev

    def _acquire_local(self) -> None:
        path = self.run.full_path(LOCK_FILE)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
        except OSError as e:
            raise StorageError.from_os_error("create", os.path.dirname(path), e) from e
        for _attempt in range(20):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise StorageError.from_os_error("open", path, e) from e
            try:
                liveness_known = self._flock(fd, path)
                # The file may have been removed (released) between open and flock: retry.
                try:
                    same = os.fstat(fd).st_ino == os.stat(path).st_ino
                except FileNotFoundError:
                    same = False
                if not same:
                    os.close(fd)
                    continue
                raw = _read_fd(fd)
                self._decide(_parse(raw), raw, liveness_known)
                info = LockInfo.mine()
                _rewrite_fd(fd, info.to_json().encode())
            except BaseException as e:
                os.close(fd)
                if isinstance(e, OSError):
                    raise StorageError.from_os_error("write", path, e) from e
                raise
            self._fd = fd
            self.info = info
            return
        raise LockError(f"could not take {path}: it kept being replaced", path=path)

    def _flock(self, fd: int, path: str) -> bool:
        """Take the flock; False where the filesystem has no flock; LockError if held."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            prev = _parse(_read_fd(fd))
            who = "an unknown process (no record yet)"
            if prev is not None:
                who = prev.describe() + _this_process(prev)
            raise LockError(
                f"run directory {self.run} is in use by another search: {who}; stop it or "
                "wait for it to finish",
                path=path,
            ) from None
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                logger.warning("%s: flock unsupported (%s); using the pid/host record only",
                               path, one_line(e))
                return False
            raise
        return True

    def _acquire_object(self) -> None:
        raw = self._read_object()
        self._decide(_parse(raw), raw, liveness_known=False)
        info = LockInfo.mine()
        self.run.write_text(LOCK_FILE, info.to_json())
        time.sleep(self.settle_s)
        now = _parse(self._read_object())
        if now is None or now.token != info.token:
            who = now.describe() if now is not None else "another process"
            raise LockError(
                f"run directory {self.run}: lost the race for its lock to {who}",
                path=self.run.display(LOCK_FILE),
            )
        self.info = info

    def _read_object(self) -> bytes:
        try:
            return self.run.read_bytes(LOCK_FILE)
        except FileNotFoundError:
            return b""

    # Heartbeat and release -----------------------------------------------------------------
    def heartbeat(self) -> None:
        """Record that the holder is alive (called every ``heartbeat_s`` by a thread)."""
        with self._mutex:
            if self.info is None:
                return
            info = self.info.with_heartbeat()
            if self._fd is not None:
                _rewrite_fd(self._fd, info.to_json().encode())
            else:
                now = _parse(self._read_object())
                if now is None or now.token != info.token:
                    who = now.describe() if now is not None else "nobody (LOCK is gone)"
                    logger.warning("the lock of %s is now held by %s", self.run, who)
                    return
                self.run.write_text(LOCK_FILE, info.to_json())
            self.info = info

    def _beat(self) -> None:
        assert self.heartbeat_s
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.heartbeat()
            except (OSError, StorageError) as e:
                logger.warning("lock heartbeat of %s failed: %s", self.run, one_line(e))

    def release(self) -> None:
        """Give the lock up (removes ``LOCK`` if it is still ours)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._mutex:
            if self.info is None:
                return
            try:
                if self._fd is not None:
                    path = self.run.full_path(LOCK_FILE)
                    try:
                        if os.stat(path).st_ino == os.fstat(self._fd).st_ino:
                            os.unlink(path)
                    except OSError as e:
                        logger.warning("could not remove %s: %s", path, one_line(e))
                    os.close(self._fd)  # drops the flock
                else:
                    now = _parse(self._read_object())
                    if now is not None and now.token == self.info.token:
                        self.run.delete(LOCK_FILE)
            finally:
                self._fd = None
                self.info = None


def _this_process(info: LockInfo) -> str:
    """A note when the holder is this very process (a second RunLock on the same run)."""
    same = info.pid == os.getpid() and info.host == socket.gethostname()
    return " (this process)" if same else ""


def _parse(raw: bytes) -> LockInfo | None:
    try:
        return LockInfo.from_json(raw) if raw.strip() else None
    except (ValueError, UnicodeDecodeError):
        return None


def _read_fd(fd: int) -> bytes:
    chunks = []
    offset = 0
    while True:
        b = os.pread(fd, 65536, offset)
        if not b:
            return b"".join(chunks)
        chunks.append(b)
        offset += len(b)


def _rewrite_fd(fd: int, data: bytes) -> None:
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)

