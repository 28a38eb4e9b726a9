"""Shared machinery of the heterogeneous-rank baselines (FlexLoRA, HetLoRA, FLoRA).

One model per process holds one adapter of rank r_max = max_k r_k (``lora_rank``). A client of
rank r_k uses only the first r_k slots: the other rows of A and columns of B are zero and masked
in :func:`~lora_a2.client.train_local`, so they stay exactly zero and the model computes exactly
what a rank-r_k LoRA computes. Downloads carry only the first r_k slots (``Task.config["rank"]``,
zero-padded on arrival); uploads carry the client's final A_k[:r_k] and B_k[:, :r_k] (all
modules' A, then all modules' B, layout order) followed by the head delta when the head trains.

LoRA scaling: PEFT scales the whole adapter by α / r_max. A method whose clients need another
scaling s_k (FlexLoRA: α / r_k; FLoRA: 2) sets it on the model for the client's local training
(:meth:`~lora_a2.adapter.ModelRuntime.set_lora_scaling`) and restores it afterwards, so both the
effective ΔW = s_k B_k A_k and AdamW's dynamics are those of a rank-r_k LoRA with scaling s_k.
(Folding s_k / s_max into B would give the right ΔW but rescale B's effective step size.)
Every global state is kept so that loading it at the default scaling evaluates the global model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..aggregation import weighted_sum
from ..client import ParamGroup
from .. import privacy as dp
from ..payload import LONGEST_FLOAT, InvalidPayload, flatten, unflatten
from ..messages import ServerState, Task, Update, truncate_factor
from .base import Strategy
from .context import ClientContext
from .dense import check_finite


class HeteroRankStrategy(Strategy):
    """Base of the methods whose clients train A and B at their own rank r_k."""

    #: the global state carries ``merged.<module>`` dense deltas (FlexLoRA's W_g, FLoRA's merge)
    uses_merged = False
    budget_sized_upload = True  # A_k[:r_k] and B_k[:, :r_k]
    #: the float scalars an upload's header carries beside its rank (sizes :meth:`largest_update`)
    upload_scalars: tuple[str, ...] = ("loss",)

    def lora_rank(self) -> int:
        return max(self.budgets)

    def noise_groups(self, rnd: int) -> list[str]:
        # a merging method releases the dense merged delta; the others their A and B
        return (["merged"] if self.uses_merged else ["A", "B"]) + self.head_groups()

    def init_state(self, initial: dict[str, Tensor]) -> ServerState:
        state = super().init_state(initial)
        if self.uses_merged:
            assert self.layout is not None
            for m in self.layout.modules:
                state.tensors[f"merged.{m.name}"] = torch.zeros(m.d_out, m.d_in)
        return state

    # -- helpers --------------------------------------------------------------------------
    def factor_names(self) -> list[str]:
        assert self.layout is not None
        return self.layout.names("A") + self.layout.names("B")

    def largest_update(self, rnd: int, client_id: int, num_examples: int,
                       budget: int) -> Update:
        """A_k and B_k at rank ``budget`` (plus a trained head): :meth:`upload_size` values."""
        meta: dict[str, Any] = {"rank": budget, **{k: LONGEST_FLOAT for k in self.upload_scalars}}
        return Update(client_id, num_examples, torch.zeros(self.upload_size(budget)), meta=meta)

    def upload_size(self, rank: int) -> int:
        assert self.layout is not None
        return rank * sum(m.d_in + m.d_out for m in self.layout.modules) + self.layout.size(
            self.head_groups())

    def rank_masks(self, rank: int) -> dict[str, Tensor]:
        """True on the first ``rank`` slots of every A (rows) and B (columns)."""
        assert self.layout is not None
        keep = torch.arange(self.layout.rank) < rank
        masks = {n: keep.reshape(-1, 1) for n in self.layout.names("A")}
        masks.update({n: keep.reshape(1, -1) for n in self.layout.names("B")})
        return masks

    def scaling_for(self, rank: int) -> float | None:
        """LoRA scaling a client of ``rank`` trains with (None: the adapter's α / r_max)."""
        return None

    # -- client side ----------------------------------------------------------------------
    def train_client(self, ctx: ClientContext, task: Task, *, fresh: bool = False,
                     regularizer_for=None) -> tuple[dict[str, Tensor], dict[str, Tensor], float]:
        """Load the task, train the first r slots of A and B (and the head), return
        (final A and B, padded to r_max; head delta; mean loss).

        ``fresh``: start from a new LoRA (A ~ N(0, σ²) on the first r rows from the task's seed,
        B = 0) instead of the downloaded factors (FLoRA). ``regularizer_for(params)`` may return
        an extra loss term (HetLoRA's self-pruning).
        """
        layout, rt = self.layout, ctx.runtime
        assert layout is not None
        rank = int(task.config["rank"])
        rt.set_weight_delta(None)  # a "merged.*" download below sets it again
        rt.load(task.download)
        gen = torch.Generator().manual_seed(task.config["seed"])
        torch.manual_seed(task.config["seed"])
        if fresh:
            rt.load(self.fresh_factors(rank, gen))
        head = layout.names("head")
        head_before = rt.snapshot(head)
        groups = [ParamGroup(layout.names("A"), self.lr_of("A")),
                  ParamGroup(layout.names("B"), self.lr_of("B"))]
        if head:
            groups.append(ParamGroup(head, self.lr_of("head")))
        reg = regularizer_for({n: rt.params[n] for n in self.factor_names()}, rank) \
            if regularizer_for is not None else None
        rt.set_lora_scaling(self.scaling_for(rank))
        try:
            loss = ctx.train(groups, self.cfg.train.local_epochs, gen, masks=self.rank_masks(rank),
                             regularizer=reg)
        finally:
            rt.set_lora_scaling(None)
        final = rt.snapshot(self.factor_names() + head)
        head_delta = {n: final[n] - head_before[n] for n in head}
        return {n: final[n] for n in self.factor_names()}, head_delta, loss

    def fresh_factors(self, rank: int, gen: torch.Generator) -> dict[str, Tensor]:
        """A new LoRA at ``rank``: A ~ N(0, σ²) (σ as the runtime's init), B = 0, padded."""
        layout = self.layout
        assert layout is not None
        out: dict[str, Tensor] = {}
        for m in layout.modules:
            std = self.cfg.model.init_std or 1.0 / math.sqrt(3.0 * m.d_in)
            a = torch.zeros(layout.rank, m.d_in)
            a[:rank] = torch.randn(rank, m.d_in, generator=gen) * std
            out[f"{m.name}.A"] = a
            out[f"{m.name}.B"] = torch.zeros(m.d_out, layout.rank)
        return out

    def make_upload(self, ctx: ClientContext, task: Task, factors: dict[str, Tensor],
                    head_delta: dict[str, Tensor], rank: int, **meta: Any) -> Update:
        names = self.factor_names()
        values = flatten({n: truncate_factor(n, factors[n], rank) for n in names}, names)
        head = list(head_delta)
        if head:
            values = torch.cat([values, flatten(head_delta, head)])
        return Update(task.client_id, ctx.num_examples, values, meta={"rank": rank, **meta})

    def reference_factors(self, task: Task) -> dict[str, Tensor]:
        """The factors the client starts training from (default: the download, padded)."""
        return task.download

    def upload_reference(self, task: Task, update: Update) -> Tensor:
        """DP: the upload had the client not trained — its starting factors at the upload's
        rank, and a zero head delta. Clipping bounds the change the client made."""
        assert self.layout is not None
        rank = update.meta.get("rank", task.config["rank"])
        start, names = self.reference_factors(task), self.factor_names()
        values = flatten({n: truncate_factor(n, start[n], int(rank)) for n in names}, names)
        return torch.cat([values, torch.zeros(self.layout.size(self.head_groups()))])

    # -- central DP for product-merging methods (FlexLoRA, FLoRA) ---------------------------
    #: the server's aggregate is linear in the clients' products P_k = s_k B_k A_k (+ head delta)
    merges_products = False

    def dp_clip(self, task: Task, update: Update, bound: float, mechanism: str,
                central: bool) -> Update:
        """Central DP for FlexLoRA / FLoRA: bound what the aggregate actually sums.

        Their merged delta Σ_k p_k s_k B_k A_k is linear in the products P_k, not in the uploaded
        factors, so the clip bounds ‖(P_k per module, head delta)‖ ≤ C (L2; L1 for Laplace) by
        scaling B_k and the head delta by C / ‖·‖ — then removing one client moves the aggregate
        by at most w_k·C (w_k its fixed-denominator weight), which is what the central noise
        and the accountant assume. Local mode keeps the factor-change clip of :class:`Strategy`
        (it protects the upload itself).
        """
        if not central or not self.merges_products:
            return super().dp_clip(task, update, bound, mechanism, central)
        a_list, b_list, head, rank = self.split(task, update)
        s = self.scaling_for(rank) or self.cfg.model.lora_alpha / self.layout.rank
        parts = [(s * (b.double() @ a.double())).reshape(-1) for a, b in zip(a_list, b_list)]
        parts += [h.double().reshape(-1) for h in head.values()]
        norm = dp.norm_of(torch.cat(parts), mechanism) if parts else 0.0
        values = update.values.clone()
        if norm > bound:
            factor = bound / norm * (1 - 1e-6)
            n_a = sum(a.numel() for a in a_list)
            values[n_a:] = (values[n_a:].double() * factor).to(values.dtype)  # B's and the head
        return Update(update.client_id, update.num_examples, values, update.slots,
                      dict(update.meta))

    # -- server side ----------------------------------------------------------------------
    def upload_rank(self, task: Task, update: Update) -> int:
        """The rank the upload is at (default: the task's)."""
        return int(task.config["rank"])

    def validate(self, task: Task, update: Update) -> None:
        if update.slots is not None:
            raise InvalidPayload("dense upload must not carry slot indices")
        if update.meta.get("rank") != self.upload_rank(task, update):
            raise InvalidPayload(f"upload is at rank {update.meta.get('rank')!r}, "
                                 f"expected {self.upload_rank(task, update)}")
        expected = self.upload_size(self.upload_rank(task, update))
        if update.values.numel() != expected:
            raise InvalidPayload(f"expected {expected} values, got {update.values.numel()}")
        check_finite(update)

    def split(self, task: Task, update: Update) -> tuple[list[Tensor], list[Tensor],
                                                         dict[str, Tensor], int]:
        """(A_k per module (r × d_in), B_k per module (d_out × r), head delta, r)."""
        layout = self.layout
        assert layout is not None
        rank = self.upload_rank(task, update)
        a_names, b_names = layout.names("A"), layout.names("B")
        shapes = [(rank, m.d_in) for m in layout.modules] + [(m.d_out, rank) for m in layout.modules]
        n_factor = sum(math.prod(s) for s in shapes)
        fac = unflatten(update.values[:n_factor], a_names + b_names, shapes)
        head_names = layout.names("head")
        head = unflatten(update.values[n_factor:], head_names, layout.shapes(head_names))
        return [fac[n] for n in a_names], [fac[n] for n in b_names], head, rank

    def unpack_replies(self, state: ServerState, replies: list[tuple[Task, Update]],
                       weights: Sequence[float] | None = None):
        """(per-reply (A's, B's, head delta, rank), weights p_k (:meth:`round_weights`), a
        copy of the state's tensors to write the new global into) — the common start of every
        aggregate here."""
        assert self.layout is not None
        parts = [self.split(t, u) for t, u in replies]
        return parts, self.round_weights(replies, weights), dict(state.tensors)

    def aggregate_head(self, state: ServerState, tensors: dict[str, Tensor],
                       heads: list[dict[str, Tensor]], w: Sequence[float]) -> None:
        """head += Σ_k p_k Δhead_k (the round's weights ``w``), in ``tensors``."""
        assert self.layout is not None
        for n in self.layout.names("head"):
            tensors[n] = state.tensors[n] + weighted_sum([h[n] for h in heads], w)
