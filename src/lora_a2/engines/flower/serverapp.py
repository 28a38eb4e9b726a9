"""The ServerApp: the experiment on Flower's Simulation Engine (:func:`run_simulation`) or
Deployment Engine (:func:`deployment_main`), and the Flower totals added to its summary."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from ...checkpoint import CHECKPOINT
from ...checks import check_config, load_config
from ...config import Config, clients_known, clients_per_round
from ...errors import UserError
from ...experiment import prepare
from ...private import build_strategy
from ...report import atomic_write_text
from ...runner import check_flower_resume, run_experiment
from .clientapp import make_client_app
from .transport import FlowerRounds


def flower_summary(engine: str):
    """The Flower engine's fields of ``summary.json`` (``run_experiment``'s
    ``engine_summary``): its name and the totals of the bytes Flower measured."""

    def fields(records: list[dict[str, Any]]) -> dict[str, Any]:
        # None when the release withheld a round's figure (central DP), as the other totals
        out = {"engine": engine,
               **{f"total_{k}": None if any(k not in r for r in records)
                  else sum(r[k] for r in records)
                  for k in ("flower_download_bytes", "flower_upload_bytes",
                            "flower_query_bytes")}}
        for k in ("flower_eval_download_bytes", "flower_eval_upload_bytes"):
            # only rounds with an evaluate phase have them (a personalised strategy's)
            if any(k in r or k in r.get("withheld", ()) for r in records):
                out[f"total_{k}"] = (None if any(k in r.get("withheld", ()) for r in records)
                                     else sum(r.get(k, 0) for r in records))
        return out
    return fields


def add_simulation_times(out: Path, summary: dict[str, Any], times: dict[str, Any]
                         ) -> dict[str, Any]:
    """The simulation's start-up and shut-down seconds, known only once Flower has returned,
    added to ``summary.json``."""
    summary = {**summary, **times}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
    return summary


# ---------------------------------------------------------------------- simulation
def num_workers(cfg: Config) -> int:
    n = cfg.engine.num_workers
    return n if n > 0 else max(1, min(os.cpu_count() or 1, clients_per_round(cfg)))


def backend_config(cfg: Config) -> dict[str, Any]:
    """Ray backend: ``engine.num_workers`` actors, one CPU each (and a GPU share on CUDA).

    The actors run at this process's priority (Ray's ``worker_niceness`` 0) unless the
    environment sets ``RAY_worker_niceness``: Ray's default renices them by +15, but here they do
    all of the clients' training, and at +15 any other busy process on the machine takes most of
    their CPU. ``python benchmarks/bench_engines.py --busy 1`` against the same with
    ``--ray-niceness 15`` shows it: 101.5–104.6 s against 70.3–73.9 s for a tiny 4-round run
    next to one busy process (docs/ENGINES.md, "On a busy machine")."""
    import torch

    workers = num_workers(cfg)
    gpu = cfg.engine.device != "cpu" and torch.cuda.is_available()
    threads = cfg.engine.threads or 1
    init = {"num_cpus": workers * threads, "num_gpus": 1 if gpu else 0,
            "include_dashboard": False, "log_to_driver": True, "logging_level": "warning"}
    if "RAY_worker_niceness" not in os.environ:
        init["_system_config"] = {"worker_niceness": 0}
    return {"client_resources": {"num_cpus": threads, "num_gpus": 1.0 / workers if gpu else 0.0},
            "init_args": init}


def run_simulation(cfg: Config, out: Path, *, overwrite: bool = False, progress: bool = True,
                   resume: bool = False, console: bool = False) -> dict[str, Any]:
    """``lora-a2 run`` with ``engine.name = "flower"``: the experiment on Flower's Simulation
    Engine (Ray backend), one virtual SuperNode per client (``partition-id`` = client id)."""
    return run_simulations([(cfg, Path(out))], overwrite=overwrite, progress=progress,
                           resume=resume, console=console)[0]


def run_simulations(runs: list[tuple[Config, Path]], *, overwrite: bool = False,
                    progress: bool = True, resume: bool = False, console: bool = False
                    ) -> list[dict[str, Any]]:
    """Several experiments, one after the other, in ONE Flower simulation: Ray, its worker
    processes and the SuperNodes start once, and the ServerApp runs each experiment on the same
    ``Grid`` (each worker builds each experiment once, keyed by its config; each node keeps
    each experiment's own tensors apart). Every run's outputs are those of
    :func:`run_simulation` alone; the runs must agree on the number of clients (SuperNodes)
    and on the Ray backend (``engine.num_workers``, ``engine.threads``, ``engine.device``),
    and two runs of one config are refused when its clients keep state on their nodes.
    The summaries, in order; a run that fails stops the rest (its error is raised)."""
    try:
        from flwr.serverapp import ServerApp
        from flwr.simulation import run_simulation as flwr_run_simulation
    except ImportError:
        raise UserError("engine.name = 'flower' needs Flower: pip install 'lora-a2[flower]'") \
            from None
    if not runs:
        return []
    # A natural partition with data.num_clients = 0 has as many clients (nodes) as the data
    # hold: build the experiment here, before Flower starts one SuperNode per client.
    exps = [None if clients_known(cfg) else prepare(check_config(cfg)) for cfg, _ in runs]
    for (cfg, out), exp in zip(runs, exps):  # refused before Ray starts, not after
        if resume and (Path(out) / CHECKPOINT).exists():
            check_flower_resume(cfg, build_strategy(check_config(cfg)) if exp is None
                                else exp.strategy, Path(out))
    run_cfgs = [cfg if exp is None else exp.cfg for (cfg, _), exp in zip(runs, exps)]
    nodes = {c.data.num_clients for c in run_cfgs}
    backends = {json.dumps(backend_config(c), sort_keys=True) for c in run_cfgs}
    if len(nodes) > 1 or len(backends) > 1:
        raise UserError("runs sharing one Flower simulation need the same number of clients "
                        "and the same engine.num_workers, engine.threads and engine.device")
    # a node keeps each experiment's client state under its config's key: two runs of one
    # config would share it, the second starting from the first's (not what it does alone)
    seen: dict[str, Path] = {}
    for (cfg, out), run_cfg in zip(runs, run_cfgs):
        text = run_cfg.to_toml()
        if text in seen and (kept := build_strategy(check_config(cfg)).client_state()):
            raise UserError(f"runs '{seen[text]}' and '{out}' share one config in one Flower "
                            f"simulation, and its clients keep {kept} on their nodes: the "
                            f"second would start from the first's; run them apart or change "
                            f"one (e.g. its seed)")
        seen.setdefault(text, Path(out))
    results: list[dict[str, Any]] = [{} for _ in runs]
    server = ServerApp()
    t_call = time.perf_counter()

    @server.main()
    def _main(grid, context) -> None:
        t_ready = time.perf_counter()
        for (cfg, out), exp, result in zip(runs, exps, results):
            # Ray, the SuperNodes and the ServerApp for the first run; ≈ 0 for the later ones
            result["startup_s"] = time.perf_counter() - t_ready \
                if result is not results[0] else t_ready - t_call
            try:
                result["summary"] = run_experiment(
                    cfg, out, overwrite=overwrite, progress=progress, resume=resume,
                    round_fn=FlowerRounds(grid, cfg), console=console, exp=exp,
                    engine_summary=flower_summary("flower-simulation"))
            except BaseException as e:  # re-raised in the caller's thread below
                result["error"] = e
                return
            result["end"] = time.perf_counter()
            t_ready = result["end"]

    _quiet_flower()
    flwr_run_simulation(server_app=server, client_app=make_client_app(),
                        num_supernodes=run_cfgs[0].data.num_clients,
                        backend_config=backend_config(run_cfgs[0]))
    t_end = time.perf_counter()
    summaries = []
    for (cfg, out), result in zip(runs, results):
        if "error" in result:
            raise result["error"]
        if "summary" not in result:
            raise RuntimeError("the Flower simulation ended without finishing the run "
                               "(see the log above)")
        summary = result["summary"]
        last = result is results[-1]
        shutdown = t_end - result["end"] if last else 0.0
        summaries.append(add_simulation_times(Path(out), summary, {
            "flower_startup_s": result["startup_s"],
            "flower_shutdown_s": shutdown,
            # this simulation's own time: a resumed run's wall_s counts earlier sessions' rounds
            "flower_total_s": result["startup_s"] + summary["session_wall_s"] + shutdown}))
    return summaries


def _quiet_flower() -> None:
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    logging.getLogger("flwr").setLevel(logging.WARNING)


# ---------------------------------------------------------------------- deployment
def deployment_main(grid, context) -> None:
    """ServerApp ``main`` for the Deployment Engine (``flwr run`` of ``flower_app/``).

    Run config keys (``--run-config``): ``config`` (path to a lora-a2 TOML config on the
    SuperLink machine; "" = defaults), ``set`` (``;``-separated ``KEY=VALUE`` overrides),
    ``out`` (output directory on the SuperLink machine), ``overwrite`` (bool), ``resume``
    (bool: continue the run in ``out`` after its last checkpointed round, as ``lora-a2 run
    --resume``; refused for a strategy whose clients keep state on their nodes).
    """

    rc = context.run_config
    overrides = [s.strip() for s in str(rc.get("set", "")).split(";") if s.strip()]
    # this is the Flower engine whatever the config says (validated as such: secagg needs it)
    config = str(rc.get("config", "")) or None
    cfg = load_config(config, overrides + ["engine.name=flower"])
    out = Path(str(rc.get("out", "runs/flower-deployment")))
    overwrite, resume = run_config_flag(rc, "overwrite"), run_config_flag(rc, "resume")
    if overwrite and resume:
        raise UserError("run config 'resume' and 'overwrite' cannot both be true")
    run_experiment(cfg, out, overwrite=overwrite, resume=resume, progress=False,
                   round_fn=FlowerRounds(grid, cfg),
                   engine_summary=flower_summary("flower-deployment"),
                   inputs=[Path(config)] if config else [])


def run_config_flag(rc, key: str) -> bool:
    """A yes/no run-config value: a TOML boolean, or the string "true" / "false" (a quoted
    value arrives as a string, and ``bool("false")`` would be True)."""
    value = rc.get(key, False)
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise UserError(f"run config '{key}' must be true or false, got {value!r}")
