"""Learning tasks, one per file, registered by name (see :mod:`.base`).

A task decides how examples are encoded, what the training loss is, how the model is evaluated
and what the adapter is exported as; strategies, aggregation, privacy, payloads, validation,
checkpoints and both engines never look inside one. Adding a task is one new module in this
package with a ``@register_task`` class.
"""

import importlib
import pkgutil

from .base import TASKS, LearningTask, get_task, register_task, resolve_task_name

_SHARED = {"base"}


def load_all() -> None:
    """Import every task module of this package so that each registers itself."""
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _SHARED:
            importlib.import_module(f"{__name__}.{info.name}")


def task_names() -> list[str]:
    """Registered task names, in a stable order."""
    load_all()
    return sorted(TASKS)


__all__ = ["TASKS", "LearningTask", "get_task", "load_all", "register_task",
           "resolve_task_name", "task_names"]
