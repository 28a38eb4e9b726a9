"""Federated strategies, one per file, registered by name (see :mod:`.base`).

Adding a method is one new module in this package with a ``@register`` class: every module here
is imported by :func:`load_all`, and the config accepts every registered name.
"""

import importlib
import pkgutil

from .base import REGISTRY, Strategy, get_strategy, register

_SHARED = {"base", "hetero"}  # helpers, not strategies


def load_all() -> None:
    """Import every strategy module of this package so that each registers itself."""
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _SHARED:
            importlib.import_module(f"{__name__}.{info.name}")


def strategy_names() -> list[str]:
    """Registered strategy names, in a stable order."""
    load_all()
    return sorted(REGISTRY)


load_all()

__all__ = ["REGISTRY", "Strategy", "get_strategy", "register", "load_all", "strategy_names"]
