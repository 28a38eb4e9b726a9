"""Natural clients (``data.partition = "natural"``): one client per value of an id column, for
both tasks; the client count comes from the partition; errors name what was skipped."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lora_a2.checks import load_config
from lora_a2.cli import main
from lora_a2.data import load_dataset, load_instructions
from lora_a2.data.partition import natural_partition
from lora_a2.data.readers import (SKIP_BEYOND_CAP, SKIP_BEYOND_CLIENTS, SKIP_NO_CLIENT,
                                   SKIP_SMALL_CLIENT)
from lora_a2.errors import UserError

from conftest import WORDS

#: rows per user; erin is below the default minimum of 8 training examples
SIZES = {"alice": 40, "bob": 30, "carol": 25, "dave": 20, "erin": 4}
BERT = ["model.name=tiny-random-bert", "model.max_length=16", "train.rounds=2",
        "engine.threads=1", "data.partition=natural", "data.client_column=user",
        "data.num_clients=0"]
LLAMA = ["model.name=tiny-random-llama", "model.max_length=64", "strategy.global_rank=4",
         "strategy.rank_budget=2", "task.generate_examples=2", "task.max_new_tokens=4",
         "task.samples=1", "train.rounds=2", "engine.threads=1", "data.partition=natural",
         "data.client_column=user", "data.num_clients=0", "data.min_examples_per_client=4"]
CLASSES = ["fruit", "animal", "colour"]


def user_rows(sizes: dict[str, int] = SIZES, seed: int = 0) -> list[dict]:
    """Labelled texts of each user; the text names its user, so a row's owner can be read
    back from it."""
    rng = np.random.default_rng(seed)
    rows = []
    for user, n in sizes.items():
        for i in range(n):
            y = int(rng.integers(0, 3))
            rows.append({"text": f"{user} {i} " + " ".join(rng.choice(WORDS[y], 4)),
                         "label": CLASSES[y], "user": user})
    return rows


def instruction_rows(sizes: dict[str, int], seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for user, n in sizes.items():
        for i in range(n):
            y = int(rng.integers(0, 3))
            rows.append({"instruction": f"Name a {CLASSES[y]}.", "input": f"{user} {i}",
                         "response": str(rng.choice(WORDS[y])), "category": CLASSES[y],
                         "user": user})
    return rows


@pytest.fixture
def users_csv(tmp_path: Path) -> Path:
    path = tmp_path / "users.csv"
    pd.DataFrame(user_rows()).to_csv(path, index=False)
    return path


def prepare_with(data: str, *sets: str, base: list[str] = BERT):
    from lora_a2.experiment import prepare

    return prepare(load_config(None, [f"data.name={data}", *base, *sets]))


def assert_own_rows(exp, owner_of) -> None:
    """Every client holds rows of its own id only, and all of that id's training rows."""
    ids = exp.natural_ids
    assert ids == sorted(ids), "clients in the sorted order of their ids"
    assert len(ids) == len(exp.client_train) == exp.cfg.data.num_clients
    for c, idx in enumerate(exp.client_train):
        held = np.sort(np.concatenate([idx, exp.client_test[c]]))  # its own local split too
        assert {owner_of(exp.train, int(i)) for i in held} == {ids[c]}
        assert held.tolist() == [i for i, v in enumerate(exp.train.client_ids) if v == ids[c]]


# --------------------------------------------------------------------------- the partitioner


def test_one_client_per_id_in_sorted_order_and_small_ones_dropped() -> None:
    ids = ["b", "a", "b", "c", "a", "b", "c", "c", "d", "b"]
    stats = {"read": 10, "kept": 10, "skipped": {}}
    drawn = natural_partition(ids, min_examples=2, column="u", stats=stats)
    assert drawn.natural_ids == ["a", "b", "c"]
    assert [p.tolist() for p in drawn.parts] == [[1, 4], [0, 2, 5, 9], [3, 6, 7]]
    assert stats["skipped"] == {SKIP_SMALL_CLIENT: 1} and stats["kept"] == 9  # "d"
    assert stats["natural_clients"] == {"column": "u", "found": 4, "below_min": 1,
                                        "beyond_num_clients": 0,
                                        "beyond_max_train_examples": 0, "clients": 3}


