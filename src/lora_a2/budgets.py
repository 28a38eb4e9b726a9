"""Per-client rank budgets r_k: an int, an explicit list, or a named distribution. Pure.

``strategy.rank_budget`` accepts
- an ``int`` r: every client gets r;
- a ``list`` of one int per client: taken as is;
- a distribution name over the ranks :data:`RANKS` = {1, 2, 4, 8, 16}, capped at ``max_rank``
  (``strategy.global_rank``: the support is every rank of RANKS that is ≤ max_rank). With n ranks
  r_0 < … < r_{n-1} in the support, the probabilities are
  - ``uniform``:    p_i = 1 / n;
  - ``heavy-tail``: p_i ∝ 2^{-i} — each rank half as likely as the one below it, so most
    clients are small (over all five ranks: 16/31, 8/31, 4/31, 2/31, 1/31);
  - ``normal``:     p_i ∝ C(n-1, i), the binomial (discretised normal) weights — mass in the
    middle (over all five ranks: 1/16, 4/16, 6/16, 4/16, 1/16).

Drawing is reproducible and follows the shape exactly: the *counts* per rank are K·p_i rounded
by the largest-remainder method (ties to the smaller rank), so they sum to K; the seed only
decides *which* client gets which rank (a seeded permutation). Same (name, K, max_rank, seed) →
the same list, on every machine.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

RANKS = (1, 2, 4, 8, 16)
DISTRIBUTIONS = ("uniform", "heavy-tail", "normal")
_SEED_SALT = 0x5EEDB0D9


def support(max_rank: int) -> list[int]:
    """The ranks of :data:`RANKS` that are ≤ ``max_rank`` (at least ``[1]``)."""
    ranks = [r for r in RANKS if r <= max_rank]
    return ranks or [1]


def probabilities(name: str, max_rank: int) -> dict[int, float]:
    """Probability of each rank of the support under distribution ``name`` (see module doc)."""
    ranks = support(max_rank)
    n = len(ranks)
    if name == "uniform":
        raw = [1.0] * n
    elif name == "heavy-tail":
        raw = [2.0 ** -i for i in range(n)]
    elif name == "normal":
        raw = [float(math.comb(n - 1, i)) for i in range(n)]
    else:
        raise ValueError(f"unknown rank distribution {name!r}; valid: {', '.join(DISTRIBUTIONS)}")
    total = sum(raw)
    return {r: w / total for r, w in zip(ranks, raw)}


def counts(name: str, num_clients: int, max_rank: int) -> dict[int, int]:
    """Clients per rank: largest-remainder rounding of K·p (sums to K; ties to smaller ranks)."""
    probs = probabilities(name, max_rank)
    exact = {r: num_clients * p for r, p in probs.items()}
    out = {r: int(math.floor(x)) for r, x in exact.items()}
    left = num_clients - sum(out.values())
    by_remainder = sorted(probs, key=lambda r: (-(exact[r] - out[r]), r))
    for r in by_remainder[:left]:
        out[r] += 1
    return out


def draw(name: str, num_clients: int, max_rank: int, seed: int) -> list[int]:
    """Per-client ranks following ``name``: exact counts, seeded assignment to clients."""
    pool = [r for r, c in counts(name, num_clients, max_rank).items() for _ in range(c)]
    rng = np.random.default_rng([int(seed), _SEED_SALT])
    return [int(pool[i]) for i in rng.permutation(num_clients)]


def resolve(rank_budget: Any, num_clients: int, max_rank: int, seed: int) -> list[int]:
    """``strategy.rank_budget`` → one int per client (validation is the config's job).
    ``auto``: every client starts at ``max_rank``; the round loop sets each round's budget
    from the client's link and device (:mod:`lora_a2.fleet`)."""
    if rank_budget == "auto":
        return [int(max_rank)] * num_clients
    if isinstance(rank_budget, str):
        return draw(rank_budget, num_clients, max_rank, seed)
    if isinstance(rank_budget, list):
        return [int(b) for b in rank_budget]
    return [int(rank_budget)] * num_clients
