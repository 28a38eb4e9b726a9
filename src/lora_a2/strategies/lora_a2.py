"""LoRA-A2 (Koo, Jang, Ok — ACL 2025): alternating freeze + adaptive rank selection.

Round t (1-indexed), docs/ALGORITHM.md §2:
- odd t trains B with A frozen, even t trains A with B frozen (B first: while B = 0, A gets no
  gradient) — odd and even phases of ``train.phase_every`` rounds when that is > 1 (async
  mode, docs/FLEETS.md § Asynchronous rounds); lr_B = ``lr_ratio`` · lr_A;
- each client probes (``probe_epochs`` of training of the active factor from the global state),
  scores every slot (m, i) by the Frobenius norm of its contribution to ΔW, keeps the top
  r_k · N slots over the whole model, resets to the global state, and trains only those slots;
- it uploads the selected columns of ΔB (rows of ΔA) and their slot ids, nothing else;
- the server adds Σ_k w_k Δ_k to the active factor (zero where a client did not select a slot),
  which is exact because the frozen factor is the same on every client.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..aggregation import aggregate_slots, weighted_sum
from ..client import ParamGroup
from ..errors import UserError
from ..payload import LONGEST_FLOAT, InvalidPayload, flatten, unflatten
from ..selection import (SLOT_SCORES, factor_mask, gather_slots, scatter_slots, select_top_k,
                         selection_from_ids, slot_ids, slot_scores, slot_size)
from ..config import Config
from ..messages import ServerState, Task, Update
from .base import Strategy
from .context import ClientContext
from .dense import check_finite
from .registry import register
from .options import StrategyOptions

PROBES = ("full", "reuse", "gradient")


@dataclass
class LoraA2Options(StrategyOptions):
    """LoRA-A2's knobs (docs/ALGORITHM.md §2): how a client scores and selects its slots."""

    probe_epochs: int = 1
    """Local epochs of the probe that scores the slots (paper: 1); probe = "full" only."""
    probe_fraction: float = 1.0
    """Run only this fraction of the probe's optimiser steps (at least one), a cheaper probe;
    1 = the paper's full probe. The slots are scored on the shorter probe's change."""
    probe: str = "full"
    """How the slots are scored. "full" = the paper: `probe_epochs` of training of the active
    factor from the global state, then reset and train the selected slots; "reuse" = the probe
    is the first training epoch (unselected slots go back to their global values, the selected
    ones keep the probe's progress and train on for the remaining local epochs); "gradient" =
    no probe training: score by the mean gradient over `probe_batches` batches at the global
    state, ‖∂L/∂B[:,i]‖·‖A[i,:]‖ (A-rounds: ‖B[:,i]‖·‖∂L/∂A[i,:]‖)."""
    probe_batches: int = 4
    """With probe = "gradient": batches whose gradients are averaged for the scores."""
    probe_optimizer: str = "fresh"
    """With probe = "reuse": the training after the probe starts a "fresh" AdamW or keeps the
    probe's ("kept")."""
    reselect_every: int = 1
    """A client re-scores its slots every this many rounds of the same factor and reuses its
    last selection for that factor in between (kept on the client); 1 = the paper. Not with
    strategy.rank_budget = "auto" (a kept selection would be sized for an earlier budget)."""
    slot_score: str = "frobenius"
    """How slots are scored. "frobenius" = ‖ΔB_i A_i‖_F (the paper); "rms" divides it by
    √(d_out · d_in) so large modules are not favoured for their size alone (an experiment
    knob)."""
    renormalize: bool = False
    """Divide each slot's sum by the weight of the clients that selected it (not the paper)."""

    def check(self) -> None:
        self.require(self.probe_epochs >= 1, "probe_epochs", "must be ≥ 1")
        self.require(0.0 < self.probe_fraction <= 1.0, "probe_fraction", "must be in (0, 1]")
        self.require(self.probe in PROBES, "probe", f"must be one of {', '.join(PROBES)}")
        self.require(self.probe_batches >= 1, "probe_batches", "must be ≥ 1")
        self.require(self.probe_optimizer in ("fresh", "kept"), "probe_optimizer",
                     "must be 'fresh' or 'kept'")
        self.require(self.reselect_every >= 1, "reselect_every", "must be ≥ 1")
        self.require(self.probe_fraction == 1.0 or self.probe == "full", "probe_fraction",
                     f"shortens the full probe; it cannot be combined with "
                     f"strategy.options.probe = '{self.probe}'")
        self.require(self.slot_score in SLOT_SCORES, "slot_score",
                     f"must be one of {', '.join(SLOT_SCORES)}")
        # a knob of one probe kind, set with another, would silently do nothing
        self.require(self.probe_optimizer == "fresh" or self.probe == "reuse", "probe_optimizer",
                     f"'kept' continues the reuse probe's optimiser; it needs "
                     f"strategy.options.probe = 'reuse', not '{self.probe}'")
        self.require(self.probe_epochs == LoraA2Options.probe_epochs or self.probe == "full",
                     "probe_epochs",
                     f"sets the full probe's length; with strategy.options.probe = "
                     f"'{self.probe}' it would be ignored")
        self.require(self.probe_batches == LoraA2Options.probe_batches
                     or self.probe == "gradient", "probe_batches",
                     f"sets the gradient probe's batches; with strategy.options.probe = "
                     f"'{self.probe}' it would be ignored")


