"""The privacy auditor (lora_a2.audit): its statistics, its power against planted bugs, and
its one-line errors. The full quick audit of every mechanism runs in .ci/run."""

from __future__ import annotations

import json
import math
import shlex
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import beta, binom

import lora_a2.audit as audit
from lora_a2.audit import (CLIP, DEFAULT_Z, PLANTS, SELECTION_EPSILON, AuditRow,
                           _with_change, audit_selection, choose_event, clopper_pearson_lower,
                           clopper_pearson_upper, epsilon_lower_bound, event_bound, federation,
                           planned_rows, plant_reaches, report, run_audit, threshold_audit)
from lora_a2.cli import main
from lora_a2.strategies import REGISTRY, load_all


def test_clopper_pearson_and_the_epsilon_bound():
    # the exact one-sided bound: P[Bin(n, p⁺) ≤ k] = α
    k, n, a = 3, 1000, 0.05
    up = clopper_pearson_upper(k, n, a)
    assert beta.cdf(up, k + 1, n - k) == pytest.approx(1 - a)
    assert clopper_pearson_upper(0, 10, 0.05) == pytest.approx(1 - 0.05 ** (1 / 10))
    # ε ≥ log((1 − δ − FNR⁺) / FPR⁺) with each rate at α/2
    fp, fn, n, d = 10, 5000, 10_000, 1e-5
    expect = math.log((1 - d - clopper_pearson_upper(fn, n, 0.025))
                      / clopper_pearson_upper(fp, n, 0.025))
    assert epsilon_lower_bound(fp, fn, n, d, 0.05) == pytest.approx(expect)
    assert epsilon_lower_bound(n, 0, n, d, 0.05) == 0.0  # a useless test bounds nothing
    # every positive missed (FNR⁺ = 1 > 1 − δ): no bound at all, 0 and not a negative ε
    assert epsilon_lower_bound(0, n, n, d, 0.05) == 0.0


@pytest.mark.parametrize("k,n,a", [(3, 1000, 0.05), (40, 100, 0.01), (99, 100, 0.025),
                                   (1, 7, 0.1)])
def test_clopper_pearson_bounds_are_the_exact_binomial_tail_bounds(k, n, a):
    """Checked on the binomial law itself, not the beta quantile the code uses: the upper
    bound p⁺ of k successes in n has P[Bin(n, p⁺) ≤ k] = α, the lower p⁻ has
    P[Bin(n, p⁻) ≥ k] = α."""
    up, lo = clopper_pearson_upper(k, n, a), clopper_pearson_lower(k, n, a)
    assert binom.cdf(k, n, up) == pytest.approx(a)
    assert binom.sf(k - 1, n, lo) == pytest.approx(a)
    assert lo < k / n < up


def test_clopper_pearson_bounds_at_the_edges():
    assert clopper_pearson_lower(0, 10, 0.05) == 0.0  # nothing seen: no lower bound
    assert clopper_pearson_upper(10, 10, 0.05) == 1.0
    n = int("6000")  # a count made at run time, as the audit's are (not a shared constant)
    assert clopper_pearson_upper(n, 6_000, 0.05) == 1.0
    assert clopper_pearson_upper(n - 1, n, 0.05) < 1.0
    assert clopper_pearson_lower(10, 10, 0.05) == pytest.approx(0.05 ** (1 / 10))  # p¹⁰ = α


@pytest.mark.parametrize("p,q,event", [
    ([80, 10, 10], [5, 50, 45], (0, False, False)),  # "slot 0 selected" favours p: 81/6
    ([5, 50, 45], [80, 10, 10], (0, True, False)),  # the same, favouring q
    ([99, 1, 0], [50, 30, 20], (0, True, True)),  # "slot 0 not selected" favours q: 51/2
    ([50, 30, 20], [99, 1, 0], (0, False, True)),
    ([40, 30, 30], [99, 1, 0], (2, False, False)),  # 31/1 beats "slot 0 not selected"'s 61/2
    # "slot 0 not selected" for q: 51/2 beats "slot 2" for q's 25/1 only by the added one
    ([99, 1, 0], [50, 26, 24], (0, True, True)),
    # ratios a whole number apart no more: 5/3 ("slot 0" for p) beats 9/7 ("slot 0 not
    # selected" for q) and 5/4 ("slot 1" or "slot 2" for q) — rounded down, all would be 1
    ([4, 3, 3], [2, 4, 4], (0, False, False)),
])
def test_the_selection_audit_chooses_the_event_with_the_largest_ratio(p, q, event):
    """Add-one ratios of the selection draws' counts (n = 100 a side), every event listed by
    hand in the comments: the chosen one and the runner-up."""
    assert choose_event(np.array(p, float), np.array(q, float), 100) == event


