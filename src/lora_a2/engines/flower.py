"""The Flower engine: the same experiment on Flower's Simulation Engine or Deployment Engine.

Flower moves the messages; everything else is ours and identical to the local engine:

- **ServerApp** (:func:`deployment_main`; :func:`run_simulation` builds one in-process) runs
  :func:`lora_a2.runner.run_experiment` with :class:`FlowerRounds` as its round function: the
  same sampling, checkpoints, metrics, summary and export as ``engine.name = "local"``.
- **Per-node payloads** (Flower's own strategies send one shared payload and insist on identical
  reply keys, so we do not use them): for every sampled client, ``strategy.configure`` builds its
  :class:`~lora_a2.strategies.base.Task`, which is encoded to our safetensors bytes
  (:mod:`lora_a2.payload`) and carried in the message as one ``ArrayRecord`` entry ``payload``
  (an ``Array`` of ``dtype="uint8"``, ``stype="safetensors"`` whose ``data`` *is* those bytes;
  Flower chunks large arrays itself) plus a ``ConfigRecord`` with the run's config TOML (the
  ClientApp needs it to build the model and its data partition; a few KB, counted as Flower
  overhead, not as payload). The reply carries the upload bytes the same way.
- **Server side of a reply**: OUR :func:`~lora_a2.validation.receive_upload`, then OUR
  ``strategy.aggregate_round`` (``aggregate`` + central DP; no aggregation math here).
  ``upload_bytes``/``download_bytes`` are the lengths of our encoded payloads, exactly as on the
  local engine; ``flower_*_bytes`` are what Flower serialised for the same messages
  (see :func:`message_bytes`).
- **ClientApp** (:func:`make_client_app`): decodes the task, runs ``strategy.upload``
  (``client_update`` plus any DP transform, as the local engine) on the node's partition,
  encodes the upload. The experiment (base model, data, partition) is built once per worker
  process and cached at module level, keyed by the config. (Simulation: a worker is a Ray actor
  and serves many rounds. Deployment: Flower 1.42's SuperNode starts a fresh ``flwr-clientapp``
  process per message, so the cache lives for one message there.)
- **Node ↔ client**: a client id is a data partition. Each node reports its ``partition-id``
  from its node config (simulation: set by Flower to 0…N-1; deployment: the SuperNode's
  ``--node-config 'partition-id=K'``) in reply to a ``query`` message sent once per new node.
- **Failures**: a node whose ClientApp raises, or that does not answer within
  ``engine.round_timeout_s``, is listed in ``dropped`` with its reason in ``failures``; the
  round aggregates what came back when at least ``train.min_replies`` valid uploads arrived
  (else it is recorded ``failed`` and the global state stays unchanged, as on the local engine).

Fault injection for tests: ``LORA_A2_FLOWER_FAULT="ROUND:CLIENT[:hang]"`` (comma-separated
entries) makes that client's ClientApp raise (or sleep) in that round.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


from ..checks import check_config, load_config
from ..config import Config, clients_known, clients_per_round, config_from_dict
from ..errors import UserError
from ..payload import InvalidPayload, decode, encode
from ..rounds import Reply, RoundPlan, Transport, eval_reply, round_record, run_round
from ..runner import run_experiment
from ..messages import ServerState, Task

log = logging.getLogger(__name__)

RECORD = "lora_a2"  # ArrayRecord holding the payload bytes
CONFIG_RECORD = "lora_a2_config"  # ConfigRecord holding the run config (TOML) / node info
STORE_RECORD = "lora_a2_client_store"  # node-side Context.state: a client's own tensors
TIMING_RECORD = "lora_a2_timing"  # a reply's client-side timings (Flower overhead, not payload)
PAYLOAD_KEY = "payload"
STYPE = "safetensors"
FAULT_ENV = "LORA_A2_FLOWER_FAULT"


# ---------------------------------------------------------------------- wire helpers
def pack(blob: bytes, config_toml: str | None = None, timing: dict[str, float] | None = None):
    """Our payload bytes (and optionally the run config, or a reply's client timings) as Flower
    records."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    rd = RecordDict({RECORD: ArrayRecord({PAYLOAD_KEY: Array(
        dtype="uint8", shape=(len(blob),), stype=STYPE, data=bytes(blob))})})
    if config_toml is not None:
        rd[CONFIG_RECORD] = ConfigRecord({"config": config_toml})
    if timing is not None:
        rd[TIMING_RECORD] = ConfigRecord(timing)
    return rd


