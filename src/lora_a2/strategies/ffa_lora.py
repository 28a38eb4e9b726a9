"""FFA-LoRA (Sun et al., ICLR 2024): A random and frozen forever; only B trains and travels.

Aggregation is exact (Σ_k w_k B_k A = (Σ_k w_k B_k) A) but only half the adapter learns.
"""

from __future__ import annotations

from ..messages import ServerState
from .dense import DenseStrategy
from .registry import register
from .fl_lora import uniform_rank


@register
class FfaLora(DenseStrategy):
    """Train and upload B only. A is sent once, on a client's first participation."""

    name = "ffa-lora"
    single_rank = True
    central_dp = True
    supports_async = True

    def lora_rank(self) -> int:
        return uniform_rank(self)

    def train_groups(self, rnd: int) -> list[str]:
        return ["B"] + self.head_groups()

    def active_factor(self, rnd: int) -> str:
        return "B"

    def send_groups(self, rnd: int, client_id: int, state: ServerState) -> list[str]:
        # A never changes, so a client that already holds it is not sent it again.
        seen = state.extra.setdefault("has_A", [])
        if client_id in seen:
            return self.train_groups(rnd)
        seen.append(client_id)
        return ["A"] + self.train_groups(rnd)
