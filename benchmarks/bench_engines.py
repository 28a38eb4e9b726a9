"""Wall time of one experiment on the local engine and on Flower's Simulation Engine, split.

    .venv/bin/python benchmarks/bench_engines.py --default    # the default run (MiniLM, 8 rounds)
    .venv/bin/python benchmarks/bench_engines.py              # a small one: tiny-random-bert
    .venv/bin/python benchmarks/bench_engines.py --default --set train.rounds=3

Runs the same config on both engines, one after the other, and prints:

- the whole run: each engine is one ``lora-a2 run`` process started cold (imports included);
  its wall time and the ratio;
- the fixed start-up, separately: Flower's ``startup`` (Ray, the virtual SuperNodes, the
  ServerApp, before the experiment starts), the server's ``setup`` (model, data, initial
  evaluation; the same work on both engines), the first round's worker builds (every Ray worker
  builds the experiment once, on its first message), and ``shutdown``;
- the steady per-round ratio: the median over rounds ≥ 2 of Flower's round wall time over the
  local engine's (both include the server's evaluation);
- where a Flower round goes (medians over rounds ≥ 2): ``send_and_receive``, the busiest
  worker's client time, and the rest (message passing, scheduling, workers waiting);

and checks that both engines gave the same accuracy and bytes. ``--set KEY=VALUE`` as for
``lora-a2 run`` (repeatable). Run it on an otherwise idle machine: the figures are wall times.

``--busy N`` keeps N other processes busy (a pure-Python loop each, at normal priority) during
both runs, as on a shared machine; ``--ray-niceness K`` sets ``RAY_worker_niceness`` for the
Flower run (Ray's own default is 15; the engine uses 0 unless it is set):

    .venv/bin/python benchmarks/bench_engines.py --busy 1
    .venv/bin/python benchmarks/bench_engines.py --busy 1 --ray-niceness 15
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SMALL = ["model.name=tiny-random-bert", "data.name=bbc-news", "data.max_train_examples=400",
         "data.max_test_examples=200", "data.num_clients=4", "train.rounds=4",
         "model.max_length=64", "engine.threads=1", "engine.num_workers=2"]


def run(sets: list[str], out: Path, env: dict[str, str] | None = None
        ) -> tuple[float, list[dict], dict]:
    """``lora-a2 run`` in a fresh process (cold imports and caches, as a user starts it):
    (wall seconds of the whole process, metrics rows, summary)."""
    from lora_a2.report import read_metrics

    cmd = [sys.executable, "-m", "lora_a2.cli", "run", "--out", str(out), "--overwrite", "-q"]
    for s in sets:
        cmd += ["--set", s]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"bench_engines: {' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return wall, read_metrics(out / "metrics.jsonl"), json.loads((out / "summary.json").read_text())


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--default", action="store_true",
                   help="the default experiment (`lora-a2 run` with no arguments)")
    p.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--busy", type=int, default=0, metavar="N",
                   help="keep N other processes busy during both runs")
    p.add_argument("--ray-niceness", type=int, default=None, metavar="K",
                   help="RAY_worker_niceness for the Flower run (Ray's default: 15)")
    args = p.parse_args()
    if args.busy < 0:
        p.error("--busy must be ≥ 0")
    sets = ([] if args.default else SMALL) + args.set
    env = dict(os.environ)
    if args.ray_niceness is not None:
        env["RAY_worker_niceness"] = str(args.ray_niceness)
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
            for _ in range(args.busy)]
    try:
        with tempfile.TemporaryDirectory() as tmp:
            t_local, m_local, s_local = run(sets + ["engine.name=local"], Path(tmp) / "local")
            t_flower, m_flower, s_flower = run(sets + ["engine.name=flower"],
                                               Path(tmp) / "flower", env)
    finally:
        for b in busy:
            b.kill()
            b.wait()
    steady = [f["wall_s"] / lo["wall_s"] for lo, f in zip(m_local[1:], m_flower[1:])]
    timings = [r.get("flower_timing", {}) for r in m_flower]
    first = timings[0] if timings else {}
    later = timings[1:]
    result = {
        "rounds": len(m_local), "busy": args.busy,
        "ray_worker_niceness": env.get("RAY_worker_niceness", "0 (engine default)"),
        "local_s": round(t_local, 2), "flower_s": round(t_flower, 2),
        "ratio_whole_run": round(t_flower / t_local, 3),
        "steady_round_ratio": round(median(steady), 3),
        "local_round_s": round(median([r["wall_s"] for r in m_local[1:]]), 2),
        "flower_round_s": round(median([r["wall_s"] for r in m_flower[1:]]), 2),
        "flower_startup_s": round(s_flower.get("flower_startup_s", float("nan")), 2),
        "setup_s_local": round(s_local["setup_s"], 2),
        "setup_s_flower": round(s_flower["setup_s"], 2),
        "round1_local_s": round(m_local[0]["wall_s"], 2),
        "round1_flower_s": round(m_flower[0]["wall_s"], 2),
        "round1_discover_s": round(first.get("discover_s", float("nan")), 2),
        "round1_worker_build_s": round(first.get("client_build_s", float("nan")), 2),
        "flower_shutdown_s": round(s_flower.get("flower_shutdown_s", float("nan")), 2),
        "steady_send_receive_s": round(median([t["send_receive_s"] for t in later]), 3),
        "steady_busiest_worker_s": round(median([t["busiest_worker_s"] for t in later]), 3),
        "steady_flower_overhead_s": round(median([t["overhead_s"] for t in later]), 3),
        "steady_client_codec_s": round(median([t["client_codec_s"] for t in later]), 3),
        "same_bytes": all(a["upload_bytes"] == b["upload_bytes"]
                          and a["download_bytes"] == b["download_bytes"]
                          for a, b in zip(m_local, m_flower)),
        "max_accuracy_diff": max(abs(a["accuracy"] - b["accuracy"])
                                 for a, b in zip(m_local, m_flower)),
        "payload_bytes": sum(r["upload_bytes"] + r["download_bytes"] for r in m_flower),
        "flower_message_bytes": sum(r["flower_upload_bytes"] + r["flower_download_bytes"]
                                    + r["flower_query_bytes"] for r in m_flower),
    }
    r = result
    print(f"whole run      local {r['local_s']:.1f} s · flower {r['flower_s']:.1f} s · "
          f"ratio {r['ratio_whole_run']:.2f}×")
    print(f"steady round   local {r['local_round_s']:.2f} s · flower {r['flower_round_s']:.2f} s "
          f"· median ratio {r['steady_round_ratio']:.3f} (rounds ≥ 2)")
    print(f"start-up       flower {r['flower_startup_s']:.1f} s (Ray, SuperNodes, ServerApp) · "
          f"setup local {r['setup_s_local']:.1f} / flower {r['setup_s_flower']:.1f} s · "
          f"round 1 local {r['round1_local_s']:.1f} / flower {r['round1_flower_s']:.1f} s "
          f"(of which waiting for Ray and the nodes {r['round1_discover_s']:.1f} s, worker builds "
          f"{r['round1_worker_build_s']:.1f} s summed over workers) · shutdown "
          f"{r['flower_shutdown_s']:.1f} s")
    print(f"flower round   send_and_receive {r['steady_send_receive_s']:.2f} s = busiest worker "
          f"{r['steady_busiest_worker_s']:.2f} s + rest {r['steady_flower_overhead_s']:.2f} s "
          f"(client en/decoding {r['steady_client_codec_s']:.3f} s summed)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
