"""Counting a model's FLOPs: torch's :class:`~torch.utils.flop_counter.FlopCounterMode`, taught
the CPU's fused attention. One home for the count that ``lora-a2 speed`` (the limit figures)
and the fleet's simulated clock (a client's compute time) both take.

A leaf: it imports torch only.
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter, taught the CPU's fused attention (torch knows only the CUDA
    kernels' ``_scaled_dot_product_*``; on CPU the attention would count as zero). It counts
    the products an eager attention makes — q·kᵀ and ·v forward, twice as many backward — i.e.
    the model's FLOPs, not the fused backward's recomputation of q·kᵀ (torch's CUDA rule adds
    it)."""
    aten = torch.ops.aten

    def forward(q, k, v, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(q, k, v)

    def backward(grad_out, q, k, v, *args, out_shape=None, **kwargs) -> int:
        return 2 * sdpa_flop_count(q, k, v)

    return FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: backward})
