"""Speed and cost of the engine, as ratios measured in one run (``lora-a2 speed``).

- engine overhead: the local engine's round (fl-lora, all clients, no evaluation) divided by the
  same optimiser steps on the same batches in a bare PyTorch loop (goal ≤ 1.05);
- LoRA-A2 / FL+LoRA wall time of a round at the same budget (the paper reports 1.17 at 5 local
  epochs; the probe epoch is the cost);
- peak RSS with 10, 100 and 1,000 simulated clients, 10 sampled per round, each in a fresh
  process (the per-client cost must be the partition, not a model copy);
- upload bytes divided by the information minimum (values × 4 bytes + 4 bytes per slot id);
- the limit (``--limit-only`` alone, in well under a minute): the train FLOPs of a round of the
  default run, this machine's matrix-product peak in float32 and bfloat16, and the fraction of
  the higher of the two that the engine's own training steps reach (:func:`measure_limit`).

Medians over ``repeats``; everything in one process run, so the ratios compare like with like.
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .checks import check_config
from .client import EncodedData, LocalTrainer, ParamGroup, batch_of
from .config import clients_per_round, load_config
from .engines.local import run_round
from .errors import UserError
from .experiment import prepare
from .flops import flop_counter
from .models import pick_device
from .precision import bf16_hardware, bf16_products_in_fp32
from .tasks import get_task

BASE = ["data.name=bbc-news", "data.num_clients=4", "data.partition=iid",
        "data.max_train_examples=160", "data.max_test_examples=40", "model.max_length=32",
        "strategy.rank_budget=2", "strategy.global_rank=8"]


def bare_round(exp, state) -> float:
    """The optimiser steps of one fl-lora round, written as a plain PyTorch loop."""
    rt, cfg, s = exp.runtime, exp.cfg, exp.strategy
    names = rt.layout.group_names(["A", "B"])
    t0 = time.perf_counter()
    for c in range(cfg.data.num_clients):
        rt.load(state.tensors)
        seed = s.configure(1, c, state).config["seed"]
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        params = [rt.params[n] for n in names]
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.AdamW([{"params": [rt.params[n] for n in rt.layout.names("A")],
                                  "lr": s.lr_of("A")},
                                 {"params": [rt.params[n] for n in rt.layout.names("B")],
                                  "lr": s.lr_of("B")}], weight_decay=cfg.strategy.weight_decay)
        idx = torch.as_tensor(exp.client_train[c])
        order = idx[torch.randperm(len(idx), generator=gen)]
        rt.model.train()
        for start in range(0, len(order), cfg.train.batch_size):
            batch = batch_of(exp.enc_train, order[start:start + cfg.train.batch_size],
                             rt.device)
            loss = exp.task.loss(rt.model, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        for p in params:
            p.requires_grad_(False)
        _ = {n: rt.params[n].detach().clone() for n in names}  # the client's snapshot
    return time.perf_counter() - t0


def engine_round(exp, state, rnd: int = 1) -> float:
    t0 = time.perf_counter()
    run_round(exp, rnd, state)
    return time.perf_counter() - t0


def measure_overhead(model: str, repeats: int) -> dict[str, Any]:
    exp = prepare(load_config(None, BASE + [f"model.name={model}", "strategy.name=fl-lora"]))
    state = exp.strategy.init_state(exp.runtime.initial_state())
    engine_round(exp, state)  # warm-up
    bare, eng = [], []
    for _ in range(repeats):
        bare.append(bare_round(exp, state))
        eng.append(engine_round(exp, state))
    return {"bare_s": statistics.median(bare), "engine_s": statistics.median(eng),
            "ratio": statistics.median(e / b for e, b in zip(eng, bare))}


#: cheaper LoRA-A2 variants (issue 19): name → config overrides; each is timed against fl-lora
PROBE_VARIANTS = {
    "probe=reuse": ["strategy.probe=reuse"],
    "probe=reuse, optimiser kept": ["strategy.probe=reuse", "strategy.probe_optimizer=kept"],
    "probe=gradient": ["strategy.probe=gradient"],
    "reselect_every=2 (a round that reuses)": ["strategy.reselect_every=2"],
}


def measure_a2_vs_fl(model: str, repeats: int, local_epochs: int,
                     probe_fraction: float = 0.25) -> dict[str, Any]:
    """Round wall time of lora-a2 (full probe, the probe cut to ``probe_fraction`` of its
    steps, and each of :data:`PROBE_VARIANTS`) over fl-lora at the same budget; rounds
    interleaved, medians of per-repeat ratios. The reselect variant is timed on round 3, which
    reuses the selection its clients made in round 1 (rounds 1–2 run first to make it)."""
    variants = {"fl-lora": ["strategy.name=fl-lora"], "lora-a2": ["strategy.name=lora-a2"]}
    if probe_fraction < 1.0:
        variants["lora-a2-short-probe"] = ["strategy.name=lora-a2",
                                           f"strategy.probe_fraction={probe_fraction}"]
    for name, sets in PROBE_VARIANTS.items():
        variants[name] = ["strategy.name=lora-a2", *sets]
    exps = {n: prepare(load_config(None, BASE + [f"model.name={model}",
                                                 f"train.local_epochs={local_epochs}", *sets]))
            for n, sets in variants.items()}
    states = {n: e.strategy.init_state(e.runtime.initial_state()) for n, e in exps.items()}
    timed_round = {n: 1 for n in exps}
    for n, e in exps.items():
        if e.cfg.strategy.options.get("reselect_every", 1) > 1:  # selections round 3 reuses
            st = states[n]
            for rnd in (1, 2):
                st, _ = run_round(e, rnd, st)
            states[n], timed_round[n] = st, 3
    for n in exps:
        engine_round(exps[n], states[n], rnd=timed_round[n])  # warm-up
    out: dict[str, list[float]] = {}
    for _ in range(repeats):
        for n, e in exps.items():  # interleaved, so drift hits all alike
            out.setdefault(n, []).append(engine_round(e, states[n], rnd=timed_round[n]))

    def ratio(name: str) -> float:
        return statistics.median(a / f for a, f in zip(out[name], out["fl-lora"]))

    result: dict[str, Any] = {
        "fl_lora_s": statistics.median(out["fl-lora"]),
        "lora_a2_s": statistics.median(out["lora-a2"]),
        "ratio": ratio("lora-a2"),
        "local_epochs": local_epochs,
        "variants": {n: {"round_s": statistics.median(out[n]), "ratio": ratio(n)}
                     for n in PROBE_VARIANTS}}
    if "lora-a2-short-probe" in out:
        short = out["lora-a2-short-probe"]
        result.update(probe_fraction=probe_fraction, lora_a2_short_probe_s=statistics.median(short),
                      short_probe_ratio=ratio("lora-a2-short-probe"))
    return result


def measure_bytes(model: str) -> dict[str, Any]:
    exp = prepare(load_config(None, BASE + [f"model.name={model}", "strategy.name=lora-a2"]))
    state = exp.strategy.init_state(exp.runtime.initial_state())
    _, record = run_round(exp, 1, state)
    minimum = 4 * record["upload_params"] + 4 * record["upload_slot_ids"]
    return {"upload_bytes": record["upload_bytes"], "information_minimum": minimum,
            "ratio": record["upload_bytes"] / minimum}


def peak_rss_mb() -> float:
    """This process's own peak resident memory (MB): Linux's VmHWM. Not ``ru_maxrss``: a
    process started by fork and exec reports max(its parent's peak at the fork, its own) there,
    so every child of a large parent reported the parent's peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # elsewhere: its best


def measure_memory(model: str, clients: list[int]) -> tuple[list[dict[str, Any]], str | None]:
    """Peak RSS of a 1-round run per client count, each in a fresh process: the rows measured
    and, if a run failed, why (the counts after it are not tried)."""
    rows: list[dict[str, Any]] = []
    for k in clients:
        with tempfile.TemporaryDirectory() as tmp:
            code = (
                "import sys\n"
                "from lora_a2.cli import main\n"
                "from lora_a2.speed import peak_rss_mb\n"
                f"rc = main(['run', '--quiet', '--out', {str(Path(tmp) / 'r')!r}, "
                f"'--set', 'model.name={model}', '--set', 'data.name=twitter-sentiment', "
                f"'--set', 'data.num_clients={k}', '--set', 'train.clients_per_round=10', "
                "'--set', 'data.max_train_examples=4000', '--set', 'data.max_test_examples=200', "
                "'--set', 'data.min_examples_per_client=2', '--set', 'model.max_length=16', "
                "'--set', 'data.partition=iid', '--set', 'train.rounds=1'])\n"
                "print('RSS', peak_rss_mb())\n"
                "sys.exit(rc)\n")
            t0 = time.perf_counter()
            res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            if res.returncode != 0:
                last = (res.stderr.strip().splitlines() or ["no output"])[-1]
                return rows, f"memory run with {k} clients failed: {last}"
            rss_mb = float(res.stdout.split("RSS")[-1].split()[0])
            rows.append({"clients": k, "peak_rss_mb": rss_mb,
                         "wall_s": time.perf_counter() - t0})
    return rows, None


# ---------------------------------------------------------------------- the limit
#: the matrix product the peak is timed on: MiniLM's FFN, 2,048 tokens (a batch of 16 × 128, or
#: two of 16 × 64) × 384 → 1,536
GEMM_SHAPE = (2048, 384, 1536)
PEAK_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: the limit's figures that ``lora-a2 speed --json`` also writes at its top level
LIMIT_HEADLINE = ("train_flops_per_round", "gemm_peak_gflops_fp32", "gemm_peak_gflops_bf16",
                  "achieved_gflops", "fraction_of_peak")


def _best_and_median(fn, repeats: int, budget_s: float, warmup: bool = True
                     ) -> tuple[float, float]:
    """(best, median) seconds of ``fn()`` (after one warm-up call): ``repeats`` timings, fewer
    (at least one) once ``budget_s`` is spent — an emulated bfloat16 product takes seconds, and
    a warm-up call that alone overruns the budget is the one timing."""
    if warmup:
        t0 = time.perf_counter()
        fn()
        first = time.perf_counter() - t0
        if first > budget_s:
            return first, first
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if time.perf_counter() - start > budget_s:
            break
    return min(times), statistics.median(times)


def gemm_gflops(dtype: torch.dtype, shape: tuple[int, int, int] = GEMM_SHAPE,
                repeats: int = 10, budget_s: float = 2.0,
                device: torch.device | str = "cpu") -> dict[str, float]:
    """GFLOP/s (2·m·k·n per product, best of ``repeats``) of an (m × k)·(k × n) product in
    ``dtype`` on ``device`` (the one the train steps run on; a CUDA product is timed to its
    end, not to its launch): ``mm`` = ``torch.mm``, ``linear`` = ``F.linear`` on the transposed
    weight (the call every model layer makes; on some CPUs another kernel, e.g. bfloat16
    without AVX512-BF16)."""
    m, k, n = shape
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=gen).to(device=dev, dtype=dtype)
    b = torch.randn(k, n, generator=gen).to(device=dev, dtype=dtype)
    w = b.t().contiguous()
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def timed(product):
        def fn():
            product()
            sync()
        return fn

    kernels = {"mm": timed(lambda: torch.mm(a, b)), "linear": timed(lambda: F.linear(a, w))}
    return {name: 2 * m * k * n / _best_and_median(fn, repeats, budget_s)[0] / 1e9
            for name, fn in kernels.items()}


