"""Aggregation rules against independently computed identities."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_a2.aggregation import aggregate_slots, data_weights, weighted_sum


def _masked(t, row, factor):
    return t * (row.reshape(1, -1) if factor == "B" else row.reshape(-1, 1)).to(t.dtype)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.sampled_from(["A", "B"]), st.data())
def test_alternating_aggregation_is_exact_product_average(num_clients, factor, data):
    # Prepare: a global (A, B), client factors that differ only in the active one.
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10_000)))
    r, d_in, d_out = 4, 5, 6
    A = torch.randn(r, d_in, generator=g, dtype=torch.float64)
    B = torch.randn(d_out, r, generator=g, dtype=torch.float64)
    sizes = [data.draw(st.integers(1, 50)) for _ in range(num_clients)]
    w = [n / sum(sizes) for n in sizes]
    sels = [torch.rand(1, r, generator=g) < 0.6 for _ in range(num_clients)]
    active = B if factor == "B" else A
    deltas = [_masked(torch.randn(active.shape, generator=g, dtype=torch.float64), s[0], factor)
              for s in sels]
    # Execute
    agg = aggregate_slots(factor, [[d] for d in deltas], sels, data_weights(sizes))[0]
    new = active + agg
    # Assert: the new global product equals Σ_k w_k (client k's product), computed by hand.
    if factor == "B":
        expected = sum(wk * ((B + dk) @ A) for wk, dk in zip(w, deltas))
        got = new @ A
    else:
        expected = sum(wk * (B @ (A + dk)) for wk, dk in zip(w, deltas))
        got = B @ new
    assert torch.allclose(got, expected, atol=1e-10)


def test_unselected_slot_contributes_zero_and_renormalise_averages_over_selectors():
    # Two clients, weights 0.25 / 0.75; slot 0 selected by both, slot 1 only by client 0.
    d0 = torch.tensor([[1.0, 2.0]])
    d1 = torch.tensor([[3.0, 0.0]])
    s0 = torch.tensor([[True, True]])
    s1 = torch.tensor([[True, False]])
    w = [0.25, 0.75]
    plain = aggregate_slots("B", [[d0], [d1]], [s0, s1], w)[0]
    assert torch.allclose(plain, torch.tensor([[0.25 * 1 + 0.75 * 3, 0.25 * 2]]))
    renorm = aggregate_slots("B", [[d0], [d1]], [s0, s1], w, renormalize=True)[0]
    assert torch.allclose(renorm, torch.tensor([[0.25 * 1 + 0.75 * 3, 2.0]]))


def test_data_weights_and_weighted_sum():
    assert data_weights([1, 3]) == [0.25, 0.75]
    t = weighted_sum([torch.ones(2), 3 * torch.ones(2)], [0.25, 0.75])
    assert torch.allclose(t, torch.full((2,), 2.5))
