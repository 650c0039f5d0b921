"""RunDir and RunLock on S3, against moto's standalone S3-compatible server on 127.0.0.1.

No cloud is reachable here and none is contacted: credentials are dummies from the
environment, EC2 metadata lookups are disabled, the region is given in the URI, and one
test traces every connect() of a whole S3 run and accepts only loopback addresses.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator

import pyarrow.parquet as pq
import pytest
from test_storage_support import child_env, make_rows, storage_warnings

from searchd.storage import LockError, RunDir, RunLock, read_lock, table_to_rows

moto_server = pytest.importorskip("moto.server")
boto3 = pytest.importorskip("boto3")

BUCKET = "searchd-test"
AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


@pytest.fixture(scope="module")
def s3() -> Iterator[dict]:
    """A moto S3 server on 127.0.0.1 (a free port), with one bucket."""
    saved = {k: os.environ.get(k) for k in AWS_ENV}
    os.environ.update(AWS_ENV)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"127.0.0.1:{port}"
        client = boto3.client("s3", endpoint_url=f"http://{endpoint}", region_name="us-east-1")
        client.create_bucket(Bucket=BUCKET)
        yield {"endpoint": endpoint, "client": client}
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _uri(s3: dict, key: str) -> str:
    return f"s3://{BUCKET}/{key}?region=us-east-1&endpoint_override={s3['endpoint']}&scheme=http"


def _keys(s3: dict, prefix: str) -> list[str]:
    resp = s3["client"].list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for o in resp.get("Contents", []))


def test_s3_run_round_trip(s3):
    run = RunDir(_uri(s3, "runs/a"))
    assert run.is_object_store and run.uri == f"s3://{BUCKET}/runs/a"
    assert run.location == _uri(s3, "runs/a")  # what --resume hints quote: the query kept
    run.write_text("config.yaml", "seed: 3\n")
    rows = make_rows(0, 9)
    parts = [run.append_evaluations(rows[i : i + 3]) for i in (0, 3, 6)]
    for gen in range(3):
        run.save_searcher_state(gen, {"gen": gen, "best": [1.0, 0.5]})
    run.write_json("best.json", {"candidate_id": rows[4]["candidate_id"]})

    again = RunDir(_uri(s3, "runs/a"))
    assert again.read_text("config.yaml") == "seed: 3\n"
    assert again.list_parts() == parts
    back = table_to_rows(again.read_evaluations())
    assert back == [{"schema_version": 2, **r} for r in rows]
    assert again.latest_searcher_state() == (2, {"gen": 2, "best": [1.0, 0.5]})
    assert again.read_json("best.json") == {"candidate_id": rows[4]["candidate_id"]}
    assert again.exists("best.json") and not again.exists("nothing.json")

    # Seen independently, through boto3: exactly these objects, whole, no temporaries.
    keys = _keys(s3, "runs/a/")
    assert [k for k in keys if ".tmp-" in k] == []
    assert {"runs/a/config.yaml", "runs/a/best.json", *(f"runs/a/{p}" for p in parts)} <= set(keys)
    body = s3["client"].get_object(Bucket=BUCKET, Key=f"runs/a/{parts[1]}")["Body"].read()
    assert pq.ParquetFile(io.BytesIO(body)).metadata.num_rows == 3


def test_s3_corrupt_part_is_moved_aside(s3):
    run = RunDir(_uri(s3, "runs/b"))
    parts = [run.append_evaluations(make_rows(3 * k, 3)) for k in range(3)]
    key = f"runs/b/{parts[1]}"
    body = s3["client"].get_object(Bucket=BUCKET, Key=key)["Body"].read()
    s3["client"].put_object(Bucket=BUCKET, Key=key, Body=body[: len(body) // 3])
    with storage_warnings() as warnings:
        table = RunDir(_uri(s3, "runs/b")).read_evaluations()
    assert table.column("seed_base").to_pylist() == [1000, 1001, 1002, 1006, 1007, 1008]
    name = parts[1].split("/")[-1]
    assert _keys(s3, "runs/b/evaluations/_corrupt/") == [f"runs/b/evaluations/_corrupt/{name}"]
    assert any(name in w.getMessage() and "is corrupt" in w.getMessage() for w in warnings)


def test_s3_lock_refusal_release_and_takeover(s3, monkeypatch):
    monkeypatch.setattr(RunLock, "settle_s", 0.05)
    uri = _uri(s3, "runs/c")
    with RunLock(uri, heartbeat_s=None) as lock:
        assert read_lock(uri).token == lock.info.token
        with pytest.raises(LockError, match=rf"pid {os.getpid()} on host .* \(this process\)"):
            RunLock(uri, heartbeat_s=None).acquire()
        lock.heartbeat()
        assert read_lock(uri).heartbeat >= lock.info.started
    assert _keys(s3, "runs/c/LOCK") == []  # released: deleted

    # A record left by a process of this host that is gone: stale, taken over.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    rec = ('{"pid": %d, "host": "%s", "started": "2026-01-01T00:00:00+00:00", '
           '"heartbeat": "2026-01-01T00:00:00+00:00", "token": "dead"}')
    s3["client"].put_object(Bucket=BUCKET, Key="runs/c/LOCK",
                            Body=(rec % (dead_pid, socket.gethostname())).encode())
    with storage_warnings() as warnings, RunLock(uri, heartbeat_s=None) as lock:
        assert lock.taken_over.pid == dead_pid
    assert any("stale lock" in w.getMessage() for w in warnings)

    # A record of another host: refused without force.
    s3["client"].put_object(Bucket=BUCKET, Key="runs/c/LOCK",
                            Body=(rec % (77, "other-host.example")).encode())
    with pytest.raises(LockError, match=r"pid 77 on host other-host.example .* force=True"):
        RunLock(uri, heartbeat_s=None).acquire()
    with RunLock(uri, force=True, heartbeat_s=None) as lock:
        assert lock.taken_over.host == "other-host.example"


TRACED_RUN = """
import sys
from searchd.storage import RunDir, RunLock
from test_storage_support import make_rows
run = RunDir(sys.argv[1])
with RunLock(run, heartbeat_s=None):
    run.write_text("config.yaml", "a: 1\\n")
    run.append_evaluations(make_rows(0, 3))
    run.save_searcher_state(0, {"x": 1})
    run.write_json("best.json", {"x": 1})
    assert run.read_evaluations().num_rows == 3
    assert run.latest_searcher_state() == (0, {"x": 1})
