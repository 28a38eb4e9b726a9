"""Heterogeneous-rank baselines (FlexLoRA, HetLoRA, FLoRA) and rank-budget distributions.

Every identity is checked against an independent computation (numpy SVD, explicit sums over
the clients' own trained factors), on the tiny random BERT through real encode/decode.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lora_a2 import budgets as B
from lora_a2.cli import main
from lora_a2.checks import load_config
from lora_a2.config import RANK_DISTRIBUTIONS
from lora_a2.errors import UserError
from lora_a2.lowrank import (norm_weights, pad_and_average, pad_rank, prune_decision, pruned_rank,
                             stack_lora, truncate_rank, truncated_svd, weighted_product_sum)
from lora_a2.payload import decode, encode
from lora_a2.strategies import get_strategy
from lora_a2.strategies import Task, Update

from conftest import tiny_setup

RANKS = [1, 2, 4]


def make(strategy: str, ranks=RANKS, head: str = "trained", extra=()):
    return tiny_setup([f"strategy.name='{strategy}'", f"model.head='{head}'",
                       f"strategy.rank_budget={list(ranks)}", *extra], len(ranks), unequal=True)


def wire(s, rt, task: Task, ctx):
    """Send the task and the upload through real encoding; return (update, download values)."""
    down = decode(encode(task.to_payload(rt.layout)))
    t = Task.from_payload(down, rt.layout)
    up = Update.from_payload(decode(encode(s.client_update(ctx, t).to_payload())))
    return up, down.num_values


def run_round(s, rt, ctxs, rnd, state):
    """One round; also returns each client's trained A, B (its own rank) read from the model."""
    replies, trained, down_sizes = [], [], []
    for c, ctx in enumerate(ctxs):
        task = s.configure(rnd, c, state)
        upd, n_down = wire(s, rt, task, ctx)
        s.validate(task, upd)
        replies.append((task, upd))
        down_sizes.append(n_down)
        r = upd.meta["rank"]
        snap = rt.snapshot(rt.layout.group_names(["A", "B"]))
        trained.append({m.name: (snap[f"{m.name}.A"][:r].double(), snap[f"{m.name}.B"][:, :r].double(),
                                 snap[f"{m.name}.A"][r:], snap[f"{m.name}.B"][:, r:])
                        for m in rt.layout.modules})
    new, info = s.aggregate(rnd, state, replies)
    assert [u.num_examples for _, u in replies] == [len(c.indices) for c in ctxs]
    weights = [u.num_examples / sum(x.num_examples for _, x in replies) for _, u in replies]
    return new, info, replies, trained, weights, down_sizes


def factor_size(rt, r):
    return r * sum(m.d_in + m.d_out for m in rt.layout.modules)


# ---------------------------------------------------------------------- FlexLoRA: SVD
def test_svd_reproduces_delta_when_rank_covers_it():
    g = torch.Generator().manual_seed(0)
    W = (torch.randn(12, 3, generator=g) @ torch.randn(3, 9, generator=g)).double()
    res = truncated_svd(W, 4)
    assert res.status == "ok"
    assert torch.allclose(res.left @ res.right, W, atol=1e-10)


