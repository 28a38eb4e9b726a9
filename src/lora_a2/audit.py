"""An empirical auditor of every DP mechanism the project offers (``lora-a2 audit-privacy``).

The auditor attacks one release of each mechanism and turns the attack's success into a
statistically valid **lower bound** on ε (Jagielski, Ullman, Oprea, "Auditing Differentially
Private Machine Learning: How Private is Private SGD?", NeurIPS 2020; Nasr, Song, Thakurta,
Papernot, Carlini, "Adversary Instantiation: Lower Bounds for Differentially Private Machine
Learning", IEEE S&P 2021). If a mechanism's release were less private than the accountant
claims, the bound would exceed the claim: that is a violation, and the command exits 1.

For each row (strategy × mode × mechanism, and LoRA-A2's private selection):

1. A tiny random BERT trains one real round on synthetic text, so every upload has the
   strategy's real structure (slots, ranks, references). The canary is that upload with its
   change replaced by a one-hot change e_j at the clip norm (for ``central``: 10× the clip, a
   client that does not clip, so the server's own clip is under test too).
2. The accountant's worst-case neighbours go through the **real code** of the DP wrapper
   (:class:`lora_a2.private.PrivateStrategy`): ``central`` — the round with the canary and
   one other client at −C along e_j (the round's two other sampled clients dropped out),
   against the same round with the canary client's change zero (zero-out neighbours: the
   release shows who replied, so both rounds have the same replies; the estimator's weights,
   the server clip, the aggregation are the run's);
   ``local`` — the canary's upload at +C against the same upload at −C (replace-one).
   This is the deterministic part of the release, computed once per neighbour.
3. The noise is drawn in batch through the wrapper's real noise function at the scale the
   wrapper computes. The distinguishing test is the likelihood-ratio test: for the Gaussian
   the projection of the release on the difference of the neighbours (one i.i.d. coordinate
   of the noise has exactly that projection's law); for Laplace Σ_j |x_j| − |x_j − d_j| over
   the (at most 16) coordinates where the neighbours differ most.
4. The threshold is chosen on held-out draws; on fresh draws the false-positive and
   false-negative rates get one-sided Clopper–Pearson upper bounds at 95 % overall
   confidence (Bonferroni over the rows and the two rates), and ε ≥ log((1 − δ − FNR)/FPR).
   Private selection: the frequency of "slot i is selected" under the neighbouring scores
   u = [1, 0, 0] and u' = [0, 1, 1] (Clopper–Pearson both ways), against ε_sel with δ = 0.

Each row is audited against its **per-release** ε (q = 1, one round), as the accountant
computes it (:meth:`lora_a2.privacy.PrivacyPlan.release_epsilon`). Draws are seeded, so a
verdict reproduces. ``plant`` runs the audit against a deliberately broken mechanism (the
same wrapper with one method changed): the auditor must flag it — that is its power check.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import beta
from torch import Tensor

from .adapter import ModelRuntime
from .aggregation import data_weights
from .config import load_config
from .errors import UserError
from .payload import decode, encode
from .private import PrivateStrategy, resolve_plan
from .selection import private_top_k
from .strategies import REGISTRY, load_all, unknown_strategy
from .messages import ServerState, Task, Update
from .strategies.context import ClientContext
from .tasks.classification import Classification, encode_texts

MODES = ("local", "central")
MECHANISMS = ("gaussian", "laplace", "selection")

#: deliberately broken mechanisms the auditor must catch (name → what is broken)
PLANTS = {
    "half-noise": "local and central noise at half the scale the accountant assumes",
    "no-server-clip": "the server does not clip uploads again (central mode)",
    "renormalised-weights": "weights renormalised over each round's replies instead of the "
                            "fixed denominator (central mode)",
    "gumbel-scale": "private selection's Gumbel noise at scale 1/ε instead of 2k/ε",
}


def plant_reaches(plant: str, mode: str, mechanism: str) -> bool:
    """Whether ``plant``'s bug reaches the release of a (mode, mechanism) row: the noise
    plants reach noise rows (the server-side ones only central rows), ``gumbel-scale`` only
    private selection. A row it does not reach is audited as the honest mechanism."""
    if plant == "gumbel-scale":
        return mechanism == "selection"
    if mechanism == "selection":
        return False
    return plant == "half-noise" or mode == "central"

#: noise multipliers audited (z, as ``privacy.noise_multiplier``): per-release ε near 4–5 for
#: the Gaussian (where a one-release audit has power) and ε₀ = 1 for Laplace
DEFAULT_Z = {("gaussian", "central"): 1.0, ("gaussian", "local"): 2.0,
             ("laplace", "central"): 1.0, ("laplace", "local"): 2.0}
SELECTION_EPSILON = 1.0
CLIP = 1.0
NUM_CLIENTS = 4
CONFIDENCE = 0.95


@dataclass
class AuditRow:
    strategy: str
    mode: str
    mechanism: str
    claimed_epsilon: float
    lower_bound: float
    confidence: float
    draws: int
    fpr: float
    fnr: float
    verdict: str  # "ok" | "VIOLATED"

    def line(self) -> str:
        return (f"{self.strategy:12s} {self.mode:8s} {self.mechanism:10s} "
                f"claimed ε {self.claimed_epsilon:6.3f}   lower bound {self.lower_bound:6.3f}"
                f" ({100 * self.confidence:.2f} %)   {self.verdict}")


# ---------------------------------------------------------------------- planted bugs
class PlantedStrategy(PrivateStrategy):
    """The DP wrapper with one deliberate bug (``plant``); everything else is the real one."""

    def __init__(self, inner, plan, plant: str) -> None:
        super().__init__(inner, plan)
        self.plant = plant

    def local_noise_scale(self) -> float:
        return super().local_noise_scale() * (0.5 if self.plant == "half-noise" else 1.0)

    def central_noise_scale(self) -> float:
        return super().central_noise_scale() * (0.5 if self.plant == "half-noise" else 1.0)

    def server_clip(self, task: Task, update: Update) -> Update:
        if self.plant == "no-server-clip":
            return update
        return super().server_clip(task, update)

    def weights(self, replies: list[tuple[Task, Update]]) -> list[float]:
        if self.plant == "renormalised-weights":
            return data_weights([u.num_examples for _, u in replies])
        return super().weights(replies)

    def select_slots(self, scores: Tensor, k: int, task: Task) -> Tensor:
        if self.plant == "gumbel-scale":  # 2/ε₀ with ε₀ = ε'/k = 1/ε  ⇔  ε' = 2kε
            return private_top_k(scores, k, 2 * k * self.selection_epsilon(),
                                 self.generator(task.round, f"select/{task.client_id}"))
        return super().select_slots(scores, k, task)


# ---------------------------------------------------------------------- statistics
def clopper_pearson_upper(k: int, n: int, alpha: float) -> float:
    """One-sided (1 − α) upper confidence bound on a binomial rate from k of n."""
    return 1.0 if k >= n else float(beta.ppf(1 - alpha, k + 1, n - k))


def clopper_pearson_lower(k: int, n: int, alpha: float) -> float:
    """One-sided (1 − α) lower confidence bound on a binomial rate from k of n."""
    return 0.0 if k <= 0 else float(beta.ppf(alpha, k, n - k + 1))


def epsilon_lower_bound(fp: int, fn: int, n: int, delta: float, alpha: float) -> float:
    """ε ≥ log((1 − δ − FNR⁺) / FPR⁺) with Clopper–Pearson upper bounds FNR⁺, FPR⁺ each at
    one-sided confidence 1 − α/2 (0 when the bound says nothing)."""
    fpr = clopper_pearson_upper(fp, n, alpha / 2)
    fnr = clopper_pearson_upper(fn, n, alpha / 2)
    if 1 - delta - fnr <= 0 or fpr <= 0:
        return 0.0
    return max(0.0, math.log((1 - delta - fnr) / fpr))


def threshold_audit(null: np.ndarray, alt: np.ndarray, null_eval: np.ndarray,
                    alt_eval: np.ndarray, delta: float, alpha: float
                    ) -> tuple[float, float, float]:
    """Choose the threshold t ("T > t ⇒ the canary is in") that maximises the bound on the
    selection draws, then bound ε on the evaluation draws: (ε lower bound, FPR, FNR)."""
    null_s, alt_s = np.sort(null), np.sort(alt)
    n = len(null_s)
    cands = np.unique(np.quantile(np.concatenate([null_s[-2000:], alt_s]), np.linspace(
        0, 1, 400)))
    best_t, best = cands[0], -1.0
    for t in cands:
        fp = n - np.searchsorted(null_s, t, side="right")
        fn = np.searchsorted(alt_s, t, side="right")
        eps = epsilon_lower_bound(int(fp), int(fn), n, delta, alpha)
        if eps > best:
            best, best_t = eps, t
    m = len(null_eval)
    fp = int((null_eval > best_t).sum())
    fn = int((alt_eval <= best_t).sum())
    return epsilon_lower_bound(fp, fn, m, delta, alpha), fp / m, fn / m


# ---------------------------------------------------------------------- the tiny federation
WORDS = [["apple", "banana", "cherry", "grape"], ["dog", "cat", "mouse", "horse"],
         ["red", "blue", "green", "yellow"]]


@dataclass
class Federation:
    """One strategy on a tiny random BERT with four equal clients, and client 0's real
    round-1 upload; :meth:`wrap` gives the DP wrapper of one audit row around it."""

    name: str
    runtime: ModelRuntime
    contexts: list[ClientContext]
    state: ServerState
    raw: tuple[Task, Update]
    seed: int
    strategy: PrivateStrategy | None = None

    def wrap(self, mode: str, mechanism: str, z: float, plant: str | None) -> PrivateStrategy:
        cfg = load_config(None, _sets(self.name, self.seed) + [
            f"privacy.mechanism='{'laplace' if mechanism == 'laplace' else 'gaussian'}'",
            f"privacy.mode='{mode}'", f"privacy.noise_multiplier={z}", f"privacy.clip={CLIP}",
            "privacy.noise_source='seeded'"] + (
            ["privacy.selection='private'", f"privacy.selection_epsilon={SELECTION_EPSILON}"]
            if mechanism == "selection" else []))
        inner = REGISTRY[self.name](cfg)
        inner.bind(self.runtime.layout)
        plan = resolve_plan(cfg)
        assert plan is not None
        s = PlantedStrategy(inner, plan, plant) if plant else PrivateStrategy(inner, plan)
        s.bind_clients([c.num_examples for c in self.contexts])
        self.strategy = s
        return s


def _sets(name: str, seed: int) -> list[str]:
    return ["model.name='tiny-random-bert'", "strategy.global_rank=4",
            f"data.num_clients={NUM_CLIENTS}", f"strategy.name='{name}'", "model.head='trained'",
            "strategy.rank_budget=2", f"seed={seed}", "train.rounds=1"]


def federation(name: str, seed: int) -> Federation:
    """``name`` on a tiny random BERT with four equal clients of synthetic text, and client
    0's raw (pre-DP) upload of round 1, computed once through real encoding."""
    cfg = load_config(None, _sets(name, seed))
    inner = REGISTRY[name](cfg)
    torch.manual_seed(seed)
    rt = ModelRuntime(cfg.model, 3, inner.lora_rank(), seed, torch.device("cpu"),
                      task=Classification(cfg))
    inner.bind(rt.layout)
    rng = np.random.default_rng(seed)
    n = 10 * NUM_CLIENTS
    labels = rng.integers(0, 3, n)
    texts = [" ".join(rng.choice(WORDS[y], 5)) for y in labels]
    enc = encode_texts(rt.tokenizer, texts, labels, 16)
    parts = np.array_split(np.arange(n), NUM_CLIENTS)
    ctxs = [ClientContext(rt, enc, parts[c], cfg) for c in range(NUM_CLIENTS)]
    state = inner.init_state(rt.initial_state())
    task = inner.configure(1, 0, state)
    sent = Task.from_payload(decode(encode(task.to_payload(rt.layout))), rt.layout)
    return Federation(name, rt, ctxs, state, (task, inner.client_update(ctxs[0], sent)), seed)


