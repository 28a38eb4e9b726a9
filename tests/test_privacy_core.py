"""The pure DP core (lora_a2.privacy) against values computed here independently: norms, clips,
noise, noise sources, the fixed-denominator estimator, the accountant and its plan. Fast (no
model), so mutation testing can run it per mutant (mutation/privacy.toml)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from lora_a2 import privacy as dp
from lora_a2.config import PrivacyConfig
from lora_a2.errors import UserError


# ---------------------------------------------------------------------- norms and clips
def test_norms_are_l1_for_laplace_l2_otherwise():
    v = torch.tensor([3.0, -4.0, 0.0])
    assert dp.norm_of(v, "laplace") == 7.0
    assert dp.norm_of(v, "gaussian") == 5.0
    assert dp.norm_of(v, "none") == 5.0


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=1, max_size=40), st.floats(1e-3, 10),
       st.sampled_from(["gaussian", "laplace"]))
def test_clip_bounds_the_norm_and_keeps_the_direction(xs, bound, mech):
    v = torch.tensor(xs, dtype=torch.float32)
    c = dp.clip(v, bound, mech)
    norm = dp.norm_of(v, mech)
    assert dp.norm_of(c, mech) <= bound
    if norm <= bound:
        assert torch.equal(c, v) and c is not v  # a copy, unchanged
    else:
        # the same direction, scaled to the bound (within float32 rounding)
        assert dp.norm_of(c, mech) == pytest.approx(bound, rel=1e-5)
        assert torch.allclose(c.double() * norm / bound, v.double(), rtol=1e-4, atol=1e-3)


def test_clip_of_zero_is_zero():
    z = torch.zeros(5)
    assert torch.equal(dp.clip(z, 1.0), z)


@pytest.mark.parametrize("mech", ["gaussian", "laplace"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_change_is_clipped_to_zero(mech, bad):
    """The clip holds on every input: a diverged client's change (NaN skipped the scaling, Inf
    turned it into NaN) is sent as zero, so its noised upload is pure noise."""
    v = torch.tensor([bad, 1.0, 2.0])
    out = dp.clip(v, 1.0, mech)
    assert torch.equal(out, torch.zeros(3))


# ---------------------------------------------------------------------- noise
def test_noise_draws_have_their_law():
    n = 200_000
    g = dp.noise(n, "gaussian", 2.0, torch.Generator().manual_seed(0)).double()
    assert abs(float(g.mean())) < 0.02
    assert float(g.std()) == pytest.approx(2.0, rel=0.01)
    lap = dp.noise(n, "laplace", 2.0, torch.Generator().manual_seed(1)).double()
    assert float(lap.abs().mean()) == pytest.approx(2.0, rel=0.01)  # E|X| = b
    assert float(lap.std()) == pytest.approx(2.0 * math.sqrt(2), rel=0.01)
    # Laplace tails: P(X > t) = e^(−t/b) / 2
    assert float((lap > 4.0).double().mean()) == pytest.approx(0.5 * math.exp(-2.0), rel=0.05)
    assert dp.gaussian_noise(7, 1.0, torch.Generator()).dtype == torch.float32
    assert dp.laplace_noise(7, 1.0, torch.Generator()).shape == (7,)
    with pytest.raises(ValueError, match="unknown mechanism"):
        dp.noise(3, "none", 1.0, torch.Generator())


def test_seeded_generators_are_reproducible_and_distinct_os_ones_are_fresh():
    def first(g):
        return torch.rand(4, generator=g)

    a = first(dp.noise_generator(7, 3, "server", "seeded"))
    assert torch.equal(a, first(dp.noise_generator(7, 3, "server", "seeded")))
    assert torch.equal(a, first(dp.noise_generator(7, 3, "server")))  # seeded by default
    for other in ((8, 3, "server"), (7, 4, "server"), (7, 3, 0), (7, 3, "select/0")):
        assert not torch.equal(a, first(dp.noise_generator(*other, "seeded")))
    # the seeded derivation is SHA-256 of "dp/seed/round/who", 63 bits
    import hashlib
    want = int.from_bytes(hashlib.sha256(b"dp/7/3/server").digest()[:8], "little") >> 1
    assert torch.equal(a, first(torch.Generator().manual_seed(want)))
    draws = {tuple(dp.gaussian_noise(4, 1.0, dp.noise_generator(7, 3, "server", "os")).tolist())
             for _ in range(5)}
    assert len(draws) == 5  # fresh OS randomness each time
    assert isinstance(dp.noise_generator(7, 3, "server", "os"), dp.OSRandom)
    with pytest.raises(ValueError, match="noise source"):
        dp.noise_generator(7, 3, "server", "urandom")


# ---------------------------------------------------------------------- the central estimator
@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 500), min_size=1, max_size=12), st.floats(0.05, 1.0),
       st.floats(1.0, 600.0))
def test_fixed_denominator_weights_match_dp_fedavg(pop, q, cap):
    w = [min(n / cap, 1.0) for n in pop]
    total = sum(w)
    got = dp.fixed_denominator_weights(pop, pop, q, cap)
    assert got == pytest.approx([x / (q * total) for x in w])
    assert dp.capped_weights(pop, cap) == pytest.approx(w)
    assert dp.central_sensitivity(1.5, pop, q, cap) == pytest.approx(1.5 / (q * total))
    # every client's weight is at most the sensitivity unit 1 / (qW)
    assert max(got) <= 1 / (q * total) * (1 + 1e-12)


def test_fixed_denominator_refuses_nonsense():
    with pytest.raises(ValueError, match="sample rate"):
        dp.fixed_denominator_weights([1], [1], 0.0, 1.0)
    with pytest.raises(ValueError, match="sample rate"):
        dp.fixed_denominator_weights([1], [1], 1.5, 1.0)
    with pytest.raises(ValueError, match="weight cap"):
        dp.capped_weights([1], 0.0)
    with pytest.raises(ValueError, match="no examples"):
        dp.fixed_denominator_weights([0], [0], 1.0, 1.0)
    assert dp.fixed_denominator_weights([3], [3, 3], 1.0, 3.0) == [0.5]  # q = 1 allowed


# ---------------------------------------------------------------------- accounting
def test_gaussian_epsilon_is_opacus_with_the_extended_orders():
    acc = RDPAccountant()
    acc.history = [(1.3, 1.0, 7)]
    assert dp.gaussian_epsilon(1.3, 7, 1e-5) == pytest.approx(
        acc.get_epsilon(1e-5, alphas=dp.rdp_alphas()), rel=1e-12)
    assert dp.gaussian_epsilon(1.3, 0, 1e-5) == 0.0
    alphas = dp.rdp_alphas()
    assert alphas[:len(RDPAccountant.DEFAULT_ALPHAS)] == list(RDPAccountant.DEFAULT_ALPHAS)
    assert alphas[-1] == 1024 and 64 in alphas


def test_laplace_composition():
    assert dp.laplace_epsilon(0.5, 0, 1e-5) == 0.0
    assert dp.laplace_epsilon(0.5, 3, 1e-5) == pytest.approx(1.5)  # basic wins
    e, T, d = 0.02, 5000, 1e-6
    adv = e * math.sqrt(2 * T * math.log(1 / d)) + T * e * math.expm1(e)
    assert dp.laplace_epsilon(e, T, d) == pytest.approx(adv) and adv < T * e
    assert dp.laplace_epsilon(800.0, 2, 1e-5) == 1600.0  # past e^ε's overflow: basic


def test_gaussian_with_selection_is_the_rdp_sum():
    orders = dp.rdp_alphas()
    z, T, rho, d = 1.7, 6, 0.03, 1e-5
    rdp = np.array(compute_rdp(q=1.0, noise_multiplier=z, steps=T, orders=orders)) + T * rho * \
        np.array(orders)
    assert dp.gaussian_with_selection_epsilon(z, T, rho, d) == pytest.approx(
        get_privacy_spent(orders=orders, rdp=rdp, delta=d)[0], rel=1e-12)
    assert dp.gaussian_with_selection_epsilon(z, 0, rho, d) == 0.0


def test_plan_epsilon_per_mode_and_selection():
    d = 1e-5
    local = dp.PrivacyPlan("gaussian", "local", 1.0, 3.0, d, 1.0, 4)
    central = dp.PrivacyPlan("gaussian", "central", 1.0, 3.0, d, 0.5, 4)
    assert local.sensitivity_factor == 2.0 and central.sensitivity_factor == 1.0
    assert local.epsilon(4) == pytest.approx(dp.gaussian_epsilon(1.5, 4, d))
    # no amplification by sampling (the sample is public): q = 0.5 is the estimator's alone
    assert central.epsilon(4) == pytest.approx(dp.gaussian_epsilon(3.0, 4, d))
    assert local.release_epsilon() == pytest.approx(dp.gaussian_epsilon(1.5, 1, d))
    assert central.release_epsilon() == pytest.approx(dp.gaussian_epsilon(3.0, 1, d))
    lap = dp.PrivacyPlan("laplace", "central", 1.0, 4.0, d, 0.5, 3)
    assert lap.epsilon(3) == pytest.approx(dp.laplace_epsilon(0.25, 3, d)) == 0.75
    assert lap.release_epsilon() == pytest.approx(0.25)
    assert dp.PrivacyPlan("laplace", "local", 1.0, 4.0, d, 1.0, 3).release_epsilon() == 0.5
    sel = dp.PrivacyPlan("laplace", "local", 1.0, 4.0, d, 1.0, 3, None, "private", 0.2)
    assert sel.private_selection and not local.private_selection
    assert sel.epsilon(3) == pytest.approx(dp.laplace_epsilon(0.5 + 0.2, 3, d))
    assert sel.selection_spent(3) == pytest.approx(dp.laplace_epsilon(0.2, 3, d))
    assert local.selection_spent(3) is None
    gsel = dp.PrivacyPlan("gaussian", "local", 1.0, 3.0, d, 1.0, 4, None, "private", 0.4)
    assert gsel.epsilon(4) == pytest.approx(dp.gaussian_with_selection_epsilon(
        1.5, 4, 0.4 ** 2 / 8, d))
    # a public selection's ε does not enter, whatever selection_epsilon says
    assert dp.PrivacyPlan("gaussian", "local", 1.0, 3.0, d, 1.0, 4, None, "public",
                          5.0).epsilon(4) == pytest.approx(local.epsilon(4))


def test_plan_summary_says_what_it_is():
    p = dp.PrivacyPlan("gaussian", "central", 0.5, 2.0, 1e-6, 0.25, 8, 3.0, "public", 0.0,
                       "seeded", 40.0)
    s = p.summary()
    assert s == {"mechanism": "gaussian", "mode": "central", "clip": 0.5, "noise_multiplier": 2.0,
                 "delta": 1e-6, "target_epsilon": 3.0,
                 "epsilon": p.epsilon(8),
                 # replacing a client's data: sensitivity 2C/(qW), the ε at z/2 = 1
                 "epsilon_replace_one": pytest.approx(dp.gaussian_epsilon(1.0, 8, 1e-6)),
                 "selection": "public",
                 "selection_epsilon_per_round": None, "selection_epsilon": None,
                 "noise_source": "seeded", "estimator": "fixed-denominator", "weight_cap": 40.0,
                 "estimator_sample_rate": 0.25, "amplification_by_sampling": False,
                 "guarantee_holds_against_config_holders": False}
    assert p.rebuildable
    q = dp.PrivacyPlan("laplace", "local", 1.0, 4.0, 1e-5, 1.0, 2, None, "private", 0.5, "os")
    t = q.summary()
    assert not q.rebuildable and t["guarantee_holds_against_config_holders"] is True
    assert t["estimator"] is None and t["weight_cap"] is None
    assert t["epsilon_replace_one"] is None  # local mode's ε already is against replacement
    # Laplace, central, one round: zero-out ε₀ = 1/z, replace-one 2/z
    lap = dp.PrivacyPlan("laplace", "central", 1.0, 4.0, 1e-5, 0.5, 1).summary()
    assert lap["epsilon"] == pytest.approx(0.25) and lap["epsilon_replace_one"] == \
        pytest.approx(0.5)
    assert t["estimator_sample_rate"] is None and t["amplification_by_sampling"] is False
    assert t["selection_epsilon_per_round"] == 0.5
    assert t["selection_epsilon"] == q.selection_spent(2)


def _cfg(**kw) -> PrivacyConfig:
    return PrivacyConfig(**kw)


def test_round_record_charges_every_release():
    assert dp.round_record(None, 3) == {}
    p = dp.PrivacyPlan("gaussian", "local", 1.0, 3.0, 1e-5, 1.0, 4)
    assert dp.round_record(p, 2) == {"epsilon": p.epsilon(2), "delta": 1e-5,
                                     "releases_charged": 2}
    assert dp.round_record(p, 2, extra_releases=3)["epsilon"] == p.epsilon(5)
    sel = dp.PrivacyPlan("laplace", "local", 1.0, 4.0, 1e-5, 1.0, 4, None, "private", 0.5)
    assert dp.round_record(sel, 2, 1)["selection_epsilon"] == sel.selection_spent(3)


def _fresh(s: str) -> str:
    """An equal string that is not the interned literal (as a value parsed from a config
    file is): ``is`` would tell it apart, ``==`` does not."""
    return "".join(list(s))


def test_names_are_compared_by_value():
    sel = dp.PrivacyPlan("laplace", "local", 1.0, 4.0, 1e-5, 1.0, 3, None, _fresh("private"),
                         0.2, _fresh("seeded"))
    assert sel.private_selection and sel.rebuildable
    assert sel.sensitivity_factor == 2.0
    central = dp.PrivacyPlan(_fresh("gaussian"), _fresh("central"), 1.0, 3.0, 1e-5, 1.0, 4)
    assert central.sensitivity_factor == 1.0
    assert central.epsilon(4) == pytest.approx(dp.gaussian_epsilon(3.0, 4, 1e-5))
    assert central.summary()["estimator"] == "fixed-denominator"
    assert central.summary()["estimator_sample_rate"] == 1.0
    p = dp.resolve(_cfg(mechanism=_fresh("gaussian"), mode=_fresh("local"), epsilon=4.0), 6, 1.0)
    assert p.noise_multiplier == pytest.approx(2 * dp.calibrate_gaussian(4.0, 6, 1e-5))
    assert dp.norm_of(torch.tensor([3.0, -4.0]), _fresh("laplace")) == 7.0
    g = dp.noise(50_000, _fresh("gaussian"), 1.0, torch.Generator().manual_seed(3))
    assert float(g.double().std()) == pytest.approx(1.0, rel=0.03)
    lap = dp.noise(50_000, _fresh("laplace"), 1.0, torch.Generator().manual_seed(3))
    assert float(lap.double().abs().mean()) == pytest.approx(1.0, rel=0.03)
    assert isinstance(dp.noise_generator(1, 1, 0, _fresh("os")), dp.OSRandom)


def test_no_round_spends_nothing_and_a_negative_count_too():
    for steps in (0, -1, -5):
        assert dp.gaussian_epsilon(1.0, steps, 1e-5) == 0.0
        assert dp.laplace_epsilon(1.0, steps, 1e-5) == 0.0
        assert dp.gaussian_with_selection_epsilon(1.0, steps, 0.1, 1e-5) == 0.0


# ---------------------------------------------------------------------- calibration (slow: last)
@pytest.mark.parametrize("target,steps", [(2.0, 5), (6.0, 20), (3.0, 1)])
def test_calibration_reaches_its_target_from_below(target, steps):
    z = dp.calibrate_gaussian(target, steps, 1e-5)
    assert dp.gaussian_epsilon(z, steps, 1e-5) <= target * 1.005
    assert dp.gaussian_epsilon(z * 0.97, steps, 1e-5) > target  # the least z that reaches it
    e0 = dp.calibrate_laplace(target, steps, 1e-5)
    assert dp.laplace_epsilon(e0, steps, 1e-5) <= target
    assert dp.laplace_epsilon(e0 * 1.01, steps, 1e-5) > target


def test_resolve_gives_the_plan_of_the_config():
    assert dp.resolve(_cfg(), 5, 1.0) is None
    p = dp.resolve(_cfg(mechanism="gaussian", mode="central", noise_multiplier=1.5, clip=0.3,
                        delta=1e-6, noise_source="seeded", weight_cap=7.0), 5, 0.4)
    assert (p.mechanism, p.mode, p.clip, p.noise_multiplier, p.delta, p.sample_rate, p.rounds,
            p.noise_source, p.weight_cap, p.target_epsilon) == (
        "gaussian", "central", 0.3, 1.5, 1e-6, 0.4, 5, "seeded", 7.0, None)
    loc = dp.resolve(_cfg(mechanism="gaussian", mode="local", noise_multiplier=1.5), 5, 0.4)
    assert loc.sample_rate == 1.0  # local mode has no estimator q
    # a target ε: the Gaussian calibrated (local: twice Opacus' z, replace-one), Laplace 1/ε₀
    g = dp.resolve(_cfg(mechanism="gaussian", mode="local", epsilon=4.0), 6, 1.0)
    assert g.noise_multiplier == pytest.approx(2 * dp.calibrate_gaussian(4.0, 6, 1e-5))
    assert g.epsilon(6) == pytest.approx(4.0, abs=0.03) and g.target_epsilon == 4.0
    c = dp.resolve(_cfg(mechanism="laplace", mode="central", epsilon=3.0), 6, 0.5)
    # central at q = 0.5: calibrated as at q = 1 (no amplification), ε₀ = 3 / 6 → z = 2
    assert c.noise_multiplier == pytest.approx(1 / dp.calibrate_laplace(3.0, 6, 1e-5)) == 2.0
    lo = dp.resolve(_cfg(mechanism="laplace", mode="local", epsilon=3.0), 6, 0.5)
    assert lo.noise_multiplier == pytest.approx(2 / dp.calibrate_laplace(3.0, 6, 1e-5))
    s = dp.resolve(_cfg(mechanism="laplace", mode="local", epsilon=3.0, selection="private",
                        selection_epsilon=0.1), 6, 1.0)
    assert s.epsilon(6) == pytest.approx(3.0, rel=1e-3) and s.epsilon(6) <= 3.0 * (1 + 1e-9)


def test_an_unreachable_target_is_a_one_line_error():
    with pytest.raises(UserError, match="not reachable") as e:
        dp.resolve(_cfg(mechanism="laplace", mode="local", epsilon=1.0, selection="private",
                        selection_epsilon=1.0), 5, 1.0)
    assert "\n" not in str(e.value)
    # a target Opacus cannot calibrate (its ValueError), and one whose per-round Laplace
    # budget underflows to 0 (an infinite noise scale): one line each, naming the key
    for mechanism, eps, why in (("gaussian", 1e-3, "budget is too low"),
                                ("laplace", 1e-300, "underflows to 0")):
        with pytest.raises(UserError, match=f"privacy.epsilon.*cannot be reached.*{why}") as e:
            dp.resolve(_cfg(mechanism=mechanism, mode="local", epsilon=eps), 5, 1.0)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("mode", ["local", "central"])
@pytest.mark.parametrize("z", [1e-300, 1e-200, 1e-160])  # ÷0, ÷0, ε = inf
def test_a_noise_multiplier_the_accountant_cannot_account_is_a_one_line_error(mode, z):
    """Opacus divides by zero (or overflows) at such a z: found when the plan resolves —
    before the run starts — not in round 1's ε, after the old run folder was replaced."""
    with pytest.raises(UserError, match=r"privacy.noise_multiplier.*finite ε") as e:
        dp.resolve(_cfg(mechanism="gaussian", mode=mode, noise_multiplier=z), 5, 1.0)
    assert "\n" not in str(e.value)
    ok = dp.resolve(_cfg(mechanism="gaussian", mode=mode, noise_multiplier=1e-10), 5, 1.0)
    assert math.isfinite(ok.epsilon(5)) and ok.epsilon(5) > 1e15  # extreme, but a number


