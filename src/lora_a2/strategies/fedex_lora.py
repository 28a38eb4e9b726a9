"""FedEx-LoRA (Singhal, Ponkshe, Vepakomma — "FedEx-LoRA: Exact Aggregation for Federated and
Efficient Fine-Tuning of Foundation Models", arXiv 2410.09432; official code
github.com/RaghavSinghal10/fedex-lora, ``fed_agg.py: aggregate_models_ours``).

FL+LoRA (FedIT) plus the exact residual folded into the frozen base. Rules:

- every client trains A and B at rank r = ``strategy.rank_budget`` from the global Ā, B̄ (and the
  current base), with one learning rate, and uploads ΔA_k, ΔB_k (+ the head delta);
- the server averages each factor, Ā ← Σ_k w_k A_k, B̄ ← Σ_k w_k B_k, and per module adds
  s · (Σ_k w_k B_k A_k − B̄Ā) to the base weight (s = α / r, the adapter's scaling;
  :func:`~lora_a2.lowrank.exact_residual`), so base + s·B̄Ā = previous base + s·Σ_k w_k B_k A_k
  exactly — the aggregate every client's product implies, at rank r for the adapter;
- A and B are not reset: the next round continues from Ā, B̄ on the new base.

Weights: the official code averages uniformly (its clients hold equal IID shares); here
w_k = n_k / Σ n_j as in every other strategy of this package (the FedSVD authors'
reimplementation of FedEx-LoRA, seanie12/fed-svd ``_agg_fedex``, does the same); with equal
shares the two agree.

What travels: up, ΔA and ΔB (as FL+LoRA). Down, Ā, B̄, the head, and — from round 2 on — the
cumulative residual of every module (``merged.<module>``, d_out · d_in values each: dense, and
counted). A client that kept its base between rounds would need only the last round's residual;
a client that keeps nothing (as here) needs the cumulative one, which is what is sent.

DP: ``local`` (each upload clipped and noised before it leaves the client; the residual is then
post-processing). ``central`` is refused: the residual is a product of two uploads, so one
client's influence on it is not bounded by clipping its upload, and noise on the sum would not
cover it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..lowrank import exact_residual
from ..payload import unflatten
from ..messages import ServerState, Task, Update
from .context import ClientContext
from .dense import DenseStrategy
from .registry import register
from .fl_lora import uniform_rank


@register
class FedExLora(DenseStrategy):
    """FL+LoRA plus the exact residual Σ w_k B_k A_k − B̄Ā merged into the base each round."""

    name = "fedex-lora"
    single_rank = True
    secure_aggregation = False  # the residual needs each client's B_k A_k, not just a sum
    dp_refusals = {"central": "its residual Σ w_k B_k A_k − B̄Ā is a product of uploads, so "
                              "clipping an upload does not bound a client's influence on it"}

    def lora_rank(self) -> int:
        return uniform_rank(self)

    def scaling(self) -> float:
        return self.cfg.model.lora_alpha / self.lora_rank()

    def train_groups(self, rnd: int) -> list[str]:
        return ["A", "B"] + self.head_groups()

    def init_state(self, initial: dict[str, Tensor]) -> ServerState:
        state = super().init_state(initial)
        assert self.layout is not None
        for m in self.layout.modules:
            state.tensors[f"merged.{m.name}"] = torch.zeros(m.d_out, m.d_in)
        return state

    def send_groups(self, rnd: int, client_id: int, state: ServerState) -> list[str]:
        merged = ["merged"] if state.extra.get("merges", 0) > 0 else []
        return ["A", "B"] + merged + self.head_groups()

    def client_update(self, ctx: ClientContext, task: Task) -> Update:
        ctx.runtime.set_weight_delta(None)  # round 1 sends no residual: train on W0
        return super().client_update(ctx, task)

    def aggregate(self, rnd: int, state: ServerState, replies: list[tuple[Task, Update]],
                  weights: Sequence[float] | None = None) -> tuple[ServerState, dict[str, Any]]:
        layout = self.layout
        assert layout is not None
        new, info = super().aggregate(rnd, state, replies, weights)  # Ā, B̄ and the head: mean deltas
        names = layout.group_names(replies[0][0].config["train"])
        shapes = layout.shapes(names)
        w = self.round_weights(replies, weights)
        deltas = [unflatten(u.values, names, shapes) for _, u in replies]
        s = self.scaling()
        tensors = dict(new.tensors)
        norms = []
        for m in layout.modules:
            a, b = f"{m.name}.A", f"{m.name}.B"
            res = exact_residual([state.tensors[b] + d[b] for d in deltas],
                                 [state.tensors[a] + d[a] for d in deltas], w)
            key = f"merged.{m.name}"
            tensors[key] = (state.tensors[key].to(torch.float64)
                            + s * res.to(torch.float64)).to(state.tensors[key].dtype)
            norms.append(float(res.to(torch.float64).norm()) * s)
        extra = {**state.extra, "merges": int(state.extra.get("merges", 0)) + 1}
        return ServerState(tensors, extra), {**info, "residual_norm": float(
            torch.tensor(norms, dtype=torch.float64).norm())}
