"""The Python API: ``searchd.search(...) -> SearchResult`` and ``searchd.open_run(path)``, on
the in-process engine (no Ray): a library call prints nothing and leaves logging as it was,
returns the winner and the held-out table, refuses bad input with one line, and reads back
as it wrote."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

import searchd
from searchd.config import ConfigError

REPO = Path(__file__).resolve().parents[1]
QUICK = REPO / "configs" / "quickstart.yaml"
TINY = ["search.evolution.population_num=4", "search.evolution.select_num=2",
        "search.evolution.mutation_num=1", "search.evolution.crossover_num=1",
        "search.evolution.generations=2", "samples.per_candidate=100", "samples.heldout=200",
        "metric.reference=exact:500", "report.plots=false"]


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    run = tmp_path_factory.mktemp("api") / "demo"
    log = logging.getLogger("searchd")
    before = (list(log.handlers), log.level, log.propagate)
    result = searchd.search(str(QUICK), TINY, run_dir=str(run), engine="local")
    after = (list(log.handlers), log.level, log.propagate)
    return run, result, before == after


def test_search_returns_the_winner_and_the_heldout_table(ran):
    run, result, logging_untouched = ran
    assert logging_untouched
    best = json.loads((run / "best.json").read_text())
    assert result.status == "finished" and result.run_id == "demo"
    assert result.schedule.id == best["schedule"]["id"] and result.value == best["search"]["value"]
    assert result.metric == "fid" and result.evaluations == 8
    assert [h.name for h in result.heldout] == ["searched", "polynomial(rho=7)", "logsnr",
                                                "time_uniform"]
    assert result.heldout[0].fid == best["heldout"]["scores"][0]["fid"]
    assert result.heldout_value == result.heldout[0].fid
    assert result.best_baseline == best["best_baseline"]
    base = next(h for h in result.heldout if h.name == result.best_baseline)
    assert base.significant is None  # no difference against itself
    for name in ("best.json", "evaluations", "config.yaml", "log.txt"):
        assert Path(result.files[name]).exists()


def test_a_library_call_prints_nothing(tmp_path, capsys):
    searchd.search(str(QUICK), [*TINY, "search.evolution.generations=1"],
                   run_dir=str(tmp_path / "quiet"), engine="local")
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""


def test_progress_lines_go_where_asked(tmp_path):
    lines: list[str] = []
    searchd.search(str(QUICK), [*TINY, "search.evolution.generations=1"],
                   run_dir=str(tmp_path / "loud"), engine="local", progress=lines.append)
    assert lines[0].startswith("searchd: run loud -> ")
    assert any(ln.startswith("[gen 1/1] best fid") for ln in lines)
    assert lines[-1].startswith("searchd: done in ")


def test_open_run_reads_what_search_wrote(ran):
    run, result, _ = ran
    view = searchd.open_run(run)
    assert view.state == "finished" and view.run_id == "demo" and len(view.rows) == 8
    assert view.result() == result
    # 8 rows: 6 candidates of the search and the race's 2 re-scorings (a quarter of the
    # budget of 8, on a fresh block of search seeds), which are not candidates of their own.
    records = view.evaluations()
    assert len(records) == 6 and all(s.id == r.candidate_id for s, r in records)
    raced = view.evaluations(race=True)
    assert len(raced) == 8 and all(s.id == r.candidate_id for s, r in raced)
    assert {r.candidate_id for _, r in raced} == {r.candidate_id for _, r in records}
    assert view.ok_rows()[0]["candidate_id"] == result.schedule.id
    assert view.table().num_rows == 8
    # What a REPL shows: one line of gist, not every row and best.json.
    assert repr(view) == (f"RunView(uri={view.uri!r}, run_id='demo', state='finished', rows=8, "
                          f"parts={view.n_parts}, bad_parts=0, best=yes)")
    assert repr(result).startswith("SearchResult(status='finished', run_id='demo'")
    assert f"schedule={result.schedule.id!r}" in repr(result) and "\n" not in repr(result)


def test_resuming_the_finished_run_returns_it_without_work(ran):
    run, result, _ = ran
    before = (run / "best.json").stat().st_mtime_ns
    again = searchd.search(run_dir=str(run), resume=True)
    assert again == result and (run / "best.json").stat().st_mtime_ns == before


def test_bad_input_raises_one_line(tmp_path):
    with pytest.raises(ConfigError) as e:
        searchd.search(str(QUICK), ["search.algorithm=annealing"], engine="local")
    assert len(str(e.value).splitlines()) == 1 and "search.algorithm" in str(e.value)
    with pytest.raises(searchd.BadInput, match="engine = 'spark'"):
        searchd.search(str(QUICK), run_dir=str(tmp_path / "r"), engine="spark")
    with pytest.raises(searchd.BadInput, match="not a searchd run directory"):
        searchd.open_run(tmp_path)


def test_a_mapping_config_and_a_search_config_work_too(tmp_path):
    from searchd.config import load_config

    cfg = load_config(QUICK, [*TINY, "search.evolution.generations=1"])
    a = searchd.search(cfg, run_dir=str(tmp_path / "a"), engine="local")
    b = searchd.search(cfg.resolve(), run_dir=str(tmp_path / "b"), engine="local")
    assert a.schedule.id == b.schedule.id and a.heldout == tuple(
        type(h)(**{**h.__dict__}) for h in b.heldout)
