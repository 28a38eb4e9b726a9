"""FL+LoRA (FedIT): every client trains A and B; the server averages each factor separately.

The average of products is not the product of averages — mean(B)·mean(A) ≠ mean(B·A) — which is
the *discordance* LoRA-A2 removes. Kept exactly as the baseline does it.
"""

from __future__ import annotations

from torch import nn

from ..adapter import ParamLayout
from ..errors import UserError
from .dense import DenseStrategy
from .registry import register


def uniform_rank(strategy: DenseStrategy) -> int:
    """The single LoRA rank of a homogeneous-rank baseline: ``strategy.rank_budget``."""
    budgets = set(strategy.budgets)
    if len(budgets) != 1:
        raise UserError(f"strategy '{strategy.name}' trains one rank on every client; "
                        f"strategy.rank_budget must be a single integer, got {strategy.budgets}")
    return budgets.pop()


@register
class FlLora(DenseStrategy):
    """FedIT: upload ΔA and ΔB at rank ``rank_budget``; A ← A + Σ w_k ΔA_k, B ← B + Σ w_k ΔB_k."""

    name = "fl-lora"
    single_rank = True
    central_dp = True
    supports_async = True

    @classmethod
    def reference_upload_values(cls, model: nn.Module, layout: ParamLayout, budget: int) -> int:
        """ΔA and ΔB at rank ``budget``: r_k · Σ_m (d_in + d_out), plus a trained head."""
        head = layout.size(["head"]) if layout.head else 0
        return budget * sum(m.d_in + m.d_out for m in layout.modules) + head

    def lora_rank(self) -> int:
        return uniform_rank(self)

    def train_groups(self, rnd: int) -> list[str]:
        return ["A", "B"] + self.head_groups()
