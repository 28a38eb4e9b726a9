"""Server math of the heterogeneous-rank baselines, on tiny tensors, against identities computed
independently here (explicit loops, F.pad, numpy's SVD). The model-level checks live in
test_hetero.py and test_new_strategies.py."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_a2.lowrank import (exact_residual, norm_weights, orthonormal_refactor, pad_and_average,
                             pad_rank, product_norm, prune_decision, pruned_rank, stack_lora,
                             truncate_rank, truncated_svd, weighted_product_sum)

SEEDS = st.integers(0, 2**31 - 1)


def _randn(*shape, g, dtype=torch.float64):
    return torch.randn(*shape, generator=g, dtype=dtype)


def _factors(g, ranks, d_out=4, d_in=5, dtype=torch.float64):
    Bs = [_randn(d_out, r, g=g, dtype=dtype) for r in ranks]
    As = [_randn(r, d_in, g=g, dtype=dtype) for r in ranks]
    return Bs, As


def _weights(g, n):
    w = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    return (w / w.sum()).tolist()


# ---------------------------------------------------------------------- rank padding
@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(0, 4), st.sampled_from([0, 1]),
       st.sampled_from([torch.float32, torch.float64]), SEEDS)
def test_pad_rank_appends_zero_slots_along_the_axis(have, other, extra, axis, dtype, seed):
    shape = (have, other) if axis == 0 else (other, have)
    t = _randn(*shape, g=torch.Generator().manual_seed(seed), dtype=dtype)
    out = pad_rank(t, have + extra, axis)
    # independent: F.pad pads the last dim first, as (left, right, top, bottom)
    expected = F.pad(t, (0, 0, 0, extra) if axis == 0 else (0, extra))
    assert out.dtype == dtype and torch.equal(out, expected)
    assert torch.equal(truncate_rank(out, have, axis), t)


def test_pad_rank_refuses_to_shrink_and_truncate_rank_caps_at_what_is_there():
    t = torch.ones(3, 2)
    with pytest.raises(ValueError, match="cannot pad 3 slots down to 2"):
        pad_rank(t, 2, 0)
    assert pad_rank(t, 3, 0) is t  # nothing to pad
    assert torch.equal(truncate_rank(t, 5, 0), t)
    assert torch.equal(truncate_rank(t, 1, 1), t[:, :1])
    assert truncate_rank(t, 0, 0).shape == (0, 2)


# ---------------------------------------------------------------------- weights
def test_norm_weights_normalise_or_fall_back():
    assert norm_weights([1.0, 3.0], fallback=[0.5, 0.5]) == [0.25, 0.75]
    assert norm_weights([2, 2, 4], fallback=[0.0] * 3) == [0.25, 0.25, 0.5]
    assert norm_weights([0.125, 0.375], fallback=[0.5, 0.5]) == [0.25, 0.75]  # Σ below 1
    for bad in ([0.0, 0.0], [-1.0, 0.5], [float("inf"), 1.0], [float("nan"), 1.0]):
        out = norm_weights(bad, fallback=[1, 3])
        assert out == [1.0, 3.0] and all(isinstance(w, float) for w in out)


# ---------------------------------------------------------------------- FlexLoRA
@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=4), st.booleans(), SEEDS)
def test_weighted_product_sum_is_the_explicit_sum(ranks, scaled, seed):
    g = torch.Generator().manual_seed(seed)
    Bs, As = _factors(g, ranks)
    w = _weights(g, len(ranks))
    s = [0.5 + i for i in range(len(ranks))] if scaled else None
    expected = torch.zeros(4, 5, dtype=torch.float64)
    for k in range(len(ranks)):
        for i in range(ranks[k]):  # rank-1 terms, formed one by one
            expected += w[k] * (s[k] if scaled else 1.0) * torch.outer(Bs[k][:, i], As[k][i])
    got = weighted_product_sum(Bs, As, w, s)
    assert got.dtype == torch.float64 and torch.allclose(got, expected, atol=1e-12)
    got32 = weighted_product_sum([b.float() for b in Bs], [a.float() for a in As], w, s)
    assert got32.dtype == torch.float32 and torch.allclose(got32.double(), expected, atol=1e-5)


@pytest.mark.parametrize("fn", [weighted_product_sum, stack_lora, exact_residual])
def test_client_lists_must_match(fn):
    b, a = torch.ones(2, 1), torch.ones(1, 3)
    for Bs, As, w in (([], [], []), ([b], [a, a], [1.0]), ([b, b], [a, a], [1.0]),
                      ([b, b], [a], [0.5, 0.5]), ([b], [a], [0.5, 0.5])):
        with pytest.raises(ValueError, match="one B, one A and one weight per client"):
            fn(Bs, As, w)
    # more than 256 clients: the length checks compare values, not small cached ints
    n = 300
    fn([b] * n, [a] * n, [1 / n] * n)
    with pytest.raises(ValueError, match="one B, one A and one weight per client"):
        fn([b] * n, [a] * (n + 1), [1 / n] * n)
    with pytest.raises(ValueError, match="one B, one A and one weight per client"):
        fn([b] * n, [a] * n, [1 / n] * (n + 1))


def _numpy_sv(W):
    return np.linalg.svd(W.double().numpy(), compute_uv=False)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 8), SEEDS)
def test_truncated_svd_shapes_padding_and_singular_values(d_out, d_in, rank, seed):
    W = _randn(d_out, d_in, g=torch.Generator().manual_seed(seed)) * 3.0
    res = truncated_svd(W, rank)
    k = min(rank, d_out, d_in)
    sv = _numpy_sv(W)
    assert res.status == "ok"
    assert res.left.shape == (d_out, rank) and res.right.shape == (rank, d_in)
    assert res.singular_values.shape == (rank,) and res.singular_values.dtype == torch.float64
    assert np.allclose(res.singular_values[:k].numpy(), sv[:k], rtol=1e-9)
    # slots beyond min(d_out, d_in) are zero
    assert not res.left[:, k:].any() and not res.right[k:].any() and not res.singular_values[k:].any()
    # singular values on the left, orthonormal rows on the right
    assert np.allclose(res.left.norm(dim=0)[:k].numpy(), sv[:k], rtol=1e-9)
    assert torch.allclose(res.right[:k] @ res.right[:k].T, torch.eye(k, dtype=torch.float64),
                          atol=1e-10)
    err = float(torch.linalg.matrix_norm(W - res.left @ res.right))
    assert err == pytest.approx(math.sqrt(float((sv[k:] ** 2).sum())), abs=1e-9)


def test_truncated_svd_dtypes_and_empty():
    W = torch.tensor([[2, 0], [0, 1]], dtype=torch.int64)
    res = truncated_svd(W, 1)  # an integer matrix comes back as float32
    assert res.left.dtype == torch.float32 and res.right.dtype == torch.float32
    assert torch.allclose(res.left @ res.right, torch.tensor([[2.0, 0.0], [0.0, 0.0]]))
    res = truncated_svd(torch.eye(3, dtype=torch.float64) * 1e-3, 2)
    assert res.left.dtype == torch.float64 and res.singular_values.tolist() == pytest.approx([1e-3] * 2)
    empty = truncated_svd(torch.zeros(0, 4), 2)
    assert empty.status == "zero" and empty.left.shape == (0, 2) and empty.right.shape == (2, 4)


def test_truncated_svd_keeps_the_scale_of_huge_and_tiny_matrices():
    g = torch.Generator().manual_seed(7)
    base = _randn(5, 4, g=g)
    for scale in (1e-150, 1e150):
        W = base * scale
        res = truncated_svd(W, 2)
        sv = _numpy_sv(base) * scale
        assert res.singular_values[:2].numpy() == pytest.approx(sv[:2], rel=1e-9)
        assert torch.allclose(res.left @ res.right / scale, truncated_svd(base, 2).left
                              @ truncated_svd(base, 2).right, atol=1e-9)


def _broken_svd(monkeypatch, how: str, message: str = "did not converge"):
    real = torch.linalg.svd

    def svd(*a, **k):
        if how == "raise":
            raise torch.linalg.LinAlgError(message)
        u, s, vh = real(*a, **k)
        return u, s, vh * float("nan") if how == "nan-vh" else vh

    monkeypatch.setattr(torch.linalg, "svd", svd)


@pytest.mark.parametrize("how", ["raise", "nan-vh"])
def test_truncated_svd_falls_back_on_failure_or_non_finite_output(monkeypatch, how):
    W = _randn(6, 4, g=torch.Generator().manual_seed(8))
    _broken_svd(monkeypatch, how)
    res = truncated_svd(W, 3)
    assert res.status == "fallback"
    sv = _numpy_sv(W)
    assert res.singular_values[:3].numpy() == pytest.approx(sv[:3], rel=1e-8)
    err = float(torch.linalg.matrix_norm(W - res.left @ res.right))
    assert err == pytest.approx(float(sv[3]), rel=1e-8)


def test_truncated_svd_logs_the_first_line_of_the_error_cut_to_120_characters(monkeypatch, caplog):
    W = _randn(4, 3, g=torch.Generator().manual_seed(9))
    long = "x" * 119 + "yz"
    _broken_svd(monkeypatch, "raise", message=f"{long}\nsecond line")
    with caplog.at_level(logging.WARNING, logger="lora_a2.lowrank"):
        assert truncated_svd(W, 2).status == "fallback"
    assert f"failed ({long[:120]}); using a fallback" in caplog.text


@pytest.mark.parametrize("shape", [(9, 4), (4, 9), (5, 5)])
@pytest.mark.parametrize("scipy_result", ["raise", "nan"])
def test_gram_fallback_when_scipy_fails_too(monkeypatch, shape, scipy_result):
    import scipy.linalg

    g = torch.Generator().manual_seed(10)
    W = _randn(*shape, g=g)
    real_scipy = scipy.linalg.svd

    def scipy_svd(a, **k):
        if scipy_result == "raise":
            raise np.linalg.LinAlgError("no")
        u, s, vh = real_scipy(a, **k)
        return u, s * np.nan, vh

    _broken_svd(monkeypatch, "raise")
    monkeypatch.setattr(scipy.linalg, "svd", scipy_svd)
    res = truncated_svd(W, 3)
    assert res.status == "fallback"
    sv = _numpy_sv(W)
    assert res.singular_values[:3].numpy() == pytest.approx(sv[:3], rel=1e-8)
    assert torch.allclose(res.right @ res.right.T, torch.eye(3, dtype=torch.float64), atol=1e-8)
    err = float(torch.linalg.matrix_norm(W - res.left @ res.right))
    assert err == pytest.approx(math.sqrt(float((sv[3:] ** 2).sum())), rel=1e-7)


@pytest.mark.parametrize("shape", [(8, 5), (5, 5), (5, 8)])
def test_gram_fallback_on_a_rank_deficient_matrix_is_finite_and_exact(monkeypatch, shape):
    import scipy.linalg

    g = torch.Generator().manual_seed(11)
    W = _randn(shape[0], 2, g=g) @ _randn(2, shape[1], g=g)  # rank 2

    def fail(*a, **k):
        raise np.linalg.LinAlgError("no")

    _broken_svd(monkeypatch, "raise")
    monkeypatch.setattr(scipy.linalg, "svd", fail)
    res = truncated_svd(W, 4)
    assert res.status == "fallback"
    assert torch.isfinite(res.left).all() and torch.isfinite(res.right).all()
    assert torch.allclose(res.left @ res.right, W, atol=1e-9)
    assert res.singular_values[:2].numpy() == pytest.approx(_numpy_sv(W)[:2], rel=1e-8)
    assert float(res.singular_values[2:].abs().max()) < 1e-6
    # orthonormal right vectors, null ones too (tall: the eigenvectors of WᵀW; wide: the kept
    # rows completed to an orthonormal set): a factor built from them can still train
    assert torch.allclose(res.right @ res.right.T, torch.eye(4, dtype=torch.float64), atol=1e-8)


# ---------------------------------------------------------------------- HetLoRA
@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 4), min_size=1, max_size=4), st.sampled_from([0, 1]), SEEDS)
def test_pad_and_average_is_the_weighted_sum_of_zero_padded_factors(ranks, axis, seed):
    g = torch.Generator().manual_seed(seed)
    factors = [_randn(r, 3, g=g, dtype=torch.float32) if axis == 0
               else _randn(3, r, g=g, dtype=torch.float32) for r in ranks]
    w = _weights(g, len(ranks))
    r_max = max(ranks) + 1
    expected = torch.zeros((r_max, 3) if axis == 0 else (3, r_max), dtype=torch.float64)
    for f, wk in zip(factors, w):
        if axis == 0:
            expected[: f.shape[0]] += wk * f.double()
        else:
            expected[:, : f.shape[1]] += wk * f.double()
    got = pad_and_average(factors, w, r_max, axis)
    assert got.dtype == torch.float32 and torch.allclose(got.double(), expected, atol=1e-6)


def test_product_norm_is_the_frobenius_norm_of_the_product():
    g = torch.Generator().manual_seed(12)
    B, A = _randn(4, 2, g=g, dtype=torch.float32), _randn(2, 3, g=g, dtype=torch.float32)
    expected = float(np.linalg.norm(B.double().numpy() @ A.double().numpy()))
    assert product_norm(B, A) == pytest.approx(expected, rel=1e-12)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 64), st.integers(1, 100))
def test_pruned_rank_is_the_floor_of_gamma_r_in_exact_arithmetic(rank, percent):
    gamma = percent / 100  # a decimal γ, as a user writes it: ⌊γ r⌋ must not fall to float noise
    assert pruned_rank(rank, gamma) == max(1, min(rank, (percent * rank) // 100))


def test_pruned_rank_examples_that_float_rounding_gets_wrong():
    assert 0.29 * 100 < 29 and pruned_rank(100, 0.29) == 29
    assert pruned_rank(3, 2.0) == 3  # never above r
    assert pruned_rank(5, 0.1) == 1  # never below 1


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 32), st.sampled_from([0.25, 0.5, 0.75, 0.99, 1.0]),
       st.floats(0, 10), st.one_of(st.none(), st.floats(0, 10)))
def test_prune_decision_prunes_exactly_when_the_tail_fell(rank, gamma, tail, previous):
    target = max(1, min(rank, math.floor(gamma * rank + 1e-9)))
    expected = target if (previous is not None and target < rank and tail < previous) else rank
    assert prune_decision(rank, gamma, tail, previous) == expected


# ---------------------------------------------------------------------- FLoRA
@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 3), min_size=1, max_size=4), SEEDS)
def test_stack_lora_layout_and_product(ranks, seed):
    g = torch.Generator().manual_seed(seed)
    Bs, As = _factors(g, ranks)
    w = _weights(g, len(ranks))
    B, A = stack_lora(Bs, As, w)
    total = sum(ranks)
    assert B.shape == (4, total) and A.shape == (total, 5)
    start = 0
    for b, a, wk in zip(Bs, As, w):  # client k's block: its own B, its A times w_k
        r = b.shape[1]
        assert torch.equal(B[:, start:start + r], b)
        assert torch.allclose(A[start:start + r], wk * a, atol=1e-15)
        start += r


# ---------------------------------------------------------------------- FedEx-LoRA
@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 3), SEEDS)
def test_exact_residual_is_the_weighted_covariance_of_the_factors(clients, rank, seed):
    g = torch.Generator().manual_seed(seed)
    Bs, As = _factors(g, [rank] * clients)
    w = _weights(g, clients)
    b_mean = sum(wk * b for wk, b in zip(w, Bs))
    a_mean = sum(wk * a for wk, a in zip(w, As))
    expected = sum(wk * (b - b_mean) @ (a - a_mean) for wk, a, b in zip(w, As, Bs))
    got = exact_residual(Bs, As, w)
    assert got.dtype == torch.float64 and torch.allclose(got, expected, atol=1e-12)
    # folded into the base, it makes the averaged factors exact
    exact = sum(wk * b @ a for wk, a, b in zip(w, As, Bs))
    assert torch.allclose(b_mean @ a_mean + got, exact, atol=1e-12)
    got32 = exact_residual([b.float() for b in Bs], [a.float() for a in As], w)
    assert got32.dtype == torch.float32 and torch.allclose(got32.double(), expected, atol=1e-5)


def test_exact_residual_vanishes_when_clients_agree_on_a_factor():
    g = torch.Generator().manual_seed(13)
    b = _randn(4, 2, g=g)
    As = [_randn(2, 5, g=g) for _ in range(3)]
    res = exact_residual([b, b, b], As, [0.2, 0.3, 0.5])
    assert float(res.abs().max()) < 1e-12


# ---------------------------------------------------------------------- FedSVD
@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(4, 7), st.integers(4, 7), st.booleans(), SEEDS)
def test_orthonormal_refactor_is_the_svd_of_the_product(rank, d_out, d_in, deficient, seed):
    g = torch.Generator().manual_seed(seed)
    B, A = _randn(d_out, rank, g=g), _randn(rank, d_in, g=g)
    if deficient and rank > 1:
        B[:, -1] = B[:, 0]  # BA of rank r - 1
        A[-1] = 0.0
    new_b, new_a = orthonormal_refactor(B, A)
    assert new_b.shape == B.shape and new_a.shape == A.shape
    assert torch.allclose(new_b @ new_a, B @ A, atol=1e-10)
    assert torch.allclose(new_a @ new_a.T, torch.eye(rank, dtype=torch.float64), atol=1e-10)
    sv = _numpy_sv(B @ A)[:rank]
    gram = new_b.T @ new_b  # orthogonal columns whose norms are the singular values
    assert torch.allclose(gram, torch.diag(torch.as_tensor(sv ** 2)), atol=1e-9)
    nb32, na32 = orthonormal_refactor(B.float(), A.float())
    assert nb32.dtype == torch.float32 and na32.dtype == torch.float32
