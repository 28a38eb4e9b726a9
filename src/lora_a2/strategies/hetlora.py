"""HetLoRA (Cho et al., EMNLP 2024): zero-padding, norm-weighted factor averaging, self-pruning.

Rules (paper §3 / Fig. 2; docs/ALGORITHM.md §3.5):
- **download**: the global rank-r_max adapter truncated to the client's current rank r_k
  (only those r_k slots travel);
- **local training** of A and B at rank r_k with *rank self-pruning*: the loss gets
  λ · Σ_m ‖B_m[:, t:r_k] A_m[t:r_k, :]‖_F with t = max(1, ⌊γ r_k⌋) — the tail a prune would
  drop. After training the client computes the same tail norm T (no λ); if T fell below the T
  it reported in its previous round, it prunes: r_k ← t, and uploads only the first t slots.
  First participation, r_k = 1, or ⌊γ r_k⌋ = r_k: no prune. γ = ``strategy.options.prune_gamma``
  (0.99), λ = ``strategy.options.prune_lambda`` (1e-3). A pruned rank is permanent (the server sends
  the client r_k slots from then on). The tail [⌈γ r_k⌉:] would not do: with γ = 0.99 and
  r_k ≤ 16 that tail is empty and nothing could ever prune, so the tail here is exactly the
  slots the prune removes, [⌊γ r_k⌋:] (clamped to keep ≥ 1 slot).
  The client's rank and previous T are client state; this simulation keeps them on the server
  (``state.extra``) and sends them back in the task header (counted in the download bytes).
- **aggregation**: every client's A_k, B_k are zero-padded to r_max and averaged with weights
  S_k / Σ_j S_j, S_k = ‖B_k A_k‖_F (not data size). **S_k is per module**: the paper defines it
  for one LoRA module W0 + B_k A_k; per module, a client's weight in a module reflects how much
  it changed *that* module, and the biggest module does not decide every module's weights.
  If every S_k of a module is 0, data weights are used. The head (when trained) is averaged
  with data weights. ``strategy.options.hetlora_weights = "client"`` instead gives each client one
  weight for every module, S_k = Σ_m ‖B_km A_km‖_F (what one third-party reimplementation
  does; another weights per transformer layer), to check whether the choice matters.
- **scaling**: one α / r_max for every client. The global adapter is one rank-r_max LoRA and a
  client's model is exactly its first r_k components, so no rescaling is needed on either side.

Note: the pruning criterion is recalled from the paper (not re-read here:
the paper's text could not be retrieved offline). Two third-party reimplementations (not the
authors') use the regulariser Σ_m ‖A_m[t:]‖_F · ‖B_m[:, t:]‖_F with t = ⌊γ r⌋. With γ = 0.99
and r ≤ 100 the tail is one slot, a rank-1 product b aᵀ, and ‖b aᵀ‖_F = ‖b‖ ‖a‖: the same
value as the tail norm here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..lowrank import norm_weights, pad_and_average, product_norm, prune_decision, pruned_rank
from ..payload import InvalidPayload
from ..messages import ServerState, Task, Update, finite_number
from .context import ClientContext
from .registry import register
from .hetero import HeteroRankStrategy
from .options import StrategyOptions

NORM_WEIGHTS = ("module", "client")
"""Values of ``hetlora_weights``: where HetLoRA's sparsity weight S_k is computed."""


@dataclass
class HetLoraOptions(StrategyOptions):
    """HetLoRA's knobs (docs/ALGORITHM.md §3.5)."""

    prune_gamma: float = 0.99
    """Rank self-pruning decay γ (r_k ← max(1, ⌊γ r_k⌋)); 1 = never prune."""
    prune_lambda: float = 1e-3
    """Weight λ of the self-pruning regulariser on the rank tail."""
    hetlora_weights: str = "module"
    """"module" = S_k = ‖B_k A_k‖_F of each module weights that module (the paper's definition
    for one LoRA module); "client" = S_k = Σ_m ‖B_km A_km‖_F, one weight per client for every
    module (as one third-party reimplementation does)."""

    def check(self) -> None:
        self.require(0 < self.prune_gamma <= 1, "prune_gamma", "must be in (0, 1]")
        self.require(self.prune_lambda >= 0, "prune_lambda", "must be ≥ 0")
        self.require(self.hetlora_weights in NORM_WEIGHTS, "hetlora_weights",
                     f"must be one of {', '.join(NORM_WEIGHTS)}")


