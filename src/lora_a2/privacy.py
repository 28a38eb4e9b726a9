"""Client-level differential privacy, the pure part: clipping, noise, the central estimator's
weights, calibration and accounting. No strategy, no engine, no I/O: the DP wrapper
(:class:`lora_a2.private.PrivateStrategy`) and the auditor (:mod:`lora_a2.audit`) both call
these functions. docs/PRIVACY.md has the trust model of each mode.

Mechanisms and sensitivities
----------------------------
``privacy.clip`` = C bounds the norm of each client's transmitted change: the **L2** norm for
``gaussian``; the **L1** norm for ``laplace`` (the Laplace mechanism is ε-DP with respect to
L1 sensitivity; an L2 clip would only bound L1 by √d·C). ``privacy.noise_multiplier`` = z sets
the noise scale relative to the sensitivity unit:

- ``local``: std (Laplace: scale) z·C on every sent value; neighbours replace one client's
  update (+C against −C), so the sensitivity is 2C: multiplier z/2, Laplace ε₀ = 2/z per round,
  sampling rate 1 (the server picks who takes part), every round counted.
- ``central``: the fixed-denominator estimator of DP-FedAvg (McMahan, Ramage, Talwar, Zhang,
  ICLR 2018; :func:`fixed_denominator_weights`) moves by at most C/(qW)
  (:func:`central_sensitivity`) when one client's update is replaced by zero (zero-out
  neighbours: the release shows who replied, so "present or absent" is not what it hides);
  std (Laplace: scale) z·C/(qW) on every entry the round can change: multiplier z, Laplace
  ε₀ = 1/z per round, every round counted at sampling rate 1. Against replacing one client's
  data with any other (2C/(qW)) it is the ε at z/2, reported as ``epsilon_replace_one``.
  No amplification by sampling is claimed: amplification needs the sample hidden from the
  adversary, and here who takes part is public (a fixed-size sample drawn from the seed in the
  released config, and listed in every released round).

Accounting
----------
Every release is counted at sampling rate 1 in both modes (no amplification, above). Gaussian:
Opacus' RDP accountant (its orders extended to 1024), ``steps`` = releases so far. Laplace: per
round pure ε₀, composed over T rounds by the better of basic composition (T·ε₀, δ = 0) and
advanced composition (Dwork–Rothblum–Vadhan: ε₀√(2T ln(1/δ)) + T·ε₀(e^ε₀ − 1), δ). The ε reported is the *total* over the releases so far,
not per round (the paper reports ε ∈ {6, 3, 1} for its Laplace runs without saying how it
composes). A target ``privacy.epsilon`` is turned into z by calibration so that the planned
``train.rounds`` reach it (Opacus' ``get_noise_multiplier`` for Gaussian, bisection for Laplace).
Private slot selection (LoRA-A2) is ε_sel-DP and (ε_sel²/8)-zCDP per round and composes with the
upload noise (:meth:`PrivacyPlan.epsilon`).

Noise
-----
Every draw takes a generator from :func:`noise_generator`: :class:`OSRandom`, uniforms read
from the OS CSPRNG with no seed (``noise_source = "os"``, the default), or a torch generator
derived from (seed, round, who) (``"seeded"``: reproducible, and therefore rebuildable by
whoever holds the config).
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .config import MECHANISMS, MODES, NOISE_SOURCES  # noqa: F401  (re-exported: the schema)
from .errors import UserError



# ---------------------------------------------------------------------- pure mechanisms
def norm_of(values: Tensor, mechanism: str) -> float:
    """The norm the clip bounds: L1 for Laplace, L2 otherwise (computed in float64)."""
    v = values.double()
    return float(v.abs().sum() if mechanism == "laplace" else torch.linalg.vector_norm(v))


def clip(values: Tensor, bound: float, mechanism: str = "gaussian") -> Tensor:
    """``values`` scaled down so that their L2 (Laplace: L1) norm is at most ``bound``. A
    non-finite one (a client whose training diverged) becomes zero: NaN skipped the scaling and
    Inf made NaN of it, so the noised upload told which client and coordinate overflowed."""
    norm = norm_of(values, mechanism)
    if not math.isfinite(norm):
        return torch.zeros_like(values)
    if norm <= bound or norm == 0.0:
        return values.clone()
    out = (values.double() * (bound / norm)).to(values.dtype)
    # float32 rounding may overshoot the bound by an ulp; shrink once more if it did.
    if norm_of(out, mechanism) > bound:
        out = (out.double() * (1 - 1e-6)).to(values.dtype)
    return out


class OSRandom:
    """Uniform draws straight from the operating system's CSPRNG (``os.urandom``).

    torch's CPU generator keeps only the low 32 bits of its seed (``manual_seed(s)`` and
    ``manual_seed(s + 2**32)`` draw the same numbers), so a generator seeded from the OS would
    let an adversary try all 2³² seeds and subtract the noise; these draws have no seed at all.
    """

    def uniform(self, n: int) -> Tensor:
        """``n`` i.i.d. uniform draws in (0, 1), float64 (53 random bits each)."""
        raw = np.frombuffer(os.urandom(8 * n), dtype=np.uint64) >> np.uint64(11)
        return torch.from_numpy((raw.astype(np.float64) + 0.5) * 2.0 ** -53)


Generator = torch.Generator | OSRandom


def gaussian_noise(n: int, std: float, generator: Generator) -> Tensor:
    """``n`` i.i.d. N(0, std²) draws (float32); from the OS by Box–Muller for an
    :class:`OSRandom`."""
    if isinstance(generator, OSRandom):
        u = generator.uniform(2 * n)
        z = torch.sqrt(-2.0 * torch.log(u[:n])) * torch.cos(2.0 * math.pi * u[n:])
        return z.mul_(std).to(torch.float32)
    return torch.randn(n, generator=generator, dtype=torch.float64).mul_(std).to(torch.float32)


def laplace_noise(n: int, scale: float, generator: Generator) -> Tensor:
    """``n`` i.i.d. Laplace(0, scale) draws: the difference of two Exp(1) draws, times scale."""
    if isinstance(generator, OSRandom):
        u = generator.uniform(2 * n)
        e = -torch.log(u).reshape(2, n)
    else:
        e = torch.empty(2, n, dtype=torch.float64).exponential_(generator=generator)
    return ((e[0] - e[1]) * scale).to(torch.float32)


def noise(n: int, mechanism: str, scale: float, generator: Generator) -> Tensor:
    if mechanism == "gaussian":
        return gaussian_noise(n, scale, generator)
    if mechanism == "laplace":
        return laplace_noise(n, scale, generator)
    raise ValueError(f"unknown mechanism {mechanism!r}")


def noise_generator(seed: int, rnd: int, who: int | str, source: str = "seeded"
                    ) -> Generator:
    """The generator of one noise draw (round ``rnd``, a client id, ``'server'`` or
    ``'select/<client>'``).

    ``source = "os"``: an :class:`OSRandom` — every draw comes from the OS CSPRNG, so it cannot
    be rebuilt from anything the run writes or sends. ``"seeded"``: a torch generator derived
    from (seed, round, who) by SHA-256, reproducible — and so rebuildable by anyone with the
    seed.
    """
    if source == "os":
        return OSRandom()
    if source != "seeded":
        raise ValueError(f"unknown noise source {source!r}")
    digest = hashlib.sha256(f"dp/{seed}/{rnd}/{who}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


# ---------------------------------------------------------------------- central estimator
def capped_weights(num_examples: Sequence[int], cap: float) -> list[float]:
    """DP-FedAvg's per-client weights w_k = min(n_k / ŵ, 1) (McMahan et al., ICLR 2018, §2)."""
    if cap <= 0:
        raise ValueError(f"weight cap must be > 0, got {cap}")
    return [min(float(n) / cap, 1.0) for n in num_examples]


