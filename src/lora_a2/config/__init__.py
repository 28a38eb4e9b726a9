"""Typed run configuration: TOML file + ``--set key=value`` overrides, validated with clear errors.

A leaf of the package: it imports no component. :mod:`.schema` holds the sections and their
documented keys (docs/CONFIGURATION.md is generated from it), :mod:`.parse` reads files, dicts
and overrides, :mod:`.validate` checks ranges. Unknown keys and bad values raise
:class:`~lora_a2.errors.UserError` with a one-line message naming the key (and the nearest valid
key for a typo).
"""

from __future__ import annotations

from .parse import (all_keys, coerce_value, config_from_dict, differences, flatten, load_config,
                    overrides_to_sets, parse_set, split_sets)
from .schema import (BF16_MATMULS, CROSS_PHASE, FLEET_PROFILES, LEGACY_DEFAULTS,
                     LEGACY_STRATEGY_OPTIONS, MECHANISMS, MODEL_DTYPES, MODES, NOISE_SOURCES,
                     PARTITIONS, PRECISIONS, RANK_DISTRIBUTIONS, REPORTERS, SCHEMA_VERSION,
                     SECTIONS, TRAIN_MODES, Config, DataConfig, EngineConfig, FleetConfig,
                     ModelConfig, PrivacyConfig, ReportConfig, SecAggConfig, ServerConfig,
                     StrategyConfig, TaskConfig, TrainConfig)
from .validate import clients_known, clients_per_round, phase_every, validate

__all__ = [
    "BF16_MATMULS", "CROSS_PHASE", "FLEET_PROFILES", "FleetConfig", "LEGACY_DEFAULTS",
    "LEGACY_STRATEGY_OPTIONS", "MECHANISMS",
    "MODEL_DTYPES", "MODES", "NOISE_SOURCES", "PARTITIONS", "PRECISIONS", "RANK_DISTRIBUTIONS",
    "REPORTERS", "SCHEMA_VERSION",
    "SECTIONS", "Config", "DataConfig", "EngineConfig", "ModelConfig", "PrivacyConfig",
    "ReportConfig", "SecAggConfig", "ServerConfig", "StrategyConfig", "TaskConfig",
    "TRAIN_MODES", "TrainConfig", "all_keys", "clients_known", "clients_per_round",
    "coerce_value",
    "config_from_dict", "differences",
    "flatten", "load_config", "overrides_to_sets", "parse_set", "phase_every", "split_sets",
    "validate",
]
