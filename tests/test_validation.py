"""The server's acceptance of an upload (lora_a2.validation), with a stub strategy: each check
in isolation, its boundary, and the reason it gives. test_reliability.py fuzzes the same function
with real strategies and a real model."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_a2.payload import DEFAULT_MAX_BYTES, InvalidPayload, encode
from lora_a2.strategies import Task, Update
from lora_a2.validation import UploadLimits, receive_upload

TASK = Task(round=2, client_id=3, config={}, download={})


class Stub:
    """A strategy whose structural check passes, or raises what it is told to."""

    def __init__(self, error: BaseException | None = None):
        self.error, self.calls = error, []

    def validate(self, task, update):
        self.calls.append((task, update))
        if self.error is not None:
            raise self.error


def blob(values, client=3, num_examples=7, **meta):
    v = torch.as_tensor(values, dtype=torch.float32)
    return encode(Update(client, num_examples, v, None, meta).to_payload())


def test_default_limits_are_the_wire_cap_and_no_norm_bound():
    limits = UploadLimits()
    assert limits.max_bytes == DEFAULT_MAX_BYTES and limits.max_norm == 0.0
    big = torch.full((10,), 1e30)  # any norm passes without a bound
    assert torch.equal(receive_upload(Stub(), TASK, blob(big), limits).values, big)


def test_an_honest_upload_comes_back_decoded_after_the_strategy_checked_it():
    stub = Stub()
    up = receive_upload(stub, TASK, blob([3.0, 4.0], round=2), UploadLimits(max_norm=5.0))
    assert (up.client_id, up.num_examples, up.values.tolist(), up.slots, up.meta) == \
        (3, 7, [3.0, 4.0], None, {"round": 2})
    assert len(stub.calls) == 1 and stub.calls[0][0] is TASK and stub.calls[0][1] is up


def test_the_size_cap_is_the_limit_given():
    data = blob([1.0] * 20)
    receive_upload(Stub(), TASK, data, UploadLimits(max_bytes=len(data)))
    with pytest.raises(InvalidPayload, match="exceeds the cap"):
        receive_upload(Stub(), TASK, data, UploadLimits(max_bytes=len(data) - 1))


@pytest.mark.parametrize("held", [6, 8, 0, 70])
def test_an_upload_claiming_another_example_count_is_rejected(held):
    """The example count an upload claims is its weight in the aggregate: one other than the
    client's public count in the partition (more or fewer) is refused before the strategy sees
    it; the same count passes, and no count given checks nothing."""
    stub = Stub()
    with pytest.raises(InvalidPayload, match=f"claims 7 training examples; client 3 holds {held}"):
        receive_upload(stub, TASK, blob([1.0]), UploadLimits(), examples=held)
    assert stub.calls == []
    assert receive_upload(stub, TASK, blob([1.0]), UploadLimits(), examples=7).num_examples == 7
    assert receive_upload(stub, TASK, blob([1.0]), UploadLimits()).num_examples == 7
    # an equal count is equal by value, not identity (large ints are separate objects)
    big = int("1000000")
    assert receive_upload(stub, TASK, blob([1.0], num_examples=10 ** 6), UploadLimits(),
                          examples=big).num_examples == big


@pytest.mark.parametrize("client,num_examples", [(True, 7), ("3", 7), (3.99, 7), (3, "7"),
                                                (3, 7.9), (3, True), (None, 7)])
def test_an_upload_header_needs_json_integers(client, num_examples):
    """int() would have read "3", 3.99 or true as client 3 (or 1): the header is refused."""
    with pytest.raises(InvalidPayload, match="lacks an integer 'client' or 'num_examples'"):
        receive_upload(Stub(), TASK, blob([1.0], client=client, num_examples=num_examples),
                       UploadLimits(), examples=7)


@pytest.mark.parametrize("client", [0, 2, 4, -3])
def test_an_upload_naming_another_client_is_rejected_before_the_strategy_sees_it(client):
    stub = Stub()
    with pytest.raises(InvalidPayload, match=f"upload names client {client}, expected 3"):
        receive_upload(stub, TASK, blob([1.0], client=client), UploadLimits())
    assert not stub.calls


def test_the_strategys_own_rejection_passes_through_unchanged():
    err = InvalidPayload("slot 99 out of range")
    with pytest.raises(InvalidPayload) as e:
        receive_upload(Stub(err), TASK, blob([1.0]), UploadLimits())
    assert e.value is err


@pytest.mark.parametrize("exc", [ValueError, KeyError, TypeError, IndexError, RuntimeError,
                                 OverflowError])
def test_a_check_that_trips_over_a_malformed_field_rejects_the_upload(exc):
    with pytest.raises(InvalidPayload) as e:
        receive_upload(Stub(exc("bad field")), TASK, blob([1.0]), UploadLimits())
    assert str(e.value) == f"malformed upload ({exc.__name__}: {str(exc('bad field'))})"
    assert e.value.__cause__ is None and e.value.__suppress_context__


def test_the_reason_quotes_at_most_120_characters_of_the_error():
    long = "".join(chr(ord("a") + i % 26) for i in range(200))
    with pytest.raises(InvalidPayload) as e:
        receive_upload(Stub(ValueError(long)), TASK, blob([1.0]), UploadLimits())
    assert str(e.value) == f"malformed upload (ValueError: {long[:120]})"


@pytest.mark.parametrize("exc", [ZeroDivisionError, AssertionError, KeyboardInterrupt])
def test_other_errors_are_bugs_and_propagate(exc):
    with pytest.raises(exc):
        receive_upload(Stub(exc("x")), TASK, blob([1.0]), UploadLimits())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_rejected(bad):
    with pytest.raises(InvalidPayload, match="NaN or Inf"):
        receive_upload(Stub(), TASK, blob([1.0, bad, 2.0]), UploadLimits())


def test_the_norm_bound_is_inclusive_and_computed_in_float64():
    receive_upload(Stub(), TASK, blob([3.0, 4.0]), UploadLimits(max_norm=5.0))  # ‖·‖ = 5 exactly
    with pytest.raises(InvalidPayload, match=r"update L2 norm 5 exceeds the bound 4\.999"):
        receive_upload(Stub(), TASK, blob([3.0, 4.0]), UploadLimits(max_norm=4.999))
    # 1e20² overflows float32 but not float64: the norm is finite and checked
    with pytest.raises(InvalidPayload, match="norm 1.414e\\+20 exceeds"):
        receive_upload(Stub(), TASK, blob([1e20, 1e20]), UploadLimits(max_norm=1e20))


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, width=32), min_size=1, max_size=20), st.floats(0.01, 3.0))
def test_norm_bound_accepts_exactly_the_uploads_within_it(values, ratio):
    v = torch.tensor(values, dtype=torch.float32)
    norm = float(torch.linalg.vector_norm(v.double()))
    bound = norm * ratio if norm > 0 else ratio
    within = norm <= bound
    try:
        receive_upload(Stub(), TASK, blob(v), UploadLimits(max_norm=bound))
        accepted = True
    except InvalidPayload as e:
        assert "exceeds the bound" in str(e)
        accepted = False
    assert accepted == within


def test_limits_are_immutable():
    import dataclasses

    limits = UploadLimits(max_bytes=10, max_norm=1.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        limits.max_norm = 0.0
    assert hash(limits) == hash(UploadLimits(max_bytes=10, max_norm=1.0))


def test_client_ids_are_compared_by_value():
    # ids above 256 are not cached ints: an identity check would reject the right client
    task = Task(round=1, client_id=1000, config={}, download={})
    up = receive_upload(Stub(), task, blob([1.0], client=int("1000")), UploadLimits())
    assert up.client_id == 1000
