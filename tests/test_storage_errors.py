"""Write errors of the real operating system: permission denied, disk full, file too large.

Each must give one StorageError line naming the path and the OS error, leave no temporary
file behind, and lose nothing already written.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from test_storage_support import (
    CHILD_APPEND,
    NOBODY,
    big_table,
    make_rows,
    run_child,
    temp_files,
)

from searchd.storage import RunDir, StorageError

# Everything is imported before privileges are dropped (the interpreter may live under a
# directory that user nobody cannot read).
CHILD_AS_NOBODY = """
import json, os, sys
from test_storage_support import make_rows
from searchd.storage import RunDir, StorageError
if os.geteuid() == 0:
    try:
        os.setgroups([])
        os.setgid(NOBODY)
        os.setuid(NOBODY)
    except PermissionError as e:
        print(json.dumps({"cannot_drop": str(e)}))
        sys.exit(0)
run = RunDir(sys.argv[1])
out = {}
for what in sys.argv[2:]:
    try:
        if what == "append":
            run.append_evaluations(make_rows(100, 3))
        elif what == "best":
            run.write_json("best.json", {"v": 2})
        elif what == "read":
            run.read_evaluations()
        out[what] = "ok"
    except StorageError as e:
        out[what] = f"StorageError: {e}"
print(json.dumps(out))
""".replace("NOBODY", str(NOBODY))


@pytest.fixture
def open_dir():
    """A directory that user nobody can traverse (pytest's tmp_path is private to root)."""
    d = Path(tempfile.mkdtemp(prefix="searchd-perm-"))
    d.chmod(0o755)
    yield d
    for p in [d, *d.rglob("*")]:
        if not p.is_symlink():
            p.chmod(0o755 if p.is_dir() else 0o644)
    shutil.rmtree(d)


def _as_unprivileged(run: Path, *what: str) -> dict[str, str]:
    r = run_child(CHILD_AS_NOBODY, str(run), *what)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if "cannot_drop" in out:
        pytest.skip(f"running as root and cannot switch to uid {NOBODY}: {out['cannot_drop']}")
    return out


def test_permission_denied_is_one_clear_line_and_loses_nothing(open_dir):
    """As root, chmod does not stop writes, so the writer runs as user nobody (a real EACCES)."""
    run_path = open_dir / "run"
    run = RunDir(run_path)
    first = run.append_evaluations(make_rows(0, 4))
    run.write_json("best.json", {"v": 1})
    (run_path / "evaluations").chmod(0o555)
    run_path.chmod(0o555)
    out = _as_unprivileged(run_path, "append", "best")
    append, best = out["append"], out["best"]
    assert append.startswith(f"StorageError: cannot write {run_path}/evaluations/part-000002-")
    assert append.endswith("[Errno 13] Permission denied")
    assert best == (
        f"StorageError: cannot write {run_path}/best.json: [Errno 13] Permission denied"
    )
    assert temp_files(run_path) == []
    assert RunDir(run_path).list_parts() == [first]
    assert RunDir(run_path).read_evaluations().num_rows == 4
    assert run.read_json("best.json") == {"v": 1}


def test_unreadable_part_is_a_storage_error_not_a_corrupt_part(open_dir):
    """An I/O error reading a part must stop the reader, not move the part aside."""
    run_path = open_dir / "run"
    run = RunDir(run_path)
    first = run.append_evaluations(make_rows(0, 4))
    (run_path / "evaluations").chmod(0o777)  # moving it aside would be allowed
    (run_path / first).chmod(0)
    out = _as_unprivileged(run_path, "read")
    assert out["read"].startswith(f"StorageError: cannot read {run_path}/{first}: ")
    assert "Permission denied" in out["read"] and "\n" not in out["read"]
    assert (run_path / first).exists() and not (run_path / "evaluations" / "_corrupt").exists()


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 512 KiB filesystem (needs root and mount rights; skipped otherwise)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k", "tmpfs", str(mnt)],
                           capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("no mount command; test_file_size_limit covers a write failing mid-way")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}); "
                    "test_file_size_limit covers a write failing mid-way")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True, timeout=30)


def test_disk_full_is_one_clear_line_and_loses_nothing(small_tmpfs):
    run_path = small_tmpfs / "run"
    run = RunDir(run_path)
    parts = [run.append_evaluations(make_rows(0, 5)), run.append_evaluations(make_rows(5, 5))]
    run.write_json("best.json", {"v": 1})
    # A part of ~800 KB does not fit in 512 KiB.
    with pytest.raises(StorageError) as err:
        run.append_evaluations(big_table(100, 1000))
    e = err.value
    assert e.errno == errno.ENOSPC
    assert str(e).startswith(f"cannot write {run_path}/evaluations/part-000003-")
    assert str(e).endswith("[Errno 28] No space left on device")
    assert temp_files(run_path) == [] and run.list_parts() == parts
    # Fill the disk completely; then replacing best.json fails and keeps the old one.
    with open(small_tmpfs / "filler", "wb") as f:
        with pytest.raises(OSError) as full:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
    assert full.value.errno == errno.ENOSPC
    with pytest.raises(StorageError, match=r"best.json: \[Errno 28\] No space left on device"):
        run.write_json("best.json", {"v": 2})
    assert run.read_json("best.json") == {"v": 1}
    assert temp_files(run_path) == []
    # Space comes back: the run goes on as if nothing happened.
    os.unlink(small_tmpfs / "filler")
    run.append_evaluations(make_rows(10, 5))
    assert RunDir(run_path).read_evaluations().column("seed_base").to_pylist() == [
        1000 + i for i in range(15)
    ]


def test_file_size_limit_fails_the_write_cleanly(tmp_path):
    """RLIMIT_FSIZE with SIGXFSZ ignored: the kernel fails the write with EFBIG mid-file."""
    run = RunDir(tmp_path / "run")
    first = run.append_evaluations(make_rows(0, 5))
    r = run_child(CHILD_APPEND, str(tmp_path / "run"), "1000", "efbig")
    assert r.returncode == 3, r.stderr[-2000:]
    line = r.stdout.strip().splitlines()[-1]
    assert line.startswith(f"StorageError: cannot write {tmp_path}/run/evaluations/part-000002-")
    assert line.endswith("[Errno 27] File too large")
    assert temp_files(tmp_path / "run") == []
    assert RunDir(tmp_path / "run").list_parts() == [first]
    assert RunDir(tmp_path / "run").read_evaluations().num_rows == 5

