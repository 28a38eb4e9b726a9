"""Causal-LM instruction tuning of a decoder (SmolLM2, Llama-family models, any HF causal LM).

Examples are (instruction, optional input, response, category). The prompt is the tokenizer's
chat template applied to one user turn (instruction, a blank line, the input) with the
assistant's turn opened; without a template, an Alpaca-style ``### Instruction / ### Input /
### Response`` block. The target is the response followed by the end-of-turn (EOS) token.

- **Labels** come from the prompt's token count and the attention mask, never from the pad id
  (SmolLM2's pad and end-of-turn token are the same id): -100 on the prompt and on padding.
- **Loss** is the mean cross-entropy over response tokens only, and the vocabulary projection
  is applied *only* at those positions: the decoder's hidden states are gathered where a label
  exists before ``lm_head``, so no (batch × length × vocabulary) logits are ever materialised.
- **Too long**: an example longer than ``model.max_length`` has its *input* shortened (counted
  as ``truncated``); one whose instruction and response alone do not fit is skipped and counted.
- **Evaluation** each round: loss and perplexity over the response tokens of the global test
  set, the loss per category and per client (its own categories, weighted by its examples),
  and greedy answers to a fixed seeded subset of the test set scored by ROUGE-L (Google's
  ``rouge-score``, F-measure, stemmed) and normalised exact match; a few of them are written to
  ``samples.jsonl``.
"""

from __future__ import annotations

import math
import os
import re
import string
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from nltk.stem.porter import PorterStemmer
from rouge_score import rouge_scorer
from rouge_score import tokenizers as rouge_tokenizers
from torch import Tensor, nn

from ..client import EncodedData, batch_of
from ..data.instructions import (
    INSTRUCTION_DATASETS,
    SKIP_TOO_LONG,
    InstructionDataset,
    load_instructions,
)
from ..data.readers import count_skip
from ..errors import UserError
from ..models import is_causal_lm, load_causal_lm
from .base import LearningTask, client_column, register_task

IGNORE = -100


