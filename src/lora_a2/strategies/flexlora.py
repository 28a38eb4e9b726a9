"""FlexLoRA (Bai et al., NeurIPS 2024): full-delta aggregation, truncated SVD back to each rank.

Rules as in the official code (docs/ALGORITHM.md §3.4); α = ``model.lora_alpha``, s_k = α / r_k:
- client k trains A_k and B_k (both factors) at its own rank r_k with scaling s_k, and uploads
  its final A_k (r_k × d_in) and B_k (d_out × r_k) for every module (+ the head delta);
- the server forms, per module, W_g = Σ_k p_k · s_k · B_k A_k (p_k = n_k / Σ n_j over the round's
  clients). W_g *replaces* the previous global delta; the base is never merged;
- download to a client of rank r: with W_g = U Σ Vᵀ, B = U[:, :r] Σ[:r] / s_r and A = Vᵀ[:r]
  (all singular values go to B, A has orthonormal rows), so s_r · B A is the best rank-r
  approximation of W_g (Eckart–Young). Only the r slots travel (r·(d_in + d_out) per module).
- the SVD never crashes a run: W_g is scaled to max |entry| 1 and decomposed in float64, with
  two fallbacks (:func:`~lora_a2.lowrank.truncated_svd`); each fallback is logged and counted in
  the round's ``svd_fallbacks``. W_g = 0 (round 1) or non-finite: the client gets the initial A
  (first r rows) and B = 0, i.e. a fresh standard LoRA.
- evaluation: the global model is W0 + W_g exactly (the state's ``merged.<module>`` entries);
  the global A and B stay at their initial values with B = 0, so they add nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from ..lowrank import SvdResult, pad_rank, truncated_svd, weighted_product_sum
from ..messages import ServerState, Task, Update
from .context import ClientContext
from .registry import register
from .hetero import HeteroRankStrategy


@register
class FlexLora(HeteroRankStrategy):
    """Train A, B at rank r_k; server sums Σ p_k s_k B_k A_k and sends its rank-r_k SVD."""

    name = "flexlora"
    central_dp = True
    uses_merged = True
    merges_products = True

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        # (the first module's W_g tensor object, results): recomputed when the state changes
        self._svd: tuple[Tensor, dict[str, SvdResult]] | None = None

    def scaling_for(self, rank: int) -> float:
        return self.cfg.model.lora_alpha / rank

    def _decompose(self, state: ServerState) -> dict[str, SvdResult]:
        """Rank-r_max SVD of every module's W_g (cached: a rank-r truncation is its prefix)."""
        assert self.layout is not None
        key = state.tensors[f"merged.{self.layout.modules[0].name}"]
        if self._svd is None or self._svd[0] is not key:
            self._svd = (key, {m.name: truncated_svd(state.tensors[f"merged.{m.name}"],
                                                     self.layout.rank)
                               for m in self.layout.modules})
        return self._svd[1]

    def configure(self, rnd: int, client_id: int, state: ServerState) -> Task:
        layout = self.layout
        assert layout is not None
        rank = self.budgets[client_id]
        s = self.scaling_for(rank)
        download: dict[str, Tensor] = {}
        for m in layout.modules:
            res = self._decompose(state)[m.name]
            a_name, b_name = f"{m.name}.A", f"{m.name}.B"
            if res.status in ("zero", "nonfinite"):
                download[a_name] = pad_rank(state.tensors[a_name][:rank], layout.rank, 0)
                download[b_name] = state.tensors[b_name].new_zeros(m.d_out, layout.rank)
            else:
                download[b_name] = pad_rank(res.left[:, :rank] / s, layout.rank, 1)
                download[a_name] = pad_rank(res.right[:rank], layout.rank, 0)
        for n in layout.names("head"):
            download[n] = state.tensors[n]
        send = ["A", "B"] + self.head_groups()
        return Task(rnd, client_id, {**self.base_config(rnd, client_id, send), "rank": rank},
                    download)

    def client_update(self, ctx: ClientContext, task: Task) -> Update:
        factors, head, loss = self.train_client(ctx, task)
        return self.make_upload(ctx, task, factors, head, int(task.config["rank"]), loss=loss)

    def aggregate(self, rnd: int, state: ServerState, replies: list[tuple[Task, Update]],
                  weights: Sequence[float] | None = None) -> tuple[ServerState, dict[str, Any]]:
        layout = self.layout
        assert layout is not None
        parts, p, tensors = self.unpack_replies(state, replies, weights)
        scalings = [self.scaling_for(r) for *_, r in parts]
        for i, m in enumerate(layout.modules):
            tensors[f"merged.{m.name}"] = weighted_product_sum(
                [pt[1][i] for pt in parts], [pt[0][i] for pt in parts], p, scalings)
        self.aggregate_head(state, tensors, [pt[2] for pt in parts], p)
        new = ServerState(tensors, state.extra)
        statuses = [r.status for r in self._decompose(new).values()]
        return new, {"svd_fallbacks": sum(s in ("fallback", "nonfinite") for s in statuses)}
