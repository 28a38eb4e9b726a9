"""Strategies on the tiny random BERT: masked training, uploads, and each aggregation rule."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lora_a2.client import ParamGroup, train_local
from lora_a2.checks import load_config
from lora_a2.payload import InvalidPayload, decode, encode
from lora_a2.rounds import RoundPlan, plan_client
from lora_a2.selection import selection_from_ids, slot_size
from lora_a2.strategies import REGISTRY, get_strategy
from lora_a2.strategies import Task, Update

from conftest import tiny_setup


def make(strategy: str, head: str = "trained", budget=2, clients: int = 3, extra=()):
    return tiny_setup([f"strategy.name='{strategy}'", f"model.head='{head}'",
                       f"strategy.rank_budget={budget}", *extra], clients, unequal=True)


def wire(s, rt, task: Task, ctx) -> tuple[Update, int]:
    """Send the task and the upload through real encoding, as an engine does."""
    t = Task.from_payload(decode(encode(task.to_payload(rt.layout))), rt.layout)
    blob = encode(s.client_update(ctx, t).to_payload())
    return Update.from_payload(decode(blob)), len(blob)


def test_masked_adamw_keeps_unselected_entries_bit_identical():
    # Prepare: weight decay on (AdamW would otherwise shrink every entry).
    cfg, s, rt, ctxs = make("lora-a2", extra=["strategy.weight_decay=0.5"])
    names = rt.layout.names("B")
    with torch.no_grad():  # non-zero B so weight decay has something to move
        for n in names:
            rt.params[n].normal_()
    before = rt.snapshot(names)
    masks = {n: torch.tensor([[True, False, False, True]]) for n in names}
    gen = torch.Generator().manual_seed(0)
    # Execute
    train_local(rt, ctxs[0].data, ctxs[0].indices, [ParamGroup(names, 1e-2)], 2, 8, 0.5, gen, masks)
    after = rt.snapshot(names)
    # Assert
    for n in names:
        assert torch.equal(after[n][:, [1, 2]], before[n][:, [1, 2]])  # bit-identical
        assert not torch.equal(after[n][:, [0, 3]], before[n][:, [0, 3]])  # did move


def test_lora_a2_round_trip_upload_counts_and_exact_aggregation():
    cfg, s, rt, ctxs = make("lora-a2")
    state = s.init_state(rt.initial_state())
    # Round 1 (B) then round 2 (A): check each.
    for rnd, factor in ((1, "B"), (2, "A")):
        assert s.active_factor(rnd) == factor
        replies, client_products = [], []
        frozen_name = {"B": "A", "A": "B"}[factor]
        for c, ctx in enumerate(ctxs):
            task = s.configure(rnd, c, state)
            upd, nbytes = wire(s, rt, task, ctx)
            # upload_bytes is the encoded length; upload_params the selected slots' sizes.
            assert nbytes == len(encode(upd.to_payload()))
            sel = selection_from_ids(upd.slots, rt.layout.num_modules, rt.layout.rank)
            assert int(sel.sum()) == task.config["budget"] * rt.layout.num_modules
            slot_vals = sum(slot_size(factor, m.d_in, m.d_out) * int(sel[i].sum())
                            for i, m in enumerate(rt.layout.modules))
            assert upd.values.numel() == slot_vals + rt.layout.size(["head"])
            s.validate(task, upd)
            replies.append((task, upd))
            # The client's own factors after local training, read from the model it trained
            # (not decoded from its upload with the code under test).
            trained = rt.snapshot(list(state.tensors))
            client_products.append([
                (trained[f"{m.name}.B"] @ trained[f"{m.name}.A"]).double()
                for m in rt.layout.modules])
        new, info = s.aggregate(rnd, state, replies)
        # the weights from the clients' true sizes (10, 30, 50), not read back from the uploads
        assert [u.num_examples for _, u in replies] == [len(c.indices) for c in ctxs]
        w = [u.num_examples / sum(u.num_examples for _, u in replies) for _, u in replies]
        for i, m in enumerate(rt.layout.modules):
            expected = sum(wk * p[i] for wk, p in zip(w, client_products))
            got = (new.tensors[f"{m.name}.B"] @ new.tensors[f"{m.name}.A"]).double()
            assert torch.allclose(got, expected, atol=1e-6)
            # the frozen factor did not change
            assert torch.equal(new.tensors[f"{m.name}.{frozen_name}"],
                               state.tensors[f"{m.name}.{frozen_name}"])
        assert sum(info["rank_allocation"].values()) == sum(
            t.config["budget"] for t, _ in replies) * rt.layout.num_modules
        state = new
    # After round 1, B is no longer zero: LoRA-A2 trained B first.
    assert any(state.tensors[n].abs().sum() > 0 for n in rt.layout.names("B"))


def test_lora_a2_renormalize_option_averages_each_slot_over_its_selectors():
    """``strategy.options.renormalize = true`` reaches the aggregate: each slot of B moves by
    Σ_{k selected it} w_k Δ_k / Σ_{k selected it} w_k, from the clients' trained models."""
    cfg, s, rt, ctxs = make("lora-a2", budget=1, extra=["strategy.options.renormalize=true"])
    state = s.init_state(rt.initial_state())
    replies, deltas, sels = [], [], []
    for c, ctx in enumerate(ctxs):
        task = s.configure(1, c, state)
        upd, _ = wire(s, rt, task, ctx)
        trained = rt.snapshot(rt.layout.names("B"))
        deltas.append({n: (trained[n] - state.tensors[n]).double() for n in trained})
        sels.append(selection_from_ids(upd.slots, rt.layout.num_modules, rt.layout.rank))
        replies.append((task, upd))
    new, _ = s.aggregate(1, state, replies)
    assert [u.num_examples for _, u in replies] == [len(c.indices) for c in ctxs]
    w = [u.num_examples / sum(u.num_examples for _, u in replies) for _, u in replies]
    partial = 0
    for m, mod in enumerate(rt.layout.modules):
        n = f"{mod.name}.B"
        for j in range(rt.layout.rank):
            chosen = [k for k in range(len(ctxs)) if sels[k][m, j]]
            cover = sum(w[k] for k in chosen)
            partial += 0 < cover < 1 - 1e-9
            want = (sum(w[k] * deltas[k][n][:, j] for k in chosen) / cover if chosen
                    else torch.zeros(mod.d_out, dtype=torch.float64))
            got = (new.tensors[n][:, j] - state.tensors[n][:, j]).double()
            assert torch.allclose(got, want, atol=1e-6), (n, j)
    assert partial > 0  # some slot had fewer than all clients: renormalising changed it