def test_a_laplace_target_gives_the_noise_multiplier_of_its_per_round_budget():
    # one round at ε = 0.7: ε₀ = 0.7, so z = 2 / 0.7 locally (replace-one), 1 / 0.7 centrally
    assert dp.resolve(_cfg(mechanism="laplace", mode="local", epsilon=0.7), 1, 1.0
                      ).noise_multiplier == pytest.approx(2 / 0.7, rel=1e-9)
    assert dp.resolve(_cfg(mechanism="laplace", mode="central", epsilon=0.7), 1, 0.5
                      ).noise_multiplier == pytest.approx(1 / 0.7, rel=1e-9)


def test_one_round_is_one_mechanism():
    """steps = 1 against values computed here: Opacus' RDP for one Gaussian step, ε₀ for one
    Laplace round, the RDP sum for one round with the selection."""
    acc = RDPAccountant()
    acc.history = [(2.0, 1.0, 1)]
    one = dp.gaussian_epsilon(2.0, 1, 1e-5)
    assert one > 0 and one == pytest.approx(acc.get_epsilon(1e-5, alphas=dp.rdp_alphas()),
                                            rel=1e-12)
    assert dp.laplace_epsilon(0.5, 1, 1e-5) == pytest.approx(0.5)
    orders = dp.rdp_alphas()
    rdp = np.array(compute_rdp(q=1.0, noise_multiplier=2.0, steps=1, orders=orders)) + 0.05 * \
        np.array(orders)
    assert dp.gaussian_with_selection_epsilon(2.0, 1, 0.05, 1e-5) == pytest.approx(
        get_privacy_spent(orders=orders, rdp=rdp, delta=1e-5)[0], rel=1e-12)


