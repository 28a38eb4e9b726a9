"""The privacy ledger of a run with fresh ("os") DP noise: how often each round was attempted.

A round re-run after a crash draws new noise, so what its first attempt released (uploads in
local mode, the broadcast in central mode) and what the second releases are two different noisy
views of the same data: the accountant charges every attempt. The runner counts an attempt in
``privacy_ledger.json`` *before* the round draws any noise, so a crash after that point is
charged; a resume is refused when the ledger cannot say how often a kept round released noise.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import UserError
from .report import atomic_write_text

FILE = "privacy_ledger.json"


class ReleaseLedger:
    """Attempts per round, kept in ``FILE`` in the run's folder."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.attempts: dict[str, int] = {}
        if self.path.exists():
            try:
                raw = json.loads(self.path.read_text())["attempts"]
                # only the ledger's own form: round numbers written plainly, counts that are
                # whole numbers ≥ 0 (1.9 read as 1, true as 1 or "01" beside "1" would
                # under-charge; Infinity overflowed int())
                if not all(isinstance(k, str) and k.isdigit() and str(int(k)) == k
                           and type(v) is int and v >= 0 for k, v in raw.items()):
                    raise ValueError("not a count per round")
                self.attempts = dict(raw)
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
                raise UserError(f"'{self.path}' is not a privacy ledger: refusing to resume "
                                f"without knowing how often each round released noise") from None

    def attempt(self, rnd: int) -> None:
        """Count one attempt of round ``rnd`` (written at once, atomically)."""
        self.attempts[str(rnd)] = self.attempts.get(str(rnd), 0) + 1
        atomic_write_text(self.path, json.dumps({"attempts": self.attempts}))

    def extra_releases(self, rnd: int) -> int:
        """Attempts beyond the first of rounds 1 … ``rnd``: the releases the accountant charges
        on top of one per round."""
        return sum(max(0, n - 1) for r, n in self.attempts.items() if int(r) <= rnd)

    def check_resume(self, out: Path, last_round: int) -> None:
        """Refuse (one line) to resume ``out`` after ``last_round`` kept rounds when the ledger
        is missing or counts no attempt of one of them: their releases are unknown, and ε would
        be under-charged."""
        unknown = [r for r in range(1, last_round + 1) if self.attempts.get(str(r), 0) < 1]
        if unknown:
            raise UserError(
                f"cannot resume '{out}': {self.path.name} "
                + ("is missing" if not self.path.exists() else
                   f"counts no attempt of round(s) {', '.join(map(str, unknown))}")
                + ", so the privacy accountant cannot know how often those rounds released "
                "noise; start the run again (--overwrite)")
