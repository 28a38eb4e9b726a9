"""Mixed precision (``train.precision``): the autocast context of the model's forward passes,
and what the hardware offers for bfloat16.

- ``fp32``: no context at all (a null context), so a run is bit-identical to one made before
  the key existed.
- ``bf16-mixed``: ``torch.autocast(device_type, dtype=torch.bfloat16)`` around every forward
  pass (local training, LoRA-A2's gradient probe, evaluation and generation). The backward
  pass runs outside the context, as torch recommends: autocast has recorded each cast, so the
  gradients flow back through the bfloat16 products and arrive in the float32 dtype of the
  LoRA factors. The factors, their gradients, AdamW's state and the uploads stay float32.

A leaf: it imports torch only, so the runtime, the runner and ``lora-a2 speed`` share it.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

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
        path = (f"CPU without AVX512-BF16 or AMX ({capability}): bfloat16 is emulated, "
                f"slower than float32")
    return {"bf16_native": bool(found), "bf16_path": path, "cpu_capability": capability}


def describe(precision: str, base_dtype: str, device: torch.device | str = "cpu") -> str:
    """One line: what a run computes in and stores in (the console summary and summary.json's
    ``precision_detail``)."""
    if precision == "bf16-mixed":
        line = (f"bf16-mixed: bfloat16 autocast on {bf16_hardware(device)['bf16_path']}; base "
                f"weights stored {base_dtype}")
    elif base_dtype in ("bfloat16", "float16"):
        line = (f"fp32 (no autocast), but the base weights are stored {base_dtype}, so their "
                f"products run in {base_dtype} on {bf16_hardware(device)['bf16_path']}")
    else:
        line = f"fp32: no autocast; base weights stored {base_dtype}"
    return line + "; LoRA factors, optimiser state and uploads float32"
