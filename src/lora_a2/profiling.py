"""Where a run's time goes, by phase (``lora-a2 speed --profile``).

:func:`profile_run` runs one experiment in this process (``lora-a2 run``'s default config, or
any overrides) and attributes its wall time to phases, without any timing code in the engine:
for the duration of the run it wraps the functions each phase consists of — every place the
package holds a reference to them — with timers (:data:`WRAPS`), and undoes it afterwards.

Time is *exclusive*: a phase running inside another (the collation of a batch inside a training
step, an encoding inside the server's round planning) counts for itself only, never for its
caller too, so the rows add up to the time spent inside any wrapped function, and
``other`` = the run's wall time − that sum (the round loop's own work, logging, anything no
wrapper covers). A row is ``(group, part)``: the group is the enclosing top-level phase (train,
probe, evaluation, …); the part what ran inside it (forward, backward, optimiser step, …), or
``rest`` for the group's own code between its parts. LoRA-A2's probe (its training pass before
a client selects its slots, and the scoring) is told from the training after it by whether the
client has selected yet (:meth:`~lora_a2.strategies.lora_a2.LoraA2.select`).

The figures are for the local engine (``engine.name = "local"``): every client runs here.
"""

from __future__ import annotations

import functools
import importlib
import json
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

# every module that holds a function the profile wraps, loaded before it patches them
import lora_a2.engines.local
import lora_a2.runner
import lora_a2.tasks.causal_lm
import lora_a2.tasks.classification

from .adapter import ModelRuntime
from .checks import load_config
from .errors import UserError
from .runner import run_experiment
from .strategies.lora_a2 import LoraA2

#: the groups in the order the table lists them (a group's rows follow it)
GROUPS = ("setup", "train", "probe", "evaluation", "encode/decode", "client", "server",
          "checkpoint", "reporting", "export", "other")

#: the parts that are the model's own compute; every other row is overhead to look at
COMPUTE = ("forward", "backward", "optimiser step")

GROUP_NOTES = {
    "setup": "model, data, tokenisation, partition (experiment.prepare, write_partition)",
    "train": "local training (ClientContext.train / LocalTrainer.run) after the selection",
    "probe": "LoRA-A2's probe: the training pass before selection, slot scores, top-k",
    "evaluation": "the global model on the test set (rounds.evaluate_state), round 0 included; "
                  "a personalised strategy's client evaluations (rounds.evaluate_clients)",
    "encode/decode": "payload.encode/decode, Task/Update to and from payloads",
    "client": "the client side's own bookkeeping (LocalTransport.exchange, Strategy.client_update)",
    "server": "sampling, configuring, validating uploads, aggregation (rounds.plan_round, "
              "collect_replies, close_round)",
    "checkpoint": "save_checkpoint after every round",
    "reporting": "metrics.jsonl, plots, progress (the reporters), samples",
    "export": "the final adapter export and summary",
    "other": "inside the run but in no wrapped function (the round loop itself)",
}


class PhaseTimer:
    """A stack of open phases; each closed phase adds its exclusive time to its row."""

    def __init__(self) -> None:
        self.stack: list[list[Any]] = []  # [row, start, time of the phases inside it]
        self.seconds: dict[tuple[str, str], float] = defaultdict(float)
        self.calls: dict[tuple[str, str], int] = defaultdict(int)
        #: LoRA-A2: a client has started its update and not yet selected its slots
        self.probing = False

    def group(self) -> str | None:
        """The innermost open group."""
        return self.stack[-1][0][0] if self.stack else None

    def enter(self, row: tuple[str, str]) -> None:
        self.stack.append([row, time.perf_counter(), 0.0])

    def leave(self) -> None:
        row, start, inner = self.stack.pop()
        elapsed = time.perf_counter() - start
        self.seconds[row] += elapsed - inner
        self.calls[row] += 1
        if self.stack:
            self.stack[-1][2] += elapsed

    @contextmanager
    def phase(self, group: str | None, part: str = "rest") -> Iterator[None]:
        """A top-level phase (``group`` given; nothing new when that group is already the
        innermost one) or a part of the innermost group (``group`` None)."""
        if group is not None and group == self.group():
            yield
            return
        row = (group, part) if group is not None else (self.group() or "other", part)
        self.enter(row)
        try:
            yield
        finally:
            self.leave()


@dataclass(frozen=True)
class Wrap:
    """One function to time: ``owner.attr`` (a module path, or a module path and a class name
    after a colon); for a module-level function every ``lora_a2`` module that imported it is
    patched too. ``group``: a top-level phase (a callable: chosen at call time); ``part``: a
    part of whichever group is open."""

    target: str
    group: str | Callable[[PhaseTimer], str] | None = None
    part: str = "rest"


