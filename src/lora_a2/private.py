"""Client-level differential privacy as a wrapper around any strategy.

:class:`PrivateStrategy` wraps a :class:`~lora_a2.strategies.base.Strategy` the way Flower's
``DifferentialPrivacyServerSideFixedClipping`` / ``…ClientSideFixedClipping`` wrap theirs: the
strategy only *declares* how it is privatised, and the wrapper clips, noises, accounts and
decides what else may be published. A plugin strategy gets DP from the same declarations:

- ``central_dp`` / ``dp_refusals`` — which modes its aggregate supports;
- :meth:`~Strategy.upload_reference` and :meth:`~Strategy.dp_clip` — what the clip bounds
  (the transmitted change; FlexLoRA and FLoRA bound the products their merge sums);
- :meth:`~Strategy.noise_groups` — every coordinate a central release could move;
- :meth:`~Strategy.finalize` — post-processing of the noised aggregate (costs nothing);
- ``selects_slots`` + :attr:`~Strategy.slot_selector` — private slot selection (LoRA-A2);
- ``upload_size_public``, ``public_info_keys`` — what a central release may publish;
- an :meth:`~Strategy.aggregate` that takes ``weights`` (the fixed-denominator estimator).

Trust models (docs/PRIVACY.md):

``local`` — the server is untrusted. The client clips the change it sends to C and adds noise of
scale z·C to every sent value before encoding (replace-one sensitivity 2C). The wrapper also
drops the training loss from the upload header.

``central`` — the server is trusted with clipped, un-noised uploads; the adversary sees what
the server releases. The server clips every upload again (a client that does not clip cannot
raise the sensitivity) and aggregates with DP-FedAvg's **fixed-denominator estimator**
(McMahan, Ramage, Talwar, Zhang, ICLR 2018): Δ = Σ_k w_k Δ_k / (qW), w_k = min(n_k/ŵ, 1),
W = Σ over all clients, so zeroing one client's update moves Δ by at most C/(qW) whatever else
happened in the round; the noise N(0, (z·C/(qW))²) (Laplace: scale z·C/(qW)) goes on every
entry of :meth:`~Strategy.noise_groups`. What the aggregate sums therefore has exactly the
sensitivity the accountant assumes (noise multiplier z; every round counted at sampling rate 1:
who takes part is public, so no amplification by sampling is claimed).

Every draw comes from :func:`lora_a2.privacy.noise_generator` with the run's
``privacy.noise_source``: fresh OS entropy by default, the run seed only on request.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from . import privacy as dp
from .aggregation import data_weights
from .config import Config, clients_per_round
from .errors import UserError
from .selection import private_top_k
from .strategies import REGISTRY, Strategy, get_strategy
from .messages import ServerState, Task, Update
from .strategies.context import ClientContext

class PrivateStrategy:
    """A strategy with client-level DP (see module docstring). Everything not overridden here
    is the wrapped strategy's own (``name``, ``configure``, ``validate``, …)."""

    def __init__(self, inner: Strategy, plan: dp.PrivacyPlan, release_client_stats: bool = False
                 ) -> None:
        self.inner = inner
        self.plan = plan
        self.release_client_stats = release_client_stats
        self.population: list[int] | None = None
        if plan.mode == "central" and "weights" not in inspect.signature(
                inner.aggregate).parameters:
            raise UserError(f"config key 'privacy.mode': strategy '{inner.name}' cannot run "
                            f"central DP: its aggregate() takes no 'weights' argument (the "
                            f"fixed-denominator estimator needs it)")
        if plan.private_selection:
            inner.slot_selector = self.select_slots

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"PrivateStrategy({self.inner.name}, {self.plan.mode} {self.plan.mechanism})"

    @property
    def privacy(self) -> dp.PrivacyPlan:
        return self.plan

    def bind_clients(self, num_examples: Sequence[int]) -> None:
        self.population = [int(n) for n in num_examples]
        self.inner.bind_clients(num_examples)

    # ---------------------------------------------------------------- noise
    def generator(self, rnd: int, who: int | str) -> torch.Generator:
        """The generator of one draw (a secret one unless ``noise_source = "seeded"``)."""
        return dp.noise_generator(self.inner.cfg.seed, rnd, who, self.plan.noise_source)

    def draw_noise(self, n: int, scale: float, generator: torch.Generator) -> Tensor:
        """``n`` i.i.d. draws of the run's mechanism at ``scale`` (one call of the real noise
        function: the auditor draws through this too)."""
        return dp.noise(n, self.plan.mechanism, scale, generator)

    # ---------------------------------------------------------------- client side
    def upload(self, ctx: ClientContext, task: Task) -> Update:
        """:meth:`Strategy.client_update`, then the DP transform of what will be sent."""
        return self.privatize_upload(task, self.inner.client_update(ctx, task))

    def client_clip(self, task: Task, update: Update) -> Update:
        return self.inner.dp_clip(task, update, self.plan.clip, self.plan.mechanism,
                                  central=self.plan.mode == "central")

    def local_noise_scale(self) -> float:
        """Local mode: noise std (Laplace: scale) z·C on every sent value."""
        return self.plan.noise_multiplier * self.plan.clip

    def privatize_upload(self, task: Task, update: Update) -> Update:
        """Clip; in local mode add the noise. Either mode drops the loss: a data-dependent
        scalar, and in central mode its text's length changed the upload's size by a few
        bytes, a size the release publishes as not depending on the client's data."""
        out = self.client_clip(task, update)
        if self.plan.mode == "local":
            gen = self.generator(task.round, task.client_id)
            out.values = out.values + self.draw_noise(out.values.numel(),
                                                      self.local_noise_scale(), gen)
        out.meta.pop("loss", None)
        return out

    def selection_epsilon(self) -> float:
        """ε of one client's whole private selection in one round."""
        return self.plan.selection_epsilon

    def select_slots(self, scores: Tensor, k: int, task: Task) -> Tensor:
        """Private slot selection: the one-shot Gumbel top-k (ε_sel-DP), installed as the
        wrapped strategy's :attr:`~Strategy.slot_selector`."""
        return private_top_k(scores, k, self.selection_epsilon(),
                             self.generator(task.round, f"select/{task.client_id}"))

    # ---------------------------------------------------------------- server side
    def _population(self) -> list[int]:
        if self.population is None:
            raise RuntimeError("central DP needs bind_clients() before the first aggregate")
        return self.population

    def weight_cap(self) -> float:
        """ŵ: ``privacy.weight_cap``, or the largest client's example count when 0."""
        return self.plan.weight_cap or float(max(self._population()))

    def weights(self, replies: list[tuple[Task, Update]]) -> list[float]:
        """Central mode: the fixed-denominator weights (:func:`~lora_a2.privacy.
        fixed_denominator_weights`); local mode: the ordinary data weights (the uploads are
        already private, the server may weight them as it likes)."""
        counts = [u.num_examples for _, u in replies]
        if self.plan.mode != "central":
            return data_weights(counts)
        return dp.fixed_denominator_weights(counts, self._population(), self.plan.sample_rate,
                                            self.weight_cap())

    def central_noise_scale(self) -> float:
        """Noise std (Laplace: scale) on the aggregate: z · C / (qW)."""
        return self.plan.noise_multiplier * dp.central_sensitivity(
            self.plan.clip, self._population(), self.plan.sample_rate, self.weight_cap())

    def server_clip(self, task: Task, update: Update) -> Update:
        """Central mode: the server clips every upload again on arrival."""
        return self.inner.dp_clip(task, update, self.plan.clip, self.plan.mechanism,
                                  central=True)

    def central_aggregate(self, rnd: int, state: ServerState,
                          replies: list[tuple[Task, Update]]
                          ) -> tuple[ServerState, dict[str, Any]]:
        """The deterministic part of a central release: re-clip, aggregate with the fixed
        denominator (no noise yet, no post-processing)."""
        clipped = [(t, self.server_clip(t, u)) for t, u in replies]
        return self.inner.aggregate(rnd, state, clipped, weights=self.weights(clipped))

    def add_central_noise(self, rnd: int, state: ServerState) -> ServerState:
        """Noise on **every** entry of the round's noise groups — not only where an upload
        contributed (for LoRA-A2 that set is the clients' data-chosen selection)."""
        layout = self.inner.layout
        assert layout is not None
        scale = self.central_noise_scale()
        gen = self.generator(rnd, "server")
        tensors = dict(state.tensors)
        for n in layout.group_names(self.inner.noise_groups(rnd)):
            t = tensors[n]
            tensors[n] = t + self.draw_noise(t.numel(), scale, gen).reshape(t.shape).to(t.dtype)
        return ServerState(tensors, state.extra)

    def aggregate_round(self, rnd: int, state: ServerState, replies: list[tuple[Task, Update]]
                        ) -> tuple[ServerState, dict[str, Any]]:
        """Local mode: the wrapped strategy's aggregate of the (already private) uploads.
        Central mode: :meth:`central_aggregate`, :meth:`add_central_noise`, then the
        strategy's :meth:`~Strategy.finalize` (post-processing of the noised release)."""
        if self.plan.mode != "central":
            return self.inner.aggregate_round(rnd, state, replies)
        new, info = self.central_aggregate(rnd, state, replies)
        return self.inner.finalize(rnd, self.add_central_noise(rnd, new), info)

    def aggregate(self, rnd: int, state: ServerState, replies: list[tuple[Task, Update]],
                  weights: Sequence[float] | None = None) -> tuple[ServerState, dict[str, Any]]:
        raise TypeError("call aggregate_round() on a PrivateStrategy: aggregate() of the "
                        "wrapped strategy would skip the clip and the noise")

    # ---------------------------------------------------------------- what is published
    @property
    def withholds(self) -> bool:
        """The release must leave out data-dependent values (central mode, no opt-in)."""
        return self.plan.mode == "central" and not self.release_client_stats

    def release_record(self, record: dict[str, Any], client_metric_keys: Sequence[str] = ()
                       ) -> dict[str, Any]:
        """The part of a round's full record (the server's own, ``server_log.jsonl``) that may
        be published in ``metrics.jsonl``.

        Local mode, or central with ``privacy.release_client_stats``: all of it (local: it is
        computed from private uploads, or is what docs/PRIVACY.md lists as not covered).
        Central mode otherwise keeps only an allow-list: the evaluation of the released
        (noised) state on the shared test set — minus ``client_metric_keys``, the task's
        metrics computed on the clients' own data —, the accountant's figures, and what does
        not depend on any client's data (who was sampled, download sizes, upload sizes when
        the strategy's are fixed, the strategy's ``public_info_keys``). ``withheld`` lists the
        keys left out."""
        if not self.withholds:
            return record
        sizes = self.inner.upload_size_public
        allowed = set(PUBLIC_ROUND_KEYS) | set(self.inner.public_info_keys) | set(
            record.get("eval_metric_keys", ()))
        if sizes:
            allowed |= set(SIZE_KEYS)
        allowed -= set(client_metric_keys)
        out = {k: v for k, v in record.items() if k in allowed}
        if "failures" in out:
            out["failures"] = [public_failure(f) for f in out["failures"]]
        if "per_client" in record:
            keep = set(PUBLIC_CLIENT_KEYS) | ({"upload_bytes", "upload_params"} if sizes else set())
            out["per_client"] = [{k: public_failure(v) if k == "failure" else v
                                  for k, v in c.items() if k in keep}
                                 for c in record["per_client"]]
        out["withheld"] = sorted(k for k in record if k not in out and k != "eval_metric_keys")
        return out


