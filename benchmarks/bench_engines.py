"""Wall time of one small experiment on the local engine and on Flower's Simulation Engine.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_engines.py            # tiny-random-bert
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_engines.py --set model.name=minilm

Prints both wall times, the ratio flower/local, the one-off start-up cost (Ray, workers, each
worker building the model) and the steady per-round overhead (rounds ≥ 2), and checks that both
engines gave the same accuracy and byte counts. Extra ``--set KEY=VALUE`` as for ``lora-a2 run``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

DEFAULT = ["model.name=tiny-random-bert", "data.name=bbc-news", "data.max_train_examples=400",
           "data.max_test_examples=200", "data.num_clients=4", "train.rounds=4",
           "model.max_length=64", "engine.threads=1", "engine.num_workers=2"]


def run(sets: list[str], out: Path) -> tuple[float, list[dict]]:
    from lora_a2.config import load_config
    from lora_a2.report import read_metrics
    from lora_a2.runner import run_experiment

    cfg = load_config(None, sets)
    t = time.perf_counter()
    run_experiment(cfg, out, overwrite=True, progress=False)
    return time.perf_counter() - t, read_metrics(out / "metrics.jsonl")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args()
    sets = DEFAULT + args.set
    with tempfile.TemporaryDirectory() as tmp:
        t_local, m_local = run(sets + ["engine.name=local"], Path(tmp) / "local")
        t_flower, m_flower = run(sets + ["engine.name=flower"], Path(tmp) / "flower")
    rounds = len(m_local)
    steady = [f["wall_s"] - l["wall_s"] for l, f in zip(m_local[1:], m_flower[1:])]
    per_round = sum(steady) / len(steady) if steady else float("nan")
    startup = t_flower - t_local - per_round * rounds
    same_bytes = all(a["upload_bytes"] == b["upload_bytes"] and
                     a["download_bytes"] == b["download_bytes"] for a, b in zip(m_local, m_flower))
    max_acc_diff = max(abs(a["accuracy"] - b["accuracy"]) for a, b in zip(m_local, m_flower))
    ours = sum(r["upload_bytes"] + r["download_bytes"] for r in m_flower)
    theirs = sum(r["flower_upload_bytes"] + r["flower_download_bytes"] + r["flower_query_bytes"]
                 for r in m_flower)
    result = {"rounds": rounds, "local_s": round(t_local, 2), "flower_s": round(t_flower, 2),
              "ratio_flower_over_local": round(t_flower / t_local, 2),
              "per_round_overhead_s": round(per_round, 3),
              "startup_overhead_s": round(startup, 2),
              "same_bytes": same_bytes, "max_accuracy_diff": max_acc_diff,
              "payload_bytes": ours, "flower_message_bytes": theirs}
    print(f"local {t_local:.1f} s · flower {t_flower:.1f} s · ratio {t_flower / t_local:.2f}× · "
          f"per-round overhead {per_round:.2f} s (rounds ≥ 2) · start-up {startup:.1f} s")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
