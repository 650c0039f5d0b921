"""Errors raised by ``searchd.storage``: one line each, naming the path and the cause."""

from __future__ import annotations


def one_line(text: object) -> str:
    """Collapse a (possibly multi-line) error text into one line."""
    return " ".join(str(text).split())


class StorageError(Exception):
    """A run directory could not be written or read.

    The message is one line that names the path and the operating-system (or object-store)
    error, so that a search can stop with it as it stands. ``path`` and ``errno`` are kept
    for callers that want to react to a particular cause (``errno.ENOSPC``, ``errno.EACCES``).
    """

    def __init__(self, message: str, *, path: str | None = None, errno: int | None = None):
        super().__init__(one_line(message))
        self.path = path
        self.errno = errno

    @classmethod
    def from_os_error(
        cls, action: str, path: str, err: BaseException, *, hide: str | None = None
    ) -> StorageError:
        """``cannot <action> <path>: [Errno N] <strerror>`` (plus the file the OS named,
        unless it is ``path`` itself or ``hide``, e.g. the temporary of an atomic write)."""
        code = getattr(err, "errno", None)
        strerror = getattr(err, "strerror", None)
        if code is not None and strerror:
            cause = f"[Errno {code}] {strerror}"
            filename = getattr(err, "filename", None)
            if filename is not None and str(filename) not in (path, hide):
                cause += f" ({filename})"
        else:
            cause = one_line(err) or type(err).__name__
        return cls(f"cannot {action} {path}: {cause}", path=path, errno=code)


class LockError(StorageError):
    """The run directory is locked by another search (the message names its pid and host)."""


class SchemaVersionError(StorageError, ValueError):
    """A stored table has a schema version this searchd cannot read."""