def _with_change(f: Federation, task: Task, like: Update, client: int, change: Tensor
                 ) -> Update:
    """``like``'s structure (slots, rank, meta) for ``client`` with transmitted change
    ``change`` (values = reference + change)."""
    s = f.strategy
    assert s is not None
    ref = s.upload_reference(task, like)
    values = change.clone() if ref is None else ref + change
    u = Update(client, f.contexts[client].num_examples, values.to(like.values.dtype),
               like.slots, dict(like.meta))
    s.validate(task, u)  # the canary is a well-formed upload
    return u


def _flat(f: Federation, state: ServerState) -> Tensor:
    assert f.strategy is not None
    names = f.runtime.layout.group_names(f.strategy.noise_groups(1))
    return torch.cat([state.tensors[n].reshape(-1).double() for n in names])


def neighbours(f: Federation, mode: str) -> tuple[Tensor, float]:
    """The difference d of the deterministic release between the two neighbours (through
    the real wrapper code) and the noise scale the wrapper puts on every coordinate."""
    s = f.strategy
    assert s is not None
    task0, raw = f.raw
    ref = s.upload_reference(task0, raw)
    change = raw.values - (ref if ref is not None else 0)
    order = torch.argsort(change.abs(), descending=True)
    tasks = [task0] + [s.configure(1, c, f.state) for c in range(1, NUM_CLIENTS)]
    for j in order[:4000].tolist():
        e = torch.zeros_like(change)
        e[j] = 1.0
        if mode == "local":
            plus = s.client_clip(task0, _with_change(f, task0, raw, 0, 10 * CLIP * e))
            minus = s.client_clip(task0, _with_change(f, task0, raw, 0, -10 * CLIP * e))
            d = plus.values.double() - minus.values.double()
            scale = s.local_noise_scale()
        else:
            canary = (task0, _with_change(f, task0, raw, 0, 10 * CLIP * e))  # does not clip
            # one other client at −C; the rest of the round's sample dropped out (zero-out
            # neighbours keep who replied public and equal, so a denominator taken over the
            # replies, not fixed, shows only when some did not reply)
            others = [(t, _with_change(f, t, raw, t.client_id, -CLIP * e)) for t in tasks[1:2]]
            zero = (task0, _with_change(f, task0, raw, 0, torch.zeros_like(e)))
            with_c, _ = s.central_aggregate(1, f.state, [canary] + others)
            without, _ = s.central_aggregate(1, f.state, [zero] + others)
            d = _flat(f, with_c) - _flat(f, without)
            scale = s.central_noise_scale()
        if float(d.abs().max()) > 0:
            return d, scale
    raise RuntimeError(f"{s.name}: no one-hot canary changes the release")


