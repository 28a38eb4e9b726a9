"""Range and consistency checks of a config's own values (checks that need a component live
with that component and run in :mod:`lora_a2.checks`)."""

from __future__ import annotations

import math
import re
from dataclasses import fields, is_dataclass
from typing import Any

from ..errors import UserError
from .schema import (BF16_MATMULS, CROSS_PHASE, FLEET_PROFILES, MECHANISMS, MODEL_DTYPES, MODES,
                     NOISE_SOURCES, PARTITIONS, PRECISIONS, RANK_DISTRIBUTIONS, REPORTERS,
                     TRAIN_MODES, Config, DataConfig, TrainConfig)


def require(cond: bool, key: str, msg: str, value: Any) -> None:
    if not cond:
        raise UserError(f"config key '{key}' {msg}, got {value!r}")


def validate(cfg: Config) -> None:
    """Range and consistency checks; each failure is a one-line :class:`UserError`."""
    m, d, s, t, e = cfg.model, cfg.data, cfg.strategy, cfg.train, cfg.engine
    for sec in fields(cfg):  # TOML has inf and nan; no number here means either
        section = getattr(cfg, sec.name)
        for f in fields(section) if is_dataclass(section) else ():
            v = getattr(section, f.name)
            require(not isinstance(v, float) or math.isfinite(v), f"{sec.name}.{f.name}",
                    "must be a finite number", v)
            # the model trains in float32: a larger number is inf there (an lr of 1e39 broke
            # the optimiser after the run had started)
            require(not isinstance(v, float) or abs(v) <= FLOAT32_MAX, f"{sec.name}.{f.name}",
                    f"must fit in float32 (|x| ≤ {FLOAT32_MAX:.4g})", v)
            for text in (v if isinstance(v, list) else [v]):  # written to config.toml as UTF-8
                require(not isinstance(text, str) or _utf8(text), f"{sec.name}.{f.name}",
                        "must be text that UTF-8 can write (it holds an undecodable byte)",
                        text)
                require(not isinstance(text, str) or "\0" not in text, f"{sec.name}.{f.name}",
                        "must not hold a NUL character (no path or name can)", text)
    require(0 <= cfg.seed < 2**63, "seed", "must be in [0, 2^63)", cfg.seed)  # torch's range
    require(m.max_length >= 8, "model.max_length", "must be ≥ 8", m.max_length)
    require(m.head in ("frozen", "trained"), "model.head", "must be 'frozen' or 'trained'", m.head)
    require(m.lora_alpha > 0, "model.lora_alpha", "must be > 0", m.lora_alpha)
    require(0 <= m.lora_dropout < 1, "model.lora_dropout", "must be in [0, 1)", m.lora_dropout)
    require(m.init_std >= 0, "model.init_std", "must be ≥ 0", m.init_std)
    require(m.dtype in MODEL_DTYPES, "model.dtype", f"must be one of {', '.join(MODEL_DTYPES)}",
             m.dtype)
    require(d.partition in PARTITIONS, "data.partition", f"must be one of {', '.join(PARTITIONS)}",
             d.partition)
    require(not d.client_column or d.partition == "natural", "data.client_column",
             "is read only by data.partition = 'natural' (set that, or leave the column empty)",
             d.client_column)
    if d.partition == "natural":
        require(d.num_clients >= 0, "data.num_clients",
                 "must be ≥ 0 with data.partition = 'natural' (0 = every natural client)",
                 d.num_clients)
    else:
        require(d.num_clients >= 1, "data.num_clients", "must be ≥ 1", d.num_clients)
    known = clients_known(cfg)
    require(d.alpha > 0, "data.alpha", "must be > 0", d.alpha)
    require(d.classes_per_client >= 1, "data.classes_per_client", "must be ≥ 1", d.classes_per_client)
    # a partition's own knob, set for another partition, would do nothing
    require(d.partition == "dirichlet" or d.alpha == DataConfig.alpha, "data.alpha",
            f"is read only by data.partition = 'dirichlet' (this run's is '{d.partition}')",
            d.alpha)
    require(d.partition in ("pathological", "paired")
            or d.classes_per_client == DataConfig.classes_per_client, "data.classes_per_client",
            f"is read only by data.partition = 'pathological' or 'paired' (this run's is "
            f"'{d.partition}')", d.classes_per_client)
    require(d.min_examples_per_client >= 1, "data.min_examples_per_client", "must be ≥ 1",
             d.min_examples_per_client)
    require(0 < d.test_fraction < 1, "data.test_fraction", "must be in (0, 1)", d.test_fraction)
    require(d.max_train_examples >= 0, "data.max_train_examples", "must be ≥ 0 (0 = all)",
             d.max_train_examples)
    require(d.max_test_examples >= 0, "data.max_test_examples", "must be ≥ 0 (0 = all)",
             d.max_test_examples)
    require(0 <= d.local_test_fraction < 1, "data.local_test_fraction", "must be in [0, 1)",
             d.local_test_fraction)
    require(s.global_rank >= 1, "strategy.global_rank", "must be ≥ 1", s.global_rank)
    rb = s.rank_budget
    if isinstance(rb, list):
        require(not known or len(rb) == d.num_clients, "strategy.rank_budget",
                 f"must list one budget per client ({d.num_clients})", rb)
        for b in rb:
            require(isinstance(b, int) and not isinstance(b, bool) and 1 <= b <= s.global_rank,
                     "strategy.rank_budget", f"entries must be integers in [1, {s.global_rank}]", b)
    elif isinstance(rb, str):
        require(rb in RANK_DISTRIBUTIONS or rb == "auto", "strategy.rank_budget",
                 f"must be an integer, a list, `auto`, or one of {', '.join(RANK_DISTRIBUTIONS)}",
                 rb)
    else:
        require(isinstance(rb, int) and not isinstance(rb, bool), "strategy.rank_budget",
                 "must be an integer, a list of integers, or a distribution name", rb)
        require(1 <= rb <= s.global_rank, "strategy.rank_budget",
                 f"must be in [1, strategy.global_rank = {s.global_rank}]", rb)
    for key, v in (("strategy.lr", s.lr), ("strategy.full_lr", s.full_lr)):
        require(v > 0, key, "must be > 0", v)
    require(s.lr_ratio >= 0, "strategy.lr_ratio", "must be ≥ 0 (0 = the strategy's paper rule)",
             s.lr_ratio)
    require(s.head_lr >= 0, "strategy.head_lr", "must be ≥ 0 (0 = lr_B)", s.head_lr)
    require(s.weight_decay >= 0, "strategy.weight_decay", "must be ≥ 0", s.weight_decay)
    require(t.rounds >= 1, "train.rounds", "must be ≥ 1", t.rounds)
    require(t.local_epochs >= 1, "train.local_epochs", "must be ≥ 1", t.local_epochs)
    require(t.batch_size >= 1, "train.batch_size", "must be ≥ 1", t.batch_size)
    require(t.eval_batch_size >= 1, "train.eval_batch_size", "must be ≥ 1", t.eval_batch_size)
    require(t.max_grad_norm >= 0, "train.max_grad_norm", "must be ≥ 0", t.max_grad_norm)
    require(0 <= t.dropout < 1, "train.dropout", "must be in [0, 1)", t.dropout)
    require(t.min_replies >= 1, "train.min_replies", "must be ≥ 1", t.min_replies)
    require(t.precision in PRECISIONS, "train.precision",
             f"must be one of {', '.join(PRECISIONS)}", t.precision)
    require(t.bf16_matmul in BF16_MATMULS, "train.bf16_matmul",
             f"must be one of {', '.join(BF16_MATMULS)}", t.bf16_matmul)
    require(cfg.server.max_update_bytes >= 1024, "server.max_update_bytes", "must be ≥ 1024",
             cfg.server.max_update_bytes)
    require(cfg.server.max_update_norm >= 0, "server.max_update_norm", "must be ≥ 0 (0 = off)",
             cfg.server.max_update_norm)
    cpr = t.clients_per_round
    if isinstance(cpr, float) and not cpr.is_integer():
        require(0 < cpr < 1, "train.clients_per_round",
                 "must be 0 (all), an integer count, or a fraction in (0, 1)", cpr)
    else:
        require(0 <= cpr and (not known or cpr <= d.num_clients), "train.clients_per_round",
                 f"must be 0 (all) or a count ≤ data.num_clients = {d.num_clients}", cpr)
    require(not known or t.min_replies <= clients_per_round(cfg), "train.min_replies",
             f"must not exceed the clients sampled per round ({clients_per_round(cfg)})",
             t.min_replies)
    require(e.name in ("local", "flower"), "engine.name", "must be 'local' or 'flower'", e.name)
    require(e.num_workers >= 0, "engine.num_workers", "must be ≥ 0 (0 = auto)", e.num_workers)
    require(e.round_timeout_s >= 0, "engine.round_timeout_s", "must be ≥ 0 (0 = no limit)",
             e.round_timeout_s)
    require(e.connect_timeout_s >= 0, "engine.connect_timeout_s", "must be ≥ 0",
             e.connect_timeout_s)
    require(re.fullmatch(r"auto|cpu|cuda(:\d+)?", e.device) is not None,
            "engine.device", "must be 'auto', 'cpu' or 'cuda[:N]'", e.device)
    require(0 <= e.threads <= MAX_THREADS, "engine.threads",
            f"must be in [0, {MAX_THREADS}] (0 = torch's default)", e.threads)
    for target in cfg.report.targets:
        require(math.isfinite(target), "report.targets", "entries must be finite numbers",
                target)  # the task's range is checked with the task (tasks.check_config)
    for name in cfg.report.to:
        require(name in REPORTERS, "report.to", f"entries must be among {', '.join(REPORTERS)}",
                 name)
    require(len(set(cfg.report.to)) == len(cfg.report.to), "report.to",
             "names a reporter twice", cfg.report.to)
    require(bool(cfg.report.mlflow_experiment), "report.mlflow_experiment", "must not be empty",
             cfg.report.mlflow_experiment)
    _validate_privacy(cfg)
    _validate_fleet(cfg)
    _validate_async(cfg)
    _validate_secagg(cfg)
    _validate_task(cfg)


