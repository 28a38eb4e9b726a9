"""Command line: ``lora-a2 run | config | strategies | bench | speed | generate |
audit-privacy``.

Every user mistake (bad flag, config key, value, data file) is one line on stderr and exit
code 2; no traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import UserError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        print(f"lora-a2: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="lora-a2", description="Federated LoRA fine-tuning with LoRA-A2 and baselines.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="run one federated experiment (default: the embedded demo)")
    run.add_argument("--config", "-c", help="TOML config file (keys: docs/CONFIGURATION.md)")
    run.add_argument("--set", "-s", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                     help="override config keys, e.g. --set data.alpha=0.5 train.rounds=2 "
                          "(repeatable; a quoted 'a=1 b=2' works too)")
    run.add_argument("--out", "-o", help="output directory (default: runs/<time>-<strategy>)")
    run.add_argument("--overwrite", action="store_true",
                     help="replace a non-empty output directory")
    run.add_argument("--resume", metavar="DIR",
                     help="continue the run in DIR after its last complete round")
    run.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    cfg = sub.add_parser("config", help="print the fully resolved config as TOML")
    cfg.add_argument("--config", "-c")
    cfg.add_argument("--set", "-s", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    sub.add_parser("strategies", help="list the available strategies")
    bench = sub.add_parser("bench", help="run a benchmark grid (resumable), then tabulate it")
    bench.add_argument("grid", help="built-in grid name (main, hetero, smoke, ...) or a TOML file")
    bench.add_argument("--out", "-o",
                       help="results directory (default: benchmarks/results/<grid>[-smoke])")
    bench.add_argument("--only", action="append", default=[], metavar="GLOB",
                       help="run only cells whose id matches (repeatable), e.g. "
                            "'bbc-news__dir0.01__1__*__seed0'")
    bench.add_argument("--smoke", action="store_true",
                       help="tiny model, few examples and rounds: every cell in seconds")
    bench.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    bench.add_argument("--workers", "-j", type=int, default=1, metavar="N",
                       help="run N worker processes on this machine (they share the grid "
                            "through cell locks; each gets cpu_count/N threads)")
    bench.add_argument("--list", action="store_true",
                       help="print every (selected) cell's status — done, running, partial, "
                            "error, todo — and run nothing")
    gen = sub.add_parser("generate", help="answer prompts with a finished causal-LM run's "
                                          "base model + adapter")
    gen.add_argument("run_dir", metavar="RUN_DIR", help="the run's output directory")
    gen.add_argument("--prompt", "-p", action="append", default=[],
                     help="an instruction to answer (repeatable; none = one per stdin line)")
    gen.add_argument("--input", default="", help="optional context appended to each prompt "
                                                 "(as the training data's input column)")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--base", action="store_true",
                     help="answer with the base model alone (to compare)")
    gen.add_argument("--json", action="store_true", help="one JSON object per answer")
    speed = sub.add_parser("speed", help="measure engine overhead, LoRA-A2 cost, memory, bytes, "
                                         "and the machine's limit")
    speed.add_argument("--model", help="minilm (default) or tiny-random-bert (not with "
                       "--causal-lm, which names its own model)")
    # the options of one measurement default to None here, so that one given to another
    # measurement is told apart from a default (_cmd_speed fills SPEED_DEFAULTS in)
    speed.add_argument("--repeats", type=int, help="timed repeats (default 3)")
    speed.add_argument("--local-epochs", type=int, help="local epochs of a timed round (default 1)")
    speed.add_argument("--clients",
                       help="client counts for the memory measurement (comma-separated; default "
                            "10,100,1000)")
    speed.add_argument("--probe-fraction", type=float,
                       help="also time LoRA-A2 with its probe cut to this fraction of its steps "
                            "(1 = skip that variant; default 0.25)")
    speed.add_argument("--json", help="also write the figures to this JSON file")
    speed.add_argument("--limit-only", action="store_true",
                       help="only the limit: a round's train FLOPs, the matmul peak in fp32 and "
                            "bf16, the fraction of the higher peak the training steps reach")
    speed.add_argument("--causal-lm", metavar="MODEL",
                       help="instead: causal-LM step time and peak RSS with and without the "
                            "memory knobs, e.g. --causal-lm smollm2 (or tiny-random-llama)")
    speed.add_argument("--steps", type=int, help="--causal-lm: timed steps (default 3)")
    speed.add_argument("--batch-size", type=int, help="--causal-lm: batch size (default 8)")
    speed.add_argument("--length", type=int, help="--causal-lm: tokens per row (default 128)")
    speed.add_argument("--profile", action="store_true",
                       help="instead: run `lora-a2 run`'s default config in this process and "
                            "print where its wall time goes, by phase (train steps, probe, "
                            "evaluation, encode/decode, optimiser creation, collation, ...)")
    speed.add_argument("--rounds", type=int, metavar="N",
                       help="--profile: only N rounds (≥ 2: a B round and an A round)")
    speed.add_argument("--set", "-s", action="extend", nargs="+", default=[],
                       metavar="KEY=VALUE", help="--profile: override config keys, as for run")
    aud = sub.add_parser("audit-privacy",
                         help="attack every DP mechanism's release and bound its ε from below")
    aud.add_argument("--strategy", action="append", default=[], metavar="NAME",
                     help="audit only this strategy (repeatable)")
    aud.add_argument("--mode", action="append", default=[], choices=None, metavar="MODE",
                     help="local or central (repeatable)")
    aud.add_argument("--mechanism", action="append", default=[], metavar="MECH",
                     help="gaussian, laplace or selection (repeatable)")
    aud.add_argument("--plant", metavar="BUG",
                     help="audit a deliberately broken mechanism instead (half-noise, "
                          "no-server-clip, renormalised-weights, gumbel-scale): must exit 1")
    aud.add_argument("--noise-multiplier", type=float, metavar="Z",
                     help="audit every noise row at this z (default: per mechanism and mode)")
    aud.add_argument("--quick", action="store_true",
                     help="fewer draws (15 s on an idle 2-core machine); weaker bounds")
    aud.add_argument("--json", metavar="FILE", help="also write the rows to this JSON file")
    return p


def _cmd_audit(args: argparse.Namespace) -> int:
    from .audit import audit_command

    return audit_command(args.strategy or None, args.mode or None, args.mechanism or None,
                         args.plant, args.quick, _json_out(args.json), args.noise_multiplier)


def _cmd_run(args: argparse.Namespace) -> int:
    from .checks import load_config
    from .config import split_sets
    from .launch import run
    from .runner import check_out_dir, resume_config

    for flag, value in (("--out", args.out), ("--resume", args.resume)):
        if value is not None and not value.strip():  # "" is "." to Path: the current folder
            raise UserError(f"{flag} needs a folder name, got an empty one")
    if args.resume is not None:
        if args.config or args.set or args.out or args.overwrite:
            raise UserError("--resume DIR continues a run with its own config; "
                            "do not combine it with --config, --set, --out or --overwrite")
        run(resume_config(args.resume), Path(args.resume), progress=not args.quiet, resume=True,
            console=True)
        return 0
    cfg = load_config(args.config, split_sets(args.set))
    out = Path(args.out) if args.out else Path("runs") / (
        time.strftime("%Y%m%d-%H%M%S") + f"-{cfg.strategy.name}")
    if args.config:  # the config file is an input the run's folder must not hold either
        check_out_dir(out, args.overwrite, [Path(args.config)])
    run(cfg, out, overwrite=args.overwrite, progress=not args.quiet, console=True)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import (check_cells, expand, list_grid, load_grid, remaining_time, run_grid,
                        run_grid_workers, select)

    if args.out is not None and not args.out.strip():
        raise UserError("--out needs a folder name, got an empty one")
    grid = load_grid(args.grid)
    out = Path(args.out) if args.out else Path("benchmarks") / "results" / (
        grid["name"] + ("-smoke" if args.smoke else ""))
    if not 1 <= args.workers <= 256:
        raise UserError(f"--workers must be between 1 and 256, got {args.workers}")
    check_cells(select(expand(grid, args.smoke), args.only or None))
    if args.list:
        rows = list_grid(args.grid, out, smoke=args.smoke, only=args.only or None)
        width = max(len(c) for c, _ in rows)
        for cell_id, status in rows:
            print(f"{cell_id:{width}s}  {status}")
        counts: dict[str, int] = {}
        for _, status in rows:
            kind = status.split()[0].rstrip(":")
            counts[kind] = counts.get(kind, 0) + 1
        print(", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f" (of {len(rows)})")
        left, guessed = remaining_time(args.grid, out, smoke=args.smoke, only=args.only or None)
        if counts.get("done", 0) < len(rows):
            if left != left:  # NaN: nothing finished yet to time
                print("time left: unknown until a cell has finished")
            else:
                print(f"time left: ≈ {left / 3600:.1f} h of one worker at the speed the "
                      f"finished cells ran (mean of those with the same strategy and dataset, "
                      f"else the same strategy)"
                      + (f" ({guessed} cells costed at the grid mean)" if guessed else "")
                      + "; divide by the number of workers")
        return 0
    if args.workers > 1:
        result = run_grid_workers(args.grid, out, args.workers, smoke=args.smoke,
                                  progress=not args.quiet, only=args.only or None)
    else:
        result = run_grid(args.grid, out, smoke=args.smoke, progress=not args.quiet,
                          only=args.only or None)
    print(f"{result['finished']}/{result['cells']} cells of the grid finished "
          f"(this call: {result['counts']}); table: {result['table']}")
    print((out / "table.md").read_text(), end="")
    for log in result.get("failed_workers", []):
        print(f"lora-a2: a worker failed; see {log}", file=sys.stderr)
    if {"error", "error-not-retried"} & set(result["counts"]):
        for cell_id, status in list_grid(args.grid, out, smoke=args.smoke,
                                         only=args.only or None):
            if status.startswith("error"):
                print(f"lora-a2: cell {cell_id} failed: {status.removeprefix('error: ')} "
                      f"({out / 'cells' / cell_id / 'error.txt'})", file=sys.stderr)
    if result.get("unfinished"):
        logs = ", ".join(result.get("worker_logs", []))
        print(f"lora-a2: {result['unfinished']} selected cells were left unfinished when the "
              f"workers ended; see {logs}", file=sys.stderr)
    if result["counts"].get("stale"):
        print(f"lora-a2: {result['counts']['stale']} finished cells ran with another config "
              f"than the grid now gives them; they were neither rerun nor tabulated (`lora-a2 "
              f"bench {args.grid} --list` says why): move their folders away to rerun them, or "
              f"use another --out", file=sys.stderr)
    ok = not {"error", "error-not-retried"} & set(result["counts"]) \
        and not result.get("failed_workers") \
        and not result.get("unfinished") and not result["counts"].get("stale")
    return 0 if ok else 1


#: ``lora-a2 speed``: each measurement's own options, and their defaults
SPEED_OPTIONS = {"--profile": ("rounds", "set"),
                 "--limit-only": (),
                 "--causal-lm": ("steps", "batch_size", "length"),
                 None: ("repeats", "local_epochs", "clients", "probe_fraction")}
SPEED_DEFAULTS = {"repeats": 3, "local_epochs": 1, "clients": "10,100,1000",
                  "probe_fraction": 0.25, "steps": 3, "batch_size": 8, "length": 128}


def _speed_mode(args: argparse.Namespace) -> str | None:
    """Which measurement ``lora-a2 speed`` makes (None: the full one); an option of another
    measurement, or two measurements at once, is an error rather than silently ignored. Fills
    the chosen measurement's defaults into ``args``."""
    given = [m for m, on in (("--profile", args.profile), ("--limit-only", args.limit_only),
                             ("--causal-lm", args.causal_lm)) if on]
    if len(given) > 1:
        raise UserError(f"{' and '.join(given)} are separate measurements: give one")
    mode = given[0] if given else None
    if mode == "--causal-lm" and args.model is not None:
        raise UserError("--model goes with --profile, --limit-only or the full measurement; "
                        "--causal-lm names its own model")
    args.model = args.model or "minilm"
    for other, options in SPEED_OPTIONS.items():
        for opt in options:
            if other != mode and getattr(args, opt) not in (None, []):
                owner = other or "the full measurement (no --profile, --limit-only, --causal-lm)"
                raise UserError(f"--{opt.replace('_', '-')} goes with {owner}")
    for opt in SPEED_OPTIONS[mode]:
        if getattr(args, opt) is None and opt in SPEED_DEFAULTS:  # --rounds: None = all
            setattr(args, opt, SPEED_DEFAULTS[opt])
    return mode


