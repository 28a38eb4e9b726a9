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
  with every task until the client's first accepted reply (so a client that dropped out gets
  it again), never uploaded;
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

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..messages import ServerState, Task, Update
from .context import ClientContext
from .dense import DenseStrategy
from .registry import register
from .fl_lora import uniform_rank


@register
class FedSaLora(DenseStrategy):
    """Share and average A; every client keeps its own B (personalised, never uploaded)."""

    name = "fedsa-lora"
    single_rank = True
    central_dp = True
    personalized = True
    tasks = ("classification",)
    secure_aggregation = False  # its evaluate phase and node stores are untested under SecAgg+

    def lora_rank(self) -> int:
        return uniform_rank(self)

    def train_groups(self, rnd: int) -> list[str]:
        return ["A", "B"] + self.head_groups()

    def upload_groups(self, rnd: int) -> list[str]:
        return ["A"]  # all the server averages and releases (B and the head stay on clients)

    def configure(self, rnd: int, client_id: int, state: ServerState) -> Task:
        # The head (when trained) is personal: a client gets its starting value until the
        # server knows it arrived — its first accepted reply (:meth:`aggregate`), not when the
        # task is built (a client that drops out never got it). The task carries no group
        # lists: the client knows the rule (train A, B, head; upload A).
        return self.make_task(rnd, client_id, state, ["A"] + self._head_for(client_id, state))

    def _head_for(self, client_id: int, state: ServerState) -> list[str]:
        return self.head_groups() if client_id not in state.extra.get("has_head", []) else []

    def aggregate(self, rnd: int, state: ServerState, replies: list[tuple[Task, Update]],
                  weights: Sequence[float] | None = None) -> tuple[ServerState, dict[str, Any]]:
        new, info = super().aggregate(rnd, state, replies, weights)
        if self.head_groups():  # a client that replied holds its own head from now on
            seen = set(state.extra.get("has_head", [])) | {u.client_id for _, u in replies}
            new = ServerState(new.tensors, {**new.extra, "has_head": sorted(seen)})
        return new, info

    def personal_names(self) -> list[str]:
        assert self.layout is not None
        return self.layout.names("B") + self.layout.names("head")

    def eval_task(self, rnd: int, client_id: int, state: ServerState) -> Task:
        return self.make_task(rnd, client_id, state, ["A"] + self._head_for(client_id, state),
                              evaluate=True)

    def client_state(self) -> str:
        return "their own B and classifier head"

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
        """Train A, its own B (and head) from the global A; upload ΔA; keep B (and head)."""
        # The client's own tensors win: a head the server sends again (it never saw this
        # client's reply) is ignored once the client has one; and a client must never train
        # on whatever head the shared runtime last held (another client's).
        assert self.layout is not None
        own = self.personal_tensors(ctx)
        head = self.layout.names("head")
        if head and not all(n in own or n in task.download for n in head):
            raise RuntimeError(f"client {task.client_id} has no classifier head: the server "
                               f"did not send one and it holds none")
        ctx.runtime.load(own)
        task = Task(task.round, task.client_id, task.config,
                    {n: t for n, t in task.download.items() if n not in own})
        update = super().client_update(ctx, task)
        ctx.store.update(ctx.runtime.snapshot(self.personal_names()))  # stays on the client
        return update
