"""Learning tasks, one per file, registered by name (see :mod:`.base`).

A task decides how examples are encoded, what the training loss is, how the model is evaluated
and what the adapter is exported as; strategies, aggregation, privacy, payloads, validation,
checkpoints and both engines never look inside one. Adding a task is one new module in this
package with a ``@register_task`` class.
"""

import importlib
import pkgutil

from ..config import Config
from ..errors import UserError
from .base import TASKS, LearningTask, register_task

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


def resolve_task_name(cfg: Config) -> str:
    """``task.name``, or with ``auto`` the task that claims the model or the data (see
    :meth:`LearningTask.claims`); the ``fallback`` task (classification) when none does."""
    load_all()
    if cfg.task.name != "auto":
        return cfg.task.name
    for name in sorted(TASKS):
        if not TASKS[name].fallback and TASKS[name].claims(cfg):
            return name
    return next(name for name in sorted(TASKS) if TASKS[name].fallback)


def get_task(cfg: Config) -> LearningTask:
    name = resolve_task_name(cfg)
    if name not in TASKS:
        raise UserError(f"unknown task '{name}'; valid: auto, {', '.join(sorted(TASKS))}")
    task = TASKS[name](cfg)
    task.check(cfg)
    return task


def check_config(cfg: Config) -> None:
    """The config checks that need the task registry (one-line :class:`UserError`)."""
    names = task_names()
    t = cfg.task
    if not (t.name == "auto" or t.name in names):
        raise UserError(f"config key 'task.name' must be 'auto' or one of {', '.join(names)}, "
                        f"got {t.name!r}")
    resolved = resolve_task_name(cfg)
    task = TASKS[resolved]
    bounds = task.metric_range
    for target in cfg.report.targets if bounds is not None else ():
        if not bounds[0] <= target <= bounds[1]:
            raise UserError(f"config key 'report.targets' entries must be within task "
                            f"'{resolved}''s {task.metric} range [{bounds[0]:g}, {bounds[1]:g}] "
                            f"(0.7 = 70 %), got {target!r}")
    task(cfg).check(cfg)  # a model or dataset of another task: one line, here


__all__ = ["TASKS", "check_config", "LearningTask", "get_task", "load_all", "register_task",
           "resolve_task_name", "task_names"]