def _train_or_probe(timer: PhaseTimer) -> str:
    return "probe" if timer.probing else "train"


#: everything the profile times; a target that cannot be found is an error
WRAPS: tuple[Wrap, ...] = (
    Wrap("lora_a2.experiment.prepare", "setup"),
    Wrap("lora_a2.runner.write_partition", "setup"),
    Wrap("lora_a2.tasks.classification:Classification.load_data", None, "data load"),
    Wrap("lora_a2.tasks.classification:Classification.load_model", None, "model load"),
    Wrap("lora_a2.tasks.classification:Classification.encode", None, "tokenisation"),
    Wrap("lora_a2.tasks.causal_lm:CausalLM.load_data", None, "data load"),
    Wrap("lora_a2.tasks.causal_lm:CausalLM.load_model", None, "model load"),
    Wrap("lora_a2.tasks.causal_lm:CausalLM.encode", None, "tokenisation"),
    Wrap("lora_a2.experiment.draw_clients", None, "partition"),
    Wrap("lora_a2.strategies.context:ClientContext.train", _train_or_probe),
    Wrap("lora_a2.strategies.context:ClientContext.gradients", _train_or_probe),
    Wrap("lora_a2.client:LocalTrainer.run", _train_or_probe),
    Wrap("lora_a2.client:LocalTrainer.__init__", None, "optimiser creation"),
    Wrap("lora_a2.client.batch_of", None, "collation"),
    Wrap("torch:Tensor.backward", None, "backward"),
    Wrap("torch.optim:AdamW.step", None, "optimiser step"),
    Wrap("lora_a2.adapter:ModelRuntime.load", None, "state load"),
    Wrap("lora_a2.adapter:ModelRuntime.snapshot", None, "state snapshot"),
    Wrap("lora_a2.strategies.lora_a2.slot_scores", "probe"),
    Wrap("lora_a2.strategies.lora_a2:LoraA2.select", "probe"),
    Wrap("lora_a2.rounds.evaluate_state", "evaluation"),
    Wrap("lora_a2.rounds.evaluate_clients", "evaluation"),  # a personalised strategy's
    Wrap("lora_a2.payload.encode", "encode/decode"),
    Wrap("lora_a2.payload.decode", "encode/decode"),
    Wrap("lora_a2.messages:Task.to_payload", "encode/decode"),
    Wrap("lora_a2.messages:Task.from_payload", "encode/decode"),
    Wrap("lora_a2.messages:Update.to_payload", "encode/decode"),
    Wrap("lora_a2.messages:Update.from_payload", "encode/decode"),
    Wrap("lora_a2.engines.local:LocalTransport.exchange", "client"),
    Wrap("lora_a2.strategies.base:Strategy.upload", "client"),
    Wrap("lora_a2.rounds.plan_round", "server"),
    Wrap("lora_a2.rounds.collect_replies", "server"),
    Wrap("lora_a2.rounds.close_round", "server"),
    Wrap("lora_a2.rounds.apply_clock", "server"),  # a fleet's simulated clock
    Wrap("lora_a2.rounds.fit_budgets", "server"),  # strategy.rank_budget = "auto"
    Wrap("lora_a2.runner.save_checkpoint", "checkpoint"),
    Wrap("lora_a2.reporters.base:Reporters.start", "reporting"),
    Wrap("lora_a2.reporters.base:Reporters.client_done", "reporting"),
    Wrap("lora_a2.reporters.base:Reporters.round_end", "reporting"),
    Wrap("lora_a2.reporters.base:Reporters.end", "reporting"),
    Wrap("lora_a2.runner.write_samples", "reporting"),
    Wrap("lora_a2.adapter:ModelRuntime.export", "export"),
    Wrap("lora_a2.runner.summarize", "export"),
)


def _resolve(target: str) -> tuple[Any, str]:
    """``(owner, attribute)`` of a :class:`Wrap` target."""
    if ":" in target:
        module, path = target.split(":")
        owner: Any = importlib.import_module(module)
        *classes, attr = path.split(".")
        for c in classes:
            owner = getattr(owner, c)
        return owner, attr
    module, attr = target.rsplit(".", 1)
    return importlib.import_module(module), attr


def _timed(fn: Callable, timer: PhaseTimer, wrap: Wrap) -> Callable:
    group = wrap.group

    @functools.wraps(fn)
    def timed(*args, **kwargs):
        g = group(timer) if callable(group) else group
        with timer.phase(g, wrap.part):
            return fn(*args, **kwargs)

    return timed