def test_estimator_refuses_negative_rates_and_counts():
    with pytest.raises(ValueError, match="sample rate"):
        dp.fixed_denominator_weights([1], [1], -0.5, 1.0)
    with pytest.raises(ValueError, match="no examples"):
        dp.fixed_denominator_weights([1], [-3], 1.0, 1.0)


def test_plan_defaults_and_a_fresh_private_selection():
    p = dp.PrivacyPlan("gaussian", "central", 1.0, 2.0, 1e-5, 1.0, 3)
    assert p.weight_cap == 0.0 and p.summary()["weight_cap"] == 0.0  # 0 = the largest client
    assert p.noise_source == "os" and p.selection == "public"
    s = dp.resolve(_cfg(mechanism="laplace", mode="local", epsilon=3.0,
                        selection=_fresh("private"), selection_epsilon=0.1), 6, 1.0)
    assert s.private_selection and s.epsilon(6) == pytest.approx(3.0, rel=1e-3)


def test_laplace_calibration_of_one_round_is_the_target_itself():
    """One release spends its ε₀: the calibration returns the target, also above the initial
    bracket's 1 (no sampling, nothing amplified)."""
    for target in (0.3, 1.0, 7.5):
        assert dp.calibrate_laplace(target, 1, 1e-5) == pytest.approx(target, rel=1e-12)


