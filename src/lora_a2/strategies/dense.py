"""The dense default: a method whose clients upload full deltas of fixed parameter groups
(FedAvg-style); most baselines are a few lines on top of it."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from ..aggregation import weighted_sum
from ..client import ParamGroup
from ..messages import ServerState, Task, Update
from ..payload import InvalidPayload, flatten, unflatten
from .base import Strategy
from .context import ClientContext


def check_finite(update: Update) -> None:
    if not torch.isfinite(update.values).all():
        raise InvalidPayload("upload contains NaN or Inf values")


class DenseStrategy(Strategy):
    """A method whose clients upload full deltas of fixed parameter groups (FedAvg-style).

    Subclasses say which groups are sent, trained and uploaded; the server adds the
    data-weighted mean delta, Σ_k w_k Δ_k, to each uploaded parameter.
    """

    def send_groups(self, rnd: int, client_id: int, state: ServerState) -> list[str]:
        """Groups downloaded by a client (default: exactly the trained ones)."""
        return self.train_groups(rnd)

    @abstractmethod
    def train_groups(self, rnd: int) -> list[str]:
        """Parameter groups trained in round ``rnd`` (and uploaded, unless
        :meth:`upload_groups` says otherwise)."""

    def upload_groups(self, rnd: int) -> list[str]:
        """Parameter groups whose delta is uploaded and averaged in round ``rnd`` (default: the
        trained ones; a personalised method keeps some trained groups on the client)."""
        return self.train_groups(rnd)

    def local_regularizer(self, ctx: ClientContext, task: Task,
                          start: dict[str, Tensor]) -> Callable[[], Tensor] | None:
        """A term added to every local step's loss (None: plain local training). ``start``
        holds the trained parameters' values at the start of local training (CPU copies)."""
        return None

    secure_aggregation = True

    def noise_groups(self, rnd: int) -> list[str]:
        return self.upload_groups(rnd)

    def secure_vector(self, task: Task, update: Update) -> Tensor:
        return update.values  # already the dense delta of the trained groups

    def aggregate_secure(self, rnd: int, state: ServerState, mean: Tensor
                         ) -> tuple[ServerState, dict[str, Any]]:
        assert self.layout is not None
        names = self.layout.group_names(self.upload_groups(rnd))
        delta = unflatten(mean.to(torch.float32), names, self.layout.shapes(names))
        tensors = dict(state.tensors)
        for n in names:
            tensors[n] = state.tensors[n] + delta[n]
        return ServerState(tensors, state.extra), {}

    def configure(self, rnd: int, client_id: int, state: ServerState) -> Task:
        train, upload = self.train_groups(rnd), self.upload_groups(rnd)
        return self.make_task(rnd, client_id, state, self.send_groups(rnd, client_id, state),
                              train=train, **({"upload": upload} if upload != train else {}))

    def trained(self, task: Task) -> list[str]:
        """The groups ``task`` trains: its ``train`` entry, else the strategy's rule."""
        return task.config.get("train", self.train_groups(task.round))

    def uploaded(self, task: Task) -> list[str]:
        """The groups whose delta ``task`` uploads: its ``upload`` entry, else what it trains
        when it says that, else the strategy's rule (a task need not carry the lists: both
        sides run the same strategy)."""
        if "upload" in task.config:
            return task.config["upload"]
        return task.config["train"] if "train" in task.config else self.upload_groups(task.round)

    def update_target(self, task: Task) -> tuple[str, ...]:
        """The groups the task's upload changes."""
        return tuple(self.uploaded(task))

    def client_update(self, ctx: ClientContext, task: Task) -> Update:
        assert self.layout is not None
        ctx.runtime.load(task.download)
        names = self.layout.group_names(self.trained(task))
        up = self.layout.group_names(self.uploaded(task))
        before = ctx.runtime.snapshot(names)
        gen = torch.Generator().manual_seed(task.config["seed"])
        torch.manual_seed(task.config["seed"])
        groups = [ParamGroup(self.layout.names(g), self.lr_of(g)) for g in self.trained(task)]
        loss = ctx.train(groups, self.cfg.train.local_epochs, gen,
                         regularizer=self.local_regularizer(ctx, task, before))
        after = ctx.runtime.snapshot(up)
        delta = {n: after[n] - before[n] for n in up}
        return Update(task.client_id, ctx.num_examples, flatten(delta, up), meta={"loss": loss})

    def validate(self, task: Task, update: Update) -> None:
        assert self.layout is not None
        expected = self.layout.size(self.uploaded(task))
        if update.slots is not None:
            raise InvalidPayload("dense upload must not carry slot indices")
        if update.values.numel() != expected:
            raise InvalidPayload(f"expected {expected} values, got {update.values.numel()}")
        check_finite(update)

    def aggregate(self, rnd: int, state: ServerState, replies: list[tuple[Task, Update]],
                  weights: Sequence[float] | None = None) -> tuple[ServerState, dict[str, Any]]:
        assert self.layout is not None
        names = self.layout.group_names(self.uploaded(replies[0][0]))
        shapes = self.layout.shapes(names)
        weights = self.round_weights(replies, weights)
        deltas = [unflatten(u.values, names, shapes) for _, u in replies]
        tensors = dict(state.tensors)
        for n in names:
            tensors[n] = state.tensors[n] + weighted_sum([d[n] for d in deltas], weights)
        return ServerState(tensors, state.extra), {}