def _forward_hooks(timer: PhaseTimer, handles: list[Any]) -> list[tuple[Any, str, Any]]:
    """Every model a :class:`~lora_a2.adapter.ModelRuntime` builds times its forward passes
    (a part, ``forward``, of whichever group runs them: training, the probe, evaluation), by
    forward hooks removed when the profile ends — on the transformers model, its body
    (``get_decoder``) and its output projection, the outermost call of them timed: a causal
    LM's loss runs the body and the projection apart, and its generation calls the
    transformers model, never PEFT's wrapper (hooks on the wrapper timed neither)."""
    init = ModelRuntime.__init__
    depth = [0]

    def pre(module, args):
        depth[0] += 1
        if depth[0] == 1:
            timer.enter((timer.group() or "other", "forward"))

    def post(module, args, output):
        depth[0] -= 1
        if depth[0] == 0:
            timer.leave()

    @functools.wraps(init)
    def built(self, *args, **kwargs):
        with timer.phase(None, "LoRA model build"):
            init(self, *args, **kwargs)
        model = self.hf_model
        for module in {id(m): m for m in (model, model.get_decoder(),
                                          model.get_output_embeddings()) if m is not None
                       }.values():
            handles.append(module.register_forward_pre_hook(pre))
            handles.append(module.register_forward_hook(post))

    return [(ModelRuntime, "__init__", built)]


def _lora_a2_hooks(timer: PhaseTimer) -> list[tuple[Any, str, Any]]:
    """LoRA-A2's client update opens the probe; its selection (made, or reused from the
    client's store) closes it."""
    update, select, stored = (LoraA2.client_update, LoraA2.select, LoraA2.stored_selection)

    @functools.wraps(update)
    def client_update(self, ctx, task):
        timer.probing = True
        try:
            return update(self, ctx, task)
        finally:
            timer.probing = False

    @functools.wraps(select)
    def selected(self, scores, k, task):
        try:
            return select(self, scores, k, task)
        finally:
            timer.probing = False

    @functools.wraps(stored)
    def reused(self, ctx, task):
        out = stored(self, ctx, task)
        if out is not None:
            timer.probing = False
        return out

    return [(LoraA2, "client_update", client_update), (LoraA2, "select", selected),
            (LoraA2, "stored_selection", reused)]


@contextmanager
def installed(timer: PhaseTimer, wraps: tuple[Wrap, ...] = WRAPS) -> Iterator[int]:
    """Install every wrapper of ``wraps`` (LoRA-A2's probe markers first, so the select timer
    wraps the marker); yields the number of places patched; restores everything on exit. A
    target that is missing, or a module-level function no module holds, raises."""
    patched: list[tuple[Any, str, Any]] = []
    handles: list[Any] = []

    def patch(owner: Any, attr: str, new: Any) -> None:
        # a class's own attribute (None: inherited, removed again afterwards)
        patched.append((owner, attr, owner.__dict__.get(attr) if isinstance(owner, type)
                        else getattr(owner, attr)))
        setattr(owner, attr, new)

    try:
        for owner, attr, new in _lora_a2_hooks(timer) + _forward_hooks(timer, handles):
            patch(owner, attr, new)
        for wrap in wraps:
            owner, attr = _resolve(wrap.target)
            original = getattr(owner, attr)
            if isinstance(owner, type):
                raw = owner.__dict__.get(attr, original)  # inherited: shadowed here
                if isinstance(raw, classmethod):
                    patch(owner, attr, classmethod(_timed(raw.__func__, timer, wrap)))
                else:
                    patch(owner, attr, _timed(raw, timer, wrap))
                continue
            new = _timed(original, timer, wrap)
            holders = [m for name, m in list(sys.modules.items())
                       if (name == "lora_a2" or name.startswith("lora_a2.")) and m is not None
                       and getattr(m, attr, None) is original]
            if not holders:
                raise AttributeError(f"{wrap.target}: no module holds it")
            for m in holders:
                patch(m, attr, new)
        yield len(patched)
    finally:
        for owner, attr, old in reversed(patched):
            if old is None:
                delattr(owner, attr)
            else:
                setattr(owner, attr, old)
        for h in handles:
            h.remove()


