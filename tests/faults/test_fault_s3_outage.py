"""S3 down and back (moto on 127.0.0.1, stopped and started again on the same port).

Operations on an object store retry a transient error (the store unreachable) with
exponential backoff and a warning per retry, for up to ``$SEARCHD_STORAGE_RETRY_S`` seconds;
an outage shorter than that loses nothing; a longer one ends in one line that says the run
can be resumed. A whole search through an outage: benchmarks/reliability.py.
"""

from __future__ import annotations

import logging

import pytest
from test_storage_support import make_rows

from searchd.storage import RunDir, StorageError, table_to_rows
from searchd.storage.rundir import RETRY_ENV

pytest.importorskip("moto.server")


@pytest.fixture(scope="module")
def store():
    from s3_outage import Store

    s = Store()
    yield s
    s.stop()


def test_writes_and_reads_wait_for_the_store_to_come_back(store, caplog, monkeypatch):
    monkeypatch.setenv(RETRY_ENV, "60")
    run = RunDir(store.uri("runs/back"))
    run.write_text("config.yaml", "x: 1\n")
    run.append_evaluations(make_rows(0, 2))
    back = store.outage(4.0)
    with caplog.at_level(logging.WARNING, logger="searchd"):
        part = run.append_evaluations(make_rows(2, 2))  # lists, then writes: both wait
        state = run.save_searcher_state(1, {"pending": []})
    back.join()
    assert run.retries >= 1
    warnings = [r.getMessage() for r in caplog.records if "retrying in" in r.getMessage()]
    assert warnings and all("\n" not in w for w in warnings)
    assert "NETWORK_CONNECTION" in warnings[0] and "giving up after 60 s" in warnings[0]
    keys = store.keys("runs/back/")
    assert f"runs/back/{part}" in keys and f"runs/back/{state}" in keys
    got = [r["candidate_id"] for r in table_to_rows(RunDir(store.uri("runs/back"))
                                                    .read_evaluations())]
    assert got == [r["candidate_id"] for r in make_rows(0, 4)]  # nothing lost or doubled


def test_an_outage_longer_than_the_limit_is_one_line_and_keeps_the_run(store, monkeypatch):
    monkeypatch.setenv(RETRY_ENV, "3")
    run = RunDir(store.uri("runs/gone"))
    run.append_evaluations(make_rows(0, 2))
    back = store.outage(8.0)
    try:
        with pytest.raises(StorageError) as e:
            run.append_evaluations(make_rows(2, 2))
    finally:
        back.join()
    msg = str(e.value)
    assert "\n" not in msg and "did not answer for" in msg and f"{RETRY_ENV}=3" in msg
    assert f"--resume {store.uri('runs/gone')}" in msg
    assert len(RunDir(store.uri("runs/gone")).list_parts()) == 1  # what was stored is kept


def test_other_errors_are_not_retried(store, monkeypatch):
    monkeypatch.setenv(RETRY_ENV, "60")
    run = RunDir(store.uri("runs/x").replace("searchd-faults", "no-such-bucket-here"))
    with pytest.raises(StorageError) as e:
        run.write_text("config.yaml", "x: 1\n")
    assert run.retries == 0 and "did not answer" not in str(e.value)


def test_a_bad_limit_is_refused_on_one_line(monkeypatch):
    from searchd.loop.runs import BadInput, open_location

    monkeypatch.setenv(RETRY_ENV, "soon")
    with pytest.raises(BadInput, match=f"{RETRY_ENV} = 'soon'"):
        open_location("/tmp/anything")
