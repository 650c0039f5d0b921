"""Level-local mutation: exactly one level moves, inside the space; the others keep their bits.

"Inside the space" is checked with the space's own encode/decode round trip: a schedule in a
continuous space's cube decodes back from its parameters to itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from searchd.schedule import Schedule
from searchd.schedules.local import movable_levels, mutate_level
from searchd.schedules.spaces import ContinuousSpace, DiscreteSpace


def changed(a: Schedule, b: Schedule) -> list[int]:
    return [i for i, (x, y) in enumerate(zip(a.sigmas, b.sigmas)) if x != y]


@pytest.mark.parametrize("warp", ["rho", "logsnr"])
@pytest.mark.parametrize(("free", "final_zero"), [(True, True), (False, True), (True, False)])
def test_continuous_one_level_inside_the_cube(warp, free, final_zero):
    space = ContinuousSpace(5, 0.002, 80.0, final_zero, warp=warp, rho=7.0,
                            free_endpoints=free, gap_ratio=10.0, endpoint_range=0.3)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        parent = space.sample(rng)
        child = mutate_level(space, parent, rng, scale=float(rng.uniform(0.02, 0.5)))
        diff = changed(parent, child)
        assert len(diff) <= 1
        if not diff:
            continue
        seen.add(diff[0])
        space.check(child)
        assert np.all(np.diff(child.sigmas) < 0)
        # Inside the cube: its parameters decode back to it.
        back = space.decode(space.encode(child))
        np.testing.assert_allclose(back.sigmas, child.sigmas, rtol=1e-9)
    assert sorted(seen) == movable_levels(space)
    assert movable_levels(space) == (list(range(space.n_levels)) if free
                                     else list(range(1, space.n_levels - 1)))


def test_continuous_outside_parent_and_step_size():
    space = ContinuousSpace(5, 0.002, 80.0, True, warp="rho", free_endpoints=True,
                            gap_ratio=10.0)
    # A schedule outside the cube: its first gap is far below a tenth of the last one.
    parent = Schedule([80.0, 79.9, 5.0, 1.0, 0.002, 0.0])
    assert not np.allclose(space.decode(space.encode(parent)).sigmas, parent.sigmas)
    rng = np.random.default_rng(1)
    for j in movable_levels(space):
        child = mutate_level(space, parent, rng, 0.3, level=j)
        assert changed(parent, child) in ([j], [])
        space.check(child)
    # Small steps stay near the old level; a level's other neighbours never move.
    base = space.decode(np.full(space.dim, 0.5))
    small = [mutate_level(space, base, rng, 0.01, level=2).sigmas[2] for _ in range(50)]
    large = [mutate_level(space, base, rng, 0.5, level=2).sigmas[2] for _ in range(50)]
    assert np.std(np.log(small)) < 0.2 * np.std(np.log(large))


def test_deterministic_given_the_generator():
    space = ContinuousSpace(6, 0.002, 80.0, True, free_endpoints=True)
    parent = space.sample(np.random.default_rng(3))
    a = [mutate_level(space, parent, np.random.default_rng(9)) for _ in range(2)]
    assert a[0] == a[1]


@pytest.mark.parametrize("free", [True, False])
def test_discrete_one_grid_level(free):
    grid = np.exp(np.linspace(np.log(0.002), np.log(80.0), 40))
    space = DiscreteSpace(5, grid, True, free_endpoints=free)
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(200):
        parent = space.sample(rng)
        child = mutate_level(space, parent, rng, scale=0.2)
        diff = changed(parent, child)
        assert len(diff) <= 1
        space.check(child)
        seen.update(diff)
    assert sorted(seen) == movable_levels(space)


def test_bad_input():
    space = ContinuousSpace(4, 0.002, 80.0, True)
    parent = space.sample(np.random.default_rng(0))
    with pytest.raises(ValueError, match="scale"):
        mutate_level(space, parent, np.random.default_rng(0), scale=0.0)
    with pytest.raises(ValueError, match="lets levels"):
        mutate_level(space, parent, np.random.default_rng(0), level=0)  # fixed endpoint
    with pytest.raises(ValueError, match="ContinuousSpace and DiscreteSpace"):
        mutate_level(_Other(space), parent, np.random.default_rng(0))
    other = ContinuousSpace(5, 0.002, 80.0, True)
    with pytest.raises(ValueError, match="steps"):
        mutate_level(other, parent, np.random.default_rng(0))


class _Other:
    """A space of another kind (e.g. a model-schedule space)."""

    def __init__(self, inner: ContinuousSpace) -> None:
        self.inner = inner

    def check(self, schedule: Schedule) -> Schedule:
        return self.inner.check(schedule)


# The option in a search: search.evolution.mutation ------------------------------------------
def test_mutation_level_in_a_search_moves_one_level_and_shares_prefixes(tmp_path):
    """``search.evolution.mutation: level`` reaches the evolution (each mutant moves exactly
    one level of its parent) and the evaluators (the prefix tree, whose values are those of
    each candidate alone: the rows' values equal a plain evaluator's)."""
    import searchd
    from searchd.config import load_config
    from searchd.evaluation.reference import ReferenceStats
    from searchd.loop.factory import EvaluatorFactory
    from searchd.loop.stages import _evaluator_options
    from searchd.storage import RunDir, table_to_rows
    from tests.test_api import QUICK, TINY

    sets = [*TINY, "search.evolution.mutation=level", "search.evolution.mutation_num=2",
            "search.evolution.crossover_num=0", "search.evolution.generations=3",
            "search.predictor.enabled=false"]
    assert _evaluator_options(load_config(str(QUICK), sets)) == {"prefix_sharing": True}
    assert _evaluator_options(load_config(str(QUICK), TINY)) == {}
    run = tmp_path / "level"
    searchd.search(str(QUICK), sets, run_dir=str(run), engine="local")
    # The search's rows (the race's re-scorings on a fresh seed block are other seeds).
    rows = [r for r in table_to_rows(RunDir(str(run)).read_evaluations())
            if not r["trial_id"].startswith("race/")]
    by_id = {r["candidate_id"]: r for r in rows}
    mutants = [r for r in rows if r["origin"] == "mutation"]
    assert mutants
    for r in mutants:
        parent = np.asarray(by_id[r["parent_ids"][0]]["sigmas"])
        moved = np.asarray(r["sigmas"]) != parent
        assert moved.sum() == 1, (r["sigmas"], parent)
    ref = ReferenceStats.from_bytes((run / "reference.npz").read_bytes()).to_dict()
    plain = EvaluatorFactory(load_config(str(QUICK), sets).resolve(), ref)()
    seeds = range(int(rows[0]["seed_base"]), int(rows[0]["seed_base"]) + 100)
    for r, res in zip(rows, plain.evaluate([Schedule.from_dict(json.loads(r["schedule"]))
                                            for r in rows], seeds)):
        assert res.metrics["fid"] == pytest.approx(r["value"], rel=1e-5)


def test_mutation_misspelt_is_refused():
    from searchd.config import ConfigError, load_config
    from tests.test_api import QUICK

    with pytest.raises(ConfigError, match="search.evolution.mutation"):
        load_config(str(QUICK), ["search.evolution.mutation=levels"])
    with pytest.raises(ValueError, match="mutation = 'one'"):
        from searchd.searchers.evolution import EvolutionSearcher

        EvolutionSearcher(ContinuousSpace(4, 0.002, 80.0, True), mutation="one")


def test_mutation_level_with_searched_guidance_is_refused_before_the_search():
    """A guided space has no level-local mutation: the config says so in one line, before
    any run directory or search exists (it used to fail inside the first generation)."""
    from searchd.config import ConfigError, load_config

    cond = Path(__file__).resolve().parents[1] / "configs" / "digits-cond.yaml"
    with pytest.raises(ConfigError, match=r"search\.evolution\.mutation: .*space\.guidance"
                                          r"\.kind 'interval' needs mutation: space"):
        load_config(str(cond), ["space.guidance.kind=interval",
                                "search.evolution.mutation=level"])
    load_config(str(cond), ["search.evolution.mutation=level"])  # no guidance: allowed


def test_prefix_order_keeps_shared_leading_levels_together():
    from searchd.distributed.pool import prefix_order

    a = Schedule([80.0, 10.0, 1.0, 0.0])
    b = Schedule([80.0, 5.0, 1.0, 0.0])
    c = Schedule([80.0, 10.0, 2.0, 0.0])
    d = Schedule([60.0, 10.0, 1.0, 0.0])
    order = prefix_order([a, b, c, d.to_dict()])
    assert order == [3, 1, 0, 2]  # 60..., then 80/5, then 80/10/1 next to 80/10/2


def test_a_run_from_before_the_key_resumes(tmp_path):
    """A run recorded before ``search.evolution.mutation`` existed is not refused on resume
    (the new key at its default is no change); a real change still is."""
    import yaml

    import searchd
    from searchd.loop.runs import BadInput
    from tests.test_api import QUICK, TINY

    run = tmp_path / "old"
    searchd.search(str(QUICK), TINY, run_dir=str(run), engine="local")
    meta = json.loads((run / "run.json").read_text())
    del meta["config"]["search"]["evolution"]["mutation"]
    (run / "run.json").write_text(json.dumps(meta))
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    del cfg["search"]["evolution"]["mutation"]
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    again = searchd.search(str(QUICK), TINY, run_dir=str(run), resume=True, engine="local")
    assert again.status == "finished"
    with pytest.raises(BadInput, match="search.evolution.mutation"):
        searchd.search(str(QUICK), [*TINY, "search.evolution.mutation=level"],
                       run_dir=str(run), resume=True, engine="local")