def test_the_selection_audit_adds_one_to_each_count_of_a_complement_event():
    # n = 200: "slot 1 selected" for q, 105/4 = 26.25, beats "slot 0 not selected" for q,
    # 131/5 = 26.2 — which would win at 133/5 with two added, or any other count
    assert choose_event(np.array([196.0, 3, 1]), np.array([70.0, 104, 26]), 200) == (1, True,
                                                                                       False)


def test_a_row_wraps_its_own_mechanism():
    f = federation("fl-lora", 0)
    for mech, want in (("gaussian", "gaussian"), ("laplace", "laplace"),
                       ("selection", "gaussian")):  # selection rows: Gaussian uploads
        plan = f.wrap("local", mech, 2.0, None).plan
        assert plan.mechanism == want, mech
        # a selection row's wrapper runs (and accounts) the private selection
        assert plan.private_selection == (mech == "selection"), mech
        assert plan.selection_epsilon == SELECTION_EPSILON or mech != "selection"


def test_the_selection_audit_bounds_its_event_on_fresh_draws():
    lo, up = clopper_pearson_lower, clopper_pearson_upper
    p, q = np.array([80.0, 12, 8]), np.array([5.0, 50, 45])
    # "slot 0 selected" as evidence for p: rate 80/100 under p against 5/100 under q
    lb, fpr, fnr = event_bound(p, q, 100, (0, False, False), 0.05)
    assert lb == pytest.approx(math.log(lo(80, 100, 0.025) / up(5, 100, 0.025)))
    assert (fpr, fnr) == (0.05, pytest.approx(0.2))
    # "slot 0 not selected" as evidence for q: 95 of 100 under q against 20 under p
    lb, fpr, fnr = event_bound(p, q, 100, (0, True, True), 0.05)
    assert lb == pytest.approx(math.log(lo(95, 100, 0.025) / up(20, 100, 0.025)))
    assert (fpr, fnr) == (0.2, pytest.approx(0.05))
    # "slot 1 not selected" as evidence for p: 88 of 100 under p against 50 under q
    lb, fpr, fnr = event_bound(p, q, 100, (1, False, True), 0.05)
    assert lb == pytest.approx(math.log(lo(88, 100, 0.025) / up(50, 100, 0.025)))
    assert (fpr, fnr) == (0.5, pytest.approx(0.12))
    # an event the fresh draws do not bear out bounds nothing (never a negative ε)
    assert event_bound(p, q, 100, (1, False, False), 0.05)[0] == 0.0
    assert event_bound(np.zeros(3), q, 100, (0, False, False), 0.05) == (0.0, 0.05, 1.0)


def test_the_threshold_audit_reports_the_rates_of_its_bound():
    rng = np.random.default_rng(0)
    null, alt, null_e, alt_e = (rng.normal(mu, 1.0, 20_000) for mu in (0, 2, 0, 2))
    eps, fpr, fnr = threshold_audit(null, alt, null_e, alt_e, 1e-5, 0.05)
    assert 0 < fpr < 0.01 and 0 < fnr < 1  # the best bound sits far in the null's tail
    m = len(null_e)
    assert eps == pytest.approx(epsilon_lower_bound(round(fpr * m), round(fnr * m), m, 1e-5,
                                                    0.05))
    # μ = 2 at σ = 1: the Gaussian's ε at δ = 1e-5 is ≈ 9.6, so the bound is below it
    assert 0.5 < eps < 9.6
    # separated samples: no false positive, a bound limited only by the draws
    eps, fpr, fnr = threshold_audit(null, alt + 100, null_e, alt_e + 100, 1e-5, 0.05)
    assert fpr == 0.0 and fnr < 0.01
    assert eps == pytest.approx(epsilon_lower_bound(0, round(fnr * m), m, 1e-5, 0.05))
    # a statistic with atoms (the Laplace one is clipped at ±Σ|d|): the threshold falls on
    # one, and an alternative draw equal to it is a miss ("in" is T > t, strictly)
    zeros, ones = np.zeros(1000), np.ones(1000)
    alt_e = np.concatenate([np.zeros(100), np.ones(900)])
    eps, fpr, fnr = threshold_audit(zeros, ones, zeros, alt_e, 1e-5, 0.05)
    assert (fpr, fnr) == (0.0, 0.1)
    assert eps == pytest.approx(epsilon_lower_bound(0, 100, 1000, 1e-5, 0.05))


