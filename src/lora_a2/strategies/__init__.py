"""Federated strategies, one per file, registered by name (see :mod:`.base`).

Adding a method is one new module in this package with a ``@register`` class: every module here
is imported by :func:`load_all`, and the config accepts every registered name.

Another installed package adds strategies through the entry-point group ``lora_a2.strategies``
(``[project.entry-points."lora_a2.strategies"] my-method = "my_pkg.strategy:MyMethod"``; the
object may be a :class:`Strategy` subclass or a module whose classes use ``@register``). A
plugin that fails to import (``sys.exit()`` included), leaves a method unimplemented, takes a
built-in's name or declares a wrong ``Options`` or flag is skipped with a one-line reason
(:data:`PLUGIN_ERRORS`) and never breaks the other strategies; asking for it by name gives that
reason as the error (an unknown name lists every failed plugin's reason).
"""

import dataclasses
import difflib
import importlib
import inspect
import pkgutil
from importlib import metadata
from typing import get_type_hints

from ..budgets import resolve as resolve_budgets
from ..errors import UserError
from ..config import Config, TrainConfig, clients_known
from ..tasks import resolve_task_name
from ..messages import ServerState, Task, Update
from .base import Strategy
from .context import ClientContext
from .dense import DenseStrategy
from .options import StrategyOptions, resolve_options
from .registry import REGISTRY, other_option_defaults, register

# the interface and its helpers, not strategies
_SHARED = {"base", "context", "dense", "hetero", "options", "registry"}
ENTRY_POINT_GROUP = "lora_a2.strategies"
PLUGIN_ERRORS: dict[str, str] = {}
"""Entry-point name → why that plugin was not registered (one line)."""
PLUGINS: dict[str, str] = {}
"""Strategy name → the distribution (package) that provided it."""
_plugins_loaded = False


def load_all() -> None:
    """Import every strategy module of this package, then the installed plugins (once)."""
    for info in pkgutil.iter_modules(__path__):
        if info.name not in _SHARED:
            importlib.import_module(f"{__name__}.{info.name}")
    _load_plugins()


def _entry_points() -> list[metadata.EntryPoint]:
    return list(metadata.entry_points(group=ENTRY_POINT_GROUP))


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    builtin = dict(REGISTRY)
    for ep in _entry_points():
        dist = getattr(getattr(ep, "dist", None), "name", None) or ep.value
        where = f"plugin '{ep.name}' ({dist})"
        before = dict(REGISTRY)
        try:
            obj = ep.load()
            classes = [obj] if inspect.isclass(obj) else [
                c for c in vars(obj).values() if inspect.isclass(c) and issubclass(c, Strategy)
                and c.__module__ == obj.__name__ and getattr(c, "name", None)]
            if not classes:
                raise TypeError(f"'{ep.value}' is not a Strategy subclass or a module with one")
            for cls in classes:
                _check_plugin(cls, builtin)
                REGISTRY[cls.name] = cls
                PLUGINS[cls.name] = dist
        except (Exception, SystemExit) as e:  # anything a third-party import can raise
            # (sys.exit() at import included): skip the plugin and say why
            REGISTRY.clear()
            REGISTRY.update(before)  # a half-registered or clashing plugin leaves no trace
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            PLUGIN_ERRORS[ep.name] = f"{where}: {type(e).__name__}" + (f": {first}" if first
                                                                       else "")


