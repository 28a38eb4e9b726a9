"""Helpers of scripts/mutation.sh: the files a module's run depends on, and mutation/REPORT.md.

    python mutation/report.py files MODULE          # the module's source and test files
    python mutation/report.py skip-annotations MODULE SESSION  # after init: skip the mutants
                                                    # inside type annotations (never evaluated)
    python mutation/report.py reopen MODULE SESSION [all|unexplained]  # forget SESSION's
                                                    # survivors (or those without a reason)
    python mutation/report.py record MODULE MODE SECONDS COMMIT DIRTY  # after a run (MODE: full,
                                                    # resume, survivors or unexplained)
    python mutation/report.py fingerprint MODULE    # the module's code fingerprint
    python mutation/report.py save-partial MODULE SESSION SECONDS COMMIT DIRTY FINGERPRINT
                                                    # an interrupted full run, kept for --resume
    python mutation/report.py resume-partial MODULE SESSION  # continue it (same code only)
    python mutation/report.py render                # mutation/sessions/* → mutation/REPORT.md

Score = (killed + timed out) / total. cosmic-ray records a timed-out mutant as killed with the
output "timeout"; the report counts those apart. Every survivor is listed with the reason it was
judged equivalent or harmless in mutation/survivors.toml (matched by module, operator and the
mutated source line), or as UNEXPLAINED.
"""

from __future__ import annotations

import ast
import datetime
import hashlib
import json
import os
import re
import shlex
import sqlite3
import sys
import tomllib
from pathlib import Path

HERE = Path(__file__).resolve().parent
# In the checkout: scripts/mutation.sh sets it when it runs this file from its scratch copy.
SESSIONS = Path(os.environ.get("MUTATION_SESSIONS", HERE / "sessions"))
ORDER = ("privacy", "selection", "aggregation", "lowrank", "payload", "validation", "budgets",
         "secure_sum", "private", "audit", "ledger")


def config(module: str) -> dict:
    return tomllib.loads((HERE / f"{module}.toml").read_text())["cosmic-ray"]


def files(module: str) -> list[str]:
    cfg = config(module)
    tests = {a.split("::")[0] for a in shlex.split(cfg["test-command"]) if a.startswith("tests/")}
    return [cfg["module-path"], "tests/conftest.py", *sorted(tests)]