def test_an_audit_row_prints_its_confidence_in_percent():
    row = AuditRow("lora-a2", "local", "gaussian", 1.0, 0.25, 0.95, 1000, 0.1, 0.2, "ok")
    assert row.line().split() == ["lora-a2", "local", "gaussian", "claimed", "ε", "1.000",
                                  "lower", "bound", "0.250", "(95.00", "%)", "ok"]


def test_every_mechanism_the_project_offers_is_audited():
    load_all()
    rows = planned_rows(None, None, None)
    for name, cls in REGISTRY.items():
        for mode in ("local", "central"):
            have = {m for s, md, m in rows if s == name and md == mode}
            if cls.dp_refusal(mode):
                assert not have
            else:
                assert {"gaussian", "laplace"} <= have
                assert ("selection" in have) == (cls.selects_slots and mode == "local")


def test_honest_mechanisms_pass_and_the_laplace_bound_is_tight():
    rows = run_audit(["lora-a2"], None, None, quick=True)
    assert [r.verdict for r in rows] == ["ok"] * len(rows) and len(rows) == 5
    # 95 % overall: Bonferroni over the rows (each row's two rates share its α)
    assert all(r.confidence == pytest.approx(1 - 0.05 / 5) for r in rows)
    lap = [r for r in rows if r.mechanism == "laplace"]
    # the Laplace test reaches its claim (ε₀ = 1) to within a few per cent: the audit has power
    assert all(0.9 < r.lower_bound <= r.claimed_epsilon for r in lap)
    # the Gaussian rows reach about half their claim at these draws (2.7 of 4.73, measured;
    # docs/PRIVACY.md), the selection row half its ε = 1 (its neighbours' exact ratio e^0.66)
    gauss = [r for r in rows if r.mechanism == "gaussian"]
    assert len(gauss) == 2 and all(0.45 * r.claimed_epsilon < r.lower_bound for r in gauss)
    sel = [r for r in rows if r.mechanism == "selection"]
    assert len(sel) == 1 and 0.4 < sel[0].lower_bound <= sel[0].claimed_epsilon


@pytest.mark.parametrize("plant,select", [
    ("half-noise", (["fl-lora"], ["local"], ["laplace"])),
    ("half-noise", (["fl-lora"], ["central"], ["gaussian"])),
    ("no-server-clip", (["flexlora"], ["central"], ["laplace"])),
    ("renormalised-weights", (["fl-lora"], ["central"], ["laplace"])),
    ("gumbel-scale", (["lora-a2"], ["local"], ["selection"])),
])
def test_a_planted_bug_is_flagged(plant, select):
    assert plant_reaches(plant, select[1][0], select[2][0])  # the CLI's refusal agrees
    rows = run_audit(*select, plant=plant, quick=True)
    assert len(rows) == 1 and rows[0].verdict == "VIOLATED"
    assert rows[0].lower_bound > rows[0].claimed_epsilon


@pytest.mark.parametrize("plant,select", [
    ("no-server-clip", (["fl-lora"], ["local"], ["laplace"])),  # a client-side release
    ("renormalised-weights", (["fl-lora"], ["local"], ["gaussian"])),
    ("gumbel-scale", (["fl-lora"], ["central"], ["laplace"])),  # no selection in the row
    ("half-noise", (["lora-a2"], ["local"], ["selection"])),  # the selection is not noise
])
def test_a_planted_bug_leaves_the_rows_it_does_not_touch_within_their_claim(plant, select):
    """The plants are one bug each: a row whose release the bug does not reach stays honest
    (so a flagged row is the bug's doing, not the planting's)."""
    assert not plant_reaches(plant, select[1][0], select[2][0])
    rows = run_audit(*select, plant=plant, quick=True)
    assert len(rows) == 1 and rows[0].verdict == "ok"


