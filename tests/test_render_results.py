"""The RESULTS.md renderer: pivot tables agree with independently computed means and stds."""

import importlib.util
import statistics
import subprocess
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

spec = importlib.util.spec_from_file_location(
    "render_results", Path(__file__).resolve().parents[1] / "benchmarks" / "render_results.py")
render = importlib.util.module_from_spec(spec)
spec.loader.exec_module(render)


def row(split, budget, name, acc, seed, alpha=None, up=1e6):
    r = {"data.name": "bbc-news", "split": split, "strategy.rank_budget": budget,
         "strategy.name": name, "final_accuracy": acc, "seed": seed, "total_upload_bytes": up,
         "wall_s": 10.0}
    if alpha:
        r["model.lora_alpha"] = alpha
    return r


def test_main_table_means_stds_and_missing_cells():
    rows = [row("dir0.1", "1", "fl-lora", 0.60, 0), row("dir0.1", "1", "fl-lora", 0.70, 1),
            row("dir0.01", "1", "fl-lora", 0.42, 0, up=3e6),
            row("dir0.1", "1", "lora-a2", 0.75, 0, alpha="256.0")]
    text = render.main_tables(rows)["main:bbc-news"]
    line = next(x for x in text.splitlines() if x.startswith("| 1 | fl-lora |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    m, s = statistics.fmean([60.0, 70.0]), statistics.stdev([60.0, 70.0])
    assert cells[3] == f"{m:.1f} ± {s:.1f}"     # Dir(0.1): two seeds
    assert cells[4] == "42.0¹"                    # Dir(0.01): one seed
    assert cells[2] == "·" and cells[5] == "·"    # Dir(0.5), path2: not run
    assert cells[6] == f"{(1e6 + 1e6 + 3e6) / 3 / 1e6:.1f}"
    a2 = next(x for x in text.splitlines() if x.startswith("| 1 | lora-a2 (α = 256) |"))
    assert "75.0¹" in a2
    assert "| 1 | lora-a2 | · |" in text          # the paper-α variant is a separate row


@pytest.mark.parametrize("xs,expected", [([], "·"), ([0.5], "50.0¹"),
                                         ([0.5, 0.7, 0.9], "70.0 ± 20.0")])
def test_fmt(xs, expected):
    assert render.fmt(xs) == expected


def test_probe_table_pairs_the_same_seeds():
    main = [row("dir0.1", "1", "lora-a2", 0.8, 0, alpha="256.0"),
            row("dir0.1", "1", "lora-a2", 0.6, 1, alpha="256.0")]
    for r in main:
        r["wall_s"] = 200.0
    probe = [{"split": "dir0.1", "budget": "1", "seed": 0, "final_accuracy": 0.7,
              "wall_s": 150.0}]
    line = render.probe_table(main, probe).splitlines()[2]
    assert line == "| Dir(0.1) | 1 | 80.0¹ | 200 | 70.0¹ | 150 | 0.75 |"


def test_probe_variants_table_pairs_each_variant_with_the_full_probe():
    """Rows in the shape rows_of gives for the probe-variants grid (cell = the data/split label,
    budget and variant separate): each variant's mean over the seeds it shares with the main
    grid's full probe, the mean paired change in points, and its own mean wall time."""
    main = [row("dir0.1", "1", "lora-a2", 0.8, 0, alpha="256.0"),
            row("dir0.1", "1", "lora-a2", 0.6, 1, alpha="256.0")]
    for r in main:
        r["wall_s"] = 200.0
    pv = [{"setting": "bbc-news__dir0.1", "budget": "1", "variant": "reuse", "seed": s,
           "final_accuracy": a, "wall_s": 100.0} for s, a in ((0, 0.5), (1, 0.3))]
    pv.append({"setting": "bbc-news__dir0.1", "budget": "2", "variant": "gradient", "seed": 0,
               "final_accuracy": 0.9, "wall_s": 100.0})  # budget 2: no full probe here
    lines = render.probe_variants_table(main, pv).splitlines()
    b1 = [c.strip() for c in lines[2].strip("|").split("|")]
    m, sd = statistics.fmean([50.0, 30.0]), statistics.stdev([50.0, 30.0])
    # paired change: mean of (50 − 80, 30 − 60) = −30.0 points; wall: the variant's own mean
    assert b1[:4] == ["bbc-news Dir(0.1)", "1", "70.0 ± 14.1",
                      f"{m:.1f} ± {sd:.1f} (Δ -30.0; 100 s)"]
    assert b1[4] == "·" and b1[5] == "·"
    assert lines[3].endswith("| · | · | · | · |")  # no full-probe pair for budget 2


def test_lr_table_takes_5e4_from_the_main_grid():
    main = [row("dir0.01", "1", "fl-lora", 0.44, 0), row("dir0.01", "1", "fl-lora", 0.99, 1),
            row("dir0.01", "1", "lora-a2", 0.99, 0, alpha="256.0")]
    lr = [{"strategy.name": "fl-lora", "strategy.lr": "0.002", "final_accuracy": 0.5},
          {"strategy.name": "lora-a2", "strategy.lr": "0.008", "final_accuracy": 0.7}]
    text = render.lr_table(main, lr).splitlines()
    assert text[2] == "| fl-lora | · | 44.0 | · | 50.0 | · |"   # seed 0 only
    assert text[5] == "| lora-a2 | · | · | · | · | 70.0 |"     # the scaled-α cell is not lr 5e-4


def test_dp_table_fills_eps_inf_from_identical_main_cells_only_when_missing():
    main = [row("dir0.01", "2", "fl-lora", 0.59, 0), row("dir0.1", "2", "flexlora", 0.99, 0),
            row("dir0.01", "2", "lora-a2", 0.40, 0)]
    dp = [{"privacy": "eps1", "strategy.name": "fl-lora", "seed": 0, "final_accuracy": 0.2,
           "total_upload_bytes": 1e6},
          {"privacy": "eps_inf", "strategy.name": "lora-a2", "seed": 0, "final_accuracy": 0.41,
           "total_upload_bytes": 1e6}]
    lines = render.dp_table(dp, main).splitlines()
    assert lines[2].startswith("| fl-lora | 59.0¹ | · | · | 20.0¹ |")
    assert lines[3].startswith("| flexlora | · |")      # the Dir(0.1) cell is not used
    assert lines[4].startswith("| lora-a2 | 41.0¹ |")   # the dp grid's own cell wins


def test_score_table_pairs_the_same_seeds_and_ignores_the_paper_alpha():
    main = [row("dir0.01", "2", "lora-a2", 0.50, 0, alpha="128.0"),
            row("dir0.01", "2", "lora-a2", 0.60, 1, alpha="128.0"),
            row("dir0.01", "2", "lora-a2", 0.99, 0)]          # α = 16: not the comparison
    score = [{"split": "dir0.01", "budget": "2", "seed": 0, "final_accuracy": 0.70},
             {"split": "dir0.01", "budget": "2", "seed": 1, "final_accuracy": 0.80}]
    lines = render.score_table(main, score).splitlines()
    m = f"{statistics.fmean([50.0, 60.0]):.1f} ± {statistics.stdev([50.0, 60.0]):.1f}"
    r = f"{statistics.fmean([70.0, 80.0]):.1f} ± {statistics.stdev([70.0, 80.0]):.1f}"
    assert f"| Dir(0.01) | 2 | 0, 1 | {m} | {r} |" in lines
    assert "| Dir(0.1) | 1 | · | · | · |" in lines


@pytest.fixture
def no_writes(monkeypatch):
    """The renderer with every way it writes (tables, figures, files) raising."""
    def refuse(*a, **k):
        raise AssertionError("this mode must not write")

    for name in ("aggregate", "curves_figure", "paper_schedule_figure"):
        monkeypatch.setattr(render, name, refuse)
    monkeypatch.setattr(render.Path, "write_text", refuse)


def test_print_writes_nothing(no_writes, capsys):
    assert render.main(["--print"]) == 0
    assert "## main:bbc-news" in capsys.readouterr().out


def test_check_names_a_block_edited_by_hand(monkeypatch, capsys, tmp_path):
    doc = render.DOC.read_text()
    edited = tmp_path / "RESULTS.md"  # the same doc with one block edited by hand
    edited.write_text(doc.replace("<!-- BEGIN paper_schedule -->\n",
                                  "<!-- BEGIN paper_schedule -->\nx", 1))
    monkeypatch.setattr(render, "DOC", edited)
    assert render.main(["--check"]) == 1
    assert "stale in 1 block: paper_schedule" in capsys.readouterr().err


def test_check_names_a_readme_copy_edited_by_hand(monkeypatch, capsys, tmp_path):
    """The README copies the claim table: an edit there is caught like one in RESULTS."""
    text = render.README.read_text()
    assert "<!-- BEGIN claim_best -->" in text
    edited = tmp_path / "README.md"
    edited.write_text(text.replace("| fl-lora | 0.002 |", "| fl-lora | 0.003 |", 1))
    assert edited.read_text() != text
    monkeypatch.setattr(render, "README", edited)
    assert render.main(["--check"]) == 1
    err = capsys.readouterr().err
    assert "README.md is stale in 1 block: claim_best" in err, err


def test_print_and_check_together_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        render.main(["--print", "--check"])
    assert e.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_check_writes_nothing_and_finds_the_doc_current(no_writes, capsys):
    # every generated block of docs/RESULTS.md equals a fresh render of the committed cells;
    # not judged when a finished cell (its summary.json) or a committed file there changed —
    # a cell still running has no summary.json, is not rendered, and does not stop the check
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all", "--",
                            "benchmarks/results"], cwd=render.ROOT, capture_output=True, text=True)
    changed = [line for line in dirty.stdout.splitlines()
               if line.endswith("summary.json") or not line.startswith("??")]
    if dirty.returncode == 0 and changed:
        pytest.skip("benchmarks/results has uncommitted changes: " + changed[0].strip())
    assert render.main(["--check"]) == 0, capsys.readouterr().err


