"""Differential privacy for uploads: clipping, noise, accounting, calibration, config, and
the DP wrapper (lora_a2.private): fixed-denominator central estimator, server re-clip, noise
sources, what a central release publishes."""

from __future__ import annotations

import json
import math
from itertools import permutations
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from lora_a2 import privacy as dp
from lora_a2.cli import main
from lora_a2.config import SCHEMA_VERSION, load_config
from lora_a2.payload import decode, encode
from lora_a2.private import rebuildable_noise_warning, resolve_plan
from lora_a2.report import read_metrics
from lora_a2.selection import private_top_k, select_top_k, selection_from_ids
from lora_a2.strategies import Task, Update

from conftest import TINY, assert_config_error, run_cli, tiny_setup

ALL = ["lora-a2", "fl-lora", "ffa-lora", "flexlora", "hetlora", "flora", "fedavg-full",
       "rolora", "fedsa-lora", "fedex-lora", "fedsvd"]


def make(strategy: str, *extra: str, clients: int = 3):
    """A wrapped strategy on the tiny model; seeded noise (so a test can rebuild a draw)
    unless ``extra`` says otherwise."""
    _, s, rt, ctxs = tiny_setup([f"strategy.name='{strategy}'", "model.head='trained'",
                                 "strategy.rank_budget=2", "privacy.noise_source='seeded'",
                                 *extra], clients, n=60, max_length=16)
    return s, rt, ctxs


def client_side(s, rt, task: Task, ctx) -> tuple[Task, Update]:
    """The decoded task and the raw (pre-DP) upload, as a client computes them."""
    t = Task.from_payload(decode(encode(task.to_payload(rt.layout))), rt.layout)
    return t, s.client_update(ctx, t)


def change(s, task, upd) -> torch.Tensor:
    ref = s.upload_reference(task, upd)
    return upd.values if ref is None else upd.values - ref


# ---------------------------------------------------------------------- pure functions
def test_clip_bounds_l2_and_l1_and_leaves_small_vectors_alone():
    v = torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * 3
    assert dp.norm_of(dp.clip(v, 0.5, "gaussian"), "gaussian") <= 0.5
    assert dp.norm_of(dp.clip(v, 0.5, "laplace"), "laplace") <= 0.5
    small = v * 1e-6
    assert torch.equal(dp.clip(small, 0.5), small)
    # direction is kept
    c = dp.clip(v, 0.5)
    assert torch.allclose(c / c.norm(), v / v.norm(), atol=1e-6)


def test_empirical_noise_scale_matches_configured():
    n = 400_000
    g = dp.gaussian_noise(n, 0.7, torch.Generator().manual_seed(1)).double()
    assert abs(g.mean()) < 0.01 and abs(g.std() / 0.7 - 1) < 0.01
    lap = dp.laplace_noise(n, 0.7, torch.Generator().manual_seed(2)).double()
    # Laplace(b): E|x| = b, std = √2 b
    assert abs(lap.abs().mean() / 0.7 - 1) < 0.01 and abs(lap.std() / (0.7 * 2 ** 0.5) - 1) < 0.01


# ---------------------------------------------------------------------- every strategy
@pytest.mark.parametrize("mechanism", ["gaussian", "laplace"])
@pytest.mark.parametrize("name", ALL)
def test_clip_bound_holds_on_every_upload(name, mechanism):
    """The clip is the mechanism's norm (L2 for Gaussian, L1 for Laplace: an L2 clip would leave
    the L1 norm up to √d·C) and the noise is the mechanism's, of scale z·C."""
    clip = 1e-3  # far below any real update's norm: every upload is clipped
    s, rt, ctxs = make(name, f"privacy.mechanism='{mechanism}'", f"privacy.clip={clip}",
                       "privacy.noise_multiplier=0.5")
    state = s.init_state(rt.initial_state())
    noise = dp.gaussian_noise if mechanism == "gaussian" else dp.laplace_noise
    for c, ctx in enumerate(ctxs):
        task, raw = client_side(s, rt, s.configure(1, c, state), ctx)
        assert dp.norm_of(change(s, task, raw), mechanism) > clip
        clipped = s.client_clip(task, raw)
        assert dp.norm_of(change(s, task, clipped), mechanism) <= clip
        # local mode: the upload is the clipped one plus exactly the seeded noise, nothing else
        sent = Update.from_payload(decode(encode(s.privatize_upload(task, raw).to_payload())))
        expect = noise(raw.values.numel(), 0.5 * clip,
                       dp.noise_generator(s.cfg.seed, 1, c, "seeded"))
        assert torch.allclose(sent.values - clipped.values, expect, atol=1e-6)
        assert "loss" not in sent.meta
        s.validate(task, sent)  # a DP upload is still a valid upload


@pytest.mark.parametrize("name", ["flexlora", "hetlora", "flora"])
def test_hetero_reference_is_what_the_client_started_from(name):
    # With a vanishing learning rate the client changes (almost) nothing: values ≈ reference.
    s, rt, ctxs = make(name, "privacy.mechanism='gaussian'", "privacy.noise_multiplier=1",
                       "strategy.lr=1e-12", "strategy.lr_ratio=1")
    state = s.init_state(rt.initial_state())
    task, raw = client_side(s, rt, s.configure(1, 0, state), ctxs[0])
    assert raw.values.norm() > 1e-2  # the factors themselves are not small
    assert change(s, task, raw).norm() < 1e-6


# ---------------------------------------------------------------------- lora-a2 sparsity
def _round(s, rt, ctxs, rnd, state):
    replies = []
    for c, ctx in enumerate(ctxs):
        task = s.configure(rnd, c, state)
        _, sent = client_side(s, rt, task, ctx)
        sent = s.privatize_upload(task, sent)
        s.validate(task, sent)
        replies.append((task, sent))
    return replies


@pytest.mark.parametrize("mode", ["local", "central"])
def test_lora_a2_local_noise_on_sent_slots_central_noise_on_every_slot(mode):
    s, rt, ctxs = make("lora-a2", "privacy.mechanism='gaussian'", f"privacy.mode='{mode}'",
                       "privacy.noise_multiplier=2", "privacy.clip=0.01", "model.head='frozen'")
    state = s.init_state(rt.initial_state())
    with torch.no_grad():  # non-zero B so every slot of A can be selected in round 2
        for n in rt.layout.names("B"):
            state.tensors[n] = torch.randn_like(state.tensors[n])
    L = rt.layout
    for rnd, factor in ((1, "B"), (2, "A")):
        replies = _round(s, rt, ctxs, rnd, state)
        budget = s.budgets[0] * L.num_modules
        union = torch.zeros(L.num_modules, L.rank, dtype=torch.bool)
        for task, upd in replies:
            # the upload still carries exactly the selected slots' values
            assert upd.slots.numel() == budget
            sel = selection_from_ids(upd.slots, L.num_modules, L.rank)
            union |= sel
        new, _ = s.aggregate_round(rnd, state, replies)
        assert not bool(union.all())  # some slot was selected by nobody
        frozen = "A" if factor == "B" else "B"
        for n in L.names(frozen):
            assert torch.equal(new.tensors[n], state.tensors[n])
        for m, n in enumerate(L.names(factor)):
            diff = new.tensors[n] - state.tensors[n]
            slot_axis = 1 if factor == "B" else 0
            changed = (diff != 0).any(dim=1 - slot_axis)
            if mode == "local":
                assert torch.equal(changed, union[m])  # unselected slots bit-identical
            else:  # central: the release is noised everywhere it could have changed
                assert bool(changed.all())
        state = new