def test_invalid_noise_sources_are_refused_whatever_their_spelling():
    for bad in ("kernel", "abc", "zzz", "OS"):
        with pytest.raises(ValueError, match="noise source"):
            dp.noise_generator(1, 1, 0, bad)
    a = torch.rand(3, generator=dp.noise_generator(1, 1, 0, _fresh("seeded")))
    assert torch.equal(a, torch.rand(3, generator=dp.noise_generator(1, 1, 0, "seeded")))
    with pytest.raises(ValueError, match="weight cap"):
        dp.capped_weights([1], -1.0)


def test_advanced_composition_at_a_large_delta():
    e, T, d = 0.02, 5000, 0.3
    adv = e * math.sqrt(2 * T * math.log(1 / d)) + T * e * math.expm1(e)
    assert dp.laplace_epsilon(e, T, d) == pytest.approx(adv, rel=1e-12)


def test_plans_are_frozen_and_their_defaults_documented():
    import dataclasses

    p = dp.PrivacyPlan("gaussian", "central", 1.0, 2.0, 1e-5, 1.0, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.clip = 2.0  # type: ignore[misc]
    assert p.selection_epsilon == 0.0 and p.target_epsilon is None
    fresh = dp.PrivacyPlan("gaussian", _fresh("central"), 1.0, 2.0, 1e-5, 1.0, 3,
                           weight_cap=5.0)
    assert fresh.summary()["weight_cap"] == 5.0
    assert dp.resolve(_cfg(mechanism=_fresh("none")), 3, 1.0) is None
    loc = dp.resolve(_cfg(mechanism="gaussian", mode=_fresh("local"), noise_multiplier=1.0),
                     3, 0.4)
    assert loc.sample_rate == 1.0


def test_private_selection_calibrates_a_small_noise_multiplier():
    """A large target leaves the upload noise below z = 1: the search must go below its
    starting bracket."""
    s = dp.resolve(_cfg(mechanism="laplace", mode="local", epsilon=30.0, selection="private",
                        selection_epsilon=0.1), 2, 1.0)
    assert s.noise_multiplier < 1 and s.epsilon(2) == pytest.approx(30.0, rel=1e-3)
    assert s.epsilon(2) <= 30.0 * (1 + 1e-9)


def test_os_noise_has_no_seed_to_search():
    """torch's CPU generator keeps only 32 bits of its seed (why "os" noise does not use one):
    an adversary could try every seed. OSRandom draws from os.urandom, with the right laws."""
    same = [torch.rand(3, generator=torch.Generator().manual_seed(s)) for s in (5, 5 + 2 ** 32)]
    assert torch.equal(*same)  # the reason, pinned: if torch changes, this says so
    g = dp.OSRandom()
    u = g.uniform(200_000)
    assert u.dtype == torch.float64 and float(u.min()) > 0 and float(u.max()) < 1
    assert float(u.mean()) == pytest.approx(0.5, abs=0.005)
    assert float(u.var()) == pytest.approx(1 / 12, rel=0.02)
    z = dp.gaussian_noise(200_000, 2.0, g).double()
    assert abs(float(z.mean())) < 0.02 and float(z.std()) == pytest.approx(2.0, rel=0.01)
    assert float((z.abs() > 4.0).double().mean()) == pytest.approx(0.0455, rel=0.06)  # 2σ tails
    lap = dp.laplace_noise(200_000, 2.0, g).double()
    assert float(lap.abs().mean()) == pytest.approx(2.0, rel=0.01)
    assert float((lap > 4.0).double().mean()) == pytest.approx(0.5 * math.exp(-2.0), rel=0.05)
    from lora_a2.selection import private_top_k
    sel = private_top_k(torch.tensor([[1.0, 0.0, 0.0]]), 1, 1.0, g)
    assert int(sel.sum()) == 1


def test_os_noise_is_a_function_of_fresh_os_bytes_alone(monkeypatch):
    """Every OS draw is computed from 8 bytes of ``os.urandom`` per uniform, read at the draw
    (no seed in between: a generator seeded from 8 OS bytes would draw just as fresh and
    well-distributed numbers, yet leave 2³² seeds to search). With the bytes recorded, each
    draw is rebuilt here from them alone."""
    reads: list[bytes] = []
    rng = np.random.default_rng(11)

    def urandom(n: int) -> bytes:
        b = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        reads.append(b)
        return b

    monkeypatch.setattr(dp.os, "urandom", urandom)

    def uniforms(b: bytes) -> torch.Tensor:  # 53 high bits of each little-endian uint64
        words = [int.from_bytes(b[i:i + 8], "little") >> 11 for i in range(0, len(b), 8)]
        return torch.tensor([(w + 0.5) * 2.0 ** -53 for w in words], dtype=torch.float64)

    g = dp.OSRandom()
    u = g.uniform(5)
    assert [len(r) for r in reads] == [40] and torch.equal(u, uniforms(reads[-1]))
    z = dp.gaussian_noise(4, 2.0, g)
    assert len(reads[-1]) == 64
    v = uniforms(reads[-1])
    box_muller = torch.sqrt(-2 * torch.log(v[:4])) * torch.cos(2 * math.pi * v[4:]) * 2.0
    assert torch.equal(z, box_muller.to(torch.float32))
    lap = dp.laplace_noise(3, 0.5, g)
    e = -torch.log(uniforms(reads[-1])).reshape(2, 3)
    assert len(reads[-1]) == 48 and torch.equal(lap, ((e[0] - e[1]) * 0.5).to(torch.float32))
    assert len(reads) == 3


def test_mode_and_mechanism_names_by_value_in_the_plan():
    loc = dp.PrivacyPlan(_fresh("gaussian"), _fresh("local"), 1.0, 3.0, 1e-5, 1.0, 2)
    assert loc.sensitivity_factor == 2.0
    assert loc.release_epsilon() == pytest.approx(dp.gaussian_epsilon(1.5, 1, 1e-5))