def round_shape(cfg) -> dict[str, Any]:
    """What one round of ``cfg``'s run trains on: ``examples`` (the training examples of the
    clients sampled in a round) and ``passes`` over them (local epochs, plus LoRA-A2's full
    probe: ``probe_epochs`` × ``probe_fraction`` more)."""
    n = cfg.data.max_train_examples
    if not n:  # all of the dataset: its size, once
        n = len(get_task(cfg).load_data()[0])
    examples = n * clients_per_round(cfg) / cfg.data.num_clients
    opts = cfg.strategy.options
    probe = (opts.get("probe_epochs", 0) * opts.get("probe_fraction", 1.0)
             if opts.get("probe") == "full" else 0.0)
    return {"examples": examples, "passes": cfg.train.local_epochs + probe}


def limit_experiment(model: str, batch_size: int, length: int, precision: str,
                     bf16_matmul: str = "auto"):
    """``(experiment, data)``: ``model`` with the default run's LoRA (rank r_G on every
    target module), ``precision`` and ``bf16_matmul``, and ``batch_size`` training rows made to
    fill ``length`` tokens (every step is exactly batch × length tokens)."""
    exp = prepare(load_config(None, [
        f"model.name={model}", f"model.max_length={length}", f"train.batch_size={batch_size}",
        f"train.precision={precision}", f"train.bf16_matmul={bf16_matmul}",
        "data.num_clients=1", "data.partition=iid",
        f"data.max_train_examples={max(batch_size, 8)}", "data.max_test_examples=8",
        "data.min_examples_per_client=1"]))
    enc = exp.enc_train
    idx = torch.arange(batch_size) % len(enc)
    data = EncodedData(enc.input_ids[idx], torch.ones_like(enc.attention_mask[idx]),
                       enc.labels[idx])
    return exp, data


