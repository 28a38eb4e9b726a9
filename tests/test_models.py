"""Loading checkpoints from local folders: dtype, a classifier of another size, bad folders."""

import json

import numpy as np
import pytest
import torch
import transformers

from lora_a2.adapter import ModelRuntime
from lora_a2.cli import main
from lora_a2.checks import load_config
from lora_a2.errors import UserError
from lora_a2.experiment import position_limit
from lora_a2.models import (find_target_modules, is_causal_lm_folder, load_base_model, tiny_random_bert,
                             tiny_random_llama)
from lora_a2.tasks.classification import Classification


@pytest.fixture(scope="module")
def bf16_folder(tmp_path_factory):
    """A tiny BERT saved in bfloat16 with a 3-label head, like a hub checkpoint on disk."""
    path = tmp_path_factory.mktemp("bf16bert")
    model, tok = tiny_random_bert(3, seed=0)
    model.to(torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_float32_by_default_whatever_the_checkpoint_stores(bf16_folder):
    model, _, source = load_base_model(str(bf16_folder), num_labels=3, seed=0)
    assert source == str(bf16_folder)
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_auto_keeps_the_checkpoint_dtype_and_lora_stays_float32(bf16_folder):
    cfg = load_config(None, [f"model.name={bf16_folder}", "model.dtype=auto"])
    rt = ModelRuntime(cfg.model, 3, 4, 0, torch.device("cpu"), task=Classification(cfg))
    base = [p for n, p in rt.model.named_parameters() if "lora_" not in n]
    assert {p.dtype for p in base} == {torch.bfloat16}
    assert {p.dtype for n, p in rt.params.items() if n.endswith((".A", ".B"))} == {torch.float32}


def test_distilbert_gets_lora_on_its_blocks_not_its_pre_classifier(tmp_path):
    """DistilBERT's head is pre_classifier + classifier; PEFT's SEQ_CLS task wraps the first as
    a head module too, so LoRA put on it failed with an AttributeError in ModelRuntime."""
    _, tok = tiny_random_bert(3, seed=0)
    config = transformers.DistilBertConfig(vocab_size=len(tok), dim=32, n_layers=2, n_heads=2,
                                           hidden_dim=64, num_labels=3, pad_token_id=0)
    transformers.DistilBertForSequenceClassification(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cfg = load_config(None, [f"model.name={tmp_path}"])
    rt = ModelRuntime(cfg.model, 3, 4, 0, torch.device("cpu"), task=Classification(cfg))
    names = [m.name for m in rt.layout.modules]
    assert len(names) == 2 * 6 and not any("classifier" in n for n in names), names


@pytest.mark.parametrize("targets,needle", [
    (["classifier"], "'classifier' matches only 'classifier', in the model's output head"),
    (["query", "classifier"], "in the model's output head"),
    (["query", "no_such_layer"], "no linear layer matches 'no_such_layer'"),
])
def test_target_modules_that_name_the_head_or_nothing_are_one_line_errors(targets, needle):
    """The head was handed to PEFT, which refused it with its own error (a traceback)."""
    model = tiny_random_bert(3, seed=0)[0]
    with pytest.raises(UserError, match=needle.replace("(", r"\(")) as e:
        find_target_modules(model, targets)
    assert "\n" not in str(e.value)
    assert [m.name for m in find_target_modules(model, ["query"])][0].endswith("query")
    assert any(m.name == "bert.pooler.dense" for m in find_target_modules(model, ["pooler.dense"]))


def test_a_target_that_also_matches_a_layer_inside_the_head_skips_that_layer():
    """RoBERTa's head is classifier.dense + classifier.out_proj: target "dense" means the
    encoder's dense layers, not the head's (PEFT keeps the head whole)."""
    model = tiny_random_bert(3, seed=0)[0]
    model.classifier = torch.nn.Sequential()  # a head with layers inside, as RoBERTa's
    model.classifier.dense = torch.nn.Linear(32, 32)
    model.classifier.out_proj = torch.nn.Linear(32, 3)
    names = [m.name for m in find_target_modules(model, ["dense"])]
    assert names and not any(n.startswith("classifier") for n in names)
    assert "bert.pooler.dense" in names
    with pytest.raises(UserError, match="'out_proj' matches only 'classifier.out_proj'"):
        find_target_modules(model, ["out_proj"])


@pytest.mark.parametrize("rank,ok", [(64, True), (65, False), (10**20, False)])
def test_a_rank_past_every_side_of_every_layer_is_a_one_line_error(rank, ok):
    """tiny-random-bert's longest layer side is 64 (intermediate); 10^20 was an allocator
    traceback."""
    cfg = load_config(None, ["model.name=tiny-random-bert"])

    def build():
        return ModelRuntime(cfg.model, 3, rank, 0, torch.device("cpu"),
                            task=Classification(cfg))
    if ok:
        assert build().params
        return
    with pytest.raises(UserError, match=f"'strategy.global_rank': {rank} exceeds every side of "
                                        f"every LoRA layer of 'tiny-random-bert' "
                                        f"\\(at most 64\\)"):
        build()


def test_a_gpt2_style_model_is_a_one_line_error(tmp_path):
    _, tok = tiny_random_bert(3, seed=0)
    config = transformers.GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2,
                                     num_labels=3, pad_token_id=0)
    transformers.GPT2ForSequenceClassification(config).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cfg = load_config(None, [f"model.name={tmp_path}"])
    with pytest.raises(UserError, match="Conv1D projections are not supported"):
        ModelRuntime(cfg.model, 3, 4, 0, torch.device("cpu"), task=Classification(cfg))


def test_a_checkpoint_with_another_number_of_labels_gets_a_fresh_head(bf16_folder):
    model, _, _ = load_base_model(str(bf16_folder), num_labels=5, seed=0)
    assert model.classifier.out_features == 5
    again, _, _ = load_base_model(str(bf16_folder), num_labels=5, seed=0)
    assert torch.equal(model.classifier.weight, again.classifier.weight)  # seeded


def test_run_on_a_bf16_checkpoint_in_both_dtypes(bf16_folder, tmp_path, capsys):
    base = ["--set", f"model.name={bf16_folder}", "--set", "data.name=bbc-news",
            "--set", "data.max_train_examples=60", "--set", "data.max_test_examples=20",
            "--set", "data.num_clients=2", "--set", "train.rounds=1",
            "--set", "model.max_length=16", "--set", "strategy.name=lora-a2",
            "--set", "engine.device=cpu"]
    for dtype in ("float32", "auto"):
        out = tmp_path / dtype
        assert main(["run", "-q", "--out", str(out), *base, "--set", f"model.dtype={dtype}"]) == 0
        summary = json.loads((out / "summary.json").read_text())
        # uploads are float32 values either way: 4 bytes each plus slot ids and a small header
        assert summary["total_upload_bytes"] >= 4 * summary["total_upload_params"]
        # what ran it, so wall times from different machines are not compared blindly
        assert summary["device"] == "cpu" and summary["torch_version"] == torch.__version__
        assert summary["device_name"] and summary["torch_threads"] >= 1


def test_a_checkpoint_whose_body_does_not_match_its_config_is_an_error(bf16_folder, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(bf16_folder, broken)
    cfg = json.loads((broken / "config.json").read_text())
    cfg["intermediate_size"] = 2 * cfg["intermediate_size"]  # the weights stay the old size
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="does not have the shape its config.json implies"):
        load_base_model(str(broken), num_labels=3, seed=0)


def test_bad_model_folder_and_dtype_are_one_line_errors(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(UserError, match="could not load model"):
        load_base_model(str(tmp_path), num_labels=2, seed=0)
    with pytest.raises(UserError, match="model.dtype"):
        load_config(None, ["model.dtype=float64"])


def test_a_decoder_without_a_pad_token_classifies_padded_batches(tmp_path):
    """A GPT-2/Llama-style checkpoint has no pad token: as a classifier its batches still pad
    (with EOS), and its head finds each row's last real token through config.pad_token_id."""
    model, tok = tiny_random_llama(seed=0)
    model.config.pad_token_id = None
    tok.pad_token = None
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    clf, tok2, _ = load_base_model(str(tmp_path), num_labels=3, seed=0)
    assert tok2.pad_token == tok2.eos_token and clf.config.pad_token_id == tok2.pad_token_id
    batch = tok2(["a short one", "a somewhat longer text than that"], padding=True,
                 return_tensors="pt")
    with torch.no_grad():
        logits = clf(**batch).logits
        alone = clf(**tok2(["a short one"], return_tensors="pt")).logits
    assert logits.shape == (2, 3)
    assert torch.allclose(logits[0], alone[0], atol=1e-5)  # padding did not change row 0


def test_a_left_padding_tokenizer_is_padded_right_and_batches_keep_every_token(tmp_path):
    """Llama's tokenizers pad on the left by default: loaded as a classifier the tokenizer pads
    on the right, as every encoded dataset does, and a batch trimmed of shared padding keeps
    each row's tokens (a row classifies as it does alone)."""
    from lora_a2.client import EncodedData, batch_of
    from lora_a2.tasks.classification import encode_texts

    model, tok = tiny_random_llama(seed=0)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    config = tmp_path / "tokenizer_config.json"  # as Llama's own checkpoints say
    config.write_text(json.dumps({**json.loads(config.read_text()), "padding_side": "left"}))
    assert transformers.AutoTokenizer.from_pretrained(tmp_path).padding_side == "left"
    clf, tok2, _ = load_base_model(str(tmp_path), num_labels=3, seed=0)
    assert tok2.padding_side == "right"
    texts = ["a short one", "a somewhat longer text than that one is"]
    enc = encode_texts(tok2, texts, np.array([0, 1]), max_length=32)
    ids, att, _ = batch_of(enc, torch.arange(2), torch.device("cpu"))
    assert att.sum(1).tolist() == enc.attention_mask.sum(1).tolist()
    clf.eval()
    with torch.no_grad():
        logits = clf(input_ids=ids, attention_mask=att).logits
        alone = clf(**tok2(texts[:1], return_tensors="pt")).logits
    assert torch.allclose(logits[0], alone[0], atol=1e-5)
    # an EncodedData padded on the left (built by hand) loses no token either
    left = EncodedData(torch.tensor([[0, 0, 5, 6], [0, 7, 8, 9]]),
                       torch.tensor([[0, 0, 1, 1], [0, 1, 1, 1]]), torch.tensor([0, 1]))
    ids, att, _ = batch_of(left, torch.arange(2), torch.device("cpu"))
    assert ids.tolist() == [[0, 5, 6], [7, 8, 9]] and att.sum().item() == 5


def test_the_position_limit_is_the_learned_table_less_its_padding_rows():
    """BERT 512; RoBERTa's 514-row table starts after padding index 1: 512; GPT-2 n_positions;
    a rotary model (Llama) has no table and no limit."""
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=32, vocab_size=100)
    roberta = transformers.RobertaForSequenceClassification(
        transformers.RobertaConfig(max_position_embeddings=514, pad_token_id=1, **small))
    gpt2 = transformers.GPT2ForSequenceClassification(
        transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=64, vocab_size=100))
    assert position_limit(tiny_random_bert(3, seed=0)[0]) == 512
    assert position_limit(roberta) == 512
    assert position_limit(gpt2) == 64
    opt = transformers.OPTForSequenceClassification(transformers.OPTConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, ffn_dim=32, vocab_size=100,
        max_position_embeddings=64, word_embed_proj_dim=32))
    assert position_limit(opt) == 64  # a 66-row table whose first two rows are an offset
    assert position_limit(tiny_random_llama(seed=0)[0]) is None


