"""A seeded generator of hostile search configurations (no hypothesis in the lock).

Each case is a YAML text (usually the quickstart configuration with one to three mutations:
wrong types, out-of-range and huge numbers, NaN and infinities, unicode and control
characters, very long strings, unknown keys, missing keys and sections, a top level that is
not a mapping, YAML that does not parse) plus ``--set`` overrides (random key paths,
existing or not, list indexes in and out of range, values that are not valid YAML).
``cases(n, seed)`` is deterministic: the same seed gives the same cases.
"""

from __future__ import annotations

import copy
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())

# Values of every type a YAML file or a --set can carry, hostile ones first.
HOSTILE: list[Any] = [
    None, True, False, 0, -1, 1, 2, 3, 7, -7, 10**30, -(10**30), 2**63, 2**64 + 1, 1e308,
    -1e308, 1e-320, 0.5, -0.5, math.nan, math.inf, -math.inf, "", " ", "0", "1e3", "nan",
    "inf", "null", "yes", "ü", "日本語", "🙂", "\u202e", "a\x00b", "line\nbreak", "tab\there",
    "x" * 5000, "../../etc/passwd", "/", "s3://", "exact:", "exact:-5", "exact:1e99",
    "exact:10", "gmm-digits-k8", "edm:/nonexistent.pkl", "generic:os:system",
    "generic:/tmp/x.py:f", "diffusers:/nonexistent", "kind:path", "cuda:99", "auto",
    "dpmpp_2m", "heun", "euler", "rk4", "evolution", "random", "bayes", "gits", "ld3",
    "adaptive", "polynomial", "fid", "kid", "teacher_distance", "digits", "pixels",
    "inception", [], [1], [1, 2, 3], ["a"], [[]], [None], {}, {"a": 1}, {"": None},
    {"family": "polynomial"}, {"family": "nope"}, {"family": "polynomial", "params": {"rho": -1}},
    [{"family": "logsnr"}], [{"family": "polynomial", "params": {"rho": "x"}}],
]
UNKNOWN_KEYS = ["evolutionn", "ünïcödé", "🙂", "", "x" * 300, "0", "model ", "__class__",
                "population-num", "None"]
BAD_YAML = ["{", "[1, 2", "a: b: c", "key: [unclosed", "\t- tab", "? ? ?",
            "!!python/object:os.system", "!!binary AAAA", "a: &x\nb: *y",
            "%YAML 9.9\n---\n", "\x00\x01\x02", ": :", "- - - -"]


@dataclass
class Case:
    """One fuzzed input: the configuration file's text and the ``--set`` overrides."""

    index: int
    text: str
    overrides: list[str] = field(default_factory=list)
    what: list[str] = field(default_factory=list)  # the mutations, for failure messages