def fixed_denominator_weights(num_examples: Sequence[int], population: Sequence[int],
                              sample_rate: float, cap: float) -> list[float]:
    """The weights of DP-FedAvg's fixed-denominator estimator (McMahan et al., ICLR 2018):
    Δ = Σ_{k in round} w_k Δ_k / (q W), with w_k = min(n_k / ŵ, 1) and W = Σ_{all clients} w_j.

    The denominator q·W is the *expected* total weight of a round, fixed before the round, so
    zeroing one client's update moves Δ by at most ‖w_k Δ_k‖ / (qW) ≤ C / (qW) whatever the
    others sent or who replied (:func:`central_sensitivity`). With ŵ = the largest client's
    count these are the data weights n_k / Σ_j n_j in expectation (they sum to 1 when every
    sampled client replies under full participation); a dropout shrinks the round's step
    instead of re-weighting the others.
    """
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample rate must be in (0, 1], got {sample_rate}")
    total = sum(capped_weights(population, cap))
    if total <= 0:
        raise ValueError("the population holds no examples")
    return [w / (sample_rate * total) for w in capped_weights(num_examples, cap)]


def central_sensitivity(clip: float, population: Sequence[int], sample_rate: float,
                        cap: float) -> float:
    """Add/remove-one-client sensitivity of the fixed-denominator estimator: C / (q W) (the
    removed client's weight is at most 1 after the cap)."""
    return clip / (sample_rate * sum(capped_weights(population, cap)))