def test_central_noise_on_the_aggregate_has_the_configured_scale():
    z, clip = 3.0, 0.01
    s, rt, ctxs = make("fedavg-full", "privacy.mechanism='gaussian'", "privacy.mode='central'",
                       f"privacy.noise_multiplier={z}", f"privacy.clip={clip}", clients=3)
    state = s.init_state(rt.initial_state())
    replies = _round(s, rt, ctxs, 1, state)
    for t, u in replies:  # central: uploads are clipped, not noised
        assert dp.norm_of(u.values, "gaussian") <= clip
    clean, _ = s.central_aggregate(1, state, replies)
    noisy, _ = s.aggregate_round(1, state, replies)
    names = rt.layout.group_names(["full"])
    noise = torch.cat([(noisy.tensors[n] - clean.tensors[n]).reshape(-1) for n in names]).double()
    # three clients of 20 examples, all sampled: qW = 3, the sensitivity C / 3
    expected = z * clip / 3
    assert s.central_noise_scale() == pytest.approx(expected)
    assert noise.numel() > 30_000
    # exactly the seeded draws of the server's generator for round 1, added (not subtracted),
    # tensor after tensor in the noise groups' order
    gen = dp.noise_generator(s.inner.cfg.seed, 1, "server", "seeded")
    groups = rt.layout.group_names(s.inner.noise_groups(1))
    assert groups == names
    rebuilt = torch.cat([dp.noise(clean.tensors[n].numel(), "gaussian", expected, gen)
                         for n in groups]).double()
    assert torch.allclose(noise, rebuilt, atol=1e-6)
    assert abs(noise.std() / expected - 1) < 0.02
    assert abs(noise.mean()) < 0.05 * expected


def test_central_noise_and_weights_when_half_the_clients_are_sampled_and_sizes_differ():
    """q = 2 of 4 clients per round, examples 5, 10, 20 and 40: the weight cap defaults to the
    largest client (40), W = Σ min(n_k/40, 1) = 1.875, the estimator's weights are
    min(n_k/40, 1)/(qW) and the noise on the release has std z·C/(qW) — not z·C/W (ignoring q
    would under-noise by 1/q) and not capped at the smallest client."""
    z, clip = 2.0, 0.01
    s, rt, ctxs = make("fedavg-full", "privacy.mechanism='gaussian'", "privacy.mode='central'",
                       f"privacy.noise_multiplier={z}", f"privacy.clip={clip}",
                       "train.clients_per_round=2", clients=4)
    sizes = [5, 10, 20, 40]
    s.bind_clients(sizes)
    q, W = 0.5, (5 + 10 + 20 + 40) / 40
    assert s.weight_cap() == 40.0
    expected = z * clip / (q * W)
    assert s.central_noise_scale() == pytest.approx(expected)
    tasks = [s.configure(1, c, s.init_state(rt.initial_state())) for c in (1, 3)]
    replies = [(t, Update(t.client_id, sizes[t.client_id], torch.zeros(3))) for t in tasks]
    assert s.weights(replies) == pytest.approx([(10 / 40) / (q * W), 1.0 / (q * W)])
    state = s.init_state(rt.initial_state())
    noisy = s.add_central_noise(1, state)
    names = rt.layout.group_names(["full"])
    noise = torch.cat([(noisy.tensors[n] - state.tensors[n]).reshape(-1) for n in names]).double()
    assert noise.numel() > 30_000
    assert abs(noise.std() / expected - 1) < 0.02


@pytest.mark.parametrize("name", ["flexlora", "flora"])
@pytest.mark.parametrize("mechanism", ["gaussian", "laplace"])
def test_central_product_clip_bounds_what_the_aggregate_sums(name, mechanism):
    """FlexLoRA / FLoRA merge Σ p_k s_k B_k A_k: in central mode the clip bounds the products
    (and the head delta), and the aggregate's noise lands on the merged delta."""
    clip = 1e-3
    s, rt, ctxs = make(name, f"privacy.mechanism='{mechanism}'", "privacy.mode='central'",
                       f"privacy.clip={clip}", "privacy.noise_multiplier=2.0",
                       "strategy.rank_budget=[1, 2, 2]")
    state = s.init_state(rt.initial_state())
    replies = []
    for c, ctx in enumerate(ctxs):
        task, raw = client_side(s, rt, s.configure(1, c, state), ctx)
        clipped = s.client_clip(task, raw)
        assert torch.equal(clipped.values, s.server_clip(task, raw).values)
        a_list, b_list, head, rank = s.split(task, clipped)
        prods = [s.scaling_for(rank) * (b.double() @ a.double()) for a, b in zip(a_list, b_list)]
        flat = torch.cat([p.reshape(-1) for p in prods] + [h.double().reshape(-1)
                                                           for h in head.values()])
        assert dp.norm_of(flat, mechanism) <= clip * (1 + 1e-5)
        assert torch.equal(clipped.values[:sum(a.numel() for a in a_list)],
                           raw.values[:sum(a.numel() for a in a_list)])  # A untouched
        replies.append((task, s.privatize_upload(task, raw)))
    clean, _ = s.central_aggregate(1, state, replies)
    noisy, _ = s.aggregate_round(1, state, replies)
    merged = rt.layout.names("merged")
    noise = torch.cat([(noisy.tensors[n] - clean.tensors[n]).reshape(-1) for n in merged]).double()
    expected = 2.0 * clip / 3  # z · C / (qW), three equal clients
    spread = noise.std() if mechanism == "gaussian" else noise.abs().mean()  # Laplace: E|x| = b
    assert abs(spread / expected - 1) < 0.05


# ---------------------------------------------------------------------- accounting
@pytest.mark.parametrize("z,steps,delta", [(1.0, 10, 1e-5), (0.8, 100, 1e-6), (2.5, 50, 1e-5)])
def test_accountant_agrees_with_opacus(z, steps, delta):
    direct = RDPAccountant()
    for _ in range(steps):
        direct.step(noise_multiplier=z, sample_rate=1.0)
    alphas = dp.rdp_alphas()
    expect = direct.get_epsilon(delta, alphas=alphas)
    assert dp.gaussian_epsilon(z, steps, delta) == pytest.approx(expect, rel=1e-12)
    # the extended orders only ever tighten Opacus' default bound
    assert expect <= direct.get_epsilon(delta) * (1 + 1e-12)
    # a central plan counts every round at sampling rate 1, whatever its estimator's q (the
    # sample is public: no amplification); a local plan (replace-one, 2C) uses z / 2
    central = dp.PrivacyPlan("gaussian", "central", 1.0, z, delta, 0.1, steps)
    assert central.epsilon(steps) == pytest.approx(expect, rel=1e-12)
    local_direct = RDPAccountant()
    local_direct.history = [(z / 2, 1.0, steps)]
    local = dp.PrivacyPlan("gaussian", "local", 1.0, z, delta, 1.0, steps)
    assert local.epsilon(steps) == pytest.approx(local_direct.get_epsilon(delta, alphas=alphas),
                                                 rel=1e-12)


def test_gaussian_epsilon_is_the_closed_form_rdp():
    """At sampling rate 1 the Gaussian mechanism's RDP is exactly α/(2σ²) per release; ε is its
    T-fold sum converted at δ by the bound Opacus uses (Balle et al. 2020), minimised over the
    orders: computed here without Opacus (guards against a silent accountant change)."""
    for z, steps, delta in ((1.1, 20, 1e-5), (4.0, 200, 1e-6), (0.7, 1, 1e-5)):
        best = min(steps * a / (2 * z * z) + math.log((a - 1) / a)
                   - (math.log(delta) + math.log(a)) / (a - 1) for a in dp.rdp_alphas())
        assert dp.gaussian_epsilon(z, steps, delta) == pytest.approx(best, rel=1e-9)


def test_laplace_composition_known_values():
    # basic composition wins for few rounds, advanced for many
    assert dp.laplace_epsilon(0.1, 5, 1e-5) == pytest.approx(0.5)
    e0, T, d = 0.01, 10_000, 1e-5
    adv = e0 * np.sqrt(2 * T * np.log(1 / d)) + T * e0 * np.expm1(e0)
    assert dp.laplace_epsilon(e0, T, d) == pytest.approx(adv) and adv < T * e0
    # local Laplace: scale z·C, sensitivity 2C → ε₀ = 2 / z per round
    assert dp.PrivacyPlan("laplace", "local", 1.0, 4.0, d, 1.0, 3).epsilon(3) == pytest.approx(1.5)


def cfg_sets(mechanism: str, mode: str, target: float) -> list[str]:
    return ["strategy.name='fl-lora'", "data.num_clients=10", "train.rounds=20",
            f"privacy.mechanism='{mechanism}'", f"privacy.mode='{mode}'",
            f"privacy.epsilon={target}"]