def _trainer(exp) -> LocalTrainer:
    """The client path's optimiser over every LoRA factor (and a trained head)."""
    s, rt = exp.strategy, exp.runtime
    groups = [ParamGroup(rt.layout.names(g), s.lr_of(g)) for g in rt.federated_groups()]
    return LocalTrainer(rt, groups, exp.cfg.strategy.weight_decay)


def train_step_flops(exp, data: EncodedData) -> int:
    """FLOPs of one training step on all of ``data`` (one batch) through :class:`LocalTrainer`:
    the base model's forward and backward, the LoRA factors' gradients (the optimiser's
    element-wise work is not counted)."""
    trainer = _trainer(exp)
    with flop_counter() as counter:
        trainer.run(data, np.arange(len(data)), 1, len(data), torch.Generator().manual_seed(0),
                    max_steps=1)
    return int(counter.get_total_flops())


def time_train_steps(exp, data: EncodedData, steps: int, repeats: int,
                     budget_s: float) -> float:
    """Median seconds per training step of ``steps`` steps through :meth:`LocalTrainer.run`
    (the engine's own client loop, at the run's precision), after a warm-up step; a warm-up
    step that alone overruns ``budget_s`` (emulated bfloat16) is the one timing."""
    trainer = _trainer(exp)
    batch = len(data)
    many = EncodedData(data.input_ids.repeat(steps, 1), data.attention_mask.repeat(steps, 1),
                       data.labels.repeat(steps, *[1] * (data.labels.dim() - 1)))
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    trainer.run(data, np.arange(batch), 1, batch, gen, max_steps=1)  # warm-up: one step
    first = time.perf_counter() - t0
    if first > budget_s:
        return first
    _, median = _best_and_median(
        lambda: trainer.run(many, np.arange(len(many)), 1, batch, gen), repeats, budget_s,
        warmup=False)
    return median / steps


