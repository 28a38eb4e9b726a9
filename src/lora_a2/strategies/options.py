"""A strategy's own knobs: one typed options class per strategy (``[strategy.options]``).

Every strategy, built-in or plugin, declares its knobs the same way, as PEFT registers a config
class with each tuner: a dataclass subclass of :class:`StrategyOptions` with a default and a
docstring per field, set as the strategy's ``Options`` class attribute::

    @dataclass
    class FedProxOptions(StrategyOptions):
        mu: float = 0.01
        \"\"\"Weight μ of the proximal term (μ/2)‖w − w_global‖².\"\"\"

        def check(self) -> None:
            self.require(self.mu >= 0, "mu", "must be ≥ 0")

The config keeps the values as a plain table (``strategy.options.NAME``; the config module
imports no component), and :func:`resolve_options` turns that table into the strategy's typed
options: unknown names (with the nearest valid one), wrong types and the class's own
:meth:`StrategyOptions.check` give one-line errors naming ``strategy.options.NAME``.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
from dataclasses import dataclass
from typing import Any, get_type_hints

from ..config import coerce_value
from ..errors import UserError


@dataclass
class StrategyOptions:
    """Base of every strategy's options (a strategy without knobs uses it as is)."""

    def check(self) -> None:
        """Range checks across this strategy's options; raise via :meth:`require`."""

    def require(self, cond: bool, name: str, msg: str) -> None:
        """One-line :class:`UserError` naming ``strategy.options.<name>`` unless ``cond``."""
        if not cond:
            raise UserError(f"config key 'strategy.options.{name}' {msg}, "
                            f"got {getattr(self, name)!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def option_names(options_cls: type[StrategyOptions]) -> list[str]:
    return [f.name for f in dataclasses.fields(options_cls)]


def _same(value: Any, default: Any) -> bool:
    """``value`` is ``default`` as a config file writes it (1 and 1.0 alike; True is not 1)."""
    if isinstance(value, bool) or isinstance(default, bool):
        return value is default
    if isinstance(value, (int, float)) and isinstance(default, (int, float)):
        return value == default
    return type(value) is type(default) and value == default


def option_defaults(options_cls: type[StrategyOptions]) -> dict[str, Any]:
    return {f.name: (f.default_factory() if f.default is dataclasses.MISSING  # type: ignore[misc]
                     and f.default_factory is not dataclasses.MISSING else f.default)
            for f in dataclasses.fields(options_cls)}


def resolve_options(options_cls: type[StrategyOptions], raw: dict[str, Any], strategy: str,
                    others: dict[str, list[Any]] | None = None) -> StrategyOptions:
    """The typed options of ``strategy`` from the config's ``strategy.options`` table: the
    class's defaults, overridden by ``raw``; one-line errors for unknown names, bad types and
    the class's own checks.

    ``others`` maps an option name of *other* strategies to its defaults there: an option this
    strategy has not got is moot (and dropped) while it holds such a default — what a resolved
    config of another strategy, switched with ``strategy.name=…``, still lists."""
    names = option_names(options_cls)
    raw = {k: v for k, v in raw.items() if k in names
           or not any(_same(v, d) for d in (others or {}).get(k, []))}
    for name in raw:
        if name not in names:
            near = difflib.get_close_matches(name, names, n=1, cutoff=0.5)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            raise UserError(f"config key 'strategy.options.{name}': strategy '{strategy}' has no "
                            f"such option{hint} (its options: {', '.join(names) or 'none'})")
    hints = get_type_hints(options_cls)
    values = {n: coerce_value(f"strategy.options.{n}", v, hints[n]) for n, v in raw.items()}
    opts = options_cls(**values)
    opts.check()
    return opts


def option_docs(options_cls: type[StrategyOptions]) -> list[tuple[str, str, Any, str]]:
    """(name, type, default, docstring) of each option, read from the class's source (the
    docstring under each field), for ``lora-a2 strategies`` and docs/CONFIGURATION.md."""
    docs: dict[str, str] = {}
    for klass in reversed(options_cls.__mro__):
        if klass in (object, StrategyOptions) or not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for a, b in zip(body, body[1:]):
            if isinstance(a, ast.AnnAssign) and isinstance(a.target, ast.Name) and \
                    isinstance(b, ast.Expr) and isinstance(b.value, ast.Constant) and \
                    isinstance(b.value.value, str):
                docs[a.target.id] = " ".join(b.value.value.split())
    hints = get_type_hints(options_cls)
    out = []
    for f in dataclasses.fields(options_cls):
        t = hints[f.name]
        out.append((f.name, getattr(t, "__name__", str(t)), option_defaults(options_cls)[f.name],
                    docs.get(f.name, "")))
    return out
