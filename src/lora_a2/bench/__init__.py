"""Benchmark grids: many runs, resumable, aggregated into tables and plots.

A grid is a TOML file (built-ins live in ``lora_a2/grids/``)::

    name = "main"
    seeds = [0, 1]
    [base]                       # dotted config keys applied to every cell
    "model.name" = "minilm"
    [axes]                       # crossed; a value is a config value or a table of overrides
    "strategy.name" = ["fl-lora", "lora-a2"]
    split = [{ label = "dir0.5", "data.partition" = "dirichlet", "data.alpha" = 0.5 }]
    [[include]]                  # extra cells crossed only with the axes it names (and seeds)
    overrides = { "strategy.name" = "fedavg-full" }
    axes = ["split"]

Every cell is an ordinary run in ``OUT/cells/<cell-id>/``. A cell with a ``summary.json`` is
skipped, one with only a checkpoint is resumed, so a grid that outlasts a session continues in
the next one from its finished cells (and from the last finished round of the cell that was
running). ``OUT/results.json``, ``OUT/table.md`` and ``OUT/plots/`` aggregate all finished cells.

The package, one concept per module: :mod:`~lora_a2.bench.grid` (grid files and their cells),
:mod:`~lora_a2.bench.cells` (a cell's run, holding its lock from :mod:`lora_a2.locks` while it
runs), :mod:`~lora_a2.bench.status` (cell status — stale finished cells too —,
listing, time left), :mod:`~lora_a2.bench.workers` (running a grid with one or several
worker processes) and :mod:`~lora_a2.bench.tables` (results.json, table.md and plots).
"""

from __future__ import annotations

from .cells import SINCE_ENV, check_cells, run_cell
from .grid import Cell, builtin_grids, expand, load_grid, select, smoke_overrides
from .status import cell_status, estimate_remaining, list_grid, remaining_time, torch_cuda_available
from .tables import aggregate, collect_rows, last_rounds_accuracy, task_of_metric
from .workers import run_grid, run_grid_workers

__all__ = [
    "SINCE_ENV", "Cell", "aggregate", "builtin_grids", "cell_status", "check_cells", "collect_rows",
    "estimate_remaining", "expand", "last_rounds_accuracy", "list_grid", "load_grid",
    "remaining_time", "run_cell", "run_grid", "run_grid_workers", "select", "smoke_overrides",
    "task_of_metric", "torch_cuda_available",
]