@register_task
class CausalLM(LearningTask):
    """Instruction tuning of a decoder LLM: loss on response tokens, ROUGE-L of greedy answers."""

    name = "causal-lm"
    client_metric_keys = ("client_loss", "client_loss_mean")
    metric = "rouge_l"
    metric_label = "ROUGE-L (%)"
    peft_task_type = "CAUSAL_LM"
    plots = (("rouge_l", "ROUGE-L of greedy answers (%)", 100.0),
             ("loss", "test loss (response tokens)", 1.0))
    model_names = ("smollm2", "tiny-random-llama")
    data_names = INSTRUCTION_DATASETS
    generative = True
    own_keys = ("data.instruction_column", "data.input_column", "data.response_column",
                "data.category_column", "task.generate_examples", "task.max_new_tokens",
                "task.samples")
    bench_columns = (("final_rouge_l", 100.0), ("best_rouge_l", 100.0), ("last3_rouge_l", 100.0),
                     ("initial_rouge_l", 100.0), ("final_loss", 1.0), ("initial_loss", 1.0))
    bench_note = ("ROUGE-L (F, %) of greedy answers to the fixed held-out subset and test loss "
                  "(mean NLL per response token), mean ± std over seeds; initial = the base "
                  "model; last3 = mean of the last three rounds.")
    smoke_overrides = {"model.name": "tiny-random-llama", "model.max_length": 160,
                       "model.dtype": "float32", "data.max_train_examples": 60,
                       "data.max_test_examples": 40, "train.rounds": 2,
                       "data.min_examples_per_client": 2, "task.generate_examples": 4,
                       "task.max_new_tokens": 4}

    def generated_tokens(self) -> int:
        return self.cfg.task.max_new_tokens

    def check(self, cfg) -> None:
        super().check(cfg)
        if cfg.model.head != "frozen":
            raise UserError(f"config key 'model.head' must be 'frozen' for task '{self.name}' "
                            f"(it has no classifier head), got {cfg.model.head!r}")
        if cfg.data.local_test_fraction != 0:
            raise UserError(f"config key 'data.local_test_fraction' is for classification; task "
                            f"'{self.name}' reports each client's loss on its own categories "
                            f"instead, got {cfg.data.local_test_fraction!r}")

    @classmethod
    def claims(cls, cfg) -> bool:
        return (super().claims(cfg) or bool(cfg.data.response_column)
                or is_causal_lm(cfg.model.name))

    # -- data ---------------------------------------------------------------------
    def load_data(self):
        d, cfg = self.cfg.data, self.cfg
        return load_instructions(
            d.name, seed=cfg.seed, test_fraction=d.test_fraction,
            max_train_examples=d.max_train_examples or None,
            max_test_examples=d.max_test_examples or None,
            instruction_column=d.instruction_column, input_column=d.input_column,
            response_column=d.response_column, category_column=d.category_column,
            client_column=client_column(cfg))

    def encode(self, tokenizer, dataset: InstructionDataset, split: str):
        length = self.cfg.model.max_length
        rows: list[tuple[list[int], list[int]]] = []
        users: list[str] = []
        keep: list[int] = []
        truncated = 0
        for i in range(len(dataset)):
            got = encode_example(tokenizer, dataset.instructions[i], dataset.inputs[i],
                                 dataset.responses[i], length)
            if got is None:
                continue
            prompt, response, user, shortened = got
            truncated += shortened
            rows.append((prompt, response))
            users.append(user)
            keep.append(i)
        count_skip(dataset.stats, SKIP_TOO_LONG, len(dataset) - len(keep))
        dataset.stats["truncated"] = dataset.stats.get("truncated", 0) + truncated
        if not keep:
            raise UserError(f"no {split} example fits into model.max_length = {length} tokens "
                            f"(raise model.max_length)")
        kept = dataset.subset(np.asarray(keep))
        n = len(rows)
        need = 3 * n * length * 8  # ids, mask and labels, int64, each padded to ``length``
        try:
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (AttributeError, ValueError, OSError):  # no sysconf (Windows): not checked
            ram = 0
        if 0 < ram < need:  # a model with no position table takes any max_length
            raise UserError(f"model.max_length = {length}: the {n} encoded {split} examples "
                            f"would need {need / 1e9:.3g} GB, more than this machine's "
                            f"{ram / 1e9:.3g} GB; lower model.max_length")
        ids = torch.full((n, length), int(tokenizer.pad_token_id), dtype=torch.long)
        att = torch.zeros((n, length), dtype=torch.long)
        labels = torch.full((n, length), IGNORE, dtype=torch.long)
        for j, (prompt, response) in enumerate(rows):
            full = prompt + response
            ids[j, :len(full)] = torch.tensor(full)
            att[j, :len(full)] = 1
            labels[j, len(prompt):len(full)] = torch.tensor(response)
        meta = {"prompts": [p for p, _ in rows], "users": users,
                "references": list(kept.responses),
                "category": torch.as_tensor(kept.labels, dtype=torch.long)}
        return EncodedData(ids, att, labels, meta), kept

    # -- model ----------------------------------------------------------------------
    def load_model(self, num_labels: int, seed: int):
        m = self.cfg.model
        model, tok, source = load_causal_lm(m.name, seed, m.dtype)
        # decided here, once, before anything counts or times a forward pass (the simulated
        # clock's FLOP count, the profile): not at the first loss
        head_is_the_projection(model)
        return model, tok, source

    # -- training -------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        logits, target, _ = response_logits(model, *batch)
        return F.cross_entropy(logits, target)

    # -- evaluation -----------------------------------------------------------------
    def evaluate(self, exp) -> dict[str, Any]:
        rt, data, cfg = exp.runtime, exp.enc_test, exp.cfg
        nll, tokens = example_nll(rt.model, data, cfg.train.eval_batch_size, rt.device)
        total = float(nll.sum()) / max(float(tokens.sum()), 1.0)
        cats = data.meta["category"].numpy()
        names = exp.test.label_names
        category_loss: dict[str, float] = {}
        for c, name in enumerate(names):
            sel = cats == c
            if sel.any():
                category_loss[name] = float(nll[sel].sum()) / max(float(tokens[sel].sum()), 1.0)
        client_loss = [client_category_loss(exp.train.labels[idx], category_loss, names)
                       for idx in exp.client_train]
        valid = [v for v in client_loss if v is not None]
        metrics: dict[str, Any] = {
            "loss": total, "perplexity": math.exp(min(total, 700.0)),
            "response_tokens": int(tokens.sum()),
            "category_loss": category_loss,
            "client_loss": client_loss,
            "client_loss_mean": float(np.mean(valid)) if valid else None,
        }
        k = min(self.cfg.task.generate_examples, len(data))
        if k == 0:
            metrics.update(rouge_l=None, exact_match=None)
            return metrics
        pick = generation_subset(len(data), k, self.cfg.seed)
        answers = generate(rt.model, rt.tokenizer, [data.meta["prompts"][i] for i in pick],
                           self.cfg.task.max_new_tokens, cfg.train.eval_batch_size, rt.device)
        refs = [data.meta["references"][i] for i in pick]
        rouge = rouge_l(answers, refs)
        metrics["rouge_l"] = float(np.mean(rouge))
        metrics["exact_match"] = float(np.mean([exact_match(a, r) for a, r in zip(answers, refs)]))
        metrics["samples"] = [
            {"example": int(i), "category": names[int(cats[i])], "prompt": data.meta["users"][i],
             "reference": refs[j], "generation": answers[j], "rouge_l": rouge[j]}
            for j, i in enumerate(pick[:self.cfg.task.samples])]
        return metrics

    def summary(self, initial, records):
        with_rouge = [r for r in records if r.get("rouge_l") is not None]
        best = max(with_rouge, key=lambda r: r["rouge_l"]) if with_rouge \
            else min(records, key=lambda r: r["loss"])
        last = records[-1]
        return {"initial_loss": initial["loss"], "final_loss": last["loss"],
                "best_loss": min(r["loss"] for r in records),
                "initial_perplexity": initial["perplexity"], "final_perplexity": last["perplexity"],
                "initial_rouge_l": initial.get("rouge_l"), "final_rouge_l": last.get("rouge_l"),
                "best_rouge_l": best.get("rouge_l"), "best_round": best["round"],
                "initial_exact_match": initial.get("exact_match"),
                "final_exact_match": last.get("exact_match"),
                "initial_client_loss_mean": initial.get("client_loss_mean"),
                "final_client_loss_mean": last.get("client_loss_mean")}

    @staticmethod
    def summary_lines(s):
        lines = [f"  loss       final {s['final_loss']:.4f}  start {s['initial_loss']:.4f}  "
                 f"(perplexity {s['final_perplexity']:.2f} from {s['initial_perplexity']:.2f}; "
                 f"response tokens of the test set)"]
        if s.get("final_rouge_l") is not None:
            lines.append(f"  ROUGE-L    final {100 * s['final_rouge_l']:.2f}%  best "
                         f"{100 * s['best_rouge_l']:.2f}% (round {s['best_round']})  start "
                         f"{100 * s['initial_rouge_l']:.2f}%  exact match "
                         f"{100 * s['final_exact_match']:.1f}% (from "
                         f"{100 * s['initial_exact_match']:.1f}%)")
        return lines


