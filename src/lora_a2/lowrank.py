"""Server math of the heterogeneous-rank baselines (FlexLoRA, HetLoRA, FLoRA). Pure tensor math.

Notation (docs/ALGORITHM.md §1): client k of rank r_k holds A_k (r_k × d_in), B_k (d_out × r_k); its
weight delta is s_k · B_k A_k. Weights w_k sum to 1 over the round's clients (the data weights; under central DP the
fixed-denominator weights sum to 1 only in expectation). Products and sums
are accumulated in float64 and returned in the inputs' dtype.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------- rank padding
def pad_rank(t: Tensor, rank: int, axis: int) -> Tensor:
    """Zero-pad ``t`` along ``axis`` (0: rows of A, 1: columns of B) to ``rank`` slots."""
    have = t.shape[axis]
    if have > rank:
        raise ValueError(f"cannot pad {have} slots down to {rank}")
    if have == rank:
        return t
    shape = list(t.shape)
    shape[axis] = rank - have
    return torch.cat([t, torch.zeros(shape, dtype=t.dtype, device=t.device)], dim=axis)


def truncate_rank(t: Tensor, rank: int, axis: int) -> Tensor:
    """The first ``rank`` slots of ``t`` along ``axis`` (inverse of :func:`pad_rank`)."""
    return t.narrow(axis, 0, min(rank, t.shape[axis]))


# ---------------------------------------------------------------------- weights
def norm_weights(norms: Sequence[float], fallback: Sequence[float]) -> list[float]:
    """w_k = S_k / Σ_j S_j (HetLoRA's sparsity weights); ``fallback`` when Σ S_j is 0 or not finite."""
    total = float(sum(norms))
    if not math.isfinite(total) or total <= 0:
        return [float(w) for w in fallback]
    return [float(n) / total for n in norms]


# ---------------------------------------------------------------------- FlexLoRA
def weighted_product_sum(Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Sequence[float],
                         scalings: Sequence[float] | None = None) -> Tensor:
    """Σ_k w_k · s_k · B_k A_k (s_k = 1 when ``scalings`` is None): FlexLoRA's global ΔW."""
    if not Bs or len(Bs) != len(As) or len(Bs) != len(weights):
        raise ValueError("need one B, one A and one weight per client, and at least one client")
    scalings = scalings or [1.0] * len(Bs)
    acc = torch.zeros(Bs[0].shape[0], As[0].shape[1], dtype=torch.float64)
    for b, a, w, s in zip(Bs, As, weights, scalings):
        acc += (float(w) * float(s)) * (b.to(torch.float64) @ a.to(torch.float64))
    return acc.to(Bs[0].dtype)


@dataclass
class SvdResult:
    """Rank-r factors with ``left @ right`` = the best rank-r approximation of W (Eckart–Young).

    ``left`` = U[:, :r] Σ[:r] (d_out × r: all singular values on this side), ``right`` = Vᵀ[:r]
    (r × d_in, orthonormal rows). ``status``: ``ok``, ``zero`` (W = 0: factors are zero, the
    caller must supply a trainable A), ``nonfinite`` (W had NaN/Inf: zero factors), or
    ``fallback`` (LAPACK's default SVD failed; a more robust route was used).
    """

    left: Tensor
    right: Tensor
    singular_values: Tensor
    status: str


def truncated_svd(W: Tensor, rank: int) -> SvdResult:
    """Best rank-``rank`` factorisation of W that never raises and never returns NaN.

    W is scaled to max |entry| = 1 (no overflow), decomposed in float64 by LAPACK's divide and
    conquer SVD; if that fails to converge, by the slower QR-iteration driver (``gesvd``); if
    that fails too, by the eigen-decomposition of the smaller Gram matrix (always converges;
    tiny singular values lose relative accuracy, which does not matter for a truncation).
    Ranks beyond rank(W) get zero singular values; their right vectors are still orthonormal.
    """
    d_out, d_in = W.shape
    k = min(rank, d_out, d_in)
    dtype = W.dtype if W.dtype.is_floating_point else torch.float32

    def pack(u: Tensor, s: Tensor, vh: Tensor, status: str) -> SvdResult:
        left = torch.zeros(d_out, rank, dtype=torch.float64)
        right = torch.zeros(rank, d_in, dtype=torch.float64)
        sv = torch.zeros(rank, dtype=torch.float64)
        left[:, :k] = u[:, :k] * s[:k]
        right[:k] = vh[:k]
        sv[:k] = s[:k]
        return SvdResult(left.to(dtype), right.to(dtype), sv, status)

    w = W.detach().to("cpu", torch.float64)
    if not torch.isfinite(w).all():
        log.warning("FlexLoRA SVD: ΔW has NaN/Inf entries; sending zero factors")
        return pack(torch.zeros(d_out, k), torch.zeros(k), torch.zeros(k, d_in), "nonfinite")
    scale = float(w.abs().max()) if w.numel() else 0.0
    if scale == 0.0:
        return pack(torch.zeros(d_out, k), torch.zeros(k), torch.zeros(k, d_in), "zero")
    w = w / scale
    status = "ok"
    try:
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        if not (torch.isfinite(u).all() and torch.isfinite(s).all() and torch.isfinite(vh).all()):
            raise RuntimeError("non-finite SVD output")
    except (RuntimeError, torch.linalg.LinAlgError) as e:
        log.warning("FlexLoRA SVD failed (%s); using a fallback", str(e).splitlines()[0][:120])
        status = "fallback"
        u, s, vh = _fallback_svd(w)
    return pack(u, s * scale, vh, status)


def _fallback_svd(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    try:
        import scipy.linalg

        u, s, vh = scipy.linalg.svd(w.numpy(), full_matrices=False, lapack_driver="gesvd")
        out = torch.from_numpy(u), torch.from_numpy(s), torch.from_numpy(vh)
        if all(torch.isfinite(t).all() for t in out):
            return out
    except Exception:  # noqa: BLE001  (any failure: go to the route that cannot fail)
        pass
    # Gram route on the smaller side: W Wᵀ = U Σ² Uᵀ (or Wᵀ W = V Σ² Vᵀ).
    tall = w.shape[0] >= w.shape[1]
    gram = w.T @ w if tall else w @ w.T
    evals, evecs = torch.linalg.eigh(gram)
    order = torch.argsort(evals, descending=True)
    s = evals[order].clamp_min(0).sqrt()
    vecs = evecs[:, order]
    # σ² is known to ≈ eps · σ_max², so σ below √eps · σ_max is rounding noise: a null direction
    null = s <= s.max() * 10 * torch.finfo(w.dtype).eps ** 0.5
    s = torch.where(null, torch.zeros_like(s), s)
    safe = torch.where(null, torch.ones_like(s), s)
    if tall:  # vecs = V; U = W V / σ
        vh = vecs.T
        u = (w @ vecs) / safe
        u[:, null] = 0
    else:  # vecs = U; Vᵀ = Σ⁻¹ Uᵀ W
        u = vecs
        vh = (vecs.T @ w) / safe[:, None]
        if null.any():  # Σ⁻¹ Uᵀ W is 0 there: complete the rows to an orthonormal set (the
            # QR of [kept rows; I]ᵀ starts with the kept rows' span), so a factor built from
            # them still has trainable directions, as the tall branch's eigenvectors do
            kept = int((~null).sum())
            q, _ = torch.linalg.qr(torch.cat([vh[~null], torch.eye(w.shape[1], dtype=w.dtype)]).T)
            vh[null] = q[:, kept:kept + int(null.sum())].T
    return u, s, vh


# ---------------------------------------------------------------------- HetLoRA
def pad_and_average(factors: Sequence[Tensor], weights: Sequence[float], rank: int,
                    axis: int) -> Tensor:
    """Σ_k w_k · pad(F_k) with every factor zero-padded to ``rank`` slots along ``axis``."""
    padded = [pad_rank(f, rank, axis).to(torch.float64) for f in factors]
    acc = torch.zeros_like(padded[0])
    for f, w in zip(padded, weights):
        acc += float(w) * f
    return acc.to(factors[0].dtype)


def product_norm(B: Tensor, A: Tensor) -> float:
    """‖B A‖_F, computed in float64."""
    return float(torch.linalg.matrix_norm(B.to(torch.float64) @ A.to(torch.float64)))


def pruned_rank(rank: int, gamma: float) -> int:
    """HetLoRA's next rank after a prune: max(1, ⌊γ · r⌋). Equal to r when nothing can go."""
    return max(1, min(rank, int(math.floor(gamma * rank + 1e-9))))


def prune_decision(rank: int, gamma: float, tail_norm: float, previous_tail: float | None) -> int:
    """The client's rank for its upload: ⌊γ r⌋ if its tail norm fell since its previous round.

    The tail is slots [pruned_rank(r, γ), r) — exactly the slots a prune would drop. No history
    (first participation), no decrease, or nothing to drop (r = 1, or γ r ≥ r − tiny) → keep r.
    """
    target = pruned_rank(rank, gamma)
    if target >= rank or previous_tail is None:
        return rank
    return target if tail_norm < previous_tail else rank


# ---------------------------------------------------------------------- FLoRA
def stack_lora(Bs: Sequence[Tensor], As: Sequence[Tensor],
               weights: Sequence[float]) -> tuple[Tensor, Tensor]:
    """FLoRA's stacking: B = [B_1 … B_K] (columns, unweighted), A = [w_1 A_1; …; w_K A_K] (rows).

    B A = Σ_k w_k B_k A_k exactly, at rank Σ_k r_k.
    """
    if not Bs or len(Bs) != len(As) or len(Bs) != len(weights):
        raise ValueError("need one B, one A and one weight per client, and at least one client")
    B = torch.cat(list(Bs), dim=1)
    A = torch.cat([float(w) * a for a, w in zip(As, weights)], dim=0)
    return B, A


# ---------------------------------------------------------------------- FedEx-LoRA
def exact_residual(Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    """FedEx-LoRA's residual Σ_k w_k B_k A_k − (Σ_k w_k B_k)(Σ_k w_k A_k) (weights sum to 1).

    What averaging the factors separately loses: folded into the frozen base (times the LoRA
    scaling), it makes base + s·B̄Ā equal base + s·Σ_k w_k B_k A_k exactly. Equals
    Σ_k w_k (B_k − B̄)(A_k − Ā), so it vanishes when all clients agree on either factor.
    """
    if not Bs or len(Bs) != len(As) or len(Bs) != len(weights):
        raise ValueError("need one B, one A and one weight per client, and at least one client")
    b_mean = sum(float(w) * b.to(torch.float64) for b, w in zip(Bs, weights))
    a_mean = sum(float(w) * a.to(torch.float64) for a, w in zip(As, weights))
    return (_product_sum64(Bs, As, weights) - b_mean @ a_mean).to(Bs[0].dtype)


def _product_sum64(Bs: Sequence[Tensor], As: Sequence[Tensor], weights: Sequence[float]) -> Tensor:
    acc = torch.zeros(Bs[0].shape[0], As[0].shape[1], dtype=torch.float64)
    for b, a, w in zip(Bs, As, weights):
        acc += float(w) * (b.to(torch.float64) @ a.to(torch.float64))
    return acc


# ---------------------------------------------------------------------- FedSVD
def orthonormal_refactor(B: Tensor, A: Tensor) -> tuple[Tensor, Tensor]:
    """FedSVD's re-factorisation: (B', A') with B'A' = BA, A' = Vᵀ[:r] (orthonormal rows) and
    B' = U[:, :r] Σ[:r] (every singular value on B), where BA = U Σ Vᵀ.

    BA has rank ≤ r, so the rank-r SVD is exact. It is computed without forming the
    d_out × d_in product: B = Q_B R_B and Aᵀ = Q_A R_A (thin QR), R_B R_Aᵀ = u s vᵀ (r × r), so
    U = Q_B u, V = Q_A v. Float64 throughout; returned in the inputs' dtypes. Where BA has rank
    < r the extra rows of A' are still orthonormal and the matching columns of B' are zero.
    """
    b64, a64 = B.to(torch.float64), A.to(torch.float64)
    q_b, r_b = torch.linalg.qr(b64)  # (d_out × r), (r × r)
    q_a, r_a = torch.linalg.qr(a64.T)  # (d_in × r), (r × r)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)
    new_b = (q_b @ u) * s.unsqueeze(0)
    new_a = (q_a @ vh.T).T
    return new_b.to(B.dtype), new_a.to(A.dtype)
