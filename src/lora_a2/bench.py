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
"""

from __future__ import annotations

import importlib.resources
import fnmatch
import itertools
import json
import os
import re
import socket
import statistics
import sys
import time
import tomllib
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import launch
from .checks import load_config
from .config import load_config as parse_config  # the schema alone: which task a cell is
from .errors import UserError
from .tasks import TASKS, resolve_task_name
from .tasks import load_all as load_tasks
from .report import atomic_write_text

def task_of_metric(metric: str):
    """The task whose headline metric a cell's summary names (its table columns and note)."""
    load_tasks()
    by_metric = {t.metric: t for t in TASKS.values()}
    return by_metric.get(metric) or next(t for t in TASKS.values() if t.fallback)


@dataclass
class Cell:
    """One run of a grid: its id, the axis labels it sits at, and its config overrides."""

    cell_id: str
    labels: dict[str, str]
    seed: int
    overrides: dict[str, Any]


def builtin_grids() -> list[str]:
    root = importlib.resources.files("lora_a2") / "grids"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


def load_grid(spec: str) -> dict[str, Any]:
    """A grid by built-in name or TOML path."""
    path = Path(spec)
    if not path.is_file():
        res = importlib.resources.files("lora_a2") / "grids" / f"{spec}.toml"
        if not res.is_file():
            raise UserError(f"unknown grid '{spec}': not a file, and not a built-in grid "
                            f"({', '.join(builtin_grids())})")
        text = res.read_text()
    else:
        text = path.read_text()
    try:
        grid = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"grid '{spec}' is not valid TOML: {str(e).splitlines()[0]}") from None
    unknown = set(grid) - {"name", "description", "seeds", "base", "axes", "include"}
    if unknown:
        raise UserError(f"grid '{spec}': unknown top-level keys {sorted(unknown)}")
    grid.setdefault("name", Path(spec).stem)
    grid.setdefault("seeds", [0])
    grid.setdefault("base", {})
    grid.setdefault("axes", {})
    grid.setdefault("include", [])
    return grid


def smoke_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """What ``--smoke`` sets for a cell with these overrides: its task's
    :attr:`~lora_a2.tasks.base.LearningTask.smoke_overrides`."""
    cfg = parse_config(None, [(k, v) for k, v in overrides.items() if v is not None])
    return dict(TASKS[resolve_task_name(cfg)].smoke_overrides)


def _label(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("label") or "+".join(f"{k}={v}" for k, v in value.items()))
    return str(value)


def _overrides(axis: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "label"}
    return {axis: value}


def expand(grid: dict[str, Any], smoke: bool = False) -> list[Cell]:
    """All cells of a grid, in a stable order."""
    axes: dict[str, list[Any]] = grid["axes"]
    blocks: list[tuple[dict[str, Any], list[str]]] = [({}, list(axes))]
    blocks += [(inc.get("overrides", {}), list(inc.get("axes", []))) for inc in grid["include"]]
    cells: list[Cell] = []
    seen: set[str] = set()
    for extra, names in blocks:
        for name in names:
            if name not in axes:
                raise UserError(f"grid include names unknown axis '{name}'")
        for combo in itertools.product(*[axes[n] for n in names]):
            for seed in grid["seeds"]:
                labels = {n: _label(v) for n, v in zip(names, combo)}
                overrides = dict(grid["base"])
                for n, v in zip(names, combo):
                    overrides.update(_overrides(n, v))
                overrides.update(extra)
                overrides["seed"] = seed
                if smoke:  # the task's own tiny model and sizes
                    overrides.update(smoke_overrides(overrides))
                extra_label = "-".join(_label(v) for k, v in sorted(extra.items()))
                parts = [labels[n] for n in names] + ([extra_label] if extra_label else [])
                cell_id = "__".join(p.replace("/", "_").replace(" ", "") for p in parts)
                cell_id = f"{cell_id}__seed{seed}" if cell_id else f"seed{seed}"
                if cell_id in seen:
                    continue
                seen.add(cell_id)
                cells.append(Cell(cell_id, {**labels, **{k: _label(v) for k, v in extra.items()}},
                                  seed, overrides))
    return cells


