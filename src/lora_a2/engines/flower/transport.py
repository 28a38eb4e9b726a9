"""The server side of a Flower round: :class:`FlowerRounds`, the transport under the one round
loop (node discovery, per-node messages, replies, SecAgg+ rounds), and its round timings."""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any

from ...config import Config
from ...payload import InvalidPayload
from ...rounds import Reply, RoundPlan, Transport, close_round, run_round
from ...messages import ServerState
from ..secagg import run_secure_round, weight_scale
from .records import CONFIG_RECORD, message_bytes, pack, timing_of, unpack

log = logging.getLogger(__name__)


def _partition_claim(content) -> tuple[int, int | None]:
    """(partition-id, num-partitions or None) from a node's answer to the partition query;
    KeyError / TypeError / ValueError when the answer is not two integers where expected."""
    info = content.config_records[CONFIG_RECORD]
    pid, n_parts = info["partition-id"], info.get("num-partitions")
    for key, v in (("partition-id", pid), ("num-partitions", n_parts)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(f"{key} is {v!r}, not an integer")
    return pid, n_parts


class FlowerRounds(Transport):
    """The Flower transport under the one round loop (:mod:`lora_a2.rounds`), and the round
    function :func:`lora_a2.runner.run_experiment` calls: it moves the messages through a
    Flower ``Grid``."""

    def __init__(self, grid, cfg: Config, connect_timeout_s: float | None = None) -> None:
        self.grid = grid
        self.cfg = cfg
        self.config_toml = cfg.to_toml()
        self.node_of: dict[int, int] = {}  # client (partition) id → node id
        self.known: set[int] = set()  # node ids already asked for their partition
        self.connect_timeout_s = (cfg.engine.connect_timeout_s if connect_timeout_s is None
                                  else connect_timeout_s)
        self.query_bytes = 0

    # -- node discovery -------------------------------------------------------
    def _timeout(self) -> float | None:
        t = self.cfg.engine.round_timeout_s
        return t if t > 0 else None

    def discover(self, wait: bool, num_clients: int | None = None) -> list[str]:
        """Ask new nodes for their partition; on the first call wait (up to
        ``engine.connect_timeout_s``) until every client has a node. ``num_clients``: the
        partition's (default ``data.num_clients``; a natural partition's is the experiment's)."""
        from flwr.app import Message, MessageType, RecordDict

        warnings: list[str] = []
        deadline = time.monotonic() + (self.connect_timeout_s if wait else 0)
        if num_clients is None:
            num_clients = self.cfg.data.num_clients
        while True:
            online = list(self.grid.get_node_ids())
            # a node that left frees its partition: a SuperNode restarted with a new key (a
            # new node id) may claim it, where it was refused as "already held" for good
            for pid, node in sorted(self.node_of.items()):
                if node not in online:
                    warnings.append(f"node {node}: gone — partition {pid} is free again")
                    del self.node_of[pid]
                    self.known.discard(node)
            new = [n for n in online if n not in self.known]
            if new:
                msgs = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY,
                                group_id="discover") for n in new]
                self.query_bytes += sum(message_bytes(m) for m in msgs)
                replies = list(self.grid.send_and_receive(msgs, timeout=self._timeout()))
                for r in replies:
                    node = r.metadata.src_node_id
                    self.query_bytes += message_bytes(r)
                    if r.has_error():
                        warnings.append(f"node {node}: query failed: {r.error.reason[:200]}")
                        continue
                    self.known.add(node)
                    try:
                        pid, n_parts = _partition_claim(r.content)
                    except (KeyError, TypeError, ValueError) as e:
                        warnings.append(f"node {node}: malformed answer to the partition query "
                                        f"({type(e).__name__}: {str(e)[:120]}) — ignored")
                        continue
                    if not 0 <= pid < num_clients:
                        warnings.append(f"node {node}: partition-id {pid} outside "
                                        f"[0, {num_clients}) — ignored")
                    elif n_parts is not None and n_parts != num_clients:
                        warnings.append(f"node {node}: num-partitions {n_parts} ≠ "
                                        f"data.num_clients {num_clients} — ignored")
                    elif pid in self.node_of and self.node_of[pid] != node:
                        warnings.append(f"node {node}: partition {pid} already held by node "
                                        f"{self.node_of[pid]} — ignored")
                    else:
                        self.node_of[pid] = node
            if len(self.node_of) >= num_clients or time.monotonic() >= deadline:
                break
            time.sleep(0.5)
        for w in warnings:
            log.warning(w)
        return warnings

    # -- the transport under the one round loop (lora_a2.rounds) ---------------
    def __call__(self, exp, rnd: int, state: ServerState,
                 on_client: Callable[[int], None] | None = None
                 ) -> tuple[ServerState, dict[str, Any]]:
        """One round of :func:`lora_a2.rounds.run_round` over Flower's Grid."""
        return run_round(exp, rnd, state, self, on_client)

    def begin_round(self, exp, rnd: int) -> None:
        t0 = time.perf_counter()
        self._query_before = self.query_bytes
        self._node_warnings = self.discover(wait=not self.known,
                                            num_clients=exp.cfg.data.num_clients)
        self._discover_s = time.perf_counter() - t0  # round 1: waits for Ray and the nodes
        self._down = self._up = 0
        self._timing: dict[str, Any] = {}
        self._eval: dict[str, int] = {}

    def reachable(self, client: int) -> str | None:
        return None if client in self.node_of else "no connected node holds this partition"

    def exchange(self, exp, rnd: int, tasks: dict[int, bytes], on_client) -> dict[int, Reply]:
        from flwr.app import Message, MessageType

        messages = {c: Message(pack(down, self.config_toml), dst_node_id=self.node_of[c],
                               message_type=MessageType.TRAIN, group_id=str(rnd))
                    for c, down in tasks.items()}
        self._down += sum(message_bytes(m) for m in messages.values())
        t_send = time.perf_counter()
        got = list(self.grid.send_and_receive(list(messages.values()),
                                              timeout=self._timeout())) if messages else []
        self._timing = {"discover_s": round(self._discover_s, 4),
                        **round_timing(time.perf_counter() - t_send, got)}
        self._up += sum(message_bytes(r) for r in got)
        return self._replies(tasks, got, on_client)

    def _replies(self, tasks: dict[int, bytes], got, on_client=None) -> dict[int, Reply]:
        """Each asked client's answer among Flower's replies ``got``: its bytes, or why there
        are none (no reply in time, the ClientApp's error, an answer that cannot be
        unpacked)."""
        by_node = {r.metadata.src_node_id: r for r in got}
        timeout = self._timeout()
        replies: dict[int, Reply] = {}
        for c in tasks:
            reply = by_node.get(self.node_of[c])
            if reply is None:
                replies[c] = Reply(failure="no reply" if timeout is None
                                   else f"no reply within {timeout} s")
            elif reply.has_error():
                replies[c] = Reply(failure=f"ClientApp error {reply.error.code}: "
                                           f"{error_text(reply.error.reason)}")
            else:
                try:
                    replies[c] = Reply(unpack(reply.content))
                except InvalidPayload as e:
                    replies[c] = Reply(unreadable=str(e))
            if on_client is not None:
                on_client(c)
        return replies

    def round_extras(self) -> dict[str, Any]:
        return {"node_warnings": self._node_warnings,
                "flower_download_bytes": self._down, "flower_upload_bytes": self._up,
                "flower_query_bytes": self.query_bytes - self._query_before,
                "flower_timing": self._timing}

    def secure(self, exp) -> bool:
        return bool(exp.cfg.secagg.enabled)

    def secure_round(self, exp, plan: RoundPlan, state: ServerState, on_client
                     ) -> tuple[ServerState, dict[str, Any]]:
        """The round under SecAgg+ (``secagg.enabled``; :mod:`lora_a2.engines.secagg`): the
        server gets only the weighted mean of the clients' dense vectors."""
        cfg, strategy = exp.cfg, exp.strategy
        scale = weight_scale(exp)  # n_k / S from the public partition, as each client sends
        t_secure = time.perf_counter()
        result = run_secure_round(self.grid, cfg, plan.rnd, plan.blobs, self.node_of,
                                  self.config_toml, message_bytes,
                                  {c: len(exp.client_train[c]) / scale for c in plan.blobs})
        survivors = set(result.survivors)
        for c in plan.blobs:
            row = plan.per_client[c]
            row.update(upload_bytes=0, upload_params=0)  # per-client uploads are not visible
            if c in survivors:  # in the sum, with its public partition size as its weight
                row["num_examples"] = len(exp.client_train[c])
            else:
                row.update(dropped=True, failure="not in the secure sum")
                plan.dropped.append(c)
                plan.failures.append(f"client {c}: not in the secure sum (failed or timed out)")
            if on_client is not None:
                on_client(c)
        plan.dropped.sort()

        def aggregate(state: ServerState, _ok) -> tuple[ServerState, dict[str, Any]]:
            state, info = strategy.aggregate_secure(plan.rnd, state, result.mean)
            return strategy.finalize(plan.rnd, state, info)

        self._timing = {"discover_s": round(self._discover_s, 4),
                        "secagg_s": round(time.perf_counter() - t_secure, 4)}
        return close_round(exp, plan, state, [], [], {
            **self.round_extras(),
            # what crossed the wire for the round's training, every SecAgg+ stage included
            "upload_bytes": result.up_bytes,
            "download_bytes": result.down_bytes,
            "upload_params": len(survivors) * (0 if result.mean is None
                                               else int(result.mean.numel()) + 1),
            "secagg": {"survivors": sorted(survivors), "stages": result.stages,
                       "weight_sum": result.weight_sum, **result.settled,
                       # why a completed protocol gave no usable mean (not a client's failure)
                       **({"reason": result.reason} if result.reason is not None else {})},
            "flower_download_bytes": result.down_bytes,
            "flower_upload_bytes": result.up_bytes,
        }, aggregate=aggregate, num_replies=len(survivors), usable=result.mean is not None)

    def exchange_eval(self, exp, rnd: int, tasks: dict[int, bytes]) -> dict[int, Reply]:
        """A personalised strategy's evaluate phase: an EVALUATE message to every client's
        node; a node that fails or does not answer in time gives a ``failure``, an answer that
        cannot be unpacked is ``unreadable`` (both reach the round's ``eval_failures``)."""
        from flwr.app import Message, MessageType

        messages = {c: Message(pack(down, self.config_toml), dst_node_id=self.node_of[c],
                               message_type=MessageType.EVALUATE, group_id=f"{rnd}-eval")
                    for c, down in tasks.items()}
        got = list(self.grid.send_and_receive(list(messages.values()),
                                              timeout=self._timeout())) if messages else []
        self._eval = {"flower_eval_download_bytes": sum(message_bytes(m)
                                                        for m in messages.values()),
                      "flower_eval_upload_bytes": sum(message_bytes(r) for r in got)}
        return self._replies(tasks, got)

    def eval_extras(self) -> dict[str, Any]:
        return self._eval