def audit_noise(f: Federation, mode: str, mechanism: str, draws: int, delta: float,
                alpha: float, rng_seed: int) -> tuple[float, float, float]:
    """(ε lower bound, FPR, FNR) of the likelihood-ratio test between the neighbours."""
    d, scale = neighbours(f, mode)
    s = f.strategy
    assert s is not None
    gen = torch.Generator().manual_seed(rng_seed)

    def draw(n: int) -> np.ndarray:
        return s.draw_noise(n, scale, gen).double().numpy()

    if mechanism == "gaussian":
        mu = float(d.norm())
        samples = [draw(draws) for _ in range(4)]  # null, alt; selection half, evaluation half
        null, alt, null_e, alt_e = samples[0], samples[1] + mu, samples[2], samples[3] + mu
    else:
        support = torch.argsort(d.abs(), descending=True)[:16]
        ds = d[support].numpy()
        ds = ds[ds != 0]
        m = len(ds)

        def stat(x: np.ndarray) -> np.ndarray:  # b · log LR of "canary in" against "out"
            return (np.abs(x) - np.abs(x - ds)).sum(axis=1)

        def side(shift: bool) -> np.ndarray:
            x = draw(draws * m).reshape(draws, m)
            return stat(x + ds if shift else x)

        null, alt, null_e, alt_e = side(False), side(True), side(False), side(True)
    return threshold_audit(null, alt, null_e, alt_e, delta, alpha)


