"""LoRA-A2: federated LoRA fine-tuning with alternating freeze and adaptive rank selection.

Koo, Jang, Ok. "Towards Robust and Efficient Federated Low-Rank Adaptation with Heterogeneous
Clients", ACL 2025 (arXiv 2410.22815).

The Python API (for notebooks and scripts)::

    import lora_a2
    cfg = lora_a2.load_config(overrides={"strategy.name": "fl-lora", "train.rounds": 2})
    summary = lora_a2.run(cfg, out="runs/try")          # the same outputs as `lora-a2 run`
    rounds = lora_a2.read_metrics("runs/try")           # one dict per round

Strategies (``lora_a2.Strategy``, ``lora_a2.register``) and tasks (``lora_a2.LearningTask``,
``lora_a2.register_task``) are the extension points; another installed package registers a
strategy through the ``lora_a2.strategies`` entry-point group (docs/STRATEGIES.md).
Everything is imported on first use, so ``import lora_a2`` stays light.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from .config import Config

_LAZY = {
    "Config": ("lora_a2.config", "Config"),
    "Strategy": ("lora_a2.strategies.base", "Strategy"),
    "DenseStrategy": ("lora_a2.strategies.dense", "DenseStrategy"),
    "register": ("lora_a2.strategies.registry", "register"),
    "strategy_names": ("lora_a2.strategies", "strategy_names"),
    "LearningTask": ("lora_a2.tasks.base", "LearningTask"),
    "register_task": ("lora_a2.tasks.base", "register_task"),
    "UserError": ("lora_a2.errors", "UserError"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'lora_a2' has no attribute '{name}'")


def load_config(path: str | Path | None = None,
                overrides: dict[str, Any] | list[str] | str | None = None) -> Config:
    """A validated config from defaults, an optional TOML file and overrides.

    ``overrides`` is a dict of dotted keys (``{"data.alpha": 0.5}``; nested tables such as
    ``{"data": {"alpha": 0.5}}`` work too), a list of ``key=value`` strings as ``--set`` takes
    them, or one string of space-separated pairs (``"data.alpha=0.5 train.rounds=2"``).
    A bad key or value raises :class:`lora_a2.UserError` with a one-line message.
    """
    from .checks import load_config as _load
    from .config import overrides_to_sets

    return _load(path, overrides_to_sets(overrides))


def run(config: Config | str | Path | dict[str, Any] | None = None, *,
        out: str | Path | None = None, overrides: dict[str, Any] | list[str] | str | None = None,
        overwrite: bool = False, progress: bool = False) -> dict[str, Any]:
    """Run one experiment and return its summary (the contents of ``summary.json``).

    ``config`` is a :class:`Config`, a TOML path, a dict of overrides, or None (the defaults);
    ``overrides`` apply on top. ``out`` defaults to ``runs/<time>-<strategy>``.
    """
    import time

    from .config import Config as _Config
    from .config import overrides_to_sets
    from .launch import run as _launch
    from .runner import check_out_dir

    if isinstance(config, _Config):
        # re-read, so a Config edited in a notebook is checked as a file would be
        cfg = _apply_overrides(config, [] if overrides is None else overrides)
    elif isinstance(config, dict):  # key by key: an override's table does not replace the
        # config's whole table (a shallow merge reset its other keys to their defaults)
        cfg = load_config(None, [*overrides_to_sets(config), *overrides_to_sets(overrides)])
    else:
        cfg = load_config(config, overrides)
    if out is None:
        out = Path("runs") / (time.strftime("%Y%m%d-%H%M%S") + f"-{cfg.strategy.name}")
    if isinstance(config, (str, Path)):  # the TOML file is an input the run's folder must
        # not hold either (``overwrite`` would delete it), as the CLI checks for --config
        check_out_dir(Path(out), overwrite, [Path(config)])
    return _launch(cfg, Path(out), overwrite=overwrite, progress=progress)


def resume(run_dir: str | Path, *, progress: bool = False) -> dict[str, Any]:
    """Continue a crashed or stopped run after its last complete round; its summary."""
    from .launch import run as _launch
    from .runner import resume_config

    return _launch(resume_config(Path(run_dir)), Path(run_dir), progress=progress,
                          resume=True)


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The run's ``metrics.jsonl``: one dict per finished round (a line torn by a crash at the
    end is left out, as ``--resume`` would drop it)."""
    from .errors import UserError
    from .report import read_metrics as _read

    path = Path(run_dir)
    if path.is_dir() and (path / "config.toml").is_file():
        return _read(path / "metrics.jsonl")  # a run (one still before its first round: [])
    if not path.is_file():
        raise UserError(f"'{run_dir}' is not a run folder (no config.toml) or a metrics file")
    return _read(path)


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    """The run's ``summary.json`` (written when the run finished)."""
    import json

    from .errors import UserError

    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        raise UserError(f"'{run_dir}' has no summary.json (not a finished run)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"'{path}' is not valid JSON ({e})") from None


def _apply_overrides(cfg: Config, overrides: Any) -> Config:
    from .checks import check_config
    from .config import config_from_dict, overrides_to_sets

    return check_config(config_from_dict(cfg.to_dict(), overrides_to_sets(overrides)))