_CLIENT_ERROR = re.compile(r"(ClientApp error[^:]*):.*", re.S)


def public_failure(reason: str) -> str:
    """A failure reason as central DP releases it: the engine's own words stay (no reply, not
    reachable, the timeout), a ClientApp's error message — text the client's code wrote, which
    could quote its data — is cut (the trusted server's log keeps it)."""
    return _CLIENT_ERROR.sub(r"\1: message withheld (central DP)", reason)


#: per-client keys of a round record that never depend on a client's data (its example count
#: is public by assumption: the fixed denominator is computed from the clients' counts)
PUBLIC_CLIENT_KEYS = ("client", "download_bytes", "download_params", "dropped", "failure",
                      "num_examples")
#: round keys that never depend on a client's data, or are the accountant's
PUBLIC_ROUND_KEYS = ("round", "strategy", "active_factor", "clients", "num_replies", "status",
                     "dropped", "download_bytes", "download_params", "rejected", "failures",
                     "node_warnings", "flower_download_bytes", "flower_query_bytes",
                     "train_wall_s", "wall_s", "epsilon", "delta", "selection_epsilon",
                     "releases_charged")
#: upload sizes: public when the strategy's ``upload_size_public`` says they are fixed
SIZE_KEYS = ("upload_bytes", "upload_params", "upload_slot_ids", "cumulative_upload_bytes",
             "flower_upload_bytes")


