"""Run one experiment end to end and write its outputs.

``DIR/config.toml`` (fully resolved) · ``DIR/metrics.jsonl`` (a line per round) ·
``DIR/summary.json`` · ``DIR/adapter/`` (PEFT format) · ``DIR/plots/`` · ``DIR/partition.json`` ·
``DIR/samples.jsonl`` (causal LM: a few generations per round, round 0 = the base model).
Under central DP (:mod:`lora_a2.private`) ``metrics.jsonl`` and ``summary.json`` hold only
what may be released, and ``DIR/server_log.jsonl`` the trusted server's full record; with
fresh ("os") noise ``DIR/privacy_ledger.json`` (:mod:`lora_a2.ledger`) counts every attempt of a
round, so a round run again after a crash is charged again.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import time
import tomllib
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .checkpoint import (checkpoint_identity, load_checkpoint, load_client_stores,
                         save_checkpoint)
from .checks import check_config, load_config
from .config import Config, clients_per_round, config_from_dict, differences
from .data import label_histogram, local_inputs
from .engines.local import run_async_round, run_round
from .fleet import selected_per_round
from .rounds import evaluate_state, fit_budgets
from .errors import UserError
from .experiment import Experiment, data_digest, prepare
from .ledger import FILE as LEDGER_FILE
from .ledger import ReleaseLedger
from .locks import RUN_LOCK, folder_lock, lock_held
from .messages import ServerState
from .private import PrivateStrategy, inert_privacy_warning, rebuildable_noise_warning
from .precision import bf16_hardware
from .precision import describe as describe_precision
from .privacy import round_record
from .report import (MetricsWriter, atomic_write_text, read_metrics, recorded_rounds,
                     time_to_targets, truncate_metrics)
from .reporters import RunStart, build_reporters
from .strategies import REGISTRY


def config_inputs(cfg: Config) -> list[Path]:
    """The local files and folders ``cfg`` reads: a data file (``csv:``/``json:``/``parquet:``),
    a fleet CSV, a model folder."""
    paths = local_inputs(cfg.data.name)
    if cfg.fleet.profile.startswith("csv:"):
        paths.append(Path(cfg.fleet.profile[4:].strip()).expanduser())
    if Path(cfg.model.name).expanduser().exists():
        paths.append(Path(cfg.model.name).expanduser())
    return paths


def check_out_dir(out: Path, overwrite: bool, inputs: Sequence[Path] = ()) -> Path:
    """Refuse, before anything is loaded or deleted, an ``out`` a new run may not use: a file,
    a non-empty folder without ``overwrite``, and with it one that is not a run's folder (no
    ``config.toml``), that holds the current directory or the home folder, or that holds one
    of the run's own ``inputs`` (its config file, data, fleet CSV or model)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"output path '{out}' exists and is not a directory")
    above = next((p for p in out.absolute().parents if p.exists()), None)
    if above is not None and not above.is_dir():  # out would be made inside a file
        raise UserError(f"output path '{out}' is inside '{above}', which is not a directory")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"output directory '{out}' is not empty; pass --overwrite to replace it "
                            f"or choose another --out")
        here, cwd = out.resolve(), Path.cwd().resolve()
        if here == cwd or here in cwd.parents or here == Path.home().resolve():
            raise UserError(f"--overwrite would delete '{out}', which holds the current directory "
                            f"or the home folder; choose another --out")
        if not (out / "config.toml").is_file():
            raise UserError(f"--overwrite replaces only a run's folder, and '{out}' holds no "
                            f"config.toml; remove it yourself or choose another --out")
        if lock_held(out / RUN_LOCK, other_hosts=False):
            raise UserError(f"--overwrite would delete '{out}' while another lora-a2 process "
                            f"runs in it; wait for it to finish or stop it")
        for path in inputs:
            p = Path(path).resolve()
            if p == here or here in p.parents:
                raise UserError(f"--overwrite would delete '{path}', which this run reads, "
                                f"inside '{out}'; choose another --out")
    return out