def audit_selection(f: Federation, draws: int, alpha: float) -> tuple[float, float, float]:
    """Lower bound on the private selection's ε from the frequencies of "slot i selected"
    (k = 1) under u = [1, 0, 0] and u' = [0, 1, 1], through the wrapper's real selector.
    ``draws`` = (choosing the event, evaluating it) per side."""
    s = f.strategy
    assert s is not None
    choose, draws = draws
    u = torch.tensor([[1.0, 0.0, 0.0]])
    v = torch.tensor([[0.0, 1.0, 1.0]])

    def counts(scores: Tensor, first_round: int, n: int) -> np.ndarray:
        out = np.zeros(3)
        for i in range(n):  # one fresh seeded draw per (round, client)
            task = Task(first_round + i, 0, {}, {})
            out += s.select_slots(scores, 1, task).reshape(-1).numpy()
        return out

    event = choose_event(counts(u, 1, choose), counts(v, 1 + choose, choose), choose)
    return event_bound(counts(u, 1 + 2 * choose, draws), counts(v, 1 + 2 * choose + draws, draws),
                       draws, event, alpha)


def choose_event(sel_p: np.ndarray, sel_q: np.ndarray, n: int) -> tuple[int, bool, bool]:
    """The event of the selection audit, chosen on the selection draws: ``(i, swap,
    complement)`` — "slot i selected" (or, ``complement``, "not selected"), as evidence for the
    first neighbour (or, ``swap``, the second) — with the largest add-one ratio of its
    frequencies out of ``n`` draws per side (a ratio of zero counts stays finite)."""
    events = []
    for i in range(len(sel_p)):
        for a, b, swap in ((sel_p[i], sel_q[i], False), (sel_q[i], sel_p[i], True)):
            events.append(((a + 1) / (b + 1), i, swap, False))
            events.append(((n - a + 1) / (n - b + 1), i, swap, True))
    _, i, swap, complement = max(events)
    return i, swap, complement


