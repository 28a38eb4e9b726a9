"""One federated round, written once: every engine is a :class:`Transport` under it.

A round is a pass down one line — sample → configure → encode → send → receive → validate →
aggregate → record → (personalised) evaluate — and nothing here knows which engine moves the
bytes. A transport only delivers encoded tasks to clients and returns their encoded replies
(the shape of Flower's ``Grid.send_and_receive``): :class:`LocalTransport` runs the client side
in this process (:mod:`lora_a2.engines.local`), ``FlowerRounds`` sends Flower messages over a
``Grid`` (:mod:`lora_a2.engines.flower`). The steps are separate functions (:func:`plan_round` with
:func:`plan_client`, :func:`collect_replies`, :func:`apply_clock`, :func:`close_round`,
:func:`evaluate_clients`) so that another schedule can drive them too; :func:`run_round` is the
synchronous schedule, :mod:`lora_a2.fedbuff` the asynchronous one (``train.mode = "async"``). With a
fleet (``fleet.profile``) :func:`apply_clock` puts every client on the simulated clock of
:mod:`lora_a2.fleet` and drops stragglers and surplus finishers before aggregation.
``LocalTransport`` (:mod:`lora_a2.engines.local`) runs the client side in this process.
"""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .client import batch_of
from .config import clients_per_round
from .experiment import Experiment
from .fleet import close_round_clock, selected_per_round, training_flops_per_example
from .payload import InvalidPayload, Payload, decode, encode
from .messages import ServerState, Task, Update, finite_number
from .validation import UploadLimits, receive_upload

log = logging.getLogger(__name__)

OnClient = Callable[[int], None] | None


# ---------------------------------------------------------------------- seeded schedule
def sample_clients(num_clients: int, per_round: int, seed: int, rnd: int) -> list[int]:
    """Seeded sample of ``per_round`` distinct clients for round ``rnd`` (all when equal)."""
    if per_round >= num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, rnd, 15485863])
    return sorted(int(c) for c in rng.choice(num_clients, size=per_round, replace=False))


def drops_out(seed: int, rnd: int, client: int, probability: float) -> bool:
    """Seeded simulated failure: the client got its task but never replies."""
    if probability <= 0:
        return False
    return bool(np.random.default_rng([seed, rnd, client, 2038074743]).random() < probability)


# ---------------------------------------------------------------------- the transport
@dataclass
class Reply:
    """What came back from one client: its encoded upload, or why nothing usable did."""

    blob: bytes | None = None
    #: the client never answered (timeout, crash): counted as dropped, with this reason
    failure: str | None = None
    #: an answer that could not be read as an upload (counted as rejected, with this reason)
    unreadable: str | None = None


class Transport(ABC):
    """Delivers a round's encoded tasks to clients and returns their replies."""

    def begin_round(self, exp: Experiment, rnd: int) -> None:
        """Before the round is planned (Flower: discover new nodes)."""

    def reachable(self, client: int) -> str | None:
        """Why ``client`` cannot be sent a task now (None: it can)."""
        return None

    @abstractmethod
    def exchange(self, exp: Experiment, rnd: int, tasks: dict[int, bytes],
                 on_client: OnClient) -> dict[int, Reply]:
        """Send every client its encoded task; the replies by client (one per client)."""

    @abstractmethod
    def exchange_eval(self, exp: Experiment, rnd: int, tasks: dict[int, bytes]
                      ) -> dict[int, Reply]:
        """Personalised evaluation: send the encoded evaluate tasks; each client's answer
        (``blob``), or why it gave none (``failure``, ``unreadable``)."""

    def round_extras(self) -> dict[str, Any]:
        """Engine-specific fields of the round's record (Flower: its own byte counts)."""
        return {}

    def eval_extras(self) -> dict[str, Any]:
        """Engine-specific fields of a personalised evaluate phase's record (Flower: the bytes
        it serialised for the evaluate messages)."""
        return {}

    def secure(self, exp: Experiment) -> bool:
        """The round runs under secure aggregation (the server sees only a sum)."""
        return False

    def secure_round(self, exp: Experiment, plan: RoundPlan, state: ServerState,
                     on_client: OnClient) -> tuple[ServerState, dict[str, Any]]:
        """Exchange, aggregate and record a planned round without ever seeing an upload."""
        raise NotImplementedError(f"{type(self).__name__} has no secure aggregation")


