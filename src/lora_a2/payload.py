"""Wire format: what crosses the network, as safetensors bytes (never pickle), and its size.

A payload is a few flat tensors plus a small JSON header:
- ``values``: float32, every transmitted number back to back, in an order both sides derive from
  the shared :class:`~lora_a2.adapter.ParamLayout` (so no per-tensor names travel);
- ``slots`` (LoRA-A2 uploads only): int32 ids m · r_G + i of the transmitted slots;
- ``meta``: JSON of the few scalars the receiver needs (round, factor, budget, example count).

``upload_bytes`` and ``download_bytes`` are ``len()`` of these encoded payloads, exactly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

WIRE_DTYPE = torch.float32
DEFAULT_MAX_BYTES = 2 * 1024**3
#: a float whose JSON form is as long as any finite float's (24 characters): a header scalar
#: whose value is not known in advance takes it when an upload's size must be bounded
LONGEST_FLOAT = -2.2250738585072014e-308


class InvalidPayload(ValueError):
    """A payload that must not be used; ``str()`` is the one-line reason."""


@dataclass
class Payload:
    """Decoded content of one message (download task or upload)."""

    values: Tensor
    slots: Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_values(self) -> int:
        return int(self.values.numel())


def encode(payload: Payload) -> bytes:
    """Serialise to safetensors bytes; the metadata header holds ``meta`` as JSON."""
    tensors = {"values": payload.values.detach().to(WIRE_DTYPE).contiguous().cpu()}
    if payload.slots is not None:
        tensors["slots"] = payload.slots.detach().to(torch.int32).contiguous().cpu()
    return st_save(tensors, metadata={"meta": json.dumps(payload.meta, separators=(",", ":"))})


def decode(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES) -> Payload:
    """Parse bytes from the network; any malformation is an :class:`InvalidPayload`."""
    if not isinstance(data, (bytes, bytearray)):
        raise InvalidPayload(f"payload is {type(data).__name__}, not bytes")
    if len(data) > max_bytes:
        raise InvalidPayload(f"payload of {len(data)} bytes exceeds the cap of {max_bytes}")
    try:
        tensors = st_load(bytes(data))
    except (SafetensorError, ValueError, RuntimeError, OverflowError) as e:
        raise InvalidPayload(f"not a safetensors payload: {str(e).splitlines()[0][:200]}") from None
    except (KeyError, TypeError, AttributeError) as e:  # a dtype safetensors knows and torch
        # does not (F4, F6_E2M3, F8_E8M0 …): the library's own lookup fails
        raise InvalidPayload(f"payload has a tensor of a dtype torch cannot hold: "
                             f"{str(e)[:60]}") from None
    extra = set(tensors) - {"values", "slots"}
    if extra:
        raise InvalidPayload(f"unexpected tensors in payload: {sorted(extra)}")
    if "values" not in tensors:
        raise InvalidPayload("payload has no 'values' tensor")
    values = tensors["values"]
    if values.dtype != WIRE_DTYPE or values.dim() != 1:
        raise InvalidPayload(f"'values' must be a 1-D float32 tensor, got {values.dtype} "
                             f"of shape {tuple(values.shape)}")
    slots = tensors.get("slots")
    if slots is not None and (slots.dtype != torch.int32 or slots.dim() != 1):
        raise InvalidPayload(f"'slots' must be a 1-D int32 tensor, got {slots.dtype} "
                             f"of shape {tuple(slots.shape)}")
    meta = _read_meta(bytes(data))
    return Payload(values=values, slots=slots, meta=meta)


def _read_meta(data: bytes) -> dict[str, Any]:
    header_len = int.from_bytes(data[:8], "little")
    try:
        header = json.loads(data[8:8 + header_len])
        meta = json.loads(header.get("__metadata__", {}).get("meta", "{}"))
    except (ValueError, AttributeError, TypeError, RecursionError):  # JSONDecodeError, a
        # 5,000-digit number (int's digit limit) or 100,000 nested brackets
        raise InvalidPayload("payload header is not valid JSON") from None
    if not isinstance(meta, dict):
        raise InvalidPayload("payload metadata is not a JSON object")
    return meta


def flatten(tensors: dict[str, Tensor], names: Sequence[str]) -> Tensor:
    """Concatenate the named tensors (in ``names`` order) into one flat float32 vector."""
    if not names:
        return torch.zeros(0, dtype=WIRE_DTYPE)
    return torch.cat([tensors[n].detach().reshape(-1).to(WIRE_DTYPE).cpu() for n in names])


def unflatten(values: Tensor, names: Sequence[str],
              shapes: Sequence[torch.Size | tuple[int, ...]]) -> dict[str, Tensor]:
    """Inverse of :func:`flatten`; the length must match exactly."""
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    if sum(sizes) != values.numel():
        raise InvalidPayload(f"expected {sum(sizes)} values, got {values.numel()}")
    out: dict[str, Tensor] = {}
    pos = 0
    for n, s, size in zip(names, shapes, sizes):
        out[n] = values[pos:pos + size].reshape(s)
        pos += size
    return out