def code_fingerprint(source: str) -> str:
    """SHA-256 of the module's code: its AST without docstrings, so an edit of docs or comments
    keeps a session valid (cosmic-ray finds a mutant by operator and occurrence, and strings and
    comments are never mutated)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(body, list) and body and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()


def _fingerprint(module: str) -> str:
    return code_fingerprint(Path(config(module)["module-path"]).read_text())


ANNOTATION = "skipped: inside a type annotation, never evaluated (from __future__ import annotations)"


def _annotation_spans(source: str) -> list[tuple[tuple[int, int], tuple[int, int]]]:
    """(start, end) of every annotation, as parso positions: line from 1, column in characters."""
    tree = ast.parse(source)
    if not any(isinstance(n, ast.ImportFrom) and n.module == "__future__"
               and any(a.name == "annotations" for a in n.names) for n in tree.body):
        return []  # annotations are evaluated: their mutants are real
    lines = source.splitlines()

    def pos(line: int, byte_col: int) -> tuple[int, int]:
        return line, len(lines[line - 1].encode()[:byte_col].decode())

    spans = []
    for node in ast.walk(tree):
        found = []
        if isinstance(node, ast.arg) and node.annotation is not None:
            found.append(node.annotation)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.returns is not None:
            found.append(node.returns)
        if isinstance(node, ast.AnnAssign):
            found.append(node.annotation)
        spans += [(pos(a.lineno, a.col_offset), pos(a.end_lineno, a.end_col_offset)) for a in found]
    return spans


def skip_annotations(module: str, session: str, source_file: str | None = None) -> None:
    """Mark the not yet run (or survived) mutants that lie inside a type annotation as skipped.

    Under ``from __future__ import annotations`` (every configured module has it) annotations
    are strings that nothing evaluates, so such a mutant cannot change behaviour; cosmic-ray
    still makes them (``X | None`` gives eleven)."""
    source = Path(source_file or config(module)["module-path"]).read_text()
    spans = _annotation_spans(source)
    db = sqlite3.connect(session)
    n = 0
    with db:
        rows = db.execute("SELECT m.job_id, m.start_pos_row, m.start_pos_col, m.end_pos_row, "
                          "m.end_pos_col, r.test_outcome FROM mutation_specs m "
                          "LEFT JOIN work_results r USING (job_id)").fetchall()
        for job, r0, c0, r1, c1, outcome in rows:
            if outcome not in (None, "SURVIVED"):
                continue
            if any(a <= (r0, c0) and (r1, c1) <= b for a, b in spans):
                db.execute("INSERT OR REPLACE INTO work_results (worker_outcome, output, "
                           "test_outcome, diff, job_id) VALUES ('SKIPPED', ?, NULL, NULL, ?)",
                           (ANNOTATION, job))
                n += 1
    db.close()
    print(f"mutation: {module}: {n} mutants inside type annotations skipped")


def reopen(module: str, session: str, which: str = "all") -> None:
    """Mark the survivors of ``session`` as not run — all of them, or (``which`` =
    ``unexplained``) those without a reason in survivors.toml; refuse if the module changed
    since. Adding tests can only turn survivors into kills, so either way the rest of the
    session stays valid; re-testing all of them also shows a reason that a new test outdated."""
    if which not in ("all", "unexplained"):
        sys.exit(f"mutation: reopen: '{which}' is not one of all, unexplained")
    meta = json.loads((SESSIONS / f"{module}.json").read_text())
    if meta.get("module_code_sha256") != _fingerprint(module):
        sys.exit(f"mutation: the code of {config(module)['module-path']} changed since its last "
                 f"full run; run scripts/mutation.sh {module}")
    db = sqlite3.connect(session)
    with db:
        rows = db.execute("SELECT r.job_id, s.operator_name, r.diff FROM work_results r "
                          "JOIN mutation_specs s ON s.job_id = r.job_id "
                          "WHERE r.test_outcome = 'SURVIVED'").fetchall()
        notes = _notes()
        ids = [job for job, op, diff in rows
               if which == "all" or not _why(notes, module, op, _diff_lines(diff or "")[1])]
        db.executemany("DELETE FROM work_results WHERE job_id = ?", [(j,) for j in ids])
    db.close()
    what = "survivors" if which == "all" else "survivors without a reason"
    print(f"mutation: re-testing {len(ids)} {what} of {module}")


def _partial(module: str) -> tuple[Path, Path]:
    return SESSIONS / f"{module}.partial.sqlite", SESSIONS / f"{module}.partial.json"


def _copy_db(src: str | Path, dst: str | Path) -> None:
    """Copy a session through SQLite's backup API: opening ``src`` rolls back a transaction
    that an interrupted cosmic-ray left half written, where a plain copy would not."""
    a, b = sqlite3.connect(src), sqlite3.connect(dst)
    with b:
        a.backup(b)
    a.close()
    b.close()


def _progress(session: str | Path) -> str:
    db = sqlite3.connect(session)
    total = db.execute("SELECT COUNT(*) FROM mutation_specs").fetchone()[0]
    done = db.execute("SELECT COUNT(*) FROM work_results").fetchone()[0]
    db.close()
    return f"{done} of {total} mutants done"


def save_partial(module: str, session: str, seconds: str, commit: str, dirty: str,
                 fingerprint: str) -> None:
    """Keep an interrupted full run (``--resume`` continues it): its session, the module's
    fingerprint at the start, and the seconds spent so far (added to an earlier part's)."""
    db_path, meta_path = _partial(module)
    spent = int(seconds)
    if meta_path.exists():
        old = json.loads(meta_path.read_text())
        if old.get("module_code_sha256") == fingerprint:
            spent += old["seconds"]
            commit = old["commit"]
            dirty = ",".join(sorted(set(old["dirty"]) | {d for d in dirty.split(",") if d}))
    _copy_db(session, db_path)
    meta_path.write_text(json.dumps({
        "module_code_sha256": fingerprint, "commit": commit, "seconds": spent,
        "dirty": [d for d in dirty.split(",") if d],
        "saved": datetime.datetime.now().isoformat(timespec="seconds")}, indent=1) + "\n")
    print(f"mutation: {module}: interrupted, kept for --resume ({_progress(db_path)})")


def resume_partial(module: str, session: str) -> None:
    """Continue an interrupted full run; refuse if the module changed since it started."""
    db_path, meta_path = _partial(module)
    meta = json.loads(meta_path.read_text())
    if meta["module_code_sha256"] != _fingerprint(module):
        sys.exit(f"mutation: the code of {config(module)['module-path']} changed since its "
                 f"interrupted run started; run scripts/mutation.sh {module}")
    _copy_db(db_path, session)
    print(f"mutation: resuming {module}: {_progress(session)}")


def record(module: str, mode: str, seconds: str, commit: str, dirty: str) -> None:
    """Write a finished run into the module's meta: ``full`` (or ``resume``, its last part)
    starts it afresh; ``survivors`` and ``unexplained`` (only the survivors without a reason
    were re-tested) append a round, labelled as such in REPORT.md."""
    if mode not in ("full", "resume", "survivors", "unexplained"):
        sys.exit(f"mutation: record: '{mode}' is not one of full, resume, survivors, unexplained")
    path = SESSIONS / f"{module}.json"
    run = {"date": datetime.date.today().isoformat(), "commit": commit,
           "dirty": [d for d in dirty.split(",") if d], "seconds": int(seconds)}
    db_path, meta_path = _partial(module)
    if mode == "resume":  # the interrupted parts and this one make one full run
        old = json.loads(meta_path.read_text())
        run.update(seconds=run["seconds"] + old["seconds"], commit=old["commit"],
                   dirty=sorted(set(old["dirty"]) | set(run["dirty"])))
        mode = "full"
    if mode == "full":
        db_path.unlink(missing_ok=True)
        meta_path.unlink(missing_ok=True)
        meta = {"module_code_sha256": _fingerprint(module), "full": run, "survivors": []}
    else:
        meta = json.loads(path.read_text())
        if mode == "unexplained":
            run["which"] = "unexplained"
        meta["survivors"].append(run)
    path.write_text(json.dumps(meta, indent=1) + "\n")


def _diff_lines(diff: str) -> tuple[list[str], list[str]]:
    old = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    new = [ln[1:].strip() for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    return old, new


def _notes() -> list[dict]:
    path = HERE / "survivors.toml"
    return tomllib.loads(path.read_text()).get("survivor", []) if path.exists() else []


def _why(notes: list[dict], module: str, operator: str, new: list[str]) -> str | None:
    """An entry names one mutant (``operator``, ``mutated``: the exact line) or a family of them
    (``operator_regex``, ``mutated_regex``: regular expressions; ``module = "*"`` for any)."""
    for n in notes:
        if n["module"] not in (module, "*"):
            continue
        if "operator" in n and n["operator"] != operator:
            continue
        if "operator_regex" in n and not re.fullmatch(n["operator_regex"], operator):
            continue
        if "mutated" in n and n["mutated"].strip() in new:
            return n["why"]
        if "mutated_regex" in n and any(re.fullmatch(n["mutated_regex"], x) for x in new):
            return n["why"]
    return None


def module_results(module: str):
    from cosmic_ray.work_db import WorkDB
    from cosmic_ray.work_item import TestOutcome, WorkerOutcome

    db = WorkDB(str(SESSIONS / f"{module}.sqlite"), WorkDB.Mode.open)
    try:
        counts = dict(killed=0, timeout=0, survived=0, incompetent=0, pending=0, annotations=0)
        survivors, not_made = [], []
        done = set()
        for item, result in db.completed_work_items:
            done.add(item.job_id)
            if result.worker_outcome in (WorkerOutcome.SKIPPED, WorkerOutcome.NO_TEST):
                counts["annotations"] += result.output == ANNOTATION
                continue
            if result.worker_outcome != WorkerOutcome.NORMAL:
                # cosmic-ray failed to make the mutant (no test ran): not a mutant, not counted
                mut = item.mutations[0]
                last = (result.output or "").strip().splitlines()[-1:] or ["?"]
                not_made.append(f"line {mut.start_pos[0]}, {mut.operator_name.removeprefix('core/')}"
                                f" ({last[0][:100]})")
            elif result.test_outcome == TestOutcome.KILLED:
                counts["timeout" if result.output == "timeout" else "killed"] += 1
            elif result.test_outcome == TestOutcome.SURVIVED:
                counts["survived"] += 1
                mut = item.mutations[0]
                old, new = _diff_lines(result.diff or "")
                survivors.append(dict(line=mut.start_pos[0], operator=mut.operator_name,
                                      old=old, new=new))
            else:
                counts["incompetent"] += 1
        counts["pending"] = sum(1 for item in db.work_items if item.job_id not in done)
    finally:
        db.close()
    counts["total"] = counts["killed"] + counts["timeout"] + counts["survived"] + counts["incompetent"]
    counts["not_made"] = not_made
    return counts, sorted(survivors, key=lambda s: (s["line"], s["operator"]))


def _runs(meta: dict) -> list[tuple[str, dict]]:
    """The module's runs in order, each with the label REPORT.md gives it."""
    return [("all mutants", meta["full"])] + [
        ("survivors without a reason re-tested" if r.get("which") == "unexplained"
         else "survivors re-tested", r) for r in meta.get("survivors", [])]


def carried(previous: str, module: str) -> tuple[str | None, str | None]:
    """``module``'s table row and survivors section in an earlier REPORT.md (``previous``):
    the sessions are not committed (a new checkout has none), so a module not run here keeps
    the record its last run left, rather than turning into "not run"."""
    row = next((line for line in previous.splitlines() if line.startswith(f"| {module} |")
                and "| not run |" not in line), None)
    found = re.search(rf"^### {re.escape(module)} \(.*?(?=^### |\Z)", previous, re.S | re.M)
    return row, found.group(0).rstrip("\n") if found else None


def render() -> str:
    notes = _notes()
    rows, sections = [], []
    report = HERE / "REPORT.md"
    previous = report.read_text() if report.is_file() else ""
    for module in ORDER:
        if not (SESSIONS / f"{module}.sqlite").exists():
            row, section = carried(previous, module)
            rows.append(row or f"| {module} | – | – | – | – | – | – | not run | |")
            if section:
                sections.append(section)
            continue
        meta = json.loads((SESSIONS / f"{module}.json").read_text())
        c, survivors = module_results(module)
        score = (c["killed"] + c["timeout"]) / c["total"] if c["total"] else float("nan")
        runs = _runs(meta)
        ran = "; ".join(f"{what}: {r['date']}, commit `{r['commit']}`"
                        + (f" + uncommitted {', '.join(r['dirty'])}" if r["dirty"] else "")
                        for what, r in runs)
        minutes = " + ".join(f"{r['seconds'] / 60:.1f}" for _, r in runs) + " min"
        extra = []
        if c["annotations"]:
            extra.append(f"{c['annotations']} mutants inside type annotations skipped")
        if c["not_made"]:
            extra.append(f"{len(c['not_made'])} mutant(s) cosmic-ray could not make, left out: "
                         + "; ".join(c["not_made"]))
        if c["incompetent"]:
            extra.append(f"{c['incompetent']} incompetent (counted in total, not as killed)")
        if c["pending"]:
            extra.append(f"{c['pending']} NOT RUN (session incomplete)")
        rows.append(f"| {module} | {c['killed']} | {c['timeout']} | {c['survived']} | {c['total']} "
                    f"| **{100 * score:.1f} %** | {minutes} | {ran} "
                    f"| {'; '.join(extra)} |")
        lines = [f"### {module} ({len(survivors)} survivor{'s' if len(survivors) != 1 else ''})", ""]
        if not survivors:
            lines.append("None.")
        for s in survivors:
            why = _why(notes, module, s["operator"], s["new"])
            old = " / ".join(f"`{x}`" for x in s["old"]) or "(nothing)"
            new = " / ".join(f"`{x}`" for x in s["new"]) or "(line removed)"
            op = s["operator"].removeprefix("core/")
            lines.append(f"- line {s['line']}, {op}: {old} → {new}  \n"
                         f"  {'**UNEXPLAINED**' if why is None else why}")
        sections.append("\n".join(lines))
    import cosmic_ray  # noqa: F401  (version for the header)
    from importlib.metadata import version

    head = [
        "# Mutation testing report",
        "",
        f"Written by `scripts/mutation.sh` with cosmic-ray {version('cosmic-ray')}; how it works: "
        "docs/DEVELOPMENT.md, \"Mutation testing\". Each module is mutated in a scratch copy of "
        "the working tree and tested against only the fast unit tests named in its "
        "`mutation/<module>.toml`, one mutant at a time.",
        "",
        "Score = (killed + timed out) / total. Mutants inside type annotations are skipped, not "
        "counted: every module has `from __future__ import annotations`, so nothing evaluates "
        "them. A survivor is listed with why it was judged "
        "equivalent (no test can tell it apart) or harmless (it changes only an error message, or "
        "a numerical tolerance within its documented accuracy); the reasons live in "
        "`mutation/survivors.toml`.",
        "",
        "| module | killed | timed out | survived | total | score | time | run on | notes |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | --- |",
        *rows,
        "",
        "## Survivors",
        "",
    ]
    return "\n".join(head) + "\n\n".join(sections) + "\n"


if __name__ == "__main__":
    if sys.argv[1:2] == ["files"]:
        print("\n".join(files(sys.argv[2])))
    elif sys.argv[1:2] == ["skip-annotations"]:
        skip_annotations(*sys.argv[2:5])
    elif sys.argv[1:2] == ["reopen"]:
        reopen(*sys.argv[2:5])
    elif sys.argv[1:2] == ["fingerprint"]:
        print(_fingerprint(sys.argv[2]))
    elif sys.argv[1:2] == ["save-partial"]:
        save_partial(*sys.argv[2:8])
    elif sys.argv[1:2] == ["resume-partial"]:
        resume_partial(*sys.argv[2:4])
    elif sys.argv[1:2] == ["record"]:
        record(*sys.argv[2:7])
    elif sys.argv[1:2] == ["render"]:
        (HERE / "REPORT.md").write_text(render())
    else:
        sys.exit(__doc__)
