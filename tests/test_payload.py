"""Wire format: round trips, exact byte counts, and garbage rejected with a reason."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_a2.payload import InvalidPayload, Payload, decode, encode, flatten, unflatten


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3, width=32), max_size=50),
       st.one_of(st.none(), st.lists(st.integers(0, 10_000), max_size=20)))
def test_round_trip(values, slots):
    p = Payload(torch.tensor(values, dtype=torch.float32),
                None if slots is None else torch.tensor(slots, dtype=torch.int32),
                {"round": 3, "factor": "B"})
    blob = encode(p)
    q = decode(blob)
    assert torch.equal(q.values, p.values) and q.meta == p.meta
    assert (q.slots is None) == (slots is None)
    if slots is not None:
        assert torch.equal(q.slots, p.slots)


def test_size_is_values_plus_indices_plus_small_header():
    p = Payload(torch.zeros(1000), torch.arange(10, dtype=torch.int32), {"round": 1})
    blob = encode(p)
    assert 4000 + 40 < len(blob) < 4000 + 40 + 300


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_rejected_with_reason(blob):
    try:
        decode(blob)
    except InvalidPayload as e:
        assert str(e)


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 200), st.binary(min_size=1, max_size=8))
def test_mutated_payload_never_raises_anything_else(pos, junk):
    blob = bytearray(encode(Payload(torch.ones(16), torch.arange(4, dtype=torch.int32), {"a": 1})))
    pos = pos % len(blob)
    blob[pos:pos + len(junk)] = junk
    try:
        decode(bytes(blob))
    except InvalidPayload:
        pass


def test_wrong_dtype_and_size_cap_rejected():
    from safetensors.torch import save

    with pytest.raises(InvalidPayload, match="float32"):
        decode(save({"values": torch.zeros(3, dtype=torch.float64)}))
    with pytest.raises(InvalidPayload, match="exceeds"):
        decode(encode(Payload(torch.zeros(100))), max_bytes=50)
    with pytest.raises(InvalidPayload, match="unexpected"):
        decode(save({"values": torch.zeros(3), "evil": torch.zeros(1)}))


def test_flatten_unflatten():
    t = {"a": torch.arange(6.0).reshape(2, 3), "b": torch.tensor([7.0])}
    v = flatten(t, ["a", "b"])
    back = unflatten(v, ["a", "b"], [(2, 3), (1,)])
    assert torch.equal(back["a"], t["a"]) and torch.equal(back["b"], t["b"])
    with pytest.raises(InvalidPayload):
        unflatten(v[:-1], ["a", "b"], [(2, 3), (1,)])
