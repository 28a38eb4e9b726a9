"""The asynchronous schedule (``train.mode = "async"``): FedBuff — Nguyen, Malik, Zhan,
Yousefpour, Rabbat, Malek, Huba, "Federated Learning with Buffered Asynchronous Aggregation",
AISTATS 2022 — on the simulated clock of :mod:`lora_a2.fleet`.

``train.concurrency`` (C) clients train at once. Each downloads the newest global state when it
is dispatched; its reply reaches the server after its download + compute + upload seconds
(:meth:`lora_a2.fleet.Fleet.times`, from its real encoded bytes). The server keeps the arrivals
in a buffer and, once ``train.buffer_size`` (K) of them are accepted, takes FedBuff's step
x ← x + η_g Σ_k s(τ_k) (n_k / Σ_j n_j) Δ_k (:meth:`Strategy.aggregate_buffer`,
:func:`lora_a2.aggregation.buffered_weights`, s(τ) = 1/√(1+τ)), τ_k being the rounds closed
between client k's download and its arrival. Every arrival frees its slot, which is given to
the next client at once (with the state of that moment); the slots freed by the arrival that
fills the buffer are given after the step, with the newest state. One aggregation is one
round: one metrics line, one checkpoint.

It drives the steps of the synchronous round (:mod:`lora_a2.rounds`): :func:`plan_client`
configures and encodes each dispatched task, the transport's ``exchange`` runs it,
:func:`collect_replies` decodes and validates each arrival, :func:`close_round` aggregates and
builds the record. With the local engine a client's work is computed when it is dispatched (on
the state it downloaded) and its encoded reply waits, in flight, until its simulated arrival:
the schedule's state — the clock, the in-flight tasks with their replies — lives in the
global state's ``extra`` (:data:`SCHEDULE`, :data:`REPLIES`), so the run's checkpoint holds it
and a resumed run continues exactly.

Which client is dispatched is a seeded draw (seed, dispatch number) among the idle clients
that have not already been seen in the current round (each client appears at most once in a
round's record); its training seed, availability and dropout draws are keyed by the dispatch
number too. Alternating methods (LoRA-A2, RoLoRA) flip their A/B phase every
``train.phase_every`` rounds; an update whose phase is not the round's is ``cross_phase``
(``train.cross_phase``: dropped or applied) — docs/FLEETS.md § Asynchronous rounds.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from .experiment import Experiment
from .messages import ServerState, Task, Update
from .rounds import (OnClient, Reply, RoundPlan, Transport, _flops_per_example, close_round,
                     collect_replies, example_passes, plan_client)
from .strategies.context import client_seed

#: key of the schedule's JSON state in ``ServerState.extra``
SCHEDULE = "async"
#: key of the in-flight encoded replies (uint8 tensors by dispatch number) in ``extra``
REPLIES = "async_replies"
_PICK_SALT = 0xFEDB0FF


@dataclass
class Flight:
    """One dispatched task whose reply has not reached the server yet."""

    dispatch: int
    client: int
    #: rounds closed when the client downloaded the state (its staleness is counted from it)
    version: int
    finish_s: float
    task_round: int
    config: dict[str, Any]
    row: dict[str, Any]
    failure: str | None = None
    unreadable: str | None = None
    blob: bytes | None = field(default=None, repr=False)


@dataclass
class Schedule:
    """The asynchronous schedule's state between rounds."""

    clock_s: float = 0.0
    version: int = 0
    dispatched: int = 0
    flights: list[Flight] = field(default_factory=list)

    @classmethod
    def load(cls, state: ServerState) -> Schedule:
        raw = state.extra.get(SCHEDULE)
        if raw is None:
            return cls()
        blobs = state.extra.get(REPLIES) or {}
        flights = []
        for f in raw["flights"]:
            blob = blobs.get(str(f["dispatch"]))
            flights.append(Flight(**f, blob=None if blob is None else
                                  bytes(blob.to(torch.uint8).numpy().tobytes())))
        return cls(raw["clock_s"], raw["version"], raw["dispatched"], flights)

    def save(self, state: ServerState) -> None:
        """Into ``state.extra`` (JSON and uint8 tensors: the checkpoint stores both)."""
        state.extra[SCHEDULE] = {
            "clock_s": self.clock_s, "version": self.version, "dispatched": self.dispatched,
            "flights": [{k: v for k, v in asdict(f).items() if k != "blob"}
                        for f in self.flights]}
        state.extra[REPLIES] = {str(f.dispatch): torch.frombuffer(bytearray(f.blob),
                                                                  dtype=torch.uint8)
                                for f in self.flights if f.blob}

    def next_arrival(self) -> Flight:
        """Remove and return the flight that reaches the server first (ties: dispatched first)."""
        f = min(self.flights, key=lambda f: (f.finish_s, f.dispatch))
        self.flights.remove(f)
        return f