def replace_out_dir(out: Path, overwrite: bool, inputs: Sequence[Path] = (),
                    held: contextlib.ExitStack | None = None) -> Path:
    """Create ``out``, take its run lock (:func:`~lora_a2.locks.folder_lock`, held in
    ``held``, else let go at once), and only then empty it of all but that lock — after
    checking it again (:func:`check_out_dir`): another run may have started writing there
    while this one loaded its model. Locking before deleting leaves no moment in which another
    process could take the folder between the check and the deletion and lose its files."""
    check_out_dir(out, overwrite, inputs)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot set up output directory '{out}': {e.strerror or e}") from None
    with contextlib.ExitStack() as mine:
        (held if held is not None else mine).enter_context(folder_lock(out))
        try:
            for entry in out.iterdir():
                if entry.name == RUN_LOCK:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        except OSError as e:
            raise UserError(f"cannot set up output directory '{out}': {e.strerror or e}") \
                from None
    return out


def check_resumable(out: Path, checkpoint_round: int | None, server_log: bool = False) -> None:
    """Refuse to resume ``out`` when its checkpoint and its metrics disagree: a checkpoint
    lost from a run that recorded rounds (resuming would silently start it again), or metrics
    lines missing for rounds the checkpoint has run (the summary would sum a partial record).
    ``server_log``: the run keeps the trusted server's full record too (central DP, which
    withholds from metrics.jsonl what the release does not cover); its lines are checked the
    same way, a lost file included (the totals would restart at zero)."""
    out = Path(out)
    for name in ("metrics.jsonl", "server_log.jsonl")[:2 if server_log else 1]:
        path = out / name
        rounds = recorded_rounds(path)
        if checkpoint_round is None:  # round 1's line may precede its checkpoint (a crash)
            if (out / "summary.json").exists() or any(r >= 2 for r in rounds):
                raise UserError(f"cannot resume '{out}': it has recorded rounds but no "
                                f"checkpoint.safetensors to continue from; start it again "
                                f"(--overwrite, or delete the folder)")
            continue
        missing = sorted(set(range(1, checkpoint_round + 1)) - rounds)
        if missing:
            shown = ", ".join(map(str, missing[:5])) + (" …" if len(missing) > 5 else "")
            raise UserError(f"cannot resume '{out}': {name} lacks round(s) {shown} that the "
                            f"checkpoint (round {checkpoint_round}) has run; start it again "
                            f"(--overwrite, or delete the folder)")


def resume_config(out: Path) -> Config:
    """The config a run in ``out`` was started with (``--resume`` takes no other)."""
    out = Path(out)
    if not (out / "config.toml").is_file():
        raise UserError(f"cannot resume: '{out}' holds no run (no config.toml)")
    return load_config(out / "config.toml")


def check_same_config(cfg: Config, saved: Config, out: Path) -> None:
    """Refuse to resume ``out`` with a config other than the one it ran with (one line)."""
    diff = differences(cfg, saved)
    if diff:
        k, mine, theirs = diff[0]
        more = f" (and {len(diff) - 1} more)" if len(diff) > 1 else ""
        raise UserError(f"cannot resume '{out}' with another config: '{k}' is {mine!r}, the "
                        f"run's own is {theirs!r}{more}")