def round_timing(send_receive_s: float, replies) -> dict[str, float]:
    """Where a round's time went on Flower, from the replies' client timings: the wall time of
    ``send_and_receive``; per worker process (pid) the seconds spent building the experiment,
    training and en/decoding; ``busiest_worker_s`` (the critical path if the workers never
    waited), and ``overhead_s`` = the rest (Flower/Ray message passing, scheduling, idle
    workers waiting for the last client)."""
    busy: dict[float, float] = {}
    build = train = codec = 0.0
    for r in replies:
        if r.has_error():
            continue
        t = timing_of(r.content)
        if not t:
            continue
        build, train, codec = build + t["build_s"], train + t["train_s"], codec + t["codec_s"]
        busy[t["pid"]] = busy.get(t["pid"], 0.0) + t["build_s"] + t["train_s"] + t["codec_s"]
    busiest = max(busy.values(), default=0.0)
    return {"send_receive_s": round(send_receive_s, 4), "client_build_s": round(build, 4),
            "client_train_s": round(train, 4), "client_codec_s": round(codec, 4),
            "workers": len(busy), "busiest_worker_s": round(busiest, 4),
            "overhead_s": round(send_receive_s - busiest, 4)}


def error_text(reason: str | None, limit: int = 300) -> str:
    """The useful tail of a Flower error reason (Ray wraps the exception in a long banner)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", reason or "")
    if "Message: " in text:
        text = text.rsplit("Message: ", 1)[1]
    text = " ".join(text.split())
    return text if len(text) <= limit else "…" + text[-limit:]