def _tampered(upd: Update, how: str, total: int) -> Update:
    slots, values, meta = upd.slots.clone(), upd.values.clone(), dict(upd.meta)
    if how == "other factor":
        meta["factor"] = "A"
    elif how == "no slots":
        slots = None
    elif how == "id past the end":
        slots[-1] = total  # one past the last slot id
    elif how == "negative id":
        slots[0] = -1
    elif how == "duplicate":
        slots[1] = slots[0]
    elif how == "descending":
        slots = slots.flip(0)
    elif how == "over budget":
        slots = torch.arange(slots.numel() + 1, dtype=slots.dtype)
    elif how == "a value short":
        values = values[:-1]
    elif how == "NaN":
        values[0] = float("nan")
    return Update(upd.client_id, upd.num_examples, values, slots, meta)


@pytest.mark.parametrize("how,needle", [
    ("other factor", "upload is for factor 'A', round trains 'B'"),
    ("no slots", "carries no slot indices"),
    ("id past the end", "slot index out of range"),
    ("negative id", "slot index out of range"),
    ("duplicate", "duplicate slot indices"),
    ("descending", "not in ascending order"),
    ("over budget", "exceed the budget"),
    ("a value short", "values for"),
    ("NaN", "NaN or Inf"),
])
def test_lora_a2_refuses_a_malformed_upload(how, needle):
    """Each check of LoRA-A2's upload validation on a tampered copy of an honest upload (the
    honest one passes): a descending id list has the right value count when the modules are
    equally wide, so only the order check stops its values landing in the wrong slots."""
    cfg, s, rt, ctxs = make("lora-a2", budget=1)
    state = s.init_state(rt.initial_state())
    task = s.configure(1, 0, state)
    upd, _ = wire(s, rt, task, ctxs[0])
    s.validate(task, upd)
    assert upd.slots.numel() >= 2
    with pytest.raises(InvalidPayload, match=needle):
        s.validate(task, _tampered(upd, how, rt.layout.num_modules * rt.layout.rank))


