"""One cell of a grid: its run under its lock (several workers share a grid), resumed or skipped
when the cell's folder says so."""

from __future__ import annotations

import traceback
from pathlib import Path
from typing import Any

from .. import launch
from ..checks import load_config
from ..errors import UserError
from ..report import atomic_write_text
from .grid import Cell, _to_sets
from ..locks import release_lock, take_lock
from .status import read_cell_summary, stale


# Set by ``run_grid_workers`` for its workers: a cell that failed after this time (seconds since
# the epoch) failed in this same call, under a sibling worker, and is not tried again.
SINCE_ENV = "LORA_A2_BENCH_SINCE"


def run_cell(cell: Cell, out: Path, since: float | None = None) -> tuple[str, dict[str, Any] | None]:
    """Run (or resume, or skip) one cell; returns (status, summary). Status ``busy``: another
    live worker holds the cell's lock; ``stale``: the cell finished with another config than
    the grid now gives it (neither rerun nor overwritten: :func:`~lora_a2.bench.status.stale`).
    A cell whose ``error.txt`` is newer than ``since`` failed under a sibling worker of this
    call and is not retried (``error-not-retried``)."""
    cell_dir = out / "cells" / cell.cell_id
    summary_path = cell_dir / "summary.json"
    if summary_path.exists():
        return _finished(cell, out)
    error = cell_dir / "error.txt"
    if since is not None and error.exists() and error.stat().st_mtime >= since:
        return "error-not-retried", None
    lock = cell_dir.parent / f"{cell.cell_id}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    held = take_lock(lock)
    if held is None:
        return "busy", None
    try:
        if summary_path.exists():  # finished by another worker between the check and the lock
            return _finished(cell, out)
        return _run_locked(cell, cell_dir)
    finally:
        release_lock(lock, held)


def _finished(cell: Cell, out: Path) -> tuple[str, dict[str, Any] | None]:
    if stale(cell, out) is not None:
        return "stale", None
    return "skipped", read_cell_summary(out, cell)


def check_cells(cells: list[Cell]) -> None:
    """Every cell's config loads and validates (a one-line :class:`UserError` naming the
    first that does not): a typo in a grid's base or an axis is refused before any cell runs,
    not met cell by cell as the grid reaches them."""
    for cell in cells:
        try:
            load_config(None, _to_sets(cell.overrides))
        except UserError as e:
            raise UserError(f"grid cell '{cell.cell_id}': {e}") from None


def _run_locked(cell: Cell, cell_dir: Path) -> tuple[str, dict[str, Any] | None]:
    resume = (cell_dir / "config.toml").exists()
    (cell_dir / "error.txt").unlink(missing_ok=True)  # a retry: only its own failure counts
    try:
        cfg = load_config(None, _to_sets(cell.overrides))  # a bad value fails this cell only
        summary = launch.run(cfg, cell_dir, overwrite=not resume, progress=False,
                             resume=resume)
    except UserError as e:
        cell_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cell_dir / "error.txt", f"{e}\n")
        return "error", None
    except Exception:  # noqa: BLE001  (one broken cell must not stop an overnight grid)
        cell_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cell_dir / "error.txt", traceback.format_exc())
        return "error", None
    return ("resumed" if resume else "ran"), summary

