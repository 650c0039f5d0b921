"""RunLock on the local disk: refusal while another search holds the run, takeover of the
lock of a search that died (a real SIGKILL), other hosts, heartbeat."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from datetime import datetime

import pytest
from test_storage_support import start_child, storage_warnings

from searchd.storage import LockError, RunDir, RunLock, read_lock

CHILD_HOLD = """
import sys
from searchd.storage import RunLock
with RunLock(sys.argv[1], heartbeat_s=None):
    print("locked", flush=True)
    sys.stdin.read()  # hold until the parent closes stdin (or kills us)
print("released", flush=True)
"""


def test_second_search_is_refused_then_stale_lock_is_taken_over(tmp_path):
    run = tmp_path / "run"
    child = start_child(CHILD_HOLD, str(run))
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(LockError) as err:
            RunLock(run, heartbeat_s=None).acquire()
        msg = str(err.value)
        assert f"pid {child.pid} on host {socket.gethostname()}" in msg
        assert "in use by another search" in msg and "\n" not in msg
        # Even force does not take a lock whose holder is alive on this host.
        with pytest.raises(LockError):
            RunLock(run, force=True, heartbeat_s=None).acquire()
        # The holder dies without releasing: LOCK still names it.
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert read_lock(run).pid == child.pid
    with storage_warnings() as warnings, RunLock(run, heartbeat_s=None) as lock:
        assert lock.taken_over is not None and lock.taken_over.pid == child.pid
        assert read_lock(run).pid == os.getpid()
    msgs = [w.getMessage() for w in warnings]
    assert any("stale lock" in m and f"pid {child.pid}" in m and "not running" in m
               for m in msgs), msgs
    assert not (run / "LOCK").exists()  # released: removed


def test_clean_release_by_another_process_needs_no_takeover(tmp_path):
    run = tmp_path / "run"
    child = start_child(CHILD_HOLD, str(run))
    assert child.stdout.readline().strip() == "locked"
    child.stdin.close()
    assert child.stdout.readline().strip() == "released"
    child.wait(timeout=30)
    assert not (run / "LOCK").exists()
    with storage_warnings() as warnings, RunLock(run, heartbeat_s=None) as lock:
        assert lock.taken_over is None
    assert warnings == []


def test_second_lock_in_the_same_process_is_refused(tmp_path):
    run = RunDir(tmp_path / "run")
    with RunLock(run, heartbeat_s=None):
        with pytest.raises(LockError, match=r"pid \d+ on host .* \(this process\)"):
            RunLock(RunDir(tmp_path / "run"), heartbeat_s=None).acquire()
    with RunLock(run, heartbeat_s=None) as again:
        assert again.held


def _foreign_record(path, host: str = "other-host.example", pid: int = 4242) -> None:
    t = "2026-01-01T00:00:00+00:00"
    rec = {"pid": pid, "host": host, "started": t, "heartbeat": t, "token": "f" * 32}
    path.mkdir(parents=True, exist_ok=True)
    (path / "LOCK").write_text(json.dumps(rec))


def test_lock_of_another_host_needs_force(tmp_path):
    run = tmp_path / "run"
    _foreign_record(run)
    with pytest.raises(LockError) as err:
        RunLock(run, heartbeat_s=None).acquire()
    msg = str(err.value)
    assert "pid 4242 on host other-host.example" in msg and "force=True" in msg
    assert "last heartbeat" in msg
    assert read_lock(run).host == "other-host.example"  # untouched
    with storage_warnings() as warnings, RunLock(run, force=True, heartbeat_s=None) as lock:
        assert lock.taken_over.host == "other-host.example"
    assert any("forced takeover" in w.getMessage() for w in warnings)


def test_heartbeat_is_refreshed_while_held(tmp_path):
    with RunLock(tmp_path / "run", heartbeat_s=0.05) as lock:
        first = read_lock(tmp_path / "run")
        # Poll rather than sleep a fixed time: on a loaded machine the heartbeat thread may
        # not run within a fraction of a second (this failed 2 runs in 5 at load 25).
        # A read that meets the rewrite between its truncate and its write sees no record
        # (None, "unreadable content"); the flock, not the content, is what excludes.
        deadline = time.monotonic() + 30.0
        later = read_lock(tmp_path / "run")
        while (later is None or later.heartbeat == first.heartbeat) and \
                time.monotonic() < deadline:
            time.sleep(0.05)
            later = read_lock(tmp_path / "run")
        assert later is not None
        assert later.token == lock.info.token
        assert (datetime.fromisoformat(later.heartbeat) > datetime.fromisoformat(first.heartbeat)
                and later.started == first.started)
    assert read_lock(tmp_path / "run") is None
