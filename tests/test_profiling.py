"""``lora-a2 speed --profile``: a run's wall time by phase, from timers installed around the
engine's functions for the run's duration only."""

from __future__ import annotations

import json

import pytest
import torch

from lora_a2.cli import main

from conftest import TINY

#: every row the tiny LoRA-A2 run must fill: a wrapper that is not installed leaves its row
#: missing (or at zero) and fails here
REQUIRED = [
    ("setup", "rest"), ("setup", "data load"), ("setup", "model load"),
    ("setup", "tokenisation"), ("setup", "partition"), ("setup", "LoRA model build"),
    *[(g, part) for g in ("train", "probe")
      for part in ("rest", "forward", "backward", "optimiser step", "optimiser creation",
                   "collation")],
    ("evaluation", "rest"), ("evaluation", "forward"), ("evaluation", "collation"),
    ("evaluation", "state load"),
    ("encode/decode", "rest"), ("client", "rest"), ("client", "state load"),
    ("client", "state snapshot"), ("server", "rest"), ("checkpoint", "rest"),
    ("reporting", "rest"), ("export", "rest"),
]


def test_profile_attributes_the_whole_run_to_its_phases(tmp_path, synthetic_csv, capsys):
    import lora_a2.client
    import lora_a2.rounds

    backward, batch_of = torch.Tensor.backward, lora_a2.client.batch_of
    step = torch.optim.AdamW.__dict__.get("step")  # torch sets its own on first use
    out = tmp_path / "profile.json"
    assert main(["speed", "--profile", "--model", "tiny-random-bert", "--rounds", "2",
                 "--set", *TINY, f"data.name=csv:{synthetic_csv}", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    rows = {(p["group"], p["part"]): p for p in r["phases"]}
    missing = [k for k in REQUIRED if k not in rows or not (rows[k]["seconds"] > 0
                                                            and rows[k]["calls"] > 0)]
    assert not missing, f"phases never timed (a wrapper not installed?): {missing}"
    # exclusive times: the rows and the unwrapped rest add up to the wall time exactly
    other = rows[("other", "unwrapped")]["seconds"]
    assert sum(p["seconds"] for p in r["phases"]) == pytest.approx(r["wall_s"], rel=1e-9)
    assert 0 <= other < 0.1 * r["wall_s"]
    assert sum(g["seconds"] for g in r["groups"].values()) == pytest.approx(r["wall_s"])
    # the probe is told from the training after it: one epoch each on the same clients
    assert rows[("train", "optimiser step")]["calls"] == rows[("probe", "optimiser step")]["calls"]
    assert rows[("train", "backward")]["calls"] == rows[("train", "optimiser step")]["calls"]
    assert rows[("evaluation", "rest")]["calls"] == 3  # round 0, rounds 1 and 2
    compute = sum(p["seconds"] for p in r["phases"]
                  if p["part"] in ("forward", "backward", "optimiser step"))
    assert r["compute_s"] == pytest.approx(compute) and 0 < r["compute_share"] < 1
    assert r["non_compute_s"] == pytest.approx(r["wall_s"] - compute)
    assert r["non_compute_per_round_s"] == pytest.approx(
        (r["wall_s"] - compute - r["groups"]["setup"]["seconds"]) / 2)
    assert r["rounds"] == 2 and r["strategy"] == "lora-a2" and r["model"] == "tiny-random-bert"
    printed = capsys.readouterr().out
    assert "probe" in printed and "optimiser creation" in printed and "unwrapped" in printed
    assert "model compute" in printed
    # every wrapper is gone afterwards
    assert torch.Tensor.backward is backward and lora_a2.client.batch_of is batch_of
    assert lora_a2.rounds.batch_of is batch_of
    assert torch.optim.AdamW.__dict__.get("step") is step


def test_profile_refuses_a_target_it_cannot_wrap_and_bad_arguments(capsys):
    import lora_a2.runner
    from lora_a2.profiling import WRAPS, PhaseTimer, Wrap, installed

    prepare = lora_a2.runner.prepare
    with pytest.raises(AttributeError, match="no_such_function"):
        with installed(PhaseTimer(), (*WRAPS, Wrap("lora_a2.payload.no_such_function"))):
            pass
    assert lora_a2.runner.prepare is prepare  # what was installed before the error is undone
    assert main(["speed", "--profile", "--rounds", "1"]) == 2
    assert "--rounds must be ≥ 2" in capsys.readouterr().err
    assert main(["speed", "--rounds", "3"]) == 2


def test_a_profiled_run_computes_exactly_what_a_plain_run_does(tmp_path, synthetic_csv):
    """The timers only time: the profiled run's metrics are the plain run's, bit for bit
    (wall times aside)."""
    from lora_a2.profiling import profile_run
    from lora_a2.report import read_metrics

    from conftest import run_cli

    sets = [*TINY, f"data.name=csv:{synthetic_csv}"]
    profile_run(sets, rounds=2, out=tmp_path / "profiled")
    plain = run_cli(tmp_path / "plain", "train.rounds=2", data=synthetic_csv)

    def strip(records):
        return [{k: v for k, v in r.items() if not k.endswith("wall_s")} for r in records]

    assert strip(read_metrics(tmp_path / "profiled" / "metrics.jsonl")) == strip(
        read_metrics(plain / "metrics.jsonl"))


def test_causal_speed_with_no_variant_run_is_one_line_exit_2(monkeypatch, capsys):
    """`lora-a2 speed --causal-lm NAME` whose every variant failed (a model that is not a
    causal LM, a typo) says why in one line and exits 2, instead of a table of failures and 0."""
    import lora_a2.speed as speed

    monkeypatch.setattr(speed, "measure_causal", lambda *a: [
        {"variant": v, "error": "lora_a2.errors.UserError: config key 'model.name' no such model"}
        for v in speed.CAUSAL_VARIANTS])
    assert main(["speed", "--causal-lm", "nosuch"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("lora-a2: error: --causal-lm nosuch: no variant ran (config key "
                   "'model.name' no such model)"), err


def test_phase_time_is_exclusive_and_a_group_does_not_nest_in_itself(monkeypatch):
    """An outer phase 0 → 10 s with a part 2 → 6 s inside: the outer row gets 6 s, the part
    4 s; re-entering the open group adds no row; a part outside any group goes to other."""
    import lora_a2.profiling as profiling

    clock = iter([0.0, 2.0, 3.0, 4.0, 6.0, 10.0, 20.0, 21.5])
    monkeypatch.setattr(profiling.time, "perf_counter", lambda: next(clock))
    t = profiling.PhaseTimer()
    with t.phase("train"):  # 0
        with t.phase(None, "forward"):  # 2
            with t.phase("train"):  # the open group again: no new row, no clock read
                pass
            with t.phase(None, "collation"):  # 3 → 4
                pass
        # forward left at 6
    # train left at 10
    with t.phase(None, "backward"):  # 20 → 21.5, no group open
        pass
    assert dict(t.seconds) == {("train", "rest"): 6.0, ("train", "forward"): 3.0,
                               ("train", "collation"): 1.0, ("other", "backward"): 1.5}
    assert dict(t.calls) == {("train", "rest"): 1, ("train", "forward"): 1,
                             ("train", "collation"): 1, ("other", "backward"): 1}
    assert not t.stack


@pytest.mark.parametrize("sets,ratio", [(["train.local_epochs=2"], 2),
                                        (["strategy.reselect_every=2", "train.rounds=4"], 2)])
def test_the_probe_is_told_from_the_training_after_it(synthetic_csv, sets, ratio):
    """Two local epochs after a one-epoch probe: twice the probe's optimiser steps in train.
    Selections reused (reselect_every = 2, 4 rounds: rounds 3 and 4 reuse rounds 1 and 2's):
    those rounds' training is train, not probe — again twice the probe's steps."""
    from lora_a2.profiling import profile_run

    r = profile_run([*TINY, f"data.name=csv:{synthetic_csv}", *sets], rounds=None)
    rows = {(p["group"], p["part"]): p["calls"] for p in r["phases"]}
    probe = rows[("probe", "optimiser step")]
    assert probe > 0 and rows[("train", "optimiser step")] == ratio * probe


def test_generation_s_forward_passes_are_timed_as_evaluation(tmp_path):
    """A causal LM's loss runs the decoder body and the output projection apart, and its greedy
    answers call the transformers model directly, never PEFT's wrapper: hooks on the wrapper
    timed none of them. Now training's and the probe's passes are forward time, and each
    generated token is a forward pass of the evaluation group."""
    from lora_a2.profiling import profile_run

    rows = [{"instruction": f"Name a thing {i}.", "response": "x", "category": "ab"[i % 2]}
            for i in range(48)]
    (tmp_path / "i.json").write_text(json.dumps(rows))
    base = ["model.name=tiny-random-llama", "model.max_length=48", "strategy.global_rank=4",
            "strategy.rank_budget=2", f"data.name=json:{tmp_path / 'i.json'}",
            "data.num_clients=2", "data.min_examples_per_client=2", "task.samples=0",
            "task.max_new_tokens=5", "engine.threads=1", "train.rounds=1"]
    calls = {}
    for n in (0, 4):
        r = profile_run([*base, f"task.generate_examples={n}"], rounds=None)
        calls[n] = {(p["group"], p["part"]): p["calls"] for p in r["phases"]}
        for group in ("train", "probe"):  # each step: the body's pass and the projection's
            assert calls[n][(group, "forward")] == 2 * calls[n][(group, "optimiser step")] > 0
    # two evaluations (initial, round 1), each one greedy batch of 5 new tokens: ≥ 4 passes
    # (the prompt's, then one per token after the first), unless every answer ends early
    gained = calls[4][("evaluation", "forward")] - calls[0][("evaluation", "forward")]
    assert gained >= 2 * 4, gained
