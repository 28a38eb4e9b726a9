"""Aggregation rules against independently computed identities."""

import pytest
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


def test_data_weights_need_an_example():
    assert data_weights([5]) == [1.0]
    assert data_weights([0, 2]) == [0.0, 1.0]
    for empty in ([], [0], [0, 0]):
        with pytest.raises(ValueError, match="at least one example"):
            data_weights(empty)


def test_weighted_sum_checks_its_arguments_and_accumulates_in_float64():
    with pytest.raises(ValueError, match="one weight per tensor"):
        weighted_sum([], [])
    with pytest.raises(ValueError, match="one weight per tensor"):
        weighted_sum([torch.ones(2)], [0.5, 0.5])
    with pytest.raises(ValueError, match="one weight per tensor"):
        weighted_sum([torch.ones(2), torch.ones(2)], [1.0])
    # float32 accumulation would lose the 1: 1e8 + 1 is not representable in float32
    parts = [torch.tensor([1e8]), torch.tensor([1.0]), torch.tensor([-1e8])]
    out = weighted_sum(parts, [1.0, 1.0, 1.0])
    assert out.dtype == torch.float32 and out.item() == 1.0
    assert weighted_sum([torch.ones(2, dtype=torch.float64)], [0.5]).dtype == torch.float64


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 4), st.sampled_from(["A", "B"]), st.data())
def test_renormalised_slots_are_the_average_over_the_clients_that_selected_them(clients, factor,
                                                                             data):
    """Per module and slot: each module has its own selections, so a slot's renormaliser is
    that module's cover, not another's."""
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 10_000)))
    r, d, modules = 4, 3, 2
    shape = (d, r) if factor == "B" else (r, d)
    sels = [torch.rand(modules, r, generator=g) < 0.5 for _ in range(clients)]
    deltas = [[_masked(torch.randn(shape, generator=g, dtype=torch.float64), s[m], factor)
               for m in range(modules)] for s in sels]
    sizes = [data.draw(st.integers(1, 20)) for _ in range(clients)]
    w = [n / sum(sizes) for n in sizes]
    got = aggregate_slots(factor, deltas, sels, w, renormalize=True)
    plain = aggregate_slots(factor, deltas, sels, w)
    for m in range(modules):
        for i in range(r):  # slot by slot, by hand
            chosen = [k for k in range(clients) if sels[k][m, i]]
            cover = sum(w[k] for k in chosen)
            slot = (lambda t: t[:, i]) if factor == "B" else (lambda t: t[i])
            exact = sum((w[k] * slot(deltas[k][m]) for k in chosen),
                        torch.zeros(d, dtype=torch.float64))
            assert torch.allclose(slot(plain[m]), exact, atol=1e-12)
            assert torch.allclose(slot(got[m]), exact / cover if chosen else exact, atol=1e-12)
        assert torch.isfinite(got[m]).all()


def test_renormalisation_uses_each_modules_own_cover():
    """Two modules whose slot 0 is covered by different clients: module 1's renormaliser is
    its own (weight 0.75), not module 0's (0.25)."""
    s0 = torch.tensor([[True], [False]])  # client 0 selects slot 0 of module 0 only
    s1 = torch.tensor([[False], [True]])  # client 1 slot 0 of module 1 only
    d0 = [torch.tensor([[4.0]]), torch.zeros(1, 1)]
    d1 = [torch.zeros(1, 1), torch.tensor([[8.0]])]
    out = aggregate_slots("B", [d0, d1], [s0, s1], [0.25, 0.75], renormalize=True)
    assert out[0].item() == 4.0 and out[1].item() == 8.0


def test_aggregation_keeps_the_module_order_and_the_dtype():
    d = [[torch.ones(2, 1), 2 * torch.ones(3, 1)], [3 * torch.ones(2, 1), torch.zeros(3, 1)]]
    sel = torch.ones(2, 1, dtype=torch.bool)
    out = aggregate_slots("B", d, [sel, sel], [0.5, 0.5], renormalize=True)
    assert [o.shape for o in out] == [(2, 1), (3, 1)] and out[0].dtype == torch.float32
    assert torch.equal(out[0], torch.full((2, 1), 2.0)) and torch.equal(out[1], torch.ones(3, 1))


def test_negative_example_counts_are_rejected():
    with pytest.raises(ValueError, match="at least one example"):
        data_weights([0, 0])
    # a positive total does not excuse a negative count (it would weigh as −0.5 and 1.5)
    for counts in ([-1, 3], [-1, -2]):
        with pytest.raises(ValueError, match="counts ≥ 0"):
            data_weights(counts)


def test_weighted_sum_of_many_clients():
    # more than 256 clients: the length check compares values, not small cached ints
    n = 300
    out = weighted_sum([torch.full((2,), float(k)) for k in range(n)], [1 / n] * n)
    assert torch.allclose(out, torch.full((2,), (n - 1) / 2))
