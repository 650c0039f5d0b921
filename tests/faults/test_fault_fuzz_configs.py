"""Fuzzed configurations through the real entry of ``python -m searchd.search``.

2,000 seeded cases (``fuzz_configs.py``: wrong types, out-of-range, huge and non-finite
numbers, unicode and control characters, unknown keys, missing keys and sections, YAML that
does not parse, hostile ``--set`` overrides) go through ``searchd.search.main``, in-process:
the command's own argument parsing, configuration loading, overrides, validation, run
planning and pre-flight checks. Only the last step is replaced: ``stages.run`` (which takes
the run's lock, starts the evaluators and writes the run directory) raises a marker, so a
configuration that reaches it has passed every check a run makes before its model is loaded.

Every case must either reach that point or end with exit status 2 and exactly one line
``python -m searchd.search: error: ...`` on stderr; no other exception, no traceback, and no
directory or file created in the working directory. A handful of the failing cases are run
again as real subprocesses (``python -m searchd.search``), which must give the same line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import fuzz_configs
import pytest

from searchd.search import main

# More cases or another seed (benchmarks/reliability.py): SEARCHD_FUZZ_CASES, SEARCHD_FUZZ_SEED.
N_CASES = int(os.environ.get("SEARCHD_FUZZ_CASES", "2000"))
SEED = int(os.environ.get("SEARCHD_FUZZ_SEED", "0"))
PREFIX = "python -m searchd.search: error: "
REPO = Path(__file__).resolve().parents[2]


class Reached(BaseException):
    """Raised in place of ``stages.run``: the configuration passed every earlier check."""


def _argv(cfg: Path, case: fuzz_configs.Case) -> list[str]:
    return ["--config", str(cfg), "--engine", "local", "--quiet",
            *[f"--set={s}" for s in case.overrides]]


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> list[tuple[fuzz_configs.Case, str, str]]:
    """Every case run once: (case, "valid" | "exit 2" | a failure text, stderr)."""
    import searchd.loop.stages as stages

    work = tmp_path_factory.mktemp("fuzz")
    cfg = work / "cfg" / "case.yaml"
    cfg.parent.mkdir()
    old_cwd, old_run = os.getcwd(), stages.run
    before = None

    def reached(plan, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        raise Reached(plan.run.uri)

    out = []
    os.chdir(work)
    stages.run = reached
    try:
        import io
        from contextlib import redirect_stderr, redirect_stdout

        for case in fuzz_configs.cases(N_CASES, seed=SEED):
            cfg.write_text(case.text, encoding="utf-8")
            before = _tree(work) if before is None else before
            err, std = io.StringIO(), io.StringIO()
            try:
                with redirect_stderr(err), redirect_stdout(std):
                    code = main(_argv(cfg, case))
                kind = "exit 2" if code == 2 else f"exit {code}"
            except Reached:
                kind = "valid"
            except SystemExit as e:  # argparse
                kind = f"SystemExit {e.code}"
            except BaseException as e:  # noqa: BLE001 - what the test is for
                kind = f"raised {type(e).__name__}: {e}"
            created = _tree(work) - before
            if created:
                kind += f"; created {sorted(created)[:3]}"
                for p in sorted((work / c for c in created), reverse=True):
                    p.rmdir() if p.is_dir() else p.unlink()
            out.append((case, kind, err.getvalue()))
    finally:
        stages.run = old_run
        os.chdir(old_cwd)
    return out


def test_every_fuzzed_configuration_validates_or_fails_on_one_line(outcomes):
    bad = []
    for case, kind, err in outcomes:
        lines = err.strip().splitlines()
        if kind == "valid":
            ok = not lines
        elif kind == "exit 2":
            ok = (len(lines) == 1 and lines[0].startswith(PREFIX)
                  and len(lines[0]) > len(PREFIX) + 10 and "Traceback" not in err)
        else:
            ok = False
        if not ok:
            bad.append(f"case {case.index} {case.what}: {kind}: {err.strip()[:300]!r}")
    counts = Counter(kind for _, kind, _ in outcomes)
    print(f"fuzzed configurations (seed {SEED}): {dict(counts)}")  # pytest -s shows it
    assert len(outcomes) >= 2000
    assert not bad, f"{len(bad)} of {len(outcomes)} ({dict(counts)}):\n" + "\n".join(bad[:15])
    # The generator is not degenerate: both outcomes occur in numbers.
    assert counts["valid"] >= 50 and counts["exit 2"] >= 1000, counts


def test_the_error_names_what_was_wrong(outcomes):
    """A single mutated key that fails is named in its line (its last part), or the line
    names a key it constrains: the user can find what to fix."""
    named = total = 0
    for case, kind, err in outcomes:
        if kind != "exit 2" or len(case.what) != 1 or not case.what[0].startswith("set ("):
            continue
        leaf = case.what[0].split(" = ")[0].rstrip(")").split(", ")[-1].strip("'")
        total += 1
        named += leaf in err
    assert total > 150
    assert named / total > 0.8, (named, total)


def test_a_handful_through_a_real_subprocess(outcomes, tmp_path):
    """The same line from ``python -m searchd.search`` itself (nothing patched)."""
    picked = [o for o in outcomes if o[1] == "exit 2"][::311][:3]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("SEARCHD_FAULT", None)
    for i, (case, _, err) in enumerate(picked):
        cfg = tmp_path / f"c{i}.yaml"
        cfg.write_text(case.text, encoding="utf-8")
        p = subprocess.run([sys.executable, "-m", "searchd.search", *_argv(cfg, case)],
                           capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
        assert p.returncode == 2, (case.what, p.stderr[-2000:])
        assert p.stderr.strip() == err.strip().replace(str(cfg), str(cfg)), case.what
        assert sorted(os.listdir(tmp_path)) == sorted(f"c{j}.yaml" for j in range(i + 1))
