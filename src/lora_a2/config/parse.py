"""Reading a config: TOML files, nested dicts and ``--set key=value`` overrides, each key checked
against the schema (unknown keys get the nearest valid one in a one-line error)."""

from __future__ import annotations

import difflib
import math
import re
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

from ..errors import UserError
from .schema import LEGACY_DEFAULTS, LEGACY_STRATEGY_OPTIONS, SCHEMA_VERSION, SECTIONS, Config
from .validate import require, validate


def all_keys() -> list[str]:
    """Every valid dotted key, for error messages and docs/CONFIGURATION.md."""
    keys = ["schema_version", "seed"]
    for sec, cls in SECTIONS.items():
        keys += [f"{sec}.{f.name}" for f in fields(cls)]
    return keys


def _value_keys() -> list[str]:
    """Keys that hold a value (``strategy.options`` a table of them), short-form strategy
    options included."""
    return all_keys() + [f"strategy.{k}" for k in LEGACY_STRATEGY_OPTIONS]


def _unknown(key: str) -> UserError:
    known = _value_keys()
    near = difflib.get_close_matches(key, known, n=1, cutoff=0.5)
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    return UserError(f"unknown config key '{key}'{hint}")


def coerce_value(key: str, value: Any, annot: Any) -> Any:
    """Check a value's type against the field annotation; ints are accepted for floats."""
    if annot is Any:
        return value
    if annot is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"config key '{key}' must be true or false, got {value!r}")
    if annot is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise UserError(f"config key '{key}' must be an integer, got {value!r}")
    if annot is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):  # TOML has inf and nan; no setting means either
                raise UserError(f"config key '{key}' must be a finite number, got {value!r}")
            return value if isinstance(value, int) and key == "train.clients_per_round" else float(value)
        raise UserError(f"config key '{key}' must be a number, got {value!r}")
    if annot is str:
        if isinstance(value, str):
            return value
        raise UserError(f"config key '{key}' must be a string, got {value!r}")
    if get_origin(annot) is list:
        (item,) = get_args(annot)
        if not isinstance(value, list):
            raise UserError(f"config key '{key}' must be a list, got {value!r}")
        return [coerce_value(key, v, item) for v in value]
    return value


def _apply(cfg: Config, key: str, value: Any) -> None:
    parts = key.split(".")
    if parts[:2] == ["strategy", "options"]:
        if len(parts) == 2:
            if not isinstance(value, dict):
                raise UserError(f"config key 'strategy.options' must be a table, got {value!r}")
            cfg.strategy.options.update(value)  # beside short-form keys read before it
        elif len(parts) == 3 and parts[2]:
            cfg.strategy.options[parts[2]] = value
        else:
            raise _unknown(key)
        return
    if parts[0] == "strategy" and len(parts) == 2 and parts[1] in LEGACY_STRATEGY_OPTIONS:
        cfg.strategy.options[parts[1]] = value  # the short form of a built-in's option
        return
    if parts == ["seed"]:
        cfg.seed = coerce_value(key, value, int)
        return
    if parts == ["schema_version"]:
        version = coerce_value(key, value, int)
        require(1 <= version <= SCHEMA_VERSION, key, f"must be 1 … {SCHEMA_VERSION}", value)
        cfg.schema_version = version
        for k, v in LEGACY_DEFAULTS.get(version, {}).items():
            _apply(cfg, k, v)
        return
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise _unknown(key)
    sec, name = parts
    obj = getattr(cfg, sec)
    hints = get_type_hints(type(obj))
    if name not in hints:
        raise _unknown(key)
    setattr(obj, name, coerce_value(key, value, hints[name]))


def flatten(d: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and not prefix and k in SECTIONS:
            out += flatten(v, key + ".")
        elif isinstance(v, dict) and key in _value_keys():  # strategy.options among them
            out.append((key, v))  # a table where a value belongs: its type check names it
        elif isinstance(v, dict):
            raise _unknown(key)
        else:
            out.append((key, v))
    return out


def differences(a: Config, b: Config) -> list[tuple[str, Any, Any]]:
    """The dotted keys where two configs differ, sorted, each with its value in ``a`` and in
    ``b`` — ignoring what does not change a run: ``schema_version`` (the same run written by an
    older schema), and ``privacy.noise_source`` when neither config draws noise."""
    fa, fb = dict(flatten(a.to_dict())), dict(flatten(b.to_dict()))
    ignore = {"schema_version"}
    if fa.get("privacy.mechanism") == fb.get("privacy.mechanism") == "none":
        ignore.add("privacy.noise_source")
    return [(k, fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb))
            if k not in ignore and fa.get(k) != fb.get(k)]


