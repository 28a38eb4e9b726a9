"""The messages of a round: what the server sends a client (:class:`Task`), what a client
uploads (:class:`Update`), and the global state a strategy keeps (:class:`ServerState`).

They belong to the wire, beside :mod:`lora_a2.payload` (which encodes them to bytes): engines,
validation and checkpoints read them without importing any strategy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor

from .lowrank import pad_rank
from .payload import InvalidPayload, Payload, flatten, unflatten

if TYPE_CHECKING:
    from .adapter import ParamLayout


@dataclass
class Task:
    """What the server sends one client for one round.

    ``config`` is small and JSON-able (it travels in the payload header); ``download`` holds the
    federated parameters of the groups listed in ``config["send"]``, in layout order.
    With ``config["rank"] = r`` (heterogeneous-rank methods) only the first r slots of every A
    (rows) and B (columns) travel; the receiver zero-pads them back to the layout's rank.
    """

    round: int
    client_id: int
    config: dict[str, Any]
    download: dict[str, Tensor]

    def to_payload(self, layout: ParamLayout) -> Payload:
        names = layout.group_names(self.config["send"])
        meta = {"round": self.round, "client": self.client_id, **self.config}
        rank = self.config.get("rank")
        tensors = self.download if rank is None else {
            n: truncate_factor(n, t, rank) for n, t in self.download.items() if n in names}
        return Payload(values=flatten(tensors, names), meta=meta)

    @classmethod
    def from_payload(cls, payload: Payload, layout: ParamLayout) -> Task:
        meta = dict(payload.meta)
        rnd, client = int(meta.pop("round")), int(meta.pop("client"))
        names = layout.group_names(meta["send"])
        rank = meta.get("rank")
        if rank is None:
            return cls(rnd, client, meta, unflatten(payload.values, names, layout.shapes(names)))
        if not isinstance(rank, int) or not 0 <= rank <= layout.rank:
            raise InvalidPayload(f"task rank {rank!r} outside [0, {layout.rank}]")
        shapes = [_rank_shape(n, s, rank) for n, s in zip(names, layout.shapes(names))]
        got = unflatten(payload.values, names, shapes)
        return cls(rnd, client, meta, {n: pad_factor(n, t, layout.rank) for n, t in got.items()})


def _rank_shape(name: str, shape: tuple[int, ...], rank: int) -> tuple[int, ...]:
    if name.endswith(".A"):
        return (rank, shape[1])
    if name.endswith(".B"):
        return (shape[0], rank)
    return shape


def truncate_factor(name: str, t: Tensor, rank: int) -> Tensor:
    """The first ``rank`` slots of a LoRA factor (rows of ``*.A``, columns of ``*.B``)."""
    if name.endswith(".A"):
        return t[:rank]
    if name.endswith(".B"):
        return t[:, :rank]
    return t


def pad_factor(name: str, t: Tensor, rank: int) -> Tensor:
    """Zero-pad a LoRA factor to ``rank`` slots (inverse of :func:`truncate_factor`)."""
    if name.endswith(".A"):
        return pad_rank(t, rank, axis=0)
    if name.endswith(".B"):
        return pad_rank(t, rank, axis=1)
    return t


MAX_EXAMPLES = 2**53  # a claimed example count above this cannot be summed exactly in float64


def finite_number(x: Any) -> bool:
    """A JSON number from an untrusted header that is finite as a float (not a bool, a string,
    NaN, ±inf, or a 400-digit integer, on which ``math.isfinite`` itself overflows)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return False
    try:
        return math.isfinite(x)
    except OverflowError:
        return False


@dataclass
class Update:
    """What one client uploads: flat values (+ slot ids for sparse uploads) and a few scalars."""

    client_id: int
    num_examples: int
    values: Tensor
    slots: Tensor | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_payload(self) -> Payload:
        meta = {"client": self.client_id, "num_examples": self.num_examples, **self.meta}
        return Payload(values=self.values, slots=self.slots, meta=meta)

    @classmethod
    def from_payload(cls, payload: Payload) -> Update:
        meta = dict(payload.meta)
        client, n = meta.pop("client", None), meta.pop("num_examples", None)
        if type(client) is not int or type(n) is not int:  # JSON integers only: not true,
            # "1", 1.99 or inf, which int() would have turned into some number
            raise InvalidPayload("upload header lacks an integer 'client' or 'num_examples'")
        if not 0 < n <= MAX_EXAMPLES:
            raise InvalidPayload(f"upload claims {str(n)[:24]} training examples")
        loss = meta.get("loss")
        if loss is not None and not finite_number(loss):
            raise InvalidPayload(f"upload's training loss {str(loss)[:40]!r} is not a finite number")
        return cls(client, n, payload.values, payload.slots, meta)


@dataclass
class ServerState:
    """The global federated parameters plus whatever else a strategy keeps between rounds."""

    tensors: dict[str, Tensor]
    extra: dict[str, Any] = field(default_factory=dict)