def sample_rate(cfg: Config) -> float:
    """q = clients per round / clients: the central estimator's denominator qW (the
    accountant does not use it: every round counts, no amplification by sampling)."""
    return clients_per_round(cfg) / cfg.data.num_clients


def resolve_plan(cfg: Config) -> dp.PrivacyPlan | None:
    """The run's DP plan (None without DP)."""
    return dp.resolve(cfg.privacy, cfg.train.rounds, sample_rate(cfg))


def check_config(cfg: Config) -> None:
    """The privacy checks that need a strategy or the accountant (one-line
    :class:`UserError`): private selection needs a strategy that selects slots, the strategy
    must support the mode, a target ε must be reachable with the private selection."""
    p, t = cfg.privacy, cfg.train
    cls = REGISTRY[cfg.strategy.name]
    if p.selection == "private" and not cls.selects_slots:
        raise UserError(f"config key 'privacy.selection' 'private' applies to strategies that "
                        f"select slots from client data (lora-a2); '{cfg.strategy.name}' selects "
                        f"none, got {p.selection!r}")
    if p.mechanism == "none":
        return
    if p.selection == "private" and p.epsilon is not None:
        dp.check_selection_floor(dp.plan_builder(p, t.rounds, 1.0), float(p.epsilon), t.rounds)
    if p.noise_multiplier is not None:  # every ε the run will report must be a number (the
        # accountant counts every round at q = 1: the sample rate, unknown before a natural
        # partition draws its clients, does not enter it)
        dp.resolve(p, t.rounds, 1.0)
    refusal = cls.dp_refusal(p.mode)
    if refusal:
        ok = sorted(n for n, c in REGISTRY.items() if not c.dp_refusal(p.mode))
        raise UserError(f"config key 'privacy.mode': '{p.mode}' DP is not available with "
                        f"strategy '{cfg.strategy.name}': {refusal} (it is with "
                        f"{', '.join(ok)})")