def measure_limit(model: str | None = None, batch_size: int | None = None,
                  length: int | None = None, steps: int = 2, repeats: int = 3,
                  precisions: tuple[str, ...] = ("fp32", "bf16-mixed"),
                  budget_s: float = 8.0) -> dict[str, Any]:
    """The limit figures: train FLOPs of a round of the default run, the machine's
    matrix-product peaks in float32 and bfloat16 (on the device the steps run on), and the
    fraction of the higher of the two — bfloat16 where it is native, float32 where it is
    emulated — that the engine's training steps reach. The model, batch and length default to the default run's (``lora-a2 run``:
    MiniLM, 16 × 64); so do the round's examples and passes, and the precision the headline
    ``fraction_of_peak`` is taken at."""
    default = check_config(load_config(None, []))  # resolves the strategy's options
    model = model or default.model.name
    batch_size = batch_size or default.train.batch_size
    length = length or default.model.max_length
    shape = round_shape(default)
    device = pick_device(default.engine.device)  # where the train steps below run
    peaks = {name: gemm_gflops(dt, device=device) for name, dt in PEAK_DTYPES.items()}
    step_flops, achieved = None, {}
    # each precision as a run gets it (bf16-mixed with train.bf16_matmul = auto's kernels),
    # then bf16-mixed with the other kernels: where auto took float32 kernels, torch's own
    # bfloat16 ones show what emulated bfloat16 costs; where it took bfloat16 units, float32
    # kernels show what the units save
    variants = [(p, "auto") for p in dict.fromkeys((default.train.precision, *precisions))]
    if "bf16-mixed" in precisions:
        other = "bf16" if bf16_products_in_fp32("bf16-mixed", "auto", device) else "fp32"
        variants.append(("bf16-mixed", other))
    for precision, kernels in variants:
        exp, data = limit_experiment(model, batch_size, length, precision, kernels)
        if step_flops is None:
            step_flops = train_step_flops(exp, data)
        step_s = time_train_steps(exp, data, steps, repeats, budget_s)
        name = precision if kernels == "auto" else f"{precision}, {kernels} kernels"
        achieved[name] = {"step_s": step_s, "gflops": step_flops / step_s / 1e9}
        if precision == "bf16-mixed":
            achieved[name]["bf16_matmul"] = ("fp32" if exp.runtime.bf16_in_fp32 else "bf16")
        del exp
    per_example = step_flops / batch_size
    peak = {name: max(kernels.values()) for name, kernels in peaks.items()}
    best = max(peak, key=peak.get)  # the highest this machine offers
    gflops = achieved[default.train.precision]["gflops"]
    round_flops = per_example * shape["examples"] * shape["passes"]
    return {
        "model": model, "batch_size": batch_size, "length": length,
        "lora_rank": default.strategy.global_rank, "threads": torch.get_num_threads(),
        "device": str(device), **bf16_hardware(device),
        "train_flops_per_example": per_example,
        "round_examples": shape["examples"], "round_passes": shape["passes"],
        "train_flops_per_round": round_flops,
        "gemm_shape": list(GEMM_SHAPE),
        "gemm_gflops": peaks,
        "gemm_peak_gflops_fp32": peak["fp32"],
        "gemm_peak_gflops_bf16": peak["bf16"],
        "peak_precision": best,
        "default_precision": default.train.precision,
        "achieved": achieved,
        "achieved_gflops": gflops,
        "fraction_of_peak": gflops / peak[best],
        "fraction_of_peak_by_precision": {p: a["gflops"] / peak[best]
                                          for p, a in achieved.items()},
        # the same figure against the bfloat16 peak whatever it is: where bfloat16 is emulated
        # and slower than float32 that is not the machine's limit, and the figure exceeds 1
        "fraction_of_bf16_peak": gflops / peak["bf16"],
        "round_train_s_at_peak": round_flops / (peak[best] * 1e9),
    }


