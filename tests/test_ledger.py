"""The privacy ledger (lora_a2.ledger): every attempt of a round under fresh noise is counted
before the round draws noise, charged beyond the first, and a resume that cannot know a kept
round's count is refused. (The run-level test: tests/test_privacy.py, a round re-run after a
crash; the refusals through the CLI: tests/test_reliability.py.)"""

from __future__ import annotations

import json

import pytest

from lora_a2.errors import UserError
from lora_a2.ledger import FILE, ReleaseLedger


def test_attempts_are_counted_written_at_once_and_read_back(tmp_path):
    path = tmp_path / FILE
    ledger = ReleaseLedger(path)
    assert ledger.attempts == {} and not path.exists()  # a new run: nothing written yet
    for rnd in (1, 2, 2, 3, 3, 3):
        ledger.attempt(rnd)
        # on disk after every attempt (a crash right after it must find it counted)
        assert json.loads(path.read_text())["attempts"] == ledger.attempts
    assert ledger.attempts == {"1": 1, "2": 2, "3": 3}
    again = ReleaseLedger(path)
    assert again.attempts == {"1": 1, "2": 2, "3": 3}
    again.attempt(4)
    assert ReleaseLedger(path).attempts == {"1": 1, "2": 2, "3": 3, "4": 1}


def test_extra_releases_count_the_attempts_beyond_the_first_up_to_a_round(tmp_path):
    ledger = ReleaseLedger(tmp_path / FILE)
    ledger.attempts = {"1": 1, "2": 3, "3": 1, "4": 2, "5": 0, "10": 4}
    assert [ledger.extra_releases(r) for r in (0, 1, 2, 3, 4, 5, 9, 10, 11)] == [
        0, 0, 2, 2, 3, 3, 3, 6, 6]  # round 10 compares as a number, not as the string "10";
    # a count of 0 (no attempt) takes nothing off the others


@pytest.mark.parametrize("text", ['{"attempts": {"one": 1}}', '{"attempts": {"1": "x"}}',
                                  '{"attempts": [1, 2]}', '{"rounds": {}}', '[]', 'not json',
                                  '{"attempts": {"1": null}}', '{"attempts": {"1": 2, "2": -1}}',
                                  # overflowed int(); read as 1 (under-charging); one round
                                  # written twice
                                  '{"attempts": {"1": Infinity}}', '{"attempts": {"1": 1e999}}',
                                  '{"attempts": {"1": 1.9}}', '{"attempts": {"1": true}}',
                                  '{"attempts": {"1": 1, "01": 3}}', '{"attempts": {"-1": 1}}',
                                  '{"attempts": {"00": 1}}'])
def test_a_file_that_is_not_a_ledger_is_refused_in_one_line(tmp_path, text):
    (tmp_path / FILE).write_text(text)
    with pytest.raises(UserError, match="is not a privacy ledger") as e:
        ReleaseLedger(tmp_path / FILE)
    assert "\n" not in str(e.value)


def test_a_resume_is_refused_when_a_kept_round_has_no_count(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    missing = ReleaseLedger(out / FILE)
    missing.check_resume(out, 0)  # nothing kept: nothing to know
    with pytest.raises(UserError, match=f"{FILE} is missing, so the privacy accountant"):
        missing.check_resume(out, 1)
    ledger = ReleaseLedger(out / FILE)
    for rnd in (1, 2, 2, 4):
        ledger.attempt(rnd)
    ledger.check_resume(out, 2)  # round 2 ran twice: known (and charged twice)
    with pytest.raises(UserError, match=r"counts no attempt of round\(s\) 3,"):
        ledger.check_resume(out, 4)
    with pytest.raises(UserError, match=r"counts no attempt of round\(s\) 3, 5,"):
        ledger.check_resume(out, 5)
    # a zero count is no attempt either: it reads, and the resume is refused for that round
    (out / FILE).write_text('{"attempts": {"1": 1, "2": 2, "3": 0, "4": 1}}')
    with pytest.raises(UserError, match=r"round\(s\) 3, 5,"):
        ReleaseLedger(out / FILE).check_resume(out, 5)
