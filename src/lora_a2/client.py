"""Client-side local training and evaluation on the shared model.

Masked training (DESIGN §2 step 4e): only selected slots may change. Gradients of unselected
entries are zeroed before each optimiser step, and after each step every unselected entry is
written back from the global value, so AdamW's weight decay and momentum cannot move it: the
entry stays bit-identical to the global state.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .adapter import ModelRuntime


@dataclass
class EncodedData:
    """A tokenised dataset (tokenised once per process, reused by every client and round)."""

    input_ids: Tensor  # (n, L) int64
    attention_mask: Tensor  # (n, L) int64
    labels: Tensor  # (n,) int64

    def __len__(self) -> int:
        return int(self.labels.numel())


def encode_texts(tokenizer, texts: list[str], labels: np.ndarray, max_length: int) -> EncodedData:
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt")
    return EncodedData(enc["input_ids"].long(), enc["attention_mask"].long(),
                       torch.as_tensor(np.asarray(labels), dtype=torch.long))


def _batch(data: EncodedData, idx: Tensor, device: torch.device):
    mask = data.attention_mask[idx]
    # Trim padding shared by the whole batch: same result, less compute on short texts.
    length = max(int(mask.sum(dim=1).max()), 1)
    return (data.input_ids[idx, :length].to(device), mask[:, :length].to(device),
            data.labels[idx].to(device))


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
    the returned mean loss is the cross-entropy alone. ``max_steps`` stops after that many
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
            ids, att, y = _batch(data, order[start:start + batch_size], runtime.device)
            logits = model(input_ids=ids, attention_mask=att).logits
            loss = F.cross_entropy(logits, y)
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


@torch.no_grad()
def evaluate(runtime: ModelRuntime, data: EncodedData, batch_size: int,
             indices: np.ndarray | None = None) -> dict[str, float]:
    """Accuracy, macro-F1 and mean cross-entropy of the model's current state."""
    model = runtime.model
    model.eval()
    idx_all = torch.arange(len(data)) if indices is None else torch.as_tensor(indices)
    preds, total_loss = [], 0.0
    for start in range(0, len(idx_all), batch_size):
        ids, att, y = _batch(data, idx_all[start:start + batch_size], runtime.device)
        logits = model(input_ids=ids, attention_mask=att).logits.float()
        total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
        preds.append(logits.argmax(dim=-1).cpu())
    pred = torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)
    true = data.labels[idx_all].numpy()
    n = max(len(true), 1)
    return {"accuracy": float((pred == true).mean()) if len(true) else float("nan"),
            "macro_f1": macro_f1(true, pred, runtime.num_labels),
            "loss": total_loss / n}


def macro_f1(true: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    """Unweighted mean of per-class F1 over the classes present in ``true`` or ``pred``."""
    f1s = []
    for c in range(num_classes):
        tp = int(((pred == c) & (true == c)).sum())
        fp = int(((pred == c) & (true != c)).sum())
        fn = int(((pred != c) & (true == c)).sum())
        if tp + fp + fn == 0:
            continue
        f1s.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(f1s)) if f1s else float("nan")