def profile_run(sets: list[str] | None = None, rounds: int | None = None,
                out: Path | None = None) -> dict[str, Any]:
    """Run ``lora-a2 run``'s default config (with ``sets`` and ``train.rounds = rounds``)
    in this process under the phase timers, into ``out`` (a temporary folder when None,
    removed afterwards); the phases' seconds, calls, shares of the wall time and per round."""
    overrides = list(sets or []) + ([f"train.rounds={rounds}"] if rounds is not None else [])
    cfg = load_config(None, overrides)
    if cfg.engine.name != "local":
        raise UserError(f"--profile times the local engine; got engine.name = "
                        f"'{cfg.engine.name}'")
    timer = PhaseTimer()
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(out) if out is not None else Path(tmp) / "run"
        with installed(timer) as sites:
            t0 = time.perf_counter()
            summary = run_experiment(cfg, target, overwrite=True, progress=False)
            wall = time.perf_counter() - t0
        if timer.stack:
            raise RuntimeError(f"phases left open: {[f[0] for f in timer.stack]}")
    return summarize_phases(timer, wall, cfg, summary, sites)


def summarize_phases(timer: PhaseTimer, wall: float, cfg, summary: dict[str, Any],
                     sites: int) -> dict[str, Any]:
    rounds = cfg.train.rounds
    timed = sum(timer.seconds.values())
    rows = [{"group": g, "part": p, "seconds": s, "calls": timer.calls[(g, p)],
             "share": s / wall, "per_round_s": s / rounds}
            for (g, p), s in timer.seconds.items()]
    rows.append({"group": "other", "part": "unwrapped", "seconds": wall - timed, "calls": 0,
                 "share": (wall - timed) / wall, "per_round_s": (wall - timed) / rounds})
    order = {g: i for i, g in enumerate(GROUPS)}
    rows.sort(key=lambda r: (order.get(r["group"], len(GROUPS)), r["part"] != "rest",
                             -r["seconds"]))
    groups: dict[str, float] = defaultdict(float)
    for r in rows:
        groups[r["group"]] += r["seconds"]
    compute = sum(r["seconds"] for r in rows if r["part"] in COMPUTE)
    return {
        "wall_s": wall,
        "rounds": rounds,
        "threads": torch.get_num_threads(),
        "model": cfg.model.name,
        "data": cfg.data.name,
        "strategy": cfg.strategy.name,
        "precision": cfg.train.precision,
        "device": summary.get("device"),
        "device_name": summary.get("device_name"),
        "final_accuracy": summary.get("final_accuracy"),
        "patched_sites": sites,
        # the model's own work (forward, backward, optimiser step, wherever they ran) and
        # everything else, setup included
        "compute_s": compute,
        "compute_share": compute / wall,
        "non_compute_s": wall - compute,
        "non_compute_per_round_s": (wall - compute - groups["setup"]) / rounds,
        "groups": {g: {"seconds": s, "share": s / wall, "per_round_s": s / rounds}
                   for g, s in sorted(groups.items(), key=lambda kv: order.get(kv[0], 99))},
        "phases": rows,
        "group_notes": GROUP_NOTES,
    }


def format_profile(r: dict[str, Any]) -> str:
    """The profile as a console table: each group, then its parts."""
    lines = [f"profile  {r['model']} · {r['data']} · {r['strategy']}, {r['rounds']} rounds, "
             f"{r['precision']}, {r['threads']} torch threads on {r['device']}: wall "
             f"{r['wall_s']:.1f} s",
             f"{'phase':34s} {'seconds':>9s} {'share':>7s} {'per round':>10s} {'calls':>8s}"]
    for g, tot in r["groups"].items():
        lines.append(f"{g:34s} {tot['seconds']:9.2f} {100 * tot['share']:6.1f}% "
                     f"{tot['per_round_s']:10.2f}")
        for row in r["phases"]:
            if row["group"] != g:
                continue
            lines.append(f"  {row['part']:32s} {row['seconds']:9.3f} {100 * row['share']:6.1f}% "
                         f"{row['per_round_s']:10.2f} {row['calls']:8d}")
    lines.append(f"model compute (forward, backward, optimiser step, in any phase): "
                 f"{r['compute_s']:.1f} s = {100 * r['compute_share']:.1f} % of the wall; "
                 f"everything else {r['non_compute_s']:.1f} s (setup "
                 f"{r['groups']['setup']['seconds']:.1f} s, then "
                 f"{r['non_compute_per_round_s']:.2f} s per round)")
    return "\n".join(lines)


def main_profile(sets: list[str], rounds: int | None, out: Path | None) -> dict[str, Any]:
    """``lora-a2 speed --profile``: run, print the table, write the JSON."""
    r = profile_run(sets, rounds)
    print(format_profile(r))
    if out is not None:
        out.write_text(json.dumps(r, indent=1))
    return r
