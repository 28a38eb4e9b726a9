"""Secure aggregation on the Flower engine with Flower's own SecAgg+ (no cryptography here).

What the server learns is the *sum* of the clients' vectors, never one of them (honest-but-
curious server; see docs/PRIVACY.md). How it is wired:

- **Server**: Flower's :class:`~flwr.server.workflow.SecAggPlusWorkflow` runs its four stages
  (setup, share keys, collect masked vectors, unmask) over our ``grid``. It asks a strategy
  object for each node's ``FitIns``: :class:`_Tasks` hands it our per-client task bytes (the
  same encoded :class:`~lora_a2.strategies.base.Task` the plain engine sends), so every node
  still gets its own payload; the workflow's ``aggregate_fit`` call gives :class:`_Tasks` the
  unmasked result. With every client's SecAgg+ weight set to ``max_weight`` (= 1) that result
  is Σ_k x_k / n; times n (the clients that reached the masking stage) it is Σ_k x_k.
- **Client vector** x_k = [(n_k / S) · v_k, n_k / S]: v_k is the strategy's dense form of the
  upload (:meth:`~lora_a2.strategies.base.Strategy.secure_vector`; LoRA-A2 scatters its slots
  into the dense active factor), n_k the client's example count, S a public scale (the largest
  client's training-set size, sent in the task). The last entry sums to Σ_k n_k / S, so the
  server gets the data-weighted mean Σ_k n_k v_k / Σ_k n_k — exactly what the plain
  aggregate uses — including when clients drop out. The count no longer travels in the clear.
  (That arithmetic, free of Flower, is :mod:`lora_a2.secure_sum`.)
- **Quantisation**: SecAgg+ clips every entry to ±``secagg.clipping_range`` (silently) and
  quantises it to ``secagg.quantization_range`` levels with stochastic rounding; the client
  clips first and logs how many entries it had to. The error per summed entry is at most
  n · 2c/Q.
- **Dropouts**: Flower's workflow rebuilds the masks of a client that drops after the key
  exchange (from the shares of ``reconstruction_threshold`` neighbours). A client lost *during*
  the key exchange makes Flower 1.42's unmask stage fail for its neighbours (they hold no share
  of it); :class:`_PrunedSecAggPlus` removes such a node from the round's bookkeeping right
  after the share-keys stage, so the round carries on without it. Only the bookkeeping is
  changed, not the protocol's cryptography.
- **Bytes**: every stage's messages are measured with :func:`~lora_a2.engines.flower.message_bytes`
  on the way out and in (:class:`_MeteredGrid`); the masked vectors travel as int64.
- **Mask generator**: SecAgg+ expands pairwise masks with NumPy's ``RandomState`` seeded from
  32 bits of the shared key (``flwr/common/secure_aggregation/secaggplus_utils.py``): not a
  cryptographically secure PRG. Stated in docs/PRIVACY.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..secure_sum import secure_mean

log = logging.getLogger(__name__)

SECAGG_CONFIGS = "secaggplus_configs"  # the ConfigRecord every SecAgg+ message carries
FITINS_PARAMS = "fitins.parameters"


@dataclass
class SecureResult:
    """One round of secure aggregation: the weighted mean (None: the protocol halted)."""

    mean: torch.Tensor | None
    survivors: list[int]  # client ids whose vectors are in the sum
    down_bytes: int = 0
    up_bytes: int = 0
    stages: dict[str, list[int]] = field(default_factory=dict)  # stage → [down, up] bytes
    weight_sum: float = 0.0  # the unmasked sum's weight entry, as the clients sent it
    reason: str | None = None  # why a completed protocol gave no mean
    #: the round's shares per client and reconstruction threshold, as Flower's setup stage
    #: derived them from ``secagg.num_shares`` / ``reconstruction_threshold`` (fractions),
    #: and ``fewest_pairwise_masks`` once the server unmasked (see ``unmask_stage``)
    settled: dict[str, int] = field(default_factory=dict)


def weight_scale(exp) -> float:
    """S: the largest client's training-set size (public: the server builds the partition)."""
    return float(max(len(idx) for idx in exp.client_train))


# ---------------------------------------------------------------------- client side
def fit_reply(vector: np.ndarray):
    """The FitRes-shaped RecordDict ``secaggplus_mod`` expects from the wrapped train function
    (its SecAgg+ weight = 1 = ``max_weight``: the workflow then returns the plain mean)."""
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

    return RecordDict({"fitres.parameters": ArrayRecord(numpy_ndarrays=[vector]),
                       "fitres.num_examples": MetricRecord({"num_examples": 1}),
                       "fitres.metrics": ConfigRecord({}),
                       "fitres.status": ConfigRecord({"code": 0, "message": ""})})


def secagg_dispatch_mod(msg, context, call_next):
    """ClientApp mod: SecAgg+ messages go through Flower's ``secaggplus_mod``; everything else
    (plain training, evaluation, queries) straight to the handler."""
    from flwr.client.mod import secaggplus_mod

    if msg.metadata.message_type == "train" and SECAGG_CONFIGS in msg.content.config_records:
        return secaggplus_mod(msg, context, call_next)
    return call_next(msg, context)


def task_bytes_of(content) -> bytes | None:
    """Our task bytes inside a SecAgg+ stage-2 message (None: not a SecAgg+ train message)."""
    if FITINS_PARAMS not in content.array_records:
        return None
    record = content.array_records[FITINS_PARAMS]
    return bytes(next(iter(record.values())).data)