def test_lora_a2_unselected_slots_of_client_upload_zero_delta():
    cfg, s, rt, ctxs = make("lora-a2", budget=1)
    state = s.init_state(rt.initial_state())
    task = s.configure(1, 0, state)
    upd, _ = wire(s, rt, task, ctxs[0])
    trained = rt.snapshot(rt.layout.names("B"))  # the model the client trained (round 1: B)
    sel = selection_from_ids(upd.slots, rt.layout.num_modules, rt.layout.rank)
    # budget 1: as many slots as modules, chosen across all modules by score
    assert int(sel.sum()) == rt.layout.num_modules
    moved = 0
    for m, mod in enumerate(rt.layout.modules):
        before, after = state.tensors[f"{mod.name}.B"], trained[f"{mod.name}.B"]
        assert torch.equal(after[:, ~sel[m]], before[:, ~sel[m]])  # unselected: untouched
        moved += sum(int(not torch.equal(after[:, j], before[:, j]))
                     for j in torch.nonzero(sel[m]).flatten().tolist())
    assert moved == int(sel.sum())  # every selected slot trained
    # and the upload carries exactly the selected columns' change, nothing else
    dense, _, _ = s._split(task, upd)
    for m, (mod, d) in enumerate(zip(rt.layout.modules, dense)):
        assert torch.allclose(d, trained[f"{mod.name}.B"] - state.tensors[f"{mod.name}.B"])


def test_fl_lora_is_separate_weighted_means():
    cfg, s, rt, ctxs = make("fl-lora", budget=2)
    state = s.init_state(rt.initial_state())
    replies, client_states = [], []
    for c, ctx in enumerate(ctxs):
        task = s.configure(1, c, state)
        upd, _ = wire(s, rt, task, ctx)
        s.validate(task, upd)
        replies.append((task, upd))
        client_states.append(rt.snapshot(list(state.tensors)))  # the client's trained factors
    new, _ = s.aggregate(1, state, replies)
    n = [u.num_examples for _, u in replies]
    assert n == [len(c.indices) for c in ctxs] == [10, 30, 50]
    w = [k / sum(n) for k in n]
    for name in rt.layout.group_names(["A", "B", "head"]):
        expected = sum(wk * cs[name].double() for wk, cs in zip(w, client_states))
        assert torch.allclose(new.tensors[name].double(), expected, atol=1e-6)
    assert rt.layout.rank == 2


def test_ffa_lora_never_changes_a_and_sends_it_once():
    cfg, s, rt, ctxs = make("ffa-lora", budget=2)
    state = s.init_state(rt.initial_state())
    a0 = {n: state.tensors[n].clone() for n in rt.layout.names("A")}
    sizes = []
    for rnd in (1, 2):
        replies = []
        for c, ctx in enumerate(ctxs):
            task = s.configure(rnd, c, state)
            sizes.append(("A" in task.config["send"], rnd))
            upd, _ = wire(s, rt, task, ctx)
            s.validate(task, upd)
            replies.append((task, upd))
        state, _ = s.aggregate(rnd, state, replies)
    for n, a in a0.items():
        assert torch.equal(state.tensors[n], a)
    assert all(has_a == (rnd == 1) for has_a, rnd in sizes)


def test_fedavg_full_uploads_every_weight():
    cfg, s, rt, ctxs = make("fedavg-full")
    state = s.init_state(rt.initial_state())
    task = s.configure(1, 0, state)
    upd, _ = wire(s, rt, task, ctxs[0])
    assert upd.values.numel() == sum(p.numel() for p in rt.model.parameters())


