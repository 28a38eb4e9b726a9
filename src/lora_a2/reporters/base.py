"""The round-event interface every reporter implements (progress bar, metrics.jsonl, plots,
console summary, TensorBoard, MLflow).

The runner emits four events, in this order, and nothing else reaches a reporter:

- :meth:`Reporter.start` once, before the first round to run (with the round a resumed run
  starts from and the initial evaluation, round 0);
- :meth:`Reporter.client_done` after each client of a round replied or dropped out;
- :meth:`Reporter.round_end` after each round, with the round's **released** record, the line
  ``metrics.jsonl`` gets (under central DP the per-client values the release withholds never
  reach a reporter);
- :meth:`Reporter.end` once, with the run's summary (``summary.json``) and every released
  record; then :meth:`Reporter.close`, also when the run fails.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import Config
from ..errors import UserError


@dataclass
class RunStart:
    """What a reporter learns when the run starts."""

    cfg: Config
    out: Path
    #: the first round this process runs (> 1 when resumed)
    start_round: int
    #: clients sampled per round, over-selected ones included (progress in client units); 0
    #: when a round has no fixed count (asynchronous: progress in rounds)
    clients_per_round: int
    #: the task's headline metric key (``accuracy``, ``eval_loss`` …)
    metric: str
    #: the initial state's evaluation (round 0)
    initial: dict[str, Any]
    #: (metrics key, axis label, scale) of each plot the task draws
    plots: tuple[tuple[str, str, float], ...] = ()
    #: one line naming the run (plot titles)
    title: str = ""
    #: released records of rounds before ``start_round`` (a resumed run)
    earlier: list[dict[str, Any]] = field(default_factory=list)
    #: the task's metric lines of the console summary
    summary_lines: Callable[[dict[str, Any]], list[str]] | None = None


class Reporter:
    """Base class: every event is a no-op, so a reporter implements only what it needs."""

    #: the name ``report.to`` uses for it (optional reporters only)
    name: str = ""

    def start(self, run: RunStart) -> None:
        """The run starts (or resumes)."""

    def client_done(self, client: int) -> None:
        """One client of the current round replied or dropped out."""

    def round_end(self, record: dict[str, Any]) -> None:
        """A round finished; ``record`` is its released metrics line."""

    def end(self, summary: dict[str, Any], records: list[dict[str, Any]]) -> None:
        """The run finished; ``summary`` is summary.json, ``records`` every released line."""

    def close(self) -> None:
        """Release files and connections (after :meth:`end`, or when the run fails)."""


class Reporters(Reporter):
    """Several reporters as one: each event goes to each, in order.

    An optional reporter (``report.to``: a ``name``) that fails to start stops the run with a
    one-line :class:`UserError` before round 1 (a wrong tracking URI, say). One that fails
    later (a tracking server gone mid-run) is switched off with one warning line on stderr,
    and the run goes on: ``metrics.jsonl`` holds every round whatever the others do.
    """

    def __init__(self, reporters: list[Reporter]) -> None:
        self.reporters = list(reporters)

    def start(self, run: RunStart) -> None:
        for r in self.reporters:
            try:
                r.start(run)
            except Exception as e:  # noqa: BLE001  (a third-party store: any error)
                if not r.name or isinstance(e, UserError):
                    raise
                raise UserError(f"config key 'report.to': '{r.name}' could not start: "
                                f"{_first_line(e)}") from None

    def client_done(self, client: int) -> None:
        self._each("client_done", client)

    def round_end(self, record: dict[str, Any]) -> None:
        self._each("round_end", record)

    def end(self, summary: dict[str, Any], records: list[dict[str, Any]]) -> None:
        self._each("end", summary, records)

    def _each(self, event: str, *args: Any) -> None:
        for r in list(self.reporters):
            try:
                getattr(r, event)(*args)
            except Exception as e:  # noqa: BLE001
                if not r.name:
                    raise
                self.reporters.remove(r)
                print(f"lora-a2: warning: report.to '{r.name}' failed ({_first_line(e)}); it "
                      f"is off for the rest of this run, metrics.jsonl has every round",
                      file=sys.stderr)
                try:
                    r.close()
                except Exception:  # noqa: BLE001  (already failing: the warning said so)
                    pass

    def close(self) -> None:
        for r in self.reporters:
            r.close()


def _first_line(error: BaseException) -> str:
    text = (str(error).strip().splitlines() or [""])[0][:200]
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """The numeric values of a record, nested tables flattened with ``/`` (``rank_allocation/
    query``); lists (per-client rows), strings, booleans and None are left out."""
    out: dict[str, float] = {}
    for k, v in record.items():
        key = f"{prefix}{k}"
        if isinstance(v, bool) or v is None:
            continue
        if isinstance(v, (int, float)):
            out[key] = float(v)
        elif isinstance(v, dict):
            out.update(scalars(v, key + "/"))
    return out
