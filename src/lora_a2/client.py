"""Client-side local training and evaluation on the shared model.

The loss comes from the run's task (:meth:`lora_a2.tasks.LearningTask.loss`); nothing here knows
whether the model classifies or generates.

Masked training (docs/ALGORITHM.md §2.4.5): only selected slots change. Gradients of unselected
entries are zeroed before each optimiser step, and after each step every unselected entry is
written back from the global value, so AdamW's weight decay and momentum cannot move it: the
entry stays bit-identical to the global state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .adapter import ModelRuntime


@dataclass
class EncodedData:
    """A tokenised dataset (tokenised once per process, reused by every client and round).

    ``labels`` is (n,) class ids for classification, or (n, L) target token ids with -100 where
    no loss is taken (prompt and padding) for causal LMs. Padding is on the right. ``meta``
    holds whatever else the task keeps beside the tensors (e.g. generation prompts).
    """

    input_ids: Tensor  # (n, L) int64
    attention_mask: Tensor  # (n, L) int64
    labels: Tensor  # (n,) or (n, L) int64
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def batch_of(data: EncodedData, idx: Tensor, device: torch.device):
    """``(input_ids, attention_mask, labels)`` of the examples ``idx`` on ``device``."""
    mask = data.attention_mask[idx]
    # Trim the padding columns the whole batch shares, on either side (data pad on the right;
    # a left-padded EncodedData built elsewhere keeps its tokens too): same result, less compute
    cols = torch.nonzero(mask.any(dim=0)).flatten()
    lo, hi = (int(cols[0]), int(cols[-1]) + 1) if len(cols) else (0, 1)
    labels = data.labels[idx]
    if labels.dim() == 2:
        labels = labels[:, lo:hi]
    return (data.input_ids[idx, lo:hi].to(device), mask[:, lo:hi].to(device),
            labels.to(device))


@dataclass
class ParamGroup:
    """Federated parameters trained together at one learning rate."""

    names: list[str]
    lr: float


class LocalTrainer:
    """One client's local optimiser over some parameter groups: an AdamW built once (per-group
    learning rates), kept across :meth:`run` calls of this trainer only — optimiser state never
    leaks between clients or rounds, since every trainer is new.

    A strategy that trains twice in one round and wants the second pass to continue the
    first's moments (LoRA-A2's kept probe optimiser) calls :meth:`run` twice on one trainer;
    anything else uses :func:`train_local`, a fresh trainer per call.
    """

    def __init__(self, runtime: ModelRuntime, groups: list[ParamGroup], weight_decay: float,
                 max_grad_norm: float = 0.0) -> None:
        self.runtime = runtime
        self.params = {n: runtime.params[n] for g in groups for n in g.names}
        self.max_grad_norm = max_grad_norm
        self.opt = torch.optim.AdamW(
            [{"params": [self.params[n] for n in g.names], "lr": g.lr} for g in groups
             if g.names], weight_decay=weight_decay)

    def run(self, data: EncodedData, indices: np.ndarray, epochs: int, batch_size: int,
            generator: torch.Generator, masks: dict[str, Tensor] | None = None,
            regularizer: Callable[[], Tensor] | None = None,
            max_steps: int | None = None) -> float:
        """Train for ``epochs`` passes over ``indices``; return the mean loss.

        ``masks[name]`` is a boolean tensor broadcastable to the parameter: True where the entry
        may change. Masked entries keep exactly the value they had when this call started.
        ``regularizer()``, when given, is added to each step's loss (HetLoRA's self-pruning
        term); the returned mean loss is the task's loss alone. ``max_steps`` stops after that
        many optimiser steps (a shortened pass); the epochs' shuffles are drawn as usual.
        """
        runtime, params, opt = self.runtime, self.params, self.opt
        model = runtime.model
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params.values():
            p.requires_grad_(True)
        masks = masks or {}
        frozen = {n: (m.to(params[n].device), params[n].detach().clone())
                  for n, m in masks.items()}
        idx_all = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        model.train()
        losses: list[float] = []
        for _ in range(epochs):
            order = idx_all[torch.randperm(len(idx_all), generator=generator)]
            for start in range(0, len(order), batch_size):
                if max_steps is not None and len(losses) >= max_steps:
                    break
                with runtime.autocast():
                    loss = runtime.task.loss(model, batch_of(
                        data, order[start:start + batch_size], runtime.device))
                opt.zero_grad(set_to_none=True)
                with runtime.backward():
                    (loss + regularizer() if regularizer is not None else loss).backward()
                for n, (mask, _) in frozen.items():
                    if params[n].grad is not None:
                        params[n].grad.mul_(mask)
                if self.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(list(params.values()), self.max_grad_norm)
                opt.step()
                with torch.no_grad():
                    for n, (mask, ref) in frozen.items():
                        params[n].copy_(torch.where(mask, params[n], ref))
                losses.append(float(loss.detach()))
        for p in params.values():
            p.requires_grad_(False)
        model.eval()
        return float(np.mean(losses)) if losses else float("nan")


def train_local(runtime: ModelRuntime, data: EncodedData, indices: np.ndarray,
                groups: list[ParamGroup], epochs: int, batch_size: int, weight_decay: float,
                generator: torch.Generator, masks: dict[str, Tensor] | None = None,
                max_grad_norm: float = 0.0,
                regularizer: Callable[[], Tensor] | None = None,
                max_steps: int | None = None) -> float:
    """Train the named parameters with a fresh AdamW (a new :class:`LocalTrainer`); see
    :meth:`LocalTrainer.run` for the arguments. Returns the mean loss."""
    trainer = LocalTrainer(runtime, groups, weight_decay, max_grad_norm)
    return trainer.run(data, indices, epochs, batch_size, generator, masks, regularizer,
                       max_steps)


def accumulate_gradients(runtime: ModelRuntime, data: EncodedData, indices: np.ndarray,
                         names: list[str], batch_size: int, generator: torch.Generator,
                         batches: int) -> dict[str, Tensor]:
    """Mean gradient of the task loss w.r.t. the named parameters over the first ``batches``
    shuffled batches of ``indices``, at the model's current state; no optimiser step, nothing
    changes (LoRA-A2's gradient probe)."""
    model = runtime.model
    params = {n: runtime.params[n] for n in names}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
        p.grad = None
    idx_all = torch.as_tensor(np.asarray(indices), dtype=torch.long)
    order = idx_all[torch.randperm(len(idx_all), generator=generator)]
    model.train()
    done = 0
    for start in range(0, len(order), batch_size):
        if done >= batches:
            break
        with runtime.autocast():
            loss = runtime.task.loss(model, batch_of(data, order[start:start + batch_size],
                                                     runtime.device))
        with runtime.backward():
            loss.backward()
        done += 1
    grads = {n: (p.grad.detach().to("cpu", copy=True) / max(done, 1)) if p.grad is not None
             else torch.zeros(p.shape) for n, p in params.items()}
    for p in params.values():
        p.grad = None
        p.requires_grad_(False)
    model.eval()
    return grads
