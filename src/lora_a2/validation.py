"""Server-side acceptance of a client upload: the one place both engines check untrusted input.

An upload is used only if it decodes as safetensors (never pickle) within the size cap, names
the client that was asked, passes the strategy's structural checks (slot indices in range,
unique and within the client's budget — slot ids are the wire's module names, so an unknown
module is an out-of-range id —, the exact number of float32 values the layout implies), holds
only finite values, and, when a bound is set, has an L2 norm within it. Anything else is an
:class:`~lora_a2.payload.InvalidPayload` whose message is the reason recorded in the metrics.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .payload import DEFAULT_MAX_BYTES, InvalidPayload, decode
from .messages import Task, Update
from .strategies.base import Strategy


@dataclass(frozen=True)
class UploadLimits:
    """Bounds the server enforces on every upload."""

    max_bytes: int = DEFAULT_MAX_BYTES
    max_norm: float = 0.0  # 0 = no bound


def receive_upload(strategy: Strategy, task: Task, blob: bytes, limits: UploadLimits,
                   examples: int | None = None) -> Update:
    """Decode and validate one upload for ``task``; raise :class:`InvalidPayload` if unusable.
    ``examples``: the client's training-set size in the partition the server drew (public):
    an upload claiming another count — the weight it gets in the aggregate — is refused."""
    update = Update.from_payload(decode(blob, limits.max_bytes))
    check_update(strategy, task, update, limits, examples)
    return update


def check_update(strategy: Strategy, task: Task, update: Update, limits: UploadLimits,
                 examples: int | None = None) -> None:
    """The checks of :func:`receive_upload` after decoding: the client asked, the example
    count, the strategy's structure, finite values, the norm bound. Under SecAgg+ each client
    runs them on its own upload before masking it (the server never sees it)."""
    if update.client_id != task.client_id:
        raise InvalidPayload(f"upload names client {update.client_id}, expected {task.client_id}")
    if examples is not None and update.num_examples != examples:
        raise InvalidPayload(f"upload claims {update.num_examples} training examples; client "
                             f"{task.client_id} holds {examples} in the partition")
    try:
        strategy.validate(task, update)
    except InvalidPayload:
        raise
    except (ValueError, KeyError, TypeError, IndexError, RuntimeError, OverflowError) as e:
        # Untrusted bytes must never take the server down: a check that trips over a
        # malformed field (OverflowError: a float check on a 400-digit JSON integer) rejects
        # the upload like any other failed check.
        raise InvalidPayload(f"malformed upload ({type(e).__name__}: {str(e)[:120]})") from None
    if not torch.isfinite(update.values).all():
        raise InvalidPayload("upload contains NaN or Inf values")
    if limits.max_norm > 0:
        norm = float(torch.linalg.vector_norm(update.values.double()))
        if norm > limits.max_norm:
            raise InvalidPayload(f"update L2 norm {norm:.4g} exceeds the bound {limits.max_norm:.4g}")
