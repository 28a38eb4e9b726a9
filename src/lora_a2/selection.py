"""LoRA-A2 adaptive rank selection: slot scores, one global top-k, masks. Pure tensor math.

A *slot* (m, i) is rank index i < r_G of target module m; there are N · r_G slots. Scores and
selections are (N, r_G) tensors whose rows follow the module order of the adapter.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

FACTORS = ("A", "B")


SLOT_SCORES = ("frobenius", "rms")


def slot_scores(active_factor: str, delta: Sequence[Tensor], frozen: Sequence[Tensor],
                kind: str = "frobenius") -> Tensor:
    """Importance of every slot (docs/ALGORITHM.md §2.4.2; the paper's rank-wise score).

    B-round (``delta`` = ΔB_m, d_out × r; ``frozen`` = A_m, r × d_in):
        score(m, i) = ‖ΔB_m[:, i] A_m[i, :]‖_F = ‖ΔB_m[:, i]‖ · ‖A_m[i, :]‖.
    A-round (``delta`` = ΔA_m; ``frozen`` = B_m):
        score(m, i) = ‖B_m[:, i] ΔA_m[i, :]‖_F = ‖B_m[:, i]‖ · ‖ΔA_m[i, :]‖.
    The identity ‖u vᵀ‖_F = ‖u‖ ‖v‖ means the rank-1 product never has to be formed.
    The LoRA scaling α/r is common to all slots and does not change the ranking, so it is left out.

    ``kind = "frobenius"`` is that literal score (the paper's rule, the default). ``kind = "rms"``
    divides each module's scores by √(d_out · d_in), the root mean square of the slot's rank-1
    ΔW entries. It is an experiment knob, not the paper's: under AdamW every entry of the active
    factor moves by about the learning rate, so the Frobenius score grows with the module's size
    (√d_out through ΔB in a B-round; both dimensions in an A-round) and the global top-k favours
    the largest modules. The RMS score removes that size term; with A initialised at std
    1/√(3·d_in), ‖A[i,:]‖ does not grow with d_in, so it over-corrects for a large d_in
    (docs/RESULTS.md, the score ablation).
    """
    if kind not in SLOT_SCORES:
        raise ValueError(f"kind must be one of {SLOT_SCORES}, got {kind!r}")
    if active_factor == "B":
        rows = [d.float().norm(dim=0) * f.float().norm(dim=1) for d, f in zip(delta, frozen)]
        sizes = [d.shape[0] * f.shape[1] for d, f in zip(delta, frozen)]
    elif active_factor == "A":
        rows = [f.float().norm(dim=0) * d.float().norm(dim=1) for d, f in zip(delta, frozen)]
        sizes = [f.shape[0] * d.shape[1] for d, f in zip(delta, frozen)]
    else:
        raise ValueError(f"active_factor must be 'A' or 'B', got {active_factor!r}")
    if kind == "rms":
        rows = [row / math.sqrt(size) for row, size in zip(rows, sizes)]
    return torch.stack(rows)


def select_top_k(scores: Tensor, k: int, positive_only: bool = False) -> Tensor:
    """Boolean (N, r_G) selection of the k highest-scoring slots over the *whole* model.

    One global top-k (docs/ALGORITHM.md §2.4.3): a module may receive 0 slots or all r_G of them.
    Ties are broken by slot order (stable sort), so the selection is deterministic.
    ``positive_only``: never select a slot whose score is 0 or not finite — such a slot's
    trained factor gets no gradient (in an A-round, a B column that is still zero), so its
    upload would be pure weight-decay shrinkage; fewer than k slots are then selected.
    """
    if k < 0:
        raise ValueError(f"k must be ≥ 0, got {k}")
    flat = scores.reshape(-1)
    if positive_only:
        useful = torch.isfinite(flat) & (flat > 0)
        flat = torch.where(useful, flat, torch.full_like(flat, -1.0))
        k = min(k, int(useful.sum()))
    k = min(k, flat.numel())
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    selected = torch.zeros(flat.numel(), dtype=torch.bool)
    selected[order] = True
    return selected.reshape(scores.shape)


def slot_ids(selected: Tensor) -> Tensor:
    """Flat slot ids m · r_G + i of a boolean (N, r_G) selection, ascending (the wire format)."""
    return torch.nonzero(selected.reshape(-1), as_tuple=False).reshape(-1).to(torch.int32)


def selection_from_ids(ids: Tensor, num_modules: int, rank: int) -> Tensor:
    """Inverse of :func:`slot_ids`."""
    sel = torch.zeros(num_modules * rank, dtype=torch.bool)
    sel[ids.long()] = True
    return sel.reshape(num_modules, rank)


def factor_mask(active_factor: str, row: Tensor) -> Tensor:
    """Broadcastable mask for one module's active factor from its (r_G,) selection row.

    B is d_out × r (a slot is a column) → shape (1, r); A is r × d_in (a slot is a row) → (r, 1).
    """
    if active_factor == "B":
        return row.reshape(1, -1)
    if active_factor == "A":
        return row.reshape(-1, 1)
    raise ValueError(f"active_factor must be 'A' or 'B', got {active_factor!r}")


def slot_size(active_factor: str, d_in: int, d_out: int) -> int:
    """Number of values one slot of the active factor carries (a B column or an A row)."""
    return d_out if active_factor == "B" else d_in


def gather_slots(active_factor: str, delta: Sequence[Tensor], selected: Tensor) -> Tensor:
    """Flat vector of the selected slots' values, in slot-id order (what a client uploads)."""
    parts: list[Tensor] = []
    for m, d in enumerate(delta):
        idx = torch.nonzero(selected[m]).reshape(-1)
        if idx.numel() == 0:
            continue
        part = d[:, idx].T if active_factor == "B" else d[idx, :]
        parts.append(part.reshape(-1))
    if not parts:
        return torch.zeros(0)
    return torch.cat(parts)


def scatter_slots(active_factor: str, values: Tensor, selected: Tensor,
                  shapes: Sequence[tuple[int, int]]) -> list[Tensor]:
    """Inverse of :func:`gather_slots`: dense per-module deltas, zero at unselected slots."""
    out: list[Tensor] = []
    pos = 0
    for m, shape in enumerate(shapes):
        dense = torch.zeros(shape, dtype=values.dtype)
        idx = torch.nonzero(selected[m]).reshape(-1)
        if idx.numel():
            if active_factor == "B":
                n = shape[0] * idx.numel()
                dense[:, idx] = values[pos:pos + n].reshape(idx.numel(), shape[0]).T
            else:
                n = shape[1] * idx.numel()
                dense[idx, :] = values[pos:pos + n].reshape(idx.numel(), shape[1])
            pos += n
        out.append(dense)
    if pos != values.numel():
        raise ValueError(f"{values.numel()} values for selected slots that hold {pos}")
    return out


def private_top_k(scores: Tensor, k: int, epsilon: float, generator: torch.Generator) -> Tensor:
    """ε-DP top-k selection: the one-shot Gumbel mechanism of Durfee & Rogers ("Practical
    Differentially Private Top-k Selection with Pay-what-you-get Composition", NeurIPS 2019).

    Utilities u_i = s_i / max_j s_j ∈ [0, 1] (0 everywhere when every score is 0). Against a
    client-level neighbour (the client's whole data replaced) any utility vector in [0, 1]^m is
    possible on either side, so each u_i has sensitivity Δ = 1 whatever the normalisation. Add
    i.i.d. Gumbel(0, 2Δ/ε₀) to every u_i and keep the k largest: this has the same distribution
    as k rounds of peeling exponential mechanisms, each ε₀-DP (their Lemma 4.2), so the whole
    selection is (k·ε₀)-DP (basic composition) and, each exponential mechanism being
    ε₀-bounded-range, (k·ε₀²/8)-zCDP (Cesar & Rogers, ALT 2021). ε₀ = ``epsilon`` / k, so the
    selection is ``epsilon``-DP per call. Ties of the noisy values (probability 0) fall back to
    slot order, as in :func:`select_top_k`.
    """
    if k <= 0:
        return torch.zeros(scores.shape, dtype=torch.bool)
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    flat = torch.nan_to_num(scores.reshape(-1).to(torch.float64), nan=0.0, posinf=0.0,
                            neginf=0.0).clamp_min(0.0)  # a non-finite score counts as 0
    top = float(flat.max()) if flat.numel() else 0.0
    utility = flat / top if top > 0 else torch.zeros_like(flat)
    k = min(k, flat.numel())
    if k == 0:  # no slots at all: nothing to select (ε/k below would divide by zero)
        return torch.zeros(scores.shape, dtype=torch.bool)
    eps0 = epsilon / k
    # a generator with its own ``uniform`` (lora_a2.privacy.OSRandom: the OS CSPRNG) or torch's
    u = (generator.uniform(flat.numel()) if hasattr(generator, "uniform")
         else torch.rand(flat.numel(), generator=generator, dtype=torch.float64)).clamp_min(1e-300)
    gumbel = -torch.log(-torch.log(u))  # standard Gumbel
    noisy = utility + (2.0 / eps0) * gumbel
    return select_top_k(noisy.reshape(scores.shape), k)
