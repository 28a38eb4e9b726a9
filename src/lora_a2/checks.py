"""The one validation step above the components: a config's schema and range checks
(:func:`lora_a2.config.validate`, run by every loader) plus each component's own checks — the
strategy registry's, the tasks', the DP wrapper's. The config module is a leaf and knows none of
them; every entry point (the CLI, the Python API, a bench cell, :func:`lora_a2.experiment.prepare`)
runs this.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from . import fleet, private, reporters, strategies, tasks
from .config import Config
from .errors import UserError
from .config import load_config as _parse


def check_config(cfg: Config) -> Config:
    """Run every component's config checks (one-line :class:`~lora_a2.errors.UserError`);
    returns ``cfg``."""
    check_home_folders(cfg)  # first: the components' checks open some of these paths
    strategies.check_config(cfg)
    private.check_config(cfg)
    tasks.check_config(cfg)
    reporters.check_config(cfg)
    fleet.check_config(cfg)
    return cfg


def check_home_folders(cfg: Config) -> None:
    """A path the run opens that starts with ``~user`` must name a user this machine knows
    (``Path.expanduser`` raised a traceback). Here, not in the config's own checks: a run
    folder copied from another machine still loads for ``lora-a2 generate``, which opens none
    of them."""
    for key, value in (("model.name", cfg.model.name), ("data.name", cfg.data.name),
                       ("fleet.profile", cfg.fleet.profile)):
        for part in re.split(r"[,:]", value):  # csv:PATH, csv:A,B, hf:NAME:CONFIG
            if part.strip().startswith("~"):
                user = part.strip()[1:].split("/", 1)[0]
                if os.path.expanduser(f"~{user}") == f"~{user}":
                    raise UserError(f"config key '{key}' names the home folder of "
                                    f"'{user or '(you)'}', which this machine does not know, "
                                    f"got {value!r}")


def load_config(path: str | Path | None = None,
                overrides: list[str | tuple[str, Any]] | None = None) -> Config:
    """:func:`lora_a2.config.load_config`, then :func:`check_config`."""
    return check_config(_parse(path, overrides))