@pytest.mark.parametrize("mutate,reason", [
    (lambda u: setattr(u, "slots", torch.cat([u.slots, u.slots[:1]])), "duplicate"),
    (lambda u: setattr(u, "slots", u.slots + 10_000), "out of range"),
    (lambda u: setattr(u, "values", u.values[:-1]), "expected"),
    (lambda u: u.values.__setitem__(0, float("nan")), "NaN"),
    (lambda u: setattr(u, "slots", None), "no slot"),
    (lambda u: u.meta.__setitem__("factor", "A"), "factor"),
])
def test_lora_a2_rejects_bad_uploads(mutate, reason):
    cfg, s, rt, ctxs = make("lora-a2")
    state = s.init_state(rt.initial_state())
    task = s.configure(1, 0, state)
    upd, _ = wire(s, rt, task, ctxs[0])
    mutate(upd)
    with pytest.raises(InvalidPayload, match=reason):
        s.validate(task, upd)


def test_lora_a2_rejects_more_slots_than_budget():
    cfg, s, rt, ctxs = make("lora-a2", budget=1)
    state = s.init_state(rt.initial_state())
    task = s.configure(1, 0, state)
    upd, _ = wire(s, rt, task, ctxs[0])
    upd.slots = torch.arange(rt.layout.num_modules * 2, dtype=torch.int32)
    with pytest.raises(InvalidPayload, match="budget"):
        s.validate(task, upd)


def test_homogeneous_baselines_refuse_per_client_rank_lists():
    from lora_a2.errors import UserError

    with pytest.raises(UserError, match="trains one rank on every client: give a single"):
        load_config(None, ["strategy.name='fl-lora'", "data.num_clients=2",
                           "strategy.rank_budget=[1, 2]"])  # refused when the config is read
    # and by the strategy itself, for a config that escaped the check (a hand-built one)
    cfg = load_config(None, ["strategy.name='fl-lora'", "data.num_clients=2"])
    cfg.strategy.rank_budget = [1, 2]
    with pytest.raises(UserError, match="single integer"):
        get_strategy(cfg).lora_rank()


def test_shortened_probe_runs_the_asked_fraction_of_steps(monkeypatch):
    """strategy.options.probe_fraction: the probe stops after ⌈f · steps per epoch⌉ optimiser steps; the
    masked training still runs its full epochs; the upload stays within the budget."""
    import lora_a2.strategies.context as base

    cfg, s, rt, ctxs = make("lora-a2", budget=1, clients=1,
                            extra=["strategy.options.probe_fraction=0.25", "train.batch_size=8"])
    steps: list[int] = []
    hook = rt.model.register_forward_hook(lambda *_: steps.append(1))
    calls: list[int | None] = []
    orig = base.train_local

    def spy(*a, **k):
        before = len(steps)
        out = orig(*a, **k)
        calls.append(len(steps) - before)
        return out

    monkeypatch.setattr(base, "train_local", spy)
    task = s.configure(1, 0, s.init_state(rt.initial_state()))
    upd, _ = wire(s, rt, task, ctxs[0])
    hook.remove()
    per_epoch = ctxs[0].steps_per_epoch()
    assert per_epoch == 12  # 90 examples, batches of 8
    assert calls == [3, per_epoch]  # ⌈0.25 · 12⌉ probe steps, then one full masked epoch
    assert upd.slots is not None and 0 < upd.slots.numel() <= rt.layout.num_modules


def test_probe_fraction_out_of_range_is_a_one_line_error():
    from lora_a2.errors import UserError

    for bad in ("0", "1.5", "-0.1"):
        with pytest.raises(UserError, match="strategy.options.probe_fraction"):
            load_config(None, [f"strategy.options.probe_fraction={bad}"])


@pytest.mark.parametrize("kind", ["frobenius", "rms"])
def test_slot_score_setting_reaches_the_client_scoring(monkeypatch, kind):
    """strategy.options.slot_score picks the score the client ranks its slots by; the upload stays a
    global top-(r_k · N) either way."""
    import lora_a2.strategies.lora_a2 as mod

    seen: list[str] = []
    orig = mod.slot_scores

    def spy(*a, **k):
        seen.append(k.get("kind", "frobenius"))
        return orig(*a, **k)

    monkeypatch.setattr(mod, "slot_scores", spy)
    cfg, s, rt, ctxs = make("lora-a2", budget=1, clients=1,
                            extra=[f"strategy.options.slot_score='{kind}'"])
    task = s.configure(1, 0, s.init_state(rt.initial_state()))
    upd, _ = wire(s, rt, task, ctxs[0])
    assert seen == [kind]
    assert upd.slots is not None and upd.slots.numel() == rt.layout.num_modules