def timing_of(content) -> dict[str, float]:
    """The client-side timings a reply carries: ``pid``, ``build_s``, ``train_s``, ``codec_s``
    as finite numbers, else empty (a reply without them, or with garbage, is simply not timed:
    timings are diagnostics and never fail a round)."""
    try:
        t = {k: float(content.config_records[TIMING_RECORD][k])
             for k in ("pid", "build_s", "train_s", "codec_s")}
    except (KeyError, AttributeError, TypeError, ValueError):
        return {}
    return t if all(math.isfinite(v) for v in t.values()) else {}


def unpack(content) -> bytes:
    """The payload bytes of a message; :class:`InvalidPayload` if they are not there."""
    try:
        arr = content.array_records[RECORD][PAYLOAD_KEY]
    except (KeyError, AttributeError, TypeError):
        raise InvalidPayload(f"message holds no '{RECORD}.{PAYLOAD_KEY}' array") from None
    if arr.stype != STYPE:
        raise InvalidPayload(f"payload array has stype {arr.stype!r}, expected {STYPE!r}")
    return bytes(arr.data)


def message_bytes(msg) -> int:
    """Bytes Flower serialises for ``msg``: the sum of the deflated bodies (with headers) of
    every object in the message's object tree (message, record dict, records, arrays, array
    chunks) — what the SuperLink stores and pushes/pulls object by object. gRPC/HTTP framing
    and the message-id bookkeeping calls are not included."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(o.deflate()) for o in get_all_nested_objects(msg).values())


# ---------------------------------------------------------------------- client side
_CACHE: dict[str, Any] = {}


def _experiment(config_toml: str, timing: dict[str, float] | None = None):
    """The experiment for this config, built once per worker process (the build's seconds go
    to ``timing["build_s"]``: 0 when it was cached)."""
    key = hashlib.sha256(config_toml.encode()).hexdigest()
    t = time.perf_counter()
    if key not in _CACHE:
        from ..experiment import prepare

        _CACHE.clear()  # one run per worker at a time: free the previous model
        _CACHE[key] = prepare(config_from_toml(config_toml))
    if timing is not None:
        timing["build_s"] = time.perf_counter() - t
    return _CACHE[key]


def config_from_toml(text: str) -> Config:
    """The validated config the server sent (same rules as a config file)."""
    import tomllib

    return config_from_dict(tomllib.loads(text))


def partition_of(context) -> int:
    try:
        return int(context.node_config["partition-id"])
    except (KeyError, TypeError, ValueError):
        raise UserError("this SuperNode has no integer 'partition-id' in its node config; start "
                        "it with --node-config 'partition-id=K'") from None


def _fault(rnd: int, client: int) -> None:
    for entry in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        parts = entry.strip().split(":")
        if int(parts[0]) == rnd and int(parts[1]) == client:
            if len(parts) > 2 and parts[2] == "hang":
                time.sleep(float(parts[3]) if len(parts) > 3 else 3600)
            else:
                raise RuntimeError(f"injected fault: client {client} in round {rnd}")


def client_train(msg, context):
    """ClientApp ``train``: decode the task, train, return the encoded upload (under SecAgg+:
    the secured vector, for ``secaggplus_mod`` to mask)."""
    from flwr.app import Message

    from .secagg import task_bytes_of

    if task_bytes_of(msg.content) is not None:
        return client_train_secure(msg, context)
    t0 = time.perf_counter()
    timing: dict[str, float] = {}
    exp, task, ctx = _client_task(context, str(msg.content.config_records[CONFIG_RECORD]["config"]),
                                  unpack(msg.content), timing)
    # ``Strategy.upload`` = client_update + the DP transform of what is sent (as on local)
    upload = exp.strategy.upload  # + the DP wrapper's clip and noise
    t1 = time.perf_counter()
    update = upload(ctx, task)
    t2 = time.perf_counter()
    up = encode(update.to_payload())
    write_store(context, ctx.store)
    timing.update(train_s=t2 - t1, pid=float(os.getpid()))
    timing["codec_s"] = time.perf_counter() - t0 - timing["train_s"] - timing["build_s"]
    return Message(pack(up, timing=timing), reply_to=msg)


def _client_task(context, config_toml: str, blob: bytes, timing: dict[str, float] | None = None):
    """(experiment, decoded task, this node's client context) for a train message."""
    exp = _experiment(config_toml, timing)
    task = Task.from_payload(decode(blob), exp.runtime.layout)
    pid = partition_of(context)
    if task.client_id != pid:
        raise RuntimeError(f"task for client {task.client_id} sent to the node holding "
                           f"partition {pid}")
    _fault(task.round, task.client_id)
    return exp, task, exp.client_context(pid, read_store(context))


def client_train_secure(msg, context):
    """SecAgg+ stage 2 on the client: train as usual, check the upload here (the server will
    never see it to check), and return its dense vector for masking."""
    from flwr.app import Message

    from .secagg import client_vector, fit_reply, task_bytes_of, weight_scale

    exp, task, ctx = _client_task(
        context, str(msg.content.config_records["fitins.config"]["config"]),
        task_bytes_of(msg.content))
    update = exp.strategy.upload(ctx, task)
    exp.strategy.validate(task, update)  # a malformed upload fails here, loudly
    vector = client_vector(exp.strategy, task, update, exp.cfg.secagg.clipping_range,
                           weight_scale(exp))
    write_store(context, ctx.store)
    return Message(fit_reply(vector), reply_to=msg)


def read_store(context) -> dict[str, Any]:
    """What this node's client kept from its earlier rounds (``Context.state``, which Flower
    keeps on the node between messages of a run)."""
    record = context.state.array_records.get(STORE_RECORD)
    return dict(record.to_torch_state_dict()) if record is not None else {}


def write_store(context, store: dict[str, Any]) -> None:
    from flwr.app import ArrayRecord

    if store:
        context.state[STORE_RECORD] = ArrayRecord(torch_state_dict={
            k: v.detach().cpu().contiguous() for k, v in store.items()})


def client_evaluate(msg, context):
    """ClientApp ``evaluate`` (personalised strategies): load the shared part, this node's own
    tensors, and answer with the metrics of that model."""
    from flwr.app import Message

    exp = _experiment(str(msg.content.config_records[CONFIG_RECORD]["config"]))
    task = Task.from_payload(decode(unpack(msg.content)), exp.runtime.layout)
    pid = partition_of(context)
    if task.client_id != pid:
        raise RuntimeError(f"evaluation for client {task.client_id} sent to the node holding "
                           f"partition {pid}")
    metrics = exp.strategy.client_evaluate(exp.client_context(pid, read_store(context)), task)
    return Message(pack(encode(eval_reply(pid, metrics))), reply_to=msg)


def client_query(msg, context):
    """ClientApp ``query``: report which partition (client id) this node holds."""
    from flwr.app import ConfigRecord, Message, RecordDict

    info: dict[str, Any] = {"partition-id": partition_of(context)}
    if "num-partitions" in context.node_config:
        info["num-partitions"] = int(context.node_config["num-partitions"])
    return Message(RecordDict({CONFIG_RECORD: ConfigRecord(info)}), reply_to=msg)


def make_client_app():
    from flwr.clientapp import ClientApp

    from .secagg import secagg_dispatch_mod

    app = ClientApp(mods=[secagg_dispatch_mod])  # SecAgg+ messages through Flower's mod
    app.train()(client_train)
    app.evaluate()(client_evaluate)
    app.query()(client_query)
    return app


# ---------------------------------------------------------------------- server side
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
            new = [n for n in self.grid.get_node_ids() if n not in self.known]
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
                    info = r.content.config_records[CONFIG_RECORD]
                    pid = int(info["partition-id"])
                    n_parts = info.get("num-partitions")
                    self.known.add(node)
                    if not 0 <= pid < num_clients:
                        warnings.append(f"node {node}: partition-id {pid} outside "
                                        f"[0, {num_clients}) — ignored")
                    elif n_parts is not None and int(n_parts) != num_clients:
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
        by_node = {r.metadata.src_node_id: r for r in got}
        replies: dict[int, Reply] = {}
        for c in tasks:
            reply = by_node.get(self.node_of[c])
            if reply is None:
                replies[c] = Reply(failure=f"no reply within {self._timeout()} s")
            elif reply.has_error():
                self._up += message_bytes(reply)
                replies[c] = Reply(failure=f"ClientApp error {reply.error.code}: "
                                           f"{error_text(reply.error.reason)}")
            else:
                self._up += message_bytes(reply)
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
        from .secagg import run_secure_round

        cfg, strategy = exp.cfg, exp.strategy
        result = run_secure_round(self.grid, cfg, plan.rnd, plan.blobs, self.node_of,
                                  self.config_toml, message_bytes)
        survivors = set(result.survivors)
        for c in plan.blobs:
            row = plan.per_client[c]
            row.update(upload_bytes=0, upload_params=0)  # per-client uploads are not visible
            if c not in survivors:
                row.update(dropped=True, failure="not in the secure sum")
                plan.dropped.append(c)
                plan.failures.append(f"client {c}: not in the secure sum (failed or timed out)")
            if on_client is not None:
                on_client(c)
        plan.dropped.sort()
        failed = result.mean is None or len(survivors) < max(1, cfg.train.min_replies)
        info: dict[str, Any] = {}
        if not failed:
            state, info = strategy.aggregate_secure(plan.rnd, state, result.mean)
            state, info = strategy.finalize(plan.rnd, state, info)
        rows = [plan.per_client[c] for c in plan.clients]
        record = round_record(strategy, plan.rnd, plan.clients, rows,
                              num_replies=len(survivors), failed=failed, dropped=plan.dropped,
                              reasons=[], info=info)
        record.update({
            # what crossed the wire for the round's training, every SecAgg+ stage included
            "upload_bytes": result.up_bytes,
            "download_bytes": result.down_bytes,
            "upload_params": len(survivors) * (0 if result.mean is None
                                               else int(result.mean.numel()) + 1),
            "secagg": {"survivors": sorted(survivors), "stages": result.stages,
                       "weight_sum": result.weight_sum},
            "failures": plan.failures,
            "node_warnings": self._node_warnings,
            "flower_download_bytes": result.down_bytes,
            "flower_upload_bytes": result.up_bytes,
            "flower_query_bytes": self.query_bytes - self._query_before,
            "per_client": rows,
            "train_wall_s": time.perf_counter() - plan.t0,
        })
        return state, record

    def exchange_eval(self, exp, rnd: int, tasks: dict[int, bytes]) -> dict[int, bytes | None]:
        """A personalised strategy's evaluate phase: an EVALUATE message to every client's
        node; a node that fails answers None."""
        from flwr.app import Message, MessageType

        messages = {c: Message(pack(down, self.config_toml), dst_node_id=self.node_of[c],
                               message_type=MessageType.EVALUATE, group_id=f"{rnd}-eval")
                    for c, down in tasks.items()}
        got = list(self.grid.send_and_receive(list(messages.values()),
                                              timeout=self._timeout())) if messages else []
        by_node = {r.metadata.src_node_id: r for r in got}
        out: dict[int, bytes | None] = {}
        for c in tasks:
            reply = by_node.get(self.node_of[c])
            if reply is None or reply.has_error():
                out[c] = None
                continue
            try:
                out[c] = unpack(reply.content)
            except InvalidPayload:
                out[c] = None
        return out


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


def add_flower_totals(out: Path, summary: dict[str, Any], engine: str,
                      extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Totals of the Flower-measured bytes (and ``extra``), added to ``summary.json``."""
    from ..report import atomic_write_text, read_metrics

    records = read_metrics(out / "metrics.jsonl")
    summary = {**summary, "engine": engine,
               "total_flower_download_bytes": sum(r.get("flower_download_bytes", 0)
                                                  for r in records),
               "total_flower_upload_bytes": sum(r.get("flower_upload_bytes", 0) for r in records),
               "total_flower_query_bytes": sum(r.get("flower_query_bytes", 0) for r in records),
               "failed_client_rounds": sum(len(r.get("failures", [])) for r in records),
               **(extra or {})}
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
    try:
        from flwr.serverapp import ServerApp
        from flwr.simulation import run_simulation as flwr_run_simulation
    except ImportError:
        raise UserError("engine.name = 'flower' needs Flower: pip install 'lora-a2[flower]'") \
            from None

    result: dict[str, Any] = {}
    server = ServerApp()
    # A natural partition with data.num_clients = 0 has as many clients (nodes) as the data
    # hold: build the experiment here, before Flower starts one SuperNode per client.
    exp = None
    if not clients_known(cfg):
        from ..experiment import prepare

        exp = prepare(check_config(cfg))
    run_cfg = cfg if exp is None else exp.cfg
    t_call = time.perf_counter()

    @server.main()
    def _main(grid, context) -> None:
        result["startup_s"] = time.perf_counter() - t_call  # Ray, the SuperNodes, the ServerApp
        try:
            result["summary"] = run_experiment(cfg, out, overwrite=overwrite, progress=progress,
                                               resume=resume, round_fn=FlowerRounds(grid, cfg),
                                               console=console, exp=exp)
        except BaseException as e:  # re-raised in the caller's thread below
            result["error"] = e

    _quiet_flower()
    flwr_run_simulation(server_app=server, client_app=make_client_app(),
                        num_supernodes=run_cfg.data.num_clients,
                        backend_config=backend_config(run_cfg))
    total_s = time.perf_counter() - t_call
    if "error" in result:
        raise result["error"]
    if "summary" not in result:
        raise RuntimeError("the Flower simulation ended without finishing the run "
                           "(see the log above)")
    summary = result["summary"]
    return add_flower_totals(Path(out), summary, "flower-simulation", {
        "flower_startup_s": result["startup_s"],
        "flower_shutdown_s": total_s - result["startup_s"] - summary["wall_s"],
        "flower_total_s": total_s})


def _quiet_flower() -> None:
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    logging.getLogger("flwr").setLevel(logging.WARNING)


# ---------------------------------------------------------------------- deployment
def deployment_main(grid, context) -> None:
    """ServerApp ``main`` for the Deployment Engine (``flwr run`` of ``flower_app/``).

    Run config keys (``--run-config``): ``config`` (path to a lora-a2 TOML config on the
    SuperLink machine; "" = defaults), ``set`` (``;``-separated ``KEY=VALUE`` overrides),
    ``out`` (output directory on the SuperLink machine), ``overwrite`` (bool).
    """

    rc = context.run_config
    overrides = [s.strip() for s in str(rc.get("set", "")).split(";") if s.strip()]
    # this is the Flower engine whatever the config says (validated as such: secagg needs it)
    cfg = load_config(str(rc.get("config", "")) or None, overrides + ["engine.name=flower"])
    out = Path(str(rc.get("out", "runs/flower-deployment")))
    summary = run_experiment(cfg, out, overwrite=bool(rc.get("overwrite", False)),
                             progress=False, round_fn=FlowerRounds(grid, cfg))
    add_flower_totals(out, summary, "flower-deployment")
