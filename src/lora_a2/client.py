"""Client-side local training and evaluation on the shared model.

The loss comes from the run's task (:meth:`lora_a2.tasks.LearningTask.loss`); nothing here knows
whether the model classifies or generates.

Masked training (DESIGN §2 step 4e): only selected slots may change. Gradients of unselected
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
    # Trim padding shared by the whole batch: same result, less compute on short texts.
    length = max(int(mask.sum(dim=1).max()), 1)
    labels = data.labels[idx]
    if labels.dim() == 2:
        labels = labels[:, :length]
    return (data.input_ids[idx, :length].to(device), mask[:, :length].to(device),
            labels.to(device))


@dataclass
class ParamGroup:
    """Federated parameters trained together at one learning rate."""

    names: list[str]
    lr: float


def train_local(runtime: ModelRuntime, data: EncodedData, indices: np.ndarray,
                groups: list[ParamGroup], epochs: int, batch_size: int, weight_decay: float,
                generator: torch.Generator, masks: dict[str, Tensor] | None = None,
                max_grad_norm: float = 0.0,
                regularizer: Callable[[], Tensor] | None = None,
                max_steps: int | None = None) -> float:
    """Train the named parameters for ``epochs`` passes over ``indices``; return the mean loss.

    ``masks[name]`` is a boolean tensor broadcastable to the parameter: True where the entry may
    change. Masked entries keep exactly the value they had when this call started.
    A fresh AdamW each call: optimiser state never leaks between clients or rounds.
    ``regularizer()``, when given, is added to each step's loss (HetLoRA's self-pruning term);
    the returned mean loss is the task's loss alone. ``max_steps`` stops after that many
    optimiser steps (LoRA-A2's shortened probe); the epochs' shuffles are drawn as usual.
    """
    model = runtime.model
    params = {n: runtime.params[n] for g in groups for n in g.names}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    opt = torch.optim.AdamW(
        [{"params": [params[n] for n in g.names], "lr": g.lr} for g in groups if g.names],
        weight_decay=weight_decay)
    masks = masks or {}
    frozen = {n: (m.to(params[n].device), params[n].detach().clone()) for n, m in masks.items()}
    idx_all = torch.as_tensor(np.asarray(indices), dtype=torch.long)
    model.train()
    losses: list[float] = []
    for _ in range(epochs):
        order = idx_all[torch.randperm(len(idx_all), generator=generator)]
        for start in range(0, len(order), batch_size):
            if max_steps is not None and len(losses) >= max_steps:
                break
            loss = runtime.task.loss(model, batch_of(data, order[start:start + batch_size],
                                                     runtime.device))
            opt.zero_grad(set_to_none=True)
            (loss + regularizer() if regularizer is not None else loss).backward()
            for n, (mask, _) in frozen.items():
                if params[n].grad is not None:
                    params[n].grad.mul_(mask)
            if max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(list(params.values()), max_grad_norm)
            opt.step()
            with torch.no_grad():
                for n, (mask, ref) in frozen.items():
                    params[n].copy_(torch.where(mask, params[n], ref))
            losses.append(float(loss.detach()))
    for p in params.values():
        p.requires_grad_(False)
    model.eval()
    return float(np.mean(losses)) if losses else float("nan")