def test_unknown_slot_score_is_a_one_line_error():
    from lora_a2.errors import UserError

    with pytest.raises(UserError, match="strategy.options.slot_score"):
        load_config(None, ["strategy.options.slot_score='l1'"])


def test_top_k_never_takes_a_zero_or_non_finite_score():
    from lora_a2.selection import select_top_k

    scores = torch.tensor([[0.0, 3.0, float("nan")], [0.0, 1.0, float("inf")]])
    sel = select_top_k(scores, 5, positive_only=True)
    assert sel.tolist() == [[False, True, False], [False, True, False]]
    # the paper's plain top-k fills the budget (NaN first, then zeros by slot order)
    assert int(select_top_k(scores, 5).sum()) == 5


def test_lora_a2_a_round_uploads_only_slots_whose_b_column_is_non_zero():
    """An A-round slot whose B column is zero scores 0 and gets no gradient: the client skips
    it and uploads fewer slots than its budget; validation accepts that."""
    cfg, s, rt, ctxs = make("lora-a2", budget=4, head="frozen")
    lay = rt.layout
    state = s.init_state(rt.initial_state())
    first = lay.names("B")[0]
    for n in lay.names("B"):
        state.tensors[n] = torch.zeros_like(state.tensors[n])
    state.tensors[first][:, :2] = torch.randn(state.tensors[first].shape[0], 2)
    task = s.configure(2, 0, state)
    assert task.config["factor"] == "A"
    upd, nbytes = wire(s, rt, task, ctxs[0])
    s.validate(task, upd)
    assert sorted(upd.slots.tolist()) == [0, 1]  # module 0, slots 0 and 1: the only useful ones
    assert upd.values.numel() == 2 * lay.modules[0].d_in
    new, _ = s.aggregate_round(2, state, [(task, upd)])
    for n in lay.names("A")[1:]:
        assert torch.equal(new.tensors[n], state.tensors[n])


# ---------------------------------------------------------------------- cheaper probes (issue 19)
def _spy_train(ctx, trainers: list | None = None):
    """Record every local-training call of ``ctx`` (epochs, masked or not, max steps) and, in
    ``trainers``, the optimiser it was handed (None: a fresh one)."""
    from lora_a2.strategies import ClientContext

    calls = []
    real = ClientContext.train.__get__(ctx)

    def spy(groups, epochs, gen, masks=None, **kw):
        calls.append((epochs, masks is not None, kw.get("max_steps")))
        if trainers is not None:
            trainers.append(kw.get("trainer"))
        return real(groups, epochs, gen, masks=masks, **kw)

    ctx.train = spy
    return calls


def test_reused_probe_trains_one_epoch_and_uploads_the_probes_progress():
    cfg, s, rt, ctxs = make("lora-a2", budget=1, head="frozen",
                            extra=["strategy.options.probe='reuse'"])
    lay = rt.layout
    state = s.init_state(rt.initial_state())
    task = s.configure(1, 0, state)
    calls = _spy_train(ctxs[0])
    probe_state = {}
    real_select = s.select

    def select(scores, k, t):  # the probe's state, captured when the slots are chosen
        probe_state.update(rt.snapshot(lay.names("B")))
        return real_select(scores, k, t)

    s.select = select
    upd, _ = wire(s, rt, task, ctxs[0])
    assert calls == [(1, False, None)]  # one epoch in all, as FL+LoRA trains at 1 local epoch
    dense, sel, _ = s._split(task, upd)
    for m, n in enumerate(lay.names("B")):
        want = probe_state[n] - state.tensors[n]
        assert torch.allclose(dense[m][:, sel[m]], want[:, sel[m]])
        assert torch.all(dense[m][:, ~sel[m]] == 0)


