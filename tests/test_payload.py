"""Wire format: round trips, exact byte counts, and garbage rejected with a reason."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_a2.payload import (DEFAULT_MAX_BYTES, LONGEST_FLOAT, InvalidPayload, Payload, decode,
                             encode, flatten, unflatten)


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


@settings(max_examples=300, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_longest_float_is_as_long_in_json_as_any_finite_float(x):
    """An upload's size bound gives a header scalar not known in advance (a loss) the longest
    JSON a finite float can take: 24 characters."""
    assert math.isfinite(LONGEST_FLOAT) and len(json.dumps(LONGEST_FLOAT)) == 24
    assert len(json.dumps(x)) <= len(json.dumps(LONGEST_FLOAT))


def test_size_is_values_plus_indices_plus_small_header():
    p = Payload(torch.zeros(1000), torch.arange(10, dtype=torch.int32), {"round": 1})
    blob = encode(p)
    assert 4000 + 40 < len(blob) < 4000 + 40 + 300


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_rejected_with_reason(blob):
    with pytest.raises(InvalidPayload) as e:
        decode(blob)
    assert str(e.value)


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


def test_only_bytes_are_decoded():
    good = encode(Payload(torch.ones(2)))
    assert torch.equal(decode(bytearray(good)).values, torch.ones(2))
    for bad in (good.decode("latin-1"), memoryview(good), None, 3):
        with pytest.raises(InvalidPayload, match=f"payload is {type(bad).__name__}, not bytes"):
            decode(bad)


def test_size_cap_is_inclusive():
    blob = encode(Payload(torch.zeros(10)))
    assert decode(blob, max_bytes=len(blob)).num_values == 10
    with pytest.raises(InvalidPayload, match=f"payload of {len(blob)} bytes exceeds the cap of "
                                             f"{len(blob) - 1}"):
        decode(blob, max_bytes=len(blob) - 1)
    assert DEFAULT_MAX_BYTES == 2 * 1024**3


def test_tensor_set_dtype_and_shape_are_checked():
    from safetensors.torch import save

    with pytest.raises(InvalidPayload, match="no 'values' tensor"):
        decode(save({"slots": torch.zeros(3, dtype=torch.int32)}))
    with pytest.raises(InvalidPayload, match=r"'values' must be a 1-D float32 tensor, got "
                                             r"torch.float32 of shape \(2, 2\)"):
        decode(save({"values": torch.zeros(2, 2)}))
    with pytest.raises(InvalidPayload, match=r"'slots' must be a 1-D int32 tensor, got torch.int64"):
        decode(save({"values": torch.zeros(2), "slots": torch.zeros(2, dtype=torch.int64)}))
    with pytest.raises(InvalidPayload, match=r"'slots' must be a 1-D int32 tensor, got "
                                             r"torch.int32 of shape \(1, 2\)"):
        decode(save({"values": torch.zeros(2), "slots": torch.zeros(1, 2, dtype=torch.int32)}))
    with pytest.raises(InvalidPayload, match=r"unexpected tensors in payload: \['a', 'z'\]"):
        decode(save({"values": torch.zeros(1), "z": torch.zeros(1), "a": torch.zeros(1)}))
    p = decode(save({"values": torch.zeros(2), "slots": torch.arange(3, dtype=torch.int32)}))
    assert p.meta == {} and p.slots.tolist() == [0, 1, 2]


def test_metadata_must_be_a_json_object():
    from safetensors.torch import save

    assert decode(save({"values": torch.zeros(1)}, metadata={"other": "x"})).meta == {}
    for meta in ("[1, 2]", "3", '"s"', "null"):
        with pytest.raises(InvalidPayload, match="not a JSON object"):
            decode(save({"values": torch.zeros(1)}, metadata={"meta": meta}))
    with pytest.raises(InvalidPayload, match="header is not valid JSON"):
        decode(save({"values": torch.zeros(1)}, metadata={"meta": "{nope"}))


def test_garbage_is_rejected_as_not_safetensors_with_the_parser_s_first_line():
    for junk in (b"", b"\x00" * 3, (2**63).to_bytes(8, "little") + b"{}", b"12345678{"):
        with pytest.raises(InvalidPayload, match="not a safetensors payload: "):
            decode(junk)


def test_encode_writes_float32_values_int32_slots_and_compact_json():
    p = Payload(torch.tensor([1.5, -2.0], dtype=torch.float64), torch.tensor([3, 1]),
                {"round": 1, "factor": "A"})
    blob = encode(p)
    q = decode(blob)
    assert q.values.dtype == torch.float32 and q.slots.dtype == torch.int32
    assert q.values.tolist() == [1.5, -2.0] and q.slots.tolist() == [3, 1]
    assert b'{"round":1,"factor":"A"}' in blob.replace(b"\\", b"")  # no spaces
    assert Payload(torch.zeros(7)).num_values == 7 and Payload(torch.zeros(7)).meta == {}


def test_flatten_order_dtype_and_empty():
    t = {"b": torch.tensor([[1, 2]], dtype=torch.int64), "a": torch.tensor([3.0], dtype=torch.float64)}
    v = flatten(t, ["b", "a"])  # the names' order, not the dict's
    assert v.dtype == torch.float32 and v.tolist() == [1.0, 2.0, 3.0]
    empty = flatten(t, [])
    assert empty.dtype == torch.float32 and empty.numel() == 0
    assert unflatten(torch.zeros(0), [], []) == {}
    with pytest.raises(InvalidPayload, match="expected 3 values, got 4"):
        unflatten(torch.zeros(4), ["b", "a"], [(1, 2), (1,)])
    back = unflatten(torch.arange(7.0), ["x", "y", "z"], [(2, 2), (0,), torch.Size([3])])
    assert back["x"].tolist() == [[0.0, 1.0], [2.0, 3.0]] and back["y"].numel() == 0
    assert back["z"].tolist() == [4.0, 5.0, 6.0]


def test_scalar_tensors_are_rejected():
    from safetensors.torch import save

    with pytest.raises(InvalidPayload, match="'values' must be a 1-D float32 tensor"):
        decode(save({"values": torch.tensor(1.0)}))
    with pytest.raises(InvalidPayload, match="'slots' must be a 1-D int32 tensor"):
        decode(save({"values": torch.zeros(1), "slots": torch.tensor(3, dtype=torch.int32)}))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(st.integers(0, 4), min_size=0, max_size=3), min_size=1, max_size=6))
def test_flatten_unflatten_round_trip(shapes):
    names = [f"t{i}" for i in range(len(shapes))]
    tensors, start = {}, 0
    for n, s in zip(names, shapes):  # consecutive values, so every slice boundary shows
        size = int(torch.Size(s).numel())
        tensors[n] = torch.arange(start, start + size, dtype=torch.float32).reshape(s)
        start += size
    flat = flatten(tensors, names)
    assert torch.equal(flat, torch.arange(start, dtype=torch.float32))
    back = unflatten(flat, names, shapes)
    assert list(back) == names and all(torch.equal(back[n], tensors[n]) for n in names)


def test_unflatten_length_check_past_256_values():
    with pytest.raises(InvalidPayload, match="expected 300 values, got 299"):
        unflatten(torch.zeros(299), ["a"], [(300,)])
    assert unflatten(torch.zeros(300), ["a"], [(3, 100)])["a"].shape == (3, 100)