# ---------------------------------------------------------------------- the round's steps
@dataclass
class RoundPlan:
    """A round after :func:`plan_round`: who was sampled, what each was sent."""

    rnd: int
    t0: float
    clients: list[int]
    tasks: dict[int, Task] = field(default_factory=dict)
    blobs: dict[int, bytes] = field(default_factory=dict)
    per_client: dict[int, dict[str, Any]] = field(default_factory=dict)
    dropped: list[int] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    #: sampled but offline (``fleet`` availability): never sent a task
    offline: list[int] = field(default_factory=list)
    #: the simulated clock's fields of the round's record (:func:`apply_clock`)
    sim: dict[str, Any] = field(default_factory=dict)


def plan_round(exp: Experiment, rnd: int, state: ServerState, transport: Transport,
               on_client: OnClient = None) -> RoundPlan:
    """Sample the round's clients (⌈clients per round · (1 + ``train.over_select``)⌉),
    configure and encode each one's task; a simulated dropout (``train.dropout``) gets its task
    (counted) and never replies. With a fleet, a client that is offline when sampled never gets
    a task, and ``strategy.rank_budget = "auto"`` sets each client's budget first
    (:func:`fit_budgets`)."""
    cfg = exp.cfg
    transport.begin_round(exp, rnd)
    per_round = selected_per_round(cfg, clients_per_round(cfg))
    plan = RoundPlan(rnd, time.perf_counter(),
                     sample_clients(cfg.data.num_clients, per_round, cfg.seed, rnd))
    for c in plan.clients:
        plan_client(exp, plan, c, state, transport, on_client)
    return plan


def plan_client(exp: Experiment, plan: RoundPlan, c: int, state: ServerState,
                transport: Transport, on_client: OnClient = None, draw: int | None = None,
                seed: int | None = None) -> Task | None:
    """One client of :func:`plan_round`: offline (never sent a task), or its task configured
    for round ``plan.rnd`` and encoded into ``plan`` (``tasks``, ``blobs``, ``per_client``) —
    unless it drops out (``train.dropout``) or the transport cannot reach it. The task, or None
    when nothing is to be sent. ``draw`` keys the seeded availability and dropout draws (default:
    the round); ``seed`` replaces the task's training seed (the asynchronous schedule, whose
    client may train twice against one round's state)."""
    cfg, strategy, layout = exp.cfg, exp.strategy, exp.runtime.layout
    draw = plan.rnd if draw is None else draw
    if exp.fleet is not None and exp.fleet.offline(cfg.seed, draw, c):
        plan.per_client[c] = {"client": c, "download_bytes": 0, "download_params": 0,
                              "upload_bytes": 0, "upload_params": 0, "offline": True}
        plan.offline.append(c)
        if on_client is not None:
            on_client(c)
        return None
    why = transport.reachable(c)
    if why is not None:  # never sent a task: a strategy that records what it sent (FFA-LoRA's
        # one-off A) must not record this one, so it is not configured
        plan.per_client[c] = {"client": c, "download_bytes": 0, "download_params": 0,
                              "upload_bytes": 0, "upload_params": 0, "dropped": True,
                              "failure": why}
        plan.dropped.append(c)
        plan.failures.append(f"client {c}: {why}")
        if on_client is not None:
            on_client(c)
        return None
    budget_row: dict[str, Any] = {}
    if cfg.strategy.rank_budget == "auto":
        fitted = fit_budgets(exp, plan.rnd, state, [c])[c]
        budget_row = {"rank_budget": fitted[0], "budget_fits": fitted[1]}
    task = strategy.configure(plan.rnd, c, state)
    if seed is not None:
        task.config["seed"] = seed
    down_payload = task.to_payload(layout)
    down = encode(down_payload)
    row = {"client": c, "download_bytes": len(down),
           "download_params": down_payload.num_values, **budget_row}
    plan.per_client[c] = row
    if drops_out(cfg.seed, draw, c, cfg.train.dropout):
        row.update(upload_bytes=0, upload_params=0, dropped=True)
        plan.dropped.append(c)
        if on_client is not None:
            on_client(c)
        return None
    plan.tasks[c] = task
    plan.blobs[c] = down
    return task


