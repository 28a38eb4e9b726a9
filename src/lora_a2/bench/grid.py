"""A benchmark grid: its TOML file (built-in or a path) and its expansion into cells, each a set
of dotted config overrides (see :mod:`lora_a2.bench`)."""

from __future__ import annotations

import fnmatch
import importlib.resources
import itertools
import json
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import load_config as parse_config  # the schema alone: which task a cell is
from ..errors import UserError
from ..tasks import TASKS, resolve_task_name


@dataclass
class Cell:
    """One run of a grid: its id, the axis labels it sits at, and its config overrides."""

    cell_id: str
    labels: dict[str, str]
    seed: int
    overrides: dict[str, Any]


def builtin_grids() -> list[str]:
    root = importlib.resources.files("lora_a2") / "grids"
    return sorted(p.name[:-5] for p in root.iterdir() if p.name.endswith(".toml"))


#: the fields a results row (:func:`lora_a2.bench.tables.collect_rows`) has besides its cell's
#: axis labels: no axis may take one of these names
ROW_FIELDS = ("cell", "seed", "metric", "device", "bf16_products_in_fp32",
              "upload_fraction_of_fedavg_full", "epsilon", "wall_s", "upload_time_share")
ROW_FIELD_PREFIXES = ("total_", "final_", "best_", "last3_", "initial_", "sim_", "time_to_")


def is_row_field(name: str) -> bool:
    return name in ROW_FIELDS or name.startswith(ROW_FIELD_PREFIXES)


def load_grid(spec: str) -> dict[str, Any]:
    """A grid by built-in name or TOML path."""
    path = Path(spec)
    if not path.is_file():
        res = importlib.resources.files("lora_a2") / "grids" / f"{spec}.toml"
        if not res.is_file():
            raise UserError(f"unknown grid '{spec}': not a file, and not a built-in grid "
                            f"({', '.join(builtin_grids())})")
        text = res.read_text()
    else:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read grid '{spec}': {e}") from None
    try:
        grid = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"grid '{spec}' is not valid TOML: {str(e).splitlines()[0]}") from None
    unknown = set(grid) - {"name", "description", "seeds", "base", "axes", "include", "product"}
    if unknown:
        raise UserError(f"grid '{spec}': unknown top-level keys {sorted(unknown)}")
    grid.setdefault("name", Path(spec).stem)
    grid.setdefault("seeds", [0])
    grid.setdefault("base", {})
    grid.setdefault("axes", {})
    grid.setdefault("include", [])
    _check_shapes(spec, grid)
    return grid


def _check_shapes(spec: str, grid: dict[str, Any]) -> None:
    """Each top-level key has the shape :func:`expand` reads, or a one-line error naming it."""
    def bad(what: str, want: str) -> UserError:
        return UserError(f"grid '{spec}': {what} must be {want}")

    seeds = grid["seeds"]
    if not isinstance(seeds, list) or not all(isinstance(x, int) and not isinstance(x, bool)
                                              for x in seeds):
        raise bad("'seeds'", "a list of integers, e.g. seeds = [0, 1]")
    if not isinstance(grid["name"], str):
        raise bad("'name'", "a string")
    for key in ("base", "axes"):
        if not isinstance(grid[key], dict):
            raise bad(f"'{key}'", "a table")
    for axis, values in grid["axes"].items():
        if not isinstance(values, list) or not values:
            raise bad(f"axis '{axis}'", "a non-empty list of values or tables")
        if is_row_field(axis):
            raise bad(f"axis '{axis}'", "named apart from a results row's own fields (cell, "
                      "seed, metric, device, epsilon, wall_s, total_…, final_…, best_…, "
                      "last3_…, initial_…, sim_…, time_to_…): a label of that name would be "
                      "overwritten, mixing cells in one table row")
    product = grid.get("product", [])
    if not isinstance(product, list) or not all(isinstance(a, str) for a in product):
        raise bad("'product'", "a list of axis names")
    include = grid["include"]
    if not isinstance(include, list) or not all(isinstance(i, dict) for i in include):
        raise bad("'include'", "an array of tables ([[include]] blocks)")
    for inc in include:
        if set(inc) - {"axes", "overrides"}:
            raise bad("an [[include]] block", f"'axes' and 'overrides' only, not "
                      f"{sorted(set(inc) - {'axes', 'overrides'})}")
        axes = inc.get("axes", [])
        if not isinstance(axes, list) or not all(isinstance(a, str) for a in axes):
            raise bad("an [[include]] block's 'axes'", "a list of axis names")
        if not isinstance(inc.get("overrides", {}), dict):
            raise bad("an [[include]] block's 'overrides'", "a table")
    values = [("'base'", grid["base"])] + [(f"axis '{a}'", v) for a, v in grid["axes"].items()] \
        + [("an [[include]] block's 'overrides'", inc.get("overrides", {})) for inc in include]
    for where, value in values:
        tables = [value] if isinstance(value, dict) else [v for v in value if isinstance(v, dict)]
        if any("seed" in t for t in tables):  # expand() sets it last: it would be ignored
            raise bad(f"{where}", "free of 'seed' (each cell's seed comes from the grid's "
                      "'seeds' list, e.g. seeds = [5])")
        odd = _not_a_config_value(value)
        if odd is not None:
            raise bad(f"{where}'s value {odd!r}", "a string, number, boolean or list of them "
                      "(TOML dates and inf/nan are not config values)")


