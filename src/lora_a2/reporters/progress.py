"""The progress bar (tqdm on stderr): clients done out of the run's, the round, and the
headline metric, loss and cumulative upload after each round."""

from __future__ import annotations

import sys
from typing import Any

from .base import Reporter, RunStart


class ProgressBar(Reporter):
    def __init__(self) -> None:
        self.bar: Any = None
        self.metric = ""
        self.rounds = 0
        self.round = 0
        self.per_round = 0

    def start(self, run: RunStart) -> None:
        from tqdm import tqdm

        self.metric, self.rounds = run.metric, run.cfg.train.rounds
        self.per_round = run.clients_per_round
        unit = "client" if self.per_round else "round"  # 0: no fixed count a round (async)
        per = self.per_round or 1
        self.bar = tqdm(total=run.cfg.train.rounds * per, unit=unit,
                        file=sys.stderr, dynamic_ncols=True,
                        bar_format="{desc} {bar} {n_fmt}/{total_fmt} " + unit + "s "
                                   "[{elapsed}<{remaining}]{postfix}")
        self.bar.update((run.start_round - 1) * per)
        self._describe(run.start_round)

    def _describe(self, rnd: int) -> None:
        self.round = rnd
        if rnd <= self.rounds:
            self.bar.set_description(f"round {rnd}/{self.rounds}")

    def client_done(self, client: int) -> None:
        if self.bar is not None and self.per_round:
            self.bar.update(1)

    def round_end(self, record: dict[str, Any]) -> None:
        if self.bar is None:
            return
        shown = {self.metric: f"{100 * record[self.metric]:.1f}%"} \
            if record.get(self.metric) is not None else {}
        if record.get("loss") is not None:
            shown["loss"] = f"{record['loss']:.3f}"
        if "cumulative_upload_bytes" in record:
            shown["up"] = f"{record['cumulative_upload_bytes'] / 1e6:.1f}MB"
        # the bar stands at the round's end whatever was counted within it
        self.bar.update(record["round"] * (self.per_round or 1) - self.bar.n)
        self.bar.set_postfix(shown)
        self._describe(record["round"] + 1)

    def end(self, summary: dict[str, Any], records: list[dict[str, Any]]) -> None:
        self.close()  # before the console summary prints below it

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