def _check_plugin(cls: type, builtin: dict[str, type]) -> None:
    if not (inspect.isclass(cls) and issubclass(cls, Strategy)):
        raise TypeError(f"{cls!r} is not a lora_a2 Strategy subclass")
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} has no 'name'")
    if name in builtin and builtin[name] is not cls:
        raise ValueError(f"its strategy name '{name}' is already a built-in strategy")
    missing = sorted(getattr(cls, "__abstractmethods__", ()))
    if missing:
        raise TypeError(f"{cls.__name__} does not implement {', '.join(missing)}")
    if hasattr(cls, "option_defaults"):  # the options API of earlier versions: never read
        raise TypeError(f"{cls.__name__}.option_defaults is no longer read: declare the "
                        f"options as an Options dataclass (docs/STRATEGIES.md §3)")
    opts = cls.Options
    if not (inspect.isclass(opts) and issubclass(opts, StrategyOptions)
            and dataclasses.is_dataclass(opts)):
        raise TypeError(f"{cls.__name__}.Options must be a @dataclass subclass of "
                        f"lora_a2.strategies.StrategyOptions")
    opts()  # every option needs a default: the config lists them all
    get_type_hints(opts)  # and a type the config can check it against (resolvable at run time)
    flags = [k for k in _FLAGS if not isinstance(getattr(cls, k), bool)]
    if flags:
        raise TypeError(f"{cls.__name__}.{flags[0]} must be True or False")
    ratio = cls.paper_lr_ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not ratio > 0:
        raise TypeError(f"{cls.__name__}.paper_lr_ratio must be a number > 0, got {ratio!r}")
    if not isinstance(cls.dp_refusals, dict):
        raise TypeError(f"{cls.__name__}.dp_refusals must be a dict of mode → reason")
    if not isinstance(cls.dp_local_clear, str):
        raise TypeError(f"{cls.__name__}.dp_local_clear must be a string (what its clients "
                        f"send in the clear under local DP; empty: nothing)")


#: the yes/no class attributes a strategy declares: those the interface annotates
#: ``ClassVar[bool]`` (docs/STRATEGIES.md)
_FLAGS = tuple(k for k, a in Strategy.__annotations__.items() if a == "ClassVar[bool]")


def strategy_names() -> list[str]:
    """Registered strategy names, in a stable order."""
    load_all()
    return sorted(REGISTRY)


def plugin_error_for(name: str) -> str | None:
    """Why a plugin that would have provided strategy ``name`` is missing, if one failed."""
    load_all()
    if name in PLUGIN_ERRORS:
        return PLUGIN_ERRORS[name]
    return None


def get_strategy(cfg: Config) -> Strategy:
    """The run's strategy (not wrapped for DP: see :func:`lora_a2.private.build_strategy`)."""
    name = cfg.strategy.name
    if name not in strategy_names():
        raise unknown_strategy("config key 'strategy.name'", name)
    return REGISTRY[name](cfg)


def unknown_strategy(where: str, name: str) -> UserError:
    """The one-line error for a strategy ``name`` that is not registered, asked for by
    ``where`` (a config key or a flag): a failed plugin's reason when one carried that name,
    else the nearest valid name, every valid name and every plugin that failed to load (a
    plugin whose entry-point name differs from its strategy's cannot be matched to ``name``,
    so no reason is hidden)."""
    names = strategy_names()
    reason = plugin_error_for(name)
    if reason:
        return UserError(f"{where}: strategy '{name}' is not available: {reason}")
    near = difflib.get_close_matches(name, names, n=1, cutoff=0.4)
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    failed = (f"; plugins that failed to load: {'; '.join(PLUGIN_ERRORS.values())}"
              if PLUGIN_ERRORS else "")
    return UserError(f"{where}: unknown strategy '{name}'{hint}; valid: {', '.join(names)}"
                     f"{failed}")


