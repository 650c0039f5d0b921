"""The documentation's code runs: the README's Python example (and that it finds the same best
schedule as the command line on the same configuration), and every Python snippet of
docs/reading-runs.md against a small run; the docs stand alone (no document outside the
repository is cited)."""

from __future__ import annotations

import ast
import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def section(text: str, title: str) -> str:
    start = text.index(f"## {title}")
    end = text.find("\n## ", start + 1)
    return text[start:] if end < 0 else text[start:end]


def test_the_docs_stand_alone():
    for doc in DOCS:
        text = doc.read_text()
        assert "DESIGN.md" not in text, f"{doc.name} cites a document outside the repository"
        assert "../shared" not in text, doc.name


def test_every_python_block_of_the_docs_parses():
    for doc in DOCS:
        for block in python_blocks(doc.read_text()):
            ast.parse(block)


# The README's example ---------------------------------------------------------------------------
def readme_example() -> str:
    (block,) = python_blocks(section((REPO / "README.md").read_text(), "Python API"))[:1]
    return block


def test_the_readme_example_names_only_what_the_api_has():
    import searchd
    from searchd.api import HeldoutScore, RunView, SearchResult

    code = readme_example()
    fields = {f for cls in (SearchResult, HeldoutScore, RunView)
              for f in cls.__dataclass_fields__}
    for attr in re.findall(r"(?:result|row|run)\.(\w+)", code):
        assert attr in fields or hasattr(SearchResult, attr) or hasattr(RunView, attr), attr
    assert callable(searchd.search) and callable(searchd.open_run)


@pytest.mark.ray
def test_the_readme_example_runs_and_finds_what_the_command_line_finds(tmp_path):
    code = readme_example().replace("runs/api-demo", str(tmp_path / "api"))
    call = next(n for n in ast.walk(ast.parse(code)) if isinstance(n, ast.Call)
                and ast.unparse(n.func) == "searchd.search")
    config = ast.literal_eval(call.args[0])
    overrides = ast.literal_eval(next(k.value for k in call.keywords if k.arg == "overrides"))
    out = io.StringIO()
    namespace: dict = {}
    with contextlib.redirect_stdout(out):
        exec(compile(code, "README.md", "exec"), namespace)
    result = namespace["result"]
    printed = out.getvalue()
    assert result.status == "finished" and "[gen 2/2]" in printed and "searched" in printed
    assert namespace["run"].state == "finished"

    p = subprocess.run(
        [sys.executable, "-m", "searchd.search", "--config", config,
         *[a for o in overrides for a in ("--set", o)], "--run-dir", str(tmp_path / "cli"),
         "--quiet"], capture_output=True, text=True, cwd=REPO, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    best = json.loads((tmp_path / "cli" / "best.json").read_text())
    assert best["schedule"]["id"] == result.schedule.id
    assert best["sigmas"] == [float(x) for x in result.schedule.sigmas]
    assert best["search"]["value"] == result.value
    assert [s["fid"] for s in best["heldout"]["scores"]] == [h.fid for h in result.heldout]


# docs/reading-runs.md --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> Path:
    """The small run the page describes: 3 generations of 4 candidates, one failure, a
    searcher state per generation and best.json, written with searchd.storage."""
    from test_storage_support import make_row

    from searchd.storage import RunDir

    root = tmp_path_factory.mktemp("docs")
    run = RunDir(root / "runs" / "demo")
    rows = []
    for g in range(3):
        batch = [make_row(4 * g + i, generation=g,
                          origin="baseline" if g == 0 and i == 0 else "random")
                 for i in range(4)]
        if g == 1:
            batch[2] = make_row(6, generation=1, status="failed",
                                error="RuntimeError: CUDA out of memory")
        run.append_evaluations(batch)
        run.save_searcher_state(g, {"generation": g})
        rows += batch
    ok = min((r for r in rows if r["status"] == "ok"), key=lambda r: r["value"])
    run.write_json("best.json", {"schedule": json.loads(ok["schedule"]),
                                 "sigmas": ok["sigmas"]})
    return root


@pytest.mark.parametrize("index", range(len(python_blocks(
    (REPO / "docs" / "reading-runs.md").read_text()))))
def test_the_snippets_of_reading_runs_run(index, demo_run, monkeypatch, request):
    block = python_blocks((REPO / "docs" / "reading-runs.md").read_text())[index]
    for module in re.findall(r"^import (\w+)", block, flags=re.M):
        pytest.importorskip(module)
    namespace: dict = {}
    if "S3FileSystem" in block:
        s3 = request.getfixturevalue("s3_demo")
        namespace["port"] = s3["port"]
    monkeypatch.chdir(demo_run)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(block, f"reading-runs.md block {index}", "exec"), namespace)
    assert out.getvalue().strip()


@pytest.fixture(scope="module")
def s3_demo(demo_run):
    """The demo run copied into a bucket of a local S3-compatible server (moto)."""
    moto_server = pytest.importorskip("moto.server")
    import os

    import pyarrow.fs as pafs
    from test_storage_s3 import AWS_ENV

    saved = {k: os.environ.get(k) for k in AWS_ENV}
    os.environ.update(AWS_ENV)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        _, port = server.get_host_and_port()
        fs = pafs.S3FileSystem(region="us-east-1", endpoint_override=f"127.0.0.1:{port}",
                               scheme="http", allow_bucket_creation=True)
        fs.create_dir("my-bucket")
        for p in (demo_run / "runs" / "demo").rglob("*"):
            if p.is_file():
                with fs.open_output_stream(f"my-bucket/{p.relative_to(demo_run)}") as f:
                    f.write(p.read_bytes())
        yield {"port": port}
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
