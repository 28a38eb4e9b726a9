"""Our payload bytes, the run config and a reply's client timings as Flower records, and the
bytes Flower serialises for a message (see :mod:`lora_a2.engines.flower`)."""

from __future__ import annotations

import math

from ...payload import InvalidPayload

RECORD = "lora_a2"  # ArrayRecord holding the payload bytes
CONFIG_RECORD = "lora_a2_config"  # ConfigRecord holding the run config (TOML) / node info
STORE_RECORD = "lora_a2_client_store"  # node-side Context.state: a client's own tensors
TIMING_RECORD = "lora_a2_timing"  # a reply's client-side timings (Flower overhead, not payload)
PAYLOAD_KEY = "payload"
STYPE = "safetensors"


def pack(blob: bytes, config_toml: str | None = None, timing: dict[str, float] | None = None):
    """Our payload bytes (and optionally the run config, or a reply's client timings) as Flower
    records."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

    rd = RecordDict({RECORD: ArrayRecord({PAYLOAD_KEY: Array(
        dtype="uint8", shape=(len(blob),), stype=STYPE, data=bytes(blob))})})
    if config_toml is not None:
        rd[CONFIG_RECORD] = ConfigRecord({"config": config_toml})
    if timing is not None:
        rd[TIMING_RECORD] = ConfigRecord(timing)
    return rd


def timing_of(content) -> dict[str, float]:
    """The client-side timings a reply carries: ``pid``, ``build_s``, ``train_s``, ``codec_s``
    as finite numbers, else empty (a reply without them, or with garbage, is simply not timed:
    timings are diagnostics and never fail a round)."""
    try:
        t = {k: float(content.config_records[TIMING_RECORD][k])
             for k in ("pid", "build_s", "train_s", "codec_s")}
    except (KeyError, AttributeError, TypeError, ValueError):
        return {}
    return t if all(math.isfinite(v) for v in t.values()) else {}


def unpack(content) -> bytes:
    """The payload bytes of a message; :class:`InvalidPayload` if they are not there."""
    try:
        arr = content.array_records[RECORD][PAYLOAD_KEY]
    except (KeyError, AttributeError, TypeError):
        raise InvalidPayload(f"message holds no '{RECORD}.{PAYLOAD_KEY}' array") from None
    if arr.stype != STYPE:
        raise InvalidPayload(f"payload array has stype {arr.stype!r}, expected {STYPE!r}")
    return bytes(arr.data)


def message_bytes(msg) -> int:
    """Bytes Flower serialises for ``msg``: the sum of the deflated bodies (with headers) of
    every object in the message's object tree (message, record dict, records, arrays, array
    chunks) — what the SuperLink stores and pushes/pulls object by object. gRPC/HTTP framing
    and the message-id bookkeeping calls are not included."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    return sum(len(o.deflate()) for o in get_all_nested_objects(msg).values())