def rebuildable_noise_warning(cfg: Config) -> str | None:
    """One line to print when a new run starts and ``cfg`` adds DP noise that whoever holds
    the config can rebuild (``privacy.noise_source = "seeded"``); None otherwise. Under config
    schema 1 (every file without ``schema_version``) ``seeded`` is the default, so the line
    names that and how to get OS noise. The run's summary says so too, in
    ``privacy.caveats``."""
    p = cfg.privacy
    if p.mechanism == "none" or p.noise_source != "seeded":
        return None
    why = ("the config is schema version 1, as is every file without schema_version, and "
           "seeded is that version's default; add schema_version = 2 or set "
           "privacy.noise_source = 'os' for noise nobody can rebuild"
           if cfg.schema_version == 1 else "as configured")
    return (f"privacy.noise_source = 'seeded' ({why}): every noise draw can be rebuilt from "
            f"the config's seed, so the DP guarantee does not hold against whoever holds the "
            f"config")


def inert_privacy_warning(cfg: Config) -> str | None:
    """One line to print when a new run starts and ``cfg`` sets a noise level
    (``privacy.epsilon`` or ``privacy.noise_multiplier``) with ``privacy.mechanism = 'none'``:
    no noise is added, the run is not private. A warning, not an error: setting the mechanism
    to 'none' on a config that has DP is how DP is switched off."""
    p = cfg.privacy
    given = [f"privacy.{k}" for k, v in (("epsilon", p.epsilon),
                                          ("noise_multiplier", p.noise_multiplier))
             if v is not None]
    if p.mechanism != "none" or not given:
        return None
    return (f"{' and '.join(given)} set but privacy.mechanism = 'none': no noise is added and "
            f"this run is not differentially private (set privacy.mechanism = 'gaussian' or "
            f"'laplace' for DP)")


def build_strategy(cfg: Config) -> Strategy | PrivateStrategy:
    """The run's strategy: ``get_strategy(cfg)``, wrapped in :class:`PrivateStrategy` when
    ``privacy.mechanism`` is not ``none``."""
    inner = get_strategy(cfg)
    plan = resolve_plan(cfg)
    if plan is None:
        return inner
    return PrivateStrategy(inner, plan, cfg.privacy.release_client_stats)