@pytest.mark.parametrize("mechanism,mode,cpr", [("gaussian", "central", 3), ("gaussian", "local", 4),
                                                ("laplace", "local", 3), ("laplace", "central", 5)])
@pytest.mark.parametrize("target", [1.0, 3.0, 6.0])
def test_calibrated_noise_reaches_target_epsilon(mechanism, mode, cpr, target):
    cfg = load_config(None, [*cfg_sets(mechanism, mode, target), f"train.clients_per_round={cpr}"])
    plan = resolve_plan(cfg)
    eps = plan.epsilon(20)
    assert eps <= target * (1 + 1e-9) and eps == pytest.approx(target, abs=0.01)
    assert plan.sample_rate == (1.0 if mode == "local" else cpr / 10)
    # the accountant claims no amplification: with cpr of 10 clients a round, the same ε as
    # with all 10 (who takes part is public: drawn from the released seed, listed per round)
    full = resolve_plan(load_config(None, [*cfg_sets(mechanism, mode, target),
                                           "train.clients_per_round=0"]))
    assert plan.noise_multiplier == pytest.approx(full.noise_multiplier)
    # ε grows with the rounds and the report of the last round is the whole run's
    assert plan.epsilon(1) < plan.epsilon(10) < eps


# ---------------------------------------------------------------------- end to end
def _run(tmp_path, name, data, *sets):
    return run_cli(tmp_path / name, *sets, data=data)


def _strip(records):
    return [{k: v for k, v in r.items() if not k.endswith("wall_s")} for r in records]


def test_dp_runs_are_reproducible_and_report_epsilon(tmp_path, synthetic_csv):
    sets = ["privacy.mechanism=gaussian", "privacy.epsilon=3", "train.clients_per_round=2",
            "privacy.noise_source=seeded"]
    a = _run(tmp_path, "a", synthetic_csv, *sets)
    b = _run(tmp_path, "b", synthetic_csv, *sets)
    ra, rb = read_metrics(a / "metrics.jsonl"), read_metrics(b / "metrics.jsonl")
    assert _strip(ra) == _strip(rb)
    # the noise is really there: the same run without DP ends elsewhere
    plain = read_metrics(_run(tmp_path, "plain", synthetic_csv,
                              "train.clients_per_round=2") / "metrics.jsonl")
    assert [r["loss"] for r in plain] != [r["loss"] for r in ra]
    assert (a / "adapter" / "adapter_model.safetensors").read_bytes() != (
        tmp_path / "plain" / "adapter" / "adapter_model.safetensors").read_bytes()
    eps = [r["epsilon"] for r in ra]
    assert eps == sorted(eps) and eps[-1] == pytest.approx(3.0, abs=0.01)
    assert all(r["delta"] == 1e-5 for r in ra)
    summary = json.loads((a / "summary.json").read_text())
    assert summary["epsilon"] == eps[-1] and summary["privacy"]["mode"] == "local"
    # central Laplace on fl-lora runs too, and differs from no DP
    c = _run(tmp_path, "c", synthetic_csv, "strategy.name=fl-lora", "privacy.mechanism=laplace",
             "privacy.mode=central", "privacy.noise_multiplier=2")
    rc = read_metrics(c / "metrics.jsonl")
    assert [r["epsilon"] for r in rc] == pytest.approx([0.5, 1.0, 1.5])
    cs = json.loads((c / "summary.json").read_text())
    assert cs["privacy"]["noise_source"] == "os" and not cs["privacy"]["caveats"]
    caveats = " ".join(summary["privacy"]["caveats"])
    assert "seeded" in caveats  # run a holds the seed
    assert "selection = 'public'" in caveats and "not covered by ε" in caveats  # its slot ids


@pytest.mark.parametrize("sets,needle", [
    (["privacy.mechanism=gaussian", "privacy.epsilon=0"], "privacy.epsilon"),
    (["privacy.mechanism=laplace", "privacy.epsilon=-1"], "privacy.epsilon"),
    (["privacy.mechanism=gaussian", "privacy.noise_multiplier=1", "privacy.delta=1"], "privacy.delta"),
    (["privacy.mechanism=gaussian", "privacy.noise_multiplier=1", "privacy.delta=0"], "privacy.delta"),
    (["privacy.mechanism=gaussian", "privacy.noise_multiplier=1", "privacy.clip=0"], "privacy.clip"),
    (["privacy.mechanism=gaussian"], "exactly one"),
    (["privacy.mechanism=gaussian", "privacy.epsilon=1", "privacy.noise_multiplier=1"], "exactly one"),
    (["privacy.mechanism=gauss"], "privacy.mechanism"),
    (["privacy.mechanism=gaussian", "privacy.epsilon=1", "privacy.mode=global"], "privacy.mode"),
    (["privacy.mechanism=gaussian", "privacy.epsilon=1", "privacy.mode=central",
      "strategy.name=hetlora"], "not linear in the uploads"),
    (["privacy.mechanism=gaussian", "privacy.epsilon='x'"], "privacy.epsilon"),
    (["privacy.epsilson=1"], "did you mean 'privacy.epsilon'"),
    (["privacy.mechanism=laplace", "privacy.epsilon=inf"], "privacy.epsilon"),
    (["privacy.mechanism=laplace", "privacy.epsilon=nan"], "privacy.epsilon"),
    (["privacy.mechanism=gaussian", "privacy.epsilon=1e300"], "privacy.epsilon"),
    (["privacy.mechanism=gaussian", "privacy.noise_multiplier=inf"], "privacy.noise_multiplier"),
    (["privacy.mechanism=gaussian", "privacy.noise_multiplier=1", "privacy.clip=inf"],
     "privacy.clip"),
])
def test_bad_privacy_config_is_one_line_exit_2(capsys, sets, needle):
    args = ["config"]
    for item in sets:
        args += ["--set", item]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and needle in err


@pytest.mark.parametrize("mechanism,mode,eps", [("gaussian", "local", 1e-9),
                                                 ("gaussian", "central", 1e-40),
                                                 ("laplace", "local", 1e-40),
                                                 ("laplace", "central", 1e-300)])
def test_an_unreachable_epsilon_is_one_line_exit_2_before_the_run_exists(
        tmp_path, synthetic_csv, capsys, mechanism, mode, eps):
    """A target ε too small to calibrate (Opacus refuses it; Laplace's per-round ε₀ underflows
    to 0, an infinite noise scale) is refused before any output is written."""
    out = tmp_path / "o"
    run_cli(out, f"privacy.mechanism={mechanism}", f"privacy.mode={mode}",
            f"privacy.epsilon={eps}", data=synthetic_csv, code=2)
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot be reached" in err, err
    assert not out.exists()


def test_a_large_epsilon_calibrates_without_overflow():
    """ε up to the cap (1000) calibrates for both mechanisms and both modes: Laplace's
    composition must not overflow e^ε."""
    for mechanism in ("gaussian", "laplace"):
        for mode, q in (("local", 1.0), ("central", 0.5)):
            p = SimpleNamespace(mechanism=mechanism, mode=mode, epsilon=1000.0,
                                noise_multiplier=None, delta=1e-5, clip=1.0, selection="public",
                                selection_epsilon=0.1, noise_source="os", weight_cap=0.0)
            plan = dp.resolve(p, 8, q)
            assert 0 < plan.noise_multiplier < 1 and plan.epsilon(8) <= 1000.0 * 1.001
            assert plan.epsilon(8) == pytest.approx(1000.0, rel=0.01)  # not over-noised


@pytest.mark.parametrize("name", ["lora-a2", "fl-lora", "ffa-lora", "rolora", "fedsvd",
                                  "fedsa-lora", "flexlora", "flora"])
