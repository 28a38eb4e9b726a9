"""Render the benchmark tables of docs/RESULTS.md from the finished grid cells.

    python benchmarks/render_results.py            # rewrite the generated blocks of RESULTS.md
    python benchmarks/render_results.py --print    # print them instead; writes nothing

Reads ``benchmarks/results/<grid>/cells/*/summary.json`` (through
:func:`lora_a2.bench.collect_rows`; without ``--print`` it also refreshes each grid's
results.json / table.md / plots through :func:`lora_a2.bench.aggregate`) and replaces every block
``<!-- BEGIN name -->`` … ``<!-- END name -->`` of docs/RESULTS.md (and of README.md, which
copies a few) with a pivot table:
mean ± sample std over seeds of the final test accuracy (%); a value from one seed only is
marked ``¹``; ``·`` = not run yet. Nothing is typed in by hand.
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any, Callable

from lora_a2.bench import aggregate, collect_rows, expand, last_rounds_accuracy, load_grid
from lora_a2.config.schema import PRECISIONS

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "RESULTS.md"
README = ROOT / "README.md"  # copies some blocks (the claim table): kept in step with them

SPLITS = ["dir0.5", "dir0.1", "dir0.01", "path2"]
SPLIT_NAMES = {"dir0.5": "Dir(0.5)", "dir0.1": "Dir(0.1)", "dir0.01": "Dir(0.01)",
               "path2": "2 classes/client"}


def rows_of(grid_name: str, write: bool = True) -> list[dict[str, Any]]:
    """One row per finished cell of a built-in grid (its label values, accuracy, bytes, time);
    with ``write`` the grid's results.json / table.md / plots are refreshed too."""
    grid = load_grid(grid_name)
    out = RESULTS / grid_name
    if not (out / "cells").is_dir():
        return []
    cells = expand(grid)
    if write:
        aggregate(out, cells, grid)
    return json.loads(json.dumps(collect_rows(out, cells)))


def fmt(xs: list[float], scale: float = 100.0, digits: int = 1) -> str:
    """mean ± std of ``scale``·xs (¹: a single seed; ·: none)."""
    if not xs:
        return "·"
    if len(xs) == 1:
        return f"{scale * xs[0]:.{digits}f}¹"
    return f"{scale * statistics.fmean(xs):.{digits}f} ± {scale * statistics.stdev(xs):.{digits}f}"


def mb(xs: list[float]) -> str:
    return f"{statistics.fmean(xs) / 1e6:.1f}" if xs else "·"


