"""RoLoRA, FedEx-LoRA, FedSVD and FedSA-LoRA on the tiny random BERT: each aggregation rule
against an identity computed here from the clients' own trained factors, and what travels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lora_a2.cli import main
from lora_a2.strategies import ClientContext, Task

from conftest import run_cli, stop_before_round, tiny_setup
from test_strategies import wire


def make(strategy: str, budget: int = 2, head: str = "trained", extra=()):
    """Three clients holding 10, 30 and 50 examples (unequal data weights 1/9, 3/9, 5/9)."""
    cfg, s, rt, ctxs = tiny_setup([f"strategy.name='{strategy}'", f"model.head='{head}'",
                                   f"strategy.rank_budget={budget}", *extra], 3)
    bounds = [(0, 10), (10, 40), (40, 90)]
    ctxs = [ClientContext(rt, c.data, np.arange(a, b), cfg) for c, (a, b) in zip(ctxs, bounds)]
    return cfg, s, rt, ctxs


def run_round(s, rt, ctxs, state, rnd):
    """One round through real encoding: (replies, each client's parameters after training)."""
    replies, trained = [], []
    for c, ctx in enumerate(ctxs):
        task = s.configure(rnd, c, state)
        upd, _ = wire(s, rt, task, ctx)
        s.validate(task, upd)
        replies.append((task, upd))
        trained.append(rt.snapshot(rt.layout.group_names(["A", "B", "head"])))
    return replies, trained


def weights(replies):
    """The data weights 1/9, 3/9, 5/9 of :func:`make`'s clients, checked against what the
    uploads claim (read back from them alone, a client counting 1 example would pass)."""
    n = [u.num_examples for _, u in replies]
    assert n == [10, 30, 50][:len(n)]
    return [k / sum(n) for k in n]


def mean_of(trained, w, name):
    return sum(wk * t[name].double() for wk, t in zip(w, trained))


# ---------------------------------------------------------------------- RoLoRA
def test_rolora_alternates_b_then_a_and_averages_the_trained_factor_exactly():
    cfg, s, rt, ctxs = make("rolora")
    lay = rt.layout
    state = s.init_state(rt.initial_state())
    for rnd, active, frozen in ((1, "B", "A"), (2, "A", "B"), (3, "B", "A")):
        replies, trained = run_round(s, rt, ctxs, state, rnd)
        w = weights(replies)
        for task, upd in replies:  # both factors down, only the active one (+ head) up
            assert set(task.config["send"]) == {"A", "B", "head"}
            assert upd.values.numel() == lay.size([active, "head"])
        for t in trained:  # the frozen factor never moved on a client
            for n in lay.names(frozen):
                assert torch.equal(t[n], state.tensors[n])
        new, _ = s.aggregate_round(rnd, state, replies)
        for n in lay.names(active) + lay.names("head"):
            assert torch.allclose(new.tensors[n].double(), mean_of(trained, w, n), atol=1e-6)
        for n in lay.names(frozen):
            assert torch.equal(new.tensors[n], state.tensors[n])
        # exact: the new global product is the weighted mean of the clients' products
        for m in lay.modules:
            a, b = f"{m.name}.A", f"{m.name}.B"
            mean_prod = sum(wk * (t[b].double() @ t[a].double()) for wk, t in zip(w, trained))
            got = new.tensors[b].double() @ new.tensors[a].double()
            assert torch.allclose(got, mean_prod, atol=1e-6)
        state = new
        assert s.active_factor(rnd) == active


# ---------------------------------------------------------------------- FedEx-LoRA
def test_fedex_lora_folds_the_exact_residual_into_the_base():
    cfg, s, rt, ctxs = make("fedex-lora")
    lay = rt.layout
    scale = cfg.model.lora_alpha / 2
    state = s.init_state(rt.initial_state())
    implied = {m.name: torch.zeros(m.d_out, m.d_in, dtype=torch.float64) for m in lay.modules}
    for rnd in (1, 2):
        replies, trained = run_round(s, rt, ctxs, state, rnd)
        w = weights(replies)
        new, info = s.aggregate_round(rnd, state, replies)
        assert info["residual_norm"] > 0
        for m in lay.modules:
            a, b = f"{m.name}.A", f"{m.name}.B"
            # the global model is base + merged + s·B̄Ā; it must equal the previous global
            # delta plus s·Σ w_k B_k A_k of this round's clients (their ΔW on the same base)
            prev = state.tensors[f"merged.{m.name}"].double() + scale * (
                state.tensors[b].double() @ state.tensors[a].double())
            client_avg = sum(wk * scale * (t[b].double() @ t[a].double())
                             for wk, t in zip(w, trained))
            implied[m.name] = prev - scale * (state.tensors[b].double() @ state.tensors[a].double()
                                              ) + client_avg
            got = new.tensors[f"merged.{m.name}"].double() + scale * (
                new.tensors[b].double() @ new.tensors[a].double())
            assert torch.allclose(got, implied[m.name], atol=1e-5)
            # the factors are the plain means (FedIT); the residual is what that loses
            assert torch.allclose(new.tensors[a].double(), mean_of(trained, w, a), atol=1e-6)
            assert torch.allclose(new.tensors[b].double(), mean_of(trained, w, b), atol=1e-6)
        state = new
    # round 2's download carries the dense residual of every module; round 1's does not
    t1, t2 = s.configure(1, 0, s.init_state(rt.initial_state())), s.configure(2, 0, state)
    dense = sum(m.d_out * m.d_in for m in lay.modules)
    n1, n2 = t1.to_payload(lay).num_values, t2.to_payload(lay).num_values
    assert n2 - n1 == dense and "merged" in t2.config["send"]


def test_fedex_lora_clients_train_on_the_merged_base():
    cfg, s, rt, ctxs = make("fedex-lora")
    state = s.init_state(rt.initial_state())
    replies, _ = run_round(s, rt, ctxs, state, 1)
    state, _ = s.aggregate_round(1, state, replies)
    task = Task.from_payload(s.configure(2, 0, state).to_payload(rt.layout), rt.layout)
    rt.set_weight_delta(None)
    # what the base holds when the client trains: its own update, from the task it got
    seen: dict = {}
    train = ctxs[0].train

    def spy(*args, **kwargs):
        seen.update({n: d.clone() for n, d in rt.weight_deltas().items()})
        return train(*args, **kwargs)

    ctxs[0].train = spy
    s.client_update(ctxs[0], task)
    assert seen, "the residual must reach the base before training"
    for m in rt.layout.modules:
        assert torch.allclose(seen[m.name], state.tensors[f"merged.{m.name}"], atol=1e-6)


def test_fedex_lora_refuses_central_dp_with_its_reason(capsys):
    assert main(["config", "--set", "strategy.name=fedex-lora", "privacy.mechanism=gaussian",
                 "privacy.epsilon=1", "privacy.mode=central"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "product of uploads" in err


# ---------------------------------------------------------------------- FedSVD
def test_fedsvd_trains_b_only_and_reorthonormalises_a_without_changing_the_product():
    cfg, s, rt, ctxs = make("fedsvd")
    lay = rt.layout
    state = s.init_state(rt.initial_state())
    for rnd in (1, 2):
        replies, trained = run_round(s, rt, ctxs, state, rnd)
        w = weights(replies)
        for task, upd in replies:
            assert set(task.config["send"]) == {"A", "B", "head"}
            assert upd.values.numel() == lay.size(["B", "head"])
        new, _ = s.aggregate_round(rnd, state, replies)
        for m in lay.modules:
            a, b = f"{m.name}.A", f"{m.name}.B"
            for t in trained:
                assert torch.equal(t[a], state.tensors[a])  # A frozen on the client
            b_mean = mean_of(trained, w, b)
            want = b_mean @ state.tensors[a].double()  # FedAvg of B on the shared A
            assert torch.allclose(new.tensors[b].double() @ new.tensors[a].double(), want,
                                  atol=1e-5)
            eye = torch.eye(lay.rank, dtype=torch.float64)
            assert torch.allclose(new.tensors[a].double() @ new.tensors[a].double().T, eye,
                                  atol=1e-5)
            # Σ on B: its columns are orthogonal with norms = the singular values, descending
            gram = new.tensors[b].double().T @ new.tensors[b].double()
            assert torch.allclose(gram, torch.diag(torch.diagonal(gram)), atol=1e-5)
            sv = torch.linalg.svdvals(want)[:lay.rank]
            assert torch.allclose(torch.diagonal(gram).sqrt(), sv, atol=1e-5)
        state = new


@pytest.mark.parametrize("name", ["rolora", "fedex-lora", "fedsvd"])
def test_new_uniform_rank_methods_refuse_a_rank_list(name):
    from lora_a2.config import load_config
    from lora_a2.errors import UserError
    from lora_a2.strategies import get_strategy

    cfg = load_config(None, [f"strategy.name='{name}'", "data.num_clients=2",
                             "strategy.rank_budget=[1, 2]"])
    with pytest.raises(UserError, match="single integer"):
        get_strategy(cfg).lora_rank()


# ---------------------------------------------------------------------- FedSA-LoRA
def test_fedsa_lora_shares_a_keeps_each_clients_b_and_evaluates_it():
    from lora_a2.tasks.classification import evaluate

    cfg, s, rt, ctxs = make("fedsa-lora", head="frozen")
    lay = rt.layout
    state = s.init_state(rt.initial_state())
    stores = [{} for _ in ctxs]
    own_b = [None] * len(ctxs)
    for rnd in (1, 2):
        replies, trained = [], []
        for c, ctx in enumerate(ctxs):
            ctx.store = stores[c]
            task = s.configure(rnd, c, state)
            assert task.config["send"] == ["A"]  # B never travels down ...
            if rnd == 2:  # ... the client starts from the B it trained in round 1
                rt.load({n: torch.full_like(t, 7.0) for n, t in rt.snapshot(
                    lay.names("B")).items()})  # poison the shared model: must be overwritten
            started = {}
            real_train = ClientContext.train.__get__(ctx)

            def spy(*a, _started=started, _train=real_train, **k):
                _started.update(rt.snapshot(lay.names("B")))
                return _train(*a, **k)

            ctx.train = spy
            upd, _ = wire(s, rt, task, ctx)
            for n in lay.names("B"):  # round 1 from B = 0, round 2 from its own round-1 B
                want = torch.zeros_like(started[n]) if rnd == 1 else own_b[c][n]
                assert torch.equal(started[n], want)
            assert upd.values.numel() == lay.size(["A"])  # ... nor up
            s.validate(task, upd)
            replies.append((task, upd))
            trained.append(rt.snapshot(lay.group_names(["A", "B"])))
            for n in lay.names("B"):
                assert torch.equal(stores[c][n], trained[-1][n])
            own_b[c] = {n: trained[-1][n].clone() for n in lay.names("B")}
        w = weights(replies)
        new, _ = s.aggregate_round(rnd, state, replies)
        for n in lay.names("A"):
            assert torch.allclose(new.tensors[n].double(), mean_of(trained, w, n), atol=1e-6)
        for n in lay.names("B"):  # the server's B is never touched
            assert torch.equal(new.tensors[n], state.tensors[n])
        state = new
    # each client's evaluation is the global A with its own B, computed here independently
    test = ctxs[0].data
    for c, ctx in enumerate(ctxs):
        ctx.test_data, ctx.local_test = test, np.zeros(0, dtype=np.int64)
        task = Task.from_payload(s.eval_task(2, c, state).to_payload(lay), lay)
        got = s.client_evaluate(ctx, task)
        rt.load({n: state.tensors[n] for n in lay.names("A")})
        rt.load(own_b[c])
        want = evaluate(rt, test, 64)
        assert got["accuracy"] == pytest.approx(want["accuracy"])
        assert got["loss"] == pytest.approx(want["loss"])


def test_label_weighted_local_accuracy_is_the_clients_label_mix():
    from lora_a2.tasks.classification import label_weighted_accuracy

    per_class = [1.0, 0.5, 0.0, float("nan")]  # class 3 absent from the test set
    assert label_weighted_accuracy(per_class, np.array([0, 0, 0, 1])) == pytest.approx(0.875)
    assert label_weighted_accuracy(per_class, np.array([2, 3, 3])) == pytest.approx(0.0)
    assert label_weighted_accuracy(per_class, np.array([3])) is None


def test_fedsa_lora_resume_restores_every_clients_own_b(tmp_path, synthetic_csv):
    """The clients' B live in the checkpoint: an interrupted personalised run resumes to the
    same metrics and adapter as one that ran straight through."""
    from lora_a2.config import load_config
    from lora_a2.report import read_metrics
    from lora_a2.runner import run_experiment

    cfg = load_config(None, [f"data.name='csv:{synthetic_csv}'", "model.name='tiny-random-bert'",
                             "model.max_length=24", "strategy.global_rank=4",
                             "strategy.rank_budget=2", "data.num_clients=3", "train.rounds=3",
                             "strategy.name='fedsa-lora'", "data.partition='dirichlet'",
                             "data.alpha=0.5"])
    run_experiment(cfg, tmp_path / "ref", progress=False)

    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, tmp_path / "cut", progress=False, round_fn=stop_before_round(3))
    run_experiment(cfg, tmp_path / "cut", progress=False, resume=True)
    strip = lambda rs: [{k: v for k, v in r.items() if not k.endswith("wall_s")} for r in rs]
    assert strip(read_metrics(tmp_path / "cut" / "metrics.jsonl")) == \
        strip(read_metrics(tmp_path / "ref" / "metrics.jsonl"))


@pytest.mark.parametrize("sets,kept", [
    (["strategy.name='fedsa-lora'"], "own B and classifier head"),
    (["strategy.name='lora-a2'", "strategy.options.reselect_every=2"], "last slot selection"),
    (["strategy.name='lora-a2'"], None),
    (["strategy.name='fl-lora'"], None),
])
def test_a_run_whose_clients_keep_state_is_not_resumed_on_flower(tmp_path, synthetic_csv,
                                                                 monkeypatch, sets, kept):
    """On Flower a client's ``ctx.store`` lives in its node's Context, which a resumed (new)
    Flower run starts without: such a run is refused ``--resume`` there, in one line and with
    the folder untouched; a strategy that keeps nothing resumes. (The round function is the
    local one: what is checked is the runner's refusal, not Flower.)"""
    from lora_a2.config import load_config
    from lora_a2.engines.local import run_round
    from lora_a2.errors import UserError
    from lora_a2.runner import run_experiment

    cfg = load_config(None, [f"data.name='csv:{synthetic_csv}'", "model.name='tiny-random-bert'",
                             "model.max_length=24", "strategy.global_rank=4",
                             "strategy.rank_budget=2", "data.num_clients=2", "train.rounds=2",
                             "engine.name='flower'", *sets])

    out = tmp_path / "cut"
    with pytest.raises(KeyboardInterrupt):
        run_experiment(cfg, out, progress=False, round_fn=stop_before_round(2))
    before = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    if kept is None:
        run_experiment(cfg, out, progress=False, resume=True, round_fn=run_round)
        assert (out / "summary.json").is_file()
        return
    with pytest.raises(UserError, match="cannot resume .* on Flower") as e:
        run_experiment(cfg, out, progress=False, resume=True, round_fn=run_round)
    assert kept in str(e.value) and "\n" not in str(e.value)
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == before
    # the simulation refuses it before Ray and the SuperNodes start
    flwr_simulation = pytest.importorskip("flwr.simulation")

    from lora_a2.engines.flower import run_simulation

    def no_simulation(**kwargs):
        raise AssertionError("the simulation started")

    monkeypatch.setattr(flwr_simulation, "run_simulation", no_simulation)
    with pytest.raises(UserError, match="cannot resume .* on Flower"):
        run_simulation(cfg, out, resume=True)
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == before


def test_fedsa_lora_refuses_the_causal_lm_task(capsys):
    assert main(["config", "--set", "strategy.name=fedsa-lora", "model.name=tiny-random-llama",
                 "data.name=chatterbot", "model.head=frozen"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "supports task classification" in err


def test_fedsa_lora_resends_the_head_to_a_client_that_dropped_out():
    """A client that never replied never got its personal head: the next task carries the
    initial head again, and the client trains from it — not from whatever head the shared
    runtime last held (another client's)."""
    cfg, s, rt, ctxs = make("fedsa-lora", head="trained")
    lay = rt.layout
    state = s.init_state(rt.initial_state())
    initial_head = {n: state.tensors[n].clone() for n in lay.names("head")}
    # round 1: client 0 gets its task but drops out; clients 1 and 2 reply
    assert "head" in s.configure(1, 0, state).config["send"]
    replies = []
    for c in (1, 2):
        task = s.configure(1, c, state)
        upd, _ = wire(s, rt, task, ctxs[c])
        replies.append((task, upd))
    state, _ = s.aggregate_round(1, state, replies)
    assert "head" not in s.configure(2, 1, state).config["send"]  # delivered: it has one
    task = s.configure(2, 0, state)
    assert "head" in task.config["send"]  # never delivered: sent again
    # the runtime now holds client 2's trained head; client 0 must start from the initial one
    assert not all(torch.equal(rt.params[n].detach().cpu(), initial_head[n])
                   for n in lay.names("head"))
    seen = {}
    real_train = ctxs[0].train

    def spy(*args, **kwargs):
        seen.update({n: rt.params[n].detach().cpu().clone() for n in lay.names("head")})
        return real_train(*args, **kwargs)

    ctxs[0].train = spy
    wire(s, rt, task, ctxs[0])
    assert all(torch.equal(seen[n], initial_head[n]) for n in lay.names("head"))
    # a head sent again to a client that already holds one is ignored: its own wins
    own = {n: ctxs[1].store[n].clone() for n in lay.names("head")}
    again = s.make_task(3, 1, state, ["A", "head"])
    ctxs[1].train = lambda *a, **k: (seen.update(
        {n: rt.params[n].detach().cpu().clone() for n in lay.names("head")}), 0.0)[1]
    wire(s, rt, again, ctxs[1])
    assert all(torch.equal(seen[n], own[n]) for n in lay.names("head"))


def test_fedsvd_refuses_a_rank_above_a_module_s_smaller_side(tmp_path, synthetic_csv, capsys):
    """A' has r orthonormal rows of length d_in: with r above a module's smaller side it does
    not exist (the SVD's shapes stopped matching in the first round's finalize)."""
    run_cli(tmp_path / "r", "strategy.name=fedsvd", "strategy.global_rank=48",
            "strategy.rank_budget=48", data=synthetic_csv, code=2)
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "fedsvd's orthonormal A needs a rank ≤" in err, err