def test_central_release_changes_a_data_independent_set_with_the_configured_noise(name):
    """Central mode: which coordinates of the released state change does not depend on the
    clients' data (two different datasets move exactly the same set: every entry of the
    round's noise groups), and a slot no client selected moves by noise of scale z·C/(qW)."""
    z, clip = 2.0, 0.01
    sets = ("privacy.mechanism='gaussian'", "privacy.mode='central'",
            f"privacy.noise_multiplier={z}", f"privacy.clip={clip}", "model.head='frozen'")
    moved = []
    for data_seed in (0, 1):
        s, rt, ctxs = make(name, *sets)
        if data_seed:  # other data (the clients share one encoded set): relabel every example
            ctxs[0].data.labels[:] = (ctxs[0].data.labels + 1) % 3
        state = s.init_state(rt.initial_state())
        replies = _round(s, rt, ctxs, 1, state)
        new, _ = s.aggregate_round(1, state, replies)
        moved.append({n for n in new.tensors
                      if not torch.equal(new.tensors[n], state.tensors[n])})
        full = {n for n in new.tensors if n in moved[-1]
                and bool(((new.tensors[n] - state.tensors[n]) != 0).all())}
        assert full == moved[-1], "a released tensor changed only partly"
        # (FedSVD's re-split of the noised B·A then moves A too: post-processing)
        extra = ["A"] if name == "fedsvd" else []
        assert moved[-1] == set(rt.layout.group_names(s.noise_groups(1) + extra))
        if name == "lora-a2":  # the noise on slots nobody selected has the configured scale
            union = torch.zeros(rt.layout.num_modules, rt.layout.rank, dtype=torch.bool)
            for _, u in replies:
                union |= selection_from_ids(u.slots, rt.layout.num_modules, rt.layout.rank)
            noise = torch.cat([(new.tensors[n] - state.tensors[n])[:, ~union[m]].reshape(-1)
                               for m, n in enumerate(rt.layout.names("B"))]).double()
            expected = z * clip / 3  # z · C / (qW), three equal clients
            assert noise.numel() > 300  # std within 10 %: ≈ 3 standard errors
            assert abs(noise.std() / expected - 1) < 0.1
    assert moved[0] == moved[1]


@pytest.mark.parametrize("name", ["lora-a2", "fl-lora", "ffa-lora", "flexlora", "flora"])
def test_central_noise_lands_on_a_trained_head(name):
    """A trained head is released with the round's noise too: its change is noise of scale
    z·C/(qW) (the clipped data part is at most C/(qW) in norm over the whole state, far below
    the noise's norm over the head)."""
    z, clip = 2.0, 0.01
    s, rt, ctxs = make(name, "privacy.mechanism='gaussian'", "privacy.mode='central'",
                       f"privacy.noise_multiplier={z}", f"privacy.clip={clip}")  # head trained
    state = s.init_state(rt.initial_state())
    new, _ = s.aggregate_round(1, state, _round(s, rt, ctxs, 1, state))
    heads = rt.layout.group_names(["head"])
    change = torch.cat([(new.tensors[n] - state.tensors[n]).reshape(-1) for n in heads])
    assert change.numel() >= 60
    assert abs(change.double().std() / (z * clip / 3) - 1) < 0.35  # three equal clients


# ---------------------------------------------------------------------- private slot selection
def test_private_top_k_keeps_k_slots_and_is_the_top_k_at_huge_epsilon():
    scores = torch.rand(6, 4, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)
    for k in (1, 5, 24):
        assert int(private_top_k(scores, k, 1.0, gen).sum()) == k
    assert torch.equal(private_top_k(scores, 5, 1e9, gen), select_top_k(scores, 5))


def test_private_top_k_probabilities_respect_epsilon():
    """k = 1 is one exponential mechanism with Gumbel scale 2/ε: P[select i | u] =
    softmax(ε u / 2)_i exactly. On the asymmetric neighbours u = [1, 0, 0], u' = [0, 1, 1] the
    frequencies over 40,000 draws match those probabilities (a scale of 1/ε would give
    softmax(ε u): 0.576 against 0.452 for slot 0), and the ratio stays within e^ε."""
    eps, n = 1.0, 40_000
    gen = torch.Generator().manual_seed(2)

    def freq(scores):
        counts = torch.zeros(3, dtype=torch.float64)
        for _ in range(n):
            counts += private_top_k(scores, 1, eps, gen).reshape(-1).double()
        return counts / n

    u, v = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 1.0]])
    p, q = freq(u), freq(v)
    exact_p = torch.softmax(eps * u.double().reshape(-1) / 2, 0)
    exact_q = torch.softmax(eps * v.double().reshape(-1) / 2, 0)
    se = (exact_p * (1 - exact_p) / n).sqrt()
    assert torch.all((p - exact_p).abs() < 5 * se), (p, exact_p)
    assert torch.all((q - exact_q).abs() < 5 * (exact_q * (1 - exact_q) / n).sqrt())
    assert float(exact_p[0] / exact_q[0]) < math.exp(eps)  # the mechanism's own bound
    assert float(p[0] / q[0]) < math.exp(eps)


def test_private_top_2_is_two_peeling_mechanisms_at_half_the_epsilon():
    """k = 2 spends ε/2 on each of two peeling exponential mechanisms: the chance of each pair
    of 3 slots is the sum over both orders of softmax(ε₀ u/2) picks, ε₀ = ε/2, computed here
    independently (with ε₀ = ε, a k-fold privacy loss, slot 0 is left out 0.207 of the time
    instead of 0.267)."""
    eps, n = 1.0, 20_000
    u = torch.tensor([[1.0, 0.0, 0.0]])
    gen = torch.Generator().manual_seed(3)
    counts = torch.zeros(3, dtype=torch.float64)
    for _ in range(n):
        counts += private_top_k(u, 2, eps, gen).reshape(-1).double()
    w = [math.exp(eps / 2 * x / 2) for x in (1.0, 0.0, 0.0)]
    exact = torch.zeros(3, dtype=torch.float64)  # P[slot i kept]
    for i, j in permutations(range(3), 2):
        p_ij = w[i] / sum(w) * w[j] / (sum(w) - w[i])
        exact[i] += p_ij
        exact[j] += p_ij
    assert float(exact.sum()) == pytest.approx(2.0)
    se = (exact * (1 - exact) / n).sqrt()
    assert torch.all((counts / n - exact).abs() < 5 * se), (counts / n, exact)


def test_private_selection_accounting_composes_with_the_upload_noise():
    from lora_a2.privacy import PrivacyPlan, laplace_epsilon

    lap = PrivacyPlan("laplace", "local", 1.0, 4.0, 1e-5, 1.0, 8, None, "private", 0.25)
    assert lap.epsilon(8) == pytest.approx(laplace_epsilon(2 / 4.0 + 0.25, 8, 1e-5))
    assert lap.selection_spent(8) == pytest.approx(laplace_epsilon(0.25, 8, 1e-5))
    gau = PrivacyPlan("gaussian", "local", 1.0, 4.0, 1e-5, 1.0, 8, None, "private", 0.25)
    plain = PrivacyPlan("gaussian", "local", 1.0, 4.0, 1e-5, 1.0, 8)
    assert gau.epsilon(8) > plain.epsilon(8) and plain.selection_spent(8) is None
    # the Gaussian's RDP at noise multiplier z/2 = 2 (replace-one) plus the selection's zCDP
    # ρ = ε_sel²/8 per round at every order α, over 8 rounds, converted at δ — computed here
    # from the RDP formula α/(2σ²) directly, not through the module
    orders = np.array(dp.rdp_alphas(), dtype=np.float64)
    rdp = 8 * (orders / (2 * 2.0 ** 2) + orders * 0.25 ** 2 / 8)
    from opacus.accountants.analysis.rdp import get_privacy_spent
    assert gau.epsilon(8) == pytest.approx(get_privacy_spent(orders=orders, rdp=rdp,
                                                             delta=1e-5)[0], rel=1e-9)
    # a target ε is reached by upload noise and selection together
    cfg = load_config(None, ["strategy.name='lora-a2'", "privacy.mechanism='gaussian'",
                             "privacy.epsilon=8", "privacy.selection='private'",
                             "privacy.selection_epsilon=0.5"])
    plan = resolve_plan(cfg)
    assert plan.epsilon(cfg.train.rounds) == pytest.approx(8, rel=0.01)
    assert plan.selection_spent(cfg.train.rounds) < 8


