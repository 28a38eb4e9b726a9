"""One cell of a grid: its lock (several workers share a grid) and its run, resumed or skipped
when the cell's folder says so."""

from __future__ import annotations

import json
import os
import socket
import traceback
from pathlib import Path
from typing import Any

from .. import launch
from ..checks import load_config
from ..errors import UserError
from ..report import atomic_write_text
from .grid import Cell, _to_sets


# Set by ``run_grid_workers`` for its workers: a cell that failed after this time (seconds since
# the epoch) failed in this same call, under a sibling worker, and is not tried again.
SINCE_ENV = "LORA_A2_BENCH_SINCE"


def run_cell(cell: Cell, out: Path, since: float | None = None) -> tuple[str, dict[str, Any] | None]:
    """Run (or resume, or skip) one cell; returns (status, summary). Status ``busy``: another
    live worker holds the cell's lock. A cell whose ``error.txt`` is newer than ``since`` is not
    retried (``error``)."""
    cell_dir = out / "cells" / cell.cell_id
    summary_path = cell_dir / "summary.json"
    if summary_path.exists():
        return "skipped", json.loads(summary_path.read_text())
    error = cell_dir / "error.txt"
    if since is not None and error.exists() and error.stat().st_mtime >= since:
        return "error", None
    lock = cell_dir.parent / f"{cell.cell_id}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    if not _take_lock(lock):
        return "busy", None
    try:
        if summary_path.exists():  # finished by another worker between the check and the lock
            return "skipped", json.loads(summary_path.read_text())
        return _run_locked(cell, cell_dir)
    finally:
        lock.unlink(missing_ok=True)


# A worker holds ``cells/<cell>.lock`` (host and pid) while it runs the cell, so several
# ``lora-a2 bench`` processes (terminals, machines sharing the folder) can work through one grid
# together: each skips the cells another one holds. A lock left by a dead process on this host is
# taken over; one from another host is respected until someone deletes it.


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(path: Path) -> bool:
    """The lock was left by a dead process of this host (False if unreadable or mid-write)."""
    try:
        host, pid = path.read_text().split()
        return host == socket.gethostname() and not _pid_alive(int(pid))
    except (OSError, ValueError):
        return False


def _remove_if_stale(path: Path) -> None:
    """Delete a stale lock, serialised through ``cells/.takeover`` so that two workers that both
    saw the same stale lock cannot delete each other's fresh one (check and delete under one
    exclusive ``flock``; without ``fcntl`` the check is simply repeated)."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        if _is_stale(path):
            path.unlink(missing_ok=True)
        return
    with open(path.parent / ".takeover", "a") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            if _is_stale(path):
                path.unlink(missing_ok=True)
        finally:
            fcntl.flock(guard, fcntl.LOCK_UN)


def _take_lock(path: Path) -> bool:
    """Create the lock file ``path`` atomically; False when a live worker holds it."""
    me = f"{socket.gethostname()} {os.getpid()}\n"
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not _is_stale(path):
                return False
            _remove_if_stale(path)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return True
    return False


def _run_locked(cell: Cell, cell_dir: Path) -> tuple[str, dict[str, Any] | None]:
    resume = (cell_dir / "config.toml").exists()
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