def pick_client(seed: int, dispatch: int, idle: list[int]) -> int:
    """Seeded uniform draw of the client for dispatch number ``dispatch`` among ``idle``."""
    rng = np.random.default_rng([seed, dispatch, _PICK_SALT])
    return idle[int(rng.integers(len(idle)))]


@dataclass
class _Round:
    """What one asynchronous round gathers before it closes."""

    plan: RoundPlan
    seen: set[int] = field(default_factory=set)
    ok: list[tuple[Task, Update]] = field(default_factory=list)
    staleness: list[int] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    cross_phase: int = 0
    frozen_target: int = 0


def _fill(exp: Experiment, sched: Schedule, rd: _Round, state: ServerState,
          transport: Transport, on_client: OnClient) -> None:
    """Dispatch idle clients until ``train.concurrency`` are in flight (or none is left that the
    round has not seen yet): each one's task is configured and encoded (:func:`plan_client`)
    for the round its reply is meant for, run by the transport on the current state, and put in
    flight until its simulated arrival. Offline and dropped-out clients are recorded in the
    current round."""
    cfg, fleet = exp.cfg, exp.fleet
    assert fleet is not None
    while len(sched.flights) < cfg.train.concurrency:
        busy = {f.client for f in sched.flights}
        idle = [c for c in range(cfg.data.num_clients) if c not in busy and c not in rd.seen]
        if not idle:
            return
        sched.dispatched += 1
        d = sched.dispatched
        c = pick_client(cfg.seed, d, idle)
        one = RoundPlan(sched.version + 1, 0.0, [c])
        task = plan_client(exp, one, c, state, transport, draw=d,
                           seed=client_seed(cfg.seed, d, c))
        row = one.per_client[c]
        row["dispatch"] = d  # the key of its availability, dropout and training draws
        if task is None:  # offline, dropped out or unreachable: this round's record has it
            if row.get("download_bytes"):  # a dropout: it got its task, then never replies
                # (the schedule does not wait for it: its slot is refilled at once)
                row.update(version=sched.version, sim_start_s=sched.clock_s,
                           sim_download_s=fleet.times(c, row["download_bytes"], 0, 0.0)[0])
            rd.seen.add(c)
            plan = rd.plan
            plan.clients.append(c)
            plan.per_client[c] = row
            plan.offline += one.offline
            plan.dropped += one.dropped
            plan.failures += one.failures
            if on_client is not None:
                on_client(c)
            continue
        reply = transport.exchange(exp, one.rnd, one.blobs, None).get(c) or Reply(
            failure="no reply")
        sent = reply.blob is not None and reply.failure is None and reply.unreadable is None
        down, compute, up = fleet.times(c, row["download_bytes"],
                                        len(reply.blob) if sent and reply.blob else 0,
                                        example_passes(exp, one.rnd, c))
        row.update(version=sched.version, sim_start_s=sched.clock_s,
                   sim_download_s=down, sim_compute_s=compute, sim_upload_s=up)
        sched.flights.append(Flight(d, c, sched.version, sched.clock_s + down + compute + up,
                                    task.round, task.config, row, reply.failure,
                                    reply.unreadable, reply.blob))


