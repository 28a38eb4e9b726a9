"""Server-side aggregation rules. Pure tensor math: no I/O, no engine, no model.

Every strategy combines client deltas with these functions, so the local and the Flower engine
run the very same arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from .selection import factor_mask


def data_weights(num_examples: Sequence[int]) -> list[float]:
    """w_k = |D_k| / Σ_j |D_j| over the clients that replied this round (docs/ALGORITHM.md §1.1)."""
    if any(n < 0 for n in num_examples):
        raise ValueError(f"aggregation weights need example counts ≥ 0, got {list(num_examples)}")
    total = float(sum(num_examples))
    if total <= 0:
        raise ValueError("aggregation weights need at least one example in the round")
    return [n / total for n in num_examples]


def weighted_sum(tensors: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """Σ_k w_k T_k, accumulated in float64 so that the client order barely matters."""
    if len(tensors) != len(weights) or not tensors:
        raise ValueError("need one weight per tensor and at least one tensor")
    acc = torch.zeros(tensors[0].shape, dtype=torch.float64)
    for t, w in zip(tensors, weights):
        acc += float(w) * t.to(torch.float64)
    return acc.to(tensors[0].dtype)


def aggregate_slots(active_factor: str, deltas: Sequence[Sequence[Tensor]],
                    selections: Sequence[Tensor], weights: Sequence[float],
                    renormalize: bool = False) -> list[Tensor]:
    """LoRA-A2 aggregation of the active factor (docs/ALGORITHM.md §2.6).

    ``deltas[k][m]`` is client k's dense delta of module m's active factor, zero at slots it did
    not select; ``selections[k]`` its (N, r_G) boolean selection. Returns per module
    Σ_k w_k Δ_{k,m} — a client that did not select a slot contributes zero to it (the paper's
    rule). With ``renormalize`` each slot is instead divided by Σ_{k selected it} w_k, i.e.
    averaged over the clients that trained it (an experiment knob, off by default).

    Because the frozen factor is identical on all clients, adding this to the global active
    factor makes the global product exact: Σ_k w_k B_k A = (Σ_k w_k B_k) A.
    """
    num_modules = len(deltas[0])
    out = [weighted_sum([d[m] for d in deltas], weights) for m in range(num_modules)]
    if renormalize:
        cover = weighted_sum([s.to(torch.float64) for s in selections], weights)  # (N, r_G)
        for m in range(num_modules):
            denom = cover[m].clone()
            denom[denom == 0] = 1.0  # nobody trained the slot: its sum is 0 anyway
            out[m] = (out[m].to(torch.float64) / factor_mask(active_factor, denom)).to(out[m].dtype)
    return out


# ---------------------------------------------------------------------- FedBuff (async)
def staleness_weight(staleness: int) -> float:
    """FedBuff's staleness scaling s(τ) = 1 / √(1 + τ) (Nguyen et al., "Federated Learning with
    Buffered Asynchronous Aggregation", AISTATS 2022: the polynomial scaling of FedAsync, Xie
    et al. 2019, with exponent ½), τ = the aggregations the server made between the client's
    download and its upload's arrival (0 = fresh)."""
    if staleness < 0:
        raise ValueError(f"staleness must be ≥ 0, got {staleness}")
    return 1.0 / math.sqrt(1.0 + staleness)


def buffered_weights(num_examples: Sequence[int], staleness: Sequence[int],
                     server_lr: float = 1.0) -> list[float]:
    """The weight of each of a buffer's K updates in FedBuff's server step
    x ← x + Σ_k w_k Δ_k, with w_k = η_g · s(τ_k) · n_k / Σ_j n_j.

    The paper averages the buffer uniformly, x ← x − η_g (1/K) Σ_k s(τ_k) Δ_k (its client delta
    is x_start − x_end, ours x_end − x_start, hence the sign); here the 1/K is the data weight
    n_k / Σ_j n_j every synchronous strategy of this package uses, which is 1/K when the
    clients hold equal data, and the synchronous rule Σ_k (n_k / Σ_j n_j) Δ_k when every τ_k = 0
    and η_g = 1. The weights are not renormalised: stale updates shrink the step, as in the
    paper."""
    if len(num_examples) != len(staleness):
        raise ValueError(f"{len(staleness)} staleness values for {len(num_examples)} updates")
    return [server_lr * staleness_weight(t) * w
            for w, t in zip(data_weights(num_examples), staleness)]