# ---------------------------------------------------------------------- accounting
#: RDP orders: Opacus' default grid (up to 63) extended, so that large noise multipliers
#: (local mode, small ε) find their optimal order instead of a loose bound at the grid's end
EXTRA_ALPHAS = [64, 80, 96, 128, 160, 192, 256, 384, 512, 768, 1024]


def rdp_alphas() -> list[float]:
    from opacus.accountants import RDPAccountant

    return list(RDPAccountant.DEFAULT_ALPHAS) + EXTRA_ALPHAS


def gaussian_epsilon(noise_multiplier: float, steps: int, delta: float) -> float:
    """ε after ``steps`` Gaussian mechanisms (Opacus' RDP accountant at sampling rate 1: no
    amplification, see the module docstring)."""
    from opacus.accountants import RDPAccountant

    if steps <= 0:
        return 0.0
    acc = RDPAccountant()
    acc.history = [(noise_multiplier, 1.0, steps)]
    with quiet_alpha_range():
        return float(acc.get_epsilon(delta, alphas=rdp_alphas()))


@contextmanager
def quiet_alpha_range():
    """Silence Opacus' "optimal order is the largest/smallest alpha" at extreme ε: the bound it
    returns is still a valid upper bound, only looser, and the user has no alpha to change."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
        yield


def laplace_epsilon(eps0: float, steps: int, delta: float) -> float:
    """ε after ``steps`` ε₀-DP rounds: min(basic, advanced composition at δ)."""
    if steps <= 0:
        return 0.0
    basic = steps * eps0
    if eps0 > 700:  # advanced composition's e^ε overflows, and is far above basic's T·ε there
        return basic
    advanced = (eps0 * math.sqrt(2 * steps * math.log(1 / delta))
                + steps * eps0 * math.expm1(eps0))
    return min(basic, advanced)


def calibrate_gaussian(target_epsilon: float, steps: int, delta: float) -> float:
    """Smallest noise multiplier reaching ``target_epsilon`` after ``steps`` (Opacus, sampling
    rate 1)."""
    from opacus.accountants.utils import get_noise_multiplier

    with quiet_alpha_range():
        return float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                          sample_rate=1.0, steps=steps,
                                          accountant="rdp", epsilon_tolerance=0.005,
                                          alphas=rdp_alphas()))


def calibrate_laplace(target_epsilon: float, steps: int, delta: float) -> float:
    """Largest per-round ε₀ whose composition over ``steps`` stays ≤ ``target_epsilon``.

    The bracket [0, max(1, target)] holds it: from ε₀ ≥ 1 advanced composition exceeds basic
    (T·ε₀(e^ε₀ − 1) > T·ε₀), so the composed ε there is T·ε₀ ≥ the target."""
    lo, hi = 0.0, max(1.0, target_epsilon)
    for _ in range(100):
        mid = (lo + hi) / 2
        if laplace_epsilon(mid, steps, delta) <= target_epsilon:
            lo = mid
        else:
            hi = mid
    return lo


# ---------------------------------------------------------------------- the run's plan
def gaussian_with_selection_epsilon(noise_multiplier: float, steps: int, rho_per_step: float,
                                    delta: float) -> float:
    """ε after ``steps`` rounds of a Gaussian mechanism (sampling rate 1) composed with a
    ρ-zCDP mechanism each round: RDP(α) = T·(α / (2σ²) + α·ρ), then Opacus' conversion."""
    from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

    if steps <= 0:
        return 0.0
    orders = rdp_alphas()
    rdp = compute_rdp(q=1.0, noise_multiplier=noise_multiplier, steps=steps, orders=orders)
    rdp = [r + steps * a * rho_per_step for r, a in zip(rdp, orders)]
    with quiet_alpha_range():
        return float(get_privacy_spent(orders=orders, rdp=rdp, delta=delta)[0])