@register
class LoraA2(Strategy):
    """LoRA-A2 with per-client rank budgets r_k ≤ r_G (``strategy.rank_budget``)."""

    name = "lora-a2"
    central_dp = True
    paper_lr_ratio = 5.0  # the LoRA-A2 paper trains B at 5 × the learning rate of A
    selects_slots = True
    upload_size_public = False  # its size is the selected slots' widths: chosen from the data
    secure_aggregation = True  # the selected slots scattered into the dense active factor
    budget_sized_upload = True  # r_k · N slots
    supports_async = True  # its aggregate adds Σ_k w_k Δ_k (not with options.renormalize)
    alternating = True
    Options = LoraA2Options
    options: LoraA2Options

    @classmethod
    def check(cls, cfg: Config, options: StrategyOptions) -> None:
        assert isinstance(options, LoraA2Options)
        if options.renormalize and cfg.privacy.mechanism != "none" and \
                cfg.privacy.mode == "central":
            raise UserError("config key 'privacy.mode': 'central' cannot be combined with "
                            "strategy.options.renormalize = true, got 'central'")
        if options.renormalize and cfg.train.mode == "async":
            raise UserError("config key 'train.mode': 'async' cannot be combined with "
                            "strategy.options.renormalize = true (per-slot renormalisation "
                            "would undo the staleness weights), got 'async'")
        if options.reselect_every > 1 and cfg.strategy.rank_budget == "auto":
            raise UserError("config key 'strategy.options.reselect_every' cannot be combined "
                            "with strategy.rank_budget = 'auto' (a kept selection was made "
                            "for an earlier round's budget, which 'auto' changes every round), "
                            f"got {options.reselect_every}")
        if options.renormalize and cfg.secagg.enabled:
            raise UserError("config key 'secagg.enabled' cannot be combined with "
                            "strategy.options.renormalize = true (per-slot client counts would "
                            "be needed in the clear), got True")

    def active_factor(self, rnd: int) -> str:
        return "B" if self.phase(rnd) % 2 == 1 else "A"

    def update_target(self, task: Task) -> str:
        """The factor the task trains (an async buffer may mix A- and B-phase updates)."""
        return task.config["factor"]

    # -- what a task costs (the simulated clock) --------------------------------
    def local_passes(self, rnd: int, num_examples: int) -> float:
        """E training epochs plus the probe (``strategy.options``): "full" adds
        ``probe_epochs`` (× ``probe_fraction``, in whole optimiser steps), "gradient" its
        ``probe_batches`` batches (forward + backward, no step), "reuse" nothing (its probe is
        the first epoch). In a round where the client reuses its last selection
        (``reselect_every``) there is no probe; a client's first selection for a factor in
        such a round is counted as reused too (the server does not know the client's store)."""
        st, t = self.options, self.cfg.train
        passes = float(t.local_epochs)
        if st.reselect_every > 1 and ((self.phase(rnd) - 1) // 2) % st.reselect_every != 0:
            return passes
        n = max(int(num_examples), 1)
        steps_per_epoch = -(-n // t.batch_size)
        if st.probe == "gradient":
            return passes + min(st.probe_batches * t.batch_size, n) / n
        if st.probe == "full":  # its steps run whole epochs (each ending in a short batch)
            # first, then the rest of the last one
            steps = max(1, math.ceil(st.probe_fraction * st.probe_epochs * steps_per_epoch))
            epochs, rest = divmod(steps, steps_per_epoch)
            return passes + (epochs * n + min(rest * t.batch_size, n)) / n
        return passes  # "reuse"

    def largest_update(self, rnd: int, client_id: int, num_examples: int,
                       budget: int) -> Update:
        """k = r_k · N slot ids and the k widest slots of round ``rnd``'s factor (B: a column
        of d_out values, A: a row of d_in), plus a trained head."""
        layout = self.layout
        assert layout is not None
        factor = self.active_factor(rnd)
        k = budget * layout.num_modules
        widths = sorted((slot_size(factor, m.d_in, m.d_out) for m in layout.modules
                         for _ in range(layout.rank)), reverse=True)
        n_values = sum(widths[:k]) + layout.size(self.head_groups())
        return Update(client_id, num_examples, torch.zeros(n_values),
                      torch.zeros(min(k, len(widths)), dtype=torch.int32),
                      meta={"loss": LONGEST_FLOAT, "factor": factor})

    # -- server → client ------------------------------------------------------
    def configure(self, rnd: int, client_id: int, state: ServerState) -> Task:
        # The full global A and B (rank r_G) go to every client (docs/ALGORITHM.md §2.7).
        return self.make_task(rnd, client_id, state, ["A", "B"] + self.head_groups(),
                              factor=self.active_factor(rnd))

    # -- client ---------------------------------------------------------------
    def client_update(self, ctx: ClientContext, task: Task) -> Update:
        layout = self.layout
        assert layout is not None
        factor, frozen_factor = task.config["factor"], "A" if task.config["factor"] == "B" else "B"
        active = layout.names(factor)
        head = layout.names("head")
        ctx.runtime.load(task.download)
        glob = {n: task.download[n].clone() for n in active + head}
        groups = [ParamGroup(active, self.lr_of(factor))]
        if head:
            groups.append(ParamGroup(head, self.lr_of("head")))
        gen = torch.Generator().manual_seed(task.config["seed"])
        torch.manual_seed(task.config["seed"])
        st = self.options
        frozen = [task.download[n] for n in layout.names(frozen_factor)]
        k = task.config["budget"] * layout.num_modules
        epochs_left = self.cfg.train.local_epochs
        # a kept probe optimiser: the training after a reused probe continues its moments
        kept = ctx.trainer(groups) if st.probe_optimizer == "kept" else None
        loss = float("nan")

        # (a)–(c): score the slots and pick one global top-(r_k · N) — or reuse the client's
        # last selection for this factor (strategy.options.reselect_every)
        selected = self.stored_selection(ctx, task)
        if selected is None:
            if st.probe == "gradient":  # no training: the mean gradient at the global state
                grads = ctx.gradients(active, gen, st.probe_batches)
                scores = slot_scores(factor, [grads[n] for n in active], frozen,
                                     kind=st.slot_score)
            else:  # "full" (the paper) or "reuse": train every slot of the factor first
                probe_steps = None
                if st.probe_fraction < 1.0:
                    probe_steps = max(1, math.ceil(st.probe_fraction * st.probe_epochs
                                                   * ctx.steps_per_epoch()))
                epochs = st.probe_epochs if st.probe == "full" else 1
                loss = ctx.train(groups, epochs, gen, max_steps=probe_steps, trainer=kept)
                probe = ctx.runtime.snapshot(active)
                scores = slot_scores(factor, [probe[n] - glob[n] for n in active], frozen,
                                     kind=st.slot_score)
            selected = self.select(scores, k, task)
            self.remember_selection(ctx, task, selected)
            if st.probe == "reuse":  # the probe was the first epoch of training
                epochs_left -= 1

        # (d) unselected slots back to the global state (a "full" probe: every slot);
        # (e) masked training of the selected slots for the epochs left
        masks = {n: factor_mask(factor, selected[m]) for m, n in enumerate(active)}
        if st.probe == "reuse" and epochs_left < self.cfg.train.local_epochs:
            now = ctx.runtime.snapshot(active)
            ctx.runtime.load({n: torch.where(masks[n], now[n], glob[n]) for n in active})
            # the head trained in the probe epoch too: it keeps that progress
        else:
            ctx.runtime.load(glob)
            kept = None  # a fresh optimiser for training from the global state
        if epochs_left > 0:
            loss = ctx.train(groups, epochs_left, gen, masks=masks, trainer=kept)

        final = ctx.runtime.snapshot(active + head)
        values = gather_slots(factor, [final[n] - glob[n] for n in active], selected)
        if head:
            values = torch.cat([values, flatten({n: final[n] - glob[n] for n in head}, head)])
        return Update(task.client_id, ctx.num_examples, values, slot_ids(selected),
                      meta={"loss": loss, "factor": factor})

    def select(self, scores: torch.Tensor, k: int, task: Task) -> torch.Tensor:
        """The client's top-k slots: the installed :attr:`slot_selector` (the DP wrapper's
        ε-DP selection under ``privacy.selection = "private"``), else the plain top-k that
        never takes a slot with score 0 (it would get no gradient)."""
        if self.slot_selector is not None:
            return self.slot_selector(scores, k, task)
        return select_top_k(scores, k, positive_only=True)

    def stored_selection(self, ctx: ClientContext, task: Task) -> torch.Tensor | None:
        """The client's last selection for this round's factor when ``strategy.options.reselect_every``
        says it is not time to re-score: factor-phases j = (phase(t) − 1) // 2 re-score when
        j % reselect_every == 0 (and whenever the client has none)."""
        every = self.options.reselect_every
        j = (self.phase(task.round) - 1) // 2
        key = f"selection.{task.config['factor']}"
        if every <= 1 or j % every == 0 or key not in ctx.store:
            return None
        return ctx.store[key].bool()

    def client_state(self) -> str:
        return ("their last slot selection per factor (strategy.options.reselect_every > 1)"
                if self.options.reselect_every > 1 else "")

    def remember_selection(self, ctx: ClientContext, task: Task, selected: torch.Tensor) -> None:
        if self.options.reselect_every > 1:
            ctx.store[f"selection.{task.config['factor']}"] = selected.to(torch.uint8)

    # -- server ---------------------------------------------------------------
    def _split(self, task: Task, update: Update):
        """Dense per-module deltas (zero at unselected slots), the selection, the head delta."""
        layout = self.layout
        assert layout is not None and update.slots is not None
        factor = task.config["factor"]
        selected = selection_from_ids(update.slots, layout.num_modules, layout.rank)
        n_slot_values = sum(slot_size(factor, m.d_in, m.d_out) * int(selected[i].sum())
                            for i, m in enumerate(layout.modules))
        names = layout.names(factor)
        dense = scatter_slots(factor, update.values[:n_slot_values], selected, layout.shapes(names))
        head = unflatten(update.values[n_slot_values:], layout.names("head"),
                         layout.shapes(layout.names("head")))
        return dense, selected, head

    def validate(self, task: Task, update: Update) -> None:
        layout = self.layout
        assert layout is not None
        if update.meta.get("factor") != task.config["factor"]:
            raise InvalidPayload(f"upload is for factor {update.meta.get('factor')!r}, "
                                 f"round trains {task.config['factor']!r}")
        slots = update.slots
        if slots is None:
            raise InvalidPayload("LoRA-A2 upload carries no slot indices")
        total = layout.num_modules * layout.rank
        if slots.numel() and (int(slots.min()) < 0 or int(slots.max()) >= total):
            raise InvalidPayload(f"slot index out of range [0, {total})")
        if torch.unique(slots).numel() != slots.numel():
            raise InvalidPayload("duplicate slot indices")
        if slots.numel() > 1 and not bool((slots[1:] > slots[:-1]).all()):
            # the values follow the ids in ascending order (the wire format): out of order,
            # they would be scattered into the wrong slots without any other check failing
            raise InvalidPayload("slot indices are not in ascending order")
        allowed = task.config["budget"] * layout.num_modules
        if slots.numel() > allowed:
            raise InvalidPayload(f"{slots.numel()} slots exceed the budget of {allowed}")
        factor = task.config["factor"]
        per_module = [slot_size(factor, m.d_in, m.d_out) for m in layout.modules]
        expected = sum(per_module[int(s) // layout.rank] for s in slots) + layout.size(
            self.head_groups())
        if update.values.numel() != expected:
            raise InvalidPayload(f"expected {expected} values for {slots.numel()} slots, "
                                 f"got {update.values.numel()}")
        check_finite(update)

    def secure_vector(self, task: Task, update: Update) -> torch.Tensor:
        """The sparse upload scattered into the dense active factor (zeros at unselected
        slots), then the head delta: what SecAgg+ sums. It gives up the sparsity."""
        dense, _, head = self._split(task, update)
        parts = [d.reshape(-1) for d in dense] + [head[n].reshape(-1) for n in head]
        return torch.cat(parts) if parts else torch.zeros(0)

    def aggregate_secure(self, rnd: int, state: ServerState, mean: torch.Tensor
                         ) -> tuple[ServerState, dict[str, Any]]:
        layout = self.layout
        assert layout is not None
        names = layout.names(self.active_factor(rnd)) + layout.names("head")
        delta = unflatten(mean.to(torch.float32), names, layout.shapes(names))
        tensors = dict(state.tensors)
        for n in names:
            tensors[n] = state.tensors[n] + delta[n]
        return ServerState(tensors, state.extra), {}

    def aggregate(self, rnd: int, state: ServerState, replies: list[tuple[Task, Update]],
                  weights: Sequence[float] | None = None) -> tuple[ServerState, dict[str, Any]]:
        layout = self.layout
        assert layout is not None
        factor = replies[0][0].config["factor"]
        weights = self.round_weights(replies, weights)
        parts = [self._split(t, u) for t, u in replies]
        summed = aggregate_slots(factor, [p[0] for p in parts], [p[1] for p in parts], weights,
                                 renormalize=self.options.renormalize)
        tensors = dict(state.tensors)
        for n, d in zip(layout.names(factor), summed):
            tensors[n] = state.tensors[n] + d
        for n in layout.names("head"):
            tensors[n] = state.tensors[n] + weighted_sum([p[2][n] for p in parts], weights)
        return ServerState(tensors, state.extra), {"rank_allocation": rank_allocation(
            layout, [p[1] for p in parts])}


def rank_allocation(layout, selections: list[torch.Tensor]) -> dict[str, int]:
    """Slots selected this round, summed over clients, per module type (e.g. ``query``)."""
    counts: Counter[str] = Counter()
    for sel in selections:
        for m, row in zip(layout.modules, sel):
            kind = module_kind(m.name)
            counts[kind] += int(row.sum())
    return dict(sorted(counts.items()))


def module_kind(name: str) -> str:
    """The part of a module name after its layer number: ``attention.self.query``."""
    parts = name.split(".")
    last_digit = max((i for i, p in enumerate(parts) if p.isdigit()), default=-1)
    return ".".join(parts[last_digit + 1:])
