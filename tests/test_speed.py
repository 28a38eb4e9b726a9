"""`lora-a2 speed`'s arithmetic, each figure against a value computed here: the matrix-product
peak (2·m·k·n per product), the per-step time (a median over ``steps`` steps), the upload's
information minimum (4 bytes a value and a slot id), the overhead ratio (median of per-repeat
ratios), and the bare loop doing the engine's optimiser steps (what the overhead figure
compares). The end-to-end command is tested in tests/test_bench.py."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from lora_a2 import speed
from lora_a2.config import load_config
from lora_a2.experiment import prepare


def test_gemm_peak_counts_two_flops_per_multiply_add(monkeypatch):
    monkeypatch.setattr(speed, "_best_and_median", lambda fn, repeats, budget_s: (1.0, 1.0))
    assert speed.gemm_gflops(torch.float32, shape=(2, 3, 4)) == {"mm": 48e-9, "linear": 48e-9}


def test_a_train_step_is_the_median_over_the_steps_it_ran(monkeypatch):
    exp, data = speed.limit_experiment("tiny-random-bert", 4, 16, "fp32")
    steps = []
    real_step = torch.optim.AdamW.step

    def counted(self, *args, **kwargs):
        steps.append(1)
        return real_step(self, *args, **kwargs)

    def best_and_median(fn, repeats, budget_s, warmup=True):
        steps.clear()
        fn()
        assert len(steps) == 4  # one timed call runs every step
        return 1.0, 1.0

    monkeypatch.setattr(torch.optim.AdamW, "step", counted)
    monkeypatch.setattr(speed, "_best_and_median", best_and_median)
    assert speed.time_train_steps(exp, data, steps=4, repeats=1, budget_s=1e9) == 0.25


def test_the_information_minimum_is_four_bytes_a_value_and_a_slot_id(monkeypatch):
    monkeypatch.setattr(speed, "run_round", lambda exp, rnd, state: (state, {
        "upload_params": 100, "upload_slot_ids": 10, "upload_bytes": 460}))
    assert speed.measure_bytes("tiny-random-bert") == {
        "upload_bytes": 460, "information_minimum": 440, "ratio": 460 / 440}


def test_the_overhead_ratio_is_the_median_of_per_repeat_ratios(monkeypatch):
    bare, engine = iter([1.0, 1.0, 4.0]), iter([9.0, 3.0, 1.5, 2.0])  # engine: warm-up first
    monkeypatch.setattr(speed, "bare_round", lambda exp, state: next(bare))
    monkeypatch.setattr(speed, "engine_round", lambda exp, state: next(engine))
    r = speed.measure_overhead("tiny-random-bert", repeats=3)
    # per-repeat ratios 3, 1.5, 0.5 → 1.5; the ratio of the medians would be 2 / 1
    assert (r["bare_s"], r["engine_s"], r["ratio"]) == (1.0, 2.0, 1.5)


def test_the_bare_loop_takes_the_engines_optimiser_steps(monkeypatch):
    """The overhead figure compares the engine's fl-lora round with a plain loop: the same
    optimiser steps, at the same learning rates and weight decay, on the same clients."""
    exp = prepare(load_config(None, speed.BASE + ["model.name=tiny-random-bert",
                                                  "strategy.name=fl-lora",
                                                  "strategy.lr_ratio=3"]))  # A's lr ≠ B's
    state = exp.strategy.init_state(exp.runtime.initial_state())
    seen: list[tuple] = []
    real_step = torch.optim.AdamW.step

    def recorded(self, *args, **kwargs):
        seen.append(tuple((len(g["params"]), g["lr"], g["weight_decay"])
                          for g in self.param_groups))
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recorded)
    speed.bare_round(exp, state)
    bare, seen[:] = list(seen), []
    speed.engine_round(exp, state)
    assert bare and sorted(bare) == sorted(seen)


def test_the_reselect_variant_is_timed_on_a_round_that_reuses_its_selection(monkeypatch):
    """`reselect_every=2 (a round that reuses)` must time a round whose every client reuses
    its stored selection (no probe), not round 1, which probes."""
    from lora_a2.strategies.lora_a2 import LoraA2

    monkeypatch.setattr(speed, "PROBE_VARIANTS", {
        "reselect_every=2 (a round that reuses)": ["strategy.reselect_every=2"]})
    reused: list[tuple[int, bool]] = []
    stored = LoraA2.stored_selection

    def spy(self, ctx, task):
        out = stored(self, ctx, task)
        reused.append((task.round, out is not None))
        return out

    timed: list[list[tuple[int, bool]]] = []
    engine_round = speed.engine_round

    def recorded(exp, state, rnd=1):
        n = len(reused)
        seconds = engine_round(exp, state, rnd)
        if exp.cfg.strategy.options.get("reselect_every", 1) > 1:
            timed.append(reused[n:])
        return seconds

    monkeypatch.setattr(LoraA2, "stored_selection", spy)
    monkeypatch.setattr(speed, "engine_round", recorded)
    speed.measure_a2_vs_fl("tiny-random-bert", repeats=2, local_epochs=1, probe_fraction=1.0)
    assert len(timed) == 3  # the warm-up and two repeats
    assert all(calls and all(rnd == 3 and ok for rnd, ok in calls) for calls in timed), timed


def test_the_peak_memory_is_the_child_s_own_not_its_parent_s():
    """A process started by fork and exec reported its parent's peak in ru_maxrss: every
    memory row of `lora-a2 speed` showed the parent's high-water mark (1390 MB for 10, 100 and
    1,000 clients). peak_rss_mb in a fresh child that allocates nothing stays small while the
    parent has touched 300 MB more."""
    ballast = bytearray(300 * 1024 * 1024)  # touched: bytearray zero-fills its memory
    assert speed.peak_rss_mb() > 300
    out = subprocess.run([sys.executable, "-c",
                          "from lora_a2.speed import peak_rss_mb; print(peak_rss_mb())"],
                         capture_output=True, text=True, check=True).stdout
    del ballast
    assert float(out) < 250, out  # the child's imports (torch) alone, well under the parent