print("traced run ok", flush=True)
"""


def _loopback_only(strace_line: str) -> bool:
    """Whether a traced connect() names an address, and only loopback ones."""
    found = re.findall(r'inet_addr\("([^"]+)"\)|inet_pton\(AF_INET6, "([^"]+)"', strace_line)
    return bool(found) and all((v4 or v6) in ("127.0.0.1", "::1") for v4, v6 in found)


def test_s3_run_connects_to_loopback_only(s3, tmp_path):
    """Every connect() of a child doing a whole S3 run (lock, writes, reads) is traced."""
    strace = shutil.which("strace")
    if strace is None:
        pytest.skip("strace is not installed; the other S3 tests still run on loopback")
    log = tmp_path / "connect.log"
    env = {**child_env(), **AWS_ENV}
    r = subprocess.run(
        [strace, "-f", "-qq", "-e", "trace=connect", "-o", str(log),
         sys.executable, "-c", TRACED_RUN, _uri(s3, "runs/traced")],
        env=env, capture_output=True, text=True, timeout=120,
    )
    if r.returncode != 0 and "ptrace" in r.stderr and "traced run ok" not in r.stdout:
        pytest.skip(f"strace cannot trace here: {r.stderr.strip()[:200]}")
    assert r.returncode == 0 and "traced run ok" in r.stdout, r.stderr[-3000:]
    calls = [line for line in log.read_text().splitlines() if "connect(" in line]
    inet = [c for c in calls if "AF_INET" in c]
    assert any(f"htons({s3['endpoint'].split(':')[1]})" in c for c in inet), calls
    outside = [c for c in inet if not _loopback_only(c)]
    assert outside == [], "connections outside loopback:\n" + "\n".join(outside)


def test_report_reads_an_s3_run_and_writes_its_plots_there(s3, capsys):
    from test_report import write_run

    from searchd.report import main

    uri = _uri(s3, "runs/report")
    made = write_run(uri, finished=True)
    assert main([uri, "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert f"s3://{BUCKET}/runs/report" in out and "state: finished" in out
    assert made["ok"][0]["candidate_id"] in out.split("Top 2 candidates")[1]
    keys = _keys(s3, "runs/report/report/")
    assert keys == ["runs/report/report/metric_per_generation.png",
                    "runs/report/report/schedules.png"]
    body = s3["client"].get_object(Bucket=BUCKET, Key=keys[1])["Body"].read()
    assert body.startswith(b"\x89PNG")
    # An S3 prefix that holds no run: one line, exit 2.
    assert main([_uri(s3, "runs/nothing-here")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "runs/nothing-here" in err