def collect_replies(exp: Experiment, plan: RoundPlan, replies: dict[int, Reply]
                    ) -> tuple[list[tuple[Task, Update]], list[str]]:
    """Decode and validate every reply (:func:`~lora_a2.validation.receive_upload`, the one
    place untrusted uploads are checked); (accepted replies, rejection reasons)."""
    cfg, strategy = exp.cfg, exp.strategy
    limits = UploadLimits(cfg.server.max_update_bytes, cfg.server.max_update_norm)
    ok: list[tuple[Task, Update]] = []
    reasons: list[str] = []
    for c in plan.clients:
        if c not in plan.tasks:
            continue
        row, reply = plan.per_client[c], replies.get(c) or Reply(failure="no reply")
        if reply.failure is not None:
            row.update(upload_bytes=0, upload_params=0, dropped=True, failure=reply.failure)
            plan.dropped.append(c)
            plan.failures.append(f"client {c}: {reply.failure}")
            continue
        if reply.unreadable is not None or reply.blob is None:
            why = reply.unreadable or "empty reply"
            reasons.append(f"client {c}: {why}")
            row.update(upload_bytes=0, upload_params=0, rejected=why)
            continue
        row["upload_bytes"] = len(reply.blob)
        try:
            update = receive_upload(strategy, plan.tasks[c], reply.blob, limits,
                                    examples=len(exp.client_train[c]))
        except InvalidPayload as e:
            reasons.append(f"client {c}: {e}")
            row.update(upload_params=0, rejected=str(e))
            continue
        ok.append((plan.tasks[c], update))
        row.update(upload_params=int(update.values.numel()),
                   upload_slot_ids=0 if update.slots is None else int(update.slots.numel()),
                   num_examples=update.num_examples, train_loss=update.meta.get("loss"))
    plan.dropped.sort()
    return ok, reasons


# ---------------------------------------------------------------------- the simulated clock
def _flops_per_example(exp: Experiment) -> float:
    """FLOPs of one training example, counted once per run on the first training batch."""
    fleet = exp.fleet
    assert fleet is not None
    if fleet.flops_per_example is None:
        n = min(exp.cfg.train.batch_size, len(exp.enc_train))
        batch = batch_of(exp.enc_train, torch.arange(n), exp.runtime.device)
        fleet.flops_per_example = training_flops_per_example(exp.runtime, batch)
    return fleet.flops_per_example


def example_passes(exp: Experiment, rnd: int, client: int) -> float:
    """n_k · passes_k: the client's training examples times the passes its task costs
    (:meth:`~lora_a2.strategies.Strategy.local_passes`)."""
    n = len(exp.client_train[client])
    return n * exp.strategy.local_passes(rnd, n)