def test_numeric_ids_sort_as_numbers_and_floats_from_pandas_are_ints() -> None:
    drawn = natural_partition([10, 2.0, 2, 10, 3, 10], min_examples=1)
    assert drawn.natural_ids == [2, 3, 10]
    assert all(type(v) is int for v in drawn.natural_ids)


def test_num_clients_keeps_the_largest_and_max_examples_whole_clients() -> None:
    ids = ["a"] * 5 + ["b"] * 2 + ["c"] * 4 + ["d"] * 3
    stats = {"read": 14, "kept": 14, "skipped": {}}
    top = natural_partition(ids, num_clients=2, min_examples=1, stats=stats)
    assert top.natural_ids == ["a", "c"] and top.counts["beyond_num_clients"] == 2
    # the left-out clients' rows are skipped rows, with the reason (b 2 + d 3)
    assert stats["skipped"] == {SKIP_BEYOND_CLIENTS: 5} and stats["kept"] == 9
    stats = {"read": 14, "kept": 14, "skipped": {}}
    capped = natural_partition(ids, max_examples=10, min_examples=1, stats=stats)
    # a (5) and c (4) fit under 10 rows; d (3) would make 12: whole clients, never a sample
    assert capped.natural_ids == ["a", "c"] and capped.counts["beyond_max_train_examples"] == 2
    assert stats["skipped"] == {SKIP_BEYOND_CAP: 5} and stats["kept"] == 9
    assert sum(len(p) for p in capped.parts) == 9
    # a cap the running total meets exactly keeps the client that meets it: 5 + 4 = 9
    assert natural_partition(ids, max_examples=9, min_examples=1).natural_ids == ["a", "c"]
    # ties in size: the smaller id first
    tied = ["x"] * 3 + ["b"] * 3 + ["a"] * 3 + ["z"] * 1
    assert natural_partition(tied, num_clients=2, min_examples=1).natural_ids == ["a", "b"]
    with pytest.raises(UserError, match=r"only 4 natural clients"):
        natural_partition(ids, num_clients=5, min_examples=1)
    # asked for 3 clients, but only the largest 2 fit under the cap (a 5 + c 4 + d 3 = 12 > 9):
    # an error, not 2 clients in silence
    with pytest.raises(UserError, match=r"data.num_clients = 3, but only the largest 2 natural "
                                        r"clients fit under data.max_train_examples = 9 .*12"):
        natural_partition(ids, num_clients=3, max_examples=9, min_examples=1)
    assert natural_partition(ids, num_clients=2, max_examples=9,
                             min_examples=1).natural_ids == ["a", "c"]
    with pytest.raises(UserError, match=r"smaller than the largest natural client .*\(5 "):
        natural_partition(ids, max_examples=4, min_examples=1, column="u")


def test_no_client_big_enough_says_what_was_skipped() -> None:
    stats = {"read": 9, "kept": 6, "skipped": {"too long for model.max_length": 3}}
    with pytest.raises(UserError) as e:
        natural_partition(["a", "a", "b", "b", "c", "c"], min_examples=8, column="user",
                          stats=stats)
    msg = str(e.value)
    assert "no natural client by 'user'" in msg and "3 too long for model.max_length" in msg
    assert "6 in natural clients below" in msg and len(msg.splitlines()) == 1


# --------------------------------------------------------------------------- loaders


def test_loaders_read_ids_and_skip_rows_without_one(tmp_path: Path) -> None:
    rows = user_rows({"alice": 20, "bob": 10})
    rows[0]["user"] = None
    path = tmp_path / "u.csv"
    pd.DataFrame(rows).to_csv(path, index=False)
    train, test = load_dataset(f"csv:{path}", client_column="user", max_train_examples=5)
    assert len(train) + len(test) == 29, "no row sample of train: whole clients are kept"
    assert train.stats["skipped"] == {SKIP_NO_CLIENT: 1}
    assert all(t.split()[0] == u for t, u in zip(train.texts, train.client_ids, strict=True))
    plain, _ = load_dataset(f"csv:{path}", max_train_examples=5)
    assert plain.client_ids is None and len(plain) == 5


