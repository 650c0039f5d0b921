"""Level-local mutation: exactly one level moves, inside the space; the others keep their bits.

"Inside the space" is checked with the space's own encode/decode round trip: a schedule in a
continuous space's cube decodes back from its parameters to itself.
"""

from __future__ import annotations

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
