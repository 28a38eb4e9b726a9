"""The strategy interface every federated method implements.

A strategy owns the whole method: what the server sends each client (:meth:`Strategy.configure`),
what the client does with it (:meth:`Strategy.client_update`, run wherever the client runs), how an
upload is checked (:meth:`Strategy.validate`) and how uploads are combined
(:meth:`Strategy.aggregate`). Engines only move :class:`~lora_a2.messages.Task` and
:class:`~lora_a2.messages.Update` payloads and call these four methods; they contain no
aggregation math. Adding a method is one new file with a ``@register`` class
(:mod:`.registry`); most methods build on :class:`~.dense.DenseStrategy`. Plugins import all of
these from :mod:`lora_a2.strategies`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from torch import Tensor, nn

from .. import privacy as dp
from ..adapter import ParamLayout
from ..aggregation import buffered_weights, data_weights
from ..budgets import resolve as resolve_budgets
from ..config import Config, phase_every
from ..messages import ServerState, Task, Update
from .context import ClientContext, client_seed
from .options import StrategyOptions, resolve_options
from .registry import other_option_defaults


class Strategy(ABC):
    """Base class of every federated method (see module docstring)."""

    name: ClassVar[str]
    #: the strategy trains every model weight (no LoRA adapter is attached)
    full_model: ClassVar[bool] = False
    #: this strategy's typed knobs (``strategy.options.NAME``): a dataclass subclass of
    #: :class:`~.options.StrategyOptions`, the same mechanism for built-ins and plugins
    Options: ClassVar[type[StrategyOptions]] = StrategyOptions
    #: central DP is sound for this strategy: its aggregate is linear in the uploads (so the
    #: server can clip each upload and noise the sum); ``local`` DP works for every strategy
    central_dp: ClassVar[bool] = False
    #: DP modes this strategy refuses, each with its one-line reason (mode → reason); central
    #: mode is refused without a reason entry when ``central_dp`` is False
    dp_refusals: ClassVar[dict[str, str]] = {}
    #: under local DP: what this strategy's clients send in the clear besides the noised values,
    #: the example count and the upload's size (one clause; summary.json lists it as a caveat)
    dp_local_clear: ClassVar[str] = ""
    #: lr_B / lr_A of the method's paper, used when ``strategy.lr_ratio`` is 0 (the default):
    #: 1 = one learning rate for A and B, as most papers train LoRA
    paper_lr_ratio: ClassVar[float] = 1.0

    #: clients keep part of the model (``ClientContext.store``) that never reaches the server,
    #: so there is no one global model: after each round every client evaluates its own
    #: (:meth:`eval_task` → :meth:`client_evaluate`, sent as evaluate messages and counted)
    personalized: ClassVar[bool] = False
    #: the client chooses which slots it uploads from its own data (LoRA-A2): such a strategy
    #: honours ``privacy.selection = "private"``
    selects_slots: ClassVar[bool] = False
    #: can run under secure aggregation (Flower's SecAgg+, ``secagg.enabled``): the round's
    #: aggregate is the weighted mean Σ_k n_k v_k / Σ_k n_k of one fixed-length dense vector v_k
    #: per client (:meth:`secure_vector` → :meth:`aggregate_secure`)
    secure_aggregation: ClassVar[bool] = False
    #: the tasks this strategy can run (None: every task)
    tasks: ClassVar[tuple[str, ...] | None] = None
    #: each client's upload is sized by its own rank budget (``Task.config["budget"]`` or
    #: ``["rank"]``), so ``strategy.rank_budget = "auto"`` can fit it to the client's link
    #: (:meth:`largest_update` must then be implemented)
    budget_sized_upload: ClassVar[bool] = False
    #: trains one LoRA rank on every client (:func:`~lora_a2.strategies.fl_lora.uniform_rank`):
    #: a ``strategy.rank_budget`` that gives clients different ranks is refused when the config
    #: is checked, before any data or model loads
    single_rank: ClassVar[bool] = False
    #: can run under ``train.mode = "async"`` (FedBuff, :mod:`lora_a2.fedbuff`): its uploads are
    #: changes relative to the state the client downloaded and :meth:`aggregate` adds
    #: Σ_k w_k Δ_k with the weights it is given (linear in them), so a stale update can be
    #: scaled by its staleness weight and added to the newer state (:meth:`aggregate_buffer`)
    supports_async: ClassVar[bool] = False
    #: the method alternates which LoRA factor trains by phase (A/B freeze: LoRA-A2, RoLoRA);
    #: a phase lasts :attr:`phase_every` rounds (``train.phase_every``)
    alternating: ClassVar[bool] = False

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        s = cfg.strategy
        self.budgets = resolve_budgets(s.rank_budget, cfg.data.num_clients, s.global_rank,
                                       cfg.seed)
        self.layout: ParamLayout | None = None
        #: rounds per A/B phase of an alternating method (:func:`lora_a2.config.phase_every`)
        self.phase_every = phase_every(cfg)
        self.options = resolve_options(self.Options, cfg.strategy.options, self.name,
                                       other_option_defaults(type(self)))

    @classmethod
    def check(cls, cfg: Config, options: StrategyOptions) -> None:
        """Checks of this strategy against the rest of the config (one-line
        :class:`UserError`), beyond its options' own :meth:`StrategyOptions.check`; run by the
        validation step (:mod:`lora_a2.checks`) before anything is built."""

    @classmethod
    def dp_refusal(cls, mode: str) -> str | None:
        """Why DP mode ``mode`` (``local`` / ``central``) cannot be used with this strategy;
        None when it can."""
        if mode in cls.dp_refusals:
            return cls.dp_refusals[mode]
        if mode == "central" and not cls.central_dp:
            return "its aggregate is not linear in the uploads, so noise on the sum would not " \
                   "cover what it releases"
        return None

    @classmethod
    def reference_upload_values(cls, model: nn.Module, layout: ParamLayout,
                                budget: int) -> int | None:
        """Values one client of rank budget ``budget`` uploads in one round under this
        method, when the model alone fixes that number (so other runs' summaries can compare
        against it, ``report.references``); None (the default) when it depends on the run."""
        return None

    @classmethod
    def has_reference_upload(cls) -> bool:
        """Whether :meth:`reference_upload_values` is overridden (may be named in
        ``report.references``)."""
        return cls.reference_upload_values.__func__ is not Strategy.reference_upload_values.__func__

    # -- set-up ---------------------------------------------------------------
    def lora_rank(self) -> int | None:
        """Rank of the adapter every client holds (None: no LoRA)."""
        return self.cfg.strategy.global_rank

    def bind(self, layout: ParamLayout) -> None:
        """Learn the shared layout (after the runtime built the model)."""
        self.layout = layout

    def init_state(self, initial: dict[str, Tensor]) -> ServerState:
        return ServerState({k: v.clone() for k, v in initial.items()})

    def restore_state(self, state: ServerState) -> ServerState:
        """Continue from a checkpointed state (after a crash). A strategy that keeps anything
        outside ``state`` (e.g. weights merged into the base model) re-applies it here."""
        return state

    def phase(self, rnd: int) -> int:
        """The A/B phase (1, 2, …) round ``rnd`` belongs to: ⌈rnd / phase_every⌉ — the round
        itself in sync mode by default; an alternating method trains B in odd phases and A in
        even ones."""
        return (rnd - 1) // self.phase_every + 1

    def active_factor(self, rnd: int) -> str | None:
        """`A`, `B`, or None when both (or no) LoRA factors train in round ``rnd``."""
        return None

    # -- the round ------------------------------------------------------------
    @abstractmethod
    def configure(self, rnd: int, client_id: int, state: ServerState) -> Task:
        """The task (config + download) for one client this round."""

    @abstractmethod
    def client_update(self, ctx: ClientContext, task: Task) -> Update:
        """Client side: train from the task's download and return the upload."""

    @abstractmethod
    def validate(self, task: Task, update: Update) -> None:
        """Raise :class:`InvalidPayload` (with the reason) if the upload must not be used."""

    @abstractmethod
    def aggregate(self, rnd: int, state: ServerState, replies: list[tuple[Task, Update]],
                  weights: Sequence[float] | None = None) -> tuple[ServerState, dict[str, Any]]:
        """New global state from the validated replies, plus round info for the metrics.
        ``weights``: one per reply, fixed by the caller (central DP's fixed denominator);
        None = the data weights (:meth:`round_weights` gives either)."""

    # -- what a task costs a client (the simulated clock, lora_a2.fleet) -----------------
    def local_passes(self, rnd: int, num_examples: int) -> float:
        """Passes of local training (forward + backward) over its ``num_examples`` examples
        that one task of round ``rnd`` costs a client: its compute time is n_k · passes ·
        FLOPs per example / device FLOP/s. Default: ``train.local_epochs``."""
        return float(self.cfg.train.local_epochs)

    def largest_update(self, rnd: int, client_id: int, num_examples: int,
                       budget: int) -> Update:
        """An upload (zeros) as large, once encoded, as the largest that a client with rank
        budget ``budget`` can send in round ``rnd`` — header scalars that depend on training
        take :data:`~lora_a2.payload.LONGEST_FLOAT` — so that ``strategy.rank_budget = "auto"``
        can size budgets from the exact encoded size (``budget_sized_upload`` strategies)."""
        raise NotImplementedError(f"strategy '{self.name}' does not size uploads by budget")

    # -- secure aggregation (``secure_aggregation`` strategies only) -----------------
    def secure_vector(self, task: Task, update: Update) -> Tensor:
        """Client side: the dense vector v_k whose weighted mean the server may learn (same
        length for every client of the round; zeros where a sparse upload sent nothing)."""
        raise NotImplementedError(f"strategy '{self.name}' has no secure form")

    def aggregate_secure(self, rnd: int, state: ServerState, mean: Tensor
                         ) -> tuple[ServerState, dict[str, Any]]:
        """Server side: the new state from ``mean`` = Σ_k n_k v_k / Σ_k n_k alone (no upload
        is ever seen); must equal :meth:`aggregate` of the same uploads."""
        raise NotImplementedError(f"strategy '{self.name}' has no secure form")

    # -- personalised evaluation (``personalized`` strategies only) ------------------
    def eval_task(self, rnd: int, client_id: int, state: ServerState) -> Task:
        """What the server sends a client so it can evaluate its own model after round
        ``rnd`` (default: the shared groups a training task would carry)."""
        task = self.configure(rnd, client_id, state)
        return Task(rnd, client_id, {**task.config, "evaluate": True}, task.download)

    def client_evaluate(self, ctx: ClientContext, task: Task) -> dict[str, Any]:
        """Client side: load the shared download, then this client's own part
        (:meth:`personal_tensors`), and evaluate with the run's task on the shared test set
        and on the client's own test split (``LearningTask.evaluate_client``)."""
        ctx.runtime.load(task.download)
        ctx.runtime.load(self.personal_tensors(ctx))
        with ctx.runtime.autocast():  # train.precision, as in training
            return ctx.runtime.task.evaluate_client(ctx)

    def client_state(self) -> str:
        """What this strategy's clients keep in ``ctx.store`` between their rounds, as one
        clause ("" = nothing). The local engine saves it in the checkpoint; on Flower it lives
        in each node's ``Context.state``, which a resumed run (a new Flower run) starts
        without, so a run that keeps it is refused ``--resume`` on Flower. A strategy that
        writes ``ctx.store`` must say so here."""
        return ""

    def personal_tensors(self, ctx: ClientContext) -> dict[str, Tensor]:
        """The federated tensors this client holds for itself (from ``ctx.store``)."""
        return {}

    # -- what engines call ------------------------------------------------------
    def upload(self, ctx: ClientContext, task: Task) -> Update:
        """Client side: what the client sends — :meth:`client_update` (the DP wrapper,
        :class:`lora_a2.private.PrivateStrategy`, clips and noises it here)."""
        return self.client_update(ctx, task)

    def aggregate_round(self, rnd: int, state: ServerState, replies: list[tuple[Task, Update]]
                        ) -> tuple[ServerState, dict[str, Any]]:
        """Server side: :meth:`aggregate` of the validated replies with the data weights,
        then :meth:`finalize`."""
        new, info = self.aggregate(rnd, state, replies)
        return self.finalize(rnd, new, info)

    def update_target(self, task: Task) -> Any:
        """What an upload for ``task`` changes, as a hashable key: :meth:`aggregate` takes
        replies of one target at a time (an asynchronous buffer can mix the A-phase and the
        B-phase updates of an alternating method). Default: one target for every task."""
        return None

    def aggregate_buffer(self, rnd: int, state: ServerState, replies: list[tuple[Task, Update]],
                         staleness: Sequence[int]) -> tuple[ServerState, dict[str, Any]]:
        """Server side of ``train.mode = "async"``: FedBuff's step (Nguyen et al., AISTATS
        2022) x ← x + η_g Σ_k s(τ_k) (n_k / Σ_j n_j) Δ_k over the buffer
        (:func:`~lora_a2.aggregation.buffered_weights`, η_g = ``train.server_lr``), each
        Δ_k being relative to the state its client downloaded τ_k aggregations ago. Replies of
        different :meth:`update_target` go to :meth:`aggregate` one target at a time, each with
        its share of the buffer's weights (the sum is the same linear step); then
        :meth:`finalize`."""
        weights = buffered_weights([u.num_examples for _, u in replies], list(staleness),
                                   self.cfg.train.server_lr)
        groups: dict[Any, list[int]] = {}
        for i, (task, _) in enumerate(replies):
            groups.setdefault(self.update_target(task), []).append(i)
        info: dict[str, Any] = {}
        for idx in groups.values():
            state, part = self.aggregate(rnd, state, [replies[i] for i in idx],
                                         [weights[i] for i in idx])
            info = merge_info(info, part)
        return self.finalize(rnd, state, info)

    def finalize(self, rnd: int, state: ServerState, info: dict[str, Any]
                 ) -> tuple[ServerState, dict[str, Any]]:
        """Server post-processing of the aggregate (after central DP's noise, so it costs no
        privacy), e.g. FedSVD's re-factorisation. Default: none. It must not read uploads."""
        return state, info

    def round_weights(self, replies: list[tuple[Task, Update]],
                      weights: Sequence[float] | None = None) -> list[float]:
        """The aggregation weights of ``replies``: ``weights`` when the caller fixed them (the
        DP wrapper's fixed-denominator estimator), else w_k = n_k / Σ_j n_j over the replies."""
        if weights is not None:
            if len(weights) != len(replies):
                raise ValueError(f"{len(weights)} weights for {len(replies)} replies")
            return [float(w) for w in weights]
        return data_weights([u.num_examples for _, u in replies])

    # -- how the strategy is privatised (declarations the DP wrapper reads) -------
    #: which slots to upload, when the client chooses them from its data (``selects_slots``):
    #: ``(scores, k, task) → (N, r_G) bool``; None = the plain top-k. The DP wrapper installs
    #: the private (Gumbel) selector here under ``privacy.selection = "private"``
    slot_selector: Callable[[Tensor, int, Task], Tensor] | None = None
    #: the size of an upload is fixed by the task (not by the client's data), so per-client
    #: upload bytes may be published in central DP mode
    upload_size_public: ClassVar[bool] = True
    #: keys of :meth:`aggregate`'s round info that do not depend on the uploads (publishable in
    #: central DP mode); every other key is data-dependent and kept in the server's record
    public_info_keys: ClassVar[tuple[str, ...]] = ()

    def bind_clients(self, num_examples: Sequence[int]) -> None:
        """Learn every client's training-set size once the data are partitioned (the DP
        wrapper's fixed denominator needs them). Default: nothing."""

    def upload_reference(self, task: Task, update: Update) -> Tensor | None:
        """What ``update.values`` would be had the client not trained; DP clips and noises
        ``values − reference``. None (the default): the values already are the change."""
        return None

    def dp_clip(self, task: Task, update: Update, bound: float, mechanism: str,
                central: bool) -> Update:
        """The update with the quantity DP bounds clipped to norm ``bound`` (L2; L1 for
        ``laplace``): by default the transmitted change ``values − upload_reference``.
        ``central``: the clip is for the server's aggregate (a strategy whose aggregate sums
        something else than its uploads, e.g. products, clips that instead)."""
        ref = self.upload_reference(task, update)
        change = update.values if ref is None else update.values - ref
        clipped = dp.clip(change, bound, mechanism)
        values = clipped if ref is None else ref + clipped
        # float32 rounding of ref + clipped can push the sent change past the bound: shrink.
        shrink = 1.0
        while ref is not None and dp.norm_of(values - ref, mechanism) > bound:
            shrink *= 0.99
            values = ref + clipped * shrink if shrink > 1e-3 else ref.clone()  # no change: 0
        return Update(update.client_id, update.num_examples, values, update.slots,
                      dict(update.meta))

    def noise_groups(self, rnd: int) -> list[str]:
        """Central DP: the parameter groups whose every entry the server's release in round
        ``rnd`` could change, whatever the clients sent — all of them get noise, so which
        coordinates move reveals nothing about the data. Must not depend on the uploads.
        Default: the round's active factor (A and B when both train) plus the head."""
        active = self.active_factor(rnd)
        return ([active] if active else ["A", "B"]) + self.head_groups()

    # -- shared helpers -------------------------------------------------------
    @property
    def lr_ratio(self) -> float:
        """lr_B / lr_A of this run: ``strategy.lr_ratio`` if set (> 0), else the paper's."""
        return self.cfg.strategy.lr_ratio or self.paper_lr_ratio

    def lr_of(self, group: str) -> float:
        s = self.cfg.strategy
        lr_b = s.lr * self.lr_ratio
        return {"A": s.lr, "B": lr_b, "head": s.head_lr or lr_b, "full": s.full_lr}[group]

    def head_groups(self) -> list[str]:
        assert self.layout is not None
        return ["head"] if self.layout.head else []

    def base_config(self, rnd: int, client_id: int, send: list[str]) -> dict[str, Any]:
        return {"send": send, "seed": client_seed(self.cfg.seed, rnd, client_id),
                "budget": self.budgets[client_id]}

    def make_task(self, rnd: int, client_id: int, state: ServerState, send: list[str],
                  **config: Any) -> Task:
        assert self.layout is not None
        names = self.layout.group_names(send)
        return Task(rnd, client_id, {**self.base_config(rnd, client_id, send), **config},
                    {n: state.tensors[n] for n in names})


def merge_info(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Round info of two partial aggregates: counts (dicts of numbers) add up, the rest is
    ``b``'s."""
    out = dict(a)
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = {key: out[k].get(key, 0) + v.get(key, 0) for key in {**out[k], **v}}
        else:
            out[k] = v
    return out


StrategyFactory = Callable[[Config], Strategy]