@pytest.mark.parametrize("plant", sorted(PLANTS))
def test_plant_reach_covers_every_mode_and_mechanism_the_bug_touches(plant):
    """The declared reach, row by row: the noise plants every noise row (server-side ones
    central only), gumbel-scale only selection rows."""
    got = {(m, x) for m in audit.MODES for x in audit.MECHANISMS if plant_reaches(plant, m, x)}
    noise = {(m, x) for m in audit.MODES for x in ("gaussian", "laplace")}
    want = {"half-noise": noise, "gumbel-scale": {("local", "selection"),
                                                 ("central", "selection")},
            "no-server-clip": {r for r in noise if r[0] == "central"},
            "renormalised-weights": {r for r in noise if r[0] == "central"}}[plant]
    assert got == want


@pytest.mark.parametrize("args", [
    ["--plant", "gumbel-scale", "--strategy", "fl-lora", "--mode", "central"],
    ["--plant", "no-server-clip", "--mode", "local", "--mechanism", "laplace"],
    ["--plant", "half-noise", "--strategy", "lora-a2", "--mechanism", "selection"],
])
def test_a_plant_the_selectors_keep_out_of_reach_is_refused(capsys, args):
    """An audit whose rows the planted bug cannot touch would pass (exit 0) and test nothing:
    one line, exit 2, before any sampling."""
    assert main(["audit-privacy", "--quick", *args]) == 2
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and args[1] in err and "reaches" in err, err
    assert out == ""


def test_every_draw_of_the_selection_audit_is_fresh_and_on_neighbouring_scores():
    """Each selection the audit counts is one fresh draw of the real selector, k = 1: the four
    batches (choose u, choose u', evaluate u, evaluate u') take rounds 1, 2, … in turn, so no
    two share a (round, client) — the key of the noise generator. The scores are the two
    neighbours u = [1, 0, 0], u' = [0, 1, 1]: every slot's score moves by at most 1."""
    seen = []

    def select_slots(scores, k, task):
        seen.append((task.round, task.client_id, k, tuple(scores.reshape(-1).tolist())))
        return (torch.arange(scores.shape[1]) == len(seen) % 3).reshape(1, -1)

    f = SimpleNamespace(strategy=SimpleNamespace(select_slots=select_slots))
    choose, draws = 51, 71  # odd: an offset that adds by "|" or "^" would show
    audit_selection(f, (choose, draws), 0.05)
    u, v = (1.0, 0.0, 0.0), (0.0, 1.0, 1.0)
    want = [u] * choose + [v] * choose + [u] * draws + [v] * draws
    assert seen == [(r, 0, 1, s) for r, s in enumerate(want, start=1)]


@pytest.mark.parametrize("mechanism", ["gaussian", "laplace"])
def test_the_noise_audit_draws_four_independent_samples(monkeypatch, mechanism):
    """The threshold is chosen on one pair of samples and the bound evaluated on another, and
    no two of the four share a draw (the alternatives are the canary's shift of their own)."""
    f = federation("fl-lora", 0)
    f.wrap("local", mechanism, 2.0, None)
    seen = []
    monkeypatch.setattr(audit, "threshold_audit",
                        lambda *a: seen.append(a[:4]) or (0.0, 0.0, 0.0))
    audit.audit_noise(f, "local", mechanism, 500, 1e-5, 0.05, rng_seed=0)
    null, alt, null_e, alt_e = seen[0]
    if mechanism == "gaussian":  # alternatives: a fresh null draw shifted by μ = ‖d‖
        d, _ = audit.neighbours(f, "local")
        alt, alt_e = alt - float(d.norm()), alt_e - float(d.norm())
    else:  # the Laplace likelihood-ratio statistic Σ |x| − |x − d| lies within ±Σ |d|
        d, _ = audit.neighbours(f, "local")
        for x in seen[0]:
            assert np.abs(x).max() <= float(d.abs().sum()) + 1e-9
    samples = [null, alt, null_e, alt_e]
    assert all(len(x) == 500 for x in samples)
    for i in range(4):
        for j in range(i + 1, 4):
            assert not np.allclose(np.sort(samples[i]), np.sort(samples[j])), (i, j)


