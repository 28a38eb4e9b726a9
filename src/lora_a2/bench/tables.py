"""A grid's results: one row per finished cell (results.json), mean ± std over seeds
(table.md), and the accuracy-against-upload plot; columns and note from the cells' task."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from ..report import atomic_write_text
from ..tasks import TASKS
from ..tasks import load_all as load_tasks
from .grid import Cell
from ..locks import exclusive
from .status import read_cell_summary, stale


def task_of_metric(metric: str):
    """The task whose headline metric a cell's summary names (its table columns and note)."""
    load_tasks()
    by_metric = {t.metric: t for t in TASKS.values()}
    return by_metric.get(metric) or next(t for t in TASKS.values() if t.fallback)


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
            if isinstance(rec, dict) and isinstance(rec.get(key), (int, float)):
                accs.append(float(rec[key]))
    except (OSError, ValueError):
        return None
    return statistics.fmean(accs[-n:]) if accs else None


def clock_figures(summary: dict[str, Any], metrics: Path) -> dict[str, Any]:
    """A fleet cell's time figures (empty without a fleet): the simulated time of the run, the
    simulated time to each ``report.targets`` value (``time_to_<target>``; None = never
    reached), and ``upload_time_share``: of all the client-seconds on the clock (download +
    compute + upload of every client that got a task, in every round), the share spent
    uploading."""
    if "sim_time_s" not in summary:
        return {}
    parts = {"sim_download_s": 0.0, "sim_compute_s": 0.0, "sim_upload_s": 0.0}
    try:
        for line in metrics.read_text().splitlines():
            rec = json.loads(line) if line.strip() else {}
            for c in (rec.get("per_client") or []) if isinstance(rec, dict) else []:
                for k in parts:
                    parts[k] += float(c.get(k) or 0.0)
    except (OSError, ValueError, TypeError, AttributeError):  # a line edited by hand
        pass
    total = sum(parts.values())
    return {"sim_time_s": summary["sim_time_s"],
            **{f"time_to_{t['target']:g}": t["sim_time_s"]
               for t in summary.get("time_to_target") or []},
            "upload_time_share": parts["sim_upload_s"] / total if total > 0 else None}


def collect_rows(out: Path, cells: list[Cell]) -> list[dict[str, Any]]:
    """One row per finished cell (labels, the task's headline figures, bytes, device, time);
    a cell that finished with another config than the grid now gives it is left out
    (:func:`~lora_a2.bench.status.stale`). Reads, writes nothing."""
    rows = []
    for cell in cells:
        path = out / "cells" / cell.cell_id / "summary.json"
        if not path.exists() or stale(cell, out) is not None:
            continue
        s = read_cell_summary(out, cell)
        metric = s.get("metric", "accuracy")
        figures = {}
        for key, _ in task_of_metric(metric).bench_columns:
            figures[key] = last_rounds_accuracy(path.parent / "metrics.jsonl", key=metric) \
                if key == f"last3_{metric}" else s.get(key)
        rows.append({"cell": cell.cell_id, "seed": cell.seed, **cell.labels, "metric": metric,
                     **figures,
                     "device": s.get("device", "cpu"),
                     # bf16-mixed only: which kernels ran its matrix products (train.bf16_matmul)
                     "bf16_products_in_fp32": s.get("bf16_products_in_fp32"),
                     "total_upload_bytes": s["total_upload_bytes"],
                     "total_download_bytes": s["total_download_bytes"],
                     "total_upload_params": s["total_upload_params"],
                     "upload_fraction_of_fedavg_full": s.get("upload_fraction_of_fedavg_full"),
                     "epsilon": s.get("epsilon"), "wall_s": s["wall_s"],
                     **clock_figures(s, path.parent / "metrics.jsonl")})
    return rows


def _megabytes(xs: list[float | None]) -> str:
    """Mean of the seeds' upload bytes in MB; "—" when a run withheld them (central DP)."""
    got = [x for x in xs if x is not None]
    return f"{statistics.fmean(got) / 1e6:.2f}" if got and len(got) == len(xs) else "—"


def _fmt_time(xs: list[float | None]) -> str:
    """Mean ± std of the seeds' simulated seconds; 'never' counts the seeds that did not get
    there."""
    got = [x for x in xs if x is not None]
    never = len(xs) - len(got)
    text = _fmt(got, 1.0) if got else ""
    return (text + (f" ({never} never)" if got else "never")) if never else text


def aggregate(out: Path, cells: list[Cell], grid: dict[str, Any]) -> dict[str, Any]:
    """results.json (one row per finished cell), table.md (mean ± std over seeds), plots —
    under ``OUT/.aggregate``'s lock, so that a worker that collected the finished cells before
    a sibling finished one more cannot write its older view over the sibling's."""
    out.mkdir(parents=True, exist_ok=True)
    with exclusive(out / ".aggregate"):
        return _aggregate(out, cells, grid)


def _aggregate(out: Path, cells: list[Cell], grid: dict[str, Any]) -> dict[str, Any]:
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
              # central DP withholds the per-client bytes: no figure rather than a wrong one
              "upload_MB": _megabytes([r["total_upload_bytes"] for r in rs]),
              "upload_%_of_fedavg_full": _fmt([r["upload_fraction_of_fedavg_full"] for r in rs
                                               if r["upload_fraction_of_fedavg_full"] is not None],
                                              100.0)}
             for key, rs in groups.items()]
    # a fleet's clock: simulated time, time to each target, the share of it spent uploading
    clock = [k for k in dict.fromkeys(k for r in rows for k in r)
             if k == "sim_time_s" or k.startswith("time_to_")]
    if clock:
        for t, (key, rs) in zip(table, groups.items()):
            for k in clock:
                t[k] = _fmt_time([r.get(k) for r in rs])
            t["upload_time_%"] = _fmt([r["upload_time_share"] for r in rs
                                       if r.get("upload_time_share") is not None])
        clock.append("upload_time_%")
    atomic_write_text(out / "results.json", json.dumps({"rows": rows, "table": table}, indent=1))
    cols = label_keys + ["seeds", *(c for c, _ in columns), *clock,
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
    # central DP: not placed; a cell without the metric (a causal-LM grid with
    # task.generate_examples = 0 has no ROUGE-L) neither
    rows = [r for r in rows if r["total_upload_bytes"] is not None
            and isinstance(r.get(f"final_{metric}"), (int, float))]
    for name in sorted({str(r.get(colour_key, "")) for r in rows}):
        sel = [r for r in rows if str(r.get(colour_key, "")) == name]
        ax.scatter([r["total_upload_bytes"] / 1e6 for r in sel],
                   [100 * r[f"final_{metric}"] for r in sel], label=name, s=14)
    ax.set_xscale("log")
    ax.set_xlabel("total upload (MB, log)")
    ax.set_ylabel("final test accuracy (%)" if metric == "accuracy"
                  else f"final {metric.replace('_', '-').upper()} (%)")
    ax.grid(alpha=0.3)
    if colour_key and rows:  # a grid without axes (seeds only) has nothing to tell apart
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / f"{metric}_vs_upload.png")
    plt.close(fig)
