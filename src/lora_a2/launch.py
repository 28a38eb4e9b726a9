"""Start a run on the engine its config names: the embedded local loop
(:func:`lora_a2.runner.run_experiment`) or Flower's Simulation Engine
(:func:`lora_a2.engines.flower.run_simulation`, whose ServerApp drives the same runner with
Flower's round function). The CLI, the Python API and the bench start runs here, so neither
engine needs to know the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .config import Config
from .runner import run_experiment


def run(cfg: Config, out: Path, *, overwrite: bool = False, progress: bool = True,
        resume: bool = False, console: bool = False) -> dict[str, Any]:
    """Run ``cfg`` into ``out`` on its engine; the run's summary. ``progress``: the progress
    bar; ``console``: print the summary at the end (the CLI)."""
    if cfg.engine.name == "flower":
        from .engines.flower import run_simulation  # optional dependency: flwr

        return run_simulation(cfg, out, overwrite=overwrite, progress=progress, resume=resume,
                              console=console)
    return run_experiment(cfg, out, overwrite=overwrite, progress=progress, resume=resume,
                          console=console)
