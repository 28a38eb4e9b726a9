"""``DIR/metrics.jsonl``: one JSON line per round, fsynced (the file a resume reads back)."""

from __future__ import annotations

from typing import Any

from ..report import MetricsWriter
from .base import Reporter, RunStart


class MetricsFile(Reporter):
    def __init__(self) -> None:
        self.writer: MetricsWriter | None = None

    def start(self, run: RunStart) -> None:
        self.writer = MetricsWriter(run.out / "metrics.jsonl")

    def round_end(self, record: dict[str, Any]) -> None:
        assert self.writer is not None
        self.writer.write(record)
