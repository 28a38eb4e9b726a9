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
                max_steps: int | None = None,
                optimizer_holder: dict[str, Any] | None = None) -> float:
    """Train the named parameters for ``epochs`` passes over ``indices``; return the mean loss.

    ``masks[name]`` is a boolean tensor broadcastable to the parameter: True where the entry may
    change. Masked entries keep exactly the value they had when this call started.
    A fresh AdamW each call: optimiser state never leaks between clients or rounds.
    ``regularizer()``, when given, is added to each step's loss (HetLoRA's self-pruning term);
    the returned mean loss is the task's loss alone. ``max_steps`` stops after that many
    optimiser steps (LoRA-A2's shortened probe); the epochs' shuffles are drawn as usual.
    ``optimizer_holder``: a dict that keeps the AdamW between calls of one client's round (its
    ``"optimizer"`` entry is reused when present, stored when not) — LoRA-A2's reused probe
    continues with the probe's moments; never shared between clients.
    """
    model = runtime.model
    params = {n: runtime.params[n] for g in groups for n in g.names}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    opt = (optimizer_holder or {}).get("optimizer")
    if opt is None:
        opt = torch.optim.AdamW(
            [{"params": [params[n] for n in g.names], "lr": g.lr} for g in groups if g.names],
            weight_decay=weight_decay)
        if optimizer_holder is not None:
            optimizer_holder["optimizer"] = opt
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
        loss = runtime.task.loss(model, batch_of(data, order[start:start + batch_size],
                                                 runtime.device))
        loss.backward()
        done += 1
    grads = {n: (p.grad.detach().to("cpu", copy=True) / max(done, 1)) if p.grad is not None
             else torch.zeros(p.shape) for n, p in params.items()}
    for p in params.values():
        p.grad = None
        p.requires_grad_(False)
    model.eval()
    return grads
