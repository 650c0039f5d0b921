"""The local Ray a search starts (``RayEngine``): its workers run at the command's priority
(``LOCAL_RAY_CONFIG``: not niced by Ray's default 15 more)."""

from __future__ import annotations

import os

import pytest


@pytest.mark.ray
def test_the_local_rays_workers_run_at_the_commands_priority():
    import ray

    from searchd.distributed.engine import RayEngine

    if ray.is_initialized():
        pytest.skip("a Ray of another test is running")
    own = os.getpriority(os.PRIO_PROCESS, 0)
    if own > 19 - 15:  # Ray's default would be capped at 19 too: nothing to tell apart
        pytest.skip(f"the tests run at niceness {own}")
    engine = RayEngine()
    engine._start_ray()
    try:
        assert engine.started_ray

        @ray.remote(num_cpus=0.1)
        def niceness() -> int:
            return os.getpriority(os.PRIO_PROCESS, 0)

        assert ray.get(niceness.remote()) == own
    finally:
        engine.close()