def _to_sets(overrides: dict[str, Any]) -> list[str]:
    """``--set`` strings; JSON literals of str/number/bool/list are valid TOML literals."""
    return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]


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


def select(cells: list[Cell], only: list[str] | None) -> list[Cell]:
    """Cells whose id matches any of the glob patterns in ``only`` (all when empty)."""
    if not cells:
        raise UserError("the grid has no cells (is its 'seeds' list empty?)")
    if not only:
        return cells
    chosen = [c for c in cells if any(fnmatch.fnmatchcase(c.cell_id, pat) for pat in only)]
    if not chosen:
        raise UserError(f"--only {' '.join(only)} matches no cell of this grid "
                        f"(ids look like '{cells[0].cell_id}')")
    return chosen


def cell_status(cell: Cell, out: Path) -> str:
    """``done``, ``running <host> <pid>[, <r>/<T> rounds]``, ``partial <r>/<T> rounds``,
    ``error`` or ``todo`` (``r``: rounds in the cell's metrics.jsonl so far)."""
    cell_dir = out / "cells" / cell.cell_id
    if (cell_dir / "summary.json").exists():
        return "done"
    metrics = cell_dir / "metrics.jsonl"
    rounds = None
    if metrics.exists():
        try:
            n = sum(1 for line in metrics.read_text().splitlines() if line.strip())
            rounds = f"{n}/{cell.overrides.get('train.rounds', '?')} rounds"
        except OSError:
            pass
    lock = out / "cells" / f"{cell.cell_id}.lock"
    if lock.exists():
        try:
            holder = "running " + " ".join(lock.read_text().split())
        except OSError:
            holder = "running"
        return holder + (f", {rounds}" if rounds else "")
    if (cell_dir / "error.txt").exists():
        return "error"
    return f"partial {rounds}" if rounds else "todo"


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
        if st == "done":
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


def run_grid(spec: str, out: Path, smoke: bool = False, progress: bool = True,
             only: list[str] | None = None) -> dict[str, Any]:
    """Run every unfinished cell of a grid (or those matching ``only``), then aggregate all
    finished cells of the whole grid."""
    grid = load_grid(spec)
    all_cells = expand(grid, smoke)
    cells = select(all_cells, only)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
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
    out = Path(out)
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
            key = st.split()[0]
            unfinished += key in ("todo", "partial")
        counts[key] = counts.get(key, 0) + 1
    failed = [str(logs[n]) for n, p in enumerate(procs) if p.returncode not in (0, 1)]
    result = aggregate(out, all_cells, grid)
    result.update(counts=counts, wall_s=time.perf_counter() - t0, selected=len(cells),
                  failed_workers=failed, unfinished=unfinished,
                  worker_logs=[str(p) for p in logs])
    return result


def _fmt(xs: list[float], scale: float = 100.0) -> str:
    if not xs:
        return "—"
    mean = statistics.fmean(xs) * scale
    if len(xs) == 1:
        return f"{mean:.2f}"
    return f"{mean:.2f} ± {statistics.stdev(xs) * scale:.2f}"


def last_rounds_accuracy(metrics: Path, n: int = 3, key: str = "accuracy") -> float | None:
    """Mean of ``key`` (test accuracy by default) over the last ``n`` evaluated rounds of a run
    (None if none).

    The final round alone is a noisy statistic under strong non-IID splits: the global model
    oscillates from round to round (client drift), so the same cell run on another device, whose
    floating-point rounding differs, can end several points apart with the same trajectory.
    """
    accs = []
    try:
        for line in metrics.read_text().splitlines():
            rec = json.loads(line) if line.strip() else {}
            if isinstance(rec.get(key), (int, float)):
                accs.append(float(rec[key]))
    except (OSError, ValueError):
        return None
    return statistics.fmean(accs[-n:]) if accs else None