def test_the_canary_is_the_strategys_reference_plus_the_change():
    """The audit's canary upload carries ``values = reference + change`` (what the strategy's
    own clip bounds is the change), here for FlexLoRA, whose reference is not zero."""
    f = federation("flexlora", 0)
    s = f.wrap("local", "gaussian", 1.0, None)
    task, like = f.raw
    ref = s.upload_reference(task, like)
    assert ref is not None and float(ref.abs().max()) > 0
    change = torch.linspace(-1, 1, like.values.numel()).to(like.values.dtype)
    u = _with_change(f, task, like, 0, change)
    assert torch.allclose(u.values, ref + change)
    assert (u.client_id, u.num_examples) == (0, f.contexts[0].num_examples)


class _Recorder:
    """Fakes of the audit's sampling (``federation``, ``audit_noise``, ``audit_selection``)
    that record what :func:`run_audit` asks of them and answer a chosen lower bound."""

    def __init__(self, monkeypatch, noise_lb: float = 0.5, selection_lb: float = 1.0):
        self.feds, self.wraps, self.noise, self.selection = [], [], [], []
        rec = self

        class Fed:
            def __init__(self, name, seed):
                rec.feds.append((name, seed))
                self.strategy = None

            def wrap(self, mode, mech, z, plant):
                rec.wraps.append((mode, mech, z, plant))
                self.strategy = SimpleNamespace(plan=SimpleNamespace(release_epsilon=lambda: 0.5))
                return self.strategy

        def audit_noise(f, mode, mech, draws, delta, alpha, rng_seed):
            rec.noise.append((mode, mech, draws, delta, alpha, rng_seed))
            return noise_lb, 0.1, 0.2

        def audit_selection(f, draws, alpha):
            rec.selection.append((draws, alpha))
            return selection_lb, 0.3, 0.4

        monkeypatch.setattr(audit, "federation", Fed)
        monkeypatch.setattr(audit, "audit_noise", audit_noise)
        monkeypatch.setattr(audit, "audit_selection", audit_selection)


def test_an_audit_records_its_draws_confidence_and_noise_per_row(monkeypatch):
    """The bookkeeping of :func:`run_audit` around the sampling (faked here): the draws a row
    took (the evaluation half of a selection audit's), a full audit's draws by default and the
    quick one's on ``quick``, Bonferroni's α per row, each row's own noise multiplier, one
    model per strategy, and ``ok`` up to and including a bound equal to the claim."""
    a5, a3 = pytest.approx(0.05 / 5, rel=1e-12), pytest.approx(0.05 / 3, rel=1e-12)
    rec = _Recorder(monkeypatch)
    rows = run_audit(["lora-a2"], None, None, seed=3, delta=1e-6)
    plan = planned_rows(["lora-a2"], None, None)
    assert [(r.strategy, r.mode, r.mechanism) for r in rows] == plan and len(plan) == 5
    assert rec.feds == [("lora-a2", 3)]
    assert rec.selection == [((10_000, 40_000), a5)]
    assert [(m, d, dl, a) for _, m, d, dl, a, _ in rec.noise] == [
        (m, 2_000_000, 1e-6, a5) for _, _, m in plan if m != "selection"]
    assert [r.draws for r in rows] == [40_000 if m == "selection" else 2_000_000
                                       for _, _, m in plan]
    assert [z for _, _, z, _ in rec.wraps] == [
        DEFAULT_Z.get((m, md), DEFAULT_Z[("gaussian", md)]) for _, md, m in plan]
    for r in rows:
        assert r.confidence == pytest.approx(1 - 0.05 / 5, rel=1e-12)
        claimed = SELECTION_EPSILON if r.mechanism == "selection" else 0.5
        assert (r.claimed_epsilon, r.lower_bound, r.verdict) == (claimed, claimed, "ok")
        assert (r.fpr, r.fnr) == ((0.3, 0.4) if r.mechanism == "selection" else (0.1, 0.2))

    rec = _Recorder(monkeypatch, noise_lb=0.5000001)
    rows = run_audit(["lora-a2"], ["local"], None, quick=True, noise_multiplier=0.5)
    assert rec.selection == [((2_000, 6_000), a3)]
    assert [d for _, _, d, _, _, _ in rec.noise] == [200_000, 200_000]
    assert [r.draws for r in rows] == [200_000, 200_000, 6_000]
    assert [z for _, _, z, _ in rec.wraps] == [0.5] * 3  # a z below 1 is a valid choice
    assert [r.verdict for r in rows] == ["VIOLATED", "VIOLATED", "ok"]