@dataclass(frozen=True)
class PrivacyPlan:
    """The resolved DP settings of one run (see module docstring)."""

    mechanism: str
    mode: str
    clip: float
    noise_multiplier: float  # z: noise scale = z · sensitivity unit (see noise_scale)
    delta: float
    sample_rate: float  # q = clients per round / clients: the central estimator's qW (1 in
    # local mode); not the accountant's (it claims no amplification: every round counts)
    rounds: int
    target_epsilon: float | None = None
    selection: str = "public"  # LoRA-A2's slot ids: "public" (in the clear) or "private"
    selection_epsilon: float = 0.0  # private: pure ε of one client's selection per round
    noise_source: str = "os"  # "os" (secret) or "seeded" (rebuildable from the config)
    weight_cap: float = 0.0  # central: DP-FedAvg's ŵ; 0 = the largest client's count

    @property
    def sensitivity_factor(self) -> float:
        """Sensitivity / clip unit: 2 in local mode (replace-one: +C against −C), 1 in central
        (one client's update against zero in the fixed-denominator estimator, in units of
        C / (qW))."""
        return 2.0 if self.mode == "local" else 1.0

    @property
    def private_selection(self) -> bool:
        return self.selection == "private"

    @property
    def rebuildable(self) -> bool:
        """True when every noise draw can be rebuilt from the run's config (its seed)."""
        return self.noise_source == "seeded"

    def epsilon(self, rounds: int) -> float:
        """Total ε after ``rounds`` releases at this plan's δ: the upload noise composed with
        the private selection when there is one (local mode, sampling rate 1).

        The selection is ``selection_epsilon``-DP per round and, as a composition of
        exponential mechanisms, (ε_sel²/8)-zCDP (bounded range; Cesar & Rogers 2021 — k-fold
        ε_sel/k gives ε_sel²/(8k), so this is conservative by the number of slots k). Gaussian:
        its RDP α·ρ is added to the Gaussian's at every order. Laplace: the per-round pure ε's
        add (2/z + ε_sel), then compose over rounds as without selection."""
        return self._epsilon(rounds, self.sensitivity_factor)

    def _epsilon(self, rounds: int, sensitivity_factor: float) -> float:
        z = self.noise_multiplier / sensitivity_factor
        sel = self.selection_epsilon if self.private_selection else 0.0
        if self.mechanism == "gaussian":
            if sel:
                return gaussian_with_selection_epsilon(z, rounds, sel * sel / 8, self.delta)
            return gaussian_epsilon(z, rounds, self.delta)
        return laplace_epsilon(1.0 / z + sel, rounds, self.delta)

    def release_epsilon(self) -> float:
        """ε of **one** release of the upload (or aggregate) noise alone, without sampling
        (q = 1) and without the selection: the figure an audit of one release checks."""
        z = self.noise_multiplier / self.sensitivity_factor
        if self.mechanism == "gaussian":
            return gaussian_epsilon(z, 1, self.delta)
        return 1.0 / z

    def selection_spent(self, rounds: int) -> float | None:
        """ε of the private selection alone after ``rounds`` rounds (pure ε_sel per round,
        basic or advanced composition at δ); None with public selection."""
        if not self.private_selection:
            return None
        return laplace_epsilon(self.selection_epsilon, rounds, self.delta)

    def summary(self) -> dict[str, Any]:
        return {"mechanism": self.mechanism, "mode": self.mode, "clip": self.clip,
                "noise_multiplier": self.noise_multiplier, "delta": self.delta,
                "target_epsilon": self.target_epsilon,
                "epsilon": self.epsilon(self.rounds),
                # central: ε against replacing one client's data with any other (sensitivity
                # 2C/(qW)); local mode's ε already is
                "epsilon_replace_one": self._epsilon(self.rounds, 2.0)
                if self.mode == "central" else None,
                "selection": self.selection,
                "selection_epsilon_per_round": self.selection_epsilon
                if self.private_selection else None,
                "selection_epsilon": self.selection_spent(self.rounds),
                "noise_source": self.noise_source,
                "estimator": "fixed-denominator" if self.mode == "central" else None,
                "weight_cap": self.weight_cap if self.mode == "central" else None,
                # q of the estimator's qW; the accountant counts every round (no amplification)
                "estimator_sample_rate": self.sample_rate if self.mode == "central" else None,
                "amplification_by_sampling": False,
                "guarantee_holds_against_config_holders": not self.rebuildable}


def plan_builder(p, rounds: int, sample_rate: float) -> Callable[[float], PrivacyPlan]:
    """z ↦ the run's :class:`PrivacyPlan` at noise multiplier z, from a ``privacy`` config
    table ``p`` (what :func:`resolve` calibrates z over)."""
    q = 1.0 if p.mode == "local" else float(sample_rate)
    target = None if p.epsilon is None else float(p.epsilon)

    def plan(z: float) -> PrivacyPlan:
        return PrivacyPlan(p.mechanism, p.mode, float(p.clip), z, float(p.delta), q, rounds,
                           target, p.selection, float(p.selection_epsilon), p.noise_source,
                           float(p.weight_cap))

    return plan


