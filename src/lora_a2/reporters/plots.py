"""``DIR/plots/``: each of the task's metrics per round and against cumulative upload (PNG),
drawn when the run ends."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .base import Reporter, RunStart


class Plots(Reporter):
    def __init__(self) -> None:
        self.run: RunStart | None = None

    def start(self, run: RunStart) -> None:
        self.run = run

    def end(self, summary: dict[str, Any], records: list[dict[str, Any]]) -> None:
        run = self.run
        assert run is not None
        make_plots(records, run.out / "plots", run.initial, run.title, run.plots)


def make_plots(records: list[dict[str, Any]], out_dir: Path, initial: dict[str, Any] | None,
               title: str, metrics: tuple[tuple[str, str, float], ...] = (
                   ("accuracy", "test accuracy (%)", 100.0),)) -> list[Path]:
    """For each (key, axis label, scale) of ``metrics``: ``<key>_per_round.png``,
    ``<key>_vs_upload.png`` (against cumulative upload, MB) and, when the rounds carry a
    simulated clock (``fleet.profile``), ``<key>_vs_time.png`` (against simulated hours); round
    0 is ``initial``. Rounds without a value (None) are left out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, label, scale in metrics:
        rows = [(r["round"], r.get(key), r.get("cumulative_upload_bytes", math.nan) / 1e6,
                 r.get("sim_time_s", math.nan) / 3600)
                for r in records]  # a central-DP release may withhold the upload sizes
        if initial is not None:
            rows = [(0, initial.get(key), 0.0, 0.0)] + rows
        rows = [(rnd, scale * v, cum, t) for rnd, v, cum, t in rows if v is not None]
        if not rows:
            continue
        axes = [("per_round", 0, "round")]
        if not any(math.isnan(r[2]) for r in rows):
            axes.append(("vs_upload", 2, "cumulative upload (MB, all clients)"))
        if not any(math.isnan(r[3]) for r in rows):
            axes.append(("vs_time", 3, "simulated time (hours)"))
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