def _validate_task(cfg: Config) -> None:
    t = cfg.task
    require(t.generate_examples >= 0, "task.generate_examples", "must be ≥ 0",
             t.generate_examples)
    require(t.max_new_tokens >= 1, "task.max_new_tokens", "must be ≥ 1", t.max_new_tokens)
    require(t.samples >= 0, "task.samples", "must be ≥ 0", t.samples)


def _validate_fleet(cfg: Config) -> None:
    """The fleet, deadlines, over-selection and budgets from the link (docs/FLEETS.md)."""
    f, t, s = cfg.fleet, cfg.train, cfg.strategy
    require(f.profile in FLEET_PROFILES or (f.profile.startswith("csv:") and len(f.profile) > 4),
             "fleet.profile", f"must be one of {', '.join(FLEET_PROFILES)} or csv:PATH",
             f.profile)
    require(t.deadline_s >= 0, "train.deadline_s", "must be ≥ 0 (0 = wait for every client)",
             t.deadline_s)
    require(t.over_select >= 0, "train.over_select", "must be ≥ 0 (0 = off)", t.over_select)
    fleet = f.profile != "none"
    auto = s.rank_budget == "auto"
    require(fleet or t.deadline_s == 0, "train.deadline_s",
             "needs a simulated clock: set fleet.profile", t.deadline_s)
    require(fleet or t.over_select == 0, "train.over_select",
             "needs a simulated clock to know who finishes first: set fleet.profile",
             t.over_select)
    if auto:
        require(fleet and t.deadline_s > 0, "strategy.rank_budget",
                 "'auto' sizes each upload to fit the deadline: it needs fleet.profile and "
                 "train.deadline_s > 0", s.rank_budget)
    if cfg.privacy.mechanism != "none":
        for key, on in (("train.deadline_s", t.deadline_s > 0),
                        ("train.over_select", t.over_select > 0),
                        ("strategy.rank_budget", auto)):
            require(not on, key, "cannot be combined with DP (privacy.mechanism): who takes part "
                    "would depend on the clients' data sizes, which the accountant does not "
                    "cover", getattr(t if key.startswith("train") else s, key.split(".")[1]))
    require(not (fleet and cfg.secagg.enabled), "fleet.profile",
             "cannot be combined with secagg.enabled (the simulated clock needs each client's "
             "upload)", f.profile)


