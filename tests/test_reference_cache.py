"""The cache of exact reference statistics across runs (``searchd.evaluation.reference_cache``):
a hit is bitwise the file a run computes, every input of the statistics is in the key (a
changed one misses), what cannot be keyed is never cached, and a broken cache never fails a
run."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

import searchd
from searchd.config import load_config
from searchd.evaluation import reference_cache as rc
from searchd.evaluation.reference import ReferenceStats

REPO = Path(__file__).resolve().parents[1]
QUICK = REPO / "configs" / "quickstart.yaml"
TINY = ["search.evolution.population_num=4", "search.evolution.select_num=2",
        "search.evolution.mutation_num=1", "search.evolution.crossover_num=1",
        "search.evolution.generations=2", "samples.per_candidate=100", "samples.heldout=200",
        "metric.reference=exact:300", "report.plots=false", "model.name=gmm-digits-k8"]


def cfg(*overrides: str):
    return load_config(QUICK, [*TINY, *overrides])


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(rc.CACHE_ENV, str(root))
    return root / "reference"


def test_every_input_is_in_the_key():
    base = rc.cache_key(cfg())
    assert base is not None and base == rc.cache_key(cfg())
    changed = [
        "metric.reference=exact:301", "samples.reference_seed_base=3000000",
        "model.name=gmm-digits", "model.dtype=float64", "metric.features=pixels",
        "workers.cpus_per_worker=1",
    ]
    keys = {o: rc.cache_key(cfg(o)) for o in changed}
    assert None not in keys.values()
    assert len(set(keys.values()) | {base}) == len(changed) + 1
    # Things the statistics do not depend on keep the key.
    assert rc.cache_key(cfg("search.seed=5", "samples.heldout=400", "nfe=6")) == base


def test_a_changed_data_file_or_source_file_misses(tmp_path):
    package = tmp_path / "searchd"
    for rel in ("models/data", "evaluation/data"):
        (package / rel).mkdir(parents=True)
        (package / rel / "weights.bin").write_bytes(b"\x00" * 64)
    (package / "models" / "gmm.py").write_text("x = 1\n")
    (package / "evaluation" / "stats.py").write_text("y = 2\n")
    rc._tree_digest.cache_clear()
    c = cfg()
    base = rc.cache_key(c, package)
    (package / "evaluation" / "data" / "weights.bin").write_bytes(b"\x00" * 63 + b"\x01")
    rc._tree_digest.cache_clear()
    after_data = rc.cache_key(c, package)
    (package / "models" / "gmm.py").write_text("x = 2\n")
    rc._tree_digest.cache_clear()
    after_source = rc.cache_key(c, package)
    # Compiled files and other suffixes are not source.
    (package / "models" / "notes.txt").write_text("irrelevant\n")
    rc._tree_digest.cache_clear()
    assert rc.cache_key(c, package) == after_source
    assert len({base, after_data, after_source}) == 3
    rc._tree_digest.cache_clear()


def test_what_cannot_be_keyed_is_not_cached(cache):
    assert rc.cache_path(cfg()) is not None
    for o in ("model.device=auto", "metric.features=inception", "metric.reference=null"):
        try:
            c = cfg(o)
        except Exception:  # the configuration refuses it: nothing to cache either
            continue
        assert rc.cache_key(c) is None and rc.cache_path(c) is None
    spec = cfg("model.name=gmm:" + str(REPO / "searchd/models/data/gmm-digits-k8.npz"))
    assert rc.cache_key(spec) is None
    # class_fid's reference is per class (another file format): never from the plain cache.
    cond = cfg("model.name=gmm-digits-cond", "samples.per_candidate=200", "metric.name=class_fid")
    assert rc.cache_key(cond) is None
    assert rc.cache_key(cfg("model.name=gmm-digits-cond")) is not None


def test_off_means_no_cache(monkeypatch):
    monkeypatch.setenv(rc.CACHE_ENV, "off")
    assert rc.cache_dir() is None and rc.cache_path(cfg()) is None
    assert rc.store(cfg(), {}) is None and rc.load(cfg()) is None
    monkeypatch.delenv(rc.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere")
    assert rc.cache_dir() == Path("/somewhere/searchd/reference")


def test_a_second_run_reads_the_cache_and_scores_bitwise_the_same(cache, tmp_path):
    a = searchd.search(str(QUICK), TINY, run_dir=str(tmp_path / "a"), engine="local")
    files = list(cache.glob("exact-300-*.npz"))
    assert len(files) == 1
    log_a = (tmp_path / "a" / "log.txt").read_text()
    assert "cached" not in log_a
    b = searchd.search(str(QUICK), TINY, run_dir=str(tmp_path / "b"), engine="local")
    log_b = (tmp_path / "b" / "log.txt").read_text()
    assert f"exact samples: cached ({files[0]})" in log_b
    ra = ReferenceStats.load(tmp_path / "a" / "reference.npz")
    rb = ReferenceStats.load(tmp_path / "b" / "reference.npz")
    assert np.array_equal(ra.mu, rb.mu) and np.array_equal(ra.sigma, rb.sigma)
    assert ra.meta["checksum"] == rb.meta["checksum"]
    va = [r["value"] for r in searchd.open_run(tmp_path / "a").rows]
    vb = [r["value"] for r in searchd.open_run(tmp_path / "b").rows]
    assert va == vb
    assert [h.value for h in a.heldout] == [h.value for h in b.heldout]
    # A changed input misses: computed again (and stored beside the first).
    searchd.search(str(QUICK), [*TINY, "samples.reference_seed_base=3000000"],
                   run_dir=str(tmp_path / "c"), engine="local")
    assert "cached" not in (tmp_path / "c" / "log.txt").read_text()
    assert len(list(cache.glob("exact-300-*.npz"))) == 2


def test_a_broken_cache_file_is_computed_again(cache, tmp_path):
    c = cfg()
    path = rc.cache_path(c)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not an npz")
    assert rc.load(c) is None
    searchd.search(str(QUICK), TINY, run_dir=str(tmp_path / "a"), engine="local")
    assert "cached" not in (tmp_path / "a" / "log.txt").read_text()
    ref, where = rc.load(c)
    assert where == path and ref["n"] == 300
    # An unwritable cache directory: the run goes on without it.
    shutil.rmtree(cache)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text("a file where the directory should be")
    searchd.search(str(QUICK), TINY, run_dir=str(tmp_path / "b"), engine="local")
    assert (tmp_path / "b" / "best.json").exists()