def _json_out(path: str | None) -> Path | None:
    """``--json FILE``, checked before a measurement of minutes rather than after it."""
    if path is None:
        return None
    out = Path(path)
    if out.is_dir():
        raise UserError(f"--json expects a file name; '{path}' is a folder")
    if not out.parent.is_dir():
        raise UserError(f"--json: folder '{out.parent}' does not exist")
    if not os.access(out if out.exists() else out.parent, os.W_OK):
        raise UserError(f"--json: '{out if out.exists() else out.parent}' is not writable")
    return out


def _cmd_speed(args: argparse.Namespace) -> int:
    from .speed import main_causal_speed, main_limit, main_speed

    mode = _speed_mode(args)
    out = _json_out(args.json)
    if mode == "--profile":
        from .config import split_sets
        from .profiling import main_profile

        if args.rounds is not None and args.rounds < 2:
            raise UserError(f"--rounds must be ≥ 2 (a B round and an A round), got {args.rounds}")
        main_profile([f"model.name={args.model}", *split_sets(args.set)], args.rounds, out)
        return 0
    if mode == "--limit-only":
        main_limit(args.model, out)
        return 0
    if mode == "--causal-lm":
        if args.steps < 1 or args.batch_size < 1 or args.length < 16:
            raise UserError("--steps and --batch-size must be ≥ 1 and --length ≥ 16")
        main_causal_speed(args.causal_lm, args.steps, args.batch_size, args.length, out)
        return 0
    try:
        clients = [int(c) for c in args.clients.split(",") if c.strip()]
    except ValueError:
        raise UserError(f"--clients expects comma-separated integers, got '{args.clients}'") \
            from None
    if not clients:  # "," or "" would measure the default counts instead
        raise UserError(f"--clients expects at least one count, got '{args.clients}'")
    if args.repeats < 1 or args.local_epochs < 1 or any(c < 10 for c in clients):
        raise UserError("--repeats and --local-epochs must be ≥ 1 and every --clients value ≥ 10")
    if not 0.0 < args.probe_fraction <= 1.0:
        raise UserError(f"--probe-fraction must be in (0, 1], got {args.probe_fraction}")
    main_speed(args.model, args.repeats, args.local_epochs, clients, out, args.probe_fraction)
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .generate import main_generate

    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be ≥ 1, got {args.max_new_tokens}")
    main_generate(Path(args.run_dir), args.prompt, args.input, args.max_new_tokens, args.base,
                  args.json)
    return 0


