"""Asynchronous buffered aggregation, FedBuff (issue 33 §4): the staleness rule, the buffered
step per strategy, the schedule on the simulated clock, its errors, determinism and resume —
tiny model, fleets written as CSV files in the test."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from conftest import assert_config_error, run_cli, tiny_setup
from lora_a2.aggregation import buffered_weights, staleness_weight
from lora_a2.checks import load_config
from lora_a2.cli import main
from lora_a2.config.validate import phase_every
from lora_a2.messages import Update
from lora_a2.payload import flatten
from lora_a2.report import read_metrics

#: six clients of different speeds (flops, down Mbit/s, up Mbit/s)
DEVICES = [(3e9, 10.0, 2.0), (7e9, 40.0, 8.0), (5e10, 5, 1), (2e9, 20, 4), (1e10, 50, 10),
           (4e9, 8, 2)]


def write_fleet(path: Path, rows=DEVICES) -> Path:
    with open(path, "w") as f:
        f.write("client,flops,down_mbps,up_mbps\n")
        for c, r in enumerate(rows):
            f.write(f"{c},{r[0]},{r[1]},{r[2]}\n")
    return path


def async_sets(fleet: Path, *more: str) -> list[str]:
    return ["data.num_clients=6", "data.partition=iid", f"fleet.profile=csv:{fleet}",
            "train.mode=async", "train.concurrency=4", "train.buffer_size=2", *more]


def lines(out: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.endswith("wall_s")}
            for r in read_metrics(out / "metrics.jsonl")]


# ---------------------------------------------------------------------- the paper's rule
def test_staleness_weight_is_fedbuffs_rule():
    # Nguyen et al. 2022: s(τ) = 1/√(1+τ); x ← x + η_g (1/K) Σ_k s(τ_k) Δ_k
    for tau in range(12):
        assert staleness_weight(tau) == 1.0 / math.sqrt(1.0 + tau)
    assert staleness_weight(0) == 1.0 and staleness_weight(3) == 0.5
    taus = [0, 1, 3, 8]
    equal = buffered_weights([10, 10, 10, 10], taus, server_lr=0.7)
    assert equal == pytest.approx([0.7 * (1 / 4) / math.sqrt(1 + t) for t in taus], rel=1e-15)
    # unequal data: the synchronous data weights n_k / Σ n_j take the place of 1/K
    got = buffered_weights([10, 30], [0, 3])
    assert got == pytest.approx([0.25, 0.75 * 0.5], rel=1e-15)
    assert buffered_weights([5, 15], [0, 0]) == pytest.approx([0.25, 0.75])  # = the sync rule
    with pytest.raises(ValueError):
        staleness_weight(-1)
    with pytest.raises(ValueError, match="1 staleness values for 2 updates"):
        buffered_weights([10, 30], [0])
    with pytest.raises(ValueError, match="2 staleness values for 1 updates"):
        buffered_weights([10], [0, 1])
    assert len(buffered_weights([1] * 300, [0] * 300)) == 300  # lengths compared by value


def test_buffered_step_adds_the_staleness_weighted_deltas():
    cfg, s, rt, ctxs = tiny_setup(["strategy.name=fl-lora", "strategy.rank_budget=2"], 3)
    cfg.train.server_lr = 0.5  # an async run's η_g (the config is a sync one)
    state = s.init_state(rt.initial_state())
    names = s.layout.group_names(["A", "B"])
    gen = torch.Generator().manual_seed(0)
    replies, deltas = [], []
    for c, n in enumerate((10, 30, 20)):
        task = s.configure(1, c, state)
        delta = {k: torch.randn(state.tensors[k].shape, generator=gen) for k in names}
        deltas.append(delta)
        replies.append((task, Update(c, n, flatten(delta, names))))
    taus = [0, 2, 5]
    new, _ = s.aggregate_buffer(4, state, replies, taus)
    for k in names:
        want = state.tensors[k].double() + sum(
            0.5 / math.sqrt(1 + t) * n / 60 * d[k].double()
            for t, n, d in zip(taus, (10, 30, 20), deltas))
        assert torch.allclose(new.tensors[k].double(), want, atol=1e-6)


def test_lora_a2_buffer_of_both_phases_updates_each_factor():
    cfg, s, rt, ctxs = tiny_setup(["strategy.name=lora-a2", "strategy.rank_budget=2",
                                   "train.mode=async", "fleet.profile=uniform",
                                   "train.concurrency=2", "train.buffer_size=1"], 2)
    assert s.phase_every == 2 and [s.active_factor(t) for t in (1, 2, 3, 4, 5)] == \
        ["B", "B", "A", "A", "B"]
    state = s.init_state(rt.initial_state())
    state.tensors.update({n: torch.randn(t.shape) * 0.1 for n, t in state.tensors.items()})
    replies, trained = [], {}
    for c, rnd, factor in ((0, 1, "B"), (1, 3, "A")):  # a B-phase and an A-phase task
        task = s.configure(rnd, c, state)
        replies.append((task, s.client_update(ctxs[c], task)))
        trained.update(rt.snapshot(s.layout.names(factor)))  # the factor the client trained
    new, info = s.aggregate_buffer(3, state, replies, [2, 0])
    # each factor moves by its one reply's change, weighted by hand: s(τ) n_k / Σ n_j
    n0, n1 = (u.num_examples for _, u in replies)
    w = {"B": (1 / math.sqrt(3)) * n0 / (n0 + n1), "A": 1.0 * n1 / (n0 + n1)}
    for factor in ("B", "A"):
        for n in s.layout.names(factor):
            want = state.tensors[n].double() + w[factor] * (trained[n] - state.tensors[n]).double()
            assert torch.allclose(new.tensors[n].double(), want, atol=1e-6), n
    assert sum(info["rank_allocation"].values()) == sum(int(u.slots.numel())
                                                         for _, u in replies)


# ---------------------------------------------------------------------- the schedule
def test_async_run_buffers_staleness_and_clock(tmp_path, synthetic_csv, monkeypatch):
    from lora_a2.strategies import REGISTRY

    # every round's step is FedBuff's (aggregate_buffer), given the record's staleness and
    # the round's accepted replies, and its result is the state the run goes on with
    steps = []
    real = REGISTRY["fl-lora"].aggregate_buffer

    def spy(self, rnd, state, replies, staleness):
        new, info = real(self, rnd, state, replies, staleness)
        steps.append((rnd, list(staleness), len(replies),
                      {k: v.clone() for k, v in new.tensors.items()}))
        return new, info

    monkeypatch.setattr(REGISTRY["fl-lora"], "aggregate_buffer", spy)
    fleet = write_fleet(tmp_path / "f.csv")
    sets = async_sets(fleet, "strategy.name=fl-lora", "train.rounds=5", "train.server_lr=0.9")
    a = run_cli(tmp_path / "a", *sets, data=synthetic_csv)
    a_steps, steps[:] = list(steps), []
    b = run_cli(tmp_path / "b", *sets, data=synthetic_csv)
    assert lines(a) == lines(b)  # same seed: the same schedule and clock, to the last bit
    clock, arrivals = 0.0, []
    records = lines(a)
    assert [(rnd, tau, n) for rnd, tau, n, _ in a_steps] == [
        (r["round"], r["staleness"], r["num_replies"]) for r in records]
    from lora_a2.checkpoint import load_checkpoint
    rnd, final = load_checkpoint(a)
    assert rnd == 5 and set(final.tensors) == set(a_steps[-1][3])
    assert all(torch.equal(final.tensors[k], v) for k, v in a_steps[-1][3].items())
    for r in records:
        assert r["status"] == "ok" and r["num_replies"] == 2 and len(r["staleness"]) == 2
        used = [row for row in r["per_client"] if row.get("num_examples")]
        assert [row["staleness"] for row in used] == r["staleness"]
        for row in used:
            assert row["staleness"] == r["round"] - 1 - row["version"] >= 0
            # the version a client trained on, found from the clock alone: the aggregations
            # made by the time it started
            assert row["version"] == sum(q["sim_time_s"] <= row["sim_start_s"]
                                         for q in records[:r["round"] - 1])
            assert row["sim_arrival_s"] == pytest.approx(
                row["sim_start_s"] + row["sim_download_s"] + row["sim_compute_s"]
                + row["sim_upload_s"], rel=1e-12)
            arrivals.append(row["sim_arrival_s"])
        assert len(set(r["clients"])) == len(r["clients"])  # a client at most once a round
        clock += r["sim_round_s"]
        assert r["sim_time_s"] == clock and arrivals[-1] == pytest.approx(clock, rel=1e-12)
        assert r["in_flight"] <= 4 and r["stragglers"] == []
    assert arrivals == sorted(arrivals)  # the server takes replies in order of arrival
    assert any(t > 0 for r in lines(a) for t in r["staleness"])


def test_async_availability_and_dropout_are_drawn_per_dispatch(tmp_path, synthetic_csv):
    """In async mode a client's availability and dropout draws are keyed by its dispatch
    number (a client can be dispatched several times in one round's span): every offline row
    is one whose (seed, dispatch, client) draw says offline, every dropout one whose draw says
    it drops, and every other dispatch drew online and staying."""
    from lora_a2.fleet import Fleet, read_fleet_csv
    from lora_a2.rounds import drops_out

    path = tmp_path / "f.csv"
    with open(path, "w") as f:
        f.write("client,flops,down_mbps,up_mbps,availability\n")
        for c, r in enumerate(DEVICES):
            f.write(f"{c},{r[0]},{r[1]},{r[2]},{0.6 if c % 2 else 1.0}\n")
    sets = async_sets(path, "strategy.name=fl-lora", "train.rounds=4", "train.dropout=0.2")
    out = run_cli(tmp_path / "a", *sets, data=synthetic_csv)
    fleet = Fleet(read_fleet_csv(path, 6))
    fleet.flops_per_example = 1.0  # for times(): a download alone does no work
    rows = [row for r in lines(out) for row in r["per_client"]]
    offline = [row for row in rows if row.get("offline")]
    dropped = [row for row in rows if row.get("dropped")]
    assert offline and dropped, "no draw to check: change the seed or the rates"
    assert len({row["dispatch"] for row in rows}) == len(rows)  # each dispatch once
    for row in rows:
        c, d = row["client"], row["dispatch"]
        assert fleet.offline(0, d, c) == bool(row.get("offline")), row
        if not row.get("offline"):
            assert drops_out(0, d, c, 0.2) == bool(row.get("dropped")), row
        else:
            assert "sim_start_s" not in row and "version" not in row, row
        if row.get("dropped"):  # it downloaded its task, then never replied
            assert row["download_bytes"] > 0 and row["sim_start_s"] >= 0, row
            assert isinstance(row["version"], int), row
            assert row["sim_download_s"] == fleet.times(c, row["download_bytes"], 0, 0.0)[0]


def _check_phases(records: list[dict], every: int) -> tuple[int, int]:
    """Every arrived reply is flagged cross-phase exactly when the phase of the round it was
    dispatched for (its model version + 1) differs from the round's, and frozen-target exactly
    when the factor it trained differs (phase ⌈t / every⌉, B in odd phases) — computed here
    from the rows, not from the counters. Returns (cross-phase, frozen-target) counts."""
    def phase(t: int) -> int:
        return (t - 1) // every + 1

    def factor(t: int) -> str:
        return "B" if phase(t) % 2 else "A"

    crossed = frozen = 0
    for r in records:
        rows = [row for row in r["per_client"] if row.get("num_examples")]
        for row in rows:
            sent_for = row["version"] + 1
            assert bool(row.get("cross_phase")) == (phase(sent_for) != r["phase"]), row
            assert bool(row.get("frozen_target")) == (factor(sent_for) != r["active_factor"]), row
        crossed += sum(bool(row.get("cross_phase")) for row in rows)
        frozen += sum(bool(row.get("frozen_target")) for row in rows)
        assert r["cross_phase"] == sum(bool(row.get("cross_phase")) for row in r["per_client"])
        assert r["frozen_target"] == sum(bool(row.get("frozen_target"))
                                         for row in r["per_client"])
    return crossed, frozen


@pytest.mark.parametrize("mode", ["drop", "apply"])
def test_alternating_phases_and_cross_phase_updates(tmp_path, synthetic_csv, mode):
    fleet = write_fleet(tmp_path / "f.csv")
    out = run_cli(tmp_path / mode, *async_sets(fleet, "strategy.name=rolora", "train.rounds=5",
                                                f"train.cross_phase={mode}"),
                  data=synthetic_csv)
    records = lines(out)
    # phase_every = auto = ⌈4 / 2⌉: B, B, A, A, B
    assert [r["active_factor"] for r in records] == ["B", "B", "A", "A", "B"]
    assert [r["phase"] for r in records] == [1, 1, 2, 2, 3]
    _check_phases(records, 2)
    for r in records:
        crossed = [row for row in r["per_client"] if row.get("cross_phase")]
        if mode == "drop":
            assert all(row["discarded"] and "train_loss" not in row for row in crossed)
            assert r["num_replies"] == len([row for row in r["per_client"]
                                            if row.get("num_examples")]) - len(crossed)
        else:  # applied: every accepted reply, cross-phase ones too, is in the aggregate
            assert not any(row.get("discarded") for row in crossed)
            used = [row for row in r["per_client"] if row.get("num_examples")]
            assert r["num_replies"] == len(used) == len(r["staleness"])
    assert sum(r["cross_phase"] for r in records) > 0


def test_a_cross_phase_reply_is_frozen_target_only_when_its_factor_differs(tmp_path,
                                                                           synthetic_csv):
    """With a phase a round, a reply one round stale trained the other factor (frozen target)
    and one two rounds stale the same factor (cross-phase only): the run has both."""
    fleet = write_fleet(tmp_path / "f.csv")
    out = run_cli(tmp_path / "r", *async_sets(fleet, "strategy.name=rolora", "train.rounds=6",
                                               "train.phase_every=1"), data=synthetic_csv)
    records = lines(out)
    assert [r["active_factor"] for r in records] == ["B", "A", "B", "A", "B", "A"]
    crossed, frozen = _check_phases(records, 1)
    assert 0 < frozen < crossed, (crossed, frozen)


def test_kill_and_resume_agree_exactly(tmp_path, synthetic_csv):
    from test_reliability import _kill_after

    from conftest import TINY

    fleet = write_fleet(tmp_path / "f.csv")
    sets = [t for t in TINY if not t.startswith("data.alpha=")] + async_sets(  # iid here
        fleet, "strategy.name=lora-a2", "train.rounds=6", "train.cross_phase=apply")
    ref = run_cli(tmp_path / "ref", data=synthetic_csv, base=sets)
    out = tmp_path / "k"
    args = [sys.executable, "-m", "lora_a2.cli", "run", "--quiet", "--out", str(out),
            "--set", f"data.name=csv:{synthetic_csv}"]
    for s in sets:
        args += ["--set", s]
    _kill_after(args, out, 2, 0.0)
    done = read_metrics(out / "metrics.jsonl") if (out / "metrics.jsonl").exists() else []
    assert 2 <= len(done) < 6, "the kill came too early or too late to test anything"
    assert main(["run", "--quiet", "--resume", str(out)]) == 0  # in-process
    assert json.loads((out / "summary.json").read_text())["resumed_from_round"] >= 1
    assert lines(out) == lines(ref)


# ---------------------------------------------------------------------- refused combinations
@pytest.mark.parametrize("sets,needle", [
    (["train.mode=async"], "set fleet.profile"),
    (["train.mode=async", "fleet.profile=uniform", "train.concurrency=2",
      "train.buffer_size=3"], "'train.concurrency' must be ≥ train.buffer_size"),
    (["train.mode=async", "fleet.profile=uniform", "train.concurrency=0"],
     "'train.concurrency' must be ≥ 1"),
    (["train.mode=async", "fleet.profile=uniform", "train.buffer_size=0"],
     "'train.buffer_size' must be ≥ 1"),
    (["train.mode=async", "fleet.profile=uniform", "train.server_lr=0"],
     "'train.server_lr' must be > 0"),
    (["train.mode=async", "fleet.profile=uniform", "data.num_clients=4"],
     "must be ≤ data.num_clients = 4"),
    (["train.mode=async", "fleet.profile=uniform", "privacy.mechanism=gaussian",
      "privacy.epsilon=8"], "with DP"),
    (["train.mode=async", "fleet.profile=uniform", "train.deadline_s=5"], "stale, not late"),
    (["train.mode=async", "fleet.profile=uniform", "train.over_select=0.3"],
     "'train.over_select' cannot be combined"),
    (["train.mode=async", "fleet.profile=uniform", "engine.name=flower"],
     "runs on the local engine"),
    (["train.mode=async", "fleet.profile=uniform", "strategy.name=fedsa-lora"],
     "'fedsa-lora' does not declare it"),
    (["train.mode=async", "fleet.profile=uniform", "strategy.name=lora-a2",
      "strategy.options.renormalize=true"], "undo the staleness weights"),
    (["train.mode=async", "fleet.profile=uniform", "secagg.enabled=true",
      "engine.name=flower"], "cannot be combined with secagg.enabled"),
    (["train.mode=async", "fleet.profile=uniform", "train.clients_per_round=3"],
     "'train.clients_per_round' has no meaning with train.mode = 'async'"),
    (["train.mode=async", "fleet.profile=uniform", "train.concurrency=4", "train.buffer_size=2",
      "train.min_replies=3"], "'train.min_replies' must be ≤ train.buffer_size (2)"),
    (["train.mode=later"], "'train.mode' must be one of sync, async"),
    (["train.cross_phase=keep"], "'train.cross_phase' must be one of drop, apply"),
    (["train.mode=async", "fleet.profile=uniform", "strategy.name=fl-lora",
      "train.cross_phase=apply"],
     "'train.cross_phase' is for strategies that alternate the LoRA factors (lora-a2, rolora); "
     "'fl-lora' does not, got 'apply'"),
])
def test_bad_async_combinations_are_one_line_errors(capsys, sets, needle):
    assert_config_error(capsys, ["data.num_clients=10", *sets], needle)


def test_the_automatic_phase_length_rounds_up_and_an_explicit_one_wins():
    """An A/B phase lasts ⌈concurrency / buffer_size⌉ aggregations in async mode (5 in flight,
    buffers of 2: 3), 1 in sync mode; train.phase_every > 0 is taken as given."""
    base = ["train.mode=async", "fleet.profile=uniform", "train.concurrency=5",
            "train.buffer_size=2"]
    assert phase_every(load_config(None, base)) == 3
    assert phase_every(load_config(None, [*base, "train.phase_every=4"])) == 4
    assert phase_every(load_config(None, [])) == 1
