"""Sequence classification with an encoder (the LoRA-A2 paper's task).

Examples are (text, label); the loss is cross-entropy on the classifier's logits; the headline
metric is test accuracy (plus macro-F1 and loss), and per client the accuracy on its own
held-out examples when ``data.local_test_fraction`` > 0. The classifier head is the one weight
outside the LoRA targets (frozen and seeded, or trained: ``model.head``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..client import EncodedData, batch_of
from ..data import DATASET_NAMES, load_dataset
from ..models import find_head, load_base_model
from .base import LearningTask, client_column, register_task


@register_task
class Classification(LearningTask):
    """Sequence classification: text → one of K labels (encoders such as MiniLM, BERT)."""

    name = "classification"
    client_metric_keys = ("local_accuracy", "local_accuracy_mean")
    metric = "accuracy"
    metric_label = "test accuracy (%)"
    peft_task_type = "SEQ_CLS"
    plots = (("accuracy", "test accuracy (%)", 100.0),)
    model_names = ("minilm", "tiny-random-bert")
    data_names = DATASET_NAMES
    fallback = True  # a hub model or data file no task claims: classification
    own_keys = ("data.text_column", "data.label_column")
    client_eval_ranges = {"accuracy": (0.0, 1.0, False), "macro_f1": (0.0, 1.0, False),
                          "loss": (0.0, math.inf, False), "local_accuracy": (0.0, 1.0, True),
                          "local_held_out": (0.0, 1.0, False)}
    bench_columns = (("final_accuracy", 100.0), ("best_accuracy", 100.0),
                     ("last3_accuracy", 100.0), ("final_local_accuracy", 100.0))
    bench_note = ("Accuracy in %, mean ± std over seeds; last3 = mean of the last three rounds' "
                  "accuracy; final_local_accuracy = the mean over clients of each client's "
                  "accuracy on its own split (a personalised method: with its own model), — "
                  "where the cell predates it.")
    smoke_overrides = {"model.name": "tiny-random-bert", "model.max_length": 16,
                       "data.max_train_examples": 60, "data.max_test_examples": 40,
                       "train.rounds": 2, "data.min_examples_per_client": 2}

    def load_data(self):
        d, cfg = self.cfg.data, self.cfg
        return load_dataset(
            d.name, text_column=d.text_column or None, label_column=d.label_column or None,
            seed=cfg.seed, test_fraction=d.test_fraction,
            max_train_examples=d.max_train_examples or None,
            max_test_examples=d.max_test_examples or None, client_column=client_column(cfg))

    def encode(self, tokenizer, dataset, split: str):
        return encode_texts(tokenizer, dataset.texts, dataset.labels,
                            self.cfg.model.max_length), dataset

    def load_model(self, num_labels: int, seed: int):
        m = self.cfg.model
        return load_base_model(m.name, num_labels, seed, m.dtype)

    def head_attr(self, model: nn.Module) -> str | None:
        return find_head(model)

    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        ids, att, y = batch
        # float32 logits (a no-op in fp32): under bf16 autocast the loss is taken in float32
        return F.cross_entropy(model(input_ids=ids, attention_mask=att).logits.float(), y)

    def evaluate(self, exp) -> dict[str, Any]:
        """The global model on the test set, and each client's ``local_accuracy``: on its own
        held-out examples when ``data.local_test_fraction`` > 0, else the test set's per-class
        accuracy weighted by the client's own label mix (:func:`label_weighted_accuracy`)."""
        bs = exp.cfg.train.eval_batch_size
        metrics: dict[str, Any] = evaluate(exp.runtime, exp.enc_test, bs, per_class=True)
        per_class = metrics.pop("class_accuracy")
        local = [_local_accuracy(exp.runtime, exp.enc_train, held, idx, per_class, bs)
                 for held, idx in zip(exp.client_test, exp.client_train)]
        metrics.update(local_accuracy_fields(local))
        if exp.cfg.data.local_test_fraction > 0:
            metrics["local_accuracy_held_out"] = sum(len(held) > 0 for held in exp.client_test)
        return metrics

    def evaluate_client(self, ctx) -> dict[str, Any]:
        """One client's own model (loaded): the test set, and its own split as above."""
        bs = ctx.cfg.train.eval_batch_size
        assert ctx.test_data is not None
        metrics: dict[str, Any] = evaluate(ctx.runtime, ctx.test_data, bs, per_class=True)
        per_class = metrics.pop("class_accuracy")
        held = ctx.local_test if ctx.local_test is not None else []
        metrics["local_accuracy"] = _local_accuracy(ctx.runtime, ctx.data, held, ctx.indices,
                                                    per_class, bs)
        metrics["local_held_out"] = int(len(held) > 0)  # an answer carries numbers only
        return metrics

    def merge_client_evals(self, metrics: dict[str, Any], evals: list[dict[str, Any] | None]
                           ) -> dict[str, Any]:
        """A personalised method has no single global model: its test accuracy (and macro-F1,
        loss) is the mean over clients of each client's own model on the test set, its
        ``local_accuracy`` each client's own model on its own split. What the server alone
        holds is kept as ``shared_model_accuracy``."""
        got = [e for e in evals if e is not None]
        out = {**metrics, "shared_model_accuracy": metrics["accuracy"]}
        if got:
            for key in ("accuracy", "macro_f1", "loss"):
                out[key] = float(np.mean([e[key] for e in got]))
        out.update(local_accuracy_fields([None if e is None else e["local_accuracy"]
                                          for e in evals]))
        if self.cfg.data.local_test_fraction > 0:
            out["local_accuracy_held_out"] = sum(int(e.get("local_held_out", 0)) for e in got)
        return out

    def summary(self, initial, records):
        best = max(records, key=lambda r: r["accuracy"])
        last = records[-1]
        return {"initial_accuracy": initial["accuracy"],
                "final_accuracy": last["accuracy"],
                "final_macro_f1": last["macro_f1"],
                "final_loss": last["loss"],
                "best_accuracy": best["accuracy"],
                "best_round": best["round"],
                "initial_local_accuracy": initial.get("local_accuracy_mean"),
                "final_local_accuracy": last.get("local_accuracy_mean"),
                "local_accuracy_split": _split_label(self.cfg, last)}

    @staticmethod
    def summary_lines(s):
        lines = [f"  accuracy   final {100 * s['final_accuracy']:.2f}%  best "
                 f"{100 * s['best_accuracy']:.2f}% (round {s['best_round']})  start "
                 f"{100 * s['initial_accuracy']:.2f}%  macro-F1 {100 * s['final_macro_f1']:.2f}%"]
        if s.get("final_local_accuracy") is not None:
            lines.append(f"  local      final {100 * s['final_local_accuracy']:.2f}% (mean over "
                         f"clients, each on its own split: {s['local_accuracy_split']})")
        return lines

    def describe(self, runtime) -> dict[str, Any]:
        return {"num_labels": runtime.num_labels}


