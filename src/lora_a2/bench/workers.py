"""Running a grid: its cells one after another in this process, or in several worker processes
that share the grid through the cell locks; then the tables of all finished cells."""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..report import atomic_write_text
from .cells import SINCE_ENV, run_cell
from .grid import expand, load_grid, select
from .status import cell_status
from .tables import aggregate


def make_out(out: Path | str, grid: dict[str, Any]) -> Path:
    """The grid's results folder, created (with ``cells/``) before any cell runs; a path that
    cannot be one, or that another grid wrote (:func:`check_same_grid`), is a one-line error."""
    out = Path(out)
    check_same_grid(out, grid)
    try:
        (out / "cells").mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot use '{out}' as the grid's results folder (--out): "
                        f"{e.strerror or e}") from None
    return out


def check_same_grid(out: Path, grid: dict[str, Any]) -> None:
    """Refuse a results folder that another grid wrote: its cells would sit beside this grid's
    and its tables be replaced by this grid's."""
    try:
        theirs = json.loads((out / "grid.json").read_text())["grid"]["name"]
    except (OSError, ValueError, KeyError, TypeError):
        return  # a new folder (or one without a readable grid.json: nothing to protect)
    if theirs != grid["name"]:
        raise UserError(f"'{out}' holds the results of grid '{theirs}'; choose another --out "
                        f"for grid '{grid['name']}'")


def run_grid(spec: str, out: Path, smoke: bool = False, progress: bool = True,
             only: list[str] | None = None) -> dict[str, Any]:
    """Run every unfinished cell of a grid (or those matching ``only``), then aggregate all
    finished cells of the whole grid."""
    grid = load_grid(spec)
    all_cells = expand(grid, smoke)
    cells = select(all_cells, only)
    out = make_out(out, grid)
    # the grid as a whole (not this call's --only selection), so the file does not churn
    atomic_write_text(out / "grid.json", json.dumps({"grid": grid, "smoke": smoke,
                                                     "cells": [c.cell_id for c in all_cells]},
                                                    indent=1, default=str))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(cells), unit="cell", file=sys.stderr, dynamic_ncols=True)
    counts: dict[str, int] = {}
    t0 = time.perf_counter()
    try:
        since = float(os.environ[SINCE_ENV])
    except (KeyError, ValueError):
        since = None
    for cell in cells:
        if bar is not None:
            bar.set_description(cell.cell_id[:60])
        status, _ = run_cell(cell, out, since)
        counts[status] = counts.get(status, 0) + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(counts)
    if bar is not None:
        bar.close()
    result = aggregate(out, all_cells, grid)
    result.update(counts=counts, wall_s=time.perf_counter() - t0, selected=len(cells))
    return result


def run_grid_workers(spec: str, out: Path, workers: int, smoke: bool = False,
                     progress: bool = True, only: list[str] | None = None) -> dict[str, Any]:
    """:func:`run_grid` with ``workers`` processes on this machine, sharing the grid through the
    cell locks (each process is a plain ``lora-a2 bench -q``), one progress bar over all of them.

    Each worker gets ``cpu_count // workers`` torch threads unless ``OMP_NUM_THREADS`` is set;
    its output goes to ``OUT/workers/<host>-<pid>-<n>.log``. A cell that fails is not retried by
    a sibling in the same call. Ctrl-C or SIGTERM stops the workers (each gets SIGTERM, which it
    treats like Ctrl-C: a cell in progress keeps its last round's checkpoint, releases its lock
    and resumes on the next call; a worker still alive 60 s later is killed). ``unfinished`` in
    the result counts the selected cells that are neither done nor failed nor held by a live
    worker elsewhere when the workers have ended (a worker that crashed leaves them).
    """
    import signal
    import subprocess

    grid = load_grid(spec)
    all_cells = expand(grid, smoke)
    cells = select(all_cells, only)
    out = make_out(out, grid)
    before = {c.cell_id: cell_status(c, out) for c in cells}
    done_before = {cid for cid, st in before.items() if st == "done"}

    def n_done() -> int:  # polled every second: one stat per cell, no file reads
        return sum((out / "cells" / c.cell_id / "summary.json").exists() for c in cells)

    t0 = time.perf_counter()
    procs: list[subprocess.Popen] = []
    logs: list[Path] = []
    if len(done_before) < len(cells):
        log_dir = out / "workers"
        log_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        try:  # the cores this process may use (affinity, containers), not the machine's
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
        threads = str(max(1, cores // workers))
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(var, threads)
        env[SINCE_ENV] = repr(time.time())
        cmd = [sys.executable, "-m", "lora_a2.cli", "bench", spec, "--out", str(out), "--quiet"]
        cmd += ["--smoke"] if smoke else []
        for pattern in only or []:
            cmd += ["--only", pattern]
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=len(cells), initial=len(done_before), unit="cell",
                       file=sys.stderr, dynamic_ncols=True, desc=f"{workers} workers")

        def on_term(signum, frame):  # SIGTERM: stop like Ctrl-C
            raise KeyboardInterrupt

        old_term = signal.signal(signal.SIGTERM, on_term)
        try:
            for n in range(workers):
                logs.append(log_dir / f"{socket.gethostname()}-{os.getpid()}-{n}.log")
                with open(logs[-1], "w") as log:
                    procs.append(subprocess.Popen(cmd, env=env, stdout=log,
                                                  stderr=subprocess.STDOUT))
                time.sleep(0.2)  # stagger the first lock grabs a little
            while any(p.poll() is None for p in procs):
                time.sleep(1.0)
                if bar is not None:
                    bar.n = n_done()
                    bar.refresh()
        except KeyboardInterrupt:
            # SIGTERM, not SIGINT: a worker started in the background (`nohup ... &`) has SIGINT
            # ignored, and every bench process treats SIGTERM like Ctrl-C (see cli.main)
            for p in procs:
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            raise
        finally:
            signal.signal(signal.SIGTERM, old_term)
            deadline = time.monotonic() + 60
            for p in procs:  # whatever ended the loop, no worker outlives this call
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except (subprocess.TimeoutExpired, KeyboardInterrupt):
                    p.kill()
                    p.wait()
            if bar is not None:
                bar.n = n_done()
                bar.close()
    counts: dict[str, int] = {}
    unfinished = 0
    for c in cells:
        st = cell_status(c, out)
        if c.cell_id in done_before:
            key = "skipped"
        elif st == "done":
            key = "resumed" if before[c.cell_id].startswith("partial") else "ran"
        else:
            key = st.split()[0].rstrip(":")
            unfinished += key in ("todo", "partial")
        counts[key] = counts.get(key, 0) + 1
    failed = [str(logs[n]) for n, p in enumerate(procs) if p.returncode not in (0, 1)]
    result = aggregate(out, all_cells, grid)
    result.update(counts=counts, wall_s=time.perf_counter() - t0, selected=len(cells),
                  failed_workers=failed, unfinished=unfinished,
                  worker_logs=[str(p) for p in logs])
    return result