def format_limit(r: dict[str, Any]) -> str:
    """The limit figures as console lines."""
    g = r["gemm_gflops"]
    m, k, n = r["gemm_shape"]
    best = r["peak_precision"]
    lines = [
        f"limit               {r['model']} {r['batch_size']} × {r['length']}, LoRA r "
        f"{r['lora_rank']}, {r['threads']} torch threads on {r['device']} ({r['bf16_path']})",
        f"  train FLOPs       {r['train_flops_per_example'] / 1e9:.3f} GFLOP per example × "
        f"{r['round_examples']:g} examples × {r['round_passes']:g} passes = "
        f"{r['train_flops_per_round'] / 1e12:.2f} TFLOP per round",
        f"  matmul peak       {m}×{k} · {k}×{n}: fp32 {r['gemm_peak_gflops_fp32']:.1f} GFLOP/s"
        f" (mm {g['fp32']['mm']:.1f}, linear {g['fp32']['linear']:.1f}), bf16 "
        f"{r['gemm_peak_gflops_bf16']:.1f} GFLOP/s (mm {g['bf16']['mm']:.1f}, linear "
        f"{g['bf16']['linear']:.1f}): the {best} peak is this machine's",
    ]
    for p, a in r["achieved"].items():
        mark = "  ← fraction_of_peak" if p == r["default_precision"] else ""
        if p == "bf16-mixed":
            mark += f"  ({a['bf16_matmul']} kernels: train.bf16_matmul = auto)"
        lines.append(f"  train steps {p:10s} {a['step_s'] * 1e3:.0f} ms/step = "
                     f"{a['gflops']:.1f} GFLOP/s = "
                     f"{r['fraction_of_peak_by_precision'][p]:.3f} of the {best} peak{mark}")
    if best != "bf16":
        lines.append(f"  bfloat16 is slower than float32 here (emulated): against the bf16 peak "
                     f"the {r['default_precision']} steps would score "
                     f"{r['fraction_of_bf16_peak']:.2f} (fraction_of_bf16_peak)")
    lines.append(f"  a round's training at the {best} peak: {r['round_train_s_at_peak']:.1f} s")
    return "\n".join(lines)


def main_limit(model: str | None, out: Path | None) -> None:
    """``lora-a2 speed --limit-only``: the limit figures alone."""
    r = measure_limit(model)
    print(format_limit(r))
    if out is not None:
        out.write_text(json.dumps(r, indent=1))


