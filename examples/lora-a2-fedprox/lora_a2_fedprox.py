"""FedProx on LoRA, packaged as a lora-a2 strategy plugin.

FedProx (Li, Sahu, Zaheer, Sanjabi, Talwalkar, Smith: "Federated Optimization in Heterogeneous
Networks", MLSys 2020, arXiv 1812.06127; official code github.com/litian96/FedProx) adds a
proximal term to each client's local objective,

    h_k(w; w^t) = F_k(w) + (μ / 2) · ‖w − w^t‖²,        (the paper's Eq. 2)

which keeps local models near the global one under heterogeneous data; the server averages as
FedAvg does (data-weighted). Applied to LoRA as OpenFedLLM's FedProx baseline does: w is the
trainable adapter (both factors, and a trained head), w^t the downloaded global adapter. μ is
``strategy.options.mu`` (default 0.01, OpenFedLLM's); μ = 0 is exactly ``fl-lora``.

Install next to lora-a2 (``pip install -e examples/lora-a2-fedprox``) and it appears in
``lora-a2 strategies`` as ``fedprox-lora``; run it with ``--set strategy.name=fedprox-lora
--set strategy.options.mu=0.01``. Nothing in lora-a2 is edited: this file is the whole method.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from lora_a2.strategies import ClientContext, DenseStrategy, Task
from lora_a2.strategies.fl_lora import uniform_rank
from lora_a2.strategies.options import StrategyOptions


@dataclass
class FedProxOptions(StrategyOptions):
    """FedProx's one knob (``strategy.options.mu``)."""

    mu: float = 0.01
    """Weight μ of the proximal term (μ/2)‖θ − θ_global‖² (OpenFedLLM's default); 0 = FedIT."""

    def check(self) -> None:
        self.require(self.mu >= 0, "mu", "must be ≥ 0")


class FedProxLora(DenseStrategy):
    """FedProx: FedIT's A and B with the proximal term (μ/2)‖θ − θ_global‖² in the local loss."""

    name = "fedprox-lora"
    Options = FedProxOptions
    central_dp = True  # the server's rule is FedAvg's weighted mean: linear in the uploads

    def __init__(self, cfg) -> None:
        super().__init__(cfg)
        self.mu = self.options.mu

    def lora_rank(self) -> int:
        return uniform_rank(self)

    def train_groups(self, rnd: int) -> list[str]:
        return ["A", "B"] + self.head_groups()

    def local_regularizer(self, ctx: ClientContext, task: Task,
                          start: dict[str, Tensor]) -> Callable[[], Tensor] | None:
        if self.mu == 0:
            return None
        params = {n: ctx.runtime.params[n] for n in start}
        anchor = {n: t.to(params[n].device) for n, t in start.items()}

        def proximal() -> Tensor:
            return 0.5 * self.mu * sum(torch.sum((params[n] - anchor[n]) ** 2) for n in params)

        return proximal
