"""Run outputs: metrics.jsonl (one line per round), summary.json, plots, and the console summary."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file, fsync, rename, fsync the folder: a crash at any instant leaves
    either the old file or the new one, never a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


class MetricsWriter:
    """Appends one JSON object per round to ``metrics.jsonl``, flushed and fsynced per line."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":"), allow_nan=True) + "\n"
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def read_metrics(path: Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: Path, last_round: int) -> None:
    """Keep only complete lines of rounds ≤ ``last_round``, one per round in round order (drops
    a torn tail after a crash, and a round written twice — by two processes that ran the same
    folder at once — keeps its last line, so totals summed over the lines stay right)."""
    path = Path(path)
    if not path.exists():
        return
    raw = path.read_bytes()
    by_round: dict[int, str] = {}
    for line in raw.decode("utf-8", errors="replace").split("\n"):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("round"), int) \
                and record["round"] <= last_round:
            by_round[record["round"]] = line
    text = "".join(by_round[r] + "\n" for r in sorted(by_round))
    if text.encode() != raw:
        atomic_write_text(path, text)


def make_plots(records: list[dict[str, Any]], out_dir: Path, initial: dict[str, Any] | None,
               title: str, metrics: tuple[tuple[str, str, float], ...] = (
                   ("accuracy", "test accuracy (%)", 100.0),)) -> list[Path]:
    """For each (key, axis label, scale) of ``metrics``: ``<key>_per_round.png`` and
    ``<key>_vs_upload.png`` (against cumulative upload, MB); round 0 is ``initial``. Rounds
    without a value (None) are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, label, scale in metrics:
        rows = [(r["round"], r.get(key), r.get("cumulative_upload_bytes", math.nan) / 1e6)
                for r in records]  # a central-DP release may withhold the upload sizes
        if initial is not None:
            rows = [(0, initial.get(key), 0.0)] + rows
        rows = [(rnd, scale * v, cum) for rnd, v, cum in rows if v is not None]
        if not rows:
            continue
        axes = [("per_round", 0, "round")]
        if not any(math.isnan(r[2]) for r in rows):
            axes.append(("vs_upload", 2, "cumulative upload (MB, all clients)"))
        for suffix, col, xlabel in axes:
            fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
            ax.plot([r[col] for r in rows], [r[1] for r in rows], marker="o", ms=3)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(label)
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3)
            fig.tight_layout()
            path = out_dir / f"{key}_{suffix}.png"
            fig.savefig(path)
            plt.close(fig)
            paths.append(path)
    return paths


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def format_summary(s: dict[str, Any], metric_lines: list[str]) -> str:
    """The console summary; ``metric_lines`` are the task's (accuracy, or loss and ROUGE-L)."""
    lines = [
        f"strategy {s['strategy']} · model {s['model']} · data {s['data']} · "
        f"{s['num_clients']} clients · {s['rounds']} rounds",
        *metric_lines,
        (f"  upload     {human_bytes(s['total_upload_bytes'])} ({s['total_upload_params']:,} "
         f"values) = {100 * s['upload_fraction_of_fedavg_full']:.3f}% of fedavg-full's "
         f"{human_bytes(s['fedavg_full_upload_bytes'])}"
         + (f", {100 * s['upload_fraction_of_fl_lora']:.1f}% of fl-lora's at the same rank"
            if s.get("fl_lora_upload_params") else ""))
        if s.get("total_upload_bytes") is not None else
        "  upload     withheld from the release (central DP: its size depends on the data; "
        "see server_log.jsonl)",
        f"  download   {human_bytes(s['total_download_bytes'])} "
        f"({s['total_download_params']:,} values)",
        f"  wall time  {s['wall_s']:.1f} s",
        f"  outputs    {s['out_dir']}",
    ]
    rows = s.get("data_rows") or {}
    skipped = {k: v for k, v in rows.get("skipped", {}).items() if v}
    if skipped or rows.get("truncated"):
        why = ", ".join(f"{v:,} {k}" for k, v in skipped.items())
        lines.insert(1 + len(metric_lines),
                     f"  data       {rows.get('read', 0):,} rows read, "
                     f"{rows.get('kept', 0):,} kept"
                     + (f"; skipped: {why}" if why else "")
                     + (f"; {rows['truncated']:,} inputs shortened to fit"
                        if rows.get("truncated") else ""))
    if s.get("epsilon") is not None:
        p = s.get("privacy", {})
        lines.insert(len(lines) - 2, f"  privacy    ε = {s['epsilon']:.3g}, δ = {s['delta']:g} "
                        f"({p.get('mechanism', '?')}, {p.get('mode', '?')}, clip "
                        f"{p.get('clip', '?')}, noise multiplier {p.get('noise_multiplier', '?')})"
                        + (f"; slot selection private, its share ε = "
                           f"{s['selection_epsilon']:.3g}" if s.get("selection_epsilon")
                           is not None else "")
                        + f"; noise {p.get('noise_source', '?')}")
        for caveat in p.get("caveats", []):
            lines.insert(len(lines) - 2, f"  caveat     {caveat}")
    if s.get("rejected_updates"):
        lines.insert(len(lines) - 2, f"  rejected   {s['rejected_updates']} updates")
    return "\n".join(lines)