def test_builtin_natural_corpora() -> None:
    train, _ = load_dataset("rotten-tomatoes", client_column="")
    assert train.stats["natural_clients"]["column"] == "movie_name"
    assert 400 < len(set(train.client_ids)) <= 508
    replies, _ = load_instructions("debate-replies", client_column="")
    assert set(replies.client_ids) == {"CLINTON", "COOPER", "HOLT", "KAINE", "PENCE",
                                       "QUIJANO", "RADDATZ", "TRUMP", "WALLACE"}
    assert all(i.split(":")[0] != c for i, c in zip(replies.inputs, replies.client_ids,
                                                     strict=True)), "a reply to someone else"


# --------------------------------------------------------------------------- both tasks


def test_classification_clients_hold_only_their_own_rows(users_csv: Path) -> None:
    exp = prepare_with(f"csv:{users_csv}", "data.local_test_fraction=0.25")
    assert exp.natural_ids == ["alice", "bob", "carol", "dave"]  # erin: 4 rows < 8
    assert_own_rows(exp, lambda ds, i: ds.texts[i].split()[0])
    assert exp.train.stats["skipped"] == {SKIP_SMALL_CLIENT: sum(
        1 for u in exp.train.client_ids if u == "erin")}
    for c, idx in enumerate(exp.client_test):  # the local split is inside each client
        assert len(idx) and {exp.train.client_ids[i] for i in idx} == {exp.natural_ids[c]}
    assert len(exp.strategy.budgets) == 4


def test_causal_lm_clients_hold_only_their_own_rows(tmp_path: Path) -> None:
    path = tmp_path / "instr.json"
    path.write_text(json.dumps(instruction_rows({"u1": 12, "u3": 9, "u2": 15, "u0": 2})))
    exp = prepare_with(f"json:{path}", base=LLAMA)
    assert exp.task.name == "causal-lm"
    assert exp.natural_ids == ["u1", "u2", "u3"]
    assert_own_rows(exp, lambda ds, i: ds.inputs[i].split()[0])


def test_the_count_comes_from_the_partition_and_the_users_config_is_kept(users_csv: Path
                                                                         ) -> None:
    cfg = load_config(None, [f"data.name=csv:{users_csv}", *BERT, "strategy.name=hetlora",
                             "strategy.rank_budget=heavy-tail", "train.clients_per_round=0.5",
                             "privacy.mechanism=gaussian", "privacy.noise_multiplier=1.0",
                             "privacy.noise_source=seeded"])
    from lora_a2.experiment import prepare
    from lora_a2.private import sample_rate

    exp = prepare(cfg)
    assert cfg.data.num_clients == 0 and exp.cfg.data.num_clients == 4
    assert len(exp.strategy.budgets) == 4
    assert sample_rate(exp.cfg) == pytest.approx(2 / 4)


# --------------------------------------------------------------------------- end to end


