"""The embedded engine: one process simulates every client on one model, loaded once.

Each round: sample clients → for each, ``strategy.configure`` → encode the download → the client
decodes it and runs ``strategy.client_update`` → encode the upload → the server decodes and
validates it → ``strategy.aggregate`` → evaluate → metrics line. Every message really is encoded
to bytes and decoded again, so the byte counts are those a network would carry.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from ..experiment import Experiment
from ..config import clients_per_round
from ..payload import InvalidPayload, Payload, decode, encode
from ..strategies.base import ServerState, Task, Update
from ..validation import UploadLimits, receive_upload

log = logging.getLogger(__name__)

RoundCallback = Callable[[dict[str, Any]], None]


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


def run_round(exp: Experiment, rnd: int, state: ServerState,
              on_client: Callable[[int], None] | None = None) -> tuple[ServerState, dict[str, Any]]:
    """Run one federated round; return the new state and its metrics record (no evaluation)."""
    cfg, strategy, layout = exp.cfg, exp.strategy, exp.runtime.layout
    t0 = time.perf_counter()
    clients = sample_clients(cfg.data.num_clients, clients_per_round(cfg), cfg.seed, rnd)
    replies: list[tuple[Task, Update]] = []
    per_client: list[dict[str, Any]] = []
    reasons: list[str] = []
    dropped: list[int] = []
    limits = UploadLimits(cfg.server.max_update_bytes, cfg.server.max_update_norm)
    for c in clients:
        task = strategy.configure(rnd, c, state)
        down_payload = task.to_payload(layout)
        down = encode(down_payload)
        if drops_out(cfg.seed, rnd, c, cfg.train.dropout):
            dropped.append(c)
            per_client.append({"client": c, "download_bytes": len(down),
                               "download_params": down_payload.num_values, "upload_bytes": 0,
                               "upload_params": 0, "dropped": True})
            if on_client is not None:
                on_client(c)
            continue
        # ---- client side: only the bytes cross over -------------------------------------
        ctx = exp.client_context(c)
        client_task = Task.from_payload(decode(down), layout)
        up = encode(strategy.upload(ctx, client_task).to_payload())  # DP clip/noise inside
        # ---- server side -----------------------------------------------------------------
        record = {"client": c, "download_bytes": len(down),
                  "download_params": down_payload.num_values, "upload_bytes": len(up)}
        try:
            update = receive_upload(strategy, task, up, limits)
            replies.append((task, update))
            record.update(upload_params=int(update.values.numel()),
                          upload_slot_ids=0 if update.slots is None else int(update.slots.numel()),
                          num_examples=update.num_examples, train_loss=update.meta.get("loss"))
        except InvalidPayload as e:
            reasons.append(f"client {c}: {e}")
            record.update(upload_params=0, rejected=str(e))
        per_client.append(record)
        if on_client is not None:
            on_client(c)
    info: dict[str, Any] = {}
    # Too few replies: the round fails and the global state stays as it was.
    failed = len(replies) < max(1, cfg.train.min_replies)
    if not failed:
        state, info = strategy.aggregate_round(rnd, state, replies)  # + central DP noise
    record = round_record(strategy, rnd, clients, per_client, num_replies=len(replies),
                          failed=failed, dropped=dropped, reasons=reasons, info=info)
    record.update(per_client=per_client, train_wall_s=time.perf_counter() - t0)
    if strategy.personalized:
        record.update(evaluate_clients(exp, rnd, state))
    return state, record


def evaluate_clients(exp: Experiment, rnd: int, state: ServerState) -> dict[str, Any]:
    """A personalised strategy's evaluate phase: every client gets the shared part
    (``strategy.eval_task``), evaluates its own model and answers with its metrics; both
    directions go through real encoding and are counted (``eval_*_bytes``)."""
    strategy, layout = exp.strategy, exp.runtime.layout
    evals: list[dict[str, Any] | None] = []
    down_bytes = up_bytes = 0
    for c in range(exp.cfg.data.num_clients):
        down = encode(strategy.eval_task(rnd, c, state).to_payload(layout))
        task = Task.from_payload(decode(down), layout)  # ---- client side
        up = encode(eval_reply(c, strategy.client_evaluate(exp.client_context(c), task)))
        evals.append(read_eval_reply(up, c))  # ---- server side
        down_bytes += len(down)
        up_bytes += len(up)
    return {"client_eval": evals, "eval_download_bytes": down_bytes,
            "eval_upload_bytes": up_bytes}


def eval_reply(client: int, metrics: dict[str, Any]) -> Payload:
    """A client's evaluation answer: no tensors, its metrics in the header."""
    return Payload(values=torch.zeros(0), meta={"client": client, "metrics": metrics})


def read_eval_reply(blob: bytes, client: int) -> dict[str, Any] | None:
    """The metrics of an evaluation answer, or None (logged) when it is not a well-formed
    answer from ``client`` with finite numbers in [0, ∞)."""
    try:
        meta = decode(blob).meta
        metrics = meta["metrics"]
        if meta.get("client") != client or not isinstance(metrics, dict):
            raise InvalidPayload("not an evaluation answer from this client")
        for k, v in metrics.items():
            if v is not None and not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise InvalidPayload(f"metric {k!r} = {v!r}")
        return metrics
    except (InvalidPayload, KeyError, TypeError) as e:
        log.warning("client %d: evaluation answer rejected: %s", client, e)
        return None


def round_record(strategy, rnd: int, clients: list[int], per_client: list[dict[str, Any]], *,
                 num_replies: int, failed: bool, dropped: list[int], reasons: list[str],
                 info: dict[str, Any]) -> dict[str, Any]:
    """The engine-independent part of a round's metrics line (both engines build it here)."""
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
    return exp.task.evaluate(exp)