@register
class HetLora(HeteroRankStrategy):
    """Rank r_k with self-pruning; server zero-pads and averages with ‖B_k A_k‖ weights."""

    dp_local_clear = ("each client's kept rank and tail norm (its pruning decision, computed "
                      "from its unclipped factors) are sent in the clear, not covered by ε")

    name = "hetlora"
    upload_size_public = False  # self-pruning lowers the rank from the client's own losses
    upload_scalars = ("loss", "tail")
    Options = HetLoraOptions
    options: HetLoraOptions

    def current_rank(self, state: ServerState, client_id: int) -> int:
        return int(state.extra.get("ranks", {}).get(str(client_id), self.budgets[client_id]))

    def configure(self, rnd: int, client_id: int, state: ServerState) -> Task:
        # this round's budget (it only changes under strategy.rank_budget = "auto"), capped
        # by the rank the client pruned itself to, if it did: a round capped lower by its
        # budget does not lower the client's own rank, only its pruning does
        rank = min(self.current_rank(state, client_id), self.budgets[client_id])
        prev = state.extra.get("tails", {}).get(str(client_id))
        return self.make_task(rnd, client_id, state, ["A", "B"] + self.head_groups(),
                              rank=rank, prev_tail=prev)

    # -- client -----------------------------------------------------------------------
    def _tail_names(self):
        assert self.layout is not None
        return list(zip(self.layout.names("A"), self.layout.names("B")))

    def tail_norm(self, params: dict[str, Tensor], rank: int) -> float:
        """Σ_m ‖B_m[:, t:r] A_m[t:r, :]‖_F with t = pruned_rank(r, γ) (0 if nothing can go)."""
        t = pruned_rank(rank, self.options.prune_gamma)
        if t >= rank:
            return 0.0
        return float(sum(product_norm(params[b][:, t:rank].detach(), params[a][t:rank].detach())
                         for a, b in self._tail_names()))

    def regularizer_for(self, params: dict[str, Tensor], rank: int):
        lam, t = self.options.prune_lambda, pruned_rank(rank, self.options.prune_gamma)
        if lam <= 0 or t >= rank:
            return None
        pairs = [(params[a], params[b]) for a, b in self._tail_names()]

        def reg() -> Tensor:
            # sqrt(‖·‖² + ε): the norm's gradient is undefined at 0 (B starts at 0).
            return lam * sum(torch.sqrt(((b[:, t:rank] @ a[t:rank]) ** 2).sum() + 1e-12)
                             for a, b in pairs)

        return reg

    def client_update(self, ctx: ClientContext, task: Task) -> Update:
        rank = int(task.config["rank"])
        factors, head, loss = self.train_client(ctx, task, regularizer_for=self.regularizer_for)
        tail = self.tail_norm(factors, rank)
        new_rank = prune_decision(rank, self.options.prune_gamma, tail,
                                  task.config.get("prev_tail"))
        return self.make_upload(ctx, task, factors, head, new_rank, loss=loss, tail=tail)

    # -- server -----------------------------------------------------------------------
    def upload_rank(self, task: Task, update: Update) -> int:
        r = update.meta.get("rank")
        allowed = (int(task.config["rank"]),
                   pruned_rank(int(task.config["rank"]), self.options.prune_gamma))
        if not isinstance(r, int) or r not in allowed:
            raise InvalidPayload(f"upload rank {r!r} is neither the task's rank nor its pruned "
                                 f"rank {allowed}")
        return r

    def validate(self, task: Task, update: Update) -> None:
        tail = update.meta.get("tail")
        if not finite_number(tail) or tail < 0:
            raise InvalidPayload(f"upload's tail norm {tail!r} is not a finite number ≥ 0")
        super().validate(task, update)

    def aggregate(self, rnd: int, state: ServerState, replies: list[tuple[Task, Update]],
                  weights: Sequence[float] | None = None) -> tuple[ServerState, dict[str, Any]]:
        layout = self.layout
        assert layout is not None
        parts, p, tensors = self.unpack_replies(state, replies, weights)
        norms = [[product_norm(b, a) for a, b in zip(pt[0], pt[1])] for pt in parts]  # [k][m]
        per_client = (norm_weights([sum(n) for n in norms], fallback=p)
                      if self.options.hetlora_weights == "client" else None)
        for i, m in enumerate(layout.modules):
            As, Bs = [pt[0][i] for pt in parts], [pt[1][i] for pt in parts]
            w = per_client or norm_weights([n[i] for n in norms], fallback=p)
            tensors[f"{m.name}.A"] = pad_and_average(As, w, layout.rank, axis=0)
            tensors[f"{m.name}.B"] = pad_and_average(Bs, w, layout.rank, axis=1)
        self.aggregate_head(state, tensors, [pt[2] for pt in parts], p)
        extra = dict(state.extra)
        ranks, tails = dict(extra.get("ranks", {})), dict(extra.get("tails", {}))
        for (t, u), pt in zip(replies, parts):
            # the client's own rank (str keys: the extra state is saved as JSON) changes only
            # when it pruned: a round capped lower by its budget ("auto") does not lower it
            if pt[3] < int(t.config["rank"]):
                ranks[str(u.client_id)] = pt[3]
            tails[str(u.client_id)] = float(u.meta["tail"])
        extra.update(ranks=ranks, tails=tails)
        return ServerState(tensors, extra), {
            "client_ranks": {str(u.client_id): pt[3] for (_, u), pt in  # this round's
                             sorted(zip(replies, parts), key=lambda x: x[0][1].client_id)},
            "pruned": sum(pt[3] < int(t.config["rank"]) for (t, _), pt in zip(replies, parts))}
