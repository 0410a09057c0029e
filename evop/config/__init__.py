"""The one typed configuration of an EvoP run: :mod:`evop.config.sections` (what can be set) and
:mod:`evop.config.loading` (from a YAML file and ``key=value`` overrides).

Precedence: ``key=value`` overrides on the command line > the YAML file > the defaults of the sections.
The same object is the CLI's input, the pipeline's parameter and what gets logged as params.
"""

from evop.config.loading import build_config, format_validation_error, load_config, parse_overrides
from evop.config.sections import (
    HASH_NEUTRAL_DEFAULTS,
    CalibrationConfig,
    ConfigError,
    EvaluationConfig,
    EvoPConfig,
    FitnessConfig,
    ModelConfig,
    RegistryConfig,
    ScaleConfig,
    SearchConfig,
    SearchMethod,
    StorageConfig,
    without_neutral_defaults,
)

__all__ = [
    "HASH_NEUTRAL_DEFAULTS",
    "CalibrationConfig",
    "ConfigError",
    "EvaluationConfig",
    "EvoPConfig",
    "FitnessConfig",
    "ModelConfig",
    "RegistryConfig",
    "ScaleConfig",
    "SearchConfig",
    "SearchMethod",
    "StorageConfig",
    "build_config",
    "format_validation_error",
    "load_config",
    "parse_overrides",
    "without_neutral_defaults",
]
