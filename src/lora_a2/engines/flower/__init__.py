"""The Flower engine: the same experiment on Flower's Simulation Engine or Deployment Engine.

Flower moves the messages; everything else is ours and identical to the local engine:

- **ServerApp** (:func:`deployment_main`; :func:`run_simulation` builds one in-process) runs
  :func:`lora_a2.runner.run_experiment` with :class:`FlowerRounds` as its round function: the
  same sampling, checkpoints, metrics, summary and export as ``engine.name = "local"``.
- **Per-node payloads** (Flower's own strategies send one shared payload and insist on identical
  reply keys, so we do not use them): for every sampled client, ``strategy.configure`` builds its
  :class:`~lora_a2.messages.Task`, which is encoded to our safetensors bytes
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

The package, one concept per module: :mod:`~lora_a2.engines.flower.records` (our payload and
config in Flower records, and the bytes Flower serialises),
:mod:`~lora_a2.engines.flower.clientapp` (the ClientApp and its per-process experiment cache),
:mod:`~lora_a2.engines.flower.transport` (:class:`FlowerRounds`, the server side of a round) and
:mod:`~lora_a2.engines.flower.serverapp` (the ServerApp on the Simulation and Deployment
Engines, and the summary's Flower totals). SecAgg+ is :mod:`lora_a2.engines.secagg`.
"""

from __future__ import annotations

from .clientapp import (FAULT_ENV, client_evaluate, client_query, client_train,
                        client_train_secure, config_from_toml, make_client_app, partition_of,
                        read_store, store_key, write_store)
from .records import (CONFIG_RECORD, PAYLOAD_KEY, RECORD, STORE_RECORD, STYPE, TIMING_RECORD,
                      message_bytes, pack, timing_of, unpack)
from .serverapp import (add_simulation_times, backend_config, deployment_main, flower_summary,
                        num_workers, run_simulation, run_simulations)
from .transport import FlowerRounds, error_text, round_timing

__all__ = [
    "CONFIG_RECORD", "FAULT_ENV", "PAYLOAD_KEY", "RECORD", "STORE_RECORD", "STYPE",
    "TIMING_RECORD", "FlowerRounds", "add_simulation_times", "backend_config", "client_evaluate",
    "client_query", "client_train", "client_train_secure", "config_from_toml",
    "deployment_main", "error_text", "flower_summary", "make_client_app", "message_bytes",
    "num_workers", "pack",
    "partition_of", "read_store", "round_timing", "run_simulation", "run_simulations",
    "store_key", "timing_of", "unpack",
    "write_store",
]