def _validate_async(cfg: Config) -> None:
    """``train.mode = "async"`` (FedBuff, docs/FLEETS.md § Asynchronous rounds)."""
    t = cfg.train
    require(t.mode in TRAIN_MODES, "train.mode", f"must be one of {', '.join(TRAIN_MODES)}",
             t.mode)
    require(t.phase_every >= 0, "train.phase_every", "must be ≥ 0 (0 = auto)", t.phase_every)
    require(t.cross_phase in CROSS_PHASE, "train.cross_phase",
             f"must be one of {', '.join(CROSS_PHASE)}", t.cross_phase)
    if t.mode != "async":  # the async knobs would be silently ignored
        defaults = TrainConfig()
        for key in ("concurrency", "buffer_size", "server_lr", "cross_phase"):
            require(getattr(t, key) == getattr(defaults, key), f"train.{key}",
                    "is for train.mode = 'async' (FedBuff); this run is synchronous",
                    getattr(t, key))
        return
    require(t.concurrency >= 1, "train.concurrency", "must be ≥ 1", t.concurrency)
    require(t.buffer_size >= 1, "train.buffer_size", "must be ≥ 1", t.buffer_size)
    require(t.concurrency >= t.buffer_size, "train.concurrency",
             f"must be ≥ train.buffer_size ({t.buffer_size}): fewer clients in flight than "
             f"the buffer holds would never fill it", t.concurrency)
    require(not clients_known(cfg) or t.concurrency <= cfg.data.num_clients, "train.concurrency",
             f"must be ≤ data.num_clients = {cfg.data.num_clients}", t.concurrency)
    require(math.isfinite(t.server_lr) and t.server_lr > 0, "train.server_lr", "must be > 0",
             t.server_lr)
    require(t.min_replies <= t.buffer_size, "train.min_replies",
             f"must be ≤ train.buffer_size ({t.buffer_size}) in async mode", t.min_replies)
    require(cfg.fleet.profile != "none", "train.mode",
             "'async' runs on the simulated clock: set fleet.profile", t.mode)
    require(cfg.engine.name == "local", "train.mode",
             "'async' runs on the local engine (engine.name = 'local')", t.mode)
    require(cfg.privacy.mechanism == "none", "train.mode",
             "'async' cannot be combined with DP (privacy.mechanism): the accountant covers "
             "sampled rounds, not buffered arrivals", t.mode)
    require(not cfg.secagg.enabled, "train.mode",
             "'async' cannot be combined with secagg.enabled", t.mode)
    require(t.deadline_s == 0, "train.deadline_s",
             "cannot be combined with train.mode = 'async' (a slow client is stale, not late)",
             t.deadline_s)
    require(t.over_select == 0, "train.over_select",
             "cannot be combined with train.mode = 'async' (train.concurrency sets how many "
             "train at once)", t.over_select)
    require(t.clients_per_round == 0, "train.clients_per_round",
             "has no meaning with train.mode = 'async' (train.concurrency and "
             "train.buffer_size set who trains and when the server aggregates)",
             t.clients_per_round)