# ---------------------------------------------------------------------- prompts
def user_text(instruction: str, input_: str) -> str:
    return f"{instruction}\n\n{input_}" if input_ else instruction


def format_prompt(tokenizer, instruction: str, input_: str = "") -> str:
    """The prompt text: the chat template with the assistant turn opened, or an Alpaca block."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text(instruction, input_)}], tokenize=False,
            add_generation_prompt=True)
    return (f"### Instruction:\n{instruction}\n\n"
            + (f"### Input:\n{input_}\n\n" if input_ else "") + "### Response:\n")


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def prompt_ids(tokenizer, instruction: str, input_: str = "") -> list[int]:
    """The prompt's token ids (:func:`format_prompt`). A chat template writes its own special
    tokens; the Alpaca block gets what the tokenizer itself puts before a text (a BOS, for
    Llama-2, Mistral or OPT base models, which were trained with one) — never after it, and
    never on the response."""
    text = format_prompt(tokenizer, instruction, input_)
    plain = _ids(tokenizer, text)
    if getattr(tokenizer, "chat_template", None) or not plain:
        return plain
    full = list(tokenizer(text)["input_ids"])
    start = next((i for i in range(len(full) - len(plain) + 1)
                  if full[i:i + len(plain)] == plain), 0)
    return full[:start] + plain


def encode_example(tokenizer, instruction: str, input_: str, response: str, max_length: int
                   ) -> tuple[list[int], list[int], str, int] | None:
    """(prompt ids, response ids incl. EOS, user text, 1 if the input was shortened) or None
    when even an empty input leaves no room for the whole response."""
    response_ids = _ids(tokenizer, response) + [int(tokenizer.eos_token_id)]
    prompt = prompt_ids(tokenizer, instruction, input_)
    if len(prompt) + len(response_ids) <= max_length:
        return prompt, response_ids, user_text(instruction, input_), 0
    if not input_:
        return None
    input_ids = _ids(tokenizer, input_)
    excess = len(prompt) + len(response_ids) - max_length
    for _ in range(4):  # re-tokenising the cut text can merge differently: shave a bit more
        keep = len(input_ids) - excess
        if keep <= 0:
            return None
        short = tokenizer.decode(input_ids[:keep]).strip()
        prompt = prompt_ids(tokenizer, instruction, short)
        over = len(prompt) + len(response_ids) - max_length
        if over <= 0:
            return prompt, response_ids, user_text(instruction, short), 1
        excess += over
    return None


# ---------------------------------------------------------------------- loss and likelihood
def causal_lm_of(model: nn.Module) -> nn.Module:
    """The ``*ForCausalLM`` module under a PEFT wrapper (LoRA layers are injected in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def head_is_the_projection(lm: nn.Module) -> bool:
    """Whether ``lm``'s logits are its output projection of the decoder's last hidden state and
    nothing more — not so for a model that transforms them after (Gemma 2's soft-capping,
    Cohere's ``logit_scale``, Granite's ``logits_scaling``). Checked once per model, in eval
    mode (no dropout), on a 4-token input; the answer is kept on the module."""
    known = getattr(lm, "_lora_a2_plain_head", None)
    if known is not None:
        return known
    was_training = lm.training
    lm.eval()
    try:
        with torch.no_grad():
            ids = torch.ones(1, 4, dtype=torch.long, device=lm.get_output_embeddings().weight.device)
            full = lm(input_ids=ids).logits[0, -1].float()
            part = lm.get_output_embeddings()(
                lm.get_decoder()(input_ids=ids).last_hidden_state)[0, -1].float()
            plain = bool(torch.allclose(full, part, rtol=1e-3, atol=1e-3))
    finally:
        lm.train(was_training)
    lm._lora_a2_plain_head = plain
    return plain


def response_logits(model: nn.Module, ids: Tensor, att: Tensor, labels: Tensor
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Logits (float32) at the positions that predict a response token, their targets, and the
    (batch, length − 1) mask of those positions. The vocabulary projection runs on those rows
    only: hidden states are gathered first (the memory knob "loss only where labels are") —
    unless the model transforms its logits after the projection
    (:func:`head_is_the_projection`): then its own forward computes them, every position."""
    lm = causal_lm_of(model)
    target = labels[:, 1:]
    where = target != IGNORE
    if not head_is_the_projection(lm):
        logits = lm(input_ids=ids, attention_mask=att).logits[:, :-1][where].float()
        return logits, target[where], where
    hidden = lm.get_decoder()(input_ids=ids, attention_mask=att).last_hidden_state
    logits = lm.get_output_embeddings()(hidden[:, :-1][where]).float()
    return logits, target[where], where


@torch.no_grad()
def example_nll(model: nn.Module, data: EncodedData, batch_size: int, device: torch.device
                ) -> tuple[np.ndarray, np.ndarray]:
    """Per example: summed NLL of its response tokens, and how many there are."""
    model.eval()
    n = len(data)
    nll, tokens = np.zeros(n), np.zeros(n)
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(n, start + batch_size))
        logits, target, where = response_logits(model, *batch_of(data, idx, device))
        per_token = F.cross_entropy(logits, target, reduction="none")
        row = where.nonzero()[:, 0]  # example (within the batch) of each response token
        sums = torch.zeros(len(idx), device=per_token.device).index_add_(0, row, per_token)
        nll[start:start + len(idx)] = sums.double().cpu().numpy()
        tokens[start:start + len(idx)] = where.sum(dim=1).cpu().numpy()
    return nll, tokens


def client_category_loss(labels: np.ndarray, category_loss: dict[str, float],
                         names: list[str]) -> float | None:
    """A client's loss on its own categories: the test loss of each category it holds,
    weighted by how many of its training examples are in that category (categories with no
    test example are left out)."""
    weights = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(names))
    pairs = [(w, category_loss[names[c]]) for c, w in enumerate(weights)
             if w and names[c] in category_loss]
    if not pairs:
        return None
    total = sum(w for w, _ in pairs)
    return float(sum(w * v for w, v in pairs) / total)


# ---------------------------------------------------------------------- generation
def generation_subset(n: int, k: int, seed: int) -> list[int]:
    """The fixed held-out examples answered every round (seeded; the same in every round)."""
    return sorted(int(i) for i in np.random.default_rng([seed, 7477]).permutation(n)[:k])


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[list[int]], max_new_tokens: int,
             batch_size: int, device: torch.device) -> list[str]:
    """Greedy answers to tokenised prompts (left-padded in batches), decoded without specials."""
    model.eval()
    pad = int(tokenizer.pad_token_id)
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        att = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, p in enumerate(chunk):
            ids[j, width - len(p):] = torch.tensor(p)
            att[j, width - len(p):] = 1
        gen = model.generate(input_ids=ids.to(device), attention_mask=att.to(device),
                             max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                             pad_token_id=pad, eos_token_id=int(tokenizer.eos_token_id),
                             use_cache=True, temperature=None, top_p=None, top_k=None)
        for row in gen[:, width:].cpu():
            out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    return out


# one CJK character (Han, kana) is one word; any other word is a run of letters and digits
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORD = re.compile(f"[{_CJK}]|[^\\W_{_CJK}]+")


class UnicodeWords(rouge_tokenizers.Tokenizer):
    """rouge-score's own tokenizer (lower case, words of letters and digits, Porter stemming of
    words longer than 3 characters) for any script: its default keeps only ``[a-z0-9]``, so a
    Cyrillic, Greek or Chinese answer had no words and scored 0 however right it was. On ASCII
    text the words are the same; the English stemmer is applied to ASCII words only."""

    def __init__(self) -> None:
        self._stemmer = PorterStemmer()

    def tokenize(self, text: str) -> list[str]:
        return [self._stemmer.stem(w) if len(w) > 3 and w.isascii() else w
                for w in _WORD.findall(text.lower())]


_SCORER = rouge_scorer.RougeScorer(["rougeL"], tokenizer=UnicodeWords())


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    """ROUGE-L F-measure per pair (``rouge-score`` with :class:`UnicodeWords`; 0 for an empty
    answer)."""
    return [float(_SCORER.score(r, p)["rougeL"].fmeasure) for p, r in zip(predictions, references)]


def normalize_answer(text: str) -> str:
    """Lower case, no punctuation or articles, single spaces (SQuAD's exact-match rule)."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))