def key_paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path of a nested mapping/list (its inner nodes included)."""
    out: list[tuple[Any, ...]] = []
    if isinstance(node, dict):
        for k, v in node.items():
            out.append((*prefix, k))
            out += key_paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out.append((*prefix, i))
            out += key_paths(v, (*prefix, i))
    return out


def _parent(raw: Any, path: tuple[Any, ...]) -> Any:
    for p in path[:-1]:
        raw = raw[p]
    return raw


def _value(rng: random.Random) -> Any:
    if rng.random() < 0.15:  # a random number near the interesting range
        return rng.choice([rng.randint(-5, 50), rng.uniform(-2, 2), rng.randint(0, 10**6)])
    return copy.deepcopy(rng.choice(HOSTILE))


def _yaml_text(v: Any) -> str:
    """A value as --set text (YAML flow style, one line)."""
    if isinstance(v, float) and not math.isfinite(v):
        return {True: ".inf", False: "-.inf"}[v > 0] if not math.isnan(v) else ".nan"
    return yaml.safe_dump(v, default_flow_style=True, allow_unicode=True, width=10**9).strip()\
        .removesuffix("\n...").removesuffix("...").strip()


def mutate(raw: dict[str, Any], rng: random.Random, what: list[str]) -> Any:
    """Apply one random mutation to ``raw`` (in place where possible); returns the new root."""
    paths = key_paths(raw)
    op = rng.random()
    if op < 0.45 and paths:  # a key set to a hostile value
        path = rng.choice(paths)
        v = _value(rng)
        _parent(raw, path)[path[-1]] = v
        what.append(f"set {path} = {v!r:.60}")
    elif op < 0.6 and paths:  # a key or a whole section removed
        path = rng.choice([p for p in paths if len(p) <= 2] or paths)
        parent = _parent(raw, path)
        if isinstance(parent, dict):
            del parent[path[-1]]
        elif parent:
            parent.pop(path[-1])
        what.append(f"del {path}")
    elif op < 0.75:  # an unknown key somewhere
        dicts = [()] + [p for p in paths if isinstance(_parent(raw, (*p, 0)), dict)]
        where = rng.choice(dicts)
        node = raw
        for p in where:
            node = node[p]
        key = rng.choice(UNKNOWN_KEYS)
        node[key] = _value(rng)
        what.append(f"unknown key {key!r:.40} at {where}")
    elif op < 0.8:  # a list or scalar grown huge or emptied
        path = rng.choice(paths) if paths else ("baselines",)
        v = rng.choice([[{"family": "polynomial"}] * 300, "9" * 400, 10**400 // 10**200, []])
        _parent(raw, path)[path[-1]] = v
        what.append(f"huge {path}")
    elif op < 0.83:  # the top level is not a mapping
        v = rng.choice([[1, 2], "text", 42, None, [QUICKSTART]])
        what.append(f"top level {v!r:.40}")
        return v
    else:  # a valid-looking value of another key (types right, combination maybe wrong)
        path = rng.choice(paths)
        other = rng.choice(key_paths(QUICKSTART))
        v = copy.deepcopy(_parent(QUICKSTART, other)[other[-1]])
        _parent(raw, path)[path[-1]] = v
        what.append(f"set {path} = value of {other}")
    return raw


def override(rng: random.Random, what: list[str]) -> str:
    """One random ``key.path=value`` (the key from the schema or not)."""
    paths = key_paths(QUICKSTART)
    r = rng.random()
    if r < 0.6:
        key = ".".join(str(p) for p in rng.choice(paths))
    elif r < 0.75:
        key = rng.choice(["baselines.99.family", "baselines.x", "search..seed", ".", "a.b.c",
                          "search.evolution.population_num.x", "model.spec.kind",
                          "solver.options.anything", "metric", "ünï.cödé", "🙂", " "])
    else:
        key = ".".join(str(p) for p in rng.choice(paths)) + "." + rng.choice(UNKNOWN_KEYS)
    value = rng.choice(BAD_YAML) if rng.random() < 0.1 else _yaml_text(_value(rng))
    text = rng.choice([f"{key}={value}", f"{key}={value}", key, f"={value}"])
    what.append(f"--set {text!r:.80}")
    return text


def cases(n: int, seed: int = 0) -> list[Case]:
    """``n`` fuzzed inputs, deterministic in ``seed``."""
    rng = random.Random(seed)
    out: list[Case] = []
    for i in range(n):
        what: list[str] = []
        r = rng.random()
        if r < 0.05:  # a file that is not valid YAML, or not a configuration at all
            text = rng.choice(BAD_YAML + ["", "\n", "---\n...\n", "model: gmm-digits\n"])
            what.append(f"file {text!r:.40}")
            out.append(Case(i, text, [], what))
            continue
        raw: Any = copy.deepcopy(QUICKSTART)
        if r < 0.8:
            for _ in range(rng.choice([1, 1, 1, 2, 3])):
                if not isinstance(raw, dict):
                    break
                raw = mutate(raw, rng, what)
        sets = [override(rng, what) for _ in range(rng.choice([0, 0, 1, 1, 2]) if r < 0.8
                                                   else rng.choice([1, 2, 3]))]
        text = yaml.safe_dump(raw, allow_unicode=True, sort_keys=False)
        out.append(Case(i, text, sets, what))
    return out
