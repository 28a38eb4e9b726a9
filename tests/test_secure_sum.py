"""The arithmetic of the secure sum (lora_a2.secure_sum), without Flower: each client's vector,
and the mean the server recovers from the unmasked sum of quantised vectors. SecAgg+'s
quantisation is re-implemented here from its definition (clip to ±c, scale to [0, Q], round
stochastically; the sum dequantised as Σ q · 2c/Q − n·c), so the tests do not lean on the code
they check."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_a2.secure_sum import client_vector, quantisation_tolerance, secure_mean

C, Q = 8.0, 4194304  # the config's defaults: secagg.clipping_range, secagg.quantization_range


def quantised_sum(xs: np.ndarray, clip: float, levels: int, g: np.random.Generator) -> np.ndarray:
    """What SecAgg+ unmasks: the clients' vectors clipped, quantised with stochastic rounding,
    summed as integers and mapped back to floats."""
    scaled = (np.clip(xs, -clip, clip) + clip) * (levels / (2 * clip))
    low = np.floor(scaled)
    q = low + (g.random(scaled.shape) < scaled - low)
    return q.sum(0) * (2 * clip / levels) - len(xs) * clip


def vectors(n: np.ndarray, v: np.ndarray, scale: float) -> np.ndarray:
    """x_k = [(n_k/S) v_k, n_k/S], computed here by hand."""
    w = n / scale
    return np.hstack([w[:, None] * v, w[:, None]])


def test_the_client_vector_is_the_weighted_upload_and_its_weight():
    """x_k = [(n_k/S) · v_k, n_k/S] in float64, nothing clipped while every entry is within ±c."""
    v = torch.tensor([0.5, -1.25, 3.0], dtype=torch.float32)
    strategy = SimpleNamespace(secure_vector=lambda task, update: v)
    x = client_vector(strategy, SimpleNamespace(client_id=3),
                      SimpleNamespace(num_examples=30), clip=C, scale=40.0)
    assert x.dtype == np.float64
    assert np.array_equal(x, [0.375, -0.9375, 2.25, 0.75])


def test_the_client_vector_clips_what_secagg_would_and_says_how_much(caplog):
    """Entries beyond ±c are clipped by the client itself (SecAgg+ would do it silently) and the
    number clipped is logged with the client's id; the weight entry (n_k/S ≤ 1) is never one."""
    v = torch.tensor([10.0, -20.0, 1.0, 4.0])
    strategy = SimpleNamespace(secure_vector=lambda task, update: v)
    with caplog.at_level(logging.WARNING, logger="lora_a2.secure_sum"):
        x = client_vector(strategy, SimpleNamespace(client_id=5),
                          SimpleNamespace(num_examples=20), clip=2.0, scale=20.0)
    assert np.array_equal(x, [2.0, -2.0, 1.0, 2.0, 1.0])
    assert "client 5: 3 entries outside" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lora_a2.secure_sum"):
        x = client_vector(strategy, SimpleNamespace(client_id=5),
                          SimpleNamespace(num_examples=20), clip=20.0, scale=20.0)
    assert np.array_equal(x, [10.0, -20.0, 1.0, 4.0, 1.0]) and caplog.text == ""


def test_the_tolerance_is_one_quantisation_step_per_client_doubled():
    """n · 2c/Q, doubled; a weight entry exactly that far from the public one is still taken
    (the bound is inclusive), a hair further is not."""
    assert quantisation_tolerance(3, 8.0, 4194304) == pytest.approx(2 * 3 * 16 / 4194304)
    assert quantisation_tolerance(1, 1.0, 4) == 1.0
    for got in (2.0, 0.0):  # public 1, tolerance 1: both ends of the band, exactly
        mean, reason = secure_mean(np.array([3.0, got]), 1.0, 1, 1.0, 4)
        assert reason is None and mean.tolist() == [3.0]
    assert secure_mean(np.array([3.0, np.nextafter(2.0, 3.0)]), 1.0, 1, 1.0, 4)[0] is None