def _cmd_config(args: argparse.Namespace) -> int:
    from .checks import load_config
    from .config import split_sets

    print(load_config(args.config, split_sets(args.set)).to_toml(), end="")
    return 0


def _cmd_strategies(_: argparse.Namespace) -> int:
    from .strategies import PLUGIN_ERRORS, PLUGINS, REGISTRY, load_all
    from .strategies.options import option_docs

    load_all()
    width = max(map(len, REGISTRY)) + 1
    for name, cls in sorted(REGISTRY.items()):
        doc = ((cls.__doc__ or "").strip().splitlines() or [""])[0]
        origin = f"  [plugin: {PLUGINS[name]}]" if name in PLUGINS else ""
        print(f"{name:{width}s} {doc}{origin}")
        lr = "full-model lr" if cls.full_model else f"lr_B/lr_A = {cls.paper_lr_ratio:g}"
        dp = ", ".join(f"{m} DP" if not cls.dp_refusal(m) else f"no {m} DP"
                       for m in ("local", "central"))
        print(f"{'':{width}s}   paper rule: {lr}; {dp}")
        for opt, kind, default, _ in option_docs(cls.Options):
            print(f"{'':{width}s}   strategy.options.{opt} ({kind}, default {default!r})")
    for reason in PLUGIN_ERRORS.values():
        print(f"lora-a2: warning: skipped {reason}", file=sys.stderr)
    return 0