def event_bound(ev_p: np.ndarray, ev_q: np.ndarray, n: int, event: tuple[int, bool, bool],
                alpha: float) -> tuple[float, float, float]:
    """(ε lower bound, FPR, FNR) of ``event`` on fresh draws, ``n`` per side, for a pure-ε
    mechanism: ε ≥ log(P⁻/Q⁺) with P⁻ the Clopper–Pearson lower bound on the event's rate
    under the neighbour it favours and Q⁺ the upper bound under the other, each at one-sided
    confidence 1 − α/2 (0 when the bound says nothing)."""
    i, swap, complement = event
    a, b = (ev_q[i], ev_p[i]) if swap else (ev_p[i], ev_q[i])
    if complement:
        a, b = n - a, n - b
    lo = clopper_pearson_lower(int(a), n, alpha / 2)
    hi = clopper_pearson_upper(int(b), n, alpha / 2)
    lb = max(0.0, math.log(lo / hi)) if lo > 0 else 0.0
    return lb, float(b / n), float(1 - a / n)


# ---------------------------------------------------------------------- the command
def planned_rows(strategies: Sequence[str] | None, modes: Sequence[str] | None,
                 mechanisms: Sequence[str] | None) -> list[tuple[str, str, str]]:
    """Every (strategy, mode, mechanism) the project offers, within the selectors; one-line
    errors for a selector that names nothing auditable."""
    load_all()
    builtin = sorted(REGISTRY)
    for name in strategies or ():
        if name not in REGISTRY:
            raise unknown_strategy("--strategy", name)
    for m in modes or ():
        if m not in MODES:
            raise UserError(f"--mode: '{m}' is not one of {', '.join(MODES)}")
    for m in mechanisms or ():
        if m not in MECHANISMS:
            raise UserError(f"--mechanism: '{m}' is not one of {', '.join(MECHANISMS)}")
    rows = []
    for name in strategies or builtin:
        cls = REGISTRY[name]
        supported = [m for m in MODES if not cls.dp_refusal(m)]
        if strategies and modes and not set(modes) & set(supported):
            raise UserError(f"--strategy {name}: it supports no DP in mode "
                            f"{', '.join(modes)} ({cls.dp_refusal(modes[0])})")
        for mode in supported:
            if modes and mode not in modes:
                continue
            for mech in MECHANISMS:
                if mechanisms and mech not in mechanisms:
                    continue
                if mech == "selection" and not (cls.selects_slots and mode == "local"):
                    continue
                rows.append((name, mode, mech))
    if not rows:
        raise UserError("the selectors leave no mechanism to audit")
    return rows


