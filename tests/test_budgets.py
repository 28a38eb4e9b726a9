"""Per-client rank budgets (lora_a2.budgets) against the module doc's definitions, computed here
in exact rational arithmetic. test_hetero.py checks the same through the config."""

from __future__ import annotations

from collections import Counter
from fractions import Fraction
from math import comb

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_a2 import budgets as B

MAX_RANKS = st.integers(-2, 40)


def exact_probabilities(name: str, max_rank: int) -> dict[int, Fraction]:
    ranks = [r for r in (1, 2, 4, 8, 16) if r <= max_rank] or [1]
    n = len(ranks)
    raw = {"uniform": [Fraction(1)] * n,
           "heavy-tail": [Fraction(1, 2 ** i) for i in range(n)],
           "normal": [Fraction(comb(n - 1, i)) for i in range(n)]}[name]
    return {r: w / sum(raw) for r, w in zip(ranks, raw)}


def exact_counts(name: str, k: int, max_rank: int) -> dict[int, int]:
    """Largest remainder on k·p, ties to the smaller rank."""
    probs = exact_probabilities(name, max_rank)
    exact = {r: k * p for r, p in probs.items()}
    out = {r: x.numerator // x.denominator for r, x in exact.items()}
    for r in sorted(probs, key=lambda r: (-(exact[r] - out[r]), r))[:k - sum(out.values())]:
        out[r] += 1
    return out


def test_support_is_the_ranks_up_to_the_cap_and_never_empty():
    assert B.support(16) == B.support(100) == [1, 2, 4, 8, 16]
    assert B.support(15) == B.support(8) == [1, 2, 4, 8]
    assert B.support(3) == [1, 2]
    assert B.support(1) == B.support(0) == B.support(-5) == [1]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(B.DISTRIBUTIONS), MAX_RANKS)
def test_probabilities_are_the_documented_shapes(name, max_rank):
    got = B.probabilities(name, max_rank)
    exact = exact_probabilities(name, max_rank)
    assert list(got) == list(exact)
    assert all(got[r] == pytest.approx(float(exact[r]), rel=1e-12) for r in exact)
    assert sum(got.values()) == pytest.approx(1.0, rel=1e-12)


def test_probabilities_over_all_five_ranks_as_the_doc_writes_them():
    assert B.probabilities("heavy-tail", 16) == pytest.approx(
        {1: 16 / 31, 2: 8 / 31, 4: 4 / 31, 8: 2 / 31, 16: 1 / 31})
    assert B.probabilities("normal", 16) == pytest.approx(
        {1: 1 / 16, 2: 4 / 16, 4: 6 / 16, 8: 4 / 16, 16: 1 / 16})
    assert B.probabilities("uniform", 4) == pytest.approx({1: 1 / 3, 2: 1 / 3, 4: 1 / 3})


def test_an_unknown_distribution_is_rejected_with_the_valid_names():
    with pytest.raises(ValueError, match="unknown rank distribution 'zipf'; valid: uniform, "
                                         "heavy-tail, normal"):
        B.probabilities("zipf", 16)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(B.DISTRIBUTIONS), st.integers(0, 500), MAX_RANKS)
def test_counts_are_the_largest_remainder_rounding_of_k_p(name, k, max_rank):
    got = B.counts(name, k, max_rank)
    assert got == exact_counts(name, k, max_rank)
    assert sum(got.values()) == k


def test_count_ties_go_to_the_smaller_rank():
    # uniform over 5 ranks, 7 clients: 1.4 each, two spare clients, all remainders equal
    assert B.counts("uniform", 7, 16) == {1: 2, 2: 2, 4: 1, 8: 1, 16: 1}
    assert B.counts("uniform", 1, 16) == {1: 1, 2: 0, 4: 0, 8: 0, 16: 0}
    assert B.counts("normal", 3, 16) == {1: 0, 2: 1, 4: 1, 8: 1, 16: 0}


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(B.DISTRIBUTIONS), st.integers(0, 60), MAX_RANKS, st.integers(0, 2**32))
def test_draw_assigns_exactly_the_counts(name, k, max_rank, seed):
    drawn = B.draw(name, k, max_rank, seed)
    assert len(drawn) == k and all(type(r) is int for r in drawn)
    expected = {r: c for r, c in B.counts(name, k, max_rank).items() if c}
    assert dict(Counter(drawn)) == expected
    assert B.draw(name, k, max_rank, seed) == drawn  # reproducible


def test_draw_is_the_same_list_on_every_machine_and_version():
    # pinned: a change here silently changes every published heterogeneous-rank experiment
    assert B.draw("heavy-tail", 12, 16, seed=5) == [1, 1, 2, 4, 2, 1, 1, 8, 1, 4, 2, 1]
    assert B.draw("normal", 10, 8, seed=0) == [2, 4, 4, 4, 2, 2, 2, 1, 8, 4]
    assert B.draw("uniform", 7, 4, seed=123) == [4, 1, 2, 1, 2, 4, 1]


def test_different_seeds_assign_differently():
    draws = {tuple(B.draw("uniform", 20, 16, seed=s)) for s in range(5)}
    assert len(draws) == 5


def test_resolve_an_int_a_list_or_a_name():
    assert B.resolve(4, 3, 16, seed=0) == [4, 4, 4]
    assert B.resolve(4.0, 2, 16, seed=0) == [4, 4]
    assert B.resolve([1, 2.0, 8], 3, 16, seed=0) == [1, 2, 8]
    assert all(type(b) is int for b in B.resolve([1, 2.0], 2, 16, seed=0))
    assert B.resolve("normal", 9, 8, seed=3) == B.draw("normal", 9, 8, seed=3)
    assert B.resolve(2, 0, 16, seed=0) == []
    # "auto" (a string built at run time, as the config parser builds it): every client starts
    # at the largest rank, the fleet sets each round's budget
    assert B.resolve("".join(["au", "to"]), 3, 8, seed=0) == [8, 8, 8]


@pytest.mark.parametrize("name", ["binomial", "exponential", "mixed", "heavy", "uniform2", ""])
def test_names_near_the_valid_ones_are_rejected(name):
    with pytest.raises(ValueError, match="unknown rank distribution"):
        B.probabilities(name, 16)


@pytest.mark.parametrize("name", B.DISTRIBUTIONS)
def test_names_are_compared_by_value(name):
    # a name read from a config file is a fresh string object, not the interned literal
    fresh = "".join(list(name))
    assert B.probabilities(fresh, 16) == B.probabilities(name, 16)
