"""The registry of strategies by name: built-ins register with ``@register``, plugins through
entry points (:mod:`lora_a2.strategies`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .options import option_defaults

if TYPE_CHECKING:
    from .base import Strategy

REGISTRY: dict[str, type[Strategy]] = {}


def register(cls: type[Strategy]) -> type[Strategy]:
    """Class decorator: make a strategy available by its ``name``."""
    REGISTRY[cls.name] = cls
    return cls


def other_option_defaults(cls: type[Strategy]) -> dict[str, list[Any]]:
    """Option name → its defaults in the registered strategies other than ``cls`` (see
    :func:`~.options.resolve_options`)."""
    out: dict[str, list[Any]] = {}
    for other in REGISTRY.values():
        if other is not cls:
            for k, v in option_defaults(other.Options).items():
                out.setdefault(k, []).append(v)
    return out
