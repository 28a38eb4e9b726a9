"""Mixed precision (``train.precision``): the autocast context of the model's forward passes,
and what the hardware offers for bfloat16.

- ``fp32``: no context at all (a null context), so a run is bit-identical to one made before
  the key existed.
- ``bf16-mixed``: ``torch.autocast(device_type, dtype=torch.bfloat16)`` around every forward
  pass (local training, LoRA-A2's gradient probe, evaluation and generation). The backward
  pass runs outside the context, as torch recommends: autocast has recorded each cast, so the
  gradients flow back through the bfloat16 products and arrive in the float32 dtype of the
  LoRA factors. The factors, their gradients, AdamW's state and the uploads stay float32.

Which kernels compute the bfloat16 matrix products (``train.bf16_matmul``): torch's own
(``bf16``: the bfloat16 units where the device has them; on a CPU without them oneDNN emulates
bfloat16 — on an AVX2 CPU a product ≈ 10× slower than in float32, a MiniLM training step ≈ 22×),
or float32 kernels on the same bfloat16 operands with the product rounded once to bfloat16
(``fp32``: :class:`Bf16ProductsInFp32`): bfloat16 inputs, float32 accumulation, one rounding of
the result, as a bfloat16 matrix unit computes, up to the order of the sums (CUDA's cuBLAS may
also sum in reduced precision: torch's ``allow_bf16_reduced_precision_reduction``). ``auto``
picks ``bf16`` where :func:`bf16_hardware` finds bfloat16 units and ``fp32`` elsewhere. The
backward pass runs under the same choice (:func:`products`): its matrix products take bfloat16
operands too.

A leaf: it imports torch only, so the runtime, the runner and ``lora-a2 speed`` share it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

#: CPU flags (``/proc/cpuinfo``) of native bfloat16 matrix instructions, best first
CPU_BF16_FLAGS = (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"))


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context a forward pass runs under: a null context for ``fp32``, bfloat16 autocast on
    ``device``'s type (``cpu`` or ``cuda``) for ``bf16-mixed``."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16-mixed":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    raise ValueError(f"unknown precision {precision!r}")


#: the aten matrix products a linear layer, ``matmul`` and eager (or torch's math-path)
#: attention reach, forward and backward (``aten.linear`` and ``aten.matmul`` decompose into
#: these before dispatch). Fused attention kernels (``_scaled_dot_product_flash_attention*``,
#: the path torch takes where attention dropout is 0: evaluation, generation, Llama training)
#: are not among them and run as torch's own bfloat16 kernels; on CPU that kernel sums in
#: float32 and is not the slow part (docs/MODELS_AND_DATA.md).
MATRIX_PRODUCTS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default,
                   torch.ops.aten.bmm.default, torch.ops.aten.baddbmm.default)


class Bf16ProductsInFp32(TorchDispatchMode):
    """While active, every matrix product (:data:`MATRIX_PRODUCTS`) whose tensor operands are
    all bfloat16 runs as a float32 kernel on the operands' exact float32 values (every bfloat16
    number is one), and its result is rounded once to bfloat16: a bfloat16 matrix unit's
    arithmetic (bfloat16 inputs, float32 accumulation, one rounding), up to the order of the
    sums, on a device without one. Every other operation runs unchanged — a product mixing
    bfloat16 with another dtype too, so torch rejects it as it would without the mode.
    ``calls`` counts the products it took over."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        if func in MATRIX_PRODUCTS and tensors and all(t.dtype == torch.bfloat16
                                                       for t in tensors):
            self.calls += 1
            wide = [a.float() if isinstance(a, torch.Tensor) else a for a in args]
            return func(*wide, **kwargs).to(torch.bfloat16)
        return func(*args, **kwargs)


def bf16_products_in_fp32(precision: str, bf16_matmul: str,
                          device: torch.device | str = "cpu") -> bool:
    """Whether ``bf16-mixed``'s matrix products run as float32 kernels
    (:class:`Bf16ProductsInFp32`): ``bf16_matmul`` = ``fp32``, or ``auto`` on a device without
    bfloat16 units. Never under ``fp32``."""
    if precision != "bf16-mixed":
        return False
    if bf16_matmul == "auto":
        return not bf16_hardware(device)["bf16_native"]
    if bf16_matmul in ("bf16", "fp32"):
        return bf16_matmul == "fp32"
    raise ValueError(f"unknown bf16_matmul {bf16_matmul!r}")