def fit_budgets(exp: Experiment, rnd: int, state: ServerState, clients: list[int]
                ) -> dict[int, tuple[int, bool]]:
    """``strategy.rank_budget = "auto"``: per client, the largest r_k ≤ r_G with
    t_down(r_k) + t_compute + t_up(r_k) ≤ ``train.deadline_s`` on its own link and device, the
    download being the client's real encoded task at r_k and the upload the exact encoded size
    of the largest it could send at r_k (:meth:`~lora_a2.strategies.Strategy.largest_update`).
    Sets ``strategy.budgets``; (r_k, fits) by client — a client where not even r_k = 1 fits
    gets 1 and is a straggler by construction."""
    strategy, fleet, layout = exp.strategy, exp.fleet, exp.runtime.layout
    assert fleet is not None
    _flops_per_example(exp)
    deadline = exp.cfg.train.deadline_s
    out: dict[int, tuple[int, bool]] = {}
    for c in clients:
        n, work = len(exp.client_train[c]), example_passes(exp, rnd, c)
        out[c] = (1, False)
        for r in range(exp.cfg.strategy.global_rank, 0, -1):
            strategy.budgets[c] = r
            down = len(encode(strategy.configure(rnd, c, state).to_payload(layout)))
            up = len(encode(strategy.largest_update(rnd, c, n, r).to_payload()))
            if sum(fleet.times(c, down, up, work)) <= deadline:
                out[c] = (r, True)
                break
        strategy.budgets[c] = out[c][0]
    return out


def apply_clock(exp: Experiment, plan: RoundPlan, ok: list[tuple[Task, Update]],
                reasons: list[str] | None = None) -> list[tuple[Task, Update]]:
    """Each client's simulated download, compute and upload seconds from its real encoded
    bytes and its work (:meth:`lora_a2.fleet.Fleet.times`), then who the round keeps
    (:func:`lora_a2.fleet.close_round_clock`): a straggler past ``train.deadline_s`` and a
    surplus finisher beyond the first ``clients_per_round`` (``train.over_select``) have their
    work discarded — their upload is not counted, their download is; a late upload that would
    have been refused is a straggler (or surplus, arriving after an over-selected round
    closed), not a rejection (the server stopped waiting before it came: its entry leaves
    ``reasons``). Returns the kept replies; the record's fields go to
    ``plan.sim``. Without a fleet: ``ok`` unchanged."""
    fleet, cfg = exp.fleet, exp.cfg
    if fleet is None:
        return ok
    _flops_per_example(exp)
    finish: dict[int, float] = {}
    for c in plan.clients:
        row = plan.per_client[c]
        if row.get("offline"):
            continue
        replied = c in plan.tasks and not row.get("dropped")
        down, compute, up = fleet.times(c, row["download_bytes"],
                                        row["upload_bytes"] if replied else 0,
                                        example_passes(exp, plan.rnd, c) if replied else 0.0)
        row["sim_download_s"] = down
        if replied:
            row.update(sim_compute_s=compute, sim_upload_s=up)
            finish[c] = down + compute + up
    target = clients_per_round(cfg) if cfg.train.over_select > 0 else None
    clock = close_round_clock(finish, [t.client_id for t, _ in ok],
                              deadline_s=cfg.train.deadline_s, target=target,
                              # a dropout got its task, so the server waits for it; a
                              # client it could not reach was never sent one
                              waiting=any(plan.per_client[c]["download_bytes"] > 0
                                          for c in plan.dropped))
    for c, why in [(c, "straggler") for c in clock.stragglers] + [(c, "surplus")
                                                                 for c in clock.surplus]:
        row = plan.per_client[c]
        row.pop("train_loss", None)
        if row.pop("rejected", None) is not None and reasons is not None:
            reasons[:] = [r for r in reasons if not r.startswith(f"client {c}: ")]
        row.update(upload_bytes=0, upload_params=0, upload_slot_ids=0, **{why: True})
    plan.sim = {"sim_round_s": clock.round_s, "stragglers": clock.stragglers,
                "offline": plan.offline}
    if target is not None:
        plan.sim["surplus"] = clock.surplus
    kept = set(clock.kept)
    return [(t, u) for t, u in ok if t.client_id in kept]