# ---------------------------------------------------------------------- server side
def _workflow_class():
    from flwr.server.workflow import SecAggPlusWorkflow

    class _PrunedSecAggPlus(SecAggPlusWorkflow):
        """Flower's workflow, plus: a node lost during the key exchange leaves the round, and
        ``settled`` keeps the shares and threshold the setup stage derived (empty until then)
        and, once the server unmasks, the fewest pairwise masks hiding any survivor."""

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.settled: dict[str, int] = {}

        def share_keys_stage(self, grid, context, state) -> bool:  # noqa: D401
            # what the setup stage settled on for this round, for the round's record
            self.settled = {"shares": int(state.num_shares), "threshold": int(state.threshold)}
            ok = super().share_keys_stage(grid, context, state)
            gone = set(state.sampled_node_ids) - set(state.active_node_ids)
            if gone:
                log.warning("secagg: %d node(s) lost during the key exchange leave the round",
                            len(gone))
                state.sampled_node_ids = set(state.active_node_ids)
                for nid in gone:
                    state.nid_to_neighbours.pop(nid, None)
                for neighbours in state.nid_to_neighbours.values():
                    neighbours -= gone
                return self._check_threshold(state)
            return ok

        def unmask_stage(self, grid, context, state) -> bool:  # noqa: D401
            # At unmasking the server learns each survivor's own-mask seed, so what still hides
            # a survivor's vector is its pairwise masks with the other survivors among its
            # neighbours (32 bits of seed each): the fewest any survivor has, for the record.
            live = set(state.active_node_ids)
            self.settled["fewest_pairwise_masks"] = min(
                (len((state.nid_to_neighbours[n] & live) - {n}) for n in live), default=0)
            return super().unmask_stage(grid, context, state)

    return _PrunedSecAggPlus


class _MeteredGrid:
    """The grid, measuring what each SecAgg+ stage sends and receives."""

    def __init__(self, grid, measure) -> None:
        self._grid, self._measure = grid, measure
        self.stages: dict[str, list[int]] = {}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        stage = "?"
        if messages and SECAGG_CONFIGS in messages[0].content.config_records:
            stage = str(messages[0].content.config_records[SECAGG_CONFIGS].get("stage", "?"))
        down = sum(self._measure(m) for m in messages)  # before the workflow's mods touch them
        replies = list(self._grid.send_and_receive(messages, timeout=timeout))
        up = sum(self._measure(r) for r in replies)
        entry = self.stages.setdefault(stage, [0, 0])
        entry[0] += down
        entry[1] += up
        return replies


def run_secure_round(grid, cfg, rnd: int, blobs: dict[int, bytes], node_of: dict[int, int],
                     config_toml: str, measure, weights: dict[int, float]) -> SecureResult:
    """Run SecAgg+ over the clients in ``blobs`` (client id → encoded task); return the
    weighted mean of their vectors, or ``mean=None`` when the protocol halted or the sum's
    weight is not the survivors' public one (``weights``: client id → n_k/S)."""
    from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.strategy import Strategy as FlowerStrategy
    from flwr.common import FitIns, Parameters, parameters_to_ndarrays

    client_of = {node_of[c]: c for c in blobs}
    out: dict[str, Any] = {}

    class _Tasks(FlowerStrategy):
        """Hands the workflow our per-node tasks and takes back the unmasked mean."""

        def initialize_parameters(self, client_manager):
            return None

        def configure_fit(self, server_round, parameters, client_manager):
            return [(GridClientProxy(node_of[c], grid, grid.run.run_id),
                     FitIns(Parameters([blob], "lora_a2"), {"config": config_toml}))
                    for c, blob in blobs.items()]

        def aggregate_fit(self, server_round, results, failures):
            if results:
                out["mean_of_x"] = parameters_to_ndarrays(results[0][1].parameters)[0]
                out["survivors"] = sorted(client_of[p.node_id] for p, _ in results)
            return None, {}

        def configure_evaluate(self, server_round, parameters, client_manager):
            return []

        def aggregate_evaluate(self, server_round, results, failures):
            return None, {}

        def evaluate(self, server_round, parameters):
            return None

    a = cfg.secagg
    timeout = a.timeout_s or cfg.engine.round_timeout_s or None
    ctx = LegacyContext(Context(run_id=int(grid.run.run_id), node_id=0, node_config={},
                                state=RecordDict(), run_config={}), strategy=_Tasks())
    ctx.state.config_records["config"] = ConfigRecord({"current_round": rnd})
    ctx.state.array_records["parameters"] = ArrayRecord()
    metered = _MeteredGrid(grid, measure)
    workflow = _workflow_class()(
        num_shares=int(a.num_shares) if a.num_shares > 1 else float(a.num_shares),
        reconstruction_threshold=int(a.reconstruction_threshold)
        if a.reconstruction_threshold > 1 else float(a.reconstruction_threshold),
        max_weight=1.0, clipping_range=float(a.clipping_range),
        quantization_range=int(a.quantization_range), modulus_range=int(a.modulus_range),
        timeout=timeout)
    workflow(metered, ctx)
    down = sum(v[0] for v in metered.stages.values())
    up = sum(v[1] for v in metered.stages.values())
    if "mean_of_x" not in out:
        return SecureResult(None, [], down, up, metered.stages, settled=workflow.settled)
    survivors = out["survivors"]
    total = np.asarray(out["mean_of_x"], dtype=np.float64) * len(survivors)  # Σ_k x_k
    mean, reason = secure_mean(total, sum(weights[c] for c in survivors), len(survivors),
                               float(a.clipping_range), int(a.quantization_range))
    return SecureResult(mean, survivors, down, up, metered.stages, float(total[-1]), reason,
                        workflow.settled)
