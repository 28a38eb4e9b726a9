"""The one validation step above the components: a config's schema and range checks
(:func:`lora_a2.config.validate`, run by every loader) plus each component's own checks — the
strategy registry's, the tasks', the DP wrapper's. The config module is a leaf and knows none of
them; every entry point (the CLI, the Python API, a bench cell, :func:`lora_a2.experiment.prepare`)
runs this.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import fleet, private, reporters, strategies, tasks
from .config import Config
from .config import load_config as _parse


def check_config(cfg: Config) -> Config:
    """Run every component's config checks (one-line :class:`~lora_a2.errors.UserError`);
    returns ``cfg``."""
    strategies.check_config(cfg)
    private.check_config(cfg)
    tasks.check_config(cfg)
    reporters.check_config(cfg)
    fleet.check_config(cfg)
    return cfg


def load_config(path: str | Path | None = None,
                overrides: list[str | tuple[str, Any]] | None = None) -> Config:
    """:func:`lora_a2.config.load_config`, then :func:`check_config`."""
    return check_config(_parse(path, overrides))
