"""Devices and networks, the simulated clock, deadlines, over-selection, budgets from the link
(issue 33 §2–3) — tiny model, fleets written as CSV files in the test."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import assert_config_error, stop_before_round
from lora_a2.cli import main
from lora_a2.config import FLEET_PROFILES, load_config
from lora_a2.fleet import (COMPUTE, LINKS, PROFILES, Device, Fleet, close_round_clock,
                           draw_profile, read_fleet_csv, selected_per_round,
                           training_flops_per_example)
from lora_a2 import runner
from lora_a2.report import read_metrics
from lora_a2.rounds import RoundPlan, apply_clock

TINY = ["model.name=tiny-random-bert", "model.max_length=24", "strategy.global_rank=4",
        "data.partition=iid"]


def write_fleet(path: Path, rows: list[tuple]) -> Path:
    """rows: (flops, down_mbps, up_mbps[, availability]) per client, in client order."""
    with open(path, "w") as f:
        f.write("client,flops,down_mbps,up_mbps,availability\n")
        for c, r in enumerate(rows):
            f.write(f"{c},{r[0]},{r[1]},{r[2]},{r[3] if len(r) > 3 else ''}\n")
    return path


def run(tmp_path, name, data, sets) -> Path:
    out = tmp_path / name
    args = ["run", "--quiet", "--out", str(out), "--set", f"data.name=csv:{data}"]
    for s in TINY + sets:
        args += ["--set", s]
    assert main(args) == 0
    return out


def lines(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("wall_s")}
            for r in read_metrics(out / "metrics.jsonl")]


# ---------------------------------------------------------------------- pure parts
def test_profiles_are_the_published_figures_and_seeded():
    assert set(FLEET_PROFILES) == {"none", *PROFILES}  # the config's copy of the names
    for name, segments in PROFILES.items():
        fleet = draw_profile(name, 50, seed=3)
        assert fleet == draw_profile(name, 50, seed=3)
        links = {(LINKS[n].down_mbps, LINKS[n].up_mbps) for s in segments for n in s.links}
        for d in fleet:
            assert (d.down_mbps, d.up_mbps) in links
            assert any(COMPUTE[n].low <= d.flops <= COMPUTE[n].high
                       for s in segments for n in s.compute)
    assert draw_profile("mixed", 50, 3) != draw_profile("mixed", 50, 4)
    assert len({d.flops for d in draw_profile("mixed", 50, 3)}) > 10


def test_client_time_is_bytes_over_rate_plus_flops_over_device_flops():
    fleet = Fleet([Device(2.5e9, 20.0, 5.0)], flops_per_example=3.0e6)
    down, compute, up = fleet.times(0, 1_000_000, 250_000, example_passes=40 * 2)
    assert down == pytest.approx(1_000_000 * 8 / 20e6, rel=1e-12)  # 0.4 s
    assert compute == pytest.approx(40 * 2 * 3.0e6 / 2.5e9, rel=1e-12)  # 0.096 s
    assert up == pytest.approx(250_000 * 8 / 5e6, rel=1e-12)  # 0.4 s


def test_close_round_clock():
    finish = {0: 3.0, 1: 1.0, 2: 9.0, 3: 2.0, 4: 2.0}
    # a deadline: the late client is a straggler and the round lasts until the deadline
    c = close_round_clock(finish, [0, 1, 2, 3], deadline_s=5.0, target=None, waiting=False)
    assert (c.kept, c.stragglers, c.surplus, c.round_s) == ([0, 1, 3], [2], [], 5.0)
    # no deadline: the slowest reply
    c = close_round_clock(finish, [0, 1, 2], deadline_s=0, target=None, waiting=False)
    assert (c.kept, c.stragglers, c.round_s) == ([0, 1, 2], [], 9.0)
    # over-selection: the first two finishers (ties by id), closed at the second's time
    c = close_round_clock(finish, [0, 2, 3, 4], deadline_s=0, target=2, waiting=False)
    assert (c.kept, c.surplus, c.round_s) == ([3, 4], [0, 2], 2.0)
    # a refused reply that would arrive after the round closed is surplus, not a rejection;
    # one that arrived before the close is a rejection (neither kept nor surplus)
    c = close_round_clock({0: 1.0, 1: 2.0, 2: 8.0, 3: 1.5}, [0, 1], deadline_s=0, target=2,
                          waiting=False)
    assert (c.kept, c.surplus, c.round_s) == ([0, 1], [2], 2.0)
    # too few on time for the target: keep them, wait until the deadline
    c = close_round_clock(finish, [0, 2], deadline_s=5.0, target=2, waiting=False)
    assert (c.kept, c.stragglers, c.round_s) == ([0], [2], 5.0)
    # everyone on time but a dropout is awaited: the deadline
    c = close_round_clock({1: 1.0}, [1], deadline_s=4.0, target=None, waiting=True)
    assert c.round_s == 4.0
    # a late reply is a straggler even when its upload was refused: the server waited for it
    c = close_round_clock({0: 1.0, 1: 3.0}, [0], deadline_s=2.0, target=None, waiting=False)
    assert (c.kept, c.stragglers, c.round_s) == ([0], [1], 2.0)
    # finishing exactly at the deadline is on time
    c = close_round_clock({0: 2.0, 1: 1.0}, [0, 1], deadline_s=2.0, target=None, waiting=False)
    assert (c.kept, c.stragglers, c.round_s) == ([0, 1], [], 2.0)
    c = close_round_clock({0: 2.0, 1: 1.0}, [0, 1], deadline_s=2.0, target=2, waiting=False)
    assert (c.kept, c.surplus, c.round_s) == ([0, 1], [], 2.0)
    # a tie for the last place goes to the lower client id
    c = close_round_clock({0: 1.0, 3: 2.0, 4: 2.0}, [0, 3, 4], deadline_s=0, target=2,
                          waiting=False)
    assert (c.kept, c.surplus) == ([0, 3], [4])


def test_a_client_is_offline_with_probability_one_minus_its_availability():
    """Fleet.offline draws each (seed, round, client) once: over 4,000 rounds a client of
    availability p is offline in 1 − p of them (5 σ), never at p = 1, always at p = 0."""
    ps = [1.0, 0.9, 0.3, 0.0]
    fleet = Fleet([Device(1e9, 10.0, 2.0, p) for p in ps])
    n = 4000
    for c, p in enumerate(ps):
        off = sum(fleet.offline(7, rnd, c) for rnd in range(1, n + 1)) / n
        assert off == pytest.approx(1 - p, abs=5 * (p * (1 - p) / n) ** 0.5 + 1e-12), (p, off)
    assert fleet.offline(7, 3, 2) == fleet.offline(7, 3, 2)  # seeded
    assert [fleet.offline(s, 1, 2) for s in range(40)] != [fleet.offline(7, 1, 2)] * 40


def test_fleet_csv_read_and_refused(tmp_path):
    ok = write_fleet(tmp_path / "ok.csv", [(1e9, 10, 2), (2e9, 20, 4, 0.5)])
    assert read_fleet_csv(ok, 2) == [Device(1e9, 10, 2, 1.0), Device(2e9, 20, 4, 0.5)]
    bom = tmp_path / "bom.csv"  # Excel's "CSV UTF-8" starts with a byte-order mark
    bom.write_bytes(b"\xef\xbb\xbf" + ok.read_bytes())
    assert read_fleet_csv(bom, 2) == read_fleet_csv(ok, 2)
    # rows past the run's clients are not used: one fleet file serves runs of fewer clients
    assert read_fleet_csv(ok, 1) == [Device(1e9, 10, 2, 1.0)]


def test_the_slowest_device_and_link_a_fleet_file_may_give(tmp_path):
    write_fleet(tmp_path / "f.csv", [(1, 1e-6, 1e-6)])
    assert read_fleet_csv(tmp_path / "f.csv", 1) == [Device(1.0, 1e-6, 1e-6, 1.0)]


@pytest.mark.parametrize("sets,needle", [
    (["fleet.profile=csv:~nosuchuser/f.csv"], "'fleet.profile' names the home folder of "
                                             "'nosuchuser'"),
    (["data.name=csv:~nosuchuser/x.csv"], "'data.name' names the home folder of 'nosuchuser'"),
    (["model.name=~nosuchuser/m"], "'model.name' names the home folder of 'nosuchuser'"),
    (["fleet.profile='csv:/tmp/a\u0000b'"], "'fleet.profile' must not hold a NUL character"),
])
def test_a_path_no_machine_could_open_is_a_one_line_config_error(capsys, sets, needle):
    """They were tracebacks (Path.expanduser's RuntimeError, open's embedded null byte)."""
    assert_config_error(capsys, sets, needle)


def test_a_config_naming_another_machine_s_home_still_parses():
    """The home-folder check belongs to the components' checks, not the config's own: a run
    folder copied from another machine loads for ``lora-a2 generate``, which opens no data."""
    from lora_a2.config import load_config as parse_only

    assert parse_only(None, ["data.name=csv:~nosuchuser/x.csv"]).data.name == \
        "csv:~nosuchuser/x.csv"


def test_a_fleet_csv_path_may_start_with_a_tilde(tmp_path, monkeypatch, capsys):
    write_fleet(tmp_path / "f.csv", [(1e9, 10, 2), (2e9, 20, 4)])
    monkeypatch.setenv("HOME", str(tmp_path))
    assert read_fleet_csv("~/f.csv", 2) == read_fleet_csv(tmp_path / "f.csv", 2)
    assert main(["config", "--set", "fleet.profile=csv:~/f.csv", "data.num_clients=2"]) == 0


@pytest.mark.parametrize("content,needle", [
    ("client,flops,down_mbps\n0,1e9,10\n", "lacks column(s) up_mbps"),
    ("client,flops,down_mbps,up_mbps\n0,1e9,10,0\n", "up_mbps must be a number ≥ 1e-06 (1 bit/s)"),
    ("client,flops,down_mbps,up_mbps\n0,-1,10,2\n", "flops must be a number ≥ 1 (1 FLOP/s)"),
    # so slow that the simulated clock's times were infinite (Infinity written into JSON)
    ("client,flops,down_mbps,up_mbps\n0,1e-310,10,2\n1,1e9,10,2\n", "column flops must be"),
    ("client,flops,down_mbps,up_mbps\n0,1e9,1e-310,2\n1,1e9,10,2\n", "column down_mbps must"),
    ("client,flops,down_mbps,up_mbps\n0,0.5,10,2\n1,1e9,10,2\n", "column flops must be"),
    ("client,flops,down_mbps,up_mbps\n0,1e9,10,9e-7\n1,1e9,10,2\n", "column up_mbps must"),
    ("client,flops,down_mbps,up_mbps\n0,1e9,9e-7,2\n1,1e9,10,2\n", "column down_mbps must"),
    ("client,flops,down_mbps,up_mbps\n0,1e9,10,x\n", "must be a number"),
    ("client,flops,down_mbps,up_mbps\n0,1e9,10,2\n", "no row for client 1"),
    ("client,flops,down_mbps,up_mbps\n", "no row for client 0"),  # a header alone
    ("client,flops,down_mbps,up_mbps\n0,1e9,10,2\n1,1e9,10,2\n-1,1e9,10,2\n",
     "line 4: client ids start at 0, got -1"),
    ("", "lacks column(s) client, flops, down_mbps, up_mbps"),  # an empty file
    ("client,flops,down_mbps,up_mbps\n0,1e9,10,2\n1,1e9,\xe9t\xe9,2\n".encode("latin-1"),
     "not a UTF-8 CSV"),
])
def test_bad_fleet_csv_is_a_one_line_error(tmp_path, capsys, content, needle):
    path = tmp_path / "f.csv"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert_config_error(capsys, [f"fleet.profile=csv:{path}", "data.num_clients=2"], needle)


@pytest.mark.parametrize("sets,needle", [
    (["strategy.rank_budget=auto"], "strategy.rank_budget"),
    (["strategy.rank_budget=auto", "fleet.profile=mobile"], "train.deadline_s > 0"),
    (["strategy.rank_budget=auto", "train.deadline_s=5"], "needs a simulated clock"),
    (["train.deadline_s=5"], "fleet.profile"),
    (["train.over_select=0.3"], "fleet.profile"),
    (["fleet.profile=moblie"], "fleet.profile"),
    (["fleet.profile=mobile", "train.deadline_s=5", "privacy.mechanism=gaussian",
      "privacy.noise_multiplier=1"], "cannot be combined with DP"),
    (["fleet.profile=mobile", "train.over_select=0.3", "privacy.mechanism=gaussian",
      "privacy.noise_multiplier=1"], "cannot be combined with DP"),
    (["fleet.profile=mobile", "train.deadline_s=5", "strategy.rank_budget=auto",
      "privacy.mechanism=gaussian", "privacy.noise_multiplier=1"], "DP"),
    (["fleet.profile=mobile", "train.deadline_s=5", "strategy.rank_budget=auto",
      "strategy.name=fl-lora"], "'auto' needs a strategy whose upload is sized"),
    (["train.deadline_s=-1", "fleet.profile=mobile"], "train.deadline_s"),
    (["fleet.profile=mobile", "secagg.enabled=true", "engine.name=flower"],
     "'fleet.profile' cannot be combined with secagg.enabled"),
])
def test_bad_combinations_are_one_line_errors(capsys, sets, needle):
    assert_config_error(capsys, sets, needle)


def test_over_selection_samples_the_ceiling():
    """⌈cpr · (1 + over_select)⌉ clients, at most K: 3 · 1.3 = 3.9 → 4; 3 · 2 = 6 exactly."""
    cfg = load_config(None, ["data.num_clients=10", "fleet.profile=mobile",
                             "train.over_select=0.3"])
    assert selected_per_round(cfg, 3) == 4
    cfg.train.over_select = 1.0
    assert selected_per_round(cfg, 3) == 6 and selected_per_round(cfg, 8) == 10
    # a product that floating point rounds just above an integer: 25 · 1.12 = 28.000000000000004
    cfg.data.num_clients, cfg.train.over_select = 100, 0.12
    assert 25 * (1 + 0.12) > 28 and selected_per_round(cfg, 25) == 28


def test_lora_a2_declares_its_probe_in_its_passes():
    from lora_a2.strategies import get_strategy

    def passes(*sets, n=100):
        cfg = load_config(None, ["train.local_epochs=2", "train.batch_size=10", *sets])
        return get_strategy(cfg).local_passes(1, n)

    assert passes() == 3.0  # E = 2 plus a one-epoch probe
    assert passes("strategy.options.probe_epochs=2") == 4.0
    assert passes("strategy.options.probe_fraction=0.25") == pytest.approx(2.3)  # 3 of 10 steps
    # 100 examples in batches of 30: 4 steps an epoch (30, 30, 30, 10); a two-epoch probe
    # cut to 0.8 runs ⌈0.8 · 8⌉ = 7 steps: one whole epoch (100) and 3 steps (90) = 1.9 passes
    assert passes("train.batch_size=30", "strategy.options.probe_epochs=2",
                  "strategy.options.probe_fraction=0.8") == pytest.approx(3.9)
    assert passes("strategy.options.probe=reuse") == 2.0  # the probe is the first epoch
    # reselect_every = 2: a round of a phase that reuses its selection runs no probe
    cfg = load_config(None, ["train.local_epochs=2", "train.batch_size=10",
                             "strategy.options.reselect_every=2"])
    s = get_strategy(cfg)
    assert [s.local_passes(r, 100) for r in (1, 2, 3, 4, 5)] == [3.0, 3.0, 2.0, 2.0, 3.0]
    assert passes("strategy.options.probe=gradient") == pytest.approx(2.4)  # 4 batches of 10
    assert get_strategy(load_config(None, ["train.local_epochs=2", "strategy.name=fl-lora"])
                        ).local_passes(1, 100) == 2.0


# ---------------------------------------------------------------------- runs
FAST = (1e12, 100.0, 100.0)


def test_sim_time_is_the_formula_from_real_bytes_and_counted_flops(tmp_path, synthetic_csv):
    from torch.utils.flop_counter import FlopCounterMode

    import lora_a2.fleet
    from lora_a2.client import batch_of
    from lora_a2.experiment import prepare

    fleet = write_fleet(tmp_path / "f.csv", [(3e9, 10.0, 2.0), (7e9, 40.0, 8.0), (5e10, 5, 1)])
    sets = ["data.num_clients=3", "train.rounds=2", "strategy.name=fl-lora",
            "strategy.rank_budget=2", f"fleet.profile=csv:{fleet}", "train.batch_size=8",
            "train.local_epochs=2"]
    out = run(tmp_path, "a", synthetic_csv, sets)
    # FLOPs of one training example, counted here on the run's first batch
    exp = prepare(load_config(out / "config.toml"))
    batch = batch_of(exp.enc_train, torch.arange(8), exp.runtime.device)
    for p in exp.runtime.model.parameters():  # as local training does: only the federated
        p.requires_grad_(False)                # parameters get gradients
    for p in exp.runtime.params.values():
        p.requires_grad_(True)
    exp.runtime.model.train()
    with FlopCounterMode(display=False) as counter:
        exp.task.loss(exp.runtime.model, batch).backward()
    per_example = counter.get_total_flops() / 8
    devices = read_fleet_csv(fleet, 3)
    clock = 0.0
    for r in read_metrics(out / "metrics.jsonl"):
        finish = []
        for row in r["per_client"]:
            d = devices[row["client"]]
            assert row["sim_download_s"] == pytest.approx(8 * row["download_bytes"] / 10**6
                                                          / d.down_mbps, rel=1e-12)
            assert row["sim_upload_s"] == pytest.approx(8 * row["upload_bytes"] / 10**6
                                                        / d.up_mbps, rel=1e-12)
            # FL+LoRA: two local epochs over the client's examples (passes_k = 2)
            assert row["sim_compute_s"] == pytest.approx(
                row["num_examples"] * 2 * per_example / d.flops, rel=1e-9)
            finish.append(row["sim_download_s"] + row["sim_compute_s"] + row["sim_upload_s"])
        assert r["sim_round_s"] == max(finish)  # no deadline: the slowest client
        clock += r["sim_round_s"]
        assert r["sim_time_s"] == clock and r["stragglers"] == [] and r["offline"] == []
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sim_time_s"] == clock
    assert (out / "plots" / "accuracy_vs_time.png").is_file()


def test_time_to_target_is_the_first_round_that_reached_it():
    from lora_a2.report import time_to_targets

    records = [{"round": r, "accuracy": a, "sim_time_s": 10.0 * r, "cumulative_upload_bytes": r,
                "wall_s": 1.5} for r, a in ((1, 0.3), (2, 0.5), (3, 0.45), (4, 0.7))]
    got = time_to_targets(records, {"accuracy": 0.2}, "accuracy", True, [0.5, 0.9, 0.1, 0.46])
    assert [(t["target"], t["round"], t["sim_time_s"], t["upload_bytes"], t["wall_s"])
            for t in got] == [(0.5, 2, 20.0, 2, 3.0), (0.9, None, None, None, None),
                              (0.1, 0, 0.0, 0, 0.0), (0.46, 2, 20.0, 2, 3.0)]
    # without a fleet there is no simulated time, not even for round 0
    plain = [{k: v for k, v in r.items() if k != "sim_time_s"} for r in records]
    assert [t["sim_time_s"] for t in time_to_targets(plain, {"accuracy": 0.2}, "accuracy",
                                                     True, [0.1, 0.5])] == [None, None]
    # a metric where lower is better (a loss) is reached from above
    loss = [{"round": r, "loss": v} for r, v in ((1, 2.0), (2, 1.2), (3, 0.9))]
    assert [t["round"] for t in time_to_targets(loss, {"loss": 2.5}, "loss", False,
                                                [1.0, 2.5, 0.5])] == [3, 0, None]


def test_targets_reach_the_summary_and_the_console(tmp_path, synthetic_csv, capsys):
    fleet = write_fleet(tmp_path / "f.csv", [(3e9, 10.0, 2.0), (7e9, 40.0, 8.0), (5e10, 5, 1)])
    sets = ["data.num_clients=3", "train.rounds=3", "strategy.name=fl-lora",
            "strategy.rank_budget=2", f"fleet.profile=csv:{fleet}"]
    first = run(tmp_path, "a", synthetic_csv, sets)
    records = read_metrics(first / "metrics.jsonl")
    target = records[1]["accuracy"]  # reached by round 2 at the latest
    initial = json.loads((first / "summary.json").read_text())["initial_accuracy"]
    expected = next(r for r in [{"round": 0, "accuracy": initial}, *records]
                    if r["accuracy"] >= target)
    capsys.readouterr()
    args = ["run", "--out", str(tmp_path / "b"), "--set", f"data.name=csv:{synthetic_csv}"]
    for item in TINY + sets + [f"report.targets=[{target!r}, 1.0]"]:
        args += ["--set", item]
    assert main(args) == 0
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    hit, never = summary["time_to_target"]
    perfect = next((r["round"] for r in records if r["accuracy"] >= 1.0), None)
    assert hit["round"] == expected["round"] and never["round"] == perfect
    assert hit["sim_time_s"] == (expected.get("sim_time_s") or 0.0)
    out = capsys.readouterr().out
    assert f"target     accuracy {target:g}: round {expected['round']}" in out
    assert perfect is not None or "accuracy 1: not reached" in out


def test_default_run_has_no_clock(tmp_path, synthetic_csv):
    out = run(tmp_path, "a", synthetic_csv, ["data.num_clients=3", "train.rounds=1"])
    r = read_metrics(out / "metrics.jsonl")[0]
    assert not [k for k in r if k.startswith("sim_") or k in ("stragglers", "offline")]
    assert not [k for k in r["per_client"][0] if k.startswith("sim_")]
    assert "sim_time_s" not in json.loads((out / "summary.json").read_text())


def deadline_sets(fleet: Path, rounds: int = 4) -> list[str]:
    return ["data.num_clients=4", f"train.rounds={rounds}", "train.clients_per_round=3",
            f"fleet.profile=csv:{fleet}", "train.deadline_s=2.0", "strategy.rank_budget=2"]


def test_deadline_stragglers_are_discarded_and_runs_are_deterministic(tmp_path, synthetic_csv):
    # client 2's device needs minutes for its local epochs: it misses every deadline; a
    # simulated dropout got its task, so the server waits for it until the deadline too
    fleet = write_fleet(tmp_path / "f.csv", [FAST, FAST, (1e5, 100.0, 100.0), FAST])
    sets = deadline_sets(fleet, rounds=6) + ["train.dropout=0.2"]
    a = run(tmp_path, "a", synthetic_csv, sets)
    b = run(tmp_path, "b", synthetic_csv, sets)
    assert lines(a) == lines(b)  # same seed: the same clock, to the last bit
    records = lines(a)
    late_rounds = [r for r in records if 2 in r["clients"] and 2 not in r["dropped"]]
    dropout_rounds = [r for r in records if r["dropped"]]
    quiet = [r for r in records if r not in late_rounds and r not in dropout_rounds]
    assert late_rounds and quiet and [r for r in dropout_rounds if r not in late_rounds]
    clock = 0.0
    for r in records:
        rows = {row["client"]: row for row in r["per_client"]}
        assert r["stragglers"] == ([2] if r in late_rounds else [])
        assert r["num_replies"] == len(r["clients"]) - len(r["stragglers"]) - len(r["dropped"])
        if r in late_rounds:
            late = rows[2]
            assert late["straggler"] and late["upload_bytes"] == 0 and late["download_bytes"] > 0
            assert "train_loss" not in late
            assert late["sim_download_s"] + late["sim_compute_s"] + late["sim_upload_s"] > 2.0
        if r in late_rounds or r in dropout_rounds:
            assert r["sim_round_s"] == 2.0  # the server waited until the deadline
        else:
            assert r["sim_round_s"] < 2.0
        assert r["upload_bytes"] == sum(row["upload_bytes"] for row in r["per_client"])
        clock += r["sim_round_s"]
        assert r["sim_time_s"] == clock
    summary = json.loads((a / "summary.json").read_text())
    assert summary["stragglers"] == sum(len(r["stragglers"]) for r in records)


def test_a_late_upload_that_would_be_refused_is_a_straggler_not_a_rejection(tmp_path,
                                                                            synthetic_csv):
    """With a norm bound no upload meets, the on-time clients are rejected; the slow client's
    upload arrives after the deadline, so the server never received it to refuse: it is a
    straggler only, and the round still lasts until the deadline."""
    fleet = write_fleet(tmp_path / "f.csv", [FAST, FAST, (1e5, 100.0, 100.0), FAST])
    out = run(tmp_path, "a", synthetic_csv, deadline_sets(fleet, rounds=3)
              + ["server.max_update_norm=1e-9", "train.clients_per_round=4",
                 "strategy.name=fl-lora"])
    for r in lines(out):
        rows = {row["client"]: row for row in r["per_client"]}
        assert r["stragglers"] == [2] and rows[2]["straggler"] and "rejected" not in rows[2]
        assert r["rejected"] == 3 == len(r["reject_reasons"])
        assert not any(x.startswith("client 2:") for x in r["reject_reasons"])
        assert r["sim_round_s"] == 2.0 and r["status"] == "failed"


def test_kill_and_resume_keep_the_clock_exact(tmp_path, synthetic_csv):
    from test_reliability import _kill_after

    fleet = write_fleet(tmp_path / "f.csv", [FAST, (2e9, 1.0, 0.5), (1e5, 100.0, 100.0), FAST])
    rounds = 5

    def cli(out):
        args = [sys.executable, "-m", "lora_a2.cli", "run", "--quiet", "--out", str(out),
                "--set", f"data.name=csv:{synthetic_csv}"]
        for s in TINY + deadline_sets(fleet, rounds):
            args += ["--set", s]
        return args

    ref = tmp_path / "ref"
    assert main(cli(ref)[3:]) == 0  # in-process: only the killed run needs its own process
    out = tmp_path / "k"
    _kill_after(cli(out), out, 2, 0.0)
    done = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
    # killed after its 2nd round's line (round 2's checkpoint maybe not written): a real
    # resume (a child that died early, or a kill at the 120 s deadline before any round, would
    # make the "resume" a fresh run)
    assert 2 <= len(done) < rounds, "the kill came too early or too late to test anything"
    assert main(["run", "--quiet", "--resume", str(out)]) == 0
    assert json.loads((out / "summary.json").read_text())["resumed_from_round"] >= 1
    assert lines(out) == lines(ref)
    assert lines(ref)[-1]["sim_time_s"] > 0


def test_offline_clients_never_get_a_task(tmp_path, synthetic_csv):
    fleet_csv = write_fleet(tmp_path / "f.csv",
                            [FAST, (1e12, 100.0, 100.0, 0.3), FAST, (1e12, 100.0, 100.0, 0.6)])
    out = run(tmp_path, "a", synthetic_csv,
              ["data.num_clients=4", "train.rounds=6", f"fleet.profile=csv:{fleet_csv}"])
    fleet = Fleet(read_fleet_csv(fleet_csv, 4))
    records = lines(out)
    seen = [c for r in records for c in r["offline"]]
    assert seen and set(seen) <= {1, 3}
    for r in records:
        assert r["offline"] == [c for c in r["clients"] if fleet.offline(0, r["round"], c)]
        for row in r["per_client"]:
            if row["client"] in r["offline"]:
                assert row["offline"] and row["download_bytes"] == 0 == row["upload_bytes"]
                assert "num_examples" not in row and "sim_download_s" not in row
            else:
                assert row["download_bytes"] > 0
        assert r["num_replies"] == len(r["clients"]) - len(r["offline"])


def test_apply_clock_discards_a_refused_reply_that_arrives_after_the_close():
    """Over-selection: clients 0 and 1 are accepted and close the round at 2 s; client 2's
    upload was refused but would arrive at 8 s: the server never read it, so it is surplus
    (upload not counted, its reason gone), not a rejection."""
    class StubFleet:
        flops_per_example = 1.0

        def times(self, c, down, up, work):
            return 0.0, ({0: 1.0, 1: 2.0, 2: 8.0}[c] if work else 0.0), 0.0

    cfg = load_config(overrides=["fleet.profile=mobile", "data.num_clients=3",
                                 "train.clients_per_round=2", "train.over_select=0.5"])
    exp = SimpleNamespace(fleet=StubFleet(), cfg=cfg, client_train={c: [0] * 4 for c in range(3)},
                          strategy=SimpleNamespace(local_passes=lambda rnd, n: 1.0))
    plan = RoundPlan(rnd=1, t0=0.0, clients=[0, 1, 2],
                     tasks={c: SimpleNamespace(client_id=c) for c in range(3)},
                     per_client={c: {"client": c, "download_bytes": 10, "upload_bytes": 100}
                                 for c in range(3)})
    plan.per_client[2]["rejected"] = "norm too large"
    ok = [(plan.tasks[c], None) for c in (0, 1)]
    reasons = ["client 2: norm too large"]
    kept = apply_clock(exp, plan, ok, reasons)
    assert [t.client_id for t, _ in kept] == [0, 1]
    assert plan.sim["surplus"] == [2] and plan.sim["sim_round_s"] == 2.0
    assert reasons == [] and plan.per_client[2]["upload_bytes"] == 0
    assert plan.per_client[2]["surplus"] and "rejected" not in plan.per_client[2]


def test_over_selection_keeps_the_first_finishers(tmp_path, synthetic_csv):
    # five devices of different speeds; 2 clients per round, over-selected by 100 % (4 sampled)
    fleet = write_fleet(tmp_path / "f.csv", [(10 ** (8 + c / 2), 20.0 + c, 5.0 + c)
                                             for c in range(5)])
    out = run(tmp_path, "a", synthetic_csv,
              ["data.num_clients=5", "train.rounds=3", "train.clients_per_round=2",
               "train.over_select=1.0", f"fleet.profile=csv:{fleet}"])
    for r in lines(out):
        assert len(r["clients"]) == 4 and r["num_replies"] == 2
        finish = {row["client"]: row["sim_download_s"] + row["sim_compute_s"]
                  + row["sim_upload_s"] for row in r["per_client"]}
        order = sorted(finish, key=lambda c: (finish[c], c))
        kept = sorted(order[:2])
        assert r["surplus"] == sorted(order[2:]) and r["stragglers"] == []
        rows = {row["client"]: row for row in r["per_client"]}
        assert [c for c in kept if rows[c].get("train_loss") is not None] == kept
        assert all(rows[c]["surplus"] and rows[c]["upload_bytes"] == 0 for c in order[2:])
        assert r["sim_round_s"] == finish[order[1]]


@pytest.mark.parametrize("strategy", ["lora-a2", "flexlora", "hetlora"])
def test_auto_budgets_grow_with_the_uplink(tmp_path, synthetic_csv, strategy):
    # equal devices and downlinks; uplinks from hopeless to fast
    ups = [0.002, 0.03, 0.06, 0.5, 100.0]
    fleet = write_fleet(tmp_path / "f.csv", [(1e12, 100.0, u) for u in ups])
    out = run(tmp_path, "a", synthetic_csv,
              ["data.num_clients=5", "train.rounds=2", f"strategy.name={strategy}",
               f"fleet.profile=csv:{fleet}", "train.deadline_s=1.0",
               "strategy.rank_budget=auto"])
    first = [c["rank_budget"] for c in json.loads((out / "partition.json").read_text())["clients"]]
    assert first == sorted(first) and first[-1] == 4 and len(set(first)) >= 3, first
    for r in lines(out):
        rows = {row["client"]: row for row in r["per_client"]}
        budgets = [rows[c]["rank_budget"] for c in range(5)]
        assert budgets == sorted(budgets), budgets  # a faster uplink, a larger budget
        # the hopeless client: not even rank 1 fits, a straggler by construction (FlexLoRA's
        # rank-1 upload, A and B, may not fit on the second-slowest link either)
        fits = [c for c in range(5) if rows[c]["budget_fits"]]
        assert 0 not in fits and {2, 3, 4} <= set(fits)
        assert r["stragglers"] == [c for c in range(5) if c not in fits]
        for c in fits:  # every fitted budget did fit: the real bytes within the deadline
            row = rows[c]
            assert not row.get("straggler") and row["upload_bytes"] > 0
            assert row["sim_download_s"] + row["sim_compute_s"] + row["sim_upload_s"] <= 1.0


def test_auto_budgets_fit_every_natural_client_when_num_clients_is_0(tmp_path):
    """``data.num_clients = 0`` (every natural client): the first round's fit covers the
    clients the partition found, as with their count written out."""
    from conftest import synthetic_texts

    texts, labels = synthetic_texts(160)
    data = tmp_path / "n.csv"
    with open(data, "w") as f:
        f.write("text,label,user\n")
        for i, (t, y) in enumerate(zip(texts, labels)):
            f.write(f"{t},{['fruit', 'animal', 'colour'][y]},u{i % 4}\n")
    fleet = write_fleet(tmp_path / "f.csv", [(1e12, 100.0, u) for u in (0.002, 0.06, 0.5, 100.0)])
    sets = ["data.partition=natural", "data.client_column=user", "train.rounds=1",
            "train.clients_per_round=1", f"fleet.profile=csv:{fleet}", "train.deadline_s=1.0",
            "strategy.rank_budget=auto"]

    def budgets(name: str, k: int) -> list[int]:
        out = run(tmp_path, name, data, [*sets, f"data.num_clients={k}"])
        return [c["rank_budget"] for c in json.loads((out / "partition.json").read_text())[
            "clients"]]

    every = budgets("every", 0)
    assert every == budgets("four", 4) and len(set(every)) >= 3, every


def test_reference_uploads_count_each_client_round_at_the_budget_it_had(monkeypatch):
    """``rank_budget = "auto"`` changes budgets from round to round: the summary's reference
    figures price each kept client-round at its own round's budget (the client's fixed budget
    when the row has none), and skip discarded replies."""
    class Ref:
        @staticmethod
        def reference_upload_values(model, layout, rank):
            return 10 * rank

    monkeypatch.setitem(runner.REGISTRY, "ref", Ref)
    exp = SimpleNamespace(strategy=SimpleNamespace(budgets={0: 4, 1: 4}),
                          runtime=SimpleNamespace(layout=None, model=None),
                          cfg=SimpleNamespace(report=SimpleNamespace(references=["ref"])))
    records = [{"upload_params": 7, "per_client": [
                   {"client": 0, "num_examples": 5, "rank_budget": 1},
                   {"client": 1, "num_examples": 5, "rank_budget": 2},
                   {"client": 1, "num_examples": 5, "rank_budget": 3, "straggler": True}]},
               {"upload_params": 3, "per_client": [{"client": 0, "num_examples": 5}]}]
    out = runner.reference_uploads(exp, records)
    assert (out["ref_upload_params"], out["ref_upload_bytes"]) == (10 * (1 + 2 + 4), 280)
    assert out["upload_fraction_of_ref"] == pytest.approx(10 / 70)
    assert out["ref_scales_with_rank"] is True
    Ref.reference_upload_values = staticmethod(lambda model, layout, rank: 1000)  # full model
    assert runner.reference_uploads(exp, records)["ref_scales_with_rank"] is False


def test_a_resumed_auto_run_gets_back_each_clients_last_budget(tmp_path, monkeypatch):
    """On resume the budgets are the first round's fit (partition.json) updated by every kept
    round's fits, as the uninterrupted run had them; refitted at the resumed round only when
    partition.json is unreadable or does not cover every client, or a kept row is broken."""
    refits = []
    monkeypatch.setattr(runner, "fit_budgets",
                        lambda exp, rnd, state, clients: refits.append((rnd, clients)))
    exp = SimpleNamespace(cfg=SimpleNamespace(data=SimpleNamespace(num_clients=3),
                                              train=SimpleNamespace(mode="sync")),
                          strategy=SimpleNamespace(budgets=[9, 9, 9]))
    part = tmp_path / "partition.json"
    part.write_text(json.dumps({"clients": [{"client": c, "rank_budget": b}
                                            for c, b in enumerate([4, 3, 2])]}))
    records = [{"per_client": [{"client": 0, "rank_budget": 2}, {"client": 2, "offline": True}]},
               {"per_client": [{"client": 0, "rank_budget": 1}, {"client": 1, "rank_budget": 4}]}]
    runner.restore_budgets(exp, tmp_path, records, 3, None)
    assert exp.strategy.budgets == [1, 4, 2] and refits == []
    for bad in ("{", json.dumps({"clients": [{"client": 0, "rank_budget": 4}]}),
                json.dumps({"clients": [{"client": c, "rank_budget": 0} for c in range(3)]}),
                json.dumps({"clients": [{"client": c} for c in range(3)]})):
        part.write_text(bad)
        runner.restore_budgets(exp, tmp_path, records, 3, None)
    part.write_text(json.dumps({"clients": [{"client": c, "rank_budget": 2} for c in range(3)]}))
    for row in ({"client": 7, "rank_budget": 2}, {"client": 0, "rank_budget": None}):
        runner.restore_budgets(exp, tmp_path, [{"per_client": [row]}], 3, None)
    assert refits == [(3, [0, 1, 2])] * 6


def test_an_interrupted_auto_budget_run_resumes_to_the_same_run(tmp_path, synthetic_csv,
                                                                monkeypatch):
    """``rank_budget = "auto"`` with 3 of 5 clients a round, budgets that change from round to
    round (here the upload the fit assumes is sized at twice the rank in even rounds): a run
    stopped after round 2 and resumed writes the same metrics and summary budgets as one that
    ran straight through (a client not sampled since keeps the budget of its last round)."""
    from lora_a2.runner import run_experiment
    from lora_a2.strategies import REGISTRY

    real = REGISTRY["lora-a2"].largest_update
    monkeypatch.setattr(REGISTRY["lora-a2"], "largest_update",
                        lambda self, rnd, c, n, r: real(self, rnd, c, n,
                                                        r if rnd % 2 else min(2 * r, 4)))

    # client 3 (0.05 Mbit/s up) fits rank 3 in odd rounds and 1 in even ones; it is sampled in
    # rounds 1 and 2 only, so its last budget is round 2's
    ups = [0.03, 0.06, 0.5, 0.05, 100.0]
    fleet = write_fleet(tmp_path / "f.csv", [(1e12, 100.0, u) for u in ups])
    cfg = load_config(None, [f"data.name=csv:{synthetic_csv}", *TINY, "data.num_clients=5",
                             "train.rounds=4", "train.clients_per_round=3",
                             "strategy.name=lora-a2", f"fleet.profile=csv:{fleet}",
                             "train.deadline_s=1.0", "strategy.rank_budget=auto"])
    ref = run_experiment(cfg, tmp_path / "ref", progress=False)
    assert [3 in r["clients"] for r in lines(tmp_path / "ref")] == [True, True, False, False]

    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "cut", progress=False, round_fn=stop_before_round(3))
    again = run_experiment(cfg, tmp_path / "cut", progress=False, resume=True)
    assert lines(tmp_path / "cut") == lines(tmp_path / "ref")
    assert ref["rank_budgets"][3] == 1 != json.loads(
        (tmp_path / "ref" / "partition.json").read_text())["clients"][3]["rank_budget"]
    assert again["rank_budgets"] == ref["rank_budgets"]
    for k in ("fl_lora_upload_params", "fedavg_full_upload_params"):
        assert again[k] == ref[k]


@pytest.mark.parametrize("value", ["[nan]", "['high']", "0.7"])
def test_a_bad_target_is_one_line(capsys, value):
    from conftest import assert_config_error

    assert_config_error(capsys, [f"report.targets={value}"], "report.targets")


def test_a_clients_training_flops_count_the_attention_whatever_the_kernel(monkeypatch):
    """The simulated clock must not depend on the machine that simulates it. A decoder without
    attention dropout (Llama's, SmolLM2's) trains with torch's fused CPU attention kernel, which
    torch's own FLOP counter ignores (it knows CUDA's only): the fleet's count with that kernel
    equals the count with eager attention (explicit products torch's counter sees), and is
    more than torch's counter alone gives."""
    from torch.utils.flop_counter import FlopCounterMode

    import lora_a2.fleet
    from lora_a2.client import batch_of
    from lora_a2.experiment import prepare

    exp = prepare(load_config(None, ["model.name=tiny-random-llama", "data.name=bbc-headlines",
                                     "model.max_length=256", "data.num_clients=1",
                                     "data.max_train_examples=16", "data.max_test_examples=8",
                                     "data.min_examples_per_client=1"]))
    rt = exp.runtime
    batch = batch_of(exp.enc_train, torch.arange(8), rt.device)
    base = rt.model.get_base_model()
    assert base.config._attn_implementation == "sdpa" and base.config.attention_dropout == 0
    fused = training_flops_per_example(rt, batch)
    with monkeypatch.context() as m:  # torch's counter alone: blind to the fused attention
        m.setattr(lora_a2.fleet, "flop_counter", lambda: FlopCounterMode(display=False))
        blind = training_flops_per_example(rt, batch)
    base.set_attn_implementation("eager")
    eager = training_flops_per_example(rt, batch)
    assert fused == eager > blind > 0


def test_a_round_lasts_until_its_last_reply_a_rejected_one_included():
    """The server has to receive an upload to reject it: a rejected reply that arrives last
    sets the round's length (docs/FLEETS.md), though it is not kept."""
    clock = close_round_clock({0: 10.0, 1: 12.0, 2: 30.0}, [0, 1], deadline_s=0, target=None,
                              waiting=False)
    assert clock.kept == [0, 1] and clock.round_s == 30.0
    # with a deadline it is cut off there: a late reply, rejected or not, is a straggler
    clock = close_round_clock({0: 10.0, 1: 12.0, 2: 30.0}, [0, 1], deadline_s=20.0,
                              target=None, waiting=False)
    assert clock.stragglers == [2] and clock.round_s == 20.0
