"""Typed run configuration: TOML file + ``--set key=value`` overrides, validated with clear errors.

A leaf of the package: it imports no component. :mod:`.schema` holds the sections and their
documented keys (docs/CONFIGURATION.md is generated from it), :mod:`.parse` reads files, dicts
and overrides, :mod:`.validate` checks ranges. Unknown keys and bad values raise
:class:`~lora_a2.errors.UserError` with a one-line message naming the key (and the nearest valid
key for a typo).
"""

from __future__ import annotations

from .parse import (all_keys, coerce_value, config_from_dict, flatten, load_config,
                    overrides_to_sets, parse_set, split_sets)
from .schema import (FLEET_PROFILES, LEGACY_DEFAULTS, LEGACY_STRATEGY_OPTIONS, MECHANISMS,
                     MODEL_DTYPES, MODES, NOISE_SOURCES, PARTITIONS, PRECISIONS,
                     RANK_DISTRIBUTIONS, REPORTERS, SCHEMA_VERSION, SECTIONS, Config, DataConfig,
                     EngineConfig, FleetConfig, ModelConfig, PrivacyConfig, ReportConfig,
                     SecAggConfig, ServerConfig, StrategyConfig, TaskConfig, TrainConfig)
from .validate import clients_known, clients_per_round, validate

__all__ = [
    "FLEET_PROFILES", "FleetConfig", "LEGACY_DEFAULTS", "LEGACY_STRATEGY_OPTIONS", "MECHANISMS",
    "MODEL_DTYPES", "MODES", "NOISE_SOURCES", "PARTITIONS", "PRECISIONS", "RANK_DISTRIBUTIONS",
    "REPORTERS", "SCHEMA_VERSION",
    "SECTIONS", "Config", "DataConfig", "EngineConfig", "ModelConfig", "PrivacyConfig",
    "ReportConfig", "SecAggConfig", "ServerConfig", "StrategyConfig", "TaskConfig",
    "TrainConfig", "all_keys", "clients_known", "clients_per_round", "coerce_value",
    "config_from_dict",
    "flatten", "load_config", "overrides_to_sets", "parse_set", "split_sets", "validate",
]