def phase_every(cfg: Config) -> int:
    """Rounds per A/B phase of an alternating method: ``train.phase_every``, or (0 = auto) 1 in
    sync mode and ⌈concurrency / buffer_size⌉ in async mode (docs/FLEETS.md)."""
    t = cfg.train
    if t.phase_every > 0:
        return t.phase_every
    if t.mode == "async":
        return -(-t.concurrency // t.buffer_size)
    return 1


MAX_EPSILON = 1000.0  # a larger ε promises nothing (e^1000 overflows a float) and stalls calibration


#: the largest finite float32
FLOAT32_MAX = 3.4028234663852886e38
#: more intra-op threads than this is no setting (100,000 crashed torch's thread pool)
MAX_THREADS = 1024


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: an undecodable byte of argv or a path
        return False
    return True


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _validate_privacy(cfg: Config) -> None:
    p = cfg.privacy
    require(p.mechanism in MECHANISMS, "privacy.mechanism", f"must be one of {', '.join(MECHANISMS)}",
             p.mechanism)
    require(p.mode in MODES, "privacy.mode", "must be 'local' or 'central'", p.mode)
    require(p.clip > 0 and math.isfinite(p.clip), "privacy.clip", "must be a finite number > 0",
            p.clip)
    require(0 < p.delta < 1, "privacy.delta", "must be in (0, 1)", p.delta)
    if p.noise_multiplier is not None:
        require(_number(p.noise_multiplier) and 0 < p.noise_multiplier < math.inf,
                "privacy.noise_multiplier", "must be a finite number > 0", p.noise_multiplier)
    if p.epsilon is not None:  # e^ε is the guarantee's factor: past ε ≈ 700 it is no number
        require(_number(p.epsilon) and 0 < p.epsilon <= MAX_EPSILON, "privacy.epsilon",
                f"must be a number in (0, {MAX_EPSILON:g}]", p.epsilon)
    require(p.noise_source in NOISE_SOURCES, "privacy.noise_source",
             f"must be one of {', '.join(NOISE_SOURCES)}", p.noise_source)
    require(0 <= p.weight_cap < math.inf, "privacy.weight_cap", "must be a finite number ≥ 0",
            p.weight_cap)
    require(p.selection in ("public", "private"), "privacy.selection",
             "must be 'public' or 'private'", p.selection)
    require(_number(p.selection_epsilon) and 0 < p.selection_epsilon <= MAX_EPSILON,
            "privacy.selection_epsilon", f"must be a number in (0, {MAX_EPSILON:g}]",
            p.selection_epsilon)
    if p.selection == "private":
        require(p.mechanism != "none", "privacy.selection",
                 "'private' needs DP on the uploads too (set privacy.mechanism); a private "
                 "selection of a non-private update protects nothing", p.selection)
        require(p.mode == "local", "privacy.selection",
                 "'private' is for local mode: in central mode the slot ids reach only the "
                 "trusted server and the release is noised on every slot", p.selection)
    if p.mechanism == "none":
        return
    if (p.noise_multiplier is None) == (p.epsilon is None):
        raise UserError("config keys 'privacy.noise_multiplier' and 'privacy.epsilon': give exactly "
                        f"one of them with privacy.mechanism = '{p.mechanism}'")


def _validate_secagg(cfg: Config) -> None:
    a = cfg.secagg
    if not a.enabled:
        return
    require(cfg.engine.name == "flower", "secagg.enabled",
             "SecAgg+ needs engine.name = 'flower' (the local engine has no network to hide "
             "uploads from)", a.enabled)
    require(not (cfg.privacy.mechanism != "none" and cfg.privacy.mode == "central"),
             "secagg.enabled", "cannot be combined with central DP: the server never sees an "
             "upload to clip; use privacy.mode = 'local' (distributed noise)", a.enabled)
    require(cfg.server.max_update_norm == 0, "server.max_update_norm",
            "cannot be enforced under secagg.enabled: the server never sees an upload to "
            "measure (SecAgg+ bounds each entry by secagg.clipping_range instead); set it to 0",
            cfg.server.max_update_norm)
    # Flower's own rules (SecAggPlusWorkflow._check_init_params), checked here so that a
    # value it would refuse is a config error, not a traceback in the first round
    require(a.num_shares > 0 and (a.num_shares <= 1 or (float(a.num_shares).is_integer()
                                                        and a.num_shares >= 3)),
             "secagg.num_shares", "must be an integer ≥ 3 or a fraction in (0, 1]", a.num_shares)
    t = a.reconstruction_threshold
    require(t > 0 and (t <= 1 or float(t).is_integer()), "secagg.reconstruction_threshold",
             "must be an integer ≥ 2 or a fraction in (0, 1]", t)
    require(t <= 1 or a.num_shares <= 1 or t < a.num_shares, "secagg.reconstruction_threshold",
            f"must be less than secagg.num_shares ({a.num_shares:g})", t)
    m = a.modulus_range
    require(m > 0 and m & (m - 1) == 0, "secagg.modulus_range", "must be a power of 2", m)
    require(a.clipping_range >= 1, "secagg.clipping_range",
            "must be ≥ 1: each client's vector ends with its weight n_k/S, up to 1, which the "
            "server checks against the public partition", a.clipping_range)
    require(a.quantization_range >= 2, "secagg.quantization_range", "must be ≥ 2",
             a.quantization_range)
    require(a.timeout_s >= 0, "secagg.timeout_s", "must be ≥ 0", a.timeout_s)
    if not clients_known(cfg):
        return  # the rest is checked on the resolved config, once the partition is drawn
    n = clients_per_round(cfg)
    require(n >= 2, "secagg.enabled", "needs at least 2 clients per round", a.enabled)
    shares = secagg_shares(a.num_shares, n)
    require(shares <= n, "secagg.num_shares",
             f"must not exceed the clients per round ({n})", a.num_shares)
    require(t <= 1 or t <= min(shares, n), "secagg.reconstruction_threshold",
             f"must not exceed the shares per client ({shares}) or the clients per round ({n})",
             t)
    require(n * a.quantization_range < a.modulus_range, "secagg.modulus_range",
             f"must exceed clients per round × quantization_range ({n * a.quantization_range})"
             f" or the masked sum wraps around", a.modulus_range)


def secagg_shares(num_shares: float, clients: int) -> int:
    """The shares each SecAgg+ client makes of its secrets in a round of ``clients``, as
    Flower's workflow derives them (``SecAggPlusWorkflow.setup_stage``): an integer as given;
    a fraction of the clients rounded, made odd when below ``clients``, and all of them when
    that leaves ≤ 2."""
    if num_shares > 1:
        return int(num_shares)
    shares = round(num_shares * clients)
    if shares < clients and shares % 2 == 0:
        shares += 1
    return clients if shares <= 2 else shares


def clients_known(cfg: Config) -> bool:
    """Whether the config says how many clients there are: false for a ``natural`` partition
    with ``data.num_clients = 0`` (every natural client: known once the data are read, when
    :func:`lora_a2.experiment.prepare` sets the count on its copy of the config and validates
    that copy again)."""
    return cfg.data.num_clients >= 1


def clients_per_round(cfg: Config) -> int:
    """Resolved number of clients sampled each round."""
    cpr, k = cfg.train.clients_per_round, cfg.data.num_clients
    if cpr == 0:
        return k
    if isinstance(cpr, float) and not cpr.is_integer():
        return max(1, round(cpr * k))
    return int(cpr)
