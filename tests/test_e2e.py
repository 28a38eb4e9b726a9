"""End to end through the CLI: outputs, determinism, PEFT export — tiny model and real MiniLM."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lora_a2.cli import main
from lora_a2.engines.local import sample_clients
from lora_a2.report import read_metrics

from conftest import TINY, run_cli

def run(tmp_path, name, sets, data):
    return run_cli(tmp_path / name, *sets, data=data, base=[])


def _strip_times(records):
    return [{k: v for k, v in r.items() if not k.endswith("wall_s")} for r in records]


def test_outputs_and_metrics_fields(tmp_path, synthetic_csv):
    out = run(tmp_path, "a", TINY, synthetic_csv)
    for f in ("config.toml", "metrics.jsonl", "summary.json", "partition.json",
              "adapter/adapter_config.json", "adapter/adapter_model.safetensors",
              "plots/accuracy_per_round.png", "plots/accuracy_vs_upload.png"):
        assert (out / f).is_file(), f
    records = read_metrics(out / "metrics.jsonl")
    assert [r["round"] for r in records] == [1, 2, 3]
    assert [r["active_factor"] for r in records] == ["B", "A", "B"]
    for r in records:
        for k in ("round", "strategy", "active_factor", "accuracy", "loss", "upload_bytes",
                  "download_bytes", "upload_params", "clients", "wall_s"):
            assert k in r
        assert r["upload_bytes"] == sum(c["upload_bytes"] for c in r["per_client"])
        assert r["upload_bytes"] > 4 * r["upload_params"]  # values are float32, plus header
    summary = json.loads((out / "summary.json").read_text())
    assert summary["total_upload_bytes"] == sum(r["upload_bytes"] for r in records)
    assert 0 < summary["upload_fraction_of_fedavg_full"] < 1
    # the references (report.references), recomputed from the exported adapter: FL+LoRA at
    # each client's budget (2) sends r·(d_in + d_out) per module plus the trained head
    from safetensors.torch import load_file
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    per_rank = sum(t.shape[1] for n, t in weights.items() if "lora_A" in n) + sum(
        t.shape[0] for n, t in weights.items() if "lora_B" in n)
    head = sum(t.numel() for n, t in weights.items() if "lora_" not in n)
    assert per_rank > 0 and head > 0
    accepted = sum(r["num_replies"] for r in records)
    assert summary["fl_lora_upload_params"] == accepted * (2 * per_rank + head)
    assert summary["upload_fraction_of_fl_lora"] == pytest.approx(
        summary["total_upload_params"] / summary["fl_lora_upload_params"])
    assert summary["fedavg_full_upload_params"] % accepted == 0
    assert summary["fedavg_full_upload_bytes"] == 4 * summary["fedavg_full_upload_params"]
    # what ran it: the package version, the commit of this checkout, precision, noise source
    import subprocess
    from importlib import metadata
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                          cwd=Path(__file__).parent).stdout.strip()
    assert summary["lora_a2_version"] == metadata.version("lora-a2")
    assert summary["git_commit"] == (head or None)
    assert summary["precision"] == "fp32" and summary["noise_source"] is None
    assert summary["schema_version"] == 2
    assert summary["engine"] == "local" and summary["failed_client_rounds"] == 0
    # the resolved config reruns
    assert main(["run", "--quiet", "--config", str(out / "config.toml"), "--out",
                 str(tmp_path / "again")]) == 0
    # and resuming the run with another config is refused, the run untouched
    from lora_a2.checks import load_config
    from lora_a2.errors import UserError
    from lora_a2.runner import run_experiment
    other = load_config(out / "config.toml", ["train.rounds=5"])
    before = (out / "metrics.jsonl").read_bytes()
    with pytest.raises(UserError, match="'train.rounds' is 5, the run's own is 3"):
        run_experiment(other, out, resume=True, progress=False)
    assert (out / "metrics.jsonl").read_bytes() == before


def test_same_seed_identical_metrics_different_seed_different_partition(tmp_path, synthetic_csv):
    a = read_metrics(run(tmp_path, "a", TINY, synthetic_csv) / "metrics.jsonl")
    b = read_metrics(run(tmp_path, "b", TINY, synthetic_csv) / "metrics.jsonl")
    assert _strip_times(a) == _strip_times(b)
    out_c = run(tmp_path, "c", TINY + ["seed=1"], synthetic_csv)
    pa = json.loads((tmp_path / "a" / "partition.json").read_text())
    pc = json.loads((out_c / "partition.json").read_text())
    assert [c["label_counts"] for c in pa["clients"]] != [c["label_counts"] for c in pc["clients"]]


def test_refuses_existing_output_dir(tmp_path, synthetic_csv, capsys):
    out = run(tmp_path, "a", TINY[:2] + ["train.rounds=1"], synthetic_csv)
    before = (out / "metrics.jsonl").read_bytes()
    code = main(["run", "--quiet", "--out", str(out), "--set", f"data.name=csv:{synthetic_csv}"])
    assert code == 2 and "not empty" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_bytes() == before


@pytest.mark.parametrize("strategy", ["fl-lora", "ffa-lora", "fedavg-full"])
def test_baselines_run(tmp_path, synthetic_csv, strategy):
    out = run(tmp_path, strategy, TINY + [f"strategy.name={strategy}", "train.rounds=2"],
              synthetic_csv)
    s = json.loads((out / "summary.json").read_text())
    assert s["strategy"] == strategy and s["total_upload_bytes"] > 0


def test_tiny_adapter_reloads_through_peft(tmp_path, synthetic_csv):
    from peft import PeftModel
    from transformers import BertForSequenceClassification

    from lora_a2.tasks.classification import encode_texts
    from lora_a2.data import load_dataset
    from lora_a2.models import tiny_tokenizer

    out = run(tmp_path, "a", TINY, synthetic_csv)
    base = BertForSequenceClassification.from_pretrained(out / "base_model")
    model = PeftModel.from_pretrained(base, out / "adapter").eval()
    _, test = load_dataset(f"csv:{synthetic_csv}", seed=0)
    enc = encode_texts(tiny_tokenizer(), test.texts, test.labels, 24)
    with torch.no_grad():
        logits = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
    acc = float((logits.argmax(-1) == enc.labels).float().mean())
    summary = json.loads((out / "summary.json").read_text())
    assert abs(acc - summary["final_accuracy"]) < 1e-6
    # the loss too: accuracy on a random tiny model barely depends on the factors (an export
    # with every lora_B zeroed passed the accuracy check alone)
    loss = float(torch.nn.functional.cross_entropy(logits, enc.labels))
    assert loss == pytest.approx(summary["final_loss"], rel=1e-5)


# ---------------------------------------------------------------------- real MiniLM
MINI = ["data.name=bbc-news", "data.num_clients=4", "data.partition=iid",
        "data.max_train_examples=160", "data.max_test_examples=120", "model.max_length=32",
        "train.rounds=3", "strategy.rank_budget=2", "model.head=trained", "strategy.lr=2e-3"]


@pytest.mark.e2e
def test_minilm_lora_a2_learns_and_adapter_reproduces_accuracy(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from lora_a2.tasks.classification import encode_texts
    from lora_a2.data import load_dataset
    from lora_a2.models import minilm_path

    out = tmp_path / "mini"
    args = ["run", "--quiet", "--out", str(out)]
    for s in MINI:
        args += ["--set", s]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    _, test = load_dataset("bbc-news", seed=0, max_test_examples=120)
    majority = np.bincount(test.labels).max() / len(test.labels)
    assert summary["final_accuracy"] > majority + 0.2, (summary["final_accuracy"], majority)

    # The exported adapter, loaded by plain PEFT on a fresh base, gives the same accuracy.
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=5)
    model = PeftModel.from_pretrained(base, out / "adapter").eval()
    enc = encode_texts(AutoTokenizer.from_pretrained(minilm_path()), test.texts, test.labels, 32)
    with torch.no_grad():
        preds = torch.cat([model(input_ids=enc.input_ids[i:i + 64],
                                 attention_mask=enc.attention_mask[i:i + 64]).logits.argmax(-1)
                           for i in range(0, len(test.labels), 64)])
    acc = float((preds == enc.labels).float().mean())
    assert abs(acc - summary["final_accuracy"]) <= 1.0 / len(test.labels) + 1e-9


def test_client_sampling_and_local_accuracy(tmp_path, synthetic_csv):
    out = run(tmp_path, "s", TINY + ["train.clients_per_round=0.5", "data.local_test_fraction=0.25",
                                     "train.rounds=2"], synthetic_csv)
    records = read_metrics(out / "metrics.jsonl")
    assert all(len(r["clients"]) == 2 for r in records)
    # the seeded sampler's draws (the same on every engine), and it does vary over rounds
    assert [r["clients"] for r in records] == [sample_clients(4, 2, 0, rnd) for rnd in (1, 2)]
    assert len({tuple(sample_clients(4, 2, 0, rnd)) for rnd in range(1, 11)}) > 1
    assert all(len(r["local_accuracy"]) == 4 for r in records)
    part = json.loads((out / "partition.json").read_text())
    assert all(c["local_test_examples"] >= 1 for c in part["clients"])


def test_bad_data_file_is_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("txt,label\nhello,1\n")
    code = main(["run", "--quiet", "--out", str(tmp_path / "o"), "--set", f"data.name=csv:{bad}",
                 "--set", "model.name=tiny-random-bert"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "'text'" in err and err.count("\n") == 0