def _not_a_config_value(value: Any) -> Any:
    """The first part of a grid value that no ``--set`` could carry (a TOML date or time, an
    infinite or NaN float), or None."""
    if isinstance(value, dict):
        return next((odd for v in value.values() if (odd := _not_a_config_value(v)) is not None),
                    None)
    if isinstance(value, list):
        return next((odd for v in value if (odd := _not_a_config_value(v)) is not None), None)
    if isinstance(value, float) and not math.isfinite(value):
        return value
    if value is None or isinstance(value, (str, int, float, bool)):
        return None
    return value


def smoke_overrides(overrides: dict[str, Any]) -> dict[str, Any]:
    """What ``--smoke`` sets for a cell with these overrides: its task's
    :attr:`~lora_a2.tasks.base.LearningTask.smoke_overrides`."""
    cfg = parse_config(None, [(k, v) for k, v in overrides.items() if v is not None])
    return dict(TASKS[resolve_task_name(cfg)].smoke_overrides)


def _label(value: Any) -> str:
    if isinstance(value, dict):
        return str(value.get("label") or "+".join(f"{k}={v}" for k, v in value.items()))
    return str(value)


def _overrides(axis: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "label"}
    return {axis: value}


def expand(grid: dict[str, Any], smoke: bool = False) -> list[Cell]:
    """All cells of a grid, in a stable order: the product of the axes named by ``product``
    (default: every axis; ``product = []`` for none, when only the ``[[include]]`` blocks make
    cells — e.g. axes that only make sense together), then each ``[[include]]`` block's product
    of its own axes with its overrides."""
    axes: dict[str, list[Any]] = grid["axes"]
    product = grid.get("product", list(axes))
    if not isinstance(product, list):
        raise UserError("grid 'product' must be a list of axis names")
    # an explicit `product = []` makes no main block; a grid without axes is one cell a seed
    blocks: list[tuple[dict[str, Any], list[str]]] = \
        [({}, list(product))] if product or "product" not in grid else []
    blocks += [(inc.get("overrides", {}), list(inc.get("axes", []))) for inc in grid["include"]]
    cells: list[Cell] = []
    seen: dict[str, dict[str, Any]] = {}
    for extra, names in blocks:
        for name in names:
            if name not in axes:
                raise UserError(f"grid include or product names unknown axis '{name}'")
        for combo in itertools.product(*[axes[n] for n in names]):
            for seed in grid["seeds"]:
                labels = {n: _label(v) for n, v in zip(names, combo)}
                overrides = dict(grid["base"])
                for n, v in zip(names, combo):
                    overrides.update(_overrides(n, v))
                overrides.update(extra)
                overrides["seed"] = seed
                if smoke:  # the task's own tiny model and sizes
                    overrides.update(smoke_overrides(overrides))
                extra_label = "-".join(_label(v) for k, v in sorted(extra.items()))
                parts = [labels[n] for n in names] + ([extra_label] if extra_label else [])
                cell_id = "__".join(p.replace("/", "_").replace(" ", "") for p in parts)
                cell_id = f"{cell_id}__seed{seed}" if cell_id else f"seed{seed}"
                if cell_id in seen:  # an include block repeating a cell: the same run, once
                    if seen[cell_id] != overrides:
                        raise UserError(
                            f"grid cells named '{cell_id}' have different configs (two axis "
                            f"values with the same label?): give each value its own label")
                    continue
                seen[cell_id] = overrides
                cells.append(Cell(cell_id, {**labels, **{k: _label(v) for k, v in extra.items()}},
                                  seed, overrides))
    return cells


def _to_sets(overrides: dict[str, Any]) -> list[str]:
    """``--set`` strings; JSON literals of str/number/bool/list are valid TOML literals."""
    return [f"{k}={json.dumps(v)}" for k, v in overrides.items()]


def select(cells: list[Cell], only: list[str] | None) -> list[Cell]:
    """Cells whose id matches any of the glob patterns in ``only`` (all when empty)."""
    if not cells:
        raise UserError("the grid has no cells (is its 'seeds' list empty?)")
    if not only:
        return cells
    chosen = [c for c in cells if any(fnmatch.fnmatchcase(c.cell_id, pat) for pat in only)]
    if not chosen:
        raise UserError(f"--only {' '.join(only)} matches no cell of this grid "
                        f"(ids look like '{cells[0].cell_id}')")
    return chosen
