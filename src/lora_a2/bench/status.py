"""Where a grid stands without running anything: each cell's status, and the time the rest
should take at the speed its finished cells ran."""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..checks import load_config
from ..config import differences
from ..errors import UserError
from .grid import Cell, _to_sets, expand, load_grid, select
from ..locks import lock_held

#: what every finished cell's summary.json has (the tables read them all)
SUMMARY_KEYS = {"total_upload_bytes", "total_download_bytes", "total_upload_params", "wall_s"}


def read_cell_summary(out: Path, cell: Cell) -> dict:
    """A finished cell's summary.json; one-line :class:`UserError` naming the cell when it is
    damaged (cut short, edited), rather than a JSON traceback after every cell ran."""
    path = Path(out) / "cells" / cell.cell_id / "summary.json"
    try:
        s = json.loads(path.read_text())
        if not isinstance(s, dict) or not SUMMARY_KEYS <= set(s):
            raise ValueError("not a run summary")
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise UserError(f"cell '{cell.cell_id}': its summary.json is damaged ({e}); delete the "
                        f"folder '{path.parent}' to run the cell again") from None
    return s


def stale(cell: Cell, out: Path) -> str | None:
    """Why a finished cell is not the grid's cell any more (None when it is): the config it ran
    with (its ``config.toml``) against the one the grid gives it now — a ``[base]`` value or an
    axis value edited since, or ``--smoke`` cells in the full grid's folder. Such a cell is
    neither rerun nor tabulated."""
    saved = out / "cells" / cell.cell_id / "config.toml"
    try:
        diff = differences(load_config(None, _to_sets(cell.overrides)), load_config(saved))
    except (UserError, OSError) as e:
        return f"its config.toml cannot be read: {e}"
    if not diff:
        return None
    key, grid, ran = diff[0]
    more = f" (and {len(diff) - 1} more)" if len(diff) > 1 else ""
    return f"'{key}' ran as {ran!r}, the grid now gives {grid!r}{more}"


def _rounds(cell: Cell) -> int | str:
    """The rounds a cell runs: its override, else the config's default ("?" if unreadable)."""
    if "train.rounds" in cell.overrides:
        return cell.overrides["train.rounds"]
    try:
        return load_config(None, _to_sets(cell.overrides)).train.rounds
    except UserError:
        return "?"


def cell_status(cell: Cell, out: Path) -> str:
    """``done``, ``stale: <why>`` (finished with another config, :func:`stale`),
    ``running <host> <pid>[, <r>/<T> rounds]``, ``partial <r>/<T> rounds``, ``error`` or
    ``todo`` (``r``: rounds in the cell's metrics.jsonl so far). A lock nobody holds (its worker
    died) does not make a cell running."""
    cell_dir = out / "cells" / cell.cell_id
    if (cell_dir / "summary.json").exists():
        why = stale(cell, out)
        return "done" if why is None else f"stale: {why}"
    metrics = cell_dir / "metrics.jsonl"
    rounds = None
    if metrics.exists():
        try:
            n = sum(1 for line in metrics.read_text().splitlines() if line.strip())
            rounds = f"{n}/{_rounds(cell)} rounds"
        except OSError:
            pass
    lock = out / "cells" / f"{cell.cell_id}.lock"
    if lock.exists() and lock_held(lock):
        try:
            holder = "running " + " ".join(lock.read_bytes().decode(errors="replace").split())
        except OSError:
            holder = "running"
        return holder + (f", {rounds}" if rounds else "")
    if (cell_dir / "error.txt").exists():
        return "error: " + error_reason(cell_dir / "error.txt")
    return f"partial {rounds}" if rounds else "todo"


def error_reason(path: Path) -> str:
    """Why a cell failed, in one line: its ``error.txt``'s last line (a one-line error's only
    line, a traceback's exception), cut to 200 characters."""
    try:
        lines = [ln for ln in path.read_bytes().decode(errors="replace").splitlines()
                 if ln.strip()]
    except OSError:
        return "(error.txt unreadable)"
    return lines[-1].strip()[:200] if lines else "(no reason recorded)"


def list_grid(spec: str, out: Path, smoke: bool = False,
              only: list[str] | None = None) -> list[tuple[str, str]]:
    """(cell id, status) of every selected cell; runs nothing."""
    cells = select(expand(load_grid(spec), smoke), only)
    return [(c.cell_id, cell_status(c, Path(out))) for c in cells]


def torch_cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def remaining_time(spec: str, out: Path, smoke: bool = False,
                   only: list[str] | None = None) -> tuple[float, int]:
    """:func:`estimate_remaining` for the selected cells of a grid, from the wall times in the
    finished cells' summary.json (all finished cells of the grid that ran on this machine's kind
    of device inform the means; all of them when none did)."""
    out = Path(out)
    all_cells = expand(load_grid(spec), smoke)
    wall: dict[str, float] = {}
    device: dict[str, str] = {}
    for c in all_cells:
        f = out / "cells" / c.cell_id / "summary.json"
        try:
            s = json.loads(f.read_text())
            wall[c.cell_id] = float(s["wall_s"])
            device[c.cell_id] = str(s.get("device", "cpu")).split(":")[0]
        except (OSError, ValueError, KeyError, TypeError):
            continue
    # Cost the rest at this machine's speed: a GPU cell takes a fraction of a CPU cell's time.
    here = "cuda" if torch_cuda_available() else "cpu"
    if any(d == here for d in device.values()):
        wall = {k: v for k, v in wall.items() if device[k] == here}
    chosen = select(all_cells, only)
    known = [c for c in all_cells if c.cell_id in wall]
    ids = {c.cell_id for c in chosen}
    cells = chosen + [c for c in known if c.cell_id not in ids]
    statuses = [cell_status(c, out) for c in chosen] + ["done"] * (len(cells) - len(chosen))
    return estimate_remaining(cells, statuses, wall)


def estimate_remaining(cells: list[Cell], statuses: list[str],
                       wall: dict[str, float]) -> tuple[float, int]:
    """Seconds one worker needs for the cells not yet done, and how many of them were guessed
    from the grid-wide mean. ``wall`` maps finished cell ids to their measured wall time. A cell
    not done is costed at the mean wall time of the finished cells with the same strategy and
    dataset, else the same strategy, else all finished cells; a partial or running cell whose
    status says ``r/T rounds`` is costed at the ``(T - r) / T`` it has left."""
    if not wall:
        return float("nan"), sum(st != "done" for st in statuses)

    def means(*names: str) -> dict[tuple, float]:
        groups: dict[tuple, list[float]] = {}
        for c in cells:
            if c.cell_id in wall:
                groups.setdefault(tuple(c.overrides.get(n) for n in names), []).append(
                    wall[c.cell_id])
        return {k: sum(v) / len(v) for k, v in groups.items()}

    by_data, by_strategy = means("strategy.name", "data.name"), means("strategy.name")
    total, guessed = 0.0, 0
    overall = sum(wall.values()) / len(wall)
    for cell, st in zip(cells, statuses):
        if st == "done" or st.startswith("stale"):  # a stale cell is never re-run
            continue
        name, data = cell.overrides.get("strategy.name"), cell.overrides.get("data.name")
        est = by_data.get((name, data), by_strategy.get((name,)))
        if est is None:
            est, guessed = overall, guessed + 1
        m = _ROUNDS.search(st)
        if m and int(m.group(2)) > 0:
            est *= max(0.0, 1.0 - int(m.group(1)) / int(m.group(2)))
        total += est
    return total, guessed


_ROUNDS = re.compile(r"(\d+)/(\d+) rounds")
