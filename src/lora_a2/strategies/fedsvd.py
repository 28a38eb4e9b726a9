"""FedSVD (Lee, Park, Lee, Wagner, Seong, Bocklet, Lee, Hwang — "FedSVD: Adaptive
Orthogonalization for Private Federated Learning with LoRA", NeurIPS 2025, arXiv 2505.12805;
official code github.com/seanie12/fed-svd: ``misc/utils.py`` freezes lora_A,
``fedmm/fedavg/server.py`` averages, ``reinit_lora`` re-factorises).

FFA-LoRA's B-only training, but A is not fixed forever: after each round the server
re-orthonormalises it from the SVD of the global product. Rules:

- every client trains only B (A frozen) at rank r = ``strategy.rank_budget`` from the global
  A and B, and uploads ΔB_k (+ the head delta);
- the server averages, B ← B + Σ_k w_k ΔB_k (exact: A is the same on every client), then
  re-factorises the product: with B A = U Σ Vᵀ (rank ≤ r, so exactly), A ← Vᵀ[:r] (orthonormal
  rows) and B ← U[:, :r] Σ[:r] (:func:`~lora_a2.lowrank.orthonormal_refactor`). The model
  B A is unchanged by this step; only how it is split changes, so the next round's B-only
  training moves along the product's own principal input directions;
- round 1 trains B on the adapter's random initial A (as PEFT's default init does);
- clients download A and B every round (A changes each round: r · d_in more values per module
  than FFA-LoRA's B-only download).

DP: ``local`` and ``central`` both work. The B average is linear in the uploads, and the
re-factorisation reads only the (noised) aggregate, never an upload, so it is post-processing
(:meth:`~lora_a2.strategies.base.Strategy.finalize`) and costs no privacy. A stays orthonormal,
so noise added to B is not amplified through A — the paper's point. (The paper privatises by
DP-SGD on the client; ``local`` mode here noises each client's clipped upload instead.)
"""

from __future__ import annotations

from typing import Any

from ..adapter import ParamLayout
from ..errors import UserError
from ..lowrank import orthonormal_refactor
from ..messages import ServerState
from .dense import DenseStrategy
from .registry import register
from .fl_lora import uniform_rank


@register
class FedSvd(DenseStrategy):
    """Train and average B only; the server re-splits B A by SVD (A orthonormal) each round."""

    name = "fedsvd"
    single_rank = True
    central_dp = True

    def lora_rank(self) -> int:
        return uniform_rank(self)

    def bind(self, layout: ParamLayout) -> None:
        # A' = Vᵀ[:r] has r orthonormal rows of length d_in, and B' = U[:, :r] Σ[:r]: neither
        # exists for a rank above a module's smaller side
        small = min(layout.modules, key=lambda m: min(m.d_in, m.d_out))
        if layout.rank > min(small.d_in, small.d_out):
            raise UserError(f"config key 'strategy.rank_budget': fedsvd's orthonormal A needs a "
                            f"rank ≤ every target module's smaller side ({small.name}: "
                            f"{small.d_out} × {small.d_in}), got {layout.rank}")
        super().bind(layout)

    def active_factor(self, rnd: int) -> str:
        return "B"

    def train_groups(self, rnd: int) -> list[str]:
        return ["B"] + self.head_groups()

    def send_groups(self, rnd: int, client_id: int, state: ServerState) -> list[str]:
        return ["A", "B"] + self.head_groups()

    def finalize(self, rnd: int, state: ServerState, info: dict[str, Any]
                 ) -> tuple[ServerState, dict[str, Any]]:
        layout = self.layout
        assert layout is not None
        tensors = dict(state.tensors)
        for m in layout.modules:
            a, b = f"{m.name}.A", f"{m.name}.B"
            tensors[b], tensors[a] = orthonormal_refactor(state.tensors[b], state.tensors[a])
        return ServerState(tensors, state.extra), info