def test_private_selection_run_reports_its_epsilon_per_round(tmp_path, synthetic_csv):
    out = tmp_path / "run"
    assert main(["run", "--quiet", "--out", str(out), "--set", f"data.name=csv:{synthetic_csv}",
                 "model.name=tiny-random-bert", "model.max_length=16", "strategy.global_rank=4",
                 "data.num_clients=3", "train.rounds=2", "privacy.mechanism=laplace",
                 "privacy.epsilon=30", "privacy.selection=private",
                 "privacy.selection_epsilon=2"]) == 0
    rows = read_metrics(out / "metrics.jsonl")
    assert [r["selection_epsilon"] for r in rows] == [pytest.approx(2.0), pytest.approx(4.0)]
    s = json.loads((out / "summary.json").read_text())
    assert s["selection_epsilon"] == pytest.approx(4.0)
    assert s["epsilon"] == pytest.approx(30, rel=0.01)
    assert s["privacy"]["selection"] == "private"


@pytest.mark.parametrize("sets,needle", [
    (["privacy.selection=private"], "needs DP on the uploads"),
    (["privacy.selection=private", "privacy.mechanism=gaussian", "privacy.epsilon=8",
      "strategy.name=fl-lora"], "selects none"),
    (["privacy.selection=private", "privacy.mechanism=gaussian", "privacy.epsilon=8",
      "privacy.mode=central"], "for local mode"),
    (["privacy.selection=secret"], "privacy.selection"),
    (["privacy.selection=private", "privacy.mechanism=laplace", "privacy.epsilon=1",
      "privacy.selection_epsilon=1"], "not reachable"),
])
def test_bad_private_selection_config_is_one_line_exit_2(capsys, sets, needle):
    assert_config_error(capsys, sets, needle)


# ---------------------------------------------------------------------- the central estimator
def test_fixed_denominator_weights_are_dp_fedavg_s():
    pop = [10, 20, 30, 40]
    # ŵ = the largest count: n_k / (q Σ n_j), the data weights in expectation
    assert dp.fixed_denominator_weights([10, 40], pop, 0.5, 40) == pytest.approx(
        [10 / (0.5 * 100), 40 / (0.5 * 100)])
    # ŵ = 15 caps the two large clients at weight 1: W = 10/15 + 3
    W = 10 / 15 + 3
    assert dp.fixed_denominator_weights([10, 30], pop, 1.0, 15) == pytest.approx(
        [(10 / 15) / W, 1 / W])
    assert dp.central_sensitivity(2.0, pop, 1.0, 15) == pytest.approx(2.0 / W)
    # the weights do not depend on who else replied
    assert dp.fixed_denominator_weights([30], pop, 1.0, 40) == dp.fixed_denominator_weights(
        [10, 20, 30], pop, 1.0, 40)[2:]


def _negated(s, task, upd):
    """The same upload with its change reversed (values − ref ↦ ref − (values − ref))."""
    ref = s.upload_reference(task, upd)
    values = -upd.values if ref is None else 2 * ref - upd.values
    return Update(upd.client_id, upd.num_examples, values, upd.slots, dict(upd.meta))


def _release_diff(s, state, with_canary, without, rnd=1):
    a, _ = s.central_aggregate(rnd, state, with_canary)
    b, _ = s.central_aggregate(rnd, state, without)
    names = s.layout.group_names(s.noise_groups(rnd))
    return torch.cat([(a.tensors[n] - b.tensors[n]).reshape(-1) for n in names]).double()


def test_central_sensitivity_is_what_the_noise_assumes():
    """Four equal clients, C = 10⁻³: adding a client at +C to three at −C along the same
    direction moves the release by exactly C / (qW) = 0.25·C — not 0.5·C, as renormalising the
    weights over each round's replies would (the canary then also re-weights the others)."""
    s, rt, ctxs = make("fl-lora", "privacy.mechanism='gaussian'", "privacy.mode='central'",
                       "privacy.noise_multiplier=1", "privacy.clip=1e-3", clients=4)
    state = s.init_state(rt.initial_state())
    task0, raw = client_side(s, rt, s.configure(1, 0, state), ctxs[0])
    canary = s.client_clip(task0, raw)
    others = [(s.configure(1, c, state), _negated(s, task0, canary)) for c in (1, 2, 3)]
    for t, u in others:
        u.client_id = t.client_id
    diff = _release_diff(s, state, [(task0, canary)] + others, others)
    assert float(diff.norm()) == pytest.approx(0.25e-3, rel=1e-4)
    assert s.central_noise_scale() == pytest.approx(0.25e-3)


@pytest.mark.parametrize("name", ["lora-a2", "fl-lora", "ffa-lora", "rolora", "fedsvd",
                                  "fedsa-lora", "flexlora", "flora", "fedavg-full"])
def test_server_clip_bounds_a_client_that_does_not_clip(name):
    """A client that skips its clip (sends its raw update, far above C) moves the release by at
    most C / (qW): the server clips it again on arrival."""
    clip = 1e-4
    s, rt, ctxs = make(name, "privacy.mechanism='gaussian'", "privacy.mode='central'",
                       "privacy.noise_multiplier=1", f"privacy.clip={clip}", clients=3)
    state = s.init_state(rt.initial_state())
    replies = [client_side(s, rt, s.configure(1, c, state), ctx) for c, ctx in enumerate(ctxs)]
    assert dp.norm_of(change(s, *replies[0]), "gaussian") > 10 * clip  # unclipped
    diff = _release_diff(s, state, replies, replies[1:])
    # (float32 rounding of the updated weights: fedavg-full adds ~1e-5 to weights ~1)
    assert 0 < float(diff.norm()) <= clip / 3 * (1 + 1e-3)
    # and the server's clip is what the client's would have been
    clipped = [(t, s.client_clip(t, u)) for t, u in replies]
    a, _ = s.central_aggregate(1, state, replies)
    b, _ = s.central_aggregate(1, state, clipped)
    assert all(torch.equal(a.tensors[n], b.tensors[n]) for n in a.tensors)


def test_fedsvd_central_noise_is_on_b_before_the_resplit():
    """The re-split reads the noised aggregate: the released B = U Σ has orthogonal columns
    (noise added after the re-split would leave B's columns correlated, and the released A
    would be a function of the un-noised aggregate)."""
    s, rt, ctxs = make("fedsvd", "privacy.mechanism='gaussian'", "privacy.mode='central'",
                       "privacy.noise_multiplier=1", "privacy.clip=0.01", "model.head='frozen'")
    state = s.init_state(rt.initial_state())
    replies = _round(s, rt, ctxs, 1, state)
    clean, _ = s.central_aggregate(1, state, replies)
    noisy, _ = s.aggregate_round(1, state, replies)
    for m in rt.layout.modules:
        a, b = noisy.tensors[f"{m.name}.A"].double(), noisy.tensors[f"{m.name}.B"].double()
        gram = b.T @ b
        assert torch.allclose(gram, torch.diag(torch.diagonal(gram)), atol=1e-6)
        assert torch.allclose(a @ a.T, torch.eye(a.shape[0], dtype=torch.float64), atol=1e-5)
        # A moved with the noise: it is not the re-split of the clean aggregate
        clean_a = s.finalize(1, clean, {})[0].tensors[f"{m.name}.A"].double()
        assert not torch.allclose(a.abs(), clean_a.abs(), atol=1e-3)


# ---------------------------------------------------------------------- noise sources
def test_os_noise_cannot_be_rebuilt_from_the_seed():
    s, rt, ctxs = make("fl-lora", "privacy.mechanism='gaussian'", "privacy.noise_multiplier=1",
                       "privacy.noise_source='os'")
    state = s.init_state(rt.initial_state())
    task, raw = client_side(s, rt, s.configure(1, 0, state), ctxs[0])
    clipped = s.client_clip(task, raw)
    first = s.privatize_upload(task, raw).values - clipped.values
    second = s.privatize_upload(task, raw).values - clipped.values
    assert not torch.equal(first, second)  # a fresh secret draw every time
    seeded = dp.gaussian_noise(first.numel(), s.local_noise_scale(),
                               dp.noise_generator(s.cfg.seed, 1, 0, "seeded"))
    assert not torch.allclose(first, seeded)
    assert abs(float(first.double().std()) / s.local_noise_scale() - 1) < 0.05
    # seeded noise is exactly rebuildable
    s2, *_ = make("fl-lora", "privacy.mechanism='gaussian'", "privacy.noise_multiplier=1")
    again = s2.privatize_upload(task, raw).values - clipped.values
    assert torch.allclose(again, seeded, atol=1e-7)


