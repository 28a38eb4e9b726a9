"""RoLoRA (Chen, Guo, Ju, Dalal, Zhu, Khisti — "Robust Federated Finetuning of LLMs via
Alternating Optimization of LoRA", NeurIPS 2025, arXiv 2502.01755).

LoRA-A2's alternating freeze without its rank selection: what the selection itself adds is
LoRA-A2 minus RoLoRA at the same rank. Rules (paper; its code ships as the OpenReview
supplement, FederatedScope-based: ``llm/trainer/trainer.py`` sets ``train_b = round % 2 == 0``,
the adapter's ``state_dict`` returns only trainable parameters, ``ClientsAvgAggregator``
averages them):

- every client holds one LoRA of rank r = ``strategy.rank_budget`` (a single integer);
- odd rounds t = 1, 3, … train B with A frozen, even rounds train A with B frozen (B first:
  while B = 0, A gets no gradient) — odd and even *phases* of ``train.phase_every`` rounds
  when that is > 1 (async mode, docs/FLEETS.md);
- a client uploads the change of the trained factor only (r·d_out or r·d_in values per module,
  + the head delta when the head trains) and downloads both factors (the frozen one changed in
  the previous round);
- the server adds the data-weighted mean change, F ← F + Σ_k w_k ΔF_k. Exact: the other factor
  is the same on every client, so Σ_k w_k B_k A = (Σ_k w_k B_k) A (and likewise for A);
- one learning rate for A and B (the paper's ablation found balanced rates best).
"""

from __future__ import annotations

from ..messages import ServerState
from .dense import DenseStrategy
from .registry import register
from .fl_lora import uniform_rank


@register
class RoLora(DenseStrategy):
    """Alternate B (odd rounds) and A (even) at one rank; average the trained factor."""

    name = "rolora"
    single_rank = True
    central_dp = True
    supports_async = True
    alternating = True

    def lora_rank(self) -> int:
        return uniform_rank(self)

    def active_factor(self, rnd: int) -> str:
        return "B" if self.phase(rnd) % 2 == 1 else "A"

    def train_groups(self, rnd: int) -> list[str]:
        return [self.active_factor(rnd)] + self.head_groups()

    def send_groups(self, rnd: int, client_id: int, state: ServerState) -> list[str]:
        return ["A", "B"] + self.head_groups()