def test_claim_table_pairs_seeds_and_takes_the_best_baseline_per_column():
    rows = [row("dir0.01", "1", "fl-lora", 0.50, 0), row("dir0.01", "1", "fl-lora", 0.60, 1),
            row("dir0.01", "1", "ffa-lora", 0.58, 0), row("dir0.01", "1", "ffa-lora", 0.56, 1),
            row("dir0.01", "1", "flexlora", 0.40, 0), row("dir0.01", "1", "flexlora", 0.90, 2),
            row("dir0.01", "1", "lora-a2", 0.64, 0, alpha="256.0"),
            row("dir0.01", "1", "lora-a2", 0.62, 1, alpha="256.0"),
            row("dir0.01", "1", "lora-a2", 0.30, 0)]
    for r, l3 in zip(rows, [0.5, 0.7, 0.5, 0.5, 0.4, 0.9, 0.6, 0.6, 0.3]):
        r["last3_accuracy"] = l3
    rows[6]["last3_accuracy"] = None   # a cell without metrics drops out of the last-3 pairing
    lines = render.claim_table(rows, "bbc-news").splitlines()
    line = next(x for x in lines if x.startswith("| 1 | Dir(0.01) |"))
    cells = [c.strip() for c in line.strip("|").split("|")]
    # α = 16 has seed 0 only (flexlora seed 2 pairs with nothing): best of 50, 58, 40 is 58
    assert cells[2] == f"{30.0 - 58.0:+.1f} (n=1)"
    # scaled: seeds 0 and 1 lack flexlora seed 1 -> only seed 0 pairs all three baselines
    assert cells[3] == "ffa-lora 58.0" and cells[4] == f"{64.0 - 58.0:+.1f} (n=1)"
    assert cells[5] == "·"                          # seed 0's scaled cell has no last-3
    assert cells[6] == f"{68.88 - 45.78:+.1f}"      # the paper: LoRA-A2 − FL+LoRA at rank 1
    assert "| 1 | 2 classes/client | · | · | · | · | · |" in lines


