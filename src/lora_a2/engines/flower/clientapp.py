"""The ClientApp: a node's side of a round (train, SecAgg+ train, evaluate, query), with the
experiment built once per worker process and cached here (see :mod:`lora_a2.engines.flower`)."""

from __future__ import annotations

import hashlib
import os
import time
import tomllib
from typing import Any

from ...config import Config, config_from_dict
from ...errors import UserError
from ...experiment import prepare
from ...payload import decode, encode
from ...rounds import eval_reply
from ...messages import Task
from ...secure_sum import client_vector
from ...validation import UploadLimits, check_update
from ..secagg import fit_reply, secagg_dispatch_mod, task_bytes_of, weight_scale
from .records import CONFIG_RECORD, STORE_RECORD, pack, unpack

FAULT_ENV = "LORA_A2_FLOWER_FAULT"  # fault injection for tests: see _fault

_CACHE: dict[str, Any] = {}  # config hash → experiment: this worker process's one cache


def _experiment(config_toml: str, timing: dict[str, float] | None = None):
    """The experiment for this config, built once per worker process (the build's seconds go
    to ``timing["build_s"]``: 0 when it was cached)."""
    key = hashlib.sha256(config_toml.encode()).hexdigest()
    t = time.perf_counter()
    if key not in _CACHE:
        _CACHE.clear()  # one run per worker at a time: free the previous model
        _CACHE[key] = prepare(config_from_toml(config_toml))
    if timing is not None:
        timing["build_s"] = time.perf_counter() - t
    return _CACHE[key]


def config_from_toml(text: str) -> Config:
    """The validated config the server sent (same rules as a config file)."""
    return config_from_dict(tomllib.loads(text))


def partition_of(context) -> int:
    try:
        return int(context.node_config["partition-id"])
    except (KeyError, TypeError, ValueError):
        raise UserError("this SuperNode has no integer 'partition-id' in its node config; start "
                        "it with --node-config 'partition-id=K'") from None


def _fault(rnd: int, client: int, evaluate: bool = False) -> None:
    """Test hook (``LORA_A2_FLOWER_FAULT="ROUND:CLIENT[:KIND],…"``): raise in that client's
    training (no KIND), sleep (``hang[:SECONDS]``), or raise in its evaluate phase (``eval``)."""
    for entry in filter(None, os.environ.get(FAULT_ENV, "").split(",")):
        parts = entry.strip().split(":")
        if int(parts[0]) != rnd or int(parts[1]) != client:
            continue
        kind = parts[2] if len(parts) > 2 else "raise"
        if (kind == "eval") != evaluate:
            continue
        if kind == "hang":
            time.sleep(float(parts[3]) if len(parts) > 3 else 3600)
        else:
            raise RuntimeError(f"injected fault: client {client} in round {rnd}"
                               + (" (evaluate)" if evaluate else ""))


def client_train(msg, context):
    """ClientApp ``train``: decode the task, train, return the encoded upload (under SecAgg+:
    the secured vector, for ``secaggplus_mod`` to mask)."""
    from flwr.app import Message

    if task_bytes_of(msg.content) is not None:
        return client_train_secure(msg, context)
    t0 = time.perf_counter()
    timing: dict[str, float] = {}
    config_toml = str(msg.content.config_records[CONFIG_RECORD]["config"])
    exp, task, ctx = _client_task(context, config_toml, unpack(msg.content), timing)
    # ``Strategy.upload`` = client_update + the DP transform of what is sent (as on local)
    upload = exp.strategy.upload  # + the DP wrapper's clip and noise
    t1 = time.perf_counter()
    update = upload(ctx, task)
    t2 = time.perf_counter()
    up = encode(update.to_payload())
    write_store(context, config_toml, ctx.store)
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
    return exp, task, exp.client_context(pid, read_store(context, config_toml))


def client_train_secure(msg, context):
    """SecAgg+ stage 2 on the client: train as usual, check the upload here (the server will
    never see it to check), and return its dense vector for masking."""
    from flwr.app import Message

    config_toml = str(msg.content.config_records["fitins.config"]["config"])
    exp, task, ctx = _client_task(context, config_toml, task_bytes_of(msg.content))
    update = exp.strategy.upload(ctx, task)
    # the server's own checks, here (a malformed or non-finite upload fails loudly on the
    # node); the example count is the public one the server weighs the sum's entry by
    check_update(exp.strategy, task, update, UploadLimits(), examples=ctx.num_examples)
    vector = client_vector(exp.strategy, task, update, exp.cfg.secagg.clipping_range,
                           weight_scale(exp))
    write_store(context, config_toml, ctx.store)
    return Message(fit_reply(vector), reply_to=msg)


def store_key(config_toml: str) -> str:
    """The ``Context.state`` record of one experiment's client tensors: a node that serves
    several experiments in one Flower run (:func:`~lora_a2.engines.flower.run_simulations`)
    keeps each one's apart."""
    return f"{STORE_RECORD}.{hashlib.sha256(config_toml.encode()).hexdigest()[:16]}"


def read_store(context, config_toml: str) -> dict[str, Any]:
    """What this node's client kept from its earlier rounds of this experiment
    (``Context.state``, which Flower keeps on the node between messages of a run)."""
    record = context.state.array_records.get(store_key(config_toml))
    return dict(record.to_torch_state_dict()) if record is not None else {}


def write_store(context, config_toml: str, store: dict[str, Any]) -> None:
    from flwr.app import ArrayRecord

    if store:
        context.state[store_key(config_toml)] = ArrayRecord(torch_state_dict={
            k: v.detach().cpu().contiguous() for k, v in store.items()})


def client_evaluate(msg, context):
    """ClientApp ``evaluate`` (personalised strategies): load the shared part, this node's own
    tensors, and answer with the metrics of that model."""
    from flwr.app import Message

    config_toml = str(msg.content.config_records[CONFIG_RECORD]["config"])
    exp = _experiment(config_toml)
    task = Task.from_payload(decode(unpack(msg.content)), exp.runtime.layout)
    pid = partition_of(context)
    if task.client_id != pid:
        raise RuntimeError(f"evaluation for client {task.client_id} sent to the node holding "
                           f"partition {pid}")
    _fault(task.round, task.client_id, evaluate=True)
    metrics = exp.strategy.client_evaluate(exp.client_context(pid, read_store(context,
                                                                              config_toml)),
                                           task)
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

    app = ClientApp(mods=[secagg_dispatch_mod])  # SecAgg+ messages through Flower's mod
    app.train()(client_train)
    app.evaluate()(client_evaluate)
    app.query()(client_query)
    return app