@pytest.mark.parametrize("optimizer", ["fresh", "kept"])
def test_reused_probe_at_two_epochs_trains_the_selection_once_more(optimizer):
    cfg, s, rt, ctxs = make("lora-a2", budget=1, head="frozen",
                            extra=["strategy.options.probe='reuse'", "train.local_epochs=2",
                                   f"strategy.options.probe_optimizer='{optimizer}'"])
    trainers: list = []
    calls = _spy_train(ctxs[0], trainers)
    upd, _ = wire(s, rt, s.configure(1, 0, s.init_state(rt.initial_state())), ctxs[0])
    assert calls == [(1, False, None), (1, True, None)]
    assert upd.slots.numel() == rt.layout.num_modules
    if optimizer == "kept":  # the training after the probe continues the probe's optimiser
        assert trainers[0] is not None and trainers[1] is trainers[0]
    else:
        assert trainers == [None, None]


def test_a_two_epoch_full_probe_trains_two_epochs_then_the_selection():
    cfg, s, rt, ctxs = make("lora-a2", budget=1, head="frozen",
                            extra=["strategy.options.probe_epochs=2"])
    calls = _spy_train(ctxs[0])
    wire(s, rt, s.configure(1, 0, s.init_state(rt.initial_state())), ctxs[0])
    assert calls == [(2, False, None), (1, True, None)]


def test_gradient_probe_scores_by_the_gradient_and_trains_only_the_selection():
    from lora_a2.client import accumulate_gradients
    from lora_a2.selection import select_top_k, slot_scores

    cfg, s, rt, ctxs = make("lora-a2", budget=1, head="frozen",
                            extra=["strategy.options.probe='gradient'", "strategy.options.probe_batches=2"])
    lay = rt.layout
    state = s.init_state(rt.initial_state())
    task = s.configure(1, 0, state)
    # the expected selection, computed here from gradients at the global state
    rt.load(state.tensors)
    seed = task.config["seed"]
    torch.manual_seed(seed)  # the model's dropout draws, as the client seeds them
    grads = accumulate_gradients(rt, ctxs[0].data, ctxs[0].indices, lay.names("B"),
                                 cfg.train.batch_size, torch.Generator().manual_seed(seed), 2)
    want = select_top_k(slot_scores("B", [grads[n] for n in lay.names("B")],
                                    [state.tensors[n] for n in lay.names("A")]),
                        lay.num_modules, positive_only=True)
    calls = _spy_train(ctxs[0])
    upd, _ = wire(s, rt, task, ctxs[0])
    assert calls == [(1, True, None)]  # no probe training: straight to the masked epoch
    got = selection_from_ids(upd.slots, lay.num_modules, lay.rank)
    assert torch.equal(got, want)


def test_reselect_every_two_reuses_the_last_selection_of_the_same_factor():
    cfg, s, rt, ctxs = make("lora-a2", budget=1, head="frozen",
                            extra=["strategy.options.reselect_every=2"])
    lay = rt.layout
    state = s.init_state(rt.initial_state())
    picked, probes = {}, {}
    for rnd in (1, 2, 3, 4, 5):
        calls = _spy_train(ctxs[0])
        task = s.configure(rnd, 0, state)
        upd, _ = wire(s, rt, task, ctxs[0])
        picked[rnd] = selection_from_ids(upd.slots, lay.num_modules, lay.rank)
        probes[rnd] = any(not masked for _, masked, _ in calls)
        state, _ = s.aggregate_round(rnd, state, [(task, upd)])
    assert probes == {1: True, 2: True, 3: False, 4: False, 5: True}
    assert torch.equal(picked[3], picked[1]) and torch.equal(picked[4], picked[2])
    assert "selection.B" in ctxs[0].store and "selection.A" in ctxs[0].store


