"""The configuration of a search, in three modules:

- ``schema``: the pydantic models (``SearchConfig`` and its sections), validated against the
  registries of solvers, algorithms, baseline families and computed schedules;
- ``overrides``: a YAML file plus ``--set key.path=value`` overrides (``load_config``);
- ``errors``: one line per problem, naming the key, the value and what is allowed.

Importing it imports neither Ray nor torch.
"""

from searchd.config.errors import ConfigError, FieldError, format_validation_error
from searchd.config.overrides import apply_overrides, load_config, parse_override, read_yaml
from searchd.config.schema import (
    AdaptiveConfig,
    BaselineConfig,
    BayesConfig,
    EvolutionConfig,
    GitsConfig,
    Ld3Config,
    MetricConfig,
    ModelConfig,
    ModelSpec,
    PredictorSection,
    ReportConfig,
    SamplesConfig,
    SearchConfig,
    SearchSection,
    SolverConfig,
    SpaceConfig,
    WorkersConfig,
    solver_nfe,
    steps_for_nfe,
    validate_config,
)

__all__ = [
    "AdaptiveConfig", "BaselineConfig", "BayesConfig", "ConfigError", "EvolutionConfig",
    "FieldError", "GitsConfig", "Ld3Config", "MetricConfig", "ModelConfig", "ModelSpec",
    "PredictorSection", "ReportConfig", "SamplesConfig", "SearchConfig", "SearchSection",
    "SolverConfig", "SpaceConfig", "WorkersConfig", "apply_overrides", "format_validation_error",
    "load_config", "parse_override", "read_yaml", "solver_nfe", "steps_for_nfe",
    "validate_config",
]
