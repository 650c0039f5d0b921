"""The import layering of searchd: four floors, imports flowing one way, no cycle.

1. numerical: schedules, solvers, models, evaluation, the published methods, the adaptive
   predictors (no Ray, no Tune, no pyarrow);
2. the search loop: storage, searchers, configuration, the loop and the stages of a run
   (no Ray);
3. the engine: Ray, the actor pool, Ray Tune (``searchd.distributed``);
4. the faces: ``searchd.search`` / ``searchd.open_run`` (``searchd.api``) and the commands.

Every ``import`` statement of every module counts, at the top of a file or inside a function
(a late import hides a dependency; it does not remove it). A module may import from its own
layer or the layers below; the layers are listed below from the bottom, and within floor 1
and floor 2 they are ordered too. An import inside ``if TYPE_CHECKING:`` counts for the
layering (a type from a layer above is a dependency on it) but not for cycles (it never
runs: a helper module may name the type of the module that calls it).
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "searchd"

# Layers from the bottom: (name, floor, module prefixes). A module belongs to the layer of
# its longest matching prefix.
LAYERS: list[tuple[str, int, tuple[str, ...]]] = [
    ("base", 1, ("searchd.schedule", "searchd.noise", "searchd.faults", "searchd.plots",
                 "searchd.models.base", "searchd.models.names", "searchd.strategy_codes")),
    ("solvers", 1, ("searchd.solvers",)),
    ("schedules", 1, ("searchd.schedules",)),
    ("models", 1, ("searchd.models",)),
    ("evaluation", 1, ("searchd.evaluation",)),
    ("methods", 1, ("searchd.methods",)),
    ("adaptive", 1, ("searchd.adaptive",)),
    # Converting a schedule for other samplers (best.json's usage; ``python -m searchd.export``)
    # needs the solvers and the models only.
    ("export", 1, ("searchd.export",)),
    ("storage", 2, ("searchd.storage",)),
    ("searchers", 2, ("searchd.searchers",)),
    ("config", 2, ("searchd.config",)),
    ("loop", 2, ("searchd.loop",)),
    ("engine", 3, ("searchd.distributed",)),
    ("faces", 4, ("searchd.api", "searchd.search", "searchd.report", "searchd.sample",
                  "searchd.stats", "searchd.cli", "searchd")),
]
# Third-party packages a floor must not import (Tune is ``ray.tune``).
FORBIDDEN: dict[int, tuple[str, ...]] = {1: ("ray", "pyarrow"), 2: ("ray",)}


def module_files(root: Path = ROOT) -> dict[str, Path]:
    """Module name -> file, for every ``.py`` under ``root`` (a package's is its
    ``__init__.py``)."""
    out = {}
    for p in sorted(root.rglob("*.py")):
        parts = list(p.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _type_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes inside ``if TYPE_CHECKING:`` blocks."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for stmt in node.body:
                out.update(id(n) for n in ast.walk(stmt)
                           if isinstance(n, (ast.Import, ast.ImportFrom)))
    return out


def imports_of(name: str, source: str, modules: Iterable[str],
               runtime_only: bool = False) -> tuple[set[str], set[str]]:
    """(searchd modules, third-party top-level packages) that ``source`` imports anywhere
    (with ``runtime_only``, leaving out those under ``if TYPE_CHECKING:``)."""
    known = set(modules)
    internal, external = set(), set()
    is_pkg = name in {m.rsplit(".", 1)[0] for m in known if "." in m}

    def resolve(target: str) -> str | None:
        while target and target not in known:
            target = target.rpartition(".")[0]
        return target or None

    tree = ast.parse(source)
    skip = _type_only(tree) if runtime_only else set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                mod = ".".join([*base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod
                       for a in node.names]
        for t in targets:
            if t.split(".")[0] == "searchd":
                r = resolve(t)
                if r is not None and r != name:
                    internal.add(r)
            else:
                external.add(t.split(".")[0])
    return internal, external


def layer_of(module: str) -> tuple[int, str, int]:
    """(layer index, layer name, floor) of a module: its longest matching prefix."""
    best = None
    for i, (lname, floor, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if module == p or module.startswith(p + "."):
                if best is None or len(p) > best[0]:
                    best = (len(p), i, lname, floor)
    if best is None:
        raise AssertionError(f"{module} belongs to no layer; add it to LAYERS")
    return best[1], best[2], best[3]


def graph(root: Path = ROOT, runtime_only: bool = False
          ) -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    files = module_files(root)
    internal, external = {}, {}
    for name, path in files.items():
        internal[name], external[name] = imports_of(name, path.read_text(), files,
                                                    runtime_only)
    return internal, external


def upward(edges: Mapping[str, set[str]]) -> list[str]:
    """Imports from a lower layer into a higher one (and of the package ``searchd`` itself
    from inside)."""
    bad = []
    for a, targets in edges.items():
        la = layer_of(a)
        for b in targets:
            lb = layer_of(b)
            if lb[0] > la[0]:
                bad.append(f"{a} ({la[1]}, floor {la[2]}) imports {b} ({lb[1]}, floor {lb[2]})")
    return sorted(bad)


def cycles(edges: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def forbidden(external: Mapping[str, set[str]]) -> list[str]:
    bad = []
    for name, pkgs in external.items():
        floor = layer_of(name)[2]
        for pkg in sorted(pkgs & set(FORBIDDEN.get(floor, ()))):
            bad.append(f"{name} (floor {floor}) imports {pkg}")
    return bad


# The layering of searchd -----------------------------------------------------------------------
def test_every_module_has_a_layer():
    for name in module_files():
        layer_of(name)


def test_no_import_goes_up_a_layer():
    edges, _ = graph()
    assert upward(edges) == []


def test_no_import_cycle():
    edges, _ = graph(runtime_only=True)
    assert cycles(edges) == []


def test_numerical_code_imports_no_ray_and_no_pyarrow_and_the_loop_no_ray():
    _, external = graph()
    assert forbidden(external) == []


# The checks can fail -------------------------------------------------------------------------
def _tree(tmp_path: Path, files: Mapping[str, str]) -> Path:
    root = tmp_path / "searchd"
    for rel, text in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return root


@pytest.mark.parametrize("late", [False, True])
def test_an_upward_import_and_a_cycle_are_found_even_inside_a_function(tmp_path, late):
    imp = "from searchd.loop.stages import run\n"
    body = f"def f():\n    {imp}" if late else imp
    root = _tree(tmp_path, {
        "__init__.py": "",
        "schedule.py": "",
        "methods/__init__.py": "",
        "methods/gits.py": body,  # numerical code reaching up to the loop
        "loop/__init__.py": "",
        "loop/stages.py": "from searchd.methods import gits\nimport ray\n",
    })
    edges, external = graph(root)
    assert upward(edges) == [
        "searchd.methods.gits (methods, floor 1) imports searchd.loop.stages (loop, floor 2)"]
    assert cycles(edges) == [["searchd.loop.stages", "searchd.methods.gits"]]
    assert forbidden(external) == ["searchd.loop.stages (floor 2) imports ray"]


def test_a_type_only_import_counts_for_the_layers_but_not_for_cycles(tmp_path):
    root = _tree(tmp_path, {
        "__init__.py": "",
        "evaluation/__init__.py": "",
        "evaluation/evaluate.py": "from searchd.evaluation import helper\n",
        "evaluation/helper.py": "from typing import TYPE_CHECKING\n"
                                "if TYPE_CHECKING:\n"
                                "    from searchd.evaluation.evaluate import Evaluator\n"
                                "    from searchd.loop.stages import Setup\n",
        "loop/__init__.py": "",
        "loop/stages.py": "",
    })
    assert cycles(graph(root, runtime_only=True)[0]) == []
    assert cycles(graph(root)[0]) == [["searchd.evaluation.evaluate",
                                       "searchd.evaluation.helper"]]
    assert upward(graph(root)[0]) == [
        "searchd.evaluation.helper (evaluation, floor 1) imports searchd.loop.stages "
        "(loop, floor 2)"]