def pivot(rows: list[dict[str, Any]], row_key: Callable[[dict], tuple | None],
          row_order: list[tuple], col_key: Callable[[dict], str], cols: list[str],
          col_names: list[str], row_names: list[str], upload: bool = True,
          metric: str = "final_accuracy") -> str:
    """A markdown table: one line per row key, one column per column key, plus mean upload."""
    head = row_names + col_names + (["upload MB (mean)"] if upload else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for rk in row_order:
        mine = [r for r in rows if row_key(r) == rk]
        accs = [fmt([r[metric] for r in mine if col_key(r) == c and r.get(metric) is not None])
                for c in cols]
        line = [str(x) for x in rk] + accs
        if upload:
            line.append(mb([r["total_upload_bytes"] for r in mine]))
        lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


def method(r: dict[str, Any]) -> str:
    alpha = r.get("model.lora_alpha")
    name = r["strategy.name"]
    return f"{name} (α = {float(alpha):g})" if alpha else name


def main_tables(rows: list[dict[str, Any]]) -> dict[str, str]:
    blocks = {}
    for data in ("bbc-news", "rotten-tomatoes"):
        mine = [r for r in rows if r["data.name"] == data]
        order: list[tuple] = [("—", "fedavg-full")]
        for budget, alpha in (("1", 256.0), ("2", 128.0), ("8", 32.0)):
            for m in ("fl-lora", "ffa-lora", "flexlora", "lora-a2", f"lora-a2 (α = {alpha:g})"):
                order.append((budget, m))

        def key(r: dict[str, Any]) -> tuple:
            if r["strategy.name"] == "fedavg-full":
                return ("—", "fedavg-full")
            return (r["strategy.rank_budget"], method(r))

        blocks[f"main:{data}"] = pivot(mine, key, order, lambda r: r["split"], SPLITS,
                                       [SPLIT_NAMES[s] for s in SPLITS], ["budget", "method"])
        blocks[f"main_last3:{data}"] = pivot(mine, key, order, lambda r: r["split"], SPLITS,
                                             [SPLIT_NAMES[s] for s in SPLITS],
                                             ["budget", "method"], upload=False,
                                             metric="last3_accuracy")
        blocks[f"claim:{data}"] = claim_table(rows, data)
        if data == "rotten-tomatoes":  # on BBC News no method ends a cell predicting one class
            blocks[f"plateau:{data}"] = plateau_table(rows, data)
    return blocks


#: *Paper* (Koo et al., ACL 2025, RoBERTa-base on BANKING77), test accuracy % by rank budget and
#: split, copied from the table in docs/RESULTS.md §1 — used only for the "paper" gap column.
PAPER = {
    "8": {"fl-lora": (92.80, 90.47, 60.96), "ffa-lora": (87.20, 77.44, 40.88),
          "flexlora": (93.35, 92.14, 69.84), "lora-a2": (93.24, 91.61, 70.13)},
    "2": {"fl-lora": (91.97, 85.59, 49.08), "ffa-lora": (84.65, 73.44, 34.44),
          "flexlora": (92.22, 87.31, 55.24), "lora-a2": (93.10, 92.02, 69.40)},
    "1": {"fl-lora": (90.61, 82.24, 45.78), "ffa-lora": (82.51, 72.96, 33.68),
          "flexlora": (90.40, 82.20, 42.75), "lora-a2": (93.21, 91.87, 68.88)},
}
BASELINES = ("fl-lora", "ffa-lora", "flexlora")
SCALED_ALPHA = {"1": 256.0, "2": 128.0, "8": 32.0}


def gap(rows: list[dict[str, Any]], variant: str, metric: str) -> tuple[str, str]:
    """(best baseline "name acc", "LoRA-A2 − best (n=seeds)") over the seeds where the LoRA-A2
    ``variant`` and all three baselines have a finished cell; ("·", "·") if there is none."""
    by = {(method(r), r["seed"]): r[metric] for r in rows if r.get(metric) is not None}
    seeds = sorted({sd for (m, sd) in by if m == variant
                    and all((b, sd) in by for b in BASELINES)})
    if not seeds:
        return "·", "·"
    means = {m: 100 * statistics.fmean(by[(m, sd)] for sd in seeds)
             for m in (*BASELINES, variant)}
    best = max(BASELINES, key=lambda m: means[m])
    return f"{best} {means[best]:.1f}", f"{means[variant] - means[best]:+.1f} (n={len(seeds)})"


def claim_table(rows: list[dict[str, Any]], data: str) -> str:
    """The paper's claim, cell by cell: LoRA-A2 minus the best of FL+LoRA / FFA-LoRA / FlexLoRA
    at the same budget and split (paired seeds), ours (final round and last-3 mean) and the
    paper's. Positive = LoRA-A2 ahead. The best baseline is picked per column, on the seeds that
    column pairs; the "best baseline" column shows the one of the scaled-α final column."""
    head = ["budget", "split", "LoRA-A2 α=16 − best", "best baseline (final)",
            "LoRA-A2 scaled α − best", "same, last-3 mean", "*paper*: LoRA-A2 − best"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for budget in ("1", "2", "8"):
        scaled = f"lora-a2 (α = {SCALED_ALPHA[budget]:g})"
        for i, split in enumerate(SPLITS):
            mine = [r for r in rows if r["data.name"] == data and r["split"] == split
                    and str(r.get("strategy.rank_budget")) == budget]
            _, g16 = gap(mine, "lora-a2", "final_accuracy")
            best, gsc = gap(mine, scaled, "final_accuracy")
            _, gl3 = gap(mine, scaled, "last3_accuracy")
            paper = "·"
            if i < 3:
                ref = PAPER[budget]
                paper = f"{ref['lora-a2'][i] - max(ref[b][i] for b in BASELINES):+.1f}"
            lines.append(f"| {budget} | {SPLIT_NAMES[split]} | {g16} | {best} | {gsc} | {gl3} "
                         f"| {paper} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------- issue 17: fairness views
CLAIM_CELLS = [("1", "dir0.1"), ("1", "dir0.01"), ("2", "dir0.1"), ("2", "dir0.01")]
CLAIM_METHODS = ("fl-lora", "ffa-lora", "flexlora", "rolora", "fedsa-lora", "fedex-lora",
                 "fedsvd")
LORA_A2_VARIANTS = ("lora-a2", "lora-a2 (scaled α)")
PAPER_LR = "0.0005"


def claim_method(r: dict[str, Any]) -> str:
    """The method of a claim-cell row; LoRA-A2 at the baselines' scaling is one method."""
    return "lora-a2 (scaled α)" if r["strategy.name"] == "lora-a2" and r.get(
        "model.lora_alpha") else r["strategy.name"]


def claim_rows(claim: list[dict[str, Any]], claim_lr: list[dict[str, Any]],
               main: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every claim-cell run as one list with ``lr`` set: the paper-rule grid (lr 5e-4), the
    sweep, and — where the claim grid has not rerun it yet — LoRA-A2's main-grid cell at 5e-4
    (the same config: LoRA-A2's paper rule is lr_ratio 5, which the main grid pins)."""
    out = [{**r, "lr": PAPER_LR} for r in claim]
    out += [{**r, "lr": f"{float(r['strategy.lr']):g}"} for r in claim_lr]
    for r in out:
        r["method"] = claim_method(r)
        r["cell_key"] = (str(r["strategy.rank_budget"]), r["split"])
    have = {(r["method"], r["cell_key"], r["seed"]) for r in out if r["lr"] == PAPER_LR}
    for r in main:
        r = {**r, "lr": PAPER_LR, "method": claim_method(r),
             "cell_key": (str(r["strategy.rank_budget"]), r["split"])}
        if r["data.name"] == "bbc-news" and r["strategy.name"] == "lora-a2" \
                and r["cell_key"] in CLAIM_CELLS \
                and (r["method"], r["cell_key"], r["seed"]) not in have:
            out.append(r)
    return out


def lr_score(rows: list[dict[str, Any]], m: str, lr: str) -> float | None:
    """Mean final accuracy of method ``m`` at ``lr`` over the 8 claim runs (4 cells × 2 seeds);
    None unless all 8 have finished."""
    got = [r["final_accuracy"] for r in rows if r["method"] == m and r["lr"] == lr
           and r["cell_key"] in CLAIM_CELLS and r["seed"] in (0, 1)]
    return statistics.fmean(got) if len(got) == 8 else None


def best_lrs(rows: list[dict[str, Any]]) -> dict[str, tuple[str, list[str]]]:
    """Per method: (its best lr among those with all 8 runs, the lrs that were complete)."""
    out = {}
    for m in (*CLAIM_METHODS, *LORA_A2_VARIANTS):
        scores = {lr: lr_score(rows, m, lr) for lr in sorted({r["lr"] for r in rows
                                                              if r["method"] == m})}
        done = {lr: v for lr, v in scores.items() if v is not None}
        if done:
            out[m] = (max(done, key=lambda lr: done[lr]), sorted(done, key=float))
    return out


def claim_view(rows: list[dict[str, Any]], lr_of: dict[str, str], metric: str = "final_accuracy"
               ) -> str:
    """Rows = methods (each at ``lr_of[method]``), columns = the four claim cells; then LoRA-A2
    minus the best other method per cell, on the seeds every method has."""
    head = ["method", "lr_A"] + [f"budget {b}, {SPLIT_NAMES[sp]}" for b, sp in CLAIM_CELLS] \
        + ["upload MB (mean)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by: dict[tuple, dict[int, float]] = {}
    for m in (*CLAIM_METHODS, *LORA_A2_VARIANTS):
        lr = lr_of.get(m)
        mine = [r for r in rows if r["method"] == m and r["lr"] == lr]
        cells = []
        for ck in CLAIM_CELLS:
            vals = {r["seed"]: r[metric] for r in mine if r["cell_key"] == ck
                    and r.get(metric) is not None}
            by[(m, ck)] = vals
            cells.append(fmt(list(vals.values())))
        lines.append(f"| {m} | {lr or '·'} | " + " | ".join(cells) + " | "
                     + mb([r["total_upload_bytes"] for r in mine]) + " |")
    for variant in LORA_A2_VARIANTS:
        gaps = []
        for ck in CLAIM_CELLS:
            seeds = sorted(set(by[(variant, ck)]).intersection(
                *(by[(m, ck)] for m in CLAIM_METHODS)))
            if not seeds:
                gaps.append("·")
                continue
            mean = {m: 100 * statistics.fmean(by[(m, ck)][sd] for sd in seeds)
                    for m in (*CLAIM_METHODS, variant)}
            best = max(CLAIM_METHODS, key=lambda m: mean[m])
            said = verdict([by[(variant, ck)][sd] for sd in seeds],
                           [[by[(m, ck)][sd] for sd in seeds] for m in CLAIM_METHODS])
            gaps.append(f"{mean[variant] - mean[best]:+.1f} vs {best} (n={len(seeds)})"
                        + (f" **{said}**" if said else ""))
        lines.append(f"| **{variant} − best other** | | " + " | ".join(gaps) + " | |")
    return "\n".join(lines)


def beats(a: list[float], b: list[float]) -> bool:
    """Per-seed scores ``a``'s worst seed beats ``b``'s best: the one comparison of
    :func:`verdict`."""
    return min(a) > max(b)


def verdict(mine: list[float], others: list[list[float]]) -> str:
    """Whether LoRA-A2 (its per-seed scores ``mine``) leads, ties or trails the other methods
    (each a list of per-seed scores on the same seeds), by a rule that needs no distribution:
    it *leads* when its worst seed beats every other method's best seed, *trails* when some
    other method's worst seed beats its best seed, and *ties* otherwise (the seed ranges
    overlap). "" with fewer than two seeds: one seed cannot tell a gap from seed noise."""
    if len(mine) < 2:
        return ""
    if all(beats(mine, o) for o in others):
        return "leads"
    if any(beats(o, mine) for o in others):
        return "trails"
    return "ties"


def sweep_lrs() -> list[str]:
    """Every lr_A of the sweep, smallest first: the claim-lr grid's axis plus the paper's."""
    axis = load_grid("claim-lr")["axes"]["strategy.lr"]
    return sorted({f"{float(x):g}" for x in axis} | {PAPER_LR}, key=float)


def bracket(best: str, done: list[str], grid: list[str]) -> str:
    """Whether ``best`` is bracketed: a complete lr on both sides of it. If not, the next lr of
    the outward sweep (the neighbour of ``best`` in ``grid`` on its open side), or that the grid
    ends there."""
    i = grid.index(best)
    side = [(grid[i - 1] if i > 0 else None, min(done, key=float) == best),
            (grid[i + 1] if i + 1 < len(grid) else None, max(done, key=float) == best)]
    open_sides = [nxt for nxt, at_edge in side if at_edge]
    if not open_sides:
        return "yes"
    steps = [f"run {nxt}" if nxt else "grid edge" for nxt in open_sides]
    return "no: " + ", ".join(steps)


def claim_blocks(claim: list[dict[str, Any]], claim_lr: list[dict[str, Any]],
                 main: list[dict[str, Any]], grid: list[str] | None = None) -> dict[str, str]:
    rows = claim_rows(claim, claim_lr, main)
    paper = {m: PAPER_LR for m in (*CLAIM_METHODS, *LORA_A2_VARIANTS)}
    best = best_lrs(rows)
    grid = grid or sweep_lrs()
    sweep = ["| method | complete lrs (mean final accuracy over the 8 runs) | best lr_A "
             "| bracketed? |", "|---|---|---|---|"]
    for m in (*CLAIM_METHODS, *LORA_A2_VARIANTS):
        if m in best:
            lr, done = best[m]
            sweep.append(f"| {m} | " + ", ".join(f"{x}: {100 * lr_score(rows, m, x):.1f}"
                                                 for x in done)
                         + f" | {lr} | {bracket(lr, done, grid)} |")
        else:
            sweep.append(f"| {m} | · | · | · |")
    best_lr = {m: b[0] for m, b in best.items()}
    return {"claim_paper": claim_view(rows, paper),
            "claim_paper_local": claim_view(rows, paper, "final_local_accuracy"),
            "claim_sweep": "\n".join(sweep),
            "claim_best": claim_view(rows, best_lr),
            "claim_best_last3": claim_view(rows, best_lr, "last3_accuracy")}


def weighted_local_steps(clients: list[dict[str, Any]], batch_size: int, epochs: int) -> float:
    """Optimizer steps per round of the data-weighted average update: Σ_k (n_k / n) ·
    ⌈n_k / batch⌉ · epochs (every client trains ``epochs`` passes of ⌈n_k / batch⌉ batches, and
    FedAvg weights its update by n_k / n — so one big client's many steps dominate)."""
    n = sum(c["num_examples"] for c in clients)
    return sum(c["num_examples"] / n * -(-c["num_examples"] // batch_size) * epochs
               for c in clients if c["num_examples"])


def steps_table(rows: list[dict[str, Any]], grid_name: str = "main") -> str:
    """Per dataset × split × seed of the main grid: the partition's largest client (share of
    the training examples), the data-weighted local steps per round
    (:func:`weighted_local_steps`), fedavg-full's final accuracy and the mean final accuracy of
    the LoRA cells (all methods and budgets) on that partition."""
    import tomllib

    head = ["dataset", "split", "seed", "largest client %", "weighted steps / round",
            "fedavg-full final", "LoRA cells: mean final (n)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = sorted({(r["data.name"], r["split"], r["seed"]) for r in rows},
                  key=lambda k: (k[0], SPLITS.index(k[1]) if k[1] in SPLITS else 9, k[2]))
    for data, split, seed in keys:
        mine = [r for r in rows if (r["data.name"], r["split"], r["seed"]) == (data, split, seed)]
        cell = RESULTS / grid_name / "cells" / mine[0]["cell"]
        try:
            clients = json.loads((cell / "partition.json").read_text())["clients"]
            train = tomllib.loads((cell / "config.toml").read_text())["train"]
        except (OSError, ValueError, KeyError):
            continue
        n = sum(c["num_examples"] for c in clients)
        steps = weighted_local_steps(clients, int(train["batch_size"]),
                                     int(train["local_epochs"]))
        full = [r["final_accuracy"] for r in mine if r["strategy.name"] == "fedavg-full"]
        lora = [r["final_accuracy"] for r in mine if r["strategy.name"] != "fedavg-full"]
        lines.append(f"| {data} | {SPLIT_NAMES.get(split, split)} | {seed} | "
                     f"{100 * max(c['num_examples'] for c in clients) / n:.0f} | {steps:.1f} | "
                     f"{f'{100 * full[0]:.1f}' if full else '·'} | "
                     f"{f'{100 * statistics.fmean(lora):.1f} ({len(lora)})' if lora else '·'} |")
    return "\n".join(lines)


def predicts_one_class(record: dict[str, Any], num_classes: int) -> bool:
    """Whether a round's test predictions were all one class, read from its accuracy a and
    macro-F1: a constant predictor has precision a and recall 1 on the class it predicts and F1
    0 on the others, so its macro-F1 is exactly 2a / (1 + a) / K."""
    a, f1 = record.get("accuracy"), record.get("macro_f1")
    if a is None or f1 is None:
        return False
    return abs(f1 - 2 * a / (1 + a) / num_classes) < 1e-6


def plateau_table(rows: list[dict[str, Any]], data: str, grid_name: str = "main") -> str:
    """Per split × method (all budgets together; LoRA-A2 at the baselines' scale is its own
    line): how many cells still predict one class after their last round, the median first
    round whose predictions were mixed, and the mean final test loss."""
    head = ["split", "method", "cells", "one class at the end", "first mixed round (median)",
            "final test loss (mean)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    order = ["fedavg-full", "fl-lora", "ffa-lora", "flexlora", "lora-a2", "lora-a2 (scaled α)"]

    def kind(r: dict[str, Any]) -> str:
        return "lora-a2 (scaled α)" if r.get("model.lora_alpha") else r["strategy.name"]

    for split in SPLITS:
        for m in order:
            mine = [r for r in rows if r["data.name"] == data and r["split"] == split
                    and kind(r) == m]
            stuck, firsts, losses = 0, [], []
            for r in mine:
                cell = RESULTS / grid_name / "cells" / r["cell"]
                try:
                    k = len(json.loads((cell / "partition.json").read_text())["label_names"])
                    recs = [json.loads(x) for x in
                            (cell / "metrics.jsonl").read_text().splitlines() if x.strip()]
                except (OSError, ValueError, KeyError):
                    continue
                recs = [x for x in recs if x.get("accuracy") is not None]
                if not recs:
                    continue
                stuck += predicts_one_class(recs[-1], k)
                first = next((x["round"] for x in recs if not predicts_one_class(x, k)), None)
                if first is not None:
                    firsts.append(first)
                losses.append(recs[-1]["loss"])
            if not losses:
                continue
            med = f"{statistics.median(firsts):g}" if firsts else "—"
            lines.append(f"| {SPLIT_NAMES[split]} | {m} | {len(losses)} | {stuck} | {med} | "
                         f"{statistics.fmean(losses):.3f} |")
    return "\n".join(lines)


def hetero_table(rows: list[dict[str, Any]]) -> str:
    order = [(b, m) for b in ("uniform", "heavy-tail", "normal")
             for m in ("hetlora", "hetlora (α = 64)", "flexlora", "flora", "lora-a2",
                       "lora-a2 (α = 64)")]
    return pivot(rows, lambda r: (r["strategy.rank_budget"], method(r)), order,
                 lambda r: r["split"], ["dir0.1", "dir0.01"], ["Dir(0.1)", "Dir(0.01)"],
                 ["budgets", "method"])


def dp_table(rows: list[dict[str, Any]], main_rows: list[dict[str, Any]] = ()) -> str:
    """Rank 2, Dir(0.01) under local Laplace DP. The ε = ∞ cells have exactly the config of the
    main grid's BBC News / Dir(0.01) / budget-2 cells, so where the dp grid's own have not run
    those are used (runs are deterministic given the config)."""
    rows = list(rows)
    have = {(r["strategy.name"], r.get("model.lora_alpha"), r["seed"]) for r in rows
            if r.get("privacy") == "eps_inf"}
    for r in main_rows:
        if (r["data.name"], r["split"], r["strategy.rank_budget"]) == ("bbc-news", "dir0.01", "2") \
                and (r["strategy.name"], r.get("model.lora_alpha"), r["seed"]) not in have:
            rows.append({**r, "privacy": "eps_inf"})
    for i, r in enumerate(rows):  # private-selection cells (issue 18): their own rows
        if r.get("privacy.selection") == "private":
            rows[i] = {**r, "privacy": f"eps{float(r['privacy.epsilon']):g}",
                       "selection": "private"}
    order = [(m,) for m in ("fl-lora", "flexlora", "lora-a2", "lora-a2 (α = 128)",
                            "lora-a2, private selection", "lora-a2 (α = 128), private selection")]
    eps = ["eps_inf", "eps6", "eps3", "eps1"]

    def key(r: dict[str, Any]) -> tuple:
        return (method(r) + (", private selection" if r.get("selection") == "private" else ""),)

    return pivot(rows, key, order, lambda r: r["privacy"], eps,
                 ["ε = ∞", "ε = 6", "ε = 3", "ε = 1"], ["method"])


def paired(main_rows: list[dict[str, Any]], rows: list[dict[str, Any]], split: str,
           budget: str, alpha: str) -> tuple[list[dict], list[dict], list[int]]:
    """The main grid's scaled-α LoRA-A2 cells (BBC News) and an ablation grid's cells (labelled
    ``split`` and ``budget``) at one split and budget, restricted to the seeds both have."""
    base = {r["seed"]: r for r in main_rows if r["data.name"] == "bbc-news"
            and r["split"] == split and r["strategy.rank_budget"] == budget
            and r.get("model.lora_alpha") == alpha}
    other = {r["seed"]: r for r in rows if r["split"] == split and r["budget"] == budget}
    seeds = sorted(set(base) & set(other))
    return [base[x] for x in seeds], [other[x] for x in seeds], seeds


def probe_table(main_rows: list[dict[str, Any]], probe_rows: list[dict[str, Any]]) -> str:
    """LoRA-A2 (scaled α) with the full probe (main grid) vs the probe cut to 0.25 (probe grid):
    accuracy and mean cell wall time, at the same split, budget and seeds."""
    lines = ["| split | budget | full probe: acc. | wall s | probe × 0.25: acc. | wall s "
             "| time ratio |", "|---|---|---|---|---|---|---|"]
    for split in ("dir0.1", "dir0.01"):
        for budget, alpha in (("1", "256.0"), ("8", "32.0")):
            f, p, seeds = paired(main_rows, probe_rows, split, budget, alpha)
            if not seeds:
                lines.append(f"| {SPLIT_NAMES[split]} | {budget} | · | · | · | · | · |")
                continue
            wf = statistics.fmean(x["wall_s"] for x in f)
            wp = statistics.fmean(x["wall_s"] for x in p)
            lines.append(f"| {SPLIT_NAMES[split]} | {budget} | "
                         f"{fmt([x['final_accuracy'] for x in f])} | {wf:.0f} | "
                         f"{fmt([x['final_accuracy'] for x in p])} | {wp:.0f} | {wp / wf:.2f} |")
    return "\n".join(lines)


PROBE_VARIANTS = (("reuse", "probe = reuse"), ("gradient", "probe = gradient"),
                  ("reselect2", "reselect every 2"))


def probe_variants_table(main_rows: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    """Issue 19: each cheaper selection against the main grid's full probe (LoRA-A2, scaled α)
    on the same data, split, budget and seeds: final accuracy (mean ± std), the mean paired
    change in points, and the variant's mean cell wall time in seconds. No ratio to the full
    probe's wall time: the main grid ran on another (faster) machine, so that ratio would mix
    machines (RESULTS §5 gives same-machine references)."""
    head = ["data, split", "budget", "full probe"] + [n for _, n in PROBE_VARIANTS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for cell in ("bbc-news__dir0.1", "bbc-news__dir0.01", "rotten-tomatoes__dir0.1"):
        data, split = cell.split("__")
        for budget, alpha in (("1", "256.0"), ("2", "128.0")):
            base = {r["seed"]: r for r in main_rows if r["data.name"] == data
                    and r["split"] == split and r["strategy.rank_budget"] == budget
                    and r.get("model.lora_alpha") == alpha}
            line = [f"{data} {SPLIT_NAMES[split]}", budget,
                    fmt([r["final_accuracy"] for r in base.values()])]
            for label, _ in PROBE_VARIANTS:
                mine = {r["seed"]: r for r in rows if r["setting"] == cell
                        and r["budget"] == budget and r["variant"] == label}
                seeds = sorted(set(mine) & set(base))
                if not seeds:
                    line.append("·")
                    continue
                delta = statistics.fmean(100 * (mine[x]["final_accuracy"]
                                                - base[x]["final_accuracy"]) for x in seeds)
                wall = statistics.fmean(mine[x]["wall_s"] for x in seeds)
                line.append(f"{fmt([mine[x]['final_accuracy'] for x in seeds])} "
                            f"(Δ {delta:+.1f}; {wall:.0f} s)")
            lines.append("| " + " | ".join(line) + " |")
    return "\n".join(lines)


def lr_table(main_rows: list[dict[str, Any]], lr_rows: list[dict[str, Any]]) -> str:
    """Final accuracy by lr_A at BBC News, Dir(0.01), budget 1, seed 0 (lr grid + the main
    grid's 5e-4 cells)."""
    lrs = ["0.0002", "0.0005", "0.001", "0.002", "0.008"]
    acc: dict[tuple[str, str], float] = {}
    for r in main_rows:
        if (r["data.name"], r["split"], r["seed"]) == ("bbc-news", "dir0.01", 0) and \
                r["strategy.rank_budget"] == "1" and not r.get("model.lora_alpha"):
            acc[(r["strategy.name"], "0.0005")] = r["final_accuracy"]
    for r in lr_rows:
        acc[(r["strategy.name"], r["strategy.lr"])] = r["final_accuracy"]
    lines = ["| method | " + " | ".join(f"lr_A = {float(x):g}" for x in lrs) + " |",
             "|" + "---|" * (1 + len(lrs))]
    for m in ("fl-lora", "ffa-lora", "flexlora", "lora-a2"):
        cells = [f"{100 * acc[(m, x)]:.1f}" if (m, x) in acc else "·" for x in lrs]
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def score_table(main_rows: list[dict[str, Any]], score_rows: list[dict[str, Any]]) -> str:
    """LoRA-A2 (scaled α) with the paper's Frobenius slot score (main grid) vs the RMS score
    (score grid): final accuracy at the same split, budget and seeds (paired)."""
    lines = ["| split | budget | seeds | Frobenius (paper) | RMS |", "|---|---|---|---|---|"]
    for split in ("dir0.1", "dir0.01"):
        for budget, alpha in (("1", "256.0"), ("2", "128.0")):
            fro, rms, seeds = paired(main_rows, score_rows, split, budget, alpha)
            lines.append(f"| {SPLIT_NAMES[split]} | {budget} | "
                         f"{', '.join(map(str, seeds)) or '·'} | "
                         f"{fmt([x['final_accuracy'] for x in fro])} | "
                         f"{fmt([x['final_accuracy'] for x in rms])} |")
    return "\n".join(lines)


MODULE_TYPES = ["attention.self.query", "attention.self.key", "attention.self.value",
                "attention.output.dense", "intermediate.dense", "output.dense"]


def allocation_table(grid_name: str = "main") -> str:
    """Where LoRA-A2 clients put their slots: share (%) of all selected slots per module type,
    summed over rounds, clients, splits and seeds of the grid's finished LoRA-A2 cells, for
    B-rounds and A-rounds apart (``rank_allocation`` in each cell's metrics.jsonl)."""
    grid = load_grid(grid_name)
    totals: dict[tuple, dict[str, int]] = {}
    for cell in expand(grid):
        if cell.overrides.get("strategy.name") != "lora-a2":
            continue
        cell_dir = RESULTS / grid_name / "cells" / cell.cell_id
        if not (cell_dir / "summary.json").exists():
            continue
        alpha = cell.overrides.get("model.lora_alpha")
        variant = f"α = {float(alpha):g}" if alpha else "α = 16"
        if cell.overrides.get("strategy.slot_score", "frobenius") != "frobenius":
            variant += f", {cell.overrides['strategy.slot_score']} score"
        for line in (cell_dir / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            key = (str(cell.overrides["strategy.rank_budget"]), variant, rec["active_factor"])
            acc = totals.setdefault(key, {})
            for module, n in (rec.get("rank_allocation") or {}).items():
                acc[module] = acc.get(module, 0) + n
    short = ["query", "key", "value", "attn.out", "intermediate", "output"]
    lines = ["| budget | LoRA-A2 | round | " + " | ".join(short) + " |",
             "|" + "---|" * (3 + len(short))]
    for key in sorted(totals, key=lambda k: (int(k[0]), k[1], k[2] != "B")):
        acc = totals[key]
        total = sum(acc.values()) or 1
        lines.append(f"| {key[0]} | {key[1]} | {key[2]} | "
                     + " | ".join(f"{100 * acc.get(m, 0) / total:.0f}" for m in MODULE_TYPES)
                     + " |")
    return "\n".join(lines)


FIGURES = ROOT / "docs" / "figures"


def curves_figure(grid_name: str = "main", data: str = "bbc-news") -> Path | None:
    """docs/figures/curves_<data>.png: test accuracy after each round, one panel per
    (split, budget) among Dir(0.1)/Dir(0.01) × budgets 1/8, one line per method (mean over the
    finished seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(sp, b) for b in ("1", "8") for sp in ("dir0.1", "dir0.01")]
    curves: dict[tuple, dict[str, list[list[float]]]] = {p: {} for p in panels}
    for cell in expand(load_grid(grid_name)):
        o = cell.overrides
        if o.get("data.name") != data:
            continue
        cell_dir = RESULTS / grid_name / "cells" / cell.cell_id
        if not (cell_dir / "summary.json").exists():
            continue
        key = (cell.labels.get("split"), str(o.get("strategy.rank_budget")))
        if key not in curves:
            continue
        name = method(o)
        first = json.loads((cell_dir / "initial_eval.json").read_text())["accuracy"]
        accs = [first] + [json.loads(x)["accuracy"]
                          for x in (cell_dir / "metrics.jsonl").read_text().splitlines()]
        curves[key].setdefault(name, []).append(accs)
    if not any(curves.values()):
        return None
    fig, axes = plt.subplots(2, 2, figsize=(9, 6.5), dpi=100, sharey=True)
    for ax, (sp, b) in zip(axes.flat, panels):
        for name, runs in sorted(curves[(sp, b)].items()):
            n = min(len(r) for r in runs)
            mean = [100 * statistics.fmean(r[i] for r in runs) for i in range(n)]
            ax.plot(range(n), mean, marker="o", ms=3, label=f"{name} ({len(runs)})")
        ax.set_title(f"{SPLIT_NAMES[sp]}, budget {b}", fontsize=9)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy (%)")
    fig.suptitle(f"{data}: mean over finished seeds (count in brackets)", fontsize=10)
    fig.tight_layout()
    FIGURES.mkdir(parents=True, exist_ok=True)
    path = FIGURES / f"curves_{data}.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def round_accuracies(cell_dir: Path) -> list[float]:
    """Test accuracy after each round 1..N of a cell (from its metrics.jsonl)."""
    return [json.loads(x)["accuracy"]
            for x in (cell_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]


def rounds_runs() -> list[dict[str, Any]]:
    """The finished cells of the longer-schedule grids (``rounds``: BBC News, ``rounds-rt``:
    Rotten Tomatoes) with their per-round accuracies, each paired with the main grid's cell of
    the same dataset, split, budget, method and seed (if any)."""
    main_cells = {}
    for c in expand(load_grid("main")):
        o = c.overrides
        main_cells[(o.get("data.name"), c.labels.get("split"), o.get("strategy.rank_budget"),
                    method(o), c.seed)] = c.cell_id
    runs = []
    for grid_name in ROUNDS_GRIDS:
        for c in expand(load_grid(grid_name)):
            cell_dir = RESULTS / grid_name / "cells" / c.cell_id
            if not (cell_dir / "summary.json").exists():
                continue
            o = c.overrides
            key = (o.get("data.name"), c.labels.get("split"), o.get("strategy.rank_budget"),
                   method(o), c.seed)
            main_dir = RESULTS / "main" / "cells" / main_cells.get(key, "-")
            runs.append({"data": key[0], "split": key[1], "method": key[3], "seed": c.seed,
                         "accs": round_accuracies(cell_dir),
                         "main": (round_accuracies(main_dir)
                                  if (main_dir / "summary.json").exists() else None)})
    return runs


ROUNDS_GRIDS = ("rounds", "rounds-rt")
DATA_NAMES = {"bbc-news": "BBC News", "rotten-tomatoes": "Rotten Tomatoes"}


def rounds_table(runs: list[dict[str, Any]]) -> str:
    """Accuracy at rounds 8 / 16 / 24 of the longer schedule, the mean of its last three rounds
    and of rounds 17–24, the mean absolute change from one round to the next after round 8 (how
    much the global model swings), the best round, and whether its first rounds repeat the main
    grid's 8-round cell."""
    head = ["dataset", "split", "method", "round 8", "round 16", "round 24", "mean of last 3",
            "mean of rounds 17–24", "mean \\|change\\| per round after 8", "best (round)",
            "rounds 1–8 vs main grid"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    data_order = list(DATA_NAMES)
    for r in sorted(runs, key=lambda r: (data_order.index(r["data"]), SPLITS.index(r["split"]),
                                         r["method"], r["seed"])):
        a = r["accs"]
        at = [f"{100 * a[i - 1]:.1f}" if len(a) >= i else "·" for i in (8, 16, 24)]
        best = max(range(len(a)), key=lambda i: a[i])
        if r["main"] is None:
            same = "·"
        else:
            n = min(len(a), len(r["main"]))
            diff = max(abs(x - y) for x, y in zip(a[:n], r["main"][:n]))
            same = "identical" if diff == 0 else f"max diff {100 * diff:.1f} points"
        tail = f"{100 * statistics.fmean(a[16:24]):.1f}" if len(a) >= 24 else "·"
        swing = (f"{100 * statistics.fmean(abs(a[i] - a[i - 1]) for i in range(8, len(a))):.1f}"
                 if len(a) > 8 else "·")
        lines.append(f"| {DATA_NAMES[r['data']]} | {SPLIT_NAMES[r['split']]} | {r['method']} | "
                     + " | ".join(at)
                     + f" | {100 * statistics.fmean(a[-3:]):.1f} | {tail} | {swing} "
                       f"| {100 * a[best]:.1f} ({best + 1}) | {same} |")
    return "\n".join(lines)


def rounds_figure(runs: list[dict[str, Any]]) -> Path | None:
    """docs/figures/curves_rounds.png: accuracy per round of the longer schedule, one panel
    per dataset and split, one line per method."""
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(d, sp) for d in DATA_NAMES for sp in SPLITS
              if any((r["data"], r["split"]) == (d, sp) for r in runs)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), dpi=100,
                             sharey=True, squeeze=False)
    for ax, (data, sp) in zip(axes.flat, panels):
        for r in sorted((r for r in runs if (r["data"], r["split"]) == (data, sp)),
                        key=lambda r: r["method"]):
            ax.plot(range(1, len(r["accs"]) + 1), [100 * x for x in r["accs"]], marker="o",
                    ms=2.5, label=f"{r['method']} (seed {r['seed']})")
        ax.axvline(8, color="grey", lw=0.8, ls="--")
        ax.set_title(f"{DATA_NAMES[data]} {SPLIT_NAMES[sp]}, budget 2", fontsize=9)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes[0, 0].set_ylabel("test accuracy (%)")
    fig.tight_layout()
    FIGURES.mkdir(parents=True, exist_ok=True)
    path = FIGURES / "curves_rounds.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def xdev_table() -> str:
    """The same main-grid cells run on the CPU (the grid's own) and on a GPU
    (``benchmarks/results/xdev``): same config and seed, different floating-point rounding."""
    lines = ["| cell | CPU final | GPU final | CPU last-3 | GPU last-3 | CPU s | GPU s |",
             "|---|---|---|---|---|---|---|"]
    d_final, d_last = [], []
    for gdir in sorted((RESULTS / "xdev" / "cells").glob("*/summary.json")):
        cdir = RESULTS / "main" / "cells" / gdir.parent.name
        if not (cdir / "summary.json").exists():
            continue
        g, c = json.loads(gdir.read_text()), json.loads((cdir / "summary.json").read_text())
        if c.get("device", "cpu") != "cpu":
            continue
        gl = last_rounds_accuracy(gdir.parent / "metrics.jsonl")
        cl = last_rounds_accuracy(cdir / "metrics.jsonl")
        d_final.append(abs(g["final_accuracy"] - c["final_accuracy"]))
        d_last.append(abs(gl - cl))
        lines.append(f"| {gdir.parent.name} | {100 * c['final_accuracy']:.1f} | "
                     f"{100 * g['final_accuracy']:.1f} | {100 * cl:.1f} | {100 * gl:.1f} | "
                     f"{c['wall_s']:.0f} | {g['wall_s']:.0f} |")
    if d_final:
        lines += ["", f"Mean |CPU − GPU| over these {len(d_final)} cells: "
                      f"{100 * statistics.fmean(d_final):.1f} points on the final round's accuracy, "
                      f"{100 * statistics.fmean(d_last):.1f} on the mean of the last three rounds."]
    return "\n".join(lines)


def instruct_table(rows: list[dict[str, Any]]) -> str:
    """Causal-LM instruction tuning (grid ``instruct``): per strategy and budget, ROUGE-L and
    test loss of the base model and after the last round, mean ± std over seeds."""
    if not rows:
        return "_No finished cells yet (`lora-a2 bench instruct`)._"

    lines = ["| budget / rank | strategy | seeds | ROUGE-L base → final (%) | last 3 rounds (%) | "
             "test loss base → final | upload (MB) |", "|---|---|---|---|---|---|---|"]
    def method(r: dict[str, Any]) -> str:
        alpha = r.get("model.lora_alpha")
        return r["strategy.name"] + (f" (α = {float(alpha):g})" if alpha else "")

    order = ["lora-a2", "fl-lora", "ffa-lora", "flexlora"]
    keys = sorted({(int(r["strategy.rank_budget"]), method(r)) for r in rows},
                  key=lambda k: (k[0], order.index(k[1]) if k[1] in order else 99 - k[1].count("α")))
    for budget, name in keys:
        sel = [r for r in rows if int(r["strategy.rank_budget"]) == budget and method(r) == name]
        lines.append(
            f"| {budget} | {name} | {len(sel)} | "
            f"{fmt([r['initial_rouge_l'] for r in sel])} → "
            f"**{fmt([r['final_rouge_l'] for r in sel])}** | "
            f"{fmt([r['last3_rouge_l'] for r in sel])} | "
            f"{fmt([r['initial_loss'] for r in sel], 1, 3)} → "
            f"**{fmt([r['final_loss'] for r in sel], 1, 3)}** | "
            f"{mb([r['total_upload_bytes'] for r in sel])} |")
    return "\n".join(lines)


FLEET_SCHEDULES = ("sync", "deadline", "async")
FLEET_METHODS = ["lora-a2", "fl-lora", "ffa-lora", "rolora", "flexlora", "hetlora"]


def fleet_key(r: dict[str, Any]) -> tuple[str, str, str]:
    """(fleet, schedule, method) of a ``fleet`` grid row; the method marked "auto" where its
    budgets came from the link."""
    where = next(r[k] for k in FLEET_SCHEDULES if r.get(k))
    fleet, schedule = where.rsplit("-", 1)
    name = next(r[k] for k in ("fixed", "budgeted", "lora_a2") if r.get(k))
    return fleet, schedule, name + (" (auto)" if r.get("strategy.rank_budget") == "auto" else "")


def seconds(xs: list[float | None]) -> str:
    """Mean ± std of simulated seconds over seeds; '–' marks the seeds that never got there."""
    got = [x for x in xs if x is not None]
    text = fmt(got, 1.0, 0) if got else ""
    missing = len(xs) - len(got)
    return (text + " (" + "–" * missing + ")" if got else "never") if missing else text


def first_to_target(rows: list[dict[str, Any]], target: str) -> str:
    """Which (schedule, method) reached ``target`` first and by how much: groups are ranked by
    their mean time over seeds, counting only groups where every seed got there; the margin is
    against the fastest group of another method."""
    groups: dict[tuple[str, str], list[float | None]] = {}
    for r in rows:
        groups.setdefault(fleet_key(r)[1:], []).append(r.get(target))
    n_reached = sum(r.get(target) is not None for r in rows)
    ranked = sorted((sum(ts) / len(ts), key, len(ts)) for key, ts in groups.items()
                    if all(t is not None for t in ts))
    if not ranked:
        some = " (only some seeds of a method)" if n_reached else ""
        return f"no method reached it in every seed{some}; {n_reached} of {len(rows)} cells did."

    def said(item: tuple[float, tuple[str, str], int]) -> str:
        mean, (schedule, name), n = item
        return f"{name} ({schedule}) at {mean:.0f} s" + ("¹" if n == 1 else f" (mean of {n})")

    first = ranked[0]
    text = f"first {said(first)}"
    base = first[1][1].split()[0]
    other = next((x for x in ranked[1:] if x[1][1].split()[0] != base), None)
    if other is not None:
        text += f"; the first other method {said(other)}, {other[0] / first[0]:.1f}× as long"
    return text + f"; {n_reached} of {len(rows)} cells reached it."


def fleet_table(rows: list[dict[str, Any]], fleet: str) -> str:
    """Grid ``fleet``, one fleet: per schedule and method, the final accuracy, the simulated
    seconds to each target and in all, the share of client time spent uploading, and the upload;
    then, per target, which cell got there first."""
    rows = [r for r in rows if fleet_key(r)[0] == fleet]
    if not rows:
        return f"_No finished `{fleet}` cells yet (`lora-a2 bench fleet`)._"
    targets = sorted({k for r in rows for k in r if k.startswith("time_to_")},
                     key=lambda k: float(k[len("time_to_"):]))
    head = ["schedule", "method", "seeds", "final accuracy (%)",
            *[f"to {100 * float(t[len('time_to_'):]):g} % (s)" for t in targets],
            "run (s)", "upload share of client time (%)", "upload (MB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = sorted({fleet_key(r)[1:] for r in rows},
                  key=lambda k: (FLEET_SCHEDULES.index(k[0]),
                                 FLEET_METHODS.index(k[1].split()[0])))
    for schedule, name in keys:
        sel = [r for r in rows if fleet_key(r)[1:] == (schedule, name)]
        lines.append("| " + " | ".join([
            schedule, name, str(len(sel)), fmt([r["final_accuracy"] for r in sel]),
            *[seconds([r.get(t) for r in sel]) for t in targets],
            fmt([r["sim_time_s"] for r in sel], 1.0, 0),
            fmt([r["upload_time_share"] for r in sel]),
            mb([r["total_upload_bytes"] for r in sel])]) + " |")
    lines.append("")
    for t in targets:
        lines.append(f"- {100 * float(t[len('time_to_'):]):g} %: " + first_to_target(rows, t))
    return "\n".join(lines)


def spread_table(rows: list[dict[str, Any]]) -> str:
    """Grid ``default-spread``: the default run at each seed (final, best and last-three-rounds
    accuracy, upload, wall time), then their mean ± std and range: the seed-to-seed spread that
    a change of precision or speed must stay within."""
    if not rows:
        return "_No finished cells yet (`lora-a2 bench default-spread`)._"
    cols = ["final_accuracy", "best_accuracy", "last3_accuracy"]
    lines = ["| seed | final accuracy (%) | best round (%) | last 3 rounds (%) | upload (MB) | "
             "wall (s) |", "|---|---|---|---|---|---|"]
    rows = sorted(rows, key=lambda r: r["seed"])
    for r in rows:
        lines.append(f"| {r['seed']} | " + " | ".join(f"{100 * r[c]:.1f}" for c in cols)
                     + f" | {r['total_upload_bytes'] / 1e6:.1f} | {r['wall_s']:.0f} |")
    if len(rows) > 1:
        lines.append("| **mean ± std** | " + " | ".join(fmt([r[c] for r in rows]) for c in cols)
                     + f" | {mb([r['total_upload_bytes'] for r in rows])} | "
                       f"{fmt([r['wall_s'] for r in rows], 1.0, 0)} |")
        lines.append("| **range** | " + " | ".join(
            f"{100 * (max(r[c] for r in rows) - min(r[c] for r in rows)):.1f} points"
            for c in cols) + " | | |")
    return "\n".join(lines)


def main_twins(grid_name: str, drop: tuple[str, ...]) -> dict[str, str | None]:
    """Each cell of ``grid_name`` → the main-grid cell of the same config and seed once the keys
    ``drop`` are set aside (None where the main grid has no such cell)."""
    def key(overrides: dict[str, Any]) -> str:
        return json.dumps({k: v for k, v in overrides.items() if k not in drop}, sort_keys=True)

    main = {key(c.overrides): c.cell_id for c in expand(load_grid("main"))}
    return {c.cell_id: main.get(key(c.overrides)) for c in expand(load_grid(grid_name))}


def precision_table(rows: list[dict[str, Any]], main_rows: list[dict[str, Any]] = (),
                    spread_rows: list[dict[str, Any]] = (),
                    twins: dict[str, str | None] | None = None) -> str:
    """Grid ``precision``: each (split, budget, seed) pair's final accuracy in float32 and in
    ``bf16-mixed``, the difference and the wall times, beside the main-grid cell the float32
    one repeats (``twins``: precision cell → main cell; same config and seed). A bf16 cell whose
    float32 rerun has not run yet is paired with that main-grid cell, which is the same run in
    float32 (marked ᵐ). Then the
    differences read against rounding alone — this grid's float32 cells against those main-grid
    cells, which differ only where the hardware rounds differently — and, for context, the
    default run's seed-to-seed standard deviation (grid ``default-spread``)."""
    twins = main_twins("precision", ("train.precision",)) if twins is None else twins
    main = {r["cell"]: r for r in main_rows}
    pairs: dict[tuple[str, str, int], dict[str, dict[str, Any]]] = {}
    for r in rows:
        pairs.setdefault((r["split"], str(r["budget"]), r["seed"]), {})[r["train.precision"]] = r
    if not pairs:
        return "_No finished cells yet (`lora-a2 bench precision`)._"
    lines = ["| split | budget | seed | main grid (%) | fp32 (%) | fp32 − main: rounding (points) "
             "| bf16-mixed (%) | bf16 − fp32 (points) | wall fp32 / bf16 (s) |",
             "|---|---|---|---|---|---|---|---|---|"]
    deltas, rounding, devices, on_main = [], [], set(), 0
    for (split, budget, seed), by in sorted(pairs.items(),
                                            key=lambda kv: (SPLITS.index(kv[0][0]), kv[0][1:])):
        acc = [f"{100 * by[p]['final_accuracy']:.1f}" if p in by else "·" for p in PRECISIONS]
        twin = main.get(next((twins[r["cell"]] for r in by.values() if twins.get(r["cell"])),
                             ""))
        # the fp32 side of the pair: this grid's rerun, else the main-grid cell itself (the
        # same config and seed in float32)
        fp = by.get("fp32") or twin
        walls = [fp["wall_s"] if fp else None, by["bf16-mixed"]["wall_s"]
                 if "bf16-mixed" in by else None]
        # a main-grid cell's wall (ᵐ) ran in another session, one of two 1-thread workers:
        # it does not divide this grid's bf16 wall
        marks = ["ᵐ" if "fp32" not in by else "", ""]
        wall = " / ".join(f"{w:.0f}{m}" if w is not None else "·" for w, m in zip(walls, marks))
        diff = "·"
        if fp is not None and "bf16-mixed" in by:
            d = by["bf16-mixed"]["final_accuracy"] - fp["final_accuracy"]
            deltas.append(d)
            on_main += "fp32" not in by
            diff = f"{100 * d:+.1f}" + ("ᵐ" if "fp32" not in by else "")
        was, moved = "·", "·"
        if twin is not None:
            was = f"{100 * twin['final_accuracy']:.1f} ({twin.get('device') or 'cpu'})"
        if twin is not None and "fp32" in by:
            rounding.append(by["fp32"]["final_accuracy"] - twin["final_accuracy"])
            devices |= {twin.get("device") or "cpu", by["fp32"].get("device") or "cpu"}
            moved = f"{100 * rounding[-1]:+.1f}"
        lines.append(f"| {SPLIT_NAMES[split]} | {budget} | {seed} | {was} | {acc[0]} | {moved} | "
                     f"{acc[1]} | {diff} | {wall} |")
    lines.append("")
    if not deltas:
        lines.append("- no complete pair yet.")
    else:
        size = [abs(d) for d in deltas]
        lines.append(f"- {len(deltas)} complete pairs: bf16 − fp32 mean "
                     f"{100 * statistics.fmean(deltas):+.1f} points (mean size "
                     f"{100 * statistics.fmean(size):.1f}), largest "
                     f"{100 * max(deltas, key=abs):+.1f}"
                     + (f"; ᵐ {on_main} against the main-grid cell itself (its fp32 rerun here "
                        f"not run yet; its wall time, from another session, does not divide "
                        f"this grid's)" if on_main else "") + ".")
    if rounding:
        worst = max(abs(d) for d in rounding)
        n = len(rounding)
        line = (f"- rounding alone: {n} fp32 cell{'s' * (n != 1)} against the main-grid "
                f"cell{'s' * (n != 1)} {'they repeat' if n != 1 else 'it repeats'} (same config "
                f"and seed; on {' and '.join(sorted(devices))}): mean size "
                f"{100 * statistics.fmean(abs(d) for d in rounding):.1f} points, largest "
                f"{100 * worst:.1f}")
        if worst == 0:
            line += " (the same final accuracy: the same hardware)"
        if deltas:
            line += (f"; {sum(abs(d) <= worst for d in deltas)} of {len(deltas)} bf16 − fp32 "
                     f"differences are no larger")
        lines.append(line + ".")
    finals = [r["final_accuracy"] for r in spread_rows]
    if len(finals) > 1:
        lines.append(f"- for scale, seeds alone: the default run's seed-to-seed std is "
                     f"{100 * statistics.stdev(finals):.1f} points (grid `default-spread`).")
    bf16 = [by["bf16-mixed"] for by in pairs.values() if "bf16-mixed" in by]
    kernels = {"float32 kernels on the bfloat16 operands, each product rounded once to "
               "bfloat16": sum(r.get("bf16_products_in_fp32") is True for r in bf16),
               "torch's bfloat16 kernels": sum(r.get("bf16_products_in_fp32") is False
                                               for r in bf16),
               "kernels not recorded": sum(r.get("bf16_products_in_fp32") is None for r in bf16)}
    if bf16:
        lines.append("- the bf16-mixed cells' matrix products (`train.bf16_matmul`): "
                     + "; ".join(f"{what} in {n}" for what, n in kernels.items() if n) + ".")
    return "\n".join(lines)


PAPER_METHODS = ["lora-a2", "lora-a2-scaled", "fl-lora", "ffa-lora", "flexlora", "rolora",
                 "fedex-lora"]


def lr_setting(r: dict[str, Any]) -> str:
    """A ``paper-schedule`` row's lr setting: "tuned" for the main block's cells (each method's
    tuned lr_A), the lr for an include block's."""
    return f"{float(r['strategy.lr']):g}" if r.get("strategy.lr") else "tuned"


def paper_schedule_table(rows: list[dict[str, Any]], cell_dirs: dict[str, Path] | None = None
                         ) -> str:
    """Grid ``paper-schedule``: per method and lr_A (each method's tuned lr, and the papers'
    5e-4 from the grid's include block) and split, the final and last-three-rounds accuracy
    (mean ± std over seeds), and seed 0's best round against its last (an lr too large for the
    100 local epochs shows as a fall after an early best); then, per split and lr setting,
    whether each LoRA-A2 variant leads, ties or trails the baselines on the seeds every method
    has (:func:`verdict`). ``cell_dirs`` maps a cell id to its directory (default: the grid's
    cells)."""
    if not rows:
        return "_No finished cells yet (`lora-a2 bench paper-schedule`)._"
    cell_dirs = cell_dirs or {r["cell"]: RESULTS / "paper-schedule" / "cells" / r["cell"]
                              for r in rows}
    tuned = {m["label"]: f"{float(m['strategy.lr']):g}"
             for m in load_grid("paper-schedule")["axes"]["method"]}
    setting = lr_setting
    settings = sorted({setting(r) for r in rows}, key=lambda x: (x != "tuned", x))
    splits = [s for s in SPLITS if any(r["split"] == s for r in rows)]
    head = ["method", "lr_A"]
    for s in splits:
        head += [f"{SPLIT_NAMES[s]} final (%)", f"{SPLIT_NAMES[s]} last 3 (%)",
                 f"{SPLIT_NAMES[s]} seed 0: best (round) → last"]
    lines = ["| " + " | ".join(head + ["upload (MB)"]) + " |", "|" + "---|" * (len(head) + 1)]
    for st in settings:
        for m in PAPER_METHODS:
            mine = [r for r in rows if r["method"] == m and setting(r) == st]
            if not mine:
                continue
            line = [m, tuned.get(m, "·") if st == "tuned" else st]
            for s in splits:
                sel = [r for r in mine if r["split"] == s]
                line += [fmt([r["final_accuracy"] for r in sel]),
                         fmt([r["last3_accuracy"] for r in sel])]
                zero = [r for r in sel if r["seed"] == 0]
                if zero:
                    a = round_accuracies(cell_dirs[zero[0]["cell"]])
                    best = max(range(len(a)), key=lambda i: a[i])
                    line.append(f"{100 * a[best]:.1f} ({best + 1}) → {100 * a[-1]:.1f}")
                else:
                    line.append("·")
            line.append(mb([r["total_upload_bytes"] for r in mine]))
            lines.append("| " + " | ".join(line) + " |")
    lines.append("")
    for st in settings:
        said_lr = "each method's tuned lr_A" if st == "tuned" else f"lr_A = {st}"
        for s in splits:
            sel = [r for r in rows if r["split"] == s and setting(r) == st]
            seeds = sorted(set.intersection(*({r["seed"] for r in sel if r["method"] == m}
                                              for m in PAPER_METHODS)))
            if len(seeds) < 2:
                lines.append(f"- {SPLIT_NAMES[s]}, {said_lr}: not every method has two seeds "
                             f"yet.")
                continue
            score = {(r["method"], r["seed"]): r["final_accuracy"] for r in sel}
            base = {m: [score[(m, sd)] for sd in seeds] for m in PAPER_METHODS
                    if "lora-a2" not in m}
            said = []
            for m in (m for m in PAPER_METHODS if "lora-a2" in m):
                mine = [score[(m, sd)] for sd in seeds]
                v = verdict(mine, list(base.values()))
                ahead = [b for b, o in base.items() if beats(o, mine)]  # what "trails" saw
                said.append(f"{m} {v}" + (f" ({', '.join(ahead)})" if v == "trails" else ""))
            lines.append(f"- {SPLIT_NAMES[s]}, {said_lr}, seeds {', '.join(map(str, seeds))}, "
                         "final accuracy against the baselines: " + "; ".join(said) + " (leads: "
                         "its worst seed beats every baseline's best; trails: the named "
                         "baselines' worst seed beats its best; ties otherwise).")
    return "\n".join(lines)


Curves = dict[tuple[str, str], dict[tuple[str, int], list[tuple[int, float]]]]
"""``{(split, lr setting): {(method, seed): [(round, accuracy), ...]}}``."""


def paper_schedule_curves(rows: list[dict[str, Any]], cell_dirs: dict[str, Path] | None = None
                          ) -> Curves:
    """Grid ``paper-schedule``'s accuracy curves, round 0 (the initial evaluation, where the
    cell has one) to the last: ``{(split, lr setting): {(method, seed): [(round, acc), ...]}}``,
    each seed its own curve (under Dir(0.01) a mean over seeds hides the swings the reading is
    about)."""
    cell_dirs = cell_dirs or {r["cell"]: RESULTS / "paper-schedule" / "cells" / r["cell"]
                              for r in rows}
    curves: Curves = {}
    for r in rows:
        d = cell_dirs[r["cell"]]
        first = d / "initial_eval.json"
        accs = ([(0, json.loads(first.read_text())["accuracy"])] if first.exists() else []) \
            + list(enumerate(round_accuracies(d), start=1))
        curves.setdefault((r["split"], lr_setting(r)), {})[(r["method"], r["seed"])] = accs
    return curves


def paper_schedule_figure(curves: Curves, path: Path | None = None) -> Path | None:
    """docs/figures/curves_paper_schedule.png: accuracy per round of the ``paper-schedule``
    grid, one panel per split (rows) and lr setting (columns), one colour per method, seed 0
    solid and seed 1 dashed."""
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    splits = [sp for sp in SPLITS if any(k[0] == sp for k in curves)]
    settings = sorted({k[1] for k in curves}, key=lambda x: (x != "tuned", x))
    colours = dict(zip(PAPER_METHODS, plt.get_cmap("tab10").colors))
    fig, axes = plt.subplots(len(splits), len(settings), figsize=(5.5 * len(settings),
                                                                  4 * len(splits)),
                             dpi=100, sharex=True, sharey=True, squeeze=False)
    for (row, sp), (col, st) in itertools.product(enumerate(splits), enumerate(settings)):
        ax = axes[row, col]
        said = "each method's tuned lr_A" if st == "tuned" else f"lr_A = {st}"
        ax.set_title(f"{SPLIT_NAMES[sp]}, {said}", fontsize=9)
        ax.grid(alpha=0.3)
        if row == len(splits) - 1:
            ax.set_xlabel("round (5 local epochs each)")
        cell = curves.get((sp, st), {})
        if not cell:
            ax.text(0.5, 0.5, "no finished cell yet", ha="center", transform=ax.transAxes)
            continue
        for (m, seed), accs in sorted(cell.items(), key=lambda kv: (
                PAPER_METHODS.index(kv[0][0]), kv[0][1])):
            ax.plot([i for i, _ in accs], [100 * a for _, a in accs],
                    color=colours.get(m), ls="-" if seed == 0 else "--", marker="o", ms=2,
                    lw=1.2, label=f"{m} (seed {seed})")
        ax.legend(fontsize=6)
    axes[0, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    for ax in axes[:, 0]:
        ax.set_ylabel("test accuracy (%)")
    fig.tight_layout()
    path = path or FIGURES / "curves_paper_schedule.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def render(write: bool = True) -> dict[str, str]:
    """Every generated block; with ``write`` also the grids' aggregate files and the figure."""
    rows = {g: rows_of(g, write)
            for g in ("main", "hetero", "dp", "probe", "lr", "score", *ROUNDS_GRIDS, "instruct",
                      "claim", "claim-lr", "probe-variants", "fleet", "default-spread",
                      "precision", "paper-schedule")}
    blocks = main_tables(rows["main"])
    blocks.update(claim_blocks(rows["claim"], rows["claim-lr"], rows["main"]))
    blocks["steps"] = steps_table(rows["main"])
    blocks["hetero"] = hetero_table(rows["hetero"])
    blocks["dp"] = dp_table(rows["dp"], rows["main"])
    blocks["probe"] = probe_table(rows["main"], rows["probe"])
    blocks["probe_variants"] = probe_variants_table(rows["main"], rows["probe-variants"])
    blocks["allocation"] = allocation_table("main")
    blocks["lr"] = lr_table(rows["main"], rows["lr"])
    blocks["score"] = score_table(rows["main"], rows["score"])
    blocks["allocation_score"] = allocation_table("score")
    if write:
        curves_figure("main", "bbc-news")
    blocks["xdev"] = xdev_table()
    blocks["instruct"] = instruct_table(rows["instruct"])
    blocks["fleet:mobile"] = fleet_table(rows["fleet"], "mobile")
    blocks["fleet:mixed"] = fleet_table(rows["fleet"], "mixed")
    blocks["default_spread"] = spread_table(rows["default-spread"])
    blocks["precision"] = precision_table(rows["precision"], rows["main"], rows["default-spread"])
    blocks["paper_schedule"] = paper_schedule_table(rows["paper-schedule"])
    if write:
        paper_schedule_figure(paper_schedule_curves(rows["paper-schedule"]))
    runs = rounds_runs()
    blocks["rounds"] = rounds_table(runs)
    if write:
        rounds_figure(runs)
    counts = {g: (len(r), len(expand(load_grid(g))), sum(x.get("device", "cpu") != "cpu"
                                                         for x in r))
              for g, r in rows.items()}
    blocks["progress"] = ", ".join(f"`{g}` {n} of {t} cells" + (f" ({k} on a GPU)" if k else "")
                                   for g, (n, t, k) in counts.items())
    return blocks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--print", action="store_true", help="print the blocks, leave the doc alone")
    mode.add_argument("--check", action="store_true",
                      help="write nothing; exit 1 naming each block of docs/RESULTS.md that "
                           "differs from what the committed cells render")
    args = ap.parse_args(argv)
    blocks = render(write=not (args.print or args.check))
    if args.print:
        for name, text in blocks.items():
            print(f"## {name}\n{text}\n")
        return 0
    doc, stale = fill(DOC.read_text(), blocks, every=True)
    readme, stale_readme = fill(README.read_text(), blocks, every=False)
    if args.check:
        for path, names in ((DOC, stale), (README, stale_readme)):
            if names:
                blocks_word = "block" if len(names) == 1 else "blocks"
                print(f"{shown(path)} is stale in {len(names)} {blocks_word}: "
                      f"{', '.join(names)} (rerun benchmarks/render_results.py)", file=sys.stderr)
        if stale or stale_readme:
            return 1
        print(f"all {len(blocks)} blocks of {shown(DOC)} are current, and {shown(README)}'s "
              f"copies of them")
        return 0
    DOC.write_text(doc)
    README.write_text(readme)
    print(f"rewrote {len(blocks)} blocks of {shown(DOC)} and their copies in {shown(README)}")
    return 0


def shown(path: Path) -> str:
    """``path`` relative to the repository when it is inside it."""
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def fill(doc: str, blocks: dict[str, str], every: bool) -> tuple[str, list[str]]:
    """``doc`` with each block ``<!-- BEGIN name -->`` … ``<!-- END name -->`` replaced by its
    rendering, and the names of those that differed; ``every``: a block the doc lacks counts
    as stale (RESULTS.md has them all; the README copies a few)."""
    stale = []
    for name, text in blocks.items():
        pat = re.compile(rf"(<!-- BEGIN {re.escape(name)} -->\n)(.*?)(<!-- END {re.escape(name)} -->)",
                         re.S)
        found = pat.search(doc)
        if not found:
            if every:
                print(f"note: docs/RESULTS.md has no block '{name}'", file=sys.stderr)
                stale.append(name)
            continue
        if found.group(2) != text + "\n":
            stale.append(name)
        doc = pat.sub(lambda m: m.group(1) + text + "\n" + m.group(3), doc)
    return doc, stale


if __name__ == "__main__":
    raise SystemExit(main())
