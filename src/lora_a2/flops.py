"""Counting a model's FLOPs: torch's :class:`~torch.utils.flop_counter.FlopCounterMode`, with one
rule for every fused attention kernel (CPU and CUDA count alike). One home for the count that ``lora-a2 speed`` (the limit figures)
and the fleet's simulated clock (a client's compute time) both take.

A leaf: it imports torch only.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def _fused_attention_ops() -> tuple[list, list]:
    """(forward ops, backward ops) of scaled_dot_product_attention's fused kernels: the CPU's
    and CUDA's flash, CUDA's memory-efficient and cuDNN's (each takes q, k, v — backward:
    grad_out, q, k, v — as its first arguments). The cuDNN ones exist from torch 2.4 on."""
    aten = torch.ops.aten
    kernels = ["_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
               "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"]
    have = [k for k in kernels if hasattr(aten, k)]
    return ([getattr(aten, k) for k in have], [getattr(aten, f"{k}_backward") for k in have])


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter, with one rule for every fused attention kernel: the products an
    eager attention makes — q·kᵀ and ·v forward, twice as many backward — i.e. the model's
    FLOPs. torch alone counts the CPU's fused kernel as zero, and its CUDA rule adds the fused
    backward's recomputation of q·kᵀ (5 products, not 4), so the same config would count
    differently on each device; the simulated clock (``fleet``) must not."""

    def forward(q, k, v, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(q, k, v)

    def backward(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
        return 2 * sdpa_flop_count(q, k, v)

    fwd, bwd = _fused_attention_ops()
    return FlopCounterMode(display=False, custom_mapping={**dict.fromkeys(fwd, forward),
                                                          **dict.fromkeys(bwd, backward)})