def check_config(cfg: Config) -> None:
    """The config checks that need the strategy registry (one-line :class:`UserError`): the
    name (with a plugin's failure reason or the nearest name), its options, the task, SecAgg+,
    the summary's reference strategies."""
    s = cfg.strategy
    names = strategy_names()
    if s.name not in names:
        raise unknown_strategy("config key 'strategy.name'", s.name)
    cls = REGISTRY[s.name]
    try:
        options = resolve_options(cls.Options, s.options, s.name, other_option_defaults(cls))
        s.options = options.to_dict()  # the resolved config lists every option of its strategy
        cls.check(cfg, options)
    except Exception as e:  # a plugin's own check that raises is its author's bug: say whose
        if isinstance(e, UserError) or s.name not in PLUGINS:
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        raise UserError(f"config key 'strategy.name': the config check of plugin strategy "
                        f"'{s.name}' ({PLUGINS[s.name]}) raised {type(e).__name__}: "
                        f"{first}") from None
    if cfg.secagg.enabled and not cls.secure_aggregation:
        raise UserError(f"config key 'secagg.enabled' strategy '{s.name}' cannot be securely "
                        f"aggregated (its aggregate is not a weighted sum of one dense vector "
                        f"per client), got True")
    if cfg.secagg.enabled and cls.personalized:
        # whatever it declares: each client's evaluation answer would reach the server in the
        # clear every round, beside the masked sum
        raise UserError(f"config key 'secagg.enabled' strategy '{s.name}' is personalised: its "
                        f"clients send their own models' evaluation in the clear, which SecAgg+ "
                        f"does not hide, got True")
    if s.rank_budget == "auto" and not cls.budget_sized_upload:
        sized = sorted(n for n in names if REGISTRY[n].budget_sized_upload)
        raise UserError(f"config key 'strategy.rank_budget' 'auto' needs a strategy whose upload "
                        f"is sized by each client's budget ({', '.join(sized)}); '{s.name}' "
                        f"trains one rank on every client, got 'auto'")
    if cls.single_rank and s.rank_budget != "auto" and clients_known(cfg):
        ranks = sorted(set(resolve_budgets(s.rank_budget, cfg.data.num_clients, s.global_rank,
                                           cfg.seed)))
        if len(ranks) > 1:
            raise UserError(f"config key 'strategy.rank_budget' strategy '{s.name}' trains one "
                            f"rank on every client: give a single integer (this gives ranks "
                            f"{', '.join(map(str, ranks))}), got {s.rank_budget!r}")
    alternating_only = [("phase_every", cfg.train.phase_every, TrainConfig.phase_every),
                        ("cross_phase", cfg.train.cross_phase, TrainConfig.cross_phase)]
    for key, value, default in alternating_only:  # would be silently ignored
        if value != default and not cls.alternating:
            alt = sorted(n for n in names if REGISTRY[n].alternating)
            raise UserError(f"config key 'train.{key}' is for strategies that alternate the "
                            f"LoRA factors ({', '.join(alt)}); '{s.name}' does not, got "
                            f"{value!r}")
    if cfg.train.mode == "async" and not cls.supports_async:
        ok = sorted(n for n in names if REGISTRY[n].supports_async)
        raise UserError(f"config key 'train.mode' 'async' needs a strategy that adds stale "
                        f"changes with staleness weights ({', '.join(ok)}); '{s.name}' does "
                        f"not declare it, got 'async'")
    for ref in cfg.report.references:
        if ref not in names or not REGISTRY[ref].has_reference_upload():
            fixed = [n for n in names if REGISTRY[n].has_reference_upload()]
            raise UserError(f"config key 'report.references' entries must be strategies with a "
                            f"fixed upload size ({', '.join(fixed)}), got {ref!r}")
    resolved = resolve_task_name(cfg)
    if cls.tasks is not None and resolved not in cls.tasks:
        raise UserError(f"config key 'strategy.name' strategy '{s.name}' supports task "
                        f"{', '.join(cls.tasks)}, not '{resolved}', got {s.name!r}")


load_all()

__all__ = ["ENTRY_POINT_GROUP", "PLUGINS", "PLUGIN_ERRORS", "REGISTRY", "ClientContext",
           "DenseStrategy", "ServerState", "Strategy", "StrategyOptions", "Task", "Update",
           "UserError", "check_config", "get_strategy", "load_all", "plugin_error_for",
           "register", "strategy_names", "unknown_strategy"]
