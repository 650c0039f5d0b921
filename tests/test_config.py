"""Configuration: YAML loading, --set overrides, one-line errors, cross-field checks, round trip."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from searchd.config import (
    ConfigError,
    FieldError,
    SearchConfig,
    format_validation_error,
    load_config,
    solver_nfe,
    steps_for_nfe,
)

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "configs" / "quickstart.yaml"


def write(tmp_path: Path, data: dict | str, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def error_lines(path: Path | None, overrides: list[str] = ()) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return info.value.lines


# The shipped configuration ------------------------------------------------------------------
def test_quickstart_loads_with_the_documented_values():
    cfg = load_config(QUICKSTART)
    assert cfg.model.name == "gmm-digits" and cfg.model.device == "cpu"
    assert cfg.solver.name == "dpmpp_2m" and cfg.nfe == 5 and cfg.steps == 5
    assert cfg.metric.name == "fid" and cfg.metric.features == "digits"
    assert cfg.metric.exact_reference == 10000
    ev = cfg.search.evolution
    assert cfg.search.algorithm == "evolution"
    assert cfg.search.budget == ev.population_num * ev.generations
    assert cfg.search.candidates_per_trial == ev.population_num
    assert [b.label for b in cfg.baselines] == ["polynomial(rho=7)", "logsnr", "time_uniform"]
    assert cfg.samples.heldout == 10000 and cfg.workers.num_workers == 2
    assert cfg.run_dir is None  # chosen when a run starts, never by validation


def test_every_quickstart_key_is_commented():
    for line in QUICKSTART.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith(("#", "- ")) and ":" in line:
            assert "#" in line, f"uncommented key: {line!r}"


def test_resolved_config_round_trips_through_yaml(tmp_path):
    cfg = load_config(QUICKSTART, ["search.algorithm=bayes", "search.bayes.sampler=gp"])
    again = load_config(write(tmp_path, cfg.to_yaml()))
    assert again == cfg
    assert again.resolve() == cfg.resolve()
    assert yaml.safe_load(cfg.to_yaml()) == cfg.resolve()


# Overrides ----------------------------------------------------------------------------------
def test_overrides_set_scalars_lists_mappings_and_list_entries():
    cfg = load_config(QUICKSTART, [
        "search.algorithm=random",
        "search.evolution.population_num=24",
        "samples.per_candidate=500",
        "solver.name=unipc",
        "solver.options={order: 3, lower_order_final: false}",
        "baselines.0.params.rho=5",
        "space.sigma_max=40",
        "run_dir=/tmp/x",
    ])
    assert cfg.search.algorithm == "random" and cfg.search.evolution.population_num == 24
    assert cfg.search.budget == 24 * 8
    assert cfg.samples.per_candidate == 500
    assert cfg.solver.options == {"order": 3, "lower_order_final": False}
    assert cfg.baselines[0].params == {"rho": 5} and cfg.baselines[0].label == "polynomial(rho=5)"
    assert cfg.space.sigma_max == 40.0 and cfg.run_dir == "/tmp/x"


def test_overrides_reach_default_lists_and_sections(tmp_path):
    path = write(tmp_path, {"model": {"name": "gmm-digits"}, "nfe": 4})
    cfg = load_config(path, ["baselines.1.family=time_quadratic", "search.bayes.sampler=gp"])
    assert [b.family for b in cfg.baselines] == ["polynomial", "time_quadratic", "time_uniform"]
    assert cfg.search.bayes.sampler == "gp"
    cfg = load_config(None, ["model.name=gmm-digits", "steps=3", "baselines=[logsnr, ays]"])
    assert [b.family for b in cfg.baselines] == ["logsnr", "ays"] and cfg.nfe == 3


@pytest.mark.parametrize("override,expected", [
    ("search.evolutio.population_num=3",
     "--set search.evolutio: unknown key; allowed keys at search: algorithm, seed, budget"),
    ("modle.name=x", "--set modle: unknown key; allowed keys at the top level: model, solver"),
    ("model.name.first=x", "--set model.name.first: model.name is a value, not a section"),
    ("baselines.7.family=logsnr", "--set baselines.7: baselines is a list of 3 (indices 0..2)"),
    ("nfe", "--set 'nfe': expected key.path=value"),
])
def test_bad_override_keys_name_the_key_and_the_allowed_keys(override, expected):
    lines = error_lines(QUICKSTART, [override])
    assert len(lines) == 1 and "\n" not in lines[0]
    assert lines[0].startswith(expected), lines[0]


# Validation errors: one line, naming key, value and what is allowed ------------------------
@pytest.mark.parametrize("override,key,value,allowed", [
    ("search.algorithm=cmaes", "search.algorithm", "'cmaes'",
     "allowed algorithms: evolution, random, bayes, gits, ld3, adaptive"),
    ("solver.options.foo=1", "solver.options", "{'foo': 1}",
     "dpmpp_2m: unknown option(s) ['foo']; allowed options: none"),
    ("solver.options={order: 9}", "solver.options", "{'order': 9}", "allowed options: none"),
    ("search.bayes.sampler=cmaes", "search.bayes.sampler", "'cmaes'", "'tpe' or 'gp'"),
    ("solver.name=rk4", "solver.name", "'rk4'", "dpmpp_2m"),
    ("space.warp=linear", "space.warp", "'linear'", "'logsnr', 'rho' or 'flow'"),
    ("space.gap_ratio=0.5", "space.gap_ratio", "0.5", "greater than 1"),
    ("search.evolution.m_prob=1.5", "search.evolution.m_prob", "1.5", "less than or equal to 1"),
    ("search.evolution.select_num=40", "search.evolution.select_num", "40",
     "<= population_num (24)"),
    ("search.evolution.mutation_num=30", "search.evolution.mutation_num", "30",
     "must be <= population_num (24)"),
    ("samples.per_candidate=abc", "samples.per_candidate", "'abc'", "valid integer"),
    ("metric.features=clip", "metric.features", "'clip'", "'digits', 'inception' or 'pixels'"),
    ("metric.reference=exact:x", "metric.reference", "'exact:x'", "exact:<n>"),
    ("metric.reference=/no/such/stats.npz", "metric.reference", "'/no/such/stats.npz'",
     "no such file"),
    ("baselines=[polynomial, cosine]", "baselines.1.family", "'cosine'", "polynomial, logsnr"),
    ("baselines.0.params={rho: 7, eta: 1}", "baselines.0.params.eta", "1", "takes rho"),
    ("baselines.0.params.rho=-2", "baselines.0.params.rho", "-2", "> 0"),
    ("model.device=tpu", "model.device", "'tpu'", "cpu, cuda"),
    ("model.dtype=int8", "model.dtype", "'int8'", "'float32'"),
    ("nfe=0", "nfe", "0", "greater than or equal to 1"),
    ("steps=3", "nfe", "5", "steps = 3"),
    ("model.device=cuda", "workers.num_gpus_per_worker", "0.0", "must be > 0"),
    ("search.budget=2", "search.budget", "2", ">= the number of baselines (3)"),
])
def test_invalid_values_give_one_line_with_key_value_and_allowed(override, key, value, allowed):
    lines = error_lines(QUICKSTART, [override])
    assert len(lines) == 1, lines
    line = lines[0]
    assert "\n" not in line
    assert line.startswith(f"{key}: "), line
    assert value in line and allowed in line, line


def test_several_problems_give_one_line_each():
    lines = error_lines(QUICKSTART, ["space.rho=-1", "workers.cpus_per_worker=abc",
                                     "search.algorithm=ga"])
    assert len(lines) == 3
    assert sorted(line.split(":")[0] for line in lines) == [
        "search.algorithm", "space.rho", "workers.cpus_per_worker"]


def test_unknown_keys_in_the_file_list_the_allowed_keys(tmp_path):
    path = write(tmp_path, {"model": {"name": "m"}, "nfe": 5, "search": {"evolution": {
        "population": 10}}})
    (line,) = error_lines(path)
    assert line.startswith("search.evolution.population: unknown key (value 10); allowed keys "
                           "at search.evolution: population_num, select_num")


def test_missing_model_and_ambiguous_model(tmp_path):
    (line,) = error_lines(write(tmp_path, {"nfe": 5}))
    assert line == "model: required key is missing"
    (line,) = error_lines(QUICKSTART, ["model.spec={path: ck.pt, kind: edm}"])
    assert line.startswith("model.name: got 'gmm-digits'; give exactly one")


def test_yaml_syntax_errors_name_the_file_and_line(tmp_path):
    path = write(tmp_path, "model:\n  name: [gmm\nnfe: 5\n")
    (line,) = error_lines(path)
    assert line.startswith(f"{path}:") and "invalid YAML" in line
    (line,) = error_lines(write(tmp_path, "- a\n- b\n", "list.yaml"))
    assert "must be a mapping" in line


# Cross-field rules ------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,key", [
    (["samples.heldout_seed_base=1999"], "samples.heldout_seed_base"),
    (["samples.seed_base=1005000"], "samples.heldout_seed_base"),
    (["samples.reference_seed_base=1009999"], "samples.reference_seed_base"),
    (["samples.reference_seed_base=0"], "samples.reference_seed_base"),
])
def test_search_heldout_and_reference_seeds_must_be_disjoint(overrides, key):
    (line,) = error_lines(QUICKSTART, overrides)
    assert line.startswith(f"{key}: ") and "overlap" in line and "disjoint" in line


def test_adjacent_seed_ranges_are_allowed(tmp_path):
    stats = tmp_path / "ref.npz"
    stats.write_bytes(b"")
    cfg = load_config(QUICKSTART, ["samples.heldout_seed_base=2000", "search.racing.top_k=0",
                                   "samples.reference_seed_base=0", f"metric.reference={stats}"])
    assert cfg.samples.heldout_seed_base == 2000  # [0, 2000) and [2000, 12000) are disjoint
    assert cfg.metric.exact_reference is None
    # Racing's fresh blocks follow the search's seeds: [2000, 4000) here, refused.
    with pytest.raises(ConfigError, match=r"search\.racing\.blocks: got 2000; seeds \[2000, "
                                          r"4000\) overlap samples\.heldout_seed_base"):
        load_config(QUICKSTART, ["samples.heldout_seed_base=2000",
                                 "samples.reference_seed_base=0", f"metric.reference={stats}"])


def test_nfe_resolves_to_steps_through_the_solver_cost():
    for solver in ("dpmpp_2m", "heun", "euler"):
        cfg = load_config(QUICKSTART, [f"solver.name={solver}", "nfe=9"])
        cost = solver_nfe(solver, cfg.steps, True)
        assert cfg.nfe == cost <= 9 < solver_nfe(solver, cfg.steps + 1, True)
        assert steps_for_nfe(solver, 9) == cfg.steps
    cfg = load_config(QUICKSTART, ["nfe=null", "steps=4", "solver.name=heun"])
    assert cfg.nfe == solver_nfe("heun", 4, True)


def test_continuous_space_needs_two_levels():
    (line,) = error_lines(QUICKSTART, ["nfe=1"])
    assert line.startswith("steps: got 1;") and "2 noise levels" in line
    cfg = load_config(QUICKSTART, ["nfe=1", "space.final_zero=false"])
    assert cfg.steps == 1


def test_evolution_population_must_hold_the_baselines():
    (line,) = error_lines(QUICKSTART, ["search.evolution={population_num: 2, select_num: 1, "
                                       "mutation_num: 1, crossover_num: 1}"])
    assert line.startswith("baselines: ") and "population_num = 2" in line
    cfg = load_config(QUICKSTART, ["search.evolution={population_num: 2, select_num: 1, "
                                   "mutation_num: 1, crossover_num: 1}", "baselines=[logsnr]"])
    assert cfg.search.budget == 2 * 12


def test_predictor_screens_evolution_by_default():
    """On by default for the evolution; the other algorithms ignore it, as they ignore
    search.evolution (the shipped quickstart, which lists it, runs them unchanged)."""
    pr = load_config(QUICKSTART).search.predictor
    assert pr.enabled and pr.top_fraction == 0.1 and pr.min_train == 10
    from searchd.config import SearchSection

    assert SearchSection().predictor.enabled
    for algo in ("bayes", "random", "gits", "ld3"):
        assert load_config(QUICKSTART, [f"search.algorithm={algo}"]).search.algorithm == algo
    (line,) = error_lines(QUICKSTART, ["search.predictor.top_fraction=0"])
    assert line.startswith("search.predictor.top_fraction: ")


# The formatter alone --------------------------------------------------------------------------
class Inner(BaseModel):
    model_config = ConfigDict(extra="forbid")
    size: int = Field(1, gt=0)
    low: float = 0.0
    high: float = 1.0

    @model_validator(mode="after")
    def _order(self) -> Inner:
        if self.low >= self.high:
            raise FieldError("low", self.low, f"must be below high ({self.high})")
        return self


class Outer(BaseModel):
    model_config = ConfigDict(extra="forbid")
    inner: Inner = Inner()
    items: list[Inner] = []


@pytest.mark.parametrize("data,expected", [
    ({"inner": {"size": 0}}, "inner.size: got 0; must be greater than 0"),
    ({"inner": {"low": 2.0}}, "inner.low: got 2.0; must be below high (1.0)"),
    ({"inner": {"wide": 3}},
     "inner.wide: unknown key (value 3); allowed keys at inner: size, low, high"),
    ({"bogus": 1}, "bogus: unknown key (value 1); allowed keys at the top level: inner, items"),
    ({"items": [{}, {"size": "x"}]},
     "items.1.size: got 'x'; must be a valid integer, unable to parse string as an integer"),
    ({"items": [{"colour": 1}]},
     "items.0.colour: unknown key (value 1); allowed keys at items.0: size, low, high"),
])
def test_format_validation_error(data, expected):
    with pytest.raises(ValidationError) as info:
        Outer.model_validate(data)
    assert format_validation_error(info.value, Outer) == [expected]


def test_long_values_are_shortened():
    with pytest.raises(ValidationError) as info:
        Outer.model_validate({"inner": {"size": "y" * 500}})
    (line,) = format_validation_error(info.value, Outer)
    assert len(line) < 200 and "..." in line


# Fast failure -------------------------------------------------------------------------------
def test_config_module_imports_neither_ray_nor_torch():
    code = (
        "import sys, searchd.config as c\n"
        "heavy = lambda: sorted(m for m in ('ray', 'torch', 'optuna') if m in sys.modules)\n"
        "print(heavy())\n"
        "c.load_config(sys.argv[1])\n"
        "print(heavy())\n"
    )
    out = subprocess.run([sys.executable, "-c", code, str(QUICKSTART)], capture_output=True,
                         text=True, check=True, cwd=REPO)
    at_import, after_load = out.stdout.splitlines()
    assert at_import == "[]"
    # Validation imports searchd.solvers (and torch with it) to check the solver; never Ray.
    assert "ray" not in after_load and "optuna" not in after_load


def test_search_config_schema_forbids_extra_keys_everywhere():
    def walk(model: type[BaseModel]):
        yield model
        for f in model.model_fields.values():
            for t in getattr(f.annotation, "__args__", ()) + (f.annotation,):
                inner = getattr(t, "__origin__", None) and getattr(t, "__args__", ())
                for c in (t, *(inner or ())):
                    if isinstance(c, type) and issubclass(c, BaseModel):
                        yield from walk(c)

    models = set(walk(SearchConfig))
    assert len(models) >= 12
    assert all(m.model_config.get("extra") == "forbid" for m in models)


def test_steps_for_nfe_is_the_most_steps_that_fit_for_every_solver():
    """The bisection against the definition: the largest n whose cost fits in nfe."""
    from searchd.config.schema import solver_nfe, steps_for_nfe
    from searchd.solvers import SOLVERS

    for solver in SOLVERS:
        for final_zero in (True, False):
            for nfe in range(1, 61):
                fits = [n for n in range(1, nfe + 1) if solver_nfe(solver, n, final_zero) <= nfe]
                assert steps_for_nfe(solver, nfe, final_zero) == (max(fits) if fits else None)


def test_a_huge_nfe_is_refused_at_once_on_one_line(capsys):
    """nfe = 10**9 once made the steps' resolution loop for minutes (found by the fuzzer)."""
    from searchd.search import main

    assert main(["--config", str(QUICKSTART), "--set", "nfe=1000000000", "--print-config"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "nfe: got 1000000000" in err and "1000" in err
