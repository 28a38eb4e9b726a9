"""Issue 19's summary figures for RESULTS §5 from the committed cells: per cheaper-selection
variant, the paired accuracy change against the main grid's full probe (mean, median, worst,
pairs below minus the full probe's pooled seed-to-seed std), and the median training seconds
per round of its BBC News cells over the `claim` grid's finished FL+LoRA cells at BBC News Dir(0.1), budget 1 (same machine).

    python benchmarks/probe_variants_summary.py
"""

from __future__ import annotations

import glob
import json
import statistics
from pathlib import Path

R = Path(__file__).resolve().parent / "results"
CELLS = ("bbc-news__dir0.1", "bbc-news__dir0.01", "rotten-tomatoes__dir0.1")
FULL = {"1": "256.0-lora-a2-1", "2": "128.0-lora-a2-2"}
VARIANTS = ("reuse", "gradient", "reselect2")


def accuracy(cell: Path) -> float | None:
    f = cell / "summary.json"
    return 100 * json.loads(f.read_text())["final_accuracy"] if f.exists() else None


def round_times(pattern: str) -> list[float]:
    out: list[float] = []
    for p in sorted(glob.glob(str(R / pattern))):
        if (Path(p) / "summary.json").exists():
            out += [json.loads(line)["train_wall_s"] for line in open(Path(p) / "metrics.jsonl")]
    return out


def main() -> None:
    sds, deltas = [], {v: [] for v in VARIANTS}
    for cell in CELLS:
        for budget, full in FULL.items():
            base = [accuracy(R / "main" / "cells" / f"{cell}__{full}__seed{s}") for s in (0, 1)]
            if None in base:
                continue
            sds.append(statistics.stdev(base))
            for v in VARIANTS:
                mine = [accuracy(R / "probe-variants" / "cells" / f"{cell}__{budget}__{v}__seed{s}")
                        for s in (0, 1)]
                deltas[v] += [m - b for m, b in zip(mine, base) if m is not None]
    pooled = statistics.fmean(s * s for s in sds) ** 0.5
    fl = statistics.median(round_times("claim/cells/dir0.1__1__fl-lora__seed*"))
    print(f"full probe: pooled seed-to-seed std {pooled:.2f} points; "
          f"FL+LoRA median train s per round (claim cells) {fl:.1f}")
    for v, d in deltas.items():
        if not d:
            continue
        t = statistics.median(round_times(f"probe-variants/cells/bbc-news__*__{v}__seed*"))
        print(f"{v}: n {len(d)}, mean Δ {statistics.fmean(d):+.1f}, median "
              f"{statistics.median(d):+.1f}, worst {min(d):+.1f}, below −{pooled:.1f}: "
              f"{sum(x < -pooled for x in d)}; train s per round {t:.1f} = {t / fl:.2f} × FL+LoRA")


if __name__ == "__main__":
    main()
