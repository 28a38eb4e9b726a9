"""LoRA-A2's steps that the round-trip tests cannot tell apart from a plausible slip: the
factors' start and scaling, the learning rate each factor's optimiser gets, the score's input
(the probe's *change*), the reset of every slot after a full probe, and the data-size weights
of the aggregate, head included. Each expected value is computed here, from the config and
the algorithm's definition (docs/ALGORITHM.md), not from the code under test."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import lora_a2.client as client_module
import lora_a2.strategies.lora_a2 as lora_a2_module

from conftest import tiny_setup


def make(*extra: str, clients: int = 3):
    return tiny_setup(["strategy.name='lora-a2'", "model.head='trained'",
                       "strategy.rank_budget=2", *extra], clients)


def after_round_one(s, rt, ctxs):
    """The global state after a real round 1 (B trained): B ≠ 0, so round 2 is not trivial."""
    state = s.init_state(rt.initial_state())
    replies = [(t, s.client_update(ctx, t))
               for t, ctx in ((s.configure(1, c, state), ctx) for c, ctx in enumerate(ctxs))]
    state, _ = s.aggregate(1, state, replies)
    assert any(state.tensors[n].abs().sum() > 0 for n in rt.layout.names("B"))
    return state


def test_b_starts_at_zero_a_gaussian_and_the_scaling_is_alpha_over_the_global_rank():
    """B = 0, A ~ N(0, 1/(3 d_in)) entry-wise (pooled over modules: mean 0, unit variance once
    scaled, and tails beyond what a uniform of that variance reaches), and every LoRA layer
    multiplies by α / r_G."""
    cfg, s, rt, _ = make()
    pooled = []
    for m in rt.layout.modules:
        assert torch.count_nonzero(rt.params[f"{m.name}.B"]) == 0
        a = rt.params[f"{m.name}.A"].detach()
        assert a.shape == (cfg.strategy.global_rank, m.d_in)
        pooled.append(a.flatten() * math.sqrt(3.0 * m.d_in))
    z = torch.cat(pooled)
    assert z.numel() > 1000  # (1,792 on the tiny model: the std is known to ±0.02)
    assert abs(float(z.mean())) < 0.1 and abs(float(z.std()) - 1.0) < 0.1
    # Gaussian, not PEFT's default (Kaiming-uniform, the same variance but bounded by √3)
    assert float(z.abs().max()) > 2.5
    want = cfg.model.lora_alpha / cfg.strategy.global_rank
    for layer in rt._lora_layers:
        assert layer.scaling["default"] == pytest.approx(want)


@pytest.mark.parametrize("head_lr", [0.0, 3e-3])
def test_each_factor_trains_at_its_own_learning_rate(monkeypatch, head_lr):
    """The optimiser of a B-round trains B at 5 × strategy.lr (the paper's ratio) and of an
    A-round A at strategy.lr; the head at strategy.head_lr, or lr_B when that is 0. Checked on
    the AdamW the client actually builds (probe and training alike)."""
    cfg, s, rt, ctxs = make(f"strategy.head_lr={head_lr}")
    built = []
    real = torch.optim.AdamW

    def recording(groups, **kw):
        built.append([(set(map(id, g["params"])), g["lr"]) for g in groups])
        return real(groups, **kw)

    monkeypatch.setattr(client_module.torch.optim, "AdamW", recording)
    lr = cfg.strategy.lr
    ids = {n: id(p) for n, p in rt.params.items()}
    state = s.init_state(rt.initial_state())
    for rnd, factor, factor_lr in ((1, "B", 5 * lr), (2, "A", lr)):
        built.clear()
        s.client_update(ctxs[0], s.configure(rnd, 0, state))
        assert len(built) == 2  # the full probe's optimiser, then the masked training's
        for groups in built:
            lrs = {}
            for params, group_lr in groups:
                for n, i in ids.items():
                    if i in params:
                        lrs[n] = group_lr
            assert set(lrs) == set(rt.layout.names(factor)) | set(rt.layout.names("head"))
            for n in rt.layout.names(factor):
                assert lrs[n] == pytest.approx(factor_lr)
            for n in rt.layout.names("head"):
                assert lrs[n] == pytest.approx(head_lr or 5 * lr)


def test_the_score_is_computed_on_the_probes_change_and_every_slot_is_reset_after_it(
        monkeypatch):
    """Round 2 (A-round, A ≠ 0): the scores' input is probe − global for every module
    (docs/ALGORITHM.md: ΔA from the probe), not the probed values; then the masked training
    starts from the global state in every slot of the factor and the head (the probe's
    progress is dropped, selected slots too), with masks and a fresh optimiser."""
    cfg, s, rt, ctxs = make()
    state = after_round_one(s, rt, ctxs)
    task = s.configure(2, 1, state)
    active = rt.layout.names("A")
    head = rt.layout.names("head")
    glob = {n: task.download[n].clone() for n in active + head}
    ctx = ctxs[1]
    seen = {"scored": None, "probe": None, "start": None, "calls": []}
    real_scores = lora_a2_module.slot_scores

    def scores(factor, deltas, frozen, kind):
        seen["scored"] = [d.clone() for d in deltas]
        return real_scores(factor, deltas, frozen, kind=kind)

    real_train = ctx.train

    def train(groups, epochs, gen, masks=None, **kw):
        seen["calls"].append((masks is not None, kw.get("trainer")))
        if len(seen["calls"]) == 2:
            seen["start"] = ctx.runtime.snapshot(active + head)
        loss = real_train(groups, epochs, gen, masks=masks, **kw)
        if len(seen["calls"]) == 1:
            seen["probe"] = ctx.runtime.snapshot(active)
        return loss

    monkeypatch.setattr(lora_a2_module, "slot_scores", scores)
    ctx.train = train
    s.client_update(ctx, task)
    assert seen["calls"] == [(False, None), (True, None)]
    for n, d in zip(active, seen["scored"]):
        assert torch.equal(d, seen["probe"][n] - glob[n])
        assert not torch.equal(d, seen["probe"][n])  # A ≠ 0: the two readings differ
    for n in active + head:
        assert torch.equal(seen["start"][n], glob[n]), n
    assert any(not torch.equal(seen["probe"][n], glob[n]) for n in active)  # the probe moved


def test_the_aggregate_weights_each_client_by_its_examples_head_included():
    """Three clients with 10, 30 and 60 examples: the new global state is the old one plus
    Σ_k (n_k / Σ n) Δ_k in every B entry and every head entry, where Δ_k is what client k
    trained (read from its model, not from the aggregate: a doubled server step would pass a
    comparison with the aggregate of each upload alone); not the plain mean."""
    cfg, s, rt, ctxs = make()
    state = s.init_state(rt.initial_state())
    replies, alone = [], []
    names = rt.layout.names("B") + rt.layout.names("head")
    for c, n_k in enumerate((10, 30, 60)):
        task = s.configure(1, c, state)
        upd = s.client_update(ctxs[c], task)
        alone.append(rt.snapshot(names))  # client c's trained B (selected columns) and head
        replies.append((task, dataclasses.replace(upd, num_examples=n_k)))
    new, _ = s.aggregate(1, state, replies)
    assert rt.layout.names("head")
    w = [0.1, 0.3, 0.6]
    for n in names:
        want = state.tensors[n] + sum(wk * (a[n] - state.tensors[n]) for wk, a in zip(w, alone))
        assert torch.allclose(new.tensors[n], want, atol=1e-6), n
    mean = {n: state.tensors[n] + sum(a[n] - state.tensors[n] for a in alone) / 3 for n in names}
    assert any(not torch.allclose(new.tensors[n], mean[n], atol=1e-6) for n in names)
    for n in rt.layout.names("A"):  # the frozen factor is untouched
        assert torch.equal(new.tensors[n], state.tensors[n])
