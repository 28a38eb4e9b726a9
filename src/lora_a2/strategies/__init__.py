"""Federated strategies, one per file, registered by name (see :mod:`.base`)."""

from .base import REGISTRY, Strategy, get_strategy, register


def load_all() -> None:
    """Import every strategy module so that each registers itself."""
    from . import fedavg_full, ffa_lora, fl_lora, flexlora, flora, hetlora, lora_a2  # noqa: F401


load_all()

__all__ = ["REGISTRY", "Strategy", "get_strategy", "register", "load_all"]