# A second stop signal this soon after the first is the same request arriving twice (Ctrl-C
# reaches a bench worker from the terminal and again, as SIGTERM, from its parent): ignored, so
# that it cannot cut short the clean-up the first one started. A later one interrupts again.
_REPEAT_WINDOW_S = 2.0


@contextlib.contextmanager
def _stop_signals_interrupt() -> Iterator[None]:
    """SIGTERM stops ``lora-a2 bench`` the way Ctrl-C does: ``KeyboardInterrupt`` in the main
    thread, so the cell in progress ends with nothing half-written (checkpoints are atomic), its
    lock released, and resumes on the next call. SIGINT gets the same handler unless it was
    ignored when the process started (``nohup cmd &``), which is left as it is; SIGTERM then
    still works. Handlers are restored on exit (tests call :func:`main` in-process)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    last = [float("-inf")]

    def on_signal(signum: int, frame: object) -> None:
        now = time.monotonic()
        if now - last[0] < _REPEAT_WINDOW_S:
            return
        last[0] = now
        raise KeyboardInterrupt

    old = {signal.SIGTERM: signal.signal(signal.SIGTERM, on_signal)}
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        old[signal.SIGINT] = signal.signal(signal.SIGINT, on_signal)
    try:
        yield
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = {"run": _cmd_run, "config": _cmd_config, "strategies": _cmd_strategies,
               "bench": _cmd_bench, "speed": _cmd_speed,
               "generate": _cmd_generate, "audit-privacy": _cmd_audit}[args.command]
    try:
        # bench only: its workers are the long background processes (and a cell's lock is
        # released on the way out); `run` keeps the default SIGTERM, which its atomic
        # checkpoints survive, and which Flower's simulation may handle its own way
        with _stop_signals_interrupt() if args.command == "bench" else contextlib.nullcontext():
            rc = handler(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handler below, not at exit
        return rc
    except UserError as e:
        print(f"lora-a2: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("lora-a2: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # Output piped into a reader that stopped early (`lora-a2 bench main --list | head`):
        # end quietly, with stdout pointed away so the interpreter's final flush cannot fail.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as e:
        # the file system said no to a path (a folder it may not enter, a name too long, a
        # full disk): one line naming it, as for any other bad input; an OSError about no path
        # (a socket, a library's own) keeps its traceback
        if e.filename is None:
            raise
        where = f"{e.filename}" + (f" → {e.filename2}" if e.filename2 else "")
        reason = (str(e.strerror or e).strip().splitlines() or [""])[0]
        print(f"lora-a2: error: {where}: {reason}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
