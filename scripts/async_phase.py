"""Measure the A/B phase rule of alternating methods under train.mode = "async"
(docs/FLEETS.md § Asynchronous rounds): for each (phase_every, cross_phase) cell, the fraction
of arrivals trained in another phase than the round they arrive in (cross_phase), of those
that trained the factor the round keeps frozen (frozen_target), and the final metric.

    PYTHONPATH=src python scripts/async_phase.py OUT_DIR [--set KEY=VALUE ...]

Every cell runs in this one process, one after the other, with the given --set items on top.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lora_a2.checks import load_config
from lora_a2.report import read_metrics
from lora_a2.runner import run_experiment

CELLS = [("1", "apply"), ("0", "apply"), ("1", "drop"), ("0", "drop")]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("out", type=Path)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--cells", default=",".join(f"{p}/{m}" for p, m in CELLS))
    a = ap.parse_args()
    rows = []
    for cell in a.cells.split(","):
        every, mode = cell.split("/")
        cfg = load_config(None, ["train.mode=async", *a.set, f"train.phase_every={every}",
                                 f"train.cross_phase={mode}"])
        out = a.out / f"every{every}-{mode}"
        summary = run_experiment(cfg, out, overwrite=True, progress=False)
        recs = read_metrics(out / "metrics.jsonl")
        arrived = sum(1 for r in recs for c in r["per_client"] if c.get("num_examples"))
        cross = sum(r["cross_phase"] for r in recs)
        frozen = sum(r["frozen_target"] for r in recs)
        metric = summary["metric"]
        row = {"phase_every": every if every != "0" else "auto", "cross_phase": mode,
               "arrivals": arrived, "cross_phase_frac": cross / arrived,
               "frozen_target_frac": frozen / arrived,
               "aggregated": sum(r["num_replies"] for r in recs),
               "mean_staleness": sum(sum(r["staleness"]) for r in recs)
               / max(1, sum(len(r["staleness"]) for r in recs)),
               f"final_{metric}": recs[-1][metric], f"best_{metric}": max(r[metric] for r in recs),
               "sim_time_s": recs[-1]["sim_time_s"], "wall_s": summary["wall_s"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    (a.out / "async_phase.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
