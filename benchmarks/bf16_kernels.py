"""How close ``train.bf16_matmul = fp32`` (float32 kernels on the bfloat16 operands, each product
rounded once to bfloat16) comes to torch's own bfloat16 kernels, and how far both are from
float32.

    .venv/bin/python benchmarks/bf16_kernels.py                 # MiniLM, 16 × 64, LoRA r 8
    .venv/bin/python benchmarks/bf16_kernels.py --model tiny-random-bert

Prints, for one 1024×384 · 384×1536 linear layer (MiniLM's FFN shape) with bias, the fraction
of output elements in which each kernel's bfloat16 result differs from the exact product (float64
sums) rounded once to bfloat16; then, for one training step of the default run's model and
shape (forward, loss, backward; the same dropout masks), the relative difference (‖x − y‖ /
‖y‖) of the logits and of the LoRA factors' gradients between fp32, bf16-mixed on torch's
bfloat16 kernels and bf16-mixed on float32 kernels; then the time of one evaluation forward pass
in each (its attention on torch's fused kernel). A single product tells whether the
arithmetic is the same; a whole step tells how far a one-step difference in a product's rounding
carries through the model's layers. Slow where bfloat16 is emulated (one step on torch's
bfloat16 kernels: ≈ 16 s for MiniLM on a 2-core AVX2 CPU).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from lora_a2.client import batch_of
from lora_a2.errors import UserError
from lora_a2.precision import Bf16ProductsInFp32, bf16_hardware
from lora_a2.speed import limit_experiment

VARIANTS = (("fp32", "auto"), ("bf16-mixed", "bf16"), ("bf16-mixed", "fp32"))


def product_agreement(seed: int = 0) -> dict[str, float]:
    """Fraction of a bfloat16 linear layer's outputs that differ from the exact product rounded
    once, per kernel."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(1024, 384, generator=g).to(torch.bfloat16)
    w = torch.randn(1536, 384, generator=g).to(torch.bfloat16)
    b = torch.randn(1536, generator=g).to(torch.bfloat16)
    exact = (a.double() @ w.double().T + b.double()).to(torch.bfloat16)
    torch_kernels = torch.nn.functional.linear(a, w, b)
    with Bf16ProductsInFp32():
        fp32_kernels = torch.nn.functional.linear(a, w, b)
    return {"bf16": float((torch_kernels != exact).float().mean()),
            "fp32": float((fp32_kernels != exact).float().mean())}


def one_step(model: str, precision: str, kernels: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, the LoRA factors' gradients) of one training step through the runtime's own
    forward and backward contexts."""
    exp, data = limit_experiment(model, 16, 64, precision, kernels)
    rt = exp.runtime
    gen = torch.Generator().manual_seed(1)
    for n in rt.layout.group_names(["A", "B"]):
        rt.params[n].requires_grad_(True)
        with torch.no_grad():  # B = 0 at the start would leave A's gradient at zero
            rt.params[n].normal_(0, 0.02, generator=gen)
    batch = batch_of(data, np.arange(len(data)), rt.device)
    rt.model.train()
    torch.manual_seed(0)  # the same dropout masks in every variant
    with rt.autocast():
        logits = rt.model(input_ids=batch[0], attention_mask=batch[1]).logits
        loss = torch.nn.functional.cross_entropy(logits.float(), batch[2])
    with rt.backward():
        loss.backward()
    grads = torch.cat([rt.params[n].grad.flatten() for n in rt.layout.group_names(["A", "B"])])
    return logits.detach().float(), grads


def eval_seconds(model: str, precision: str, kernels: str, batch: int = 64,
                 repeats: int = 2) -> float:
    """Best of ``repeats`` timings of one evaluation forward pass (``batch`` × 64 tokens, no
    dropout: torch's fused attention kernel, which the float32-kernel mode leaves alone)."""
    exp, data = limit_experiment(model, batch, 64, precision, kernels)
    rt = exp.runtime
    rt.model.eval()
    ids = data.input_ids.to(rt.device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        with torch.no_grad(), rt.autocast():
            rt.model(input_ids=ids, attention_mask=torch.ones_like(ids))
        times.append(time.perf_counter() - t0)
    return min(times)


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x - y).norm() / y.norm())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="minilm")
    args = ap.parse_args(argv)
    try:
        return report(args.model)
    except UserError as e:  # a model that cannot be loaded: one line, as the CLI says it
        print(f"error: {e}", file=sys.stderr)
        return 2


def report(model: str) -> int:
    """Print the three comparisons for ``model``."""
    print(f"device: {bf16_hardware('cpu')['bf16_path']}; {torch.get_num_threads()} torch threads")
    agree = product_agreement()
    print("one linear layer 1024×384 · 384×1536 + bias, outputs differing from the exact product "
          "rounded once to bfloat16:")
    print(f"  torch's bfloat16 kernels {100 * agree['bf16']:.4f} %; float32 kernels "
          f"{100 * agree['fp32']:.4f} %")
    out = {f"{p}/{k}": one_step(model, p, k) for p, k in VARIANTS}
    print(f"one training step of {model}, 16 × 64, relative difference (logits, LoRA "
          f"gradients):")
    for x, y in (("bf16-mixed/bf16", "fp32/auto"), ("bf16-mixed/fp32", "fp32/auto"),
                 ("bf16-mixed/fp32", "bf16-mixed/bf16")):
        print(f"  {x:16s} vs {y:16s} {rel(out[x][0], out[y][0]):.5f}  "
              f"{rel(out[x][1], out[y][1]):.5f}")
    print(f"one evaluation forward pass of {model}, 64 × 64, best of 2:")
    for p, k in VARIANTS:
        print(f"  {p}/{k:5s} {eval_seconds(model, p, k):.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