def test_secure_mean_divides_by_the_public_weight_and_refuses_a_forged_one():
    """Three clients x_k = [(n_k/S) v_k, n_k/S], S = 40: the mean is Σ n_k v_k / Σ n_k. A
    fourth, malicious client whose weight entry cancels the others' (every entry within the
    clipping range) would make the sum's weight ≈ 0 and the mean explode: refused, with the
    reason. Quantisation noise within n·2c/Q of the public weight is accepted."""
    g = np.random.default_rng(0)
    n, S = np.array([10, 30, 40]), 40.0
    v = g.normal(size=(3, 5))
    x = vectors(n, v, S)
    public = float(n.sum() / S)
    want = (n[:, None] * v).sum(0) / n.sum()
    mean, reason = secure_mean(x.sum(0), public, 3, C, Q)
    assert reason is None and mean.dtype == torch.float64
    assert np.allclose(mean.numpy(), want, atol=1e-12)
    step = 2 * C / Q
    noisy = x.sum(0) + np.r_[np.zeros(5), 2.9 * step]  # within the quantisation error
    assert secure_mean(noisy, public, 3, C, Q)[1] is None
    forged = np.r_[np.full(5, 7.9), -public + 1e-6]  # |entries| ≤ c = 8
    total = x.sum(0) + forged
    mean, reason = secure_mean(total, public + 0.0, 4, C, Q)
    assert mean is None and "weight entry is 1e-06" in reason and "malformed" in reason
    # what dividing by the sent weight would have given: a mean a million times too large
    assert np.abs(total[:-1] / total[-1]).max() > 1e6


def test_secure_mean_refuses_a_public_weight_that_is_not_positive():
    """No survivors' weight (0, or a negative public value) is never a mean, even when the sum's
    entry agrees with it."""
    for w in (0.0, -0.5):
        mean, reason = secure_mean(np.array([1.0, w]), w, 1, C, Q)
        assert mean is None and "malformed" in reason


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 500), min_size=1, max_size=6),
       dim=st.integers(1, 40), seed=st.integers(0, 2**32 - 1),
       clip=st.sampled_from([1.0, 8.0, 100.0]), levels=st.sampled_from([2**10, 2**16, 2**22]))
def test_the_recovered_mean_is_the_weighted_mean_up_to_quantisation(sizes, dim, seed, clip,
                                                                    levels):
    """Any clients, any example counts, any vectors within ±c: the unmasked quantised sum is
    accepted, and the mean it gives is Σ n_k v_k / Σ n_k within n · 2c/Q / (Σ n_k/S) per entry
    (the quantisation error of n clients, divided by the weight)."""
    g = np.random.default_rng(seed)
    n = np.array(sizes, dtype=np.float64)
    scale = float(n.max())
    v = g.uniform(-clip, clip, size=(len(n), dim))  # |(n_k/S) v_k| ≤ c: nothing clipped
    total = quantised_sum(vectors(n, v, scale), clip, levels, g)
    public = float(n.sum() / scale)
    mean, reason = secure_mean(total, public, len(n), clip, levels)
    assert reason is None
    want = (n[:, None] * v).sum(0) / n.sum()
    bound = len(n) * (2 * clip / levels) / public
    assert np.max(np.abs(mean.numpy() - want)) <= bound * (1 + 1e-9)


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.integers(1, 500), min_size=2, max_size=6), seed=st.integers(0, 2**32 - 1),
       liar=st.integers(0, 5), beyond=st.floats(1.51, 1e6))
def test_any_weight_entry_beyond_the_quantisation_error_is_refused(sizes, seed, liar, beyond):
    """One client sends a weight entry off its public n_k/S by more than 1.5 × the round's
    tolerance (the tolerance, plus the quantisation error, at most half of it, that could pull
    the sum back), with every entry still within ±c so SecAgg+ takes it: the round is refused
    whatever the direction, never silently rescaled. (A smaller forgery can pass; it moves the
    weight sum by at most 1.5 × 4nc/Q: n · 1.1e-5 at the defaults.)"""
    g = np.random.default_rng(seed)
    n = np.array(sizes, dtype=np.float64)
    scale = float(n.max())
    x = vectors(n, g.uniform(-1, 1, size=(len(n), 4)), scale)
    tol = quantisation_tolerance(len(n), C, Q)
    k = liar % len(n)
    for sign in (1.0, -1.0):
        forged = x.copy()
        forged[k, -1] = np.clip(forged[k, -1] + sign * beyond * tol, -C, C)
        if abs(forged[k, -1] - x[k, -1]) <= 1.5 * tol:
            continue  # the clip to ±c pulled it back: not a forgery this test can promise
        mean, reason = secure_mean(quantised_sum(forged, C, Q, g) + 0.0, float(n.sum() / scale),
                                   len(n), C, Q)
        assert mean is None and "malformed" in reason
