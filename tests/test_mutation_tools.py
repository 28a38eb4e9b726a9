"""The mutation-testing tools (scripts/mutation.sh, mutation/report.py): every module is
configured in the three places that name it, and an interrupted full run is kept and resumed
with its time summed (docs/DEVELOPMENT.md, "Mutation testing")."""

from __future__ import annotations

import importlib.util
import json
import re
import sqlite3
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.fixture
def report(tmp_path, monkeypatch):
    monkeypatch.setenv("MUTATION_SESSIONS", str(tmp_path / "sessions"))
    (tmp_path / "sessions").mkdir()
    spec = importlib.util.spec_from_file_location("mutation_report",
                                                  ROOT / "mutation" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_module_is_named_in_the_script_the_report_and_a_config(report):
    script = (ROOT / "scripts" / "mutation.sh").read_text()
    listed = re.search(r"^ALL=\((.*)\)$", script, re.M).group(1).split()
    assert listed == list(report.ORDER)
    assert {p.stem for p in (ROOT / "mutation").glob("*.toml")} - {"survivors"} == set(listed)
    for m in listed:  # each config mutates a real module and runs real test files
        assert (ROOT / report.config(m)["module-path"]).is_file(), m
        assert all((ROOT / f).is_file() for f in report.files(m)), m


def _session(path: Path, done: int, total: int) -> None:
    db = sqlite3.connect(path)
    with db:
        db.execute("CREATE TABLE mutation_specs (job_id TEXT)")
        db.execute("CREATE TABLE work_results (job_id TEXT, test_outcome TEXT)")
        db.executemany("INSERT INTO mutation_specs VALUES (?)", [(str(i),) for i in range(total)])
        db.executemany("INSERT INTO work_results VALUES (?, 'KILLED')",
                       [(str(i),) for i in range(done)])
    db.close()


def test_an_interrupted_run_is_kept_resumed_and_its_parts_timed_as_one(report, tmp_path,
                                                                       monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the fingerprint reads the module from the checkout
    fp = report._fingerprint("validation")
    work = tmp_path / "work.sqlite"
    _session(work, 3, 10)
    report.save_partial("validation", str(work), "40", "abc1234", "tests/a.py", fp)
    assert "3 of 10 mutants done" in capsys.readouterr().out
    _session(work2 := tmp_path / "work2.sqlite", 0, 1)
    report.resume_partial("validation", str(work2))  # the kept session replaces the scratch one
    assert "resuming validation: 3 of 10" in capsys.readouterr().out
    # a second interruption adds its seconds; the first part's commit names the run
    report.save_partial("validation", str(work2), "25", "def5678", "tests/b.py", fp)
    meta = json.loads((tmp_path / "sessions" / "validation.partial.json").read_text())
    assert (meta["seconds"], meta["commit"], meta["dirty"]) == (65, "abc1234",
                                                                 ["tests/a.py", "tests/b.py"])
    report.record("validation", "resume", "10", "def5678", "")
    full = json.loads((tmp_path / "sessions" / "validation.json").read_text())["full"]
    assert (full["seconds"], full["commit"]) == (75, "abc1234")
    assert not list((tmp_path / "sessions").glob("validation.partial.*"))  # done: forgotten


def test_a_module_changed_since_its_interrupted_run_is_not_resumed(report, tmp_path,
                                                                   monkeypatch):
    monkeypatch.chdir(ROOT)
    _session(work := tmp_path / "w.sqlite", 1, 2)
    report.save_partial("validation", str(work), "5", "abc", "", "another fingerprint")
    with pytest.raises(SystemExit, match="changed since its interrupted run started"):
        report.resume_partial("validation", str(work))


def test_a_survivors_run_reopens_all_survivors_or_only_those_without_a_reason(
        report, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    (tmp_path / "sessions" / "validation.json").write_text(
        json.dumps({"module_code_sha256": report._fingerprint("validation")}))
    monkeypatch.setattr(report, "_notes", lambda: [
        {"module": "validation", "operator": "core/NumberReplacer", "mutated": "x = 2",
         "why": "equivalent: a test's"}])
    diff = "--- a\n+++ b\n-x = 1\n+{}\n"
    rows = [("0", "core/NumberReplacer", "KILLED", diff.format("x = 0")),
            ("1", "core/NumberReplacer", "SURVIVED", diff.format("x = 2")),  # has a reason
            ("2", "core/AddNot", "SURVIVED", diff.format("x = 2")),  # another operator
            ("3", "core/NumberReplacer", "SURVIVED", diff.format("x = 3"))]

    def session() -> Path:
        path = tmp_path / "s.sqlite"
        path.unlink(missing_ok=True)
        db = sqlite3.connect(path)
        with db:
            db.execute("CREATE TABLE mutation_specs (job_id TEXT, operator_name TEXT)")
            db.execute("CREATE TABLE work_results (job_id TEXT, test_outcome TEXT, diff TEXT)")
            db.executemany("INSERT INTO mutation_specs VALUES (?, ?)", [r[:2] for r in rows])
            db.executemany("INSERT INTO work_results VALUES (?, ?, ?)",
                           [(r[0], r[2], r[3]) for r in rows])
        db.close()
        return path

    def left(path: Path) -> list[str]:
        db = sqlite3.connect(path)
        out = [r[0] for r in db.execute("SELECT job_id FROM work_results ORDER BY job_id")]
        db.close()
        return out

    report.reopen("validation", str(path := session()))
    assert left(path) == ["0"] and "re-testing 3 survivors" in capsys.readouterr().out
    report.reopen("validation", str(path := session()), "unexplained")
    assert left(path) == ["0", "1"]
    assert "re-testing 2 survivors without a reason" in capsys.readouterr().out
    # a misspelt selector is refused in one line, before the session is touched
    with pytest.raises(SystemExit, match="^mutation: reopen: 'unexplaned' is not one of"):
        report.reopen("validation", str(path := session()), "unexplaned")
    assert left(path) == ["0", "1", "2", "3"]


def test_a_round_that_re_tested_only_unexplained_survivors_is_labelled_so(report, tmp_path,
                                                                          monkeypatch):
    monkeypatch.chdir(ROOT)
    report.record("validation", "full", "60", "abc", "")
    report.record("validation", "survivors", "30", "def", "tests/a.py")
    report.record("validation", "unexplained", "6", "0123", "")
    meta = json.loads((tmp_path / "sessions" / "validation.json").read_text())
    assert [(what, r["seconds"]) for what, r in report._runs(meta)] == [
        ("all mutants", 60), ("survivors re-tested", 30),
        ("survivors without a reason re-tested", 6)]
    with pytest.raises(SystemExit, match="^mutation: record: 'survivor' is not one of"):
        report.record("validation", "survivor", "1", "abc", "")
    assert len(json.loads((tmp_path / "sessions" / "validation.json").read_text())
               ["survivors"]) == 2  # the refused record changed nothing


def test_a_module_without_a_session_keeps_its_last_recorded_row_and_survivors(report):
    """Sessions are not committed: rendering in a new checkout after running two modules wrote
    every other module as "not run", losing the committed record of its last run."""
    previous = (ROOT / "mutation" / "REPORT.md").read_text()
    row, section = report.carried(previous, "privacy")
    assert row.startswith("| privacy | ") and "| not run |" not in row
    assert section.startswith("### privacy (") and "\n### " not in section
    last = report.ORDER[-1]  # the last section runs to the end of the file
    assert report.carried(previous, last)[1].startswith(f"### {last} (")
    assert report.carried("| x | – | – | – | – | – | – | not run | |\n", "x") == (None, None)