def run_speed(model: str = "minilm", repeats: int = 3, local_epochs: int = 1,
              memory_clients: list[int] | None = None,
              probe_fraction: float = 0.25) -> dict[str, Any]:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result: dict[str, Any] = {
        "model": model,
        "device": str(pick_device("auto")),
        "threads": torch.get_num_threads(),
        "engine_overhead": measure_overhead(model, repeats),
        "lora_a2_vs_fl_lora": measure_a2_vs_fl(model, repeats, local_epochs, probe_fraction),
        "upload_vs_information_minimum": measure_bytes(model),
    }
    # The memory runs use the twitter-sentiment data (enough examples for 1,000 clients); when
    # they cannot run, keep the timings measured so far and say why memory is missing.
    limit = measure_limit(model)
    result["limit"] = limit
    result.update({key: limit[key] for key in LIMIT_HEADLINE if key in limit})
    result["memory"], error = measure_memory(model, memory_clients or [10, 100, 1000])
    if error:
        result["memory_error"] = error
    mem = result["memory"]
    result["memory_per_client_kb"] = float(np.polyfit(
        [m["clients"] for m in mem], [m["peak_rss_mb"] * 1024 for m in mem], 1)[0]) \
        if len(mem) > 1 else None
    return result


def format_speed(r: dict[str, Any]) -> str:
    o, a, b = r["engine_overhead"], r["lora_a2_vs_fl_lora"], r["upload_vs_information_minimum"]
    lines = [
        f"model {r['model']} on {r.get('device', 'cpu')}, {r['threads']} torch threads (medians)",
        f"engine overhead     local round {o['engine_s']:.3f} s / bare loop {o['bare_s']:.3f} s"
        f" = {o['ratio']:.3f}  (goal ≤ 1.05)",
        f"lora-a2 / fl-lora   {a['lora_a2_s']:.3f} s / {a['fl_lora_s']:.3f} s = {a['ratio']:.2f}"
        f"  at {a['local_epochs']} local epoch(s) (paper: 1.17 at 5)",
    ]
    if "short_probe_ratio" in a:
        lines.append(f"  probe cut to {a['probe_fraction']:g}: {a['lora_a2_short_probe_s']:.3f} s / "
                     f"{a['fl_lora_s']:.3f} s = {a['short_probe_ratio']:.2f}")
    for name, v in a.get("variants", {}).items():
        lines.append(f"  {name}: {v['round_s']:.3f} s / {a['fl_lora_s']:.3f} s = "
                     f"{v['ratio']:.2f}  (goal ≤ 1.10)")
    lines += [
        f"upload / minimum    {b['upload_bytes']} B / {b['information_minimum']} B = "
        f"{b['ratio']:.4f}  (goal ≤ 1.02)",
    ]
    for m in r["memory"]:
        lines.append(f"peak RSS            {m['clients']:5d} clients: {m['peak_rss_mb']:.0f} MB"
                     f"  ({m['wall_s']:.0f} s)")
    if r.get("memory_error"):
        lines.append(f"peak RSS            not measured: {r['memory_error']}")
    if r.get("memory_per_client_kb") is not None:
        lines.append(f"                    ≈ {r['memory_per_client_kb']:.1f} KB per extra client")
    if r.get("limit"):
        lines.append(format_limit(r["limit"]))
    return "\n".join(lines)


def main_speed(model: str, repeats: int, local_epochs: int, clients: list[int],
               out: Path | None, probe_fraction: float = 0.25) -> None:
    r = run_speed(model, repeats, local_epochs, clients, probe_fraction)
    print(format_speed(r))
    if out is not None:
        out.write_text(json.dumps(r, indent=1))


# ---------------------------------------------------------------------- causal LM
CAUSAL_VARIANTS = {
    # name: (loss on response positions only, gradient checkpointing, dtype)
    "full logits, fp32": (False, False, "float32"),
    "response-only logits, fp32": (True, False, "float32"),
    "response-only + checkpointing, fp32": (True, True, "float32"),
    "response-only + checkpointing, bf16": (True, True, "bfloat16"),
}


def full_logits_loss(model, batch) -> torch.Tensor:
    """The textbook causal-LM loss: logits at every position (batch × length × vocabulary),
    then cross-entropy where a label exists — what ``response_logits`` avoids."""
    ids, att, labels = batch
    logits = model(input_ids=ids, attention_mask=att).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                           ignore_index=-100)


