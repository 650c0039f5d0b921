"""``SEARCHD_FAULT``: parsing, and a real SIGKILL between a part's temporary write and its
rename (a child process appends parts; no Ray)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from test_storage_support import child_env, make_rows, run_child, temp_files

from searchd import faults
from searchd.storage import RunDir, RunLock, table_to_rows

# argv: run dir, number of parts to append (2 rows each). Also writes a non-part file first,
# which the after_tmp_write point does not count.
CHILD_APPENDS = """
import sys
from test_storage_support import make_rows
from searchd.storage import RunDir
run = RunDir(sys.argv[1])
run.write_text("config.yaml", "x: 1\\n")
for k in range(int(sys.argv[2])):
    print("appended", run.append_evaluations(make_rows(2 * k, 2)), flush=True)
print("done", flush=True)
"""


@pytest.mark.parametrize(
    ("text", "expected"),
    [("after_tmp_write", ("after_tmp_write", 1)), ("mid_generation:3", ("mid_generation", 3)),
     (" after_generation:12 ", ("after_generation", 12))],
)
def test_parse_accepts_point_and_count(text, expected):
    assert faults.parse(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [("after_lunch", "names no fault point"), ("after_tmp_write:0", "integer >= 1"),
     ("after_tmp_write:x", "integer >= 1"), ("", "names no fault point")],
)
def test_parse_refuses_other_values_naming_them_and_the_allowed_ones(text, message):
    with pytest.raises(ValueError) as e:
        faults.parse(text)
    text_e = str(e.value)
    assert message in text_e and repr(text) in text_e and "mid_generation" in text_e
    assert "\n" not in text_e


def test_armed_reads_the_environment(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    assert faults.armed("after_tmp_write") is None and faults.configured() is None
    monkeypatch.setenv(faults.ENV, "mid_generation:2")
    assert faults.armed("mid_generation") == 2 and faults.armed("after_tmp_write") is None


def test_sigkill_after_the_temporary_write_leaves_the_part_only_as_its_temporary(tmp_path):
    run_path = tmp_path / "run"
    env = dict(child_env(), SEARCHD_FAULT="after_tmp_write:2")
    p = subprocess.run([sys.executable, "-c", CHILD_APPENDS, str(run_path), "3"], env=env,
                       capture_output=True, text=True, timeout=120)
    # Killed by the signal itself (not an exit code), at the second part, not the config.
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert "SIGKILL at after_tmp_write:2" in p.stderr
    assert p.stdout.count("appended") == 1 and "done" not in p.stdout
    (tmp,) = temp_files(run_path)
    assert tmp.startswith("evaluations/.part-000002-") and "-n2.parquet.tmp-" in tmp
    assert os.path.getsize(run_path / tmp) > 0  # written (and fsync'd), not renamed
    run = RunDir(run_path)
    assert len(run.list_parts()) == 1
    assert [r["candidate_id"] for r in table_to_rows(run.read_evaluations())] == [
        r["candidate_id"] for r in make_rows(0, 2)]
    # The next holder of the run's lock removes the temporary; numbering continues.
    with RunLock(run) as lock:
        assert lock.removed_temps == [tmp]
        assert temp_files(run_path) == []
        assert run.append_evaluations(make_rows(2, 2)).startswith("evaluations/part-000002-")
    assert run.read_evaluations().num_rows == 4


def test_without_the_variable_the_same_child_writes_every_part(tmp_path):
    p = run_child(CHILD_APPENDS, str(tmp_path / "run"), "3")
    assert p.returncode == 0 and p.stdout.count("appended") == 3, p.stderr
    assert len(RunDir(tmp_path / "run").list_parts()) == 3