@pytest.mark.parametrize("rank", [1, 2, 3, 5])
def test_svd_truncation_is_eckart_young(rank):
    W = torch.randn(10, 8, generator=torch.Generator().manual_seed(1)).double()
    sv = np.linalg.svd(W.numpy(), compute_uv=False)  # independent
    res = truncated_svd(W, rank)
    err = W - res.left @ res.right
    assert float(torch.linalg.matrix_norm(err)) == pytest.approx(np.sqrt((sv[rank:] ** 2).sum()),
                                                                 rel=1e-9)
    assert float(torch.linalg.matrix_norm(err, ord=2)) == pytest.approx(sv[rank], rel=1e-9)
    # A has orthonormal rows; all singular values sit in B
    assert torch.allclose(res.right @ res.right.T, torch.eye(rank, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(res.left.norm(dim=0), torch.as_tensor(sv[:rank]), rtol=1e-9)


def test_svd_zero_nan_huge_and_ill_conditioned_are_finite():
    assert truncated_svd(torch.zeros(6, 5), 3).status == "zero"
    nan = torch.ones(6, 5)
    nan[0, 0] = float("nan")
    res = truncated_svd(nan, 3)
    assert res.status == "nonfinite" and torch.isfinite(res.left).all() and not res.left.any()
    g = torch.Generator().manual_seed(2)
    u, _ = torch.linalg.qr(torch.randn(20, 6, generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(15, 6, generator=g, dtype=torch.float64))
    s = torch.tensor([1.0, 1e-8, 1e-16, 1e-40, 1e-200, 0.0], dtype=torch.float64)
    for W in ((u * s) @ v.T, ((u * s) @ v.T * 1e37).float()):  # ill-conditioned; near overflow
        res = truncated_svd(W, 4)
        assert torch.isfinite(res.left).all() and torch.isfinite(res.right).all()
        top = float(W.double().abs().max())
        assert torch.allclose((res.left @ res.right).double(), W.double(), atol=1e-6 * top)


@pytest.mark.parametrize("break_scipy", [False, True])
def test_svd_fallbacks_when_lapack_fails(monkeypatch, break_scipy):
    W = torch.randn(9, 7, generator=torch.Generator().manual_seed(3)).double()
    sv = np.linalg.svd(W.numpy(), compute_uv=False)

    def fail(*a, **k):
        raise torch.linalg.LinAlgError("did not converge")

    monkeypatch.setattr(torch.linalg, "svd", fail)
    if break_scipy:
        import scipy.linalg

        monkeypatch.setattr(scipy.linalg, "svd", fail)
    res = truncated_svd(W, 3)
    assert res.status == "fallback"
    err = float(torch.linalg.matrix_norm(W - res.left @ res.right))
    assert err == pytest.approx(np.sqrt((sv[3:] ** 2).sum()), rel=1e-6)


def test_flexlora_round_aggregates_scaled_products_and_sends_best_rank_r():
    cfg, s, rt, ctxs = make("flexlora")
    assert rt.layout.rank == 4
    state = s.init_state(rt.initial_state())
    new, info, replies, trained, p, down = run_round(s, rt, ctxs, 1, state)
    alpha = cfg.model.lora_alpha
    head = rt.layout.size(["head"])
    assert info["svd_fallbacks"] == 0
    for c, r in enumerate(RANKS):
        # round 1: only the client's r slots (+ head) travel; the rest stayed exactly zero
        assert down[c] == factor_size(rt, r) + head
        assert replies[c][1].values.numel() == factor_size(rt, r) + head
        for m in rt.layout.modules:
            assert not trained[c][m.name][2].any() and not trained[c][m.name][3].any()
    for m in rt.layout.modules:
        expected = sum(p[k] * alpha / r * trained[k][m.name][1] @ trained[k][m.name][0]
                       for k, r in enumerate(RANKS))
        assert torch.allclose(new.tensors[f"merged.{m.name}"].double(), expected, atol=1e-6)
    # round 2 download: s_r · B A is the best rank-r approximation of W_g
    for c, r in enumerate(RANKS):
        task = Task.from_payload(decode(encode(s.configure(2, c, new).to_payload(rt.layout))),
                                 rt.layout)
        for m in rt.layout.modules:
            W = new.tensors[f"merged.{m.name}"].double()
            approx = alpha / r * task.download[f"{m.name}.B"].double() @ task.download[
                f"{m.name}.A"].double()
            sv = np.linalg.svd(W.numpy(), compute_uv=False)
            err = float(torch.linalg.matrix_norm(W - approx))
            assert err == pytest.approx(np.sqrt((sv[r:] ** 2).sum()), rel=1e-3, abs=1e-6)
    # evaluation sees base + W_g: loading the state sets the base-weight delta
    rt.load(new.tensors)
    m = rt.layout.modules[0]
    assert torch.allclose(rt.weight_deltas()[m.name], new.tensors[f"merged.{m.name}"], atol=1e-6)


# ---------------------------------------------------------------------- HetLoRA
def test_hetlora_equal_ranks_equal_norms_is_plain_mean():
    g = torch.Generator().manual_seed(4)
    As, Bs = [], []
    for _ in range(3):
        a, b = torch.randn(2, 6, generator=g), torch.randn(5, 2, generator=g)
        b = b / float(torch.linalg.matrix_norm(b @ a))  # ‖B A‖_F = 1 for every client
        As.append(a)
        Bs.append(b)
    norms = [float(torch.linalg.matrix_norm(b @ a)) for a, b in zip(As, Bs)]
    w = norm_weights(norms, fallback=[0.5, 0.3, 0.2])
    assert w == pytest.approx([1 / 3] * 3)
    assert torch.allclose(pad_and_average(As, w, 2, axis=0), torch.stack(As).mean(0), atol=1e-6)
    assert torch.allclose(pad_and_average(Bs, w, 2, axis=1), torch.stack(Bs).mean(0), atol=1e-6)
    assert norm_weights([0.0, 0.0], fallback=[0.25, 0.75]) == [0.25, 0.75]


def test_pad_truncate_round_trip_and_rank_r_download():
    t = torch.randn(3, 7)
    assert torch.equal(truncate_rank(pad_rank(t, 8, 0), 3, 0), t)
    assert torch.equal(pad_rank(t, 8, 0)[3:], torch.zeros(5, 7))
    tb = torch.randn(7, 2)
    assert torch.equal(truncate_rank(pad_rank(tb, 4, 1), 2, 1), tb)
    # through the wire: a rank-r task carries r slots and arrives zero-padded
    cfg, s, rt, ctxs = make("hetlora")
    state = s.init_state(rt.initial_state())
    task = s.configure(1, 1, state)  # rank 2 of r_max 4
    payload = task.to_payload(rt.layout)
    assert payload.num_values == factor_size(rt, 2) + rt.layout.size(["head"])
    got = Task.from_payload(decode(encode(payload)), rt.layout)
    for n in rt.layout.names("A"):
        assert torch.equal(got.download[n][:2], state.tensors[n][:2])
        assert not got.download[n][2:].any()


def test_pruning_rule():
    assert pruned_rank(16, 0.99) == 15 and pruned_rank(8, 0.5) == 4 and pruned_rank(1, 0.99) == 1
    assert pruned_rank(4, 1.0) == 4
    assert prune_decision(8, 0.5, tail_norm=0.1, previous_tail=None) == 8  # no history
    assert prune_decision(8, 0.5, tail_norm=0.1, previous_tail=0.2) == 4  # fell → prune
    assert prune_decision(8, 0.5, tail_norm=0.3, previous_tail=0.2) == 8  # grew → keep
    assert prune_decision(8, 0.5, tail_norm=0.2, previous_tail=0.2) == 8  # equal → keep
    assert prune_decision(1, 0.5, tail_norm=0.0, previous_tail=1.0) == 1  # nothing to drop


def test_hetlora_rounds_norm_weighted_padding_and_self_pruning():
    cfg, s, rt, ctxs = make("hetlora", ranks=[4, 2, 4], extra=["strategy.options.prune_gamma=0.5"])
    state = s.init_state(rt.initial_state())
    new, info, replies, trained, p, _ = run_round(s, rt, ctxs, 1, state)
    assert info["pruned"] == 0  # first participation: no history, no prune
    for m in rt.layout.modules:
        fac = [trained[k][m.name] for k in range(3)]
        S = [float(torch.linalg.matrix_norm(f[1] @ f[0])) for f in fac]
        w = [x / sum(S) for x in S]
        exp_a = sum(wk * torch.cat([f[0], torch.zeros(4 - f[0].shape[0], f[0].shape[1],
                                                       dtype=torch.float64)]) for wk, f in zip(w, fac))
        exp_b = sum(wk * torch.cat([f[1], torch.zeros(f[1].shape[0], 4 - f[1].shape[1],
                                                      dtype=torch.float64)], 1) for wk, f in zip(w, fac))
        assert torch.allclose(new.tensors[f"{m.name}.A"].double(), exp_a, atol=1e-6)
        assert torch.allclose(new.tensors[f"{m.name}.B"].double(), exp_b, atol=1e-6)
    # the tail a client reports is Σ_m ‖B[:, t:r] A[t:r]‖_F of the factors it trained
    # (t = the pruned rank), recomputed here from the model it left behind
    def tails(trained, replies):
        out = []
        for (task, _), fac in zip(replies, trained):
            r = task.config["rank"]
            t = pruned_rank(r, 0.5)
            out.append(sum(float(torch.linalg.matrix_norm(
                torch.cat([f[1], f[3].double()], 1)[:, t:r]
                @ torch.cat([f[0], f[2].double()])[t:r])) for f in fac.values()))
        return out

    for (_, upd), want in zip(replies, tails(trained, replies)):
        assert upd.meta["tail"] == pytest.approx(want, rel=1e-5) and want > 0
    # round 2: a client prunes exactly when its tail norm fell since round 1
    tails1 = dict(new.extra["tails"])
    new2, info2, replies2, trained2, *_ = run_round(s, rt, ctxs, 2, new)
    fell_any = False
    for (task, upd), c, want in zip(replies2, range(3), tails(trained2, replies2)):
        assert upd.meta["tail"] == pytest.approx(want, rel=1e-5)
        r = task.config["rank"]
        fell = upd.meta["tail"] < tails1[str(c)]
        fell_any |= fell
        assert upd.meta["rank"] == (pruned_rank(r, 0.5) if fell else r)
        assert new2.extra["ranks"].get(str(c), r) == upd.meta["rank"] == info2["client_ranks"][str(c)]
        assert s.configure(3, c, new2).config["rank"] == upd.meta["rank"]
    assert fell_any and info2["pruned"] > 0  # the pruning branch ran


def test_hetlora_client_weights_are_one_weight_per_client_for_every_module():
    cfg, s, rt, ctxs = make("hetlora", ranks=[4, 2, 4], extra=["strategy.options.hetlora_weights='client'"])
    new, _, _, trained, _, _ = run_round(s, rt, ctxs, 1, s.init_state(rt.initial_state()))
    S = [sum(float(torch.linalg.matrix_norm(b @ a)) for a, b, *_ in trained[k].values())
         for k in range(3)]
    w = [x / sum(S) for x in S]
    assert len(set(round(x, 9) for x in w)) == 3  # the weights differ, so the check can fail
    for m in rt.layout.modules:
        fac = [trained[k][m.name] for k in range(3)]
        exp_a = sum(wk * F.pad(f[0], (0, 0, 0, 4 - f[0].shape[0])) for wk, f in zip(w, fac))
        exp_b = sum(wk * F.pad(f[1], (0, 4 - f[1].shape[1])) for wk, f in zip(w, fac))
        assert torch.allclose(new.tensors[f"{m.name}.A"].double(), exp_a, atol=1e-6)
        assert torch.allclose(new.tensors[f"{m.name}.B"].double(), exp_b, atol=1e-6)


def test_hetlora_weights_must_be_module_or_client():
    with pytest.raises(UserError, match="strategy.options.hetlora_weights"):
        make("hetlora", extra=["strategy.options.hetlora_weights='layer'"])


# ---------------------------------------------------------------------- FLoRA
def test_stacking_equals_weighted_sum_of_products():
    g = torch.Generator().manual_seed(5)
    ranks, w = [1, 3, 2], [0.2, 0.5, 0.3]
    As = [torch.randn(r, 6, generator=g, dtype=torch.float64) for r in ranks]
    Bs = [torch.randn(4, r, generator=g, dtype=torch.float64) for r in ranks]
    Bst, Ast = stack_lora(Bs, As, w)
    assert Bst.shape == (4, 6) and Ast.shape == (6, 6)  # rank Σ r_k = 6
    expected = sum(wk * b @ a for wk, a, b in zip(w, As, Bs))
    assert torch.allclose(Bst @ Ast, expected, atol=1e-12)
    assert torch.allclose(weighted_product_sum(Bs, As, w), expected, atol=1e-12)


def test_flora_merges_into_base_and_clients_restart():
    cfg, s, rt, ctxs = make("flora")
    state = s.init_state(rt.initial_state())
    inner = rt.model.base_model.model
    w0 = {m.name: inner.get_submodule(m.name).get_base_layer().weight.detach().clone()
          for m in rt.layout.modules}
    new, info, replies, trained, p, down = run_round(s, rt, ctxs, 1, state)
    head = rt.layout.size(["head"])
    assert down == [head] * 3  # round 1: nothing merged yet, fresh LoRA drawn locally
    assert info["stacked_rank"] == sum(RANKS)
    rt.load(new.tensors)  # what evaluation does
    for m in rt.layout.modules:
        expected = 2.0 * sum(p[k] * trained[k][m.name][1] @ trained[k][m.name][0] for k in range(3))
        assert torch.allclose(new.tensors[f"merged.{m.name}"].double(), expected, atol=1e-6)
        weight = inner.get_submodule(m.name).get_base_layer().weight
        assert torch.allclose(weight.double(), w0[m.name].double() + expected, atol=1e-6)
        assert not new.tensors[f"{m.name}.B"].any()  # the global adapter adds nothing
    # round 2: the merged delta travels (counted), clients start from a fresh B = 0 adapter
    task = s.configure(2, 0, new)
    dense = sum(m.d_in * m.d_out for m in rt.layout.modules)
    assert task.to_payload(rt.layout).num_values == dense + head
    # when the client trains: the base holds the merged delta, and B starts at zero
    seen: dict = {}
    train = ctxs[0].train

    def spy(*args, **kwargs):
        seen.update({n: d.clone() for n, d in rt.weight_deltas().items()})
        seen.update(rt.snapshot(rt.layout.names("B")))
        return train(*args, **kwargs)

    ctxs[0].train = spy
    rt.set_weight_delta(None)
    wire(s, rt, task, ctxs[0])
    for m in rt.layout.modules:
        assert torch.allclose(seen[m.name], new.tensors[f"merged.{m.name}"], atol=1e-6)
        assert not seen[f"{m.name}.B"].any()
    # reversible: no delta → W0 bit-identical
    rt.set_weight_delta(None)
    for m in rt.layout.modules:
        assert torch.equal(inner.get_submodule(m.name).get_base_layer().weight, w0[m.name])


# ---------------------------------------------------------------------- budgets
def test_budget_distributions_reproducible_and_shaped():
    assert B.draw("heavy-tail", 40, 16, seed=3) == B.draw("heavy-tail", 40, 16, seed=3)
    assert B.draw("heavy-tail", 40, 16, seed=3) != B.draw("heavy-tail", 40, 16, seed=4)
    assert B.counts("heavy-tail", 31, 16) == {1: 16, 2: 8, 4: 4, 8: 2, 16: 1}
    assert B.counts("normal", 16, 16) == {1: 1, 2: 4, 4: 6, 8: 4, 16: 1}
    assert B.counts("uniform", 10, 16) == {r: 2 for r in (1, 2, 4, 8, 16)}
    for k in (7, 10, 30):
        heavy = B.counts("heavy-tail", k, 16)
        assert sum(heavy.values()) == k
        assert list(heavy.values()) == sorted(heavy.values(), reverse=True)
        normal = B.counts("normal", k, 16)
        assert max(normal, key=normal.get) == 4
    drawn = B.draw("normal", 30, 8, seed=0)
    assert set(drawn) <= {1, 2, 4, 8} and len(drawn) == 30  # capped at r_G
    cfg = load_config(None, ["strategy.rank_budget=heavy-tail", "data.num_clients=12",
                             "strategy.global_rank=16", "seed=5"])
    assert get_strategy(cfg).budgets == B.draw("heavy-tail", 12, 16, seed=5)
    assert get_strategy(load_config(None, ["strategy.rank_budget=3"])).budgets == [3] * 10
    assert B.DISTRIBUTIONS == RANK_DISTRIBUTIONS


@pytest.mark.parametrize("sets,needle", [
    (["strategy.rank_budget=pareto"], "uniform, heavy-tail, normal"),
    (["strategy.rank_budget=[1, 2, 4]"], "one budget per client (10)"),
    (["strategy.rank_budget=16"], "strategy.global_rank = 8"),
    (["data.num_clients=2", "strategy.rank_budget=[2, 16]"], "[1, 8]"),
    (["strategy.options.prune_gamma=0"], "'strategy.options.prune_gamma'"),
])
def test_bad_budget_configs_are_one_line_errors_exit_2(sets, needle, capsys):
    with pytest.raises(UserError) as e:
        load_config(None, sets)
    assert needle in str(e.value) and "\n" not in str(e.value)
    args = ["run"]
    for s in sets:
        args += ["--set", s]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle in err


# ---------------------------------------------------------------------- end to end
@pytest.mark.parametrize("strategy", ["flexlora", "hetlora", "flora"])
def test_hetero_strategies_run_end_to_end(tmp_path, synthetic_csv, strategy):
    out = tmp_path / strategy
    sets = ["model.name=tiny-random-bert", "data.num_clients=4", "train.rounds=2",
            "model.head=trained", "strategy.global_rank=4", "strategy.rank_budget=[1, 2, 4, 2]",
            "model.max_length=24", f"strategy.name={strategy}", f"data.name=csv:{synthetic_csv}"]
    args = ["run", "--quiet", "--out", str(out)]
    for x in sets:
        args += ["--set", x]
    assert main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["strategy"] == strategy and summary["rank_budgets"] == [1, 2, 4, 2]
    assert summary["lora_rank"] == 4 and summary["total_upload_bytes"] > 0
    assert summary["rejected_updates"] == 0
    part = json.loads((out / "partition.json").read_text())
    assert [c["rank_budget"] for c in part["clients"]] == [1, 2, 4, 2]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # a rank-1 client uploads less than a rank-4 client
    per = {c["client"]: c["upload_params"] for c in records[0]["per_client"]}
    assert per[0] < per[1] < per[2]
    if strategy in ("flexlora", "flora"):
        assert (out / "adapter" / "merged_delta.safetensors").is_file()


def test_each_client_trains_at_its_methods_scaling_and_the_adapter_gets_its_own_back(
        monkeypatch):
    """FlexLoRA trains a rank-r_k client at α / r_k, FLoRA at 2, HetLoRA at the adapter's
    α / r_max; every layer, read while the client trains, and restored after its update."""
    from lora_a2.strategies import ClientContext

    seen: list[set[float]] = []
    train = ClientContext.train

    def recorded(self, *args, **kwargs):
        seen.append({float(layer.scaling["default"]) for layer in self.runtime._lora_layers})
        return train(self, *args, **kwargs)

    monkeypatch.setattr(ClientContext, "train", recorded)
    for name, want in (("flexlora", lambda r: 16.0 / r), ("flora", lambda r: 2.0),
                       ("hetlora", lambda r: 16.0 / 4)):
        cfg, s, rt, ctxs = make(name, ranks=(1, 2, 4))
        assert cfg.model.lora_alpha == 16.0 and cfg.strategy.global_rank == 4
        state = s.init_state(rt.initial_state())
        seen.clear()
        for c, ctx in enumerate(ctxs):
            s.client_update(ctx, s.configure(1, c, state))
            assert {float(layer.scaling["default"]) for layer in rt._lora_layers} == \
                {rt.default_scaling} == {16.0 / 4}, name  # restored
        assert seen == [{want(r)} for r in (1, 2, 4)], (name, seen)


def test_hetlora_adds_its_self_pruning_term_to_the_local_loss(monkeypatch):
    """The regulariser reaching local training is λ Σ_m ‖B_m[:, t:r] A_m[t:r]‖_F with
    t = ⌊γ r⌋ (computed here from the factors); none when λ = 0 or nothing can be pruned
    (rank 1)."""
    from lora_a2.strategies import ClientContext

    regs: list = []
    train = ClientContext.train

    def recorded(self, *args, regularizer=None, **kwargs):
        loss = train(self, *args, regularizer=regularizer, **kwargs)
        # read after training, on the trained factors (B = 0 at the start would hide λ)
        regs.append((regularizer, regularizer() if regularizer is not None else None,
                     {n: p.detach().clone() for n, p in self.runtime.params.items()}))
        return loss

    monkeypatch.setattr(ClientContext, "train", recorded)
    for lam in (0.5, 0.0):
        cfg, s, rt, ctxs = make("hetlora", ranks=(1, 4, 4),
                                extra=[f"strategy.options.prune_lambda={lam}",
                                       "strategy.options.prune_gamma=0.5"])
        state = s.init_state(rt.initial_state())
        regs.clear()
        for c, ctx in enumerate(ctxs):
            s.client_update(ctx, s.configure(1, c, state))
        assert regs[0][0] is None  # rank 1: nothing to prune
        for reg, value, params in regs[1:]:
            if lam == 0:
                assert reg is None
                continue
            want = lam * sum(
                torch.linalg.matrix_norm(params[b][:, 2:4] @ params[a][2:4])
                for a, b in zip(rt.layout.names("A"), rt.layout.names("B")))
            assert float(want) > 1e-4  # the tail has grown: the check can tell λ apart
            assert float(value) == pytest.approx(float(want), rel=1e-4)


def test_hetlora_a_round_capped_by_a_lower_budget_does_not_lower_the_clients_own_rank():
    """strategy.rank_budget = "auto" can cap one round's rank below the client's own; only its
    own pruning lowers that rank for good (round 1 has no earlier tail: nobody prunes)."""
    cfg, s, rt, ctxs = make("hetlora", ranks=[4, 4, 4])
    s.budgets[0] = 1  # one slow round for client 0
    new, info, replies, *_ = run_round(s, rt, ctxs, 1, s.init_state(rt.initial_state()))
    assert replies[0][0].config["rank"] == 1 and info["pruned"] == 0
    s.budgets[0] = 4
    assert s.configure(2, 0, new).config["rank"] == 4
    assert [s.configure(2, c, new).config["rank"] for c in (1, 2)] == [4, 4]
