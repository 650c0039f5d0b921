"""requirements.lock against pyproject.toml: the lock must satisfy every range it was made from.

The lock is what was tested, pyproject.toml what the package claims; a range edited without
regenerating the lock (``bash .ci/lock``) fails here rather than on a user's machine. Whether
the locked set is complete and consistent is checked by pip itself in ``.ci/run`` (hash-checking
install, then ``pip check``).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

tomllib = pytest.importorskip("tomllib")

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"


def locked() -> dict[str, tuple[str, int]]:
    """``name -> (version, number of hashes)`` of every pin in requirements.lock."""
    text = LOCK.read_text()
    pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)((?:\s*\\\n\s+--hash=\S+)*)", text,
                      re.M)
    return {canonicalize_name(n): (v, h.count("--hash=")) for n, v, h in pins}


def project_requirements() -> list[Requirement]:
    """The dependencies of pyproject.toml, all extras included."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        reqs += extra
    return [Requirement(r) for r in reqs]


def test_every_pin_has_a_version_and_hashes() -> None:
    pins = locked()
    assert len(pins) > 100  # the whole environment, not only the direct dependencies
    lines = [ln for ln in LOCK.read_text().splitlines() if re.match(r"^[A-Za-z0-9]", ln)]
    assert len(lines) == len(pins), "every package line of the lock is a '==' pin"
    assert all(n_hashes > 0 for _, n_hashes in pins.values())


def test_lock_satisfies_every_range_of_pyproject() -> None:
    pins = locked()
    env = {"python_version": "3.11", "sys_platform": "linux", "platform_machine": "x86_64"}
    for req in project_requirements():
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} of pyproject.toml is not in requirements.lock"
        assert req.specifier.contains(pins[name][0], prereleases=True), (
            f"requirements.lock pins {req.name}=={pins[name][0]}, outside pyproject's "
            f"'{req.specifier}': run bash .ci/lock")


def test_torch_stays_at_the_releases_on_disk() -> None:
    pins = locked()
    assert pins["torch"][0] == "2.14.1" and pins["torchvision"][0] == "0.29.1"