def parse_set(item: str) -> tuple[str, Any]:
    """Parse one ``--set key=value``; the value is a TOML literal, else a bare string."""
    if "=" not in item:
        raise UserError(f"--set expects key=value, got '{item}'")
    key, raw = item.split("=", 1)
    key, raw = key.strip(), raw.strip()
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


_PAIR = re.compile(r"^[A-Za-z_][\w.]*=")
#: whitespace before the next ``key=`` of an item holding several pairs
_NEXT_PAIR = re.compile(r"\s+(?=[A-Za-z_][\w.]*=)")


def split_sets(items: str | list[str]) -> list[str]:
    """``key=value`` items; one item holding several space-separated pairs (``"a=1 b=2"``, as
    flwr's ``--run-config``) is split before each ``key=`` — so a value with spaces stays
    whole (``strategy.rank_budget=[1, 2]``, ``data.name="csv:my file.csv" train.rounds=2`` is
    two pairs)."""
    out: list[str] = []
    for item in [items] if isinstance(items, str) else items:
        if not isinstance(item, str):
            raise UserError(f"an override must be a 'key=value' string, got {item!r}")
        item = item.strip()
        out += _NEXT_PAIR.split(item) if _PAIR.match(item) else [item]
    return [o for o in out if o]


def overrides_to_sets(overrides: Any) -> list[str | tuple[str, Any]]:
    """Overrides as :func:`load_config` takes them, from a dict of dotted keys (or nested
    tables), a list of ``key=value`` strings, or one string of space-separated pairs."""
    if overrides is None:
        return []
    if isinstance(overrides, dict):
        return [(k, v) for k, v in flatten(overrides) if v is not None]
    if isinstance(overrides, str):
        return list(split_sets(overrides))
    if isinstance(overrides, (list, tuple)):  # 'key=value' strings and (key, value) pairs
        out: list[str | tuple[str, Any]] = []
        for item in overrides:
            if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
                out.append(item)
            else:
                out += split_sets([item])
        return out
    raise UserError(f"overrides must be a dict, a list of 'key=value' strings or one string, "
                    f"got {type(overrides).__name__}")


def config_from_dict(data: dict[str, Any], overrides: list[str | tuple[str, Any]] | None = None
                     ) -> Config:
    """A validated config from a nested dict (``Config.to_dict()``) plus overrides."""
    cfg = Config()
    items = [(k, v) for k, v in flatten(data) if v is not None]
    # a file's schema version (1 when it has none) first: it sets that version's defaults,
    # which the file's own keys then override
    version = next((v for k, v in items if k == "schema_version"), 1 if items else None)
    if version is not None:
        _apply(cfg, "schema_version", version)
    for key, value in items:
        if key != "schema_version":
            _apply(cfg, key, value)
    for item in overrides or []:
        key, value = item if isinstance(item, tuple) else parse_set(item)
        _apply(cfg, key, value)
    validate(cfg)
    return cfg


def load_config(path: str | Path | None = None,
                overrides: list[str | tuple[str, Any]] | None = None) -> Config:
    """Build a validated :class:`Config` from defaults, an optional TOML file and overrides
    (``key=value`` strings as ``--set`` takes them, or ``(key, value)`` pairs)."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if p.is_dir():
            raise UserError(f"config file '{p}' is a folder, not a TOML file")
        if not p.is_file():
            raise UserError(f"config file '{p}' does not exist")
        try:
            data = tomllib.loads(p.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"config file '{p}' is not valid TOML: {str(e).splitlines()[0]}") from None
        except OSError as e:
            raise UserError(f"config file '{p}' cannot be read: {e.strerror or e}") from None
    return config_from_dict(data, overrides)