def _arrive(exp: Experiment, rnd: int, f: Flight, rd: _Round, on_client: OnClient) -> None:
    """One reply reaches the server: validated (:func:`collect_replies`), its staleness
    counted, its phase checked (alternating methods), and — unless rejected or dropped as
    cross-phase — put in the buffer."""
    strategy, plan = exp.strategy, rd.plan
    c, row = f.client, f.row
    rd.seen.add(c)
    plan.clients.append(c)
    plan.per_client[c] = row
    task = Task(f.task_round, c, f.config, {})  # the server's copy: the config is what it reads
    one = RoundPlan(rnd, 0.0, [c], tasks={c: task}, per_client={c: row})
    got, reasons = collect_replies(exp, one, {c: Reply(f.blob, f.failure, f.unreadable)})
    plan.dropped += one.dropped
    plan.failures += one.failures
    rd.reasons += reasons
    tau = rnd - 1 - f.version
    row.update(staleness=tau, sim_arrival_s=f.finish_s)
    if got:
        use = True
        if strategy.alternating and strategy.phase(f.task_round) != strategy.phase(rnd):
            rd.cross_phase += 1
            row["cross_phase"] = True
            if strategy.active_factor(f.task_round) != strategy.active_factor(rnd):
                rd.frozen_target += 1
                row["frozen_target"] = True
            if exp.cfg.train.cross_phase == "drop":
                row["discarded"] = True
                row.pop("train_loss", None)  # the round's train_loss: aggregated updates only
                use = False
        if use:
            rd.ok.append(got[0])
            rd.staleness.append(tau)
    if on_client is not None:
        on_client(c)


def run_async_round(exp: Experiment, rnd: int, state: ServerState, transport: Transport,
                    on_client: OnClient = None) -> tuple[ServerState, dict[str, Any]]:
    """Round ``rnd`` of the asynchronous schedule: fill the slots, take arrivals in order of
    their simulated time until ``train.buffer_size`` are accepted (or nothing is in flight),
    then FedBuff's step over the buffer and the round's record — the synchronous record's
    fields, plus ``staleness`` (τ of each aggregated update, in buffer order), ``cross_phase``
    and ``frozen_target`` (counts of arrivals from another A/B phase, and of those that trained
    the factor this round keeps frozen), ``in_flight`` and ``sim_round_s`` (simulated seconds
    since the previous aggregation)."""
    cfg, strategy = exp.cfg, exp.strategy
    sched = Schedule.load(state)
    if sched.version != rnd - 1:
        raise RuntimeError(f"asynchronous schedule at round {sched.version + 1}, asked for {rnd}")
    transport.begin_round(exp, rnd)
    _flops_per_example(exp)
    start = sched.clock_s
    rd = _Round(RoundPlan(rnd, time.perf_counter(), []))
    _fill(exp, sched, rd, state, transport, on_client)
    while len(rd.ok) < cfg.train.buffer_size and sched.flights:
        f = sched.next_arrival()
        sched.clock_s = f.finish_s
        _arrive(exp, rnd, f, rd, on_client)
        if len(rd.ok) < cfg.train.buffer_size:
            _fill(exp, sched, rd, state, transport, on_client)
    plan = rd.plan
    plan.dropped.sort()
    plan.sim = {"sim_round_s": sched.clock_s - start, "stragglers": [], "offline": plan.offline}
    staleness = list(rd.staleness)
    state, record = close_round(
        exp, plan, state, rd.ok, rd.reasons, transport.round_extras(),
        aggregate=lambda st, ok: strategy.aggregate_buffer(rnd, st, ok, staleness))
    sched.version = rnd
    record.update(staleness=staleness, in_flight=len(sched.flights))
    if strategy.alternating:
        record.update(phase=strategy.phase(rnd), cross_phase=rd.cross_phase,
                      frozen_target=rd.frozen_target)
    state = ServerState(state.tensors, dict(state.extra))
    sched.save(state)
    return state, record
