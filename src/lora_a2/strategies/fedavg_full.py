"""FedAvg of the full model (no LoRA): the reference for "% of upload saved"."""

from __future__ import annotations

from .dense import DenseStrategy
from .registry import register


@register
class FedAvgFull(DenseStrategy):
    """Every client trains all weights (lr ``strategy.full_lr``) and uploads their full delta."""

    name = "fedavg-full"
    central_dp = True
    full_model = True

    def lora_rank(self) -> None:
        return None

    def train_groups(self, rnd: int) -> list[str]:
        return ["full"]