def causal_step_child(model: str, variant: str, steps: int, batch_size: int,
                      length: int) -> dict[str, Any]:
    """In a fresh process: ``steps`` LoRA training steps (r 8 on every attention and MLP
    projection) on ``batch_size`` × ``length``-token bbc-headlines examples; the median step
    time and the process's peak RSS."""
    response_only, checkpointing, dtype = CAUSAL_VARIANTS[variant]
    cfg = load_config(None, [f"model.name={model}", "data.name=bbc-headlines",
                             "strategy.name=fl-lora", "strategy.global_rank=8",
                             "strategy.rank_budget=8", f"model.max_length={length}",
                             f"model.dtype={dtype}", f"model.gradient_checkpointing={str(checkpointing).lower()}",
                             "data.num_clients=1", "data.partition=iid",
                             f"data.max_train_examples={batch_size * 4}", "data.max_test_examples=8"])
    exp = prepare(cfg)
    rt = exp.runtime
    params = [rt.params[n] for n in rt.layout.group_names(["A", "B"])]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-4)
    rt.model.train()
    # full-length rows only, so every step is exactly batch × length tokens
    full = (exp.enc_train.attention_mask.sum(dim=1) == length).nonzero()[:, 0]
    if len(full) < batch_size:
        raise RuntimeError(f"only {len(full)} examples fill {length} tokens")
    idx = full[:batch_size]
    batch = (exp.enc_train.input_ids[idx].to(rt.device),
             exp.enc_train.attention_mask[idx].to(rt.device),
             exp.enc_train.labels[idx].to(rt.device))
    times = []
    for _ in range(steps + 1):  # the first step warms up
        t0 = time.perf_counter()
        loss = exp.task.loss(rt.model, batch) if response_only else full_logits_loss(rt.model,
                                                                                      batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return {"variant": variant, "step_s": statistics.median(times[1:]),
            "peak_rss_mb": peak_rss_mb(),
            "loss": float(loss.detach()), "trainable": sum(p.numel() for p in params),
            "tokens": batch_size * length}


def measure_causal(model: str, steps: int = 3, batch_size: int = 8,
                   length: int = 128) -> list[dict[str, Any]]:
    """Each :data:`CAUSAL_VARIANTS` entry in its own process (peak RSS is per process)."""
    rows = []
    for variant in CAUSAL_VARIANTS:
        code = ("import json\nfrom lora_a2.speed import causal_step_child\n"
                f"print('JSON' + json.dumps(causal_step_child({model!r}, {variant!r}, {steps}, "
                f"{batch_size}, {length})))\n")
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        if res.returncode != 0:
            last = (res.stderr.strip().splitlines() or ["no output"])[-1]
            rows.append({"variant": variant, "error": last})
            continue
        rows.append(json.loads(res.stdout.split("JSON")[-1]))
    return rows


def format_causal(model: str, rows: list[dict[str, Any]], batch_size: int, length: int) -> str:
    lines = [f"causal LM {model}: LoRA r 8 on q/k/v/o/gate/up/down, batch {batch_size} × "
             f"{length} tokens (median step, peak RSS of a fresh process)"]
    base = next((r for r in rows if "error" not in r), None)
    for r in rows:
        if "error" in r:
            lines.append(f"  {r['variant']:38s} failed: {r['error']}")
            continue
        lines.append(f"  {r['variant']:38s} {r['step_s']:6.2f} s/step ({r['step_s'] / base['step_s']:.2f}×)"
                     f"  peak RSS {r['peak_rss_mb']:6.0f} MB ({r['peak_rss_mb'] / base['peak_rss_mb']:.2f}×)")
    return "\n".join(lines)


def main_causal_speed(model: str, steps: int, batch_size: int, length: int,
                      out: Path | None) -> None:
    rows = measure_causal(model, steps, batch_size, length)
    if all("error" in r for r in rows):  # nothing measured: the model is the problem
        reason = rows[0]["error"].removeprefix("lora_a2.errors.UserError: ")
        raise UserError(f"--causal-lm {model}: no variant ran ({reason})")
    print(format_causal(model, rows, batch_size, length))
    if out is not None:
        out.write_text(json.dumps({"model": model, "batch_size": batch_size, "length": length,
                                   "threads": torch.get_num_threads(), "rows": rows}, indent=1))
