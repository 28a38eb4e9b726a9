"""What a client has locally while it runs a strategy's client side: the shared model, its
data, its own store, and the seed of its round."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ..adapter import ModelRuntime
from ..client import (EncodedData, LocalTrainer, ParamGroup, accumulate_gradients,
                      train_local)
from ..config import Config


@dataclass
class ClientContext:
    """Everything a client needs locally: the shared model, its data, and training options."""

    runtime: ModelRuntime
    data: EncodedData
    indices: np.ndarray
    cfg: Config
    #: what this client keeps between its rounds (a personalised method's own factors); the
    #: engine persists it on the client's side (local: in memory and in the checkpoint;
    #: Flower: the node's ``Context.state``) and never sends it to the server
    store: dict[str, Tensor] = field(default_factory=dict)
    #: the shared test set and this client's held-out examples (indices into ``data``; empty
    #: unless ``data.local_test_fraction`` > 0), for a client that evaluates its own model
    test_data: EncodedData | None = None
    local_test: np.ndarray | None = None

    @property
    def num_examples(self) -> int:
        return int(len(self.indices))

    def train(self, groups: list[ParamGroup], epochs: int, generator: torch.Generator,
              masks: dict[str, Tensor] | None = None,
              regularizer: Callable[[], Tensor] | None = None,
              max_steps: int | None = None, trainer: LocalTrainer | None = None) -> float:
        """Local training on this client's examples (:meth:`LocalTrainer.run`): with a fresh
        optimiser, or continuing ``trainer``'s (from :meth:`trainer`)."""
        t = self.cfg.train
        if trainer is None:
            return train_local(self.runtime, self.data, self.indices, groups, epochs,
                               t.batch_size, self.cfg.strategy.weight_decay, generator, masks,
                               t.max_grad_norm, regularizer, max_steps)
        return trainer.run(self.data, self.indices, epochs, t.batch_size, generator, masks,
                           regularizer, max_steps)

    def trainer(self, groups: list[ParamGroup]) -> LocalTrainer:
        """An optimiser over ``groups`` that a strategy keeps across its :meth:`train` calls
        of one round."""
        return LocalTrainer(self.runtime, groups, self.cfg.strategy.weight_decay,
                            self.cfg.train.max_grad_norm)

    def gradients(self, names: list[str], generator: torch.Generator,
                  batches: int) -> dict[str, Tensor]:
        """Mean gradient over ``batches`` of this client's batches at the current state."""
        return accumulate_gradients(self.runtime, self.data, self.indices, names,
                                    self.cfg.train.batch_size, generator, batches)

    def steps_per_epoch(self) -> int:
        """Optimiser steps in one local epoch (batches of ``train.batch_size``)."""
        return -(-len(self.indices) // self.cfg.train.batch_size)


def client_seed(seed: int, rnd: int, client_id: int) -> int:
    """A seed per (run, round, client): results do not depend on the order clients run in."""
    digest = hashlib.sha256(f"{seed}/{rnd}/{client_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little")