def close_round(exp: Experiment, plan: RoundPlan, state: ServerState,
                ok: list[tuple[Task, Update]], reasons: list[str],
                extras: dict[str, Any] | None = None,
                aggregate: Callable[[ServerState, list[tuple[Task, Update]]],
                                    tuple[ServerState, dict[str, Any]]] | None = None,
                num_replies: int | None = None, usable: bool = True
                ) -> tuple[ServerState, dict[str, Any]]:
    """Aggregate when at least ``train.min_replies`` uploads were accepted (else the round
    fails and the state stays); the round's record. ``aggregate(state, ok)``: how (default:
    ``strategy.aggregate_round``; the asynchronous schedule weights by staleness). Under
    secure aggregation the server holds no upload: ``num_replies`` is the clients in the
    secure sum and ``usable`` whether the sum can be used."""
    strategy = exp.strategy
    info: dict[str, Any] = {}
    n = len(ok) if num_replies is None else num_replies
    failed = not usable or n < max(1, exp.cfg.train.min_replies)
    if not failed:
        if aggregate is None:
            state, info = strategy.aggregate_round(plan.rnd, state, ok)  # + central DP noise
        else:
            state, info = aggregate(state, ok)
    rows = [plan.per_client[c] for c in plan.clients]
    record = round_record(strategy, plan.rnd, plan.clients, rows, num_replies=n,
                          failed=failed, dropped=plan.dropped, reasons=reasons, info=info)
    record["failures"] = plan.failures  # every engine writes it (empty: none failed)
    record.update(extras or {})
    record.update(plan.sim)
    record.update(per_client=rows, train_wall_s=time.perf_counter() - plan.t0)
    return state, record


def evaluate_clients(exp: Experiment, rnd: int, state: ServerState, transport: Transport,
                     reachable: Callable[[int], bool] = lambda c: True) -> dict[str, Any]:
    """A personalised strategy's evaluate phase: every client gets the shared part
    (``strategy.eval_task``), evaluates its own model and answers with its metrics; both
    directions are real encodings and are counted (``eval_*_bytes``)."""
    strategy, layout = exp.strategy, exp.runtime.layout
    tasks = {c: encode(strategy.eval_task(rnd, c, state).to_payload(layout))
             for c in range(exp.cfg.data.num_clients) if reachable(c)}
    answers = transport.exchange_eval(exp, rnd, tasks)
    evals: list[dict[str, Any] | None] = []
    failures: list[str] = []
    for c in range(exp.cfg.data.num_clients):
        reply = answers.get(c)
        if c not in tasks:  # unreachable: never asked
            evals.append(None)
            continue
        if reply is None or reply.blob is None:
            why = "no reply" if reply is None else reply.failure or reply.unreadable
            failures.append(f"client {c}: {why or 'empty answer'}")
            evals.append(None)
            continue
        try:
            evals.append(eval_answer(reply.blob, c, exp.task.client_eval_ranges))
        except InvalidPayload as e:
            failures.append(f"client {c}: evaluation answer rejected: {e}")
            evals.append(None)
    for f in failures:
        log.warning("evaluation: %s", f)
    return {"client_eval": evals, "eval_download_bytes": sum(len(b) for b in tasks.values()),
            "eval_upload_bytes": sum(len(r.blob) for r in answers.values()
                                     if r.blob is not None),
            "eval_failures": failures}


def run_round(exp: Experiment, rnd: int, state: ServerState, transport: Transport,
              on_client: OnClient = None) -> tuple[ServerState, dict[str, Any]]:
    """The synchronous round: plan, exchange, collect, close, and evaluate personal models."""
    plan = plan_round(exp, rnd, state, transport, on_client)
    if transport.secure(exp):
        state, record = transport.secure_round(exp, plan, state, on_client)
    else:
        replies = transport.exchange(exp, rnd, plan.blobs, on_client) if plan.blobs else {}
        ok, reasons = collect_replies(exp, plan, replies)
        ok = apply_clock(exp, plan, ok, reasons)
        state, record = close_round(exp, plan, state, ok, reasons, transport.round_extras())
    if exp.strategy.personalized:
        record.update(evaluate_clients(exp, rnd, state, transport,
                                       lambda c: transport.reachable(c) is None))
        record.update(transport.eval_extras())
    return state, record