@pytest.mark.parametrize("text,expected", [
    ('{"architectures": ["LlamaForCausalLM"]}', True),
    ('{"architectures": ["BertForSequenceClassification"]}', False),
    ('["LlamaForCausalLM"]', False),  # a list, not a config: not a decoder, and no traceback
    ('{"architectures": "LlamaForCausalLM"}', False),
    ("{not json", False),
])
def test_a_folder_is_a_decoder_only_by_its_config_s_architectures(tmp_path, text, expected):
    (tmp_path / "config.json").write_text(text)
    assert is_causal_lm_folder(str(tmp_path)) is expected


def test_a_decoder_needs_room_for_what_evaluation_generates():
    """A causal LM with a learned position table (GPT-2) generates task.max_new_tokens after a
    prompt of up to model.max_length: the two must fit in its positions (else an index error
    in the first evaluation); a classifier needs only max_length."""
    from lora_a2.experiment import check_positions
    from lora_a2.tasks import get_task

    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=64, vocab_size=100))
    causal = ["task.name=causal-lm", "model.name=tiny-random-llama", "data.name=chatterbot",
              "task.max_new_tokens=16"]
    def check(sets):
        cfg = load_config(None, sets)
        check_positions(cfg, gpt2, get_task(cfg).generated_tokens())

    check([*causal, "model.max_length=48"])  # 48 + 16 = 64
    with pytest.raises(UserError, match=r"'model.max_length' must be ≤ 64 − task.max_new_tokens "
                                        r"\(16\) = 48: .* got 49"):
        check([*causal, "model.max_length=49"])
    check(["model.max_length=64"])  # classification generates nothing