def test_rounds_table_reads_rounds_and_compares_with_the_main_cell():
    accs = [0.30 + 0.01 * i for i in range(24)]
    runs = [{"data": "rotten-tomatoes", "split": "path2", "method": "fl-lora", "seed": 0,
             "accs": accs, "main": None},
            {"data": "bbc-news", "split": "dir0.1", "method": "fl-lora", "seed": 0,
             "accs": accs, "main": accs[:8]},
            {"data": "bbc-news", "split": "dir0.01", "method": "lora-a2 (α = 128)", "seed": 0,
             "accs": accs[::-1], "main": accs[:7] + [0.99]},
            {"data": "bbc-news", "split": "dir0.01", "method": "flexlora", "seed": 0,
             "accs": accs, "main": None}]
    lines = render.rounds_table(runs).splitlines()
    # the table is ordered by dataset (BBC News first), split (Dir(0.1) first), then method
    assert lines[2] == ("| BBC News | Dir(0.1) | fl-lora | 37.0 | 45.0 | 53.0 | "
                        f"{100 * statistics.fmean(accs[-3:]):.1f} | "
                        f"{100 * statistics.fmean(accs[16:]):.1f} | 1.0 | 53.0 (24) | identical |")
    assert lines[3].startswith("| BBC News | Dir(0.01) | flexlora |") and lines[3].endswith("| · |")
    assert lines[5].startswith("| Rotten Tomatoes | 2 classes/client | fl-lora | 37.0 |")
    rev = accs[::-1]
    diff = max(abs(x - y) for x, y in zip(rev[:8], accs[:7] + [0.99]))
    assert lines[4] == (f"| BBC News | Dir(0.01) | lora-a2 (α = 128) | {100 * rev[7]:.1f} | "
                        f"{100 * rev[15]:.1f} | {100 * rev[23]:.1f} | "
                        f"{100 * statistics.fmean(rev[-3:]):.1f} | "
                        f"{100 * statistics.fmean(rev[16:]):.1f} | 1.0 | 53.0 (1) | "
                        f"max diff {100 * diff:.1f} points |")


def test_weighted_local_steps_by_hand():
    clients = [{"num_examples": 300}, {"num_examples": 17}, {"num_examples": 3},
               {"num_examples": 0}]
    # batches: ceil(300/16) = 19, ceil(17/16) = 2, ceil(3/16) = 1; weights n_k / 320
    expected = (300 * 19 + 17 * 2 + 3 * 1) / 320 * 2
    assert render.weighted_local_steps(clients, 16, 2) == pytest.approx(expected)
    even = [{"num_examples": 32}] * 4  # equal clients: every one does 2 steps
    assert render.weighted_local_steps(even, 16, 1) == pytest.approx(2.0)