def test_every_row_of_every_audit_seed_draws_its_own_noise(monkeypatch):
    """No two rows share a noise stream, within one audit or across the audits of seeds 0–2
    (two audits at different seeds are independent evidence)."""
    streams = []
    for seed in range(3):
        rec = _Recorder(monkeypatch)
        run_audit(None, None, None, quick=True, seed=seed)
        streams.append([s for *_, s in rec.noise])
    assert len(streams[0]) > 20
    flat = [s for run in streams for s in run]
    assert len(set(flat)) == len(flat)


def test_the_audit_report_counts_the_rows_within_their_claim():
    ok = AuditRow("fl-lora", "local", "laplace", 1.0, 0.9, 0.99, 10, 0.1, 0.2, "ok")
    bad = AuditRow("fl-lora", "central", "laplace", 1.0, 1.9, 0.99, 10, 0.1, 0.2, "VIOLATED")
    out = report([ok, bad, ok], "half-noise", 12.5)
    assert (out["mechanisms"], out["within_claim"], out["plant"], out["wall_s"]) == (
        3, 2, "half-noise", 12.5)
    assert out["confidence_overall"] == 0.95 and out["rows"][1]["verdict"] == "VIOLATED"


def test_the_audit_json_reports_the_commands_own_wall_time(tmp_path, monkeypatch):
    _Recorder(monkeypatch, noise_lb=2.0)
    out = tmp_path / "a.json"
    t0 = time.perf_counter()
    code = audit.audit_command(["fl-lora"], ["local"], None, None, True, str(out), None)
    took = time.perf_counter() - t0
    data = json.loads(out.read_text())
    assert code == 1 and (data["mechanisms"], data["within_claim"]) == (2, 0)
    assert 0 <= data["wall_s"] <= took


@pytest.mark.parametrize("mode", ["local", "central"])
def test_a_plant_changes_only_what_it_names(mode):
    """``half-noise`` halves the noise scale (and nothing else does); every other plant keeps
    the honest wrapper's noise scales and its selection."""
    f = federation("fl-lora", 0)
    for z in (1.0, 3.0):
        honest = f.wrap(mode, "gaussian", z, None)
        scales = honest.local_noise_scale(), honest.central_noise_scale()
        for plant in PLANTS:
            s = f.wrap(mode, "gaussian", z, plant)
            got = s.local_noise_scale(), s.central_noise_scale()
            want = tuple(0.5 * x for x in scales) if plant == "half-noise" else scales
            assert got == want, (plant, z)
            if mode == "central":  # the server re-clips, unless the plant is not to
                task0, raw = f.raw
                big = _with_change(f, task0, raw, 0, torch.full_like(raw.values, 10 * CLIP))
                kept = torch.equal(s.server_clip(task0, big).values, big.values)
                assert kept == (plant == "no-server-clip"), plant


def test_the_tiny_federation_is_four_equal_clients_and_client_0s_round_1_upload():
    f = federation("fl-lora", 0)
    sizes = [c.num_examples for c in f.contexts]
    assert len(sizes) == 4 and len(set(sizes)) == 1 and sizes[0] >= 10
    task, raw = f.raw
    assert (task.round, task.client_id, raw.client_id) == (1, 0, 0)


@pytest.mark.parametrize("name", ["rolora", "lora-a2"])
def test_the_central_audit_reads_what_round_1_trains(name):
    """For a strategy whose trained factor alternates by round, the central audit compares the
    two neighbours' releases on the factor (and head) round 1 trains."""
    f = federation(name, 0)
    f.wrap("central", "gaussian", 1.0, None)
    inner = f.strategy.inner
    assert inner.active_factor(1) != inner.active_factor(2)
    names = f.runtime.layout.group_names([inner.active_factor(1)] + inner.head_groups())
    want = torch.cat([f.state.tensors[n].reshape(-1).double() for n in names])
    assert torch.equal(audit._flat(f, f.state), want)


