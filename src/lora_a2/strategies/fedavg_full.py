"""FedAvg of the full model (no LoRA): the reference for "% of upload saved"."""

from __future__ import annotations

from torch import nn

from ..adapter import ParamLayout
from .dense import DenseStrategy
from .registry import register


@register
class FedAvgFull(DenseStrategy):
    """Every client trains all weights (lr ``strategy.full_lr``) and uploads their full delta."""

    name = "fedavg-full"
    central_dp = True
    full_model = True

    @classmethod
    def reference_upload_values(cls, model: nn.Module, layout: ParamLayout, budget: int) -> int:
        """Every weight of the model (whatever the budget)."""
        return sum(p.numel() for n, p in model.named_parameters()
                   if "lora_" not in n and "modules_to_save" not in n)

    def lora_rank(self) -> None:
        return None

    def train_groups(self, rnd: int) -> list[str]:
        return ["full"]