def check_accountable(plan: PrivacyPlan, key: str) -> PrivacyPlan:
    """``plan`` when every ε the run reports (each round's, the summary's, one release's) is a
    finite number; else a one-line error naming ``key``. An extreme noise multiplier (1e-300,
    1e200) makes the RDP accountant divide by zero or overflow — found before the run starts,
    not after its first round has trained."""
    try:
        figures = [plan.release_epsilon(), plan.epsilon(1),
                   *(v for v in plan.summary().values() if isinstance(v, float))]
        ok = all(math.isfinite(f) for f in figures)
    except (ZeroDivisionError, OverflowError, ValueError, FloatingPointError):
        ok = False
    if not ok:
        raise UserError(f"config key '{key}': the accountant cannot compute a finite ε at "
                        f"{plan.noise_multiplier:g} (over {plan.rounds} rounds at "
                        f"δ = {plan.delta:g}); choose a less extreme value")
    return plan


def resolve(p, rounds: int, sample_rate: float) -> PrivacyPlan | None:
    """The run's :class:`PrivacyPlan` from a ``privacy`` config table ``p`` (None when
    ``p.mechanism = 'none'``); ``sample_rate`` = clients per round / clients (the central
    estimator's q; the accountant, in either mode, counts every round at q = 1)."""
    if p.mechanism == "none":
        return None
    factor = 2.0 if p.mode == "local" else 1.0
    plan = plan_builder(p, rounds, sample_rate)
    if p.noise_multiplier is not None:
        return check_accountable(plan(float(p.noise_multiplier)), "privacy.noise_multiplier")
    if p.selection == "private":
        return plan(calibrate_with_selection(plan, float(p.epsilon), rounds))
    try:
        if p.mechanism == "gaussian":
            z = factor * calibrate_gaussian(p.epsilon, rounds, p.delta)
        else:
            eps0 = calibrate_laplace(p.epsilon, rounds, p.delta)
            if eps0 <= 0:  # below float resolution: the noise scale would be infinite
                raise ValueError("the per-round budget underflows to 0")
            z = factor / eps0
    except ValueError as e:  # Opacus: "The privacy budget is too low."
        raise UserError(f"config key 'privacy.epsilon': {p.epsilon:g} cannot be reached over "
                        f"{rounds} rounds at δ = {p.delta:g} ({e}); raise privacy.epsilon") from None
    return plan(z)


def check_selection_floor(plan, target: float, rounds: int) -> None:
    """Refuse (one-line :class:`UserError`) a ``target`` ε that the private selection alone
    already spends over ``rounds`` (``plan(z)`` builds the run's plan; z → ∞ leaves only the
    selection's share)."""
    floor = plan(1e12).epsilon(rounds)
    if floor >= target:
        raise UserError(f"config key 'privacy.epsilon': {target:g} is not reachable: the private "
                        f"selection alone spends ε = {floor:.3g} over {rounds} rounds (lower "
                        f"privacy.selection_epsilon or raise privacy.epsilon)")


def calibrate_with_selection(plan, target: float, rounds: int) -> float:
    """Smallest noise multiplier z whose upload noise and private selection together reach
    ``target`` over ``rounds`` (bisection on z; ``plan(z)`` builds the run's plan)."""
    check_selection_floor(plan, target, rounds)
    lo, hi = 1e-3, 1.0
    while plan(hi).epsilon(rounds) > target:
        hi *= 2
    for _ in range(60):
        mid = (lo + hi) / 2
        if plan(mid).epsilon(rounds) > target:
            lo = mid
        else:
            hi = mid
    return hi


def round_record(plan: PrivacyPlan | None, rnd: int, extra_releases: int = 0
                 ) -> dict[str, Any]:
    """The ``epsilon``/``delta`` (and ``selection_epsilon``) fields of round ``rnd``'s metrics
    line ({} without DP). ``extra_releases``: rounds run more than once with fresh ("os")
    noise after a crash — each attempt released its uploads again, so each is charged."""
    if plan is None:
        return {}
    n = rnd + extra_releases
    out = {"epsilon": plan.epsilon(n), "delta": plan.delta, "releases_charged": n}
    if plan.private_selection:
        out["selection_epsilon"] = plan.selection_spent(n)
    return out
