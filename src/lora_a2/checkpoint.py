"""Atomic checkpoints of a run: everything needed to continue after a crash, in one file.

``DIR/checkpoint.safetensors`` holds the global state's tensors, every tensor of the strategy's
``extra`` state, and a JSON header with the round number and the non-tensor ``extra`` values.
It is written to a temporary file, fsynced, then renamed over the old one, so at any instant
the file on disk is a complete checkpoint of some finished round.

No RNG state needs saving: every random draw of a round (client sampling, dropout, shuffling,
dropout masks in the model) is seeded from (seed, round, client), so round t+1 after a resume
draws exactly what it would have drawn without the crash.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from .errors import UserError
from .report import atomic_write_bytes
from .messages import ServerState

CHECKPOINT = "checkpoint.safetensors"
_STATE, _EXTRA, _CLIENT = "state/", "extra/", "client/"


def _split_extra(extra: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors (also inside one level of dicts/lists) go to safetensors, the rest to JSON."""
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {}
    for key, value in extra.items():
        if isinstance(value, torch.Tensor):
            tensors[f"{_EXTRA}{key}"] = value
        elif isinstance(value, dict) and value and all(isinstance(v, torch.Tensor)
                                                       for v in value.values()):
            for k, v in value.items():
                tensors[f"{_EXTRA}{key}/{k}"] = v
            plain[key] = {"__tensor_dict__": list(value)}
        elif isinstance(value, list) and value and all(isinstance(v, torch.Tensor) for v in value):
            for i, v in enumerate(value):
                tensors[f"{_EXTRA}{key}/{i}"] = v
            plain[key] = {"__tensor_list__": len(value)}
        else:
            plain[key] = value
    return tensors, plain


def _join_extra(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    for key, value in plain.items():
        if isinstance(value, dict) and "__tensor_dict__" in value:
            extra[key] = {k: tensors[f"{_EXTRA}{key}/{k}"] for k in value["__tensor_dict__"]}
        elif isinstance(value, dict) and "__tensor_list__" in value:
            extra[key] = [tensors[f"{_EXTRA}{key}/{i}"] for i in range(value["__tensor_list__"])]
        else:
            extra[key] = value
    for name, t in tensors.items():
        if name.startswith(_EXTRA) and "/" not in name[len(_EXTRA):]:
            extra[name[len(_EXTRA):]] = t
    return extra


def save_checkpoint(out_dir: Path, rnd: int, state: ServerState,
                    client_stores: dict[int, dict[str, torch.Tensor]] | None = None,
                    identity: dict[str, str] | None = None) -> Path:
    """Atomically replace ``DIR/checkpoint.safetensors`` with the state after round ``rnd``.

    ``client_stores``: what the simulated clients keep between their rounds (local engine), so
    that a resumed personalised run continues with each client's own tensors. ``identity``:
    digests of what the run is (its config, its data), kept in the header so that a resume can
    check it continues the same run (:func:`checkpoint_identity`)."""
    out_dir = Path(out_dir)
    extra_tensors, plain = _split_extra(state.extra)
    tensors = {f"{_STATE}{k}": v.detach().cpu().contiguous() for k, v in state.tensors.items()}
    tensors.update({k: v.detach().cpu().contiguous() for k, v in extra_tensors.items()})
    for c, store in (client_stores or {}).items():
        tensors.update({f"{_CLIENT}{c}/{k}": v.detach().cpu().contiguous()
                        for k, v in store.items()})
    meta = {"round": str(rnd), "extra": json.dumps(plain),
            "state_order": json.dumps(list(state.tensors))}
    if identity:
        meta["identity"] = json.dumps(identity, sort_keys=True)
    blob = st_save(tensors, metadata=meta)
    path = out_dir / CHECKPOINT
    atomic_write_bytes(path, blob)
    return path


def load_checkpoint(out_dir: Path) -> tuple[int, ServerState] | None:
    """(round, state) of the last complete round, or None when no checkpoint exists."""
    path = Path(out_dir) / CHECKPOINT
    if not path.exists():
        return None
    data = path.read_bytes()
    try:
        tensors = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        meta = json.loads(data[8:8 + header_len])["__metadata__"]
        rnd = int(meta["round"])
        plain = json.loads(meta["extra"])
        order = json.loads(meta["state_order"])
        state = {k: tensors[f"{_STATE}{k}"] for k in order}
        extra = _join_extra({k: v for k, v in tensors.items() if k.startswith(_EXTRA)}, plain)
    except (SafetensorError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        raise UserError(f"checkpoint '{path}' is unreadable; cannot resume this run") from None
    return rnd, ServerState(state, extra)


def checkpoint_identity(out_dir: Path) -> dict[str, str]:
    """The ``identity`` digests the last checkpoint was saved with (empty: none, or a
    checkpoint written before they were kept)."""
    path = Path(out_dir) / CHECKPOINT
    if not path.exists():
        return {}
    try:
        with path.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            meta = json.loads(f.read(header_len)).get("__metadata__") or {}
        identity = json.loads(meta.get("identity", "{}"))
    except (ValueError, AttributeError, OSError):
        raise UserError(f"checkpoint '{path}' is unreadable; cannot resume this run") from None
    if not isinstance(identity, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in identity.items()):
        raise UserError(f"checkpoint '{path}' is unreadable; cannot resume this run")
    return identity


def load_client_stores(out_dir: Path) -> dict[int, dict[str, torch.Tensor]]:
    """The clients' own tensors saved with the last checkpoint (empty when none)."""
    path = Path(out_dir) / CHECKPOINT
    if not path.exists():
        return {}
    stores: dict[int, dict[str, torch.Tensor]] = {}
    try:
        for key, t in st_load(path.read_bytes()).items():
            if key.startswith(_CLIENT):
                client, name = key[len(_CLIENT):].split("/", 1)
                stores.setdefault(int(client), {})[name] = t
    except (SafetensorError, ValueError):  # a foreign key: "client/x" without a name, or "a/b"
        raise UserError(f"checkpoint '{path}' is unreadable; cannot resume this run") from None
    return stores