def test_cli_run_writes_natural_ids_and_resumes(tmp_path: Path, users_csv: Path, capsys) -> None:
    out = tmp_path / "run"
    args = ["run", "--out", str(out), "--set", f"data.name=csv:{users_csv}", "--set", *BERT,
            "strategy.rank_budget=[1, 2, 2, 1]"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "4 natural clients by 'user' of 5" in printed
    assert SKIP_SMALL_CLIENT in printed  # erin's training rows
    part = json.loads((out / "partition.json").read_text())
    assert [c["natural_id"] for c in part["clients"]] == ["alice", "bob", "carol", "dave"]
    assert [c["rank_budget"] for c in part["clients"]] == [1, 2, 2, 1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_clients"] == 4
    assert summary["data_rows"]["natural_clients"]["below_min"] == 1
    # the training rows the kept clients hold: erin's are not among them
    assert summary["train_examples"] == sum(c["num_examples"] + c["local_test_examples"]
                                            for c in part["clients"])
    assert summary["train_examples"] + summary["data_rows"]["skipped"][SKIP_SMALL_CLIENT] \
        + summary["test_examples"] == summary["data_rows"]["read"] - sum(
            n for k, n in summary["data_rows"]["skipped"].items() if k != SKIP_SMALL_CLIENT)
    assert "num_clients = 0" in (out / "config.toml").read_text()  # the user's, as given
    assert main(["run", "--quiet", "--resume", str(out)]) == 0


def test_a_wrong_budget_list_is_caught_once_the_count_is_known(tmp_path: Path,
                                                               users_csv: Path) -> None:
    with pytest.raises(UserError, match=r"one budget per client \(4\)"):
        prepare_with(f"csv:{users_csv}", "strategy.rank_budget=[1, 2]")


def test_too_long_rows_are_named_when_too_few_remain(tmp_path: Path, capsys) -> None:
    rows = [{"instruction": "Say it.", "response": "x" * 400 if i % 4 else "ok"}
            for i in range(60)]
    path = tmp_path / "long.json"
    path.write_text(json.dumps(rows))
    args = ["run", "--quiet", "--out", str(tmp_path / "o"), "--set", f"data.name=json:{path}",
            "--set", "model.name=tiny-random-llama", "data.num_clients=3",
            "data.partition=iid"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "more clients (3) × min examples (8)" in err
    assert "60 rows read" in err and "too long for model.max_length" in err, err


@pytest.mark.parametrize("sets,needle", [
    (["data.client_column=nobody"], "has no column 'nobody' (config key 'data.client_column'"),
    (["data.client_column="], "needs data.client_column"),
    (["data.num_clients=9"], "data.num_clients = 9, but only 4 natural clients"),
    (["data.min_examples_per_client=50"], "no natural client by 'user' has"),
    (["data.max_train_examples=10"], "smaller than the largest natural client"),
])
def test_bad_natural_input_is_a_one_line_error(tmp_path: Path, users_csv: Path, capsys,
                                               sets: list[str], needle: str) -> None:
    args = ["run", "--quiet", "--out", str(tmp_path / "o"), "--set",
            f"data.name=csv:{users_csv}", "--set", *BERT, *sets]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


@pytest.mark.parametrize("sets,needle", [
    (["data.name=bbc-news"], "dataset 'bbc-news' has no natural clients"),
    (["data.name=rotten-tomatoes", "data.client_column=critic"], "by 'movie_name'"),
    (["data.name=chatterbot", "model.name=tiny-random-llama"], "needs debate-replies"),
])
def test_builtins_without_that_id_column_are_one_line_errors(tmp_path: Path, capsys,
                                                             sets: list[str], needle: str
                                                             ) -> None:
    args = ["run", "--quiet", "--out", str(tmp_path / "o"), "--set", *BERT,
            "data.client_column=", *sets]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err, err


def test_config_checks_against_the_count_wait_for_the_partition(capsys) -> None:
    from conftest import assert_config_error

    assert_config_error(capsys, ["data.num_clients=0"], "data.num_clients' must be ≥ 1")
    assert_config_error(capsys, ["data.partition=natural", "data.num_clients=-1"], "≥ 0")
    natural = ["data.partition=natural", "data.num_clients=0"]
    cfg = load_config(None, [*natural, "strategy.rank_budget=[1, 2, 4]",
                             "train.clients_per_round=3", "train.min_replies=2"])
    assert cfg.data.num_clients == 0
    assert load_config(None, [*natural, "engine.name=flower", "secagg.enabled=true"])


@pytest.mark.xdist_group("flower")  # a Ray simulation: one at a time
def test_flower_simulation_gets_one_node_per_natural_client(tmp_path: Path, users_csv: Path
                                                             ) -> None:
    pytest.importorskip("flwr")
    from lora_a2.report import read_metrics

    runs = {}
    for engine in ("local", "flower"):
        out = tmp_path / engine
        args = ["run", "--quiet", "--out", str(out), "--set", f"data.name=csv:{users_csv}",
                "--set", *BERT, f"engine.name={engine}", "engine.num_workers=2"]
        assert main(args) == 0
        runs[engine] = read_metrics(out / "metrics.jsonl")
    for x, y in zip(runs["local"], runs["flower"], strict=True):
        assert x["clients"] == y["clients"] == [0, 1, 2, 3]
        assert not y.get("node_warnings") and not y.get("dropped")
        for k in ("upload_bytes", "download_bytes"):
            assert x[k] == y[k], k
        assert y["accuracy"] == pytest.approx(x["accuracy"], abs=1e-6)


def test_a_client_column_without_the_natural_partition_is_one_line(capsys) -> None:
    from conftest import assert_config_error

    assert_config_error(capsys, ["data.partition=dirichlet", "data.client_column=user"],
                        "data.client_column")
