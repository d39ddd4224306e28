"""Singular values from factors and the InRank rank rule. Pure functions on tensors.

The layer never forms its dense out×in product to look at its spectrum: with U = Q_u R_u and
V = Q_v R_v (thin QR), U·Vᵀ = Q_u (R_u R_vᵀ) Q_vᵀ and the orthonormal Q's leave singular values
unchanged, so the spectrum is that of the small k×k core R_u R_vᵀ. Cost O((in + out)·k²)
instead of O(in·out·min(in, out)). The cumulative update W_t − W_0 = U_t·V_tᵀ − U_0·V_0ᵀ is the
product of the stacked factors [U_t, U_0]·[V_t, −V_0]ᵀ, so it is measured the same way.
"""
from __future__ import annotations

import torch

from ..errors import InRankValueError
from ..vocabulary import CRITERIA

# "variance": the paper's 1 − var(s − s_k)/var(s) over the measured singular values;
# "variance_padded": the reference code's exact ratio, s zero-padded to the full rank first;
# "energy": Σ_{i<k} s_i² / Σ s_i².


@torch.no_grad()
def factor_singular_values(U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """Singular values (descending) of U @ V.T, for U: out×k and V: in×k, without forming it.
    Batched: for stacks U: E×out×k, V: E×in×k, one spectrum per matrix (E×k)."""
    if U.shape[-1] != V.shape[-1]:
        raise InRankValueError(
            f"factors disagree on the inner dimension: U {tuple(U.shape)}, V {tuple(V.shape)}"
        )
    # Half precision has no QR kernel and too little precision for a spectrum.
    dtype = torch.float64 if U.dtype == torch.float64 else torch.float32
    U, V = U.to(dtype), V.to(dtype)
    r_u = torch.linalg.qr(U, mode="r").R
    r_v = torch.linalg.qr(V, mode="r").R
    return torch.linalg.svdvals(r_u @ r_v.mT)


@torch.no_grad()
def update_singular_values(
    U: torch.Tensor, V: torch.Tensor, U0: torch.Tensor, V0: torch.Tensor
) -> torch.Tensor:
    """Singular values of the cumulative update U·Vᵀ − U0·V0ᵀ (length k + k0), from factors
    (batched like `factor_singular_values`).

    Computed in float64: the update is a small difference of two large products, and float32
    round-off would show up as a spectrum of noise. Values below round-off of the products'
    scale are set to zero, so an unchanged layer has an all-zero update spectrum.
    """
    stacked_u = torch.cat([U, U0.to(device=U.device, dtype=U.dtype)], dim=-1).to(torch.float64)
    stacked_v = torch.cat([V, -V0.to(device=V.device, dtype=V.dtype)], dim=-1).to(torch.float64)
    s = factor_singular_values(stacked_u, stacked_v)
    scale = torch.linalg.matrix_norm(stacked_u) * torch.linalg.matrix_norm(stacked_v)
    return torch.where(s > 1e-12 * scale[..., None], s, torch.zeros_like(s))


def explained_ratios(
    s: torch.Tensor, criterion: str = "variance", full_rank: int | None = None
) -> torch.Tensor:
    """ratio[k] for k = 0..n: how much of the spectrum s (length n) the top k values explain.

    "variance" is the paper's 1 − var(s − s_k)/var(s), where s_k keeps the first k entries of s
    and zeroes the rest, so s − s_k is the tail. "variance_padded" is the same ratio after s is
    zero-padded to `full_rank` entries, as the reference code computes it (its SVD is of the
    dense weight; the padding changes the variances, see docs/TRAINING.md). "energy" is
    Σ_{i<k} s_i² / Σ s_i². ratio[n] is 1 by definition (nothing is left out).
    """
    if criterion not in CRITERIA:
        raise InRankValueError(f"criterion must be one of {CRITERIA}, got {criterion!r}")
    s = s.detach().to(torch.float64).flatten()
    n = s.numel()
    # Tail sums T1[k] = Σ_{i≥k} s_i and T2[k] = Σ_{i≥k} s_i², for k = 0..n.
    zero = s.new_zeros(1)
    tail1 = torch.cat([s.flip(0).cumsum(0).flip(0), zero])
    tail2 = torch.cat([(s * s).flip(0).cumsum(0).flip(0), zero])
    if criterion == "energy":
        total = tail2[0]
        if total <= 0:
            return torch.ones(n + 1, dtype=torch.float64)
        return 1.0 - tail2 / total
    # m·var(x) = Σx² − (Σx)²/m for the length-m tail vector (zeros included); the ratio of two
    # variances of equal length does not depend on the Bessel correction. Padding with zeros
    # changes only m.
    m = n
    if criterion == "variance_padded":
        if full_rank is None or full_rank < n:
            raise InRankValueError(f"variance_padded needs full_rank >= {n}, got {full_rank!r}")
        m = full_rank
    tail_var = tail2 - tail1 * tail1 / m
    total_var = tail_var[0]
    if total_var <= 1e-30 * max(float(tail2[0]), 1e-300):
        # All singular values equal: no proper truncation explains them.
        ratios = torch.zeros(n + 1, dtype=torch.float64)
        ratios[n] = 1.0
        return ratios
    ratios = 1.0 - tail_var / total_var
    ratios[n] = 1.0
    return ratios


def select_rank(
    s: torch.Tensor,
    threshold: float,
    criterion: str = "variance",
    min_rank: int = 1,
    full_rank: int | None = None,
) -> int:
    """The smallest k ≥ min_rank whose explained ratio exceeds `threshold` (at most len(s))."""
    n = s.numel()
    if n == 0:
        return min_rank
    if float(s.detach().abs().max()) == 0.0:
        return min(max(min_rank, 1), n)  # a zero layer (or no update yet) asks for nothing
    ratios = explained_ratios(s, criterion, full_rank)
    k = torch.arange(n + 1)
    ok = (ratios > threshold) & (k >= min_rank)
    hits = torch.nonzero(ok).flatten()
    return int(hits[0]) if hits.numel() else n