@pytest.mark.parametrize("sets,needle", [
    (["strategy.options.probe=cheap"], "strategy.options.probe"),
    (["strategy.options.probe=reuse", "strategy.options.probe_fraction=0.5"], "cannot be combined"),
    (["strategy.options.reselect_every=0"], "strategy.options.reselect_every"),
    (["strategy.options.probe_optimizer=old"], "strategy.options.probe_optimizer"),
])
def test_bad_probe_settings_are_one_line_errors(capsys, sets, needle):
    from lora_a2.cli import main

    assert main(["config", "--set", *sets]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err


@pytest.mark.parametrize("name", sorted(n for n, c in REGISTRY.items() if c.secure_aggregation))
def test_the_secure_form_aggregates_as_the_plain_one(name):
    """Every strategy that declares a secure form (SecAgg+ gives the server only the weighted
    mean Σ n_k v_k / Σ n_k): from that mean alone, ``aggregate_secure`` + ``finalize`` give the
    state ``aggregate`` + ``finalize`` give from the uploads, in a B round and an A round
    (alternating methods), the mean computed here from each client's ``secure_vector``."""
    cfg, s, rt, ctxs = make(name, clients=3)
    state = s.init_state(rt.initial_state())
    for rnd in (1, 2):
        replies = []
        for c, ctx in enumerate(ctxs):
            task = s.configure(rnd, c, state)
            update, _ = wire(s, rt, task, ctx)
            replies.append((task, update))
        plain, info = s.aggregate(rnd, state, replies)
        plain, _ = s.finalize(rnd, plain, info)
        n = torch.tensor([float(u.num_examples) for _, u in replies], dtype=torch.float64)
        vectors = torch.stack([s.secure_vector(t, u).double() for t, u in replies])
        mean = (n[:, None] * vectors).sum(0) / n.sum()
        secure, info = s.aggregate_secure(rnd, state, mean.float())
        secure, _ = s.finalize(rnd, secure, info)
        assert plain.tensors.keys() == secure.tensors.keys()
        for key in plain.tensors:
            torch.testing.assert_close(secure.tensors[key], plain.tensors[key], rtol=1e-5,
                                       atol=1e-6, msg=f"{name}, round {rnd}, {key}")
        state = plain


@pytest.mark.parametrize("name", ["fl-lora", "fedsa-lora"])
def test_a_client_too_small_to_hold_any_out_is_scored_like_the_others(tmp_path, synthetic_csv,
                                                                      name):
    """data.local_test_fraction > 0 with clients too small to hold any example out: each such
    client's local accuracy is the label-weighted one (never missing) for the shared model
    (fl-lora) as for a client's own (fedsa-lora), and the summary says which clients were
    measured how."""
    import json

    from conftest import run_cli

    out = run_cli(tmp_path / name, "train.rounds=1", "data.local_test_fraction=0.02",
                  f"strategy.name={name}", data=synthetic_csv)
    sizes = [c["num_examples"] for c in json.loads((out / "partition.json").read_text())[
        "clients"]]
    held = sum(round(0.02 * n) > 0 for n in sizes)
    assert 0 < held < len(sizes), sizes  # the run has both kinds of client
    line = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert None not in line["local_accuracy"] and line["local_accuracy_held_out"] == held
    summary = json.loads((out / "summary.json").read_text())
    assert summary["local_accuracy_split"].startswith(f"held-out for {held} of {len(sizes)}")


def test_an_unreachable_client_is_not_configured_so_ffa_lora_still_sends_it_a():
    """FFA-LoRA sends A once, on a client's first task, and records that in its state when it
    builds the task. A client the transport cannot reach is never sent one, so it is not
    configured at all: its first task that arrives (round 2 here) still carries A."""
    cfg, s, rt, _ = make("ffa-lora")
    exp = SimpleNamespace(cfg=cfg, strategy=s, runtime=rt, fleet=None)
    state = s.init_state(rt.initial_state())
    a_names = set(rt.layout.names("A"))
    for rnd, down in ((1, "no node"), (2, None)):
        transport = SimpleNamespace(reachable=lambda c, why=down: why if c == 0 else None)
        plan = RoundPlan(rnd=rnd, t0=0.0, clients=[0, 1])
        tasks = {c: plan_client(exp, plan, c, state, transport) for c in (0, 1)}
        if rnd == 1:
            assert tasks[0] is None and plan.per_client[0]["download_bytes"] == 0
            assert plan.failures == ["client 0: no node"]
            assert a_names <= set(tasks[1].download)  # client 1's first task: A
        else:
            assert a_names <= set(tasks[0].download)  # client 0's first task: A
            assert not a_names & set(tasks[1].download)  # client 1 holds it already
