"""Run files: atomic writes (summary.json, checkpoints' siblings) and the JSON-lines files
(metrics.jsonl, server_log.jsonl, samples.jsonl): append, read back, truncate on resume. What is
reported each round, and how, is :mod:`lora_a2.reporters`."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from .errors import UserError


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write via a temporary file, fsync, rename, fsync the folder: a crash at any instant leaves
    either the old file or the new one, never a half-written file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


class MetricsWriter:
    """Appends one JSON object per round to ``metrics.jsonl``, flushed and fsynced per line."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":"), allow_nan=True) + "\n"
        with open(self.path, "a") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Each line of a JSONL record file (none when it is missing). A last line that does not
    parse is a write torn by a crash and is left out; a bad line before it is a
    :class:`UserError` naming it (the file was edited or damaged)."""
    path = Path(path)
    if not path.exists():
        return []
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    records = []
    for i, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines):
                break
            raise UserError(f"'{path}' line {i} is not valid JSON; the file was edited or "
                            f"damaged") from None
    return records


def truncate_metrics(path: Path, last_round: int) -> None:
    """Keep only complete lines of rounds ≤ ``last_round``, one per round in round order (drops
    a torn tail after a crash, and a round written twice — by two processes that ran the same
    folder at once — keeps its last line, so totals summed over the lines stay right)."""
    path = Path(path)
    if not path.exists():
        return
    raw = path.read_bytes()
    by_round = {r: line for r, line in _round_lines(raw).items() if r <= last_round}
    text = "".join(by_round[r] + "\n" for r in sorted(by_round))
    if text.encode() != raw:
        atomic_write_text(path, text)


def recorded_rounds(path: Path) -> set[int]:
    """The rounds a JSONL record file holds a complete line for (none when it is missing)."""
    path = Path(path)
    return set(_round_lines(path.read_bytes())) if path.exists() else set()


def _round_lines(raw: bytes) -> dict[int, str]:
    """Each round's last complete line (a torn or foreign line is skipped)."""
    by_round: dict[int, str] = {}
    for line in raw.decode("utf-8", errors="replace").split("\n"):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("round"), int):
            by_round[record["round"]] = line
    return by_round


def time_to_targets(records: list[dict[str, Any]], initial: dict[str, Any] | None, metric: str,
                    higher_is_better: bool, targets: list[float]) -> list[dict[str, Any]]:
    """For each target: the first round whose ``metric`` reached it (≥ when higher is better,
    ≤ otherwise; round 0 is ``initial``), with the simulated time (``sim_time_s``, a fleet's
    clock; None without one or when the release withheld it), the cumulative upload bytes and
    the wall time to that round. A target never reached has ``round`` None."""
    rows = ([{"round": 0, **initial}] if initial else []) + list(records)
    clocked = any("sim_time_s" in r for r in records)  # round 0 is at 0 s only on a clock
    out = []
    for target in targets:
        hit = next((r for r in rows if r.get(metric) is not None and (
            r[metric] >= target if higher_is_better else r[metric] <= target)), None)
        done = [r for r in records if hit is not None and r["round"] <= hit["round"]]
        out.append({
            "target": target, "round": None if hit is None else hit["round"],
            "sim_time_s": None if hit is None else ((0.0 if clocked else None)
                                                    if hit["round"] == 0 else
                                                    hit.get("sim_time_s")),
            "upload_bytes": None if hit is None else (0 if hit["round"] == 0 else
                                                      hit.get("cumulative_upload_bytes")),
            "wall_s": None if hit is None else sum(r.get("wall_s", 0.0) for r in done),
        })
    return out