def test_steps_table_reads_the_partition_and_config_of_a_cell(tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(render, "RESULTS", tmp_path)
    cell = tmp_path / "main" / "cells" / "c0"
    cell.mkdir(parents=True)
    (cell / "partition.json").write_text(json.dumps(
        {"clients": [{"num_examples": 48}, {"num_examples": 16}]}))
    (cell / "config.toml").write_text("[train]\nbatch_size = 16\nlocal_epochs = 1\n")
    rows = [dict(row("dir0.1", "1", "fl-lora", 0.6, 0), cell="c0"),
            dict(row("dir0.1", "1", "lora-a2", 0.8, 0), cell="c1"),
            dict(row("dir0.1", "1", "fedavg-full", 0.9, 0), cell="c2")]
    lines = render.steps_table(rows).splitlines()
    assert len(lines) == 3
    steps = 48 / 64 * 3 + 16 / 64 * 1
    assert lines[2] == f"| bbc-news | Dir(0.1) | 0 | 75 | {steps:.1f} | 90.0 | 70.0 (2) |"


def test_predicts_one_class_matches_a_constant_predictors_macro_f1():
    import numpy as np

    from lora_a2.tasks.classification import macro_f1  # the metric the cells' metrics.jsonl records

    y = np.array([0] * 7 + [1] * 3 + [2] * 2)
    for pred, expected in (([0] * 12, True), ([1] * 12, True), ([0] * 11 + [1], False)):
        pred = np.array(pred)
        rec = {"accuracy": float((pred == y).mean()), "macro_f1": macro_f1(y, pred, 3)}
        assert render.predicts_one_class(rec, 3) is expected
    assert render.predicts_one_class({"accuracy": 0.5}, 2) is False


def test_plateau_table_counts_cells_stuck_on_one_class(tmp_path, monkeypatch):
    import json

    monkeypatch.setattr(render, "RESULTS", tmp_path)
    const = {"accuracy": 0.6, "macro_f1": 2 * 0.6 / 1.6 / 2, "loss": 0.7}
    mixed = {"accuracy": 0.7, "macro_f1": 0.69, "loss": 0.5}
    cells = {"a": [const, const], "b": [const, mixed], "c": [mixed, const]}
    for name, recs in cells.items():
        d = tmp_path / "main" / "cells" / name
        d.mkdir(parents=True)
        (d / "partition.json").write_text(json.dumps({"label_names": ["x", "y"]}))
        (d / "metrics.jsonl").write_text("".join(
            json.dumps({"round": i + 1, **r}) + "\n" for i, r in enumerate(recs)))
    rows = [dict(row("path2", "1", "fl-lora", 0.6, s), cell=c, **{"data.name": "rt"})
            for s, c in enumerate(cells)]
    lines = render.plateau_table(rows, "rt").splitlines()
    # a and c end on one class; b and c had mixed predictions first in rounds 2 and 1
    assert lines[2:] == [f"| 2 classes/client | fl-lora | 3 | 2 | 1.5 | "
                         f"{(0.7 + 0.5 + 0.7) / 3:.3f} |"]


def test_instruct_table_keeps_scaled_lora_a2_apart_and_averages_seeds():
    def cell(name, seed, final, alpha=None):
        r = {"strategy.rank_budget": "1", "strategy.name": name, "seed": seed,
             "initial_rouge_l": 0.10, "final_rouge_l": final, "last3_rouge_l": final,
             "initial_loss": 5.0, "final_loss": 4.0 + seed, "total_upload_bytes": 2e6}
        if alpha:
            r["model.lora_alpha"] = alpha
        return r

    rows = [cell("lora-a2", 0, 0.20), cell("lora-a2", 1, 0.30), cell("lora-a2", 0, 0.5, "128.0"),
            cell("fl-lora", 0, 0.25)]
    lines = render.instruct_table(rows).splitlines()
    a2 = next(x for x in lines if x.startswith("| 1 | lora-a2 |"))
    assert f"**{100 * statistics.fmean([0.2, 0.3]):.1f} ± {100 * statistics.stdev([0.2, 0.3]):.1f}**" in a2
    assert "**4.500 ± 0.707**" in a2 and "| 2 |" in a2
    scaled = next(x for x in lines if x.startswith("| 1 | lora-a2 (α = 128) |"))
    assert "**50.0¹**" in scaled
    assert [x.split("|")[2].strip() for x in lines[2:]] == ["lora-a2", "fl-lora",
                                                            "lora-a2 (α = 128)"]
    assert "No finished cells" in render.instruct_table([])


def test_claim_views_pick_each_methods_best_complete_lr_and_the_gap():
    """View a: every method at lr 5e-4; view b: each method at the lr with the best mean over
    all 8 claim runs, an lr missing a run is not a candidate; the gap is LoRA-A2 minus the best
    other method per cell, on the seeds every method has."""
    cells = render.CLAIM_CELLS
    others = render.CLAIM_METHODS

    def runs(name, lr, acc, alpha=None, skip=None):
        out = []
        for budget, split in cells:
            for seed in (0, 1):
                if skip == (budget, split, seed):
                    continue
                r = row(split, budget, name, acc + 0.01 * seed, seed, alpha)
                r["last3_accuracy"] = r["final_accuracy"] - 0.05
                if lr is not None:
                    r["strategy.lr"] = lr
                out.append(r)
        return out

    claim = [r for m in others for r in runs(m, None, 0.50)]
    claim += runs("lora-a2", None, 0.30) + runs("lora-a2", None, 0.60, alpha="256.0")
    sweep = runs("fl-lora", 0.001, 0.70)  # fl-lora is better at 1e-3 ...
    sweep += runs("ffa-lora", 0.002, 0.90, skip=("1", "dir0.1", 1))  # ... ffa-lora's is partial
    blocks = render.claim_blocks(claim, sweep, [])
    best, bracketed = {}, {}
    for line in blocks["claim_sweep"].splitlines()[2:]:
        parts = [p.strip() for p in line.strip().strip("|").split("|")]
        best[parts[0]], bracketed[parts[0]] = parts[2], parts[3]
    assert best["fl-lora"] == "0.001"
    assert bracketed["fl-lora"] == "no: run 0.002"  # the best is the largest lr it ran
    assert best["ffa-lora"] == "0.0005"  # its 2e-3 runs are not all there
    assert bracketed["ffa-lora"] == "no: run 0.0002, run 0.001"
    paper = blocks["claim_paper"].splitlines()
    gap = next(x for x in paper if x.startswith("| **lora-a2 (scaled α) − best other**"))
    assert gap.count("+10.0 vs") == 4  # 60.5 − 50.5 in every cell, n = 2
    assert gap.count("**leads**") == 4  # 60 and 61 against others' 50 and 51
    best_view = blocks["claim_best"].splitlines()
    fl = next(x for x in best_view if x.startswith("| fl-lora |"))
    assert "| 0.001 |" in fl and "70.5 ± 0.7" in fl
    gap = next(x for x in best_view if x.startswith("| **lora-a2 (scaled α) − best other**"))
    assert gap.count("-10.0 vs fl-lora") == 4
    assert gap.count("**trails**") == 4  # 60 and 61 against fl-lora's 70 and 71
    last3 = blocks["claim_best_last3"].splitlines()  # same lrs (chosen by final accuracy)
    fl = next(x for x in last3 if x.startswith("| fl-lora |"))
    assert "| 0.001 |" in fl and "65.5 ± 0.7" in fl


def test_verdict_leads_ties_or_trails_by_the_seed_ranges():
    assert render.verdict([0.60, 0.62], [[0.50, 0.59], [0.40, 0.45]]) == "leads"
    assert render.verdict([0.60, 0.62], [[0.50, 0.61]]) == "ties"  # ranges overlap
    assert render.verdict([0.60, 0.62], [[0.50, 0.51], [0.63, 0.70]]) == "trails"
    assert render.verdict([0.60], [[0.10]]) == ""  # one seed: no verdict


@given(st.lists(st.lists(st.floats(0, 1), min_size=2, max_size=2), min_size=2, max_size=6))
def test_verdict_agrees_with_every_seed(scores):
    """A lead means LoRA-A2 beats every other method on every seed pairing, a trail means one
    method beats it on every pairing; the mean gap then has the verdict's sign."""
    mine, others = scores[0], scores[1:]
    said = render.verdict(mine, others)
    pairs = [(a, b) for o in others for a in mine for b in o]
    if said == "leads":
        assert all(a > b for a, b in pairs)
        assert sum(mine) / 2 > max(sum(o) / 2 for o in others)
    elif said == "trails":
        assert any(all(a < b for a in mine for b in o) for o in others)
        assert sum(mine) / 2 < max(sum(o) / 2 for o in others)
    else:
        assert said == "ties"
        assert not all(a > b for a, b in pairs)
        assert not any(all(a < b for a in mine for b in o) for o in others)


def test_bracket_names_the_next_lr_of_the_outward_sweep():
    # claim-lr's axis plus the paper's 5e-4
    assert render.sweep_lrs() == ["0.0002", "0.0005", "0.001", "0.002", "0.005", "0.01"]
    grid = ["0.0002", "0.0005", "0.001", "0.002"]
    assert render.bracket("0.0005", ["0.0002", "0.0005", "0.001"], grid) == "yes"
    assert render.bracket("0.0005", ["0.0005", "0.001"], grid) == "no: run 0.0002"
    assert render.bracket("0.002", ["0.0005", "0.001", "0.002"], grid) == "no: grid edge"
    assert render.bracket("0.0002", ["0.0002", "0.0005"], grid) == "no: grid edge"
    assert render.bracket("0.001", ["0.001"], grid) == "no: run 0.0005, run 0.002"
    assert render.bracket("0.002", ["0.0005", "0.001", "0.002"], render.sweep_lrs()) \
        == "no: run 0.005"
    assert render.bracket("0.005", ["0.001", "0.002", "0.005"], render.sweep_lrs()) \
        == "no: run 0.01"
    assert render.bracket("0.01", ["0.002", "0.005", "0.01"], render.sweep_lrs()) \
        == "no: grid edge"


def test_dp_table_puts_private_selection_cells_on_their_own_rows():
    """The dp grid's private-selection cells come from includes (no `privacy` axis label):
    they get their own rows under the ε they ran at."""
    public = {"privacy": "eps6", "strategy.name": "lora-a2", "final_accuracy": 0.2, "seed": 0,
              "total_upload_bytes": 1e6}
    private = {"strategy.name": "lora-a2", "privacy.selection": "private",
               "privacy.epsilon": "6.0", "final_accuracy": 0.3, "seed": 0,
               "total_upload_bytes": 1e6}
    text = render.dp_table([public, private])
    lines = {x.split("|")[1].strip(): x for x in text.splitlines()[2:]}
    assert "20.0¹" in lines["lora-a2"] and "30.0¹" in lines["lora-a2, private selection"]


def test_fleet_table_times_per_schedule_and_who_got_there_first():
    """Rows in the shape rows_of gives for the fleet grid: each schedule and method with its
    seeds' final accuracy, time to each target (a seed that never got there marked), run time and
    upload share; then the first cell to reach each target."""
    def fr(where, key, name, seed, acc, t60, share, auto=False):
        return {"cell": f"{where}__{name}__seed{seed}", "seed": seed, where.split("-")[1]: where,
                key: name, **({"strategy.rank_budget": "auto"} if auto else {}),
                "final_accuracy": acc, "time_to_0.6": t60, "sim_time_s": 40.0,
                "upload_time_share": share, "total_upload_bytes": 2e6}
    rows = [fr("mobile-sync", "fixed", "fl-lora", 0, 0.64, 20.0, 0.2),
            fr("mobile-sync", "fixed", "fl-lora", 1, 0.62, None, 0.1),
            fr("mobile-deadline", "budgeted", "lora-a2", 0, 0.66, 12.0, 0.3, auto=True),
            fr("mixed-sync", "fixed", "fl-lora", 0, 0.5, None, 0.1)]
    text = render.fleet_table(rows, "mobile").splitlines()
    assert text[0].startswith("| schedule | method | seeds | final accuracy (%) | to 60 % (s) |")
    assert text[2] == "| sync | fl-lora | 2 | 63.0 ± 1.4 | 20¹ (–) | 40 ± 0 | 15.0 ± 7.1 | 2.0 |"
    assert text[3] == "| deadline | lora-a2 (auto) | 1 | 66.0¹ | 12¹ | 40¹ | 30.0¹ | 2.0 |"
    assert text[-1] == ("- 60 %: first lora-a2 (auto) (deadline) at 12 s¹; "
                        "2 of 3 cells reached it.")  # fl-lora sync: one seed never got there
    rows += [fr("mobile-async", "fixed", "ffa-lora", s, 0.6, t, 0.1) for s, t in ((0, 30), (1, 18))]
    rows += [fr("mobile-async", "fixed", "lora-a2", 0, 0.6, 20.0, 0.1)]  # same method, later
    text = render.fleet_table(rows, "mobile").splitlines()
    assert text[-1] == ("- 60 %: first lora-a2 (auto) (deadline) at 12 s¹; the first other "
                        "method ffa-lora (async) at 24 s (mean of 2), 2.0× as long; "
                        "5 of 6 cells reached it.")
    mixed = render.fleet_table(rows, "mixed").splitlines()
    assert mixed[2].split(" | ")[4] == "never"
    assert mixed[-1] == "- 60 %: no method reached it in every seed; 0 of 1 cells did."


def test_spread_table_lists_each_seed_then_mean_std_and_range():
    rows = [{"seed": s, "final_accuracy": a, "best_accuracy": b, "last3_accuracy": l3,
             "total_upload_bytes": 3e6, "wall_s": w}
            for s, a, b, l3, w in ((2, 0.70, 0.80, 0.72, 660.0), (0, 0.90, 0.91, 0.85, 640.0),
                                   (1, 0.80, 0.85, 0.81, 650.0))]
    lines = render.spread_table(rows).splitlines()
    assert lines[2] == "| 0 | 90.0 | 91.0 | 85.0 | 3.0 | 640 |"  # sorted by seed
    assert lines[4].startswith("| 2 | 70.0 |")
    sd = 100 * statistics.stdev([0.7, 0.9, 0.8])
    assert lines[5].startswith(f"| **mean ± std** | 80.0 ± {sd:.1f} | ")
    assert lines[5].endswith("| 3.0 | 650 ± 10 |")
    assert lines[6] == "| **range** | 20.0 points | 11.0 points | 13.0 points | | |"
    assert "No finished cells" in render.spread_table([])


def test_precision_table_pairs_each_seed_and_reads_against_rounding_alone():
    def pr(split, budget, seed, precision, acc, wall, device="cuda"):
        return {"cell": f"{split}__{budget}__{precision}__seed{seed}", "split": split,
                "budget": budget, "seed": seed, "train.precision": precision,
                "final_accuracy": acc, "wall_s": wall, "device": device}
    rows = [pr("dir0.01", "1", 0, "fp32", 0.50, 600.0), pr("dir0.01", "1", 0, "bf16-mixed", 0.56, 300.0),
            pr("dir0.1", "2", 1, "bf16-mixed", 0.70, 290.0), pr("dir0.1", "2", 1, "fp32", 0.80, 580.0),
            pr("dir0.1", "1", 0, "fp32", 0.75, 570.0)]  # its bf16 twin not run yet
    # the main-grid cells the fp32 ones repeat, run on the CPU: rounding moved them 2, 3, 1 points
    main = [{"cell": "m-a", "final_accuracy": 0.52, "device": "cpu"},
            {"cell": "m-b", "final_accuracy": 0.77, "device": "cpu"},
            {"cell": "m-c", "final_accuracy": 0.74, "device": "cpu"}]
    twins = {"dir0.01__1__fp32__seed0": "m-a", "dir0.1__2__fp32__seed1": "m-b",
             "dir0.1__1__fp32__seed0": "m-c", "dir0.01__1__bf16-mixed__seed0": "m-a"}
    spread = [{"final_accuracy": a} for a in (0.78, 0.80, 0.82)]  # std 2.0 points
    lines = render.precision_table(rows, main, spread, twins).splitlines()
    assert lines[2] == "| Dir(0.1) | 1 | 0 | 74.0 (cpu) | 75.0 | +1.0 | · | · | 570 / · |"
    assert lines[3] == "| Dir(0.1) | 2 | 1 | 77.0 (cpu) | 80.0 | +3.0 | 70.0 | -10.0 | 580 / 290 |"
    assert lines[4] == "| Dir(0.01) | 1 | 0 | 52.0 (cpu) | 50.0 | -2.0 | 56.0 | +6.0 | 600 / 300 |"
    # a bf16 cell paired with the main-grid cell itself: that wall is marked (another session)
    lone = render.precision_table(
        [pr("dir0.01", "2", 1, "bf16-mixed", 0.60, 310.0)],
        [{"cell": "m-d", "final_accuracy": 0.58, "device": "cpu", "wall_s": 350.0}], spread,
        {"dir0.01__2__bf16-mixed__seed1": "m-d"}).splitlines()
    assert lone[2] == "| Dir(0.01) | 2 | 1 | 58.0 (cpu) | · | · | 60.0 | +2.0ᵐ | 350ᵐ / 310 |"
    assert lines[-4] == ("- 2 complete pairs: bf16 − fp32 mean -2.0 points (mean size 8.0), "
                         "largest -10.0.")
    assert lines[-3] == ("- rounding alone: 3 fp32 cells against the main-grid cells they repeat "
                         "(same config and seed; on cpu and cuda): mean size 2.0 points, largest "
                         "3.0; 0 of 2 bf16 − fp32 differences are no larger.")
    assert lines[-2] == ("- for scale, seeds alone: the default run's seed-to-seed std is 2.0 "
                         "points (grid `default-spread`).")
    assert lines[-1] == ("- the bf16-mixed cells' matrix products (`train.bf16_matmul`): kernels "
                         "not recorded in 2.")
    rows[1]["bf16_products_in_fp32"], rows[2]["bf16_products_in_fp32"] = True, False
    assert render.precision_table(rows, main, spread, twins).splitlines()[-1] == (
        "- the bf16-mixed cells' matrix products (`train.bf16_matmul`): float32 kernels on the "
        "bfloat16 operands, each product rounded once to bfloat16 in 1; torch's bfloat16 "
        "kernels in 1.")
    # the largest rounding difference is the bar: |+6| ≤ 7 < |−10|
    main[2]["final_accuracy"] = 0.82
    assert "largest 7.0; 1 of 2 bf16 − fp32 differences are no larger." in \
        render.precision_table(rows, main, spread, twins)
    # fp32 reproduced bit for bit (same hardware): said so
    same = [{**m, "final_accuracy": a} for m, a in zip(main, (0.50, 0.80, 0.75))]
    assert "largest 0.0 (the same final accuracy: the same hardware); 0 of 2" in \
        render.precision_table(rows, same, (), twins)
    assert render.precision_table(rows[-1:], main, (), twins).splitlines()[-2] == \
        "- no complete pair yet."
    assert "- rounding alone: 1 fp32 cell against the main-grid cell it repeats (same config" \
        in render.precision_table(rows[:2], main, (), twins)
    # a bf16 cell whose fp32 rerun has not run yet pairs with the main-grid cell it repeats,
    # which is the same run in float32 (marked); no rounding-alone figure comes of it
    main_walls = [{**m, "wall_s": 350.0} for m in main]
    lone = [pr("dir0.01", "1", 0, "bf16-mixed", 0.56, 300.0)]
    lines = render.precision_table(lone, main_walls, (), twins).splitlines()
    assert lines[2] == "| Dir(0.01) | 1 | 0 | 52.0 (cpu) | · | · | 56.0 | +4.0ᵐ | 350ᵐ / 300 |"
    assert lines[-2] == ("- 1 complete pairs: bf16 − fp32 mean +4.0 points (mean size 4.0), "
                         "largest +4.0; ᵐ 1 against the main-grid cell itself (its fp32 rerun "
                         "here not run yet; its wall time, from another session, does not "
                         "divide this grid's).")
    assert not any(x.startswith("- rounding alone") for x in lines)


def test_the_precision_grid_s_fp32_cells_repeat_main_grid_cells():
    twins = render.main_twins("precision", ("train.precision",))
    assert len(twins) == 16 and all(twins.values()), twins
    assert twins["dir0.1__1__fp32__seed0"] == "bbc-news__dir0.1__256.0-lora-a2-1__seed0"
    assert twins["dir0.01__2__bf16-mixed__seed1"] == "bbc-news__dir0.01__128.0-lora-a2-2__seed1"


def test_paper_schedule_table_reads_late_falls_and_the_verdict(tmp_path):
    def curve(accs):
        return "\n".join(f'{{"round": {i + 1}, "accuracy": {a}}}' for i, a in enumerate(accs))
    rows, dirs = [], {}
    finals = {"lora-a2": (0.90, 0.88), "lora-a2-scaled": (0.60, 0.85), "fl-lora": (0.80, 0.70),
              "ffa-lora": (0.5, 0.5), "flexlora": (0.5, 0.5), "rolora": (0.86, 0.5),
              "fedex-lora": (0.5, 0.5)}
    for m, accs in finals.items():
        for seed, a in enumerate(accs):
            cell = f"{m}__dir0.01__seed{seed}"
            (tmp_path / cell).mkdir()
            (tmp_path / cell / "metrics.jsonl").write_text(curve([0.3, 0.95, a]))
            dirs[cell] = tmp_path / cell
            rows.append({"cell": cell, "seed": seed, "method": m, "split": "dir0.01",
                         "final_accuracy": a, "last3_accuracy": a - 0.01,
                         "total_upload_bytes": 1e6})
    lines = render.paper_schedule_table(rows, dirs).splitlines()
    assert lines[0].startswith("| method | lr_A | Dir(0.01) final (%) | Dir(0.01) last 3 (%) | ")
    assert lines[2] == "| lora-a2 | 0.005 | 89.0 ± 1.4 | 88.0 ± 1.4 | 95.0 (2) → 90.0 | 1.0 |"
    assert lines[4].startswith("| fl-lora | 0.002 | 75.0 ± 7.1 |")
    # lora-a2's worst seed (0.88) beats every baseline's best (rolora 0.86): leads;
    # the scaled variant's range overlaps the baselines': ties
    assert lines[-1] == ("- Dir(0.01), each method's tuned lr_A, seeds 0, 1, final accuracy "
                         "against the baselines: lora-a2 leads; lora-a2-scaled ties (leads: its "
                         "worst seed beats every baseline's best; trails: the named baselines' "
                         "worst seed beats its best; ties otherwise).")
    one_seed = [r for r in rows if r["seed"] == 0]
    assert render.paper_schedule_table(one_seed, dirs).splitlines()[-1] == \
        "- Dir(0.01), each method's tuned lr_A: not every method has two seeds yet."
    # the include block's cells at the papers' lr: rows and a verdict of their own, after
    # (their own cells and curves: seed 0's best → last is read from each row's own cell)
    paper = []
    for r in rows:
        final = 0.5 if r["method"] == "lora-a2" else r["final_accuracy"]
        cell = r["cell"].replace("__seed", "__0.0005__seed")
        (tmp_path / cell).mkdir()
        (tmp_path / cell / "metrics.jsonl").write_text(curve([0.4, 0.6, 0.55, final]))
        dirs[cell] = tmp_path / cell
        paper.append({**r, "cell": cell, "strategy.lr": "0.0005", "final_accuracy": final,
                      "last3_accuracy": final - 0.01})
    lines = render.paper_schedule_table(rows + paper, dirs).splitlines()
    assert lines[2] == "| lora-a2 | 0.005 | 89.0 ± 1.4 | 88.0 ± 1.4 | 95.0 (2) → 90.0 | 1.0 |"
    assert lines[9] == "| lora-a2 | 0.0005 | 50.0 ± 0.0 | 49.0 ± 0.0 | 60.0 (2) → 50.0 | 1.0 |"
    assert lines[11].startswith("| fl-lora | 0.0005 | 75.0 ± 7.1 |")
    assert lines[11].endswith("| 80.0 (4) → 80.0 | 1.0 |")
    assert lines[-2].startswith("- Dir(0.01), each method's tuned lr_A, seeds 0, 1, final "
                                "accuracy against the baselines: lora-a2 leads;")
    assert lines[-1].startswith("- Dir(0.01), lr_A = 0.0005, seeds 0, 1, final accuracy against "
                                "the baselines: lora-a2 trails (fl-lora);")
    # fl-lora's worst seed (70) beats its best (50); rolora's (50) does not: only it is named


def test_paper_schedule_curves_keep_each_seed_and_the_initial_round(tmp_path):
    dirs, rows = {}, []
    for cell, m, seed, lr, accs, first in [
            ("a0", "fedex-lora", 0, None, [0.5, 0.7], 0.2),
            ("a1", "fedex-lora", 1, None, [0.4, 0.6], None),      # no initial_eval.json
            ("b0", "fedex-lora", 0, "0.0005", [0.3, 0.9], 0.2),
            ("c0", "lora-a2", 0, "0.0005", [0.8, 0.1], 0.2)]:
        d = tmp_path / cell
        d.mkdir()
        (d / "metrics.jsonl").write_text(
            "\n".join(f'{{"round": {i + 1}, "accuracy": {a}}}' for i, a in enumerate(accs)))
        if first is not None:
            (d / "initial_eval.json").write_text(f'{{"accuracy": {first}}}')
        dirs[cell] = d
        rows.append({"cell": cell, "method": m, "seed": seed, "split": "dir0.01",
                     **({"strategy.lr": lr} if lr else {})})
    curves = render.paper_schedule_curves(rows, dirs)
    # seeds stay apart (a mean would hide the swings); round 0 only where it was evaluated
    assert curves == {
        ("dir0.01", "tuned"): {("fedex-lora", 0): [(0, 0.2), (1, 0.5), (2, 0.7)],
                               ("fedex-lora", 1): [(1, 0.4), (2, 0.6)]},
        ("dir0.01", "0.0005"): {("fedex-lora", 0): [(0, 0.2), (1, 0.3), (2, 0.9)],
                                ("lora-a2", 0): [(0, 0.2), (1, 0.8), (2, 0.1)]}}
    out = render.paper_schedule_figure(curves, tmp_path / "fig.png")
    assert out == tmp_path / "fig.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert render.paper_schedule_figure({}, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