def products(in_fp32: bool) -> contextlib.AbstractContextManager:
    """The context a backward pass runs under: :class:`Bf16ProductsInFp32` where ``in_fp32``
    (:func:`bf16_products_in_fp32`), else a null context."""
    return Bf16ProductsInFp32() if in_fp32 else contextlib.nullcontext()


def forward(precision: str, device: torch.device, in_fp32: bool = False
            ) -> contextlib.AbstractContextManager:
    """The context a forward pass runs under: :func:`autocast` and, where ``in_fp32``,
    :class:`Bf16ProductsInFp32` inside it (both entered at ``with``, not before)."""
    if not in_fp32:
        return autocast(precision, device)
    return _autocast_in_fp32(precision, device)


@contextlib.contextmanager
def _autocast_in_fp32(precision: str, device: torch.device) -> Iterator[None]:
    with autocast(precision, device), Bf16ProductsInFp32():
        yield


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU feature flags of the first processor in ``/proc/cpuinfo`` (empty where there is
    none, e.g. macOS); ``cpuinfo`` replaces the file's text (tests)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    for line in cpuinfo.splitlines():
        if line.lower().startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def bf16_hardware(device: torch.device | str = "cpu", cpuinfo: str | None = None,
                  cuda: tuple[str, tuple[int, int]] | None = None) -> dict[str, Any]:
    """What ``device`` offers for bfloat16 products: ``bf16_native`` (True where they run on
    bfloat16 matrix units: the tensor cores of a CUDA card of compute capability 8.0 or later
    (Ampere on), or a CPU with AMX-BF16 / AVX512-BF16, which oneDNN uses), ``bf16_path`` (one
    line saying which) and, on CPU, ``cpu_capability`` (the vector ISA torch's own kernels
    dispatch to, ``torch.backends.cpu.get_cpu_capability()``). ``cpuinfo`` replaces
    ``/proc/cpuinfo``'s text and ``cuda`` the card's (name, compute capability) (tests).

    ``torch.cuda.is_bf16_supported()`` is not the test: it also answers True where bfloat16 is
    only emulated (a V100 or T4), and it asks about the current card, not ``device``."""
    dev = torch.device(device)
    if dev.type == "cuda":
        name, capability = cuda or (torch.cuda.get_device_name(dev),
                                    torch.cuda.get_device_capability(dev))
        native = tuple(capability) >= (8, 0)
        major, minor = capability
        return {"bf16_native": native,
                "bf16_path": f"CUDA {name} (compute capability {major}.{minor}): "
                + ("native bfloat16" if native else "no native bfloat16 (emulated, slow)")}
    capability = torch.backends.cpu.get_cpu_capability()
    flags = cpu_flags(cpuinfo)
    found = [label for flag, label in CPU_BF16_FLAGS if flag in flags]
    if found:
        path = f"CPU {' + '.join(found)} (oneDNN's native bfloat16 kernels)"
    else:
        path = (f"CPU without AVX512-BF16 or AMX ({capability}): torch's bfloat16 kernels "
                f"are emulated here, slower than float32")
    return {"bf16_native": bool(found), "bf16_path": path, "cpu_capability": capability}


def describe(precision: str, base_dtype: str, device: torch.device | str = "cpu",
             bf16_matmul: str = "auto") -> str:
    """One line: what a run computes in and stores in (the console summary and summary.json's
    ``precision_detail``)."""
    if precision == "bf16-mixed":
        kernels = ("float32 kernels on the bfloat16 operands, each product rounded once to "
                   "bfloat16" if bf16_products_in_fp32(precision, bf16_matmul, device)
                   else "torch's bfloat16 kernels")
        line = (f"bf16-mixed: bfloat16 autocast, its matrix products by {kernels} "
                f"(train.bf16_matmul = {bf16_matmul}; hardware: {bf16_hardware(device)['bf16_path']})"
                f"; base weights stored {base_dtype}")
    elif base_dtype in ("bfloat16", "float16"):
        line = (f"fp32 (no autocast), but the base weights are stored {base_dtype}, so their "
                f"products run in {base_dtype} on {bf16_hardware(device)['bf16_path']}")
    else:
        line = f"fp32: no autocast; base weights stored {base_dtype}"
    return line + "; LoRA factors, optimiser state and uploads float32"