def test_generate_refuses_a_prompt_and_answer_past_the_position_table():
    """`lora-a2 generate` on a learned-position decoder: a prompt whose tokens plus
    --max-new-tokens exceed the table is one line naming both, not an index error."""
    from lora_a2.generate import answer

    _, tok = tiny_random_llama(seed=0)
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, n_positions=64, vocab_size=100))
    with pytest.raises(UserError, match=r"prompt 1 is \d+ tokens; with --max-new-tokens 60 it "
                                        r"needs \d+ positions, and the model has 64"):
        answer(gpt2, tok, ["a prompt of a few words"], max_new_tokens=60)


def test_a_model_folder_given_with_a_tilde_is_loaded_from_there(tmp_path, monkeypatch):
    """model.name = "~/m" is a local folder (as config_inputs and the causal-LM check take
    it): both loaders expand it, and record the folder as the adapter's base."""
    from lora_a2.models import load_causal_lm

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, tok = tiny_random_llama(seed=0)
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    assert load_base_model("~/m", num_labels=3, seed=0)[2] == str(tmp_path / "m")
    assert load_causal_lm("~/m", seed=0)[2] == str(tmp_path / "m")


def test_a_weight_delta_on_a_bfloat16_base_is_rounded_once():
    """FLoRA / FlexLoRA / FedEx-LoRA merge a delta into the frozen base: on a bfloat16 base the
    sum W0 + Δ is taken in float32 and rounded once (Δ rounded to bfloat16 first, then the sum
    again, differed in ≈ 2 % of the entries)."""
    cfg = load_config(None, ["model.name=tiny-random-bert", "model.dtype=bfloat16"])
    rt = ModelRuntime(cfg.model, 3, 4, 0, torch.device("cpu"), task=Classification(cfg))
    m = rt.layout.modules[0]
    w = rt.model.base_model.model.get_submodule(m.name).get_base_layer().weight
    w0 = w.detach().clone()
    assert w0.dtype == torch.bfloat16
    delta = 1e-3 * torch.randn(w0.shape, generator=torch.Generator().manual_seed(0))
    rt.set_weight_delta({m.name: delta})
    assert torch.equal(w, (w0.float() + delta).to(torch.bfloat16))
    rt.set_weight_delta(None)
    assert torch.equal(w, w0)


def test_a_decoder_whose_tokenizer_has_no_eos_is_a_one_line_error(tmp_path):
    """Every response ends with EOS and generation stops at it: a tokenizer without one was an
    int(None) traceback when the first example was encoded."""
    from lora_a2.models import load_causal_lm

    model, tok = tiny_random_llama(seed=0)
    model.save_pretrained(tmp_path)
    tok.eos_token = None
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    with pytest.raises(UserError, match="has no end-of-sequence token"):
        load_causal_lm(str(tmp_path), seed=0)
