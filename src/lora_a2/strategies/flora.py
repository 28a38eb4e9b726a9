"""FLoRA (Wang et al., NeurIPS 2024): stack the clients' adapters, merge into the base, restart.

Rules as in the official code (docs/ALGORITHM.md §3.6):
- every round each client starts a *fresh* LoRA at its rank r_k (A ~ N(0, σ²) from its own
  seed, σ as the runtime's init; B = 0) on top of the current merged base, trains A and B with
  scaling s = 2 (α_k = 2 r_k, so every client's s_k = α_k / r_k = 2), and uploads its final
  A_k, B_k (+ the head delta);
- the server stacks A = [p_1 A_1; …; p_K A_K] and B = [B_1 … B_K] (p_k = n_k / Σ n_j), so
  B A = Σ_k p_k B_k A_k exactly at rank Σ_k r_k (:func:`~lora_a2.lowrank.stack_lora`), and
  merges W0 ← W0 + s · B A into every target module. The cumulative merge lives in the state as
  ``merged.<module>`` (d_out × d_in), so evaluation and export see base + merged; the global
  A/B stay at their initial values with B = 0 and add nothing.

What the download carries (counted in bytes): from round 2 on, the cumulative merged delta
ΔW_m of every module (d_out · d_in values each) plus the head when it trains — what a client
that keeps no state between rounds needs to rebuild base + merged. A client that kept its own
merged base and took part in every round would need only the previous round's stacked factors
(Σ_k r_k · (d_in + d_out) per module); this implementation sends the dense delta, which the
issue allows ("the stacked adapter (or the merged delta)"), and is therefore an upper bound on
FLoRA's download. Round 1 downloads nothing but the head (the merge is still zero). No A or B
is downloaded: the fresh LoRA is drawn on the client.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..config import Config, ModelConfig
from ..errors import UserError
from ..lowrank import stack_lora
from ..messages import ServerState, Task, Update
from .context import ClientContext
from .options import StrategyOptions
from .registry import register
from .hetero import HeteroRankStrategy

#: LoRA scaling of every FLoRA client and of the stacked adapter (α_k = 2 r_k).
FLORA_SCALING = 2.0


@register
class Flora(HeteroRankStrategy):
    """Fresh rank-r_k LoRA each round; server stacks them exactly and merges into the base."""

    name = "flora"
    central_dp = True
    uses_merged = True
    merges_products = True
    public_info_keys = ("stacked_rank",)  # Σ of the replying clients' (public) ranks

    @classmethod
    def check(cls, cfg: Config, options: StrategyOptions) -> None:
        """FLoRA fixes its scaling (α_k = 2 r_k): a ``model.lora_alpha`` other than the default
        would be silently ignored."""
        default = ModelConfig().lora_alpha
        if cfg.model.lora_alpha != default:
            raise UserError(f"config key 'model.lora_alpha' is not used by strategy 'flora', "
                            f"which trains at its paper's fixed scaling 2 (α_k = 2 r_k); leave "
                            f"it at {default:g}, got {cfg.model.lora_alpha:g}")

    def scaling_for(self, rank: int) -> float:
        return FLORA_SCALING

    def configure(self, rnd: int, client_id: int, state: ServerState) -> Task:
        send = (["merged"] if state.extra.get("merges", 0) > 0 else []) + self.head_groups()
        return self.make_task(rnd, client_id, state, send, rank=self.budgets[client_id])

    def client_update(self, ctx: ClientContext, task: Task) -> Update:
        factors, head, loss = self.train_client(ctx, task, fresh=True)
        return self.make_upload(ctx, task, factors, head, int(task.config["rank"]), loss=loss)

    def reference_factors(self, task: Task) -> dict[str, torch.Tensor]:
        # The fresh LoRA drawn first from the task seed's generator (see ``train_client``).
        return self.fresh_factors(int(task.config["rank"]),
                                  torch.Generator().manual_seed(task.config["seed"]))

    def aggregate(self, rnd: int, state: ServerState, replies: list[tuple[Task, Update]],
                  weights: Sequence[float] | None = None) -> tuple[ServerState, dict[str, Any]]:
        layout = self.layout
        assert layout is not None
        parts, p, tensors = self.unpack_replies(state, replies, weights)
        for i, m in enumerate(layout.modules):
            B, A = stack_lora([pt[1][i] for pt in parts], [pt[0][i] for pt in parts], p)
            name = f"merged.{m.name}"
            merged = state.tensors[name].to(torch.float64) + FLORA_SCALING * (
                B.to(torch.float64) @ A.to(torch.float64))
            tensors[name] = merged.to(state.tensors[name].dtype)
        self.aggregate_head(state, tensors, [pt[2] for pt in parts], p)
        extra = {**state.extra, "merges": int(state.extra.get("merges", 0)) + 1}
        return ServerState(tensors, extra), {"stacked_rank": sum(pt[3] for pt in parts)}