def run_audit(strategies: Sequence[str] | None = None, modes: Sequence[str] | None = None,
              mechanisms: Sequence[str] | None = None, plant: str | None = None,
              quick: bool = False, seed: int = 0, delta: float = 1e-5,
              noise_multiplier: float | None = None,
              progress: Callable[[AuditRow], None] | None = None) -> list[AuditRow]:
    """Audit every selected mechanism (see module docstring); rows in order."""
    if plant is not None and plant not in PLANTS:
        raise UserError(f"--plant: unknown bug '{plant}'; valid: {', '.join(PLANTS)}")
    if noise_multiplier is not None and not noise_multiplier > 0:
        raise UserError(f"--noise-multiplier must be > 0, got {noise_multiplier:g}")
    plan = planned_rows(strategies, modes, mechanisms)
    alpha = (1 - CONFIDENCE) / len(plan)  # Bonferroni over the rows
    draws_noise = 200_000 if quick else 2_000_000
    draws_sel = (2_000, 6_000) if quick else (10_000, 40_000)
    rows: list[AuditRow] = []
    feds: dict[str, Federation] = {}
    for i, (name, mode, mech) in enumerate(plan):
        z = noise_multiplier or DEFAULT_Z.get((mech, mode), DEFAULT_Z[("gaussian", mode)])
        if name not in feds:
            feds = {name: federation(name, seed)}  # one strategy's model at a time
        f = feds[name]
        f.wrap(mode, mech, z, plant)
        if mech == "selection":
            claimed = SELECTION_EPSILON
            lb, fpr, fnr = audit_selection(f, draws_sel, alpha)
            n = draws_sel[1]
        else:
            assert f.strategy is not None
            claimed = f.strategy.plan.release_epsilon()
            lb, fpr, fnr = audit_noise(f, mode, mech, draws_noise, delta, alpha,
                                       rng_seed=seed * 1000 + i)
            n = draws_noise
        row = AuditRow(name, mode, mech, claimed, lb, 1 - alpha, n, fpr, fnr,
                       "ok" if lb <= claimed else "VIOLATED")
        rows.append(row)
        if progress is not None:
            progress(row)
    return rows


def report(rows: list[AuditRow], plant: str | None, wall_s: float) -> dict[str, Any]:
    ok = sum(r.verdict == "ok" for r in rows)
    return {"plant": plant, "mechanisms": len(rows), "within_claim": ok,
            "confidence_overall": CONFIDENCE, "wall_s": wall_s,
            "rows": [asdict(r) for r in rows]}


def audit_command(strategies, modes, mechanisms, plant, quick, json_path, noise_multiplier
                  ) -> int:
    """``lora-a2 audit-privacy``: print a row per mechanism and the verdict line; exit 1 when
    any lower bound exceeds its claim."""
    t0 = time.perf_counter()
    if plant:
        if plant not in PLANTS:  # one line, before anything is printed
            raise UserError(f"--plant: unknown bug '{plant}'; valid: {', '.join(PLANTS)}")
        reached = [r for r in planned_rows(strategies, modes, mechanisms)
                   if plant_reaches(plant, r[1], r[2])]
        if not reached:  # an audit the bug cannot touch would exit 0: it tests nothing
            raise UserError(f"--plant {plant}: the selectors leave no mechanism it reaches "
                            f"({PLANTS[plant]})")
        print(f"planted bug: {plant} — {PLANTS[plant]}")
    rows = run_audit(strategies, modes, mechanisms, plant, quick,
                     noise_multiplier=noise_multiplier,
                     progress=lambda r: print(r.line(), flush=True))
    ok = sum(r.verdict == "ok" for r in rows)
    print(f"{ok} of {len(rows)} mechanisms within their claimed ε")
    if json_path:
        Path(json_path).write_text(json.dumps(report(rows, plant, time.perf_counter() - t0),
                                              indent=1))
    return 0 if ok == len(rows) else 1


__all__ = ["AuditRow", "PLANTS", "PlantedStrategy", "plant_reaches", "run_audit", "audit_command",
           "epsilon_lower_bound", "clopper_pearson_upper"]