def test_every_noise_uses_the_configured_source(monkeypatch):
    """Local noise, central noise and the private selection all draw from
    ``noise_generator(..., source)`` with the run's source."""
    seen = []
    real = dp.noise_generator

    def spy(seed, rnd, who, source="seeded"):
        seen.append((who, source))
        return real(seed, rnd, who, source)

    monkeypatch.setattr(dp, "noise_generator", spy)
    for mode, extra in (("local", ["privacy.selection='private'"]), ("central", [])):
        s, rt, ctxs = make("lora-a2", "privacy.mechanism='laplace'", f"privacy.mode='{mode}'",
                           "privacy.noise_multiplier=2", "privacy.noise_source='os'", *extra)
        state = s.init_state(rt.initial_state())
        s.aggregate_round(1, state, _round(s, rt, ctxs, 1, state))
    whos = {w for w, _ in seen}
    assert {0, 1, 2, "select/0", "server"} <= whos
    assert {src for _, src in seen} == {"os"}


def _crash_at(rnd_to_crash):
    from lora_a2.engines.local import run_round

    def round_fn(exp, rnd, state, on_client=None):
        out = run_round(exp, rnd, state, on_client)
        if rnd == rnd_to_crash:  # the uploads of this round were drawn and sent
            raise RuntimeError("simulated crash")
        return out
    return round_fn


def test_a_round_rerun_with_fresh_noise_is_charged(tmp_path, synthetic_csv):
    from lora_a2.runner import run_experiment

    cfg = load_config(None, [f"data.name=csv:{synthetic_csv}", *TINY, "strategy.name=lora-a2",
                             "privacy.mechanism=gaussian", "privacy.noise_multiplier=2",
                             "privacy.selection=private"])
    out = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_experiment(cfg, out, progress=False, round_fn=_crash_at(2))
    run_experiment(cfg, out, progress=False, resume=True)
    rows = read_metrics(out / "metrics.jsonl")
    plan = resolve_plan(cfg)
    assert [r["releases_charged"] for r in rows] == [1, 3, 4]
    assert rows[-1]["epsilon"] == pytest.approx(plan.epsilon(4))
    assert rows[-1]["epsilon"] > plan.epsilon(3)
    # the private selection is charged the same way, in the summary's two places too
    summary = json.loads((out / "summary.json").read_text())
    spent = plan.selection_spent(4)
    assert spent > plan.selection_spent(3)
    assert rows[-1]["selection_epsilon"] == pytest.approx(spent)
    assert summary["selection_epsilon"] == pytest.approx(spent)
    assert summary["privacy"]["selection_epsilon"] == pytest.approx(spent)
    assert json.loads((out / "privacy_ledger.json").read_text())["attempts"] == {
        "1": 1, "2": 2, "3": 1}
    # seeded noise re-draws the same release: nothing extra to charge, and no ledger
    seeded = load_config(None, [f"data.name=csv:{synthetic_csv}", *TINY,
                                "privacy.mechanism=gaussian", "privacy.noise_multiplier=2",
                                "privacy.noise_source=seeded"])
    out2 = tmp_path / "seeded"
    with pytest.raises(RuntimeError):
        run_experiment(seeded, out2, progress=False, round_fn=_crash_at(2))
    run_experiment(seeded, out2, progress=False, resume=True)
    assert [r["releases_charged"] for r in read_metrics(out2 / "metrics.jsonl")] == [1, 2, 3]
    assert not (out2 / "privacy_ledger.json").exists()


def test_schema_version_keeps_old_configs_seeded(tmp_path):
    old = tmp_path / "old.toml"
    old.write_text("seed = 3\n[privacy]\nmechanism = 'gaussian'\nnoise_multiplier = 1.0\n")
    assert load_config(old).privacy.noise_source == "seeded"
    assert load_config(old).schema_version == 1
    new = tmp_path / "new.toml"
    new.write_text("schema_version = 2\n" + old.read_text())
    assert load_config(new).privacy.noise_source == "os"
    assert load_config(None).privacy.noise_source == "os"
    assert load_config(None).schema_version == 2
    explicit = tmp_path / "explicit.toml"
    explicit.write_text(old.read_text() + "noise_source = 'os'\n")
    assert load_config(explicit).privacy.noise_source == "os"  # the file's own key wins
    # a resolved config written now says its version, and reloads to itself
    cfg = load_config(new)
    again = tmp_path / "again.toml"
    again.write_text(cfg.to_toml())
    assert load_config(again) == cfg


def test_rebuildable_noise_is_warned_when_a_new_run_starts(tmp_path, synthetic_csv, capsys):
    # a hand-written DP config without schema_version loads as version 1, with seeded noise:
    # the user is told before the run starts, and told how to get noise nobody can rebuild
    old = tmp_path / "mine.toml"
    old.write_text("[privacy]\nmechanism = 'gaussian'\nnoise_multiplier = 1.0\n")
    run_cli(tmp_path / "old", "train.rounds=1", data=synthetic_csv, args=("--config", str(old)))
    err = capsys.readouterr().err
    assert "lora-a2: warning: privacy.noise_source = 'seeded'" in err
    assert "without schema_version" in err and "schema_version = 2" in err
    # a resume does not repeat it
    (tmp_path / "old" / "summary.json").unlink()
    assert main(["run", "--quiet", "--resume", str(tmp_path / "old")]) == 0
    assert "warning" not in capsys.readouterr().err
    # the same file at schema version 2 draws from the OS: no warning
    new = tmp_path / "new.toml"
    new.write_text("schema_version = 2\n" + old.read_text())
    run_cli(tmp_path / "new", "train.rounds=1", data=synthetic_csv, args=("--config", str(new)))
    assert "warning" not in capsys.readouterr().err
    # seeded by choice is warned too, without the schema hint; no DP, no warning
    explicit = load_config(new, ["privacy.noise_source=seeded"])
    line = rebuildable_noise_warning(explicit)
    assert line and "as configured" in line and "schema_version" not in line
    assert rebuildable_noise_warning(load_config(old, ["privacy.mechanism=none"])) is None


def test_a_noise_level_without_a_mechanism_is_warned_not_silently_ignored(tmp_path,
                                                                          synthetic_csv, capsys):
    """privacy.epsilon (or noise_multiplier) with the default mechanism 'none' adds no noise:
    the run says so when it starts (a warning: 'none' on a DP config is how DP is switched
    off); with a mechanism, or with neither set, nothing is said."""
    from lora_a2.private import inert_privacy_warning

    run_cli(tmp_path / "a", "train.rounds=1", "privacy.epsilon=1", data=synthetic_csv)
    err = capsys.readouterr().err
    assert "lora-a2: warning: privacy.epsilon set but privacy.mechanism = 'none'" in err
    assert "not differentially private" in err and err.count("\n") == 1, err
    both = inert_privacy_warning(load_config(None, ["privacy.epsilon=1",
                                                    "privacy.noise_multiplier=2"]))
    assert both and both.startswith("privacy.epsilon and privacy.noise_multiplier set")
    assert inert_privacy_warning(load_config(None, [])) is None
    assert inert_privacy_warning(load_config(None, ["privacy.mechanism=laplace",
                                                    "privacy.epsilon=1"])) is None


def test_committed_cells_load_with_the_noise_they_ran_with():
    from pathlib import Path

    paths = sorted(Path(__file__).parents[1].glob("benchmarks/results/**/config.toml"))
    legacy = 0
    for p in paths:
        cfg = load_config(p)
        if "schema_version" not in p.read_text():  # written before version 2: ran seeded
            legacy += 1
            assert cfg.schema_version == 1 and cfg.privacy.noise_source == "seeded", p
        else:  # a versioned file names its own source, and loads with exactly that one
            assert cfg.schema_version == SCHEMA_VERSION, p
            assert f'noise_source = "{cfg.privacy.noise_source}"' in p.read_text(), p
    assert legacy > 100