def test_cli_exit_codes_and_json(tmp_path, capsys):
    out = tmp_path / "audit.json"
    # the arguments as a shell hands them over (strings made at run time, as sys.argv's)
    assert main(shlex.split(f"audit-privacy --quick --strategy fl-lora --mode local "
                            f"--mechanism laplace --json {out}")) == 0
    text = capsys.readouterr().out
    assert "1 of 1 mechanisms within their claimed ε" in text
    assert "planted bug" not in text  # an honest audit names no plant
    data = json.loads(out.read_text())
    assert data["within_claim"] == 1 and data["rows"][0]["verdict"] == "ok"
    # the same audit as the Python API's (seeded draws): the CLI's strings take the same path
    api = run_audit(["fl-lora"], ["local"], ["laplace"], quick=True)[0]
    assert data["rows"][0]["lower_bound"] == pytest.approx(api.lower_bound)
    assert main(["audit-privacy", "--quick", "--plant", "half-noise", "--strategy", "fl-lora",
                 "--mode", "local", "--mechanism", "laplace"]) == 1
    text = capsys.readouterr().out
    assert "0 of 1 mechanisms" in text
    assert text.splitlines()[0] == f"planted bug: half-noise — {PLANTS['half-noise']}"


@pytest.mark.parametrize("args,needle", [
    (["--plant", "no-noise"], "--plant"),
    (["--strategy", "hetlora", "--mode", "central"], "hetlora"),
    (["--strategy", "nope"], "unknown strategy"),
    (["--mode", "global"], "--mode"),
    (["--mechanism", "exponential"], "--mechanism"),
    (["--noise-multiplier", "0"], "--noise-multiplier"),
    (["--noise-multiplier", "-1"], "--noise-multiplier"),
    (["--json", "/no/such/folder/audit.json"], "--json"),  # before minutes of sampling
])
def test_bad_audit_input_is_one_line_exit_2(capsys, args, needle):
    assert main(["audit-privacy", "--quick", *args]) == 2
    out, err = capsys.readouterr()
    assert len(err.strip().splitlines()) == 1 and needle in err, err
    assert out == ""  # nothing printed before the error (an unknown plant printed "— ?")


def test_every_plant_is_named():
    assert set(PLANTS) >= {"half-noise", "no-server-clip", "renormalised-weights",
                           "gumbel-scale"}


def test_the_documented_audit_table_is_the_committed_outputs():
    """docs/PRIVACY.md's measured audit table quotes the committed `--json` outputs: each row's
    verdict count and lower-bound ranges (Gaussian and Laplace, local / central; selection)."""
    root = Path(__file__).parents[1]
    doc = (root / "docs" / "PRIVACY.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in doc.splitlines()
            if line.startswith("| honest") or line.startswith("| `--plant")}
    latest: dict[str, Path] = {}  # the newest dated output of each audit (names sort by date)
    for f in sorted((root / "benchmarks" / "results" / "audit").glob("quick-*-20*.json")):
        latest[f.name[len("quick-"):-len("-YYYY-MM-DD.json")]] = f
    assert set(latest) == {"honest", *PLANTS}
    files = list(latest.values())
    honest = json.loads(latest["honest"].read_text())

    def ranges(d, mech):
        out = []
        for mode in ("local", "central"):
            lb = [r["lower_bound"] for r in d["rows"] if r["mode"] == mode
                  and r["mechanism"] == mech]
            lo, hi = f"{min(lb):.2f}", f"{max(lb):.2f}"
            out.append(lo if lo == hi else f"{lo}–{hi}")
        return out

    for f in files:
        d = json.loads(f.read_text())
        name = "honest" if d["plant"] in (None, "", "none") else f"`--plant {d['plant']}`"
        cells = [c.strip() for c in rows[name].split("|")[2:-1]]
        assert cells[0] == f"{d['within_claim']} of {d['mechanisms']}", (f.name, cells)
        for col, mech in ((1, "gaussian"), (2, "laplace")):
            local, central = ranges(d, mech)
            if name != "honest" and [local, central] == ranges(honest, mech):
                want = "as honest"
            elif name != "honest" and local == ranges(honest, mech)[0]:
                want = f"as honest / {central}"
            else:
                want = f"{local} / {central}"
            assert cells[col] == want, (f.name, mech, cells)
        sel = [r["lower_bound"] for r in d["rows"] if r["mechanism"] == "selection"]
        assert cells[3] == f"{sel[0]:.2f}" or (name != "honest" and cells[3] == "as honest"
                                               and sel == [r["lower_bound"] for r in honest[
                                                   "rows"] if r["mechanism"] == "selection"])
        assert cells[4] == ("0" if d["within_claim"] == d["mechanisms"] else "1")
