"""Reporters of the round events (:mod:`.base`): what a run shows and writes as it goes.

Always: ``metrics.jsonl`` (:mod:`.metrics_file`) and the plots (:mod:`.plots`); the progress bar
(:mod:`.progress`) unless quiet; the console summary (:mod:`.console`) from the CLI. Optional,
chosen by ``report.to`` (HF Trainer's ``report_to``): ``tensorboard`` and ``mlflow``, each an
extra (``pip install 'lora-a2[tensorboard]'``, ``'lora-a2[mlflow]'``). Adding a reporter is one
new module here and one entry in :data:`OPTIONAL`.
"""

from __future__ import annotations

import importlib.util

from ..config import REPORTERS, Config
from ..errors import UserError
from .base import Reporter, Reporters, RunStart, scalars
from .console import ConsoleSummary
from .metrics_file import MetricsFile
from .mlflow import MlflowReporter
from .plots import Plots
from .progress import ProgressBar
from .tensorboard import TensorBoardReporter

#: ``report.to`` name → reporter class (its ``package`` must be importable)
OPTIONAL: dict[str, type[Reporter]] = {"tensorboard": TensorBoardReporter,
                                       "mlflow": MlflowReporter}
assert set(OPTIONAL) == set(REPORTERS), "config.REPORTERS names the optional reporters"


def check_config(cfg: Config) -> None:
    """Each reporter ``report.to`` names is installed (one-line :class:`UserError`)."""
    for name in cfg.report.to:
        package = getattr(OPTIONAL[name], "package", name)
        if importlib.util.find_spec(package) is None:
            raise UserError(f"config key 'report.to' names '{name}', but the package "
                            f"'{package}' is not installed: pip install 'lora-a2[{name}]'")


def build_reporters(cfg: Config, *, progress: bool, console: bool = False) -> Reporters:
    """The run's reporters, in the order each event reaches them: metrics.jsonl first (the
    round is on disk before anything else hears of it)."""
    chosen: list[Reporter] = [MetricsFile()]
    if progress:
        chosen.append(ProgressBar())
    chosen.append(Plots())
    chosen += [OPTIONAL[name]() for name in cfg.report.to]
    if console:
        chosen.append(ConsoleSummary())
    return Reporters(chosen)


__all__ = ["OPTIONAL", "ConsoleSummary", "MetricsFile", "MlflowReporter", "Plots",
           "ProgressBar", "Reporter", "Reporters", "RunStart", "TensorBoardReporter",
           "build_reporters", "check_config", "scalars"]