def collect_rows(out: Path, cells: list[Cell]) -> list[dict[str, Any]]:
    """One row per finished cell (labels, the task's headline figures, bytes, device, time);
    reads, writes nothing."""
    rows = []
    for cell in cells:
        path = out / "cells" / cell.cell_id / "summary.json"
        if not path.exists():
            continue
        s = json.loads(path.read_text())
        metric = s.get("metric", "accuracy")
        figures = {}
        for key, _ in task_of_metric(metric).bench_columns:
            figures[key] = last_rounds_accuracy(path.parent / "metrics.jsonl", key=metric) \
                if key == f"last3_{metric}" else s.get(key)
        rows.append({"cell": cell.cell_id, "seed": cell.seed, **cell.labels, "metric": metric,
                     **figures,
                     "device": s.get("device", "cpu"),
                     "total_upload_bytes": s["total_upload_bytes"],
                     "total_download_bytes": s["total_download_bytes"],
                     "total_upload_params": s["total_upload_params"],
                     "upload_fraction_of_fedavg_full": s["upload_fraction_of_fedavg_full"],
                     "epsilon": s.get("epsilon"), "wall_s": s["wall_s"]})
    return rows


def aggregate(out: Path, cells: list[Cell], grid: dict[str, Any]) -> dict[str, Any]:
    """results.json (one row per finished cell), table.md (mean ± std over seeds), plots."""
    rows = collect_rows(out, cells)
    metric = rows[0]["metric"] if rows else "accuracy"
    columns = task_of_metric(metric).bench_columns
    label_keys = [k for k in dict.fromkeys(k for c in cells for k in c.labels)]
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(tuple(r.get(k, "") for k in label_keys), []).append(r)
    table = [{**dict(zip(label_keys, key)), "seeds": len(rs),
              **{col: _fmt([r[col] for r in rs if r.get(col) is not None], scale)
                 for col, scale in columns},
              "devices": "+".join(sorted({r["device"] for r in rs})),
              "upload_MB": f"{statistics.fmean(r['total_upload_bytes'] for r in rs) / 1e6:.2f}",
              "upload_%_of_fedavg_full": _fmt([r["upload_fraction_of_fedavg_full"] for r in rs],
                                               100.0)}
             for key, rs in groups.items()]
    atomic_write_text(out / "results.json", json.dumps({"rows": rows, "table": table}, indent=1))
    cols = label_keys + ["seeds", *(c for c, _ in columns),
                         "upload_MB", "upload_%_of_fedavg_full", "devices"]
    md = [f"# {grid['name']}: {len(rows)} of {len(cells)} cells finished", "",
          task_of_metric(metric).bench_note, "",
          "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(str(t.get(c, "")) for c in cols) + " |" for t in table]
    atomic_write_text(out / "table.md", "\n".join(md) + "\n")
    if rows:
        _plot(rows, out / "plots", label_keys, metric)
    return {"finished": len(rows), "cells": len(cells), "table": str(out / "table.md")}


def _plot(rows: list[dict[str, Any]], out_dir: Path, label_keys: list[str],
          metric: str = "accuracy") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    colour_key = "strategy.name" if "strategy.name" in label_keys else label_keys[0] \
        if label_keys else None
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for name in sorted({str(r.get(colour_key, "")) for r in rows}):
        sel = [r for r in rows if str(r.get(colour_key, "")) == name]
        ax.scatter([r["total_upload_bytes"] / 1e6 for r in sel],
                   [100 * r[f"final_{metric}"] for r in sel], label=name, s=14)
    ax.set_xscale("log")
    ax.set_xlabel("total upload (MB, log)")
    ax.set_ylabel("final test accuracy (%)" if metric == "accuracy"
                  else f"final {metric.replace('_', '-').upper()} (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / f"{metric}_vs_upload.png")
    plt.close(fig)
