"""Scores, one global top-k, masks, and the slot wire layout (docs/ALGORITHM.md §2.4, §2.5)."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_a2.selection import (factor_mask, gather_slots, private_top_k, scatter_slots,
                               select_top_k, selection_from_ids, slot_ids, slot_scores, slot_size)


def test_score_is_frobenius_norm_of_rank1_contribution_b_round():
    # Prepare
    g = torch.Generator().manual_seed(0)
    dB = [torch.randn(7, 4, generator=g), torch.randn(3, 4, generator=g)]
    A = [torch.randn(4, 5, generator=g), torch.randn(4, 6, generator=g)]
    # Execute
    scores = slot_scores("B", dB, A)
    # Assert: form each rank-1 product explicitly
    for m in range(2):
        for i in range(4):
            contrib = torch.outer(dB[m][:, i], A[m][i, :])
            assert torch.allclose(scores[m, i], torch.linalg.matrix_norm(contrib, "fro"), rtol=1e-5)


@given(st.sampled_from("AB"), st.integers(1, 6), st.integers(1, 6), st.integers(1, 6),
       st.integers(1, 4), st.integers(0, 2**31 - 1))
@settings(max_examples=40, deadline=None)
def test_rms_score_is_root_mean_square_of_rank1_contribution(factor, d_out0, d_out1, d_in, r,
                                                             seed):
    # Two modules of different shapes; the rank-1 product is formed explicitly.
    g = torch.Generator().manual_seed(seed)
    shapes = [(d_out0, d_in + 1), (d_out1, d_in)]
    B = [torch.randn(o, r, generator=g) for o, _ in shapes]
    A = [torch.randn(r, i, generator=g) for _, i in shapes]
    delta, frozen = (B, A) if factor == "B" else (A, B)
    scores = slot_scores(factor, delta, frozen, kind="rms")
    for m in range(2):
        for i in range(r):
            contrib = torch.outer(B[m][:, i], A[m][i, :])
            rms = contrib.pow(2).mean().sqrt()
            assert torch.allclose(scores[m, i], rms, rtol=1e-4, atol=1e-7)


def test_rms_score_removes_the_size_advantage_of_large_modules():
    # Every entry of ΔB moved by the same amount (AdamW's sign-like step), A entries all ±1:
    # the literal score ranks the 1536-row module first, the RMS score ties all modules.
    dB = [torch.full((1536, 2), 1e-3), torch.full((384, 2), 1e-3)]
    A = [torch.ones(2, 384), torch.ones(2, 384)]
    fro = slot_scores("B", dB, A)
    rms = slot_scores("B", dB, A, kind="rms")
    assert bool((fro[0] > fro[1]).all())
    assert torch.allclose(rms[0], rms[1])
    assert select_top_k(fro, 2)[0].all()  # both slots go to the large module



def test_unknown_slot_score_kind_is_rejected():
    with pytest.raises(ValueError, match="kind"):
        slot_scores("B", [torch.zeros(2, 1)], [torch.zeros(1, 2)], kind="l1")


def test_score_is_frobenius_norm_of_rank1_contribution_a_round():
    g = torch.Generator().manual_seed(1)
    dA = [torch.randn(4, 5, generator=g)]
    B = [torch.randn(7, 4, generator=g)]
    scores = slot_scores("A", dA, B)
    for i in range(4):
        contrib = torch.outer(B[0][:, i], dA[0][i, :])
        assert torch.allclose(scores[0, i], torch.linalg.matrix_norm(contrib, "fro"), rtol=1e-5)


def test_selection_is_one_global_top_k_all_slots_to_one_module():
    # Module 2 dominates every other slot: a per-module top-k would give each module 2 slots,
    # the global rule gives module 2 all of its 4 slots and module 0 the remaining 2... only if
    # they beat module 1. Construct it so.
    scores = torch.tensor([[0.5, 0.4, 0.0, 0.0],
                           [0.1, 0.1, 0.1, 0.1],
                           [9.0, 8.0, 7.0, 6.0]])
    sel = select_top_k(scores, k=4)
    assert sel[2].all() and sel[:2].sum() == 0
    sel6 = select_top_k(scores, k=6)
    assert sel6[2].all() and sel6[0, :2].all() and sel6[1].sum() == 0


def test_top_k_ties_are_broken_by_slot_order_and_count_exact():
    # all tied: the first k slots in model order (a stable sort), exactly k of them
    assert slot_ids(select_top_k(torch.zeros(3, 4), 5)).tolist() == [0, 1, 2, 3, 4]
    # ties among the k-th: the earlier slots win
    scores = torch.tensor([[1.0, 2.0, 2.0, 0.0], [2.0, 1.0, 0.0, 2.0]])
    assert slot_ids(select_top_k(scores, 3)).tolist() == [1, 2, 4]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.integers(1, 6), st.sampled_from(["A", "B"]), st.data())
def test_gather_scatter_round_trip(num_modules, rank, factor, data):
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10_000)))
    dims = [(data.draw(st.integers(1, 5)), data.draw(st.integers(1, 5))) for _ in range(num_modules)]
    shapes = [(d_out, rank) if factor == "B" else (rank, d_in) for d_in, d_out in dims]
    sel = torch.rand(num_modules, rank, generator=g) < 0.5
    dense = [torch.randn(s, generator=g) * (sel[m].reshape(1, -1) if factor == "B"
                                             else sel[m].reshape(-1, 1)) for m, s in enumerate(shapes)]
    values = gather_slots(factor, dense, sel)
    back = scatter_slots(factor, values, sel, shapes)
    assert all(torch.equal(x, y) for x, y in zip(dense, back))
    assert torch.equal(selection_from_ids(slot_ids(sel), num_modules, rank), sel)
    per_slot = [s[0] if factor == "B" else s[1] for s in shapes]
    assert values.numel() == sum(per_slot[m] * int(sel[m].sum()) for m in range(num_modules))


# ---------------------------------------------------------------------- argument checks
@pytest.mark.parametrize("factor", ["C", "a", "b", ""])
def test_unknown_factor_is_rejected(factor):
    with pytest.raises(ValueError, match="active_factor"):
        slot_scores(factor, [torch.ones(2, 1)], [torch.ones(1, 2)])
    with pytest.raises(ValueError, match="active_factor"):
        factor_mask(factor, torch.ones(3, dtype=torch.bool))


def test_top_k_of_zero_selects_nothing_and_negative_k_is_rejected():
    scores = torch.rand(2, 3, generator=torch.Generator().manual_seed(0))
    assert not select_top_k(scores, 0).any()
    assert not select_top_k(scores, 0, positive_only=True).any()
    with pytest.raises(ValueError, match="k must be"):
        select_top_k(scores, -1)


def test_top_k_larger_than_the_slot_count_selects_every_slot():
    assert select_top_k(torch.rand(2, 3), 100).all()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from([0.0, -1.0, -0.5, 0.25, 1.0, 3.0, float("nan"), float("inf"),
                                 float("-inf")]), min_size=1, max_size=12),
       st.integers(0, 14))
def test_positive_only_selects_the_top_k_of_the_positive_finite_scores(values, k):
    scores = torch.tensor(values).reshape(1, -1)
    sel = select_top_k(scores, k, positive_only=True).reshape(-1)
    # independent: rank the positive finite slots by (score desc, slot asc) and take k
    useful = [i for i, v in enumerate(values) if v > 0 and v != float("inf")]
    expected = sorted(useful, key=lambda i: (-values[i], i))[:k]
    assert sorted(torch.nonzero(sel).reshape(-1).tolist()) == sorted(expected)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 5), st.integers(0, 25), st.integers(0, 10_000))
def test_top_k_is_the_k_largest_with_ties_to_slot_order(num_modules, rank, k, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, 4, (num_modules, rank), generator=g).float()  # many ties
    sel = select_top_k(scores, k)
    flat = scores.reshape(-1).tolist()
    expected = sorted(range(len(flat)), key=lambda i: (-flat[i], i))[:k]
    assert sel.shape == scores.shape and sel.dtype == torch.bool
    assert sorted(torch.nonzero(sel.reshape(-1)).reshape(-1).tolist()) == sorted(expected)


# ---------------------------------------------------------------------- masks and slot layout
@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 5), st.integers(1, 5), st.integers(0, 10_000))
def test_factor_mask_zeroes_exactly_the_unselected_slots(rank, d_in, d_out, seed):
    g = torch.Generator().manual_seed(seed)
    row = torch.rand(rank, generator=g) < 0.5
    B, A = torch.randn(d_out, rank, generator=g), torch.randn(rank, d_in, generator=g)
    mask_b, mask_a = factor_mask("B", row), factor_mask("A", row)
    assert mask_b.shape == (1, rank) and mask_a.shape == (rank, 1)
    for i in range(rank):  # a B slot is a column, an A slot is a row
        assert torch.equal((B * mask_b)[:, i], B[:, i] if row[i] else torch.zeros(d_out))
        assert torch.equal((A * mask_a)[i], A[i] if row[i] else torch.zeros(d_in))


def test_slot_size_is_a_column_of_b_or_a_row_of_a():
    assert slot_size("B", d_in=3, d_out=5) == 5
    assert slot_size("A", d_in=3, d_out=5) == 3


def test_slot_ids_are_flat_ascending_int32_and_invert():
    sel = torch.tensor([[False, True, False], [True, False, True]])
    ids = slot_ids(sel)
    assert ids.dtype == torch.int32 and ids.tolist() == [1, 3, 5]  # m · r_G + i
    assert torch.equal(selection_from_ids(ids, 2, 3), sel)
    assert not selection_from_ids(torch.zeros(0, dtype=torch.int32), 2, 3).any()


@pytest.mark.parametrize("factor", ["A", "B"])
def test_gather_order_and_scatter_of_a_large_module(factor):
    # Slot-id order, a B slot's column values top to bottom; more than 256 values, so that
    # the length check is a comparison of values, not of small cached ints.
    g = torch.Generator().manual_seed(3)
    shapes = [(300, 3), (2, 3)] if factor == "B" else [(3, 300), (3, 2)]
    sel = torch.tensor([[True, False, True], [False, True, False]])
    dense = [torch.randn(s, generator=g) for s in shapes]
    values = gather_slots(factor, dense, sel)
    if factor == "B":
        expected = torch.cat([dense[0][:, 0], dense[0][:, 2], dense[1][:, 1]])
    else:
        expected = torch.cat([dense[0][0], dense[0][2], dense[1][1]])
    assert torch.equal(values, expected)
    back = scatter_slots(factor, values, sel, shapes)
    for d, b, s in zip(dense, back, sel):
        masked = d * (s.reshape(1, -1) if factor == "B" else s.reshape(-1, 1))
        assert torch.equal(b, masked)
    with pytest.raises(ValueError, match="values for selected slots"):
        scatter_slots(factor, torch.cat([values, torch.zeros(1)]), sel, shapes)
    with pytest.raises((ValueError, RuntimeError)):  # too few: the reshape fails
        scatter_slots(factor, values[:-1], sel, shapes)


def test_gather_nothing_selected_is_empty():
    assert gather_slots("B", [torch.ones(2, 3)], torch.zeros(1, 3, dtype=torch.bool)).numel() == 0
    out = scatter_slots("B", torch.zeros(0), torch.zeros(1, 3, dtype=torch.bool), [(2, 3)])
    assert torch.equal(out[0], torch.zeros(2, 3))


# ---------------------------------------------------------------------- private top-k
def _gumbel_top_k(scores, k, epsilon, seed):
    """The documented mechanism, computed here with numpy: utilities s / max s (non-finite and
    negative scores count as 0), i.i.d. Gumbel noise of scale 2k/ε from the generator's
    uniforms, the k largest, ties to slot order."""
    import numpy as np

    s = np.nan_to_num(scores.reshape(-1).double().numpy(), nan=0.0, posinf=0.0, neginf=0.0)
    s = np.maximum(s, 0.0)
    util = s / s.max() if s.max() > 0 else np.zeros_like(s)
    k = min(k, s.size)
    u = torch.rand(s.size, generator=torch.Generator().manual_seed(seed),
                   dtype=torch.float64).numpy()
    noisy = util + (2.0 * k / epsilon) * -np.log(-np.log(u))
    chosen = np.argsort(-noisy, kind="stable")[:k]
    out = np.zeros(s.size, dtype=bool)
    out[chosen] = True
    return torch.from_numpy(out).reshape(scores.shape)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 3), st.integers(1, 4), st.integers(1, 14), st.sampled_from([0.1, 1.0, 8.0]),
       st.sampled_from(["random", "zeros", "special"]), st.integers(0, 10_000))
def test_private_top_k_is_the_one_shot_gumbel_mechanism(num_modules, rank, k, epsilon, kind, seed):
    g = torch.Generator().manual_seed(seed + 1)
    if kind == "random":
        scores = torch.rand(num_modules, rank, generator=g) * 5
    elif kind == "zeros":
        scores = torch.zeros(num_modules, rank)
    else:  # NaN, ±inf and negative scores all count as 0
        pool = torch.tensor([float("nan"), float("inf"), float("-inf"), -2.0, 0.5, 1.5])
        scores = pool[torch.randint(0, 6, (num_modules, rank), generator=g)]
    got = private_top_k(scores, k, epsilon, torch.Generator().manual_seed(seed))
    assert got.shape == scores.shape and int(got.sum()) == min(k, scores.numel())
    assert torch.equal(got, _gumbel_top_k(scores, k, epsilon, seed))


def test_private_top_k_is_invariant_to_the_scale_of_the_scores():
    scores = torch.rand(3, 4, generator=torch.Generator().manual_seed(5))
    for seed in range(5):
        a = private_top_k(scores, 3, 2.0, torch.Generator().manual_seed(seed))
        b = private_top_k(scores * 1e4, 3, 2.0, torch.Generator().manual_seed(seed))
        assert torch.equal(a, b)


def test_private_top_k_of_nothing_and_epsilon_checks():
    scores = torch.rand(2, 3)
    gen = torch.Generator().manual_seed(0)
    for k in (0, -1):
        out = private_top_k(scores, k, 1.0, gen)
        assert out.shape == (2, 3) and out.dtype == torch.bool and not out.any()
    for eps in (0.0, -1.0):
        with pytest.raises(ValueError, match="epsilon"):
            private_top_k(scores, 1, eps, gen)
    assert int(private_top_k(scores, 1, 0.5, gen).sum()) == 1  # ε below 1 is allowed
    # no slots at all, k > 0: an empty selection, as select_top_k's (it divided ε by 0)
    for shape in ((0, 4), (3, 0)):
        out = private_top_k(torch.zeros(shape), 2, 1.0, gen)
        assert out.shape == shape and out.dtype == torch.bool
        assert torch.equal(out, select_top_k(torch.zeros(shape), 2))


@pytest.mark.parametrize("epsilon", [4.0, 16.0, 64.0])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("kind", ["random", "special"])
def test_private_top_k_matches_the_mechanism_where_the_scores_matter(epsilon, k, kind):
    # At a large ε the noise (scale 2k/ε) is comparable to the utilities, so the noise scale,
    # the normalisation and the treatment of non-finite or negative scores all show.
    pool = torch.tensor([float("nan"), float("inf"), float("-inf"), -2.0, 0.5, 1.5, 3.0])
    for seed in range(15):
        g = torch.Generator().manual_seed(1000 + seed)
        scores = (torch.rand(2, 4, generator=g) * 5 if kind == "random"
                  else pool[torch.randint(0, 7, (2, 4), generator=g)])
        got = private_top_k(scores, k, epsilon, torch.Generator().manual_seed(seed))
        assert torch.equal(got, _gumbel_top_k(scores, k, epsilon, seed)), (scores, seed)


def test_score_kind_is_compared_by_value_not_identity():
    # a kind read from a config file is a fresh string object, not the interned literal
    dB, A = [torch.full((4, 1), 1.0)], [torch.full((1, 9), 1.0)]
    rms = slot_scores("B", dB, A, kind="".join(["r", "m", "s"]))
    assert torch.allclose(rms, torch.ones(1, 1))  # ‖·‖ = 6, divided by √(4·9)
