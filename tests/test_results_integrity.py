"""The committed benchmark cells are whole: a cell folder under benchmarks/results/ is committed
only once it has its summary.json (a partial cell's checkpoint is git-ignored, so a committed
partial cell could not resume and would pass for a result in a later session). The check reads
what git tracks, so cells that running workers are writing do not count."""

import json
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def tracked_cells() -> dict[Path, set[str]]:
    """Cell folder → names of its files, as committed (or staged)."""
    try:
        out = subprocess.run(["git", "ls-files", "benchmarks/results"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout.split()
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: read the folder
        out = [str(p.relative_to(ROOT)) for p in (ROOT / "benchmarks/results").rglob("*")
               if p.is_file()]
    cells: dict[Path, set[str]] = {}
    for f in map(Path, out):
        if len(f.parts) >= 6 and f.parts[3] == "cells":
            cells.setdefault(ROOT.joinpath(*f.parts[:5]), set()).add("/".join(f.parts[5:]))
    return cells


def test_every_committed_cell_has_a_summary_and_all_its_rounds():
    cells = tracked_cells()
    assert cells, "no committed cells found"
    partial = sorted(str(p.relative_to(ROOT)) for p, files in cells.items()
                     if "summary.json" not in files)
    assert not partial, f"committed cell folders without summary.json: {partial}"
    for p in cells:
        summary = json.loads((p / "summary.json").read_text())
        rounds = [json.loads(x)["round"] for x in (p / "metrics.jsonl").read_text().splitlines()
                  if x.strip()]
        assert rounds == list(range(1, summary["rounds"] + 1)), p.name


def test_claim_reruns_of_lora_a2_reproduce_the_main_grid():
    """docs/RESULTS.md §1b: LoRA-A2's `claim` cells rerun main-grid configs (to measure local
    accuracy) and reproduce the main grid's final accuracy to the last digit. Checks every
    committed rerun against its committed main-grid cell."""
    cells = tracked_cells()
    results = ROOT / "benchmarks/results"
    pairs = [(p, results / "main/cells" / f"bbc-news__{p.name}") for p in cells
             if p.parent.parent.name == "claim" and "lora-a2" in p.name]
    pairs = [(a, b) for a, b in pairs if b in cells]
    assert len(pairs) >= 16, "the claim grid's LoRA-A2 reruns or their main-grid cells are missing"
    for rerun, main in pairs:
        got = json.loads((rerun / "summary.json").read_text())["final_accuracy"]
        want = json.loads((main / "summary.json").read_text())["final_accuracy"]
        assert got == want, rerun.name