def encode_texts(tokenizer, texts: list[str], labels: np.ndarray, max_length: int) -> EncodedData:
    enc = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_length,
                    return_tensors="pt")
    return EncodedData(enc["input_ids"].long(), enc["attention_mask"].long(),
                       torch.as_tensor(np.asarray(labels), dtype=torch.long))


def _local_accuracy(runtime, data, held_out, train_idx, per_class: list[float],
                    batch_size: int) -> float | None:
    """One client's ``local_accuracy``, the same rule for the shared model and a client's own:
    on its held-out examples when it has any, else the test set's per-class accuracy weighted
    by its training labels (a client too small to hold any out included)."""
    if len(held_out):
        return evaluate(runtime, data, batch_size, held_out)["accuracy"]
    return label_weighted_accuracy(per_class, data.labels[train_idx].numpy())


def _split_label(cfg, record: dict[str, Any]) -> str:
    """What the summary's ``final_local_accuracy`` was measured on."""
    weighted = "test set weighted by each client's label mix"
    if cfg.data.local_test_fraction <= 0:
        return weighted
    held, total = record.get("local_accuracy_held_out"), len(record.get("local_accuracy") or [])
    if held is None or held == total:
        return "held-out"
    if held == 0:
        return f"{weighted} (no client large enough to hold any out)"
    return (f"held-out for {held} of {total} clients; the {total - held} too small to hold any "
            f"out: {weighted}")


def local_accuracy_fields(local: list[float | None]) -> dict[str, Any]:
    valid = [a for a in local if a is not None and not np.isnan(a)]
    return {"local_accuracy": local,
            "local_accuracy_mean": float(np.mean(valid)) if valid else None}


def label_weighted_accuracy(class_accuracy: list[float], labels: np.ndarray) -> float | None:
    """Σ_c p(c) · acc_c: the test set's per-class accuracy weighted by the label mix ``labels``
    (a client's training labels) — the accuracy on a test set drawn like that client's data.
    Classes absent from the test set are left out and the weights renormalised; None when
    none of the client's classes is in the test set."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(class_accuracy))
    pairs = [(n, a) for n, a in zip(counts, class_accuracy) if n and not np.isnan(a)]
    total = sum(n for n, _ in pairs)
    return float(sum(n * a for n, a in pairs) / total) if total else None


@torch.no_grad()
def evaluate(runtime, data: EncodedData, batch_size: int,
             indices: np.ndarray | None = None, per_class: bool = False) -> dict[str, Any]:
    """Accuracy, macro-F1 and mean cross-entropy of the model's current state (and with
    ``per_class`` the accuracy on each class's examples, NaN for a class with none)."""
    model = runtime.model
    model.eval()
    idx_all = torch.arange(len(data)) if indices is None else torch.as_tensor(indices)
    preds, total_loss = [], 0.0
    for start in range(0, len(idx_all), batch_size):
        ids, att, y = batch_of(data, idx_all[start:start + batch_size], runtime.device)
        logits = model(input_ids=ids, attention_mask=att).logits.float()
        total_loss += float(F.cross_entropy(logits, y, reduction="sum"))
        preds.append(logits.argmax(dim=-1).cpu())
    pred = torch.cat(preds).numpy() if preds else np.zeros(0, dtype=np.int64)
    true = data.labels[idx_all].numpy()
    n = max(len(true), 1)
    out: dict[str, Any] = {"accuracy": float((pred == true).mean()) if len(true) else float("nan"),
                           "macro_f1": macro_f1(true, pred, runtime.num_labels),
                           "loss": total_loss / n}
    if per_class:
        out["class_accuracy"] = [float((pred[true == c] == c).mean()) if (true == c).any()
                                 else float("nan") for c in range(runtime.num_labels)]
    return out


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