def check_finite(state: ServerState, rnd: int) -> None:
    """Stop the run, one line, when round ``rnd`` left a global tensor with a NaN or an
    infinity: a run that diverged (a learning rate or server step too large, noise beyond
    float32) would otherwise go on evaluating NaN and report it as a result. Nothing of the
    round is recorded; the last checkpoint stays."""
    bad = [name for name, t in state.tensors.items()
           if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise UserError(f"round {rnd}: the global model has non-finite values ('{bad[0]}'"
                        f"{more}): the run diverged; lower strategy.lr, train.server_lr or the "
                        f"noise, and start it again (--overwrite); rounds before it are kept")


def run_identity(cfg: Config, exp: Experiment) -> dict[str, str]:
    """What a run is, kept with every checkpoint: the config it started with (as written to
    ``config.toml``) and the digest of its data (:func:`~lora_a2.experiment.data_digest`)."""
    return {"config": cfg.to_toml(), "data_sha256": data_digest(exp)}


#: config sections a resumed run may change in its config.toml: where it runs and what it
#: reports to (a moved tracking server, another device), never what it computes
RESUMABLE_EDITS = ("engine.", "report.")


def check_same_run(cfg: Config, identity: dict[str, str], out: Path) -> None:
    """Refuse to resume ``out`` as another run than its checkpoint's: a ``config.toml`` edited
    since the run started (its rounds so far ran under the old values; ``engine.*`` and
    ``report.*`` may change), or data that differ from what it trained on (a changed file; a
    relative path now read from another folder; another tokenizer version). A checkpoint
    written before these were kept is trusted as before."""
    saved = checkpoint_identity(out)
    if "config" in saved:
        try:
            started = config_from_dict(tomllib.loads(saved["config"]))
        except (tomllib.TOMLDecodeError, UserError):
            raise UserError(f"checkpoint '{Path(out) / 'checkpoint.safetensors'}' is "
                            f"unreadable; cannot resume this run") from None
        diff = [d for d in differences(cfg, started) if not d[0].startswith(RESUMABLE_EDITS)]
        if diff:
            k, mine, theirs = diff[0]
            more = f" (and {len(diff) - 1} more)" if len(diff) > 1 else ""
            raise UserError(f"cannot resume '{out}': its config.toml has '{k}' = {mine!r}, but "
                            f"the run started with {theirs!r}{more} (edited since? only engine.* "
                            f"and report.* may change); restore it, or start the run again "
                            f"(--overwrite)")
    if saved.get("data_sha256", identity["data_sha256"]) != identity["data_sha256"]:
        raise UserError(f"cannot resume '{out}': the data read now differ from those it "
                        f"trained on (a changed file, a relative path read from another "
                        f"folder, or another tokenizers/transformers version?); resume from "
                        f"where it started, or start it again (--overwrite)")


def check_flower_resume(cfg: Config, strategy, out: Path) -> None:
    """Refuse to resume ``out`` on Flower when the strategy's clients keep state between rounds
    (:meth:`~lora_a2.strategies.Strategy.client_state`): it lives in the nodes'
    ``Context.state``, which a resumed run — a new Flower run — starts without."""
    if cfg.engine.name == "flower" and (kept := strategy.client_state()):
        raise UserError(f"cannot resume '{out}' on Flower: {strategy.name}'s clients keep "
                        f"{kept} on their nodes between rounds, and a resumed run is a new "
                        f"Flower run whose nodes start without it; start it again "
                        f"(--overwrite), or run on the local engine, whose checkpoint keeps it")


def run_experiment(cfg: Config, out: Path, *, overwrite: bool = False, progress: bool = True,
                   resume: bool = False, round_fn=None, console: bool = False,
                   exp: Experiment | None = None,
                   engine_summary: Callable[[list[dict[str, Any]]], dict[str, Any]] | None = None,
                   inputs: Sequence[Path] = ()) -> dict[str, Any]:
    """Run ``cfg`` on the local engine, writing every output under ``out``; return the summary.

    After every round the metrics line is appended and then an atomic checkpoint written; with
    ``resume`` the run continues after the last checkpointed round (metrics lines past it, or a
    torn last line, are dropped and those rounds recomputed — identically, as every draw is
    seeded by (seed, round, client)). Each round's released record goes to the reporters
    (:mod:`lora_a2.reporters`): metrics.jsonl, the plots, ``report.to``'s, the progress bar
    with ``progress``, the console summary with ``console``. ``exp``: ``prepare(cfg)`` when the
    caller already built it (Flower's simulation needs the client count before it starts).
    ``engine_summary(records)``: the engine's own fields of ``summary.json`` (its name, its
    byte totals), in the summary before it is written and reported; default ``engine =
    "local"``. ``inputs``: files the run read that ``cfg`` does not name (its TOML file):
    ``overwrite`` refuses to delete a folder holding one, as it does the data and model.
    ``config.toml`` is ``cfg`` as given; the run itself uses ``exp.cfg`` (with the number of
    clients the partition drew).

    The run folder's lock (:func:`lora_a2.locks.folder_lock`) is held from the moment the run
    has its folder to the end: a second process asked to run or resume the same folder
    meanwhile is refused with one line.
    """
    with contextlib.ExitStack() as held:
        return _run_experiment(cfg, out, overwrite=overwrite, progress=progress, resume=resume,
                               round_fn=round_fn, console=console, exp=exp, held=held,
                               engine_summary=engine_summary, inputs=inputs)


def _run_experiment(cfg: Config, out: Path, *, overwrite: bool, progress: bool, resume: bool,
                    round_fn, console: bool, exp: Experiment | None,
                    held: contextlib.ExitStack, engine_summary=None,
                    inputs: Sequence[Path] = ()) -> dict[str, Any]:
    """:func:`run_experiment`'s body; ``held`` takes the run folder's lock."""
    if cfg.engine.name == "flower" and round_fn is None:
        raise UserError("engine.name = 'flower' runs through Flower's Simulation Engine: start "
                        "it with lora_a2.launch.run (the CLI and lora_a2.run do)")
    if round_fn is None:  # engines.flower.FlowerRounds when run inside a ServerApp
        round_fn = run_async_round if cfg.train.mode == "async" else run_round
    check_config(cfg)  # resolves the strategy's options: config.toml lists every one
    t_start = time.perf_counter()
    if resume:
        out = Path(out)
        check_same_config(cfg, resume_config(out), out)
        held.enter_context(folder_lock(out))
    else:  # a bad --out is refused before the model loads; the old run is deleted only after
        inputs = [*config_inputs(cfg), *inputs]
        out = check_out_dir(out, overwrite, inputs)
    exp = exp if exp is not None else prepare(cfg)  # a bad model or data source fails here
    if not resume:
        replace_out_dir(out, overwrite, inputs, held)
        atomic_write_text(out / "config.toml", cfg.to_toml())
        for warning in (rebuildable_noise_warning(cfg), inert_privacy_warning(cfg)):
            if warning:  # a new run, once its folder is set up
                print(f"lora-a2: warning: {warning}", file=sys.stderr)
    strategy = exp.strategy
    private = strategy if isinstance(strategy, PrivateStrategy) else None
    withholds = private is not None and private.withholds
    ckpt = load_checkpoint(out) if resume else None
    identity = run_identity(cfg, exp)
    if resume:
        check_resumable(out, ckpt[0] if ckpt is not None else None, server_log=withholds)
        if ckpt is not None:
            check_same_run(cfg, identity, out)  # before anything in the folder changes
            check_flower_resume(cfg, strategy, out)
    ledger = ReleaseLedger(out / LEDGER_FILE) \
        if private is not None and not private.plan.rebuildable else None
    if ledger is not None and ckpt is not None:  # before anything in the folder changes
        ledger.check_resume(out, ckpt[0])
    if ckpt is None:
        start, state = 1, strategy.init_state(exp.runtime.initial_state())
    else:
        start, state = ckpt[0] + 1, strategy.restore_state(ckpt[1])
        exp.client_stores.update(load_client_stores(out))
    if cfg.strategy.rank_budget == "auto" and ckpt is None:  # every client's, first round
        fit_budgets(exp, start, state, list(range(exp.cfg.data.num_clients)))
    if ckpt is None:
        write_partition(exp, out)
    initial_path = out / "initial_eval.json"
    metric = exp.task.metric
    saved = _json_object(initial_path) if ckpt is not None else None
    if saved is not None and metric not in saved:  # an object, but not this run's evaluation
        saved = None
    if saved is not None:
        initial = saved
    else:  # a new run, or one whose file is missing or damaged: it is recomputed
        initial = evaluate_state(exp, strategy.init_state(exp.runtime.initial_state())
                                 if ckpt is not None else state)
        write_samples(out, 0, initial.pop("samples", None), first=ckpt is None)
    fresh = saved is None
    if withholds and set(initial) & set(exp.task.client_metric_keys):
        # central DP: the clients' own metrics (their data, their label mix) are not part of
        # the release, the untrained model's neither (a file older code wrote is rewritten)
        initial = {k: v for k, v in initial.items() if k not in exp.task.client_metric_keys}
        fresh = True
    if fresh:
        atomic_write_text(initial_path, json.dumps(initial))
    truncate_metrics(out / "metrics.jsonl", start - 1)
    truncate_metrics(out / "samples.jsonl", start - 1)
    truncate_metrics(out / "server_log.jsonl", start - 1)
    records: list[dict[str, Any]] = read_metrics(out / "metrics.jsonl")
    server_log = MetricsWriter(out / "server_log.jsonl") if withholds else None
    full = read_metrics(out / "server_log.jsonl") if withholds else records
    # what the summary sums: each kept line must be a round's record
    # (truncate_metrics kept only lines that are records of a round)
    if not all("cumulative_upload_bytes" in r for r in full):
        raise UserError(f"cannot resume '{out}': a kept line of metrics.jsonl (or "
                        f"server_log.jsonl) is not a round's record (edited by hand?); "
                        f"start it again (--overwrite, or delete the folder)")
    if cfg.strategy.rank_budget == "auto" and ckpt is not None:
        restore_budgets(exp, out, full, start, state)
    cumulative = full[-1]["cumulative_upload_bytes"] if full else 0
    # the simulated clock (fleet.profile) continues from the last kept round's line
    sim_time = full[-1].get("sim_time_s", 0.0) if full else 0.0
    # a resumed run's wall time counts the kept rounds of the sessions before (not their setup)
    earlier_s = sum(float(r.get("wall_s") or 0.0) for r in full)
    report = build_reporters(cfg, progress=progress, console=console)
    title = f"{strategy.name} · {cfg.data.name} · {cfg.data.partition}" + (
        f"({cfg.data.alpha})" if cfg.data.partition == "dirichlet" else "")
    try:
        # an async round's arrivals, offline and dropped-out clients are not a fixed count
        per_round = 0 if cfg.train.mode == "async" \
            else selected_per_round(exp.cfg, clients_per_round(exp.cfg))
        report.start(RunStart(cfg, out, start, per_round, metric, initial,
                              exp.task.plots, title, list(records), exp.task.summary_lines))
        setup_s = time.perf_counter() - t_start  # model, data, partition, initial evaluation
        for rnd in range(start, cfg.train.rounds + 1):
            t0 = time.perf_counter()
            if ledger is not None:  # before any noise is drawn: a crash after this is charged
                ledger.attempt(rnd)
            state, record = round_fn(exp, rnd, state, on_client=report.client_done)
            check_finite(state, rnd)
            client_evals = record.pop("client_eval", None)  # personalised: each client's own
            server_metrics = evaluate_state(exp, state)  # the released state on the test set
            samples = server_metrics.pop("samples", None)
            metrics = server_metrics if client_evals is None \
                else exp.task.merge_client_evals(server_metrics, client_evals)
            cumulative += record["upload_bytes"]
            clock: dict[str, Any] = {}
            if "sim_round_s" in record:
                sim_time += record["sim_round_s"]
                clock = {"sim_time_s": sim_time}
            dp_fields = round_record(private.plan if private else None, rnd,
                                     ledger.extra_releases(rnd) if ledger else 0)  # (ε, δ)
            first = ("round", "strategy", "active_factor")
            record = {**{k: record[k] for k in first}, **metrics,
                      **{k: v for k, v in record.items() if k not in first},
                      "cumulative_upload_bytes": cumulative, **clock, **dp_fields,
                      "wall_s": time.perf_counter() - t0}
            if server_log is not None:  # central DP: publish only what the release may hold
                server_log.write(record)
                record = private.release_record(
                    {**record, **server_metrics, "eval_metric_keys": list(server_metrics)},
                    exp.task.client_metric_keys)
            write_samples(out, rnd, samples)
            report.round_end(record)  # metrics.jsonl first, then every other reporter
            save_checkpoint(out, rnd, state, exp.client_stores, identity)
            records.append(record)

        exp.runtime.load(state.tensors)
        exp.runtime.export(out / "adapter")
        session_s = time.perf_counter() - t_start
        summary = summarize(exp, records, initial, out, earlier_s + session_s)
        summary["session_wall_s"] = session_s
        summary["resumed_from_round"] = start - 1 if resume else None
        summary["setup_s"] = setup_s
        summary["failed_client_rounds"] = sum(len(r.get("failures", [])) for r in records)
        summary.update(engine_summary(records) if engine_summary is not None
                       else {"engine": "local"})
        atomic_write_text(out / "summary.json", json.dumps(summary, indent=2))
        report.end(summary, records)
    finally:
        report.close()
    return summary


def _json_object(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when it is missing, unreadable or not an object."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def write_samples(out: Path, rnd: int, samples: list[dict[str, Any]] | None,
                  first: bool = False) -> None:
    """Append the round's sample generations to ``samples.jsonl`` (one line per round)."""
    if samples is None:
        return
    path = out / "samples.jsonl"
    if first and path.exists():
        path.unlink()
    MetricsWriter(path).write({"round": rnd, "samples": samples})


def summarize(exp: Experiment, records: list[dict[str, Any]], initial: dict[str, Any], out: Path,
              wall_s: float) -> dict[str, Any]:
    cfg = exp.cfg
    failed = sum(r.get("status") == "failed" for r in records)
    client_rounds = sum(r["num_replies"] for r in records)

    def total(key: str) -> Any:
        """Σ of a per-round figure; None when the release withheld it (central DP)."""
        if any(key not in r for r in records):
            return None
        return sum(r[key] for r in records)

    def total_len(key: str) -> int | None:
        """Σ of a per-round list's length; None when the release withheld it."""
        if any(key not in r for r in records):
            return None
        return sum(len(r[key]) for r in records)

    def total_eval(key: str) -> int | None:
        """Σ of a personalised strategy's evaluate-phase bytes (0 for any other strategy, which
        has no evaluate phase); None when the release withheld them (central DP)."""
        if any(key in r.get("withheld", ()) for r in records):
            return None
        return sum(r.get(key, 0) for r in records)

    total_up_params = total("upload_params")
    return {
        "task": exp.task.name,
        "metric": exp.task.metric,
        "strategy": cfg.strategy.name,
        "model": cfg.model.name,
        "data": cfg.data.name,
        "partition": cfg.data.partition,
        "alpha": cfg.data.alpha,
        "num_clients": cfg.data.num_clients,
        "rounds": cfg.train.rounds,
        "rank_budgets": exp.strategy.budgets,
        "global_rank": cfg.strategy.global_rank,
        "lora_rank": exp.strategy.lora_rank(),
        "num_lora_modules": exp.runtime.layout.num_modules,
        **exp.task.summary(initial, records),
        "total_upload_bytes": total("upload_bytes"),
        "total_download_bytes": total("download_bytes"),
        "total_upload_params": total_up_params,
        "total_download_params": total("download_params"),
        "personalized": exp.strategy.personalized,
        # evaluate messages of a personalised strategy (each client evaluates its own model)
        "total_eval_download_bytes": total_eval("eval_download_bytes"),
        "total_eval_upload_bytes": total_eval("eval_upload_bytes"),
        "lr_ratio": exp.strategy.lr_ratio,
        "client_rounds": client_rounds,
        "rejected_updates": sum(r["rejected"] for r in records),
        "dropped_clients": sum(len(r.get("dropped", [])) for r in records),
        "failed_rounds": failed,
        # the simulated clock (fleet.profile): Σ of the rounds' sim_round_s
        **({"sim_time_s": total("sim_round_s"),
            "stragglers": total_len("stragglers"), "offline_clients": total_len("offline")}
           if cfg.fleet.profile != "none" else {}),
        **reference_uploads(exp, records),
        **({"time_to_target": time_to_targets(
            records, initial, exp.task.metric, exp.task.metric_higher_is_better,
            cfg.report.targets)} if cfg.report.targets else {}),
        # the training rows the clients hold (a natural partition's left-out clients' are not)
        "train_examples": sum(len(ix) for ix in [*exp.client_train, *exp.client_test]),
        "test_examples": len(exp.test),
        "data_rows": exp.train.stats,  # rows read, kept, skipped (with the reason), shortened
        "device": str(exp.runtime.device),
        **_machine(exp.runtime.device),
        "lora_a2_version": _package_version(),
        "git_commit": _git_commit(),
        # train.precision as set, what it meant on this device, and the bfloat16 path found
        "precision": cfg.train.precision,
        "base_weights_dtype": cfg.model.dtype,
        "bf16_matmul": cfg.train.bf16_matmul,
        "bf16_products_in_fp32": exp.runtime.bf16_in_fp32,
        "precision_detail": describe_precision(cfg.train.precision, cfg.model.dtype,
                                               exp.runtime.device, cfg.train.bf16_matmul),
        **bf16_hardware(exp.runtime.device),
        "noise_source": exp.strategy.privacy.noise_source
        if isinstance(exp.strategy, PrivateStrategy) else None,
        "schema_version": cfg.schema_version,
        "wall_s": wall_s,
        "out_dir": str(out),
        **_privacy_summary(exp, records),
        **_secagg_summary(records),
    }


def _git_commit() -> str | None:
    """The commit of the source tree this package runs from, when it is a git checkout."""
    import subprocess

    here = Path(__file__).resolve().parent
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                           timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if r.returncode != 0:
        return None
    return r.stdout.strip() or None


def _package_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version("lora-a2")
    except metadata.PackageNotFoundError:
        return None


def _machine(device: Any) -> dict[str, Any]:
    """What ran the job, so wall times and cross-device differences can be told apart."""
    import platform

    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = platform.processor() or platform.machine()
        try:  # Linux: platform.processor() is empty; the CPU model is in /proc/cpuinfo
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.lower().startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
        except OSError:
            pass
    return {"device_name": name, "torch_version": torch.__version__,
            "torch_threads": torch.get_num_threads()}


def _privacy_summary(exp: Experiment, records: list[dict[str, Any]]) -> dict[str, Any]:
    """(ε, δ) spent by the run, the resolved DP settings, and what the guarantee covers;
    {} without DP."""
    strategy = exp.strategy
    if not isinstance(strategy, PrivateStrategy):
        return {}
    plan = strategy.plan
    caveats = []
    if plan.rebuildable:
        caveats.append("noise_source = 'seeded': every noise draw can be rebuilt from the run's "
                       "config (its seed), so the guarantee does not hold against whoever "
                       "holds config.toml or a node's run config")
    if plan.mode == "central" and strategy.release_client_stats:
        caveats.append("privacy.release_client_stats = true: per-client training losses, "
                       "selections, upload sizes and client evaluations in metrics.jsonl and "
                       "this summary are not noised and not covered by ε")
    if plan.mode == "local" and strategy.selects_slots and not plan.private_selection:
        caveats.append("privacy.selection = 'public': the slot ids each client uploads are "
                       "chosen from its data and sent in the clear, not covered by ε")
    if plan.mode == "central" and exp.cfg.server.max_update_norm > 0:
        caveats.append("server.max_update_norm: how many uploads were rejected for their norm "
                       "(a function of the clients' data) is released each round, not covered "
                       "by ε")
    if plan.mode == "local" and strategy.inner.dp_local_clear:
        caveats.append(f"{strategy.inner.name}: {strategy.inner.dp_local_clear}")
    if plan.mode == "local" and strategy.inner.personalized:
        caveats.append(f"{strategy.inner.name}: each client's evaluation answers (its metrics on "
                       "its own split, from its own model) are sent in the clear, not covered "
                       "by ε")
    last = records[-1]
    return {"epsilon": last["epsilon"], "delta": plan.delta,
            "selection_epsilon": last.get("selection_epsilon"),
            "releases_charged": last.get("releases_charged"),
            "privacy": {**plan.summary(), "epsilon": last["epsilon"],
                        # charged like ε: every attempt of a round (privacy_ledger.json)
                        "selection_epsilon": last.get("selection_epsilon"),
                        "release_client_stats": strategy.release_client_stats,
                        "withheld_from_release": sorted({k for r in records
                                                         for k in r.get("withheld", [])}),
                        "caveats": caveats}}


#: the fewest pairwise masks (32-bit seeds each) that hide an unmasked survivor's vector
#: beyond a search: k masks fall to a meet-in-the-middle search of about 2^(32·⌈k/2⌉) steps
SAFE_MASKS = 3


def _secagg_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The SecAgg+ rounds in which some survivor's vector, once unmasked, was hidden by fewer
    than three pairwise masks (32-bit seeds of Flower's mask generator: one is a 2³² search,
    two fall to a meet-in-the-middle search of about the same cost — docs/PRIVACY.md);
    {} without SecAgg+. A round counts once the server has unmasked, whether or not its mean
    was then used; a round recorded before the count was kept is listed apart (unknown)."""
    if not any("secagg" in r for r in records):
        return {}
    unmasked = [r for r in records if "unmask" in r.get("secagg", {}).get("stages", {})]
    weak = sorted(r["round"] for r in unmasked
                  if r["secagg"].get("fewest_pairwise_masks", SAFE_MASKS) < SAFE_MASKS)
    unknown = sorted(r["round"] for r in unmasked if "fewest_pairwise_masks" not in r["secagg"])
    out: dict[str, Any] = {"rounds_unmasked": len(unmasked), "weak_rounds": weak}
    if unknown:
        out["unknown_rounds"] = unknown
    if weak or unknown:
        out["caveat"] = "; ".join(
            [f"round(s) {', '.join(map(str, weak))}: a survivor's vector was hidden by fewer "
             f"than {SAFE_MASKS} pairwise masks (32-bit seeds) once the server unmasked"]
            * bool(weak)
            + [f"round(s) {', '.join(map(str, unknown))}: how many masks hid each survivor "
               "was not recorded (an older version ran them)"] * bool(unknown)
        ) + (f"; an integer secagg.reconstruction_threshold >= {SAFE_MASKS + 1} halts such "
             "rounds before unmasking")
    return {"secagg": out}


def restore_budgets(exp: Experiment, out: Path, records: list[dict[str, Any]], start: int,
                    state: ServerState) -> None:
    """A resumed ``rank_budget = "auto"`` run's budgets as the uninterrupted run had them: the
    first round's fit of every client (``partition.json``), then each later fit in the order
    it was made: the kept rounds' ``per_client[].rank_budget`` (``rank_budget = "auto"`` needs
    a deadline, so it never runs in asynchronous mode, whose fits would follow the dispatch
    order). Refitted at ``start`` when ``partition.json`` or a kept row cannot be read."""
    n = exp.cfg.data.num_clients
    part = _json_object(out / "partition.json") or {}
    rows = [row for r in records for row in r.get("per_client", []) if "rank_budget" in row]
    try:
        first = [(int(row["client"]), int(row["rank_budget"])) for row in part["clients"]]
        later = [(int(row["client"]), int(row["rank_budget"])) for row in rows]
    except (TypeError, KeyError, ValueError, AttributeError):
        first, later = [], []
    fits = first + later
    if sorted(c for c, _ in first) != list(range(n)) or any(
            not 0 <= c < n or b < 1 for c, b in fits):
        fit_budgets(exp, start, state, list(range(n)))
        return
    for c, b in fits:
        exp.strategy.budgets[c] = b


def reference_uploads(exp: Experiment, records: list[dict[str, Any]]) -> dict[str, Any]:
    """The summary's upload comparisons (``report.references``): what each reference strategy
    would upload for the client-rounds this run accepted, each client at the rank budget it
    had in that round (its declared
    :meth:`~lora_a2.strategies.Strategy.reference_upload_values`; one float32, 4 bytes, per
    value — the payload header adds ~100 bytes per message on top)."""
    budgets, layout, model = exp.strategy.budgets, exp.runtime.layout, exp.runtime.model
    kept_budgets = [c.get("rank_budget", budgets[c["client"]]) for r in records
                    for c in r["per_client"]
                    if c.get("num_examples") and not c.get("rejected")
                    and not c.get("straggler") and not c.get("surplus")
                    and not c.get("discarded")]
    mine = None if any("upload_params" not in r for r in records) else sum(
        r["upload_params"] for r in records)
    out: dict[str, Any] = {}
    for name in exp.cfg.report.references:
        cls, key = REGISTRY[name], name.replace("-", "_")
        values = sum(cls.reference_upload_values(model, layout, b) for b in kept_budgets)
        out[f"{key}_upload_params"] = values
        out[f"{key}_upload_bytes"] = 4 * values
        out[f"upload_fraction_of_{key}"] = None if mine is None else mine / max(values, 1)
        # rank-based (fl-lora) or not (fedavg-full: the whole model whatever the budget)
        out[f"{key}_scales_with_rank"] = cls.reference_upload_values(model, layout, 1) != \
            cls.reference_upload_values(model, layout, 2)
    return out


def write_partition(exp: Experiment, out: Path) -> None:
    """Per-client sizes, label histograms and rank budgets, for inspecting the non-IID split;
    a ``natural`` partition also names each client's id value (``natural_id``) and its
    column."""
    hist = label_histogram(exp.train.labels, exp.client_train, len(exp.train.label_names))
    natural = exp.natural_ids
    head: dict[str, Any] = {"label_names": exp.train.label_names}
    if natural is not None:
        head["natural_clients"] = exp.train.stats.get("natural_clients", {})
    atomic_write_text(out / "partition.json", json.dumps({
        **head,
        "clients": [{"client": c,
                     **({"natural_id": natural[c]} if natural is not None else {}),
                     "num_examples": int(len(idx)),
                     "local_test_examples": int(len(exp.client_test[c])),
                     "rank_budget": exp.strategy.budgets[c],
                     "label_counts": [int(x) for x in hist[c]]}
                    for c, idx in enumerate(exp.client_train)],
    }, indent=1))
