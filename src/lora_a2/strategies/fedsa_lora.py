"""FedSA-LoRA (Guo, Zeng, Wang, Fan, Wang, Qu — "Selective Aggregation for Low-Rank Adaptation
in Federated Learning", ICLR 2025, arXiv 2410.01463; official code
github.com/Pengxin-Guo/FedSA-LoRA, FederatedScope-based: ``glue/yamls/fedsa-lora.yaml`` sets
``personalization.local_param: ['lora_B', 'classifier']``, ``core/trainers/trainer.py``
``_param_filter`` keeps those out of uploads and downloads).

The paper's finding: the A factors of different clients learn general knowledge and agree, the
B factors learn each client's own data. So A is shared and averaged, B stays on its client.
Rules:

- every client holds one LoRA of rank r = ``strategy.rank_budget`` and trains A and B (one
  learning rate) from the global A and **its own** B, kept on the client between its rounds
  (``ClientContext.store``; B = 0, as PEFT initialises it, before its first round);
- it uploads ΔA only (r · d_in values per module); the server sets A ← A + Σ_k w_k ΔA_k
  (w_k = n_k / Σ n_j; the official code weights by samples processed per round, equal there);
- a trained classifier head is personal too (the official ``local_param`` lists it): sent
  once, on a client's first contact, and never uploaded;
- there is no single global model (the server never sees a B). Each round every client
  evaluates its own model — the global A with its own B — on the shared test set and on its own
  split; ``accuracy`` is the mean over clients of the first, ``local_accuracy`` lists the
  second (the paper reports the mean of the clients' own-test accuracies). Those evaluate
  messages (the global A down, a few numbers up) are counted as ``eval_*_bytes``, apart from the
  training traffic. What the server's state alone gives (A with B = 0: the base model) is
  ``shared_model_accuracy``.

One difference from the official code, on purpose: it shares one model object between clients
(``share_local_model: True``), so there "local" B is handed from one client to the next within a
round; here each client keeps its own, as the paper describes.

DP: ``local`` and ``central`` both apply to the upload (ΔA, averaged linearly). The clients'
B never leave them; they are not covered by (and need no) noise. Classification only: the
per-client evaluation of a causal LM (generation per client) is not built.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..client import ParamGroup
from ..payload import flatten
from .base import (ClientContext, ServerState, Strategy, Task, Update, check_finite, register)
from ..aggregation import data_weights, weighted_sum
from ..payload import InvalidPayload, unflatten
from .fl_lora import uniform_rank


@register
class FedSaLora(Strategy):
    """Share and average A; every client keeps its own B (personalised, never uploaded)."""

    name = "fedsa-lora"
    central_dp = True
    personalized = True
    tasks = ("classification",)

    def lora_rank(self) -> int:
        return uniform_rank(self)

    def noise_groups(self, rnd: int) -> list[str]:
        return ["A"]  # all the server releases (B and the head stay on the clients)

    def personal_names(self) -> list[str]:
        assert self.layout is not None
        return self.layout.names("B") + self.layout.names("head")

    # -- server → client ------------------------------------------------------------------
    def configure(self, rnd: int, client_id: int, state: ServerState) -> Task:
        # The head (when trained) is personal: a client gets its starting value once.
        seen = state.extra.setdefault("has_head", [])
        head = self.head_groups() if client_id not in seen else []
        if head:
            seen.append(client_id)
        return self.make_task(rnd, client_id, state, ["A"] + head)

    def eval_task(self, rnd: int, client_id: int, state: ServerState) -> Task:
        seen = state.extra.get("has_head", [])
        head = self.head_groups() if client_id not in seen else []
        return self.make_task(rnd, client_id, state, ["A"] + head, evaluate=True)

    # -- client ---------------------------------------------------------------------------
    def personal_tensors(self, ctx: ClientContext) -> dict[str, Tensor]:
        """Its own B (zeros before its first round) and its head (once it has one)."""
        assert self.layout is not None
        out = {n: ctx.store[n] if n in ctx.store else torch.zeros(shape)
               for n, shape in zip(self.layout.names("B"),
                                   self.layout.shapes(self.layout.names("B")))}
        out.update({n: ctx.store[n] for n in self.layout.names("head") if n in ctx.store})
        return out

    def client_update(self, ctx: ClientContext, task: Task) -> Update:
        layout = self.layout
        assert layout is not None
        ctx.runtime.load(task.download)  # the global A (and the starting head, first time)
        ctx.runtime.load(self.personal_tensors(ctx))
        a_names, head = layout.names("A"), layout.names("head")
        before = ctx.runtime.snapshot(a_names)
        gen = torch.Generator().manual_seed(task.config["seed"])
        torch.manual_seed(task.config["seed"])
        groups = [ParamGroup(a_names, self.lr_of("A")),
                  ParamGroup(layout.names("B"), self.lr_of("B"))]
        if head:
            groups.append(ParamGroup(head, self.lr_of("head")))
        loss = ctx.train(groups, self.cfg.train.local_epochs, gen)
        ctx.store.update(ctx.runtime.snapshot(self.personal_names()))  # stays on the client
        after = ctx.runtime.snapshot(a_names)
        delta = {n: after[n] - before[n] for n in a_names}
        return Update(task.client_id, ctx.num_examples, flatten(delta, a_names),
                      meta={"loss": loss})

    # -- server ---------------------------------------------------------------------------
    def validate(self, task: Task, update: Update) -> None:
        assert self.layout is not None
        expected = self.layout.size(["A"])
        if update.slots is not None:
            raise InvalidPayload("dense upload must not carry slot indices")
        if update.values.numel() != expected:
            raise InvalidPayload(f"expected {expected} values (ΔA), got {update.values.numel()}")
        check_finite(update)

    def aggregate(self, rnd: int, state: ServerState,
                  replies: list[tuple[Task, Update]]) -> tuple[ServerState, dict[str, Any]]:
        layout = self.layout
        assert layout is not None
        names = layout.names("A")
        shapes = layout.shapes(names)
        w = data_weights([u.num_examples for _, u in replies])
        deltas = [unflatten(u.values, names, shapes) for _, u in replies]
        tensors = dict(state.tensors)
        for n in names:
            tensors[n] = state.tensors[n] + weighted_sum([d[n] for d in deltas], w)
        return ServerState(tensors, state.extra), {}