# ---------------------------------------------------------------------- records and answers
def eval_reply(client: int, metrics: dict[str, Any]) -> Payload:
    """A client's evaluation answer: no tensors, its metrics in the header."""
    return Payload(values=torch.zeros(0), meta={"client": client, "metrics": metrics})


def eval_answer(blob: bytes, client: int,
                expected: dict[str, tuple[float, float, bool]] | None = None) -> dict[str, Any]:
    """The metrics of an evaluation answer; :class:`InvalidPayload` when it is not a
    well-formed answer from ``client`` with finite numbers in [0, ∞) — and, with ``expected``
    (the task's :attr:`~lora_a2.tasks.LearningTask.client_eval_ranges`), exactly its keys,
    each in its range (None only where allowed): the server reads them all."""
    try:
        meta = decode(blob).meta
        metrics = meta["metrics"]
    except (KeyError, TypeError) as e:
        raise InvalidPayload(f"malformed ({type(e).__name__})") from None
    if meta.get("client") != client or not isinstance(metrics, dict):
        raise InvalidPayload("not an evaluation answer from this client")
    for k, v in metrics.items():
        if v is not None and not (finite_number(v) and v >= 0):
            raise InvalidPayload(f"metric {k!r} = {str(v)[:40]!r}")
    if expected is not None:
        missing, extra = sorted(set(expected) - set(metrics)), sorted(set(metrics) - set(expected))
        if missing or extra:
            raise InvalidPayload(f"metrics {missing[:3]} missing, {[k[:40] for k in extra[:3]]} "
                                 f"not expected")
        for k, (low, high, may_be_none) in expected.items():
            v = metrics[k]
            if (v is None and not may_be_none) or (v is not None and not low <= v <= high):
                raise InvalidPayload(f"metric {k!r} = {str(v)[:40]!r} is outside "
                                     f"[{low:g}, {high:g}]")
    return metrics


def read_eval_reply(blob: bytes, client: int) -> dict[str, Any] | None:
    """:func:`eval_answer`, or None (logged) when the answer is not usable."""
    try:
        return eval_answer(blob, client)
    except InvalidPayload as e:
        log.warning("client %d: evaluation answer rejected: %s", client, e)
        return None


def round_record(strategy, rnd: int, clients: list[int], per_client: list[dict[str, Any]], *,
                 num_replies: int, failed: bool, dropped: list[int], reasons: list[str],
                 info: dict[str, Any]) -> dict[str, Any]:
    """The engine-independent part of a round's metrics line."""
    losses = [r["train_loss"] for r in per_client if r.get("train_loss") is not None]
    return {
        "round": rnd,
        "strategy": strategy.name,
        "active_factor": strategy.active_factor(rnd),
        "clients": clients,
        "num_replies": num_replies,
        "status": "failed" if failed else "ok",
        "dropped": dropped,
        "upload_bytes": sum(r["upload_bytes"] for r in per_client),
        "download_bytes": sum(r["download_bytes"] for r in per_client),
        "upload_params": sum(r["upload_params"] for r in per_client),
        "upload_slot_ids": sum(r.get("upload_slot_ids", 0) for r in per_client),
        "download_params": sum(r["download_params"] for r in per_client),
        "train_loss": float(np.mean(losses)) if losses else None,
        "rejected": len(reasons),
        "reject_reasons": reasons,
        **info,
    }


def evaluate_state(exp: Experiment, state: ServerState) -> dict[str, Any]:
    """Load the global state into the model and evaluate it with the run's task (the global
    test set, and per client where the task defines it)."""
    exp.runtime.load(state.tensors)
    with exp.runtime.autocast():  # train.precision: evaluation computes like training
        return exp.task.evaluate(exp)