@pytest.mark.parametrize("sets,needle", [
    (["privacy.noise_source=urandom"], "privacy.noise_source"),
    (["privacy.weight_cap=-1"], "privacy.weight_cap"),
    (["schema_version=7"], "schema_version"),
    (["privacy.mechanism=gaussian", "privacy.noise_multiplier=0"], "privacy.noise_multiplier"),
    (["privacy.mechanism=gaussian", "privacy.noise_multiplier=-2"], "privacy.noise_multiplier"),
])
def test_bad_new_privacy_keys_are_one_line_exit_2(capsys, sets, needle):
    assert_config_error(capsys, sets, needle)


# ---------------------------------------------------------------------- what is released
def test_withheld_eval_bytes_total_null_not_zero(tmp_path, synthetic_csv):
    # a personalised strategy's evaluate-phase bytes depend on which clients answered: central
    # DP withholds them per round, so their totals are unknown (null), not 0
    sets = ["strategy.name=fedsa-lora", "train.rounds=2", "privacy.mechanism=gaussian",
            "privacy.mode=central", "privacy.noise_multiplier=1", "privacy.clip=0.1",
            "privacy.noise_source=seeded"]  # seeded: the accuracies below are reproducible
    out = _run(tmp_path, "central", synthetic_csv, *sets)
    assert all("eval_upload_bytes" in r["withheld"] for r in read_metrics(out / "metrics.jsonl"))
    assert all(r["eval_upload_bytes"] > 0 for r in read_metrics(out / "server_log.jsonl"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["total_eval_upload_bytes"] is None
    assert summary["total_eval_download_bytes"] is None
    # its released accuracy is the shared (noised) model's on the test set, not the mean of
    # the clients' own models, which the trusted server alone keeps
    pairs = list(zip(read_metrics(out / "metrics.jsonl"), read_metrics(out / "server_log.jsonl")))
    for pub, own in pairs:
        assert pub["accuracy"] == own["shared_model_accuracy"]
        assert "shared_model_accuracy" not in pub
    # and its loss is the shared model's too, not the clients' mean (a continuous value: the
    # two cannot coincide by chance, as accuracies at chance level can)
    assert all(pub["loss"] != own["loss"] for pub, own in pairs)


def test_a_refused_mode_names_the_strategies_that_run_it_and_no_mechanism_refuses_nothing(capsys):
    """A strategy that refuses a DP mode (FedEx-LoRA: central) is refused in one line that names
    the strategies that do run it; without a DP mechanism the mode is moot and nothing is
    refused."""
    assert main(["config", "--set", "strategy.name=fedex-lora", "privacy.mechanism=gaussian",
                 "privacy.epsilon=1", "privacy.mode=central"]) == 2
    others = capsys.readouterr().err.strip().split("(it is with ")[1]
    assert "fl-lora" in others and "lora-a2" in others and "fedex-lora" not in others
    assert main(["config", "--set", "strategy.name=fedex-lora", "privacy.mechanism=none",
                 "privacy.mode=central"]) == 0


def test_local_dp_weights_the_private_uploads_by_their_data():
    """Local DP: the uploads are private already, so the server weights them as without DP,
    w_k = n_k / Σ n (no fixed denominator, which is central DP's)."""
    s, _, _ = make("fl-lora", "privacy.mechanism='gaussian'", "privacy.mode='local'",
                   "privacy.noise_multiplier=1")
    replies = [(None, SimpleNamespace(num_examples=n)) for n in (10, 30, 60)]
    assert s.weights(replies) == pytest.approx([0.1, 0.3, 0.6])


def test_a_central_release_keeps_the_strategys_public_keys_and_names_what_it_withheld():
    """FLoRA's ``stacked_rank`` (Σ of public ranks) is published under central DP; the task's
    shared-test-set metrics are too; ``withheld`` names exactly the keys left out. A wrapper
    built without saying otherwise withholds (``release_client_stats`` is an opt-in)."""
    from lora_a2.private import PrivateStrategy

    _, s, _, _ = tiny_setup(["strategy.name='flora'", "privacy.mechanism='gaussian'",
                             "privacy.mode='central'", "privacy.noise_multiplier=1"], 2)
    full = {"round": 1, "strategy": "flora", "clients": [0, 1], "stacked_rank": 4,
            "accuracy": 0.5, "eval_metric_keys": ["accuracy"], "train_loss": 0.7,
            "client_mean_norm": 0.2}
    out = s.release_record(json.loads(json.dumps(full)))
    assert out == {"round": 1, "strategy": "flora", "clients": [0, 1], "stacked_rank": 4,
                   "accuracy": 0.5, "withheld": ["client_mean_norm", "train_loss"]}
    assert PrivateStrategy(s.inner, s.plan).withholds
    # a (plugin) strategy may declare keys that are public anyway: they stay published
    s.inner.public_info_keys = ("round", "accuracy", "stacked_rank")
    assert s.release_record(json.loads(json.dumps(full))) == out


@pytest.mark.parametrize("sets", [["privacy.mode='local'"],
                                  ["privacy.mode='central'", "privacy.release_client_stats=true"]])
def test_a_release_that_withholds_nothing_is_the_full_record(sets):
    """Local DP (the uploads are private already) and central DP with the opt-in publish the
    server's whole round record: the clients' losses and their per-client rows included."""
    _, s, _, _ = tiny_setup(["strategy.name='fl-lora'", "privacy.mechanism='gaussian'",
                             "privacy.noise_multiplier=1", "privacy.clip=0.1", *sets], 2)
    full = {"round": 1, "strategy": "fl-lora", "clients": [0, 1], "train_loss": 0.7,
            "upload_bytes": 123, "per_client": [{"client": 0, "loss": 0.6, "upload_bytes": 60},
                                                {"client": 1, "loss": 0.8, "upload_bytes": 63}]}
    assert not s.withholds
    assert s.release_record(json.loads(json.dumps(full))) == full


def test_central_release_cuts_a_client_apps_own_error_text():
    """Under central DP a Flower ClientApp's error message (text the client's code wrote: it
    could quote the client's data) is not released, in ``failures`` or a row's ``failure``;
    the engine's own reasons are, and the server's full record keeps everything."""
    _, s, _, _ = tiny_setup(["strategy.name='fl-lora'", "privacy.mechanism='gaussian'",
                             "privacy.mode='central'", "privacy.noise_multiplier=1",
                             "privacy.clip=0.1"], 2)
    secret = "ValueError: could not parse 'Jane Doe, 12 Elm St'"
    full = {"round": 1, "strategy": "fl-lora", "active_factor": None, "clients": [0, 1],
            "failures": [f"client 0: ClientApp error 0: {secret}",
                         "client 1: no reply within 30.0 s"],
            "per_client": [{"client": 0, "dropped": True, "download_bytes": 5,
                            "failure": f"ClientApp error 0: {secret}"},
                           {"client": 1, "dropped": True, "download_bytes": 5,
                            "failure": "no reply within 30.0 s"}]}
    out = s.release_record(full)
    # and the same record as read back from JSON (a resumed run's server log): its keys are
    # fresh strings, not the interned literals of the code that wrote it
    assert s.release_record(json.loads(json.dumps(full))) == out
    assert "Jane" not in json.dumps(out)
    assert out["failures"] == ["client 0: ClientApp error 0: message withheld (central DP)",
                               "client 1: no reply within 30.0 s"]
    assert [c["failure"] for c in out["per_client"]] == [
        "ClientApp error 0: message withheld (central DP)", "no reply within 30.0 s"]
    assert "Jane" in json.dumps(full)  # the trusted server's own record is untouched


@pytest.mark.parametrize("mode", ["local", "central"])
def test_central_dp_refuses_a_strategy_whose_aggregate_takes_no_weights(mode):
    """The fixed-denominator estimator passes its weights into ``aggregate``: a (plugin)
    strategy whose ``aggregate`` takes no ``weights`` is refused under central DP, in one line
    that names it; under local DP (the uploads are private already) it is wrapped as it is."""
    from lora_a2.errors import UserError
    from lora_a2.private import PrivateStrategy

    def aggregate(rnd, state, replies):  # no weights parameter
        return state, {}

    inner = SimpleNamespace(name="my-plugin", aggregate=aggregate)
    plan = resolve_plan(load_config(None, ["privacy.mechanism='gaussian'", f"privacy.mode='{mode}'",
                                           "privacy.noise_multiplier=1"]))
    if mode == "local":
        assert PrivateStrategy(inner, plan).inner is inner
        return
    with pytest.raises(UserError, match="strategy 'my-plugin' cannot run central DP: its "
                                        "aggregate\\(\\) takes no 'weights'"):
        PrivateStrategy(inner, plan)


def test_central_release_holds_only_noised_or_data_independent_values(tmp_path, synthetic_csv):
    sets = ["privacy.mechanism=gaussian", "privacy.mode=central", "privacy.noise_multiplier=1",
            "privacy.clip=0.1", "data.local_test_fraction=0.2"]
    out = _run(tmp_path, "central", synthetic_csv, *sets)
    released = read_metrics(out / "metrics.jsonl")
    full = read_metrics(out / "server_log.jsonl")
    assert len(released) == len(full) == 3
    secret = {"train_loss", "rank_allocation", "upload_bytes", "upload_params",
              "cumulative_upload_bytes", "local_accuracy", "local_accuracy_mean"}
    for pub, own in zip(released, full):
        assert not secret & set(pub), secret & set(pub)
        assert secret <= set(own) | {"train_loss"}
        assert set(pub["withheld"]) >= {"rank_allocation", "upload_bytes", "local_accuracy"}
        assert pub["accuracy"] == own["accuracy"] and pub["epsilon"] == own["epsilon"]
        for c in pub["per_client"]:  # LoRA-A2's upload size is its data-chosen selection
            assert set(c) <= {"client", "download_bytes", "download_params", "dropped",
                              "failure", "num_examples"}
        # under DP a client sends no training loss (its text's length moved the upload's size):
        # the trusted server's own record has none either
        assert own["train_loss"] is None and all(c.get("train_loss") is None for c in own["per_client"])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["total_upload_bytes"] is None and summary["final_local_accuracy"] is None
    assert summary["initial_local_accuracy"] is None  # the untrained model on their data too
    initial = json.loads((out / "initial_eval.json").read_text())
    assert "accuracy" in initial and not {"local_accuracy", "local_accuracy_mean"} & set(initial)
    # a run whose initial_eval.json older code wrote with them: a resume rewrites it without
    (out / "initial_eval.json").write_text(json.dumps({**initial, "local_accuracy": [0.5] * 4,
                                                       "local_accuracy_mean": 0.5}))
    (out / "summary.json").unlink()
    assert main(["run", "--quiet", "--resume", str(out)]) == 0
    assert json.loads((out / "initial_eval.json").read_text()) == initial
    assert json.loads((out / "summary.json").read_text())["initial_local_accuracy"] is None
    assert "rank_allocation" in summary["privacy"]["withheld_from_release"]
    # opting in publishes them, and the summary says ε does not cover them
    opt = _run(tmp_path, "optin", synthetic_csv, *sets, "privacy.release_client_stats=true")
    rows = read_metrics(opt / "metrics.jsonl")
    assert "rank_allocation" in rows[0] and "withheld" not in rows[0]
    assert not (opt / "server_log.jsonl").exists()
    caveats = " ".join(json.loads((opt / "summary.json").read_text())["privacy"]["caveats"])
    assert "release_client_stats" in caveats and "not covered" in caveats
    assert "local_accuracy" in json.loads((opt / "initial_eval.json").read_text())


@pytest.mark.parametrize("mode", ["central", "local"])
def test_a_dp_upload_carries_no_loss_so_its_size_does_not_depend_on_the_data(mode):
    """The training loss is a data-dependent number; in central mode its text's length changed
    the upload's size (0.5 against 0.6931471805599453: 16 bytes more), a size the release
    publishes for a fixed-size strategy as not depending on any client's data."""
    s, rt, ctxs = make("fl-lora", "privacy.mechanism='gaussian'", f"privacy.mode='{mode}'",
                       "privacy.noise_multiplier=1")
    task, raw = client_side(s, rt, s.configure(1, 0, s.init_state(rt.initial_state())), ctxs[0])
    sizes = set()
    for loss in (0.5, 0.6931471805599453, float("nan")):
        raw.meta["loss"] = loss
        sent = s.privatize_upload(task, Update(raw.client_id, raw.num_examples,
                                               raw.values.clone(), raw.slots, dict(raw.meta)))
        assert "loss" not in sent.meta
        sizes.add(len(encode(sent.to_payload())))
    assert len(sizes) == 1, sizes


def test_central_release_of_a_fixed_size_strategy_keeps_its_bytes(tmp_path, synthetic_csv):
    out = _run(tmp_path, "fl", synthetic_csv, "strategy.name=fl-lora", "privacy.mechanism=gaussian",
               "privacy.mode=central", "privacy.noise_multiplier=1")
    rows = read_metrics(out / "metrics.jsonl")
    assert all("train_loss" not in r and r["upload_bytes"] > 0 for r in rows)
    assert json.loads((out / "summary.json").read_text())["total_upload_bytes"] == sum(
        r["upload_bytes"] for r in rows)
    # and each client's, which add up to the round's
    for r in rows:
        assert sum(c["upload_bytes"] for c in r["per_client"]) == r["upload_bytes"] > 0
    # released as not depending on the data: a client's upload is the same size every round
    # (its training loss, a data-dependent number, changed the header's length by a few bytes)
    sizes: dict[int, set[int]] = {}
    for r in rows:
        for c in r["per_client"]:
            sizes.setdefault(c["client"], set()).add(c["upload_bytes"])
    assert len(rows) >= 2 and all(len(v) == 1 for v in sizes.values()), sizes


@pytest.mark.parametrize("name,says", [
    ("hetlora", "hetlora: each client's kept rank and tail norm"),
    ("fedsa-lora", "fedsa-lora: each client's evaluation answers"),
    ("fl-lora", None)])
def test_the_summary_names_what_a_strategy_sends_in_the_clear_under_local_dp(name, says):
    """Local DP covers the noised values only: a strategy that also sends data-dependent values
    in the clear (HetLoRA's pruning decision, a personalised strategy's evaluation answers) has
    it in summary.json's caveats next to ε; a strategy that sends none has no such caveat."""
    from lora_a2.runner import _privacy_summary

    s, rt, ctxs = make(name, "privacy.mechanism='gaussian'", "privacy.mode='local'",
                       "privacy.noise_multiplier=1")
    caveats = _privacy_summary(SimpleNamespace(strategy=s, cfg=s.inner.cfg),
                               [{"epsilon": 1.0}])["privacy"]["caveats"]
    mine = [c for c in caveats if c.startswith(f"{name}:")]
    if says is None:
        assert mine == []
    else:
        assert len(mine) == 1 and mine[0].startswith(says) and "not covered by ε" in mine[0]


def test_a_central_run_with_a_norm_bound_says_its_rejections_are_not_covered():
    """Central DP + server.max_update_norm: the released count of uploads rejected for their
    norm depends on the clients' data; the summary's caveats say so (and not without the bound)."""
    from lora_a2.runner import _privacy_summary

    for bound, expected in ((0.0, 0), (5.0, 1)):
        s, rt, ctxs = make("fl-lora", "privacy.mechanism='gaussian'", "privacy.mode='central'",
                           "privacy.noise_multiplier=1", f"server.max_update_norm={bound}")
        exp = SimpleNamespace(strategy=s, cfg=s.inner.cfg)
        caveats = _privacy_summary(exp, [{"epsilon": 1.0}])["privacy"]["caveats"]
        assert sum("server.max_update_norm" in c and "not covered by ε" in c
                   for c in caveats) == expected
