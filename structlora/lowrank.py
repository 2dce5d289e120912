"""Exact low-rank algebra on factors dW = B A, B (d x r), A (r x k): no dense d x k matrix is formed.

Frobenius inner products go through r x r products (cost O((d + k) r^2) per pair),

    <B1 A1, B2 A2>_F = tr((B1^T B2)(A2 A1^T)),

and cosines are 0 when a norm is 0 (LoRA at initialisation, where B = 0). Used by the model (the
static penalties of Eq. 9-10), by the export (exact QR+SVD re-factorisation) and by the diagnostics
(drift energy E of Eq. 6/13, CosAdj of appendix C, singular values of Fig. 6).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

__all__ = [
    "Factors", "frob_inner", "gram_matrix", "drift_energy", "cosine_matrix", "cos_adj", "singular_values",
    "svd_factors", "cos_penalty", "laplacian_penalty",
]

Factors = tuple[torch.Tensor, torch.Tensor]  # (B (d, r), A (r, k))


def frob_inner(b1: torch.Tensor, a1: torch.Tensor, b2: torch.Tensor, a2: torch.Tensor) -> torch.Tensor:
    """<B1 A1, B2 A2>_F through two r x r products."""
    return ((b1.T @ b2) * (a1 @ a2.T)).sum()


def gram_matrix(factors: Sequence[Factors]) -> torch.Tensor:
    """(L, L) Frobenius inner products of the updates of one family."""
    n = len(factors)
    g = torch.empty(n, n, dtype=factors[0][0].dtype, device=factors[0][0].device)
    for i in range(n):
        for j in range(i, n):
            g[i, j] = g[j, i] = frob_inner(factors[i][0], factors[i][1], factors[j][0], factors[j][1])
    return g


def drift_energy(factors: Sequence[Factors]) -> torch.Tensor:
    """E = sum_l ||dW_{l+1} - dW_l||_F^2 (Eq. 6, 13), differentiable."""
    terms = [frob_inner(*factors[l + 1], *factors[l + 1]) + frob_inner(*factors[l], *factors[l])
             - 2 * frob_inner(*factors[l + 1], *factors[l]) for l in range(len(factors) - 1)]
    return torch.stack(terms).sum() if terms else torch.zeros(())


def cosine_matrix(factors: Sequence[Factors]) -> torch.Tensor:
    """(L, L) cosine of the updates (Fig. 4); 0 where a norm is 0."""
    g = gram_matrix(factors)
    norms = g.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    return torch.where(denom > 0, g / denom.clamp_min(1e-30), torch.zeros_like(g))


def cos_adj(factors: Sequence[Factors]) -> torch.Tensor:
    """CosAdj = mean_l cos(dW_l, dW_{l+1}) (appendix C)."""
    c = cosine_matrix(factors)
    return c.diagonal(offset=1).mean() if len(factors) > 1 else torch.zeros(())


def singular_values(b: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """Singular values of B A via QR of both factors and an SVD of the r x r core (Fig. 6)."""
    _, rb = torch.linalg.qr(b)                 # B = Qb Rb
    _, ra = torch.linalg.qr(a.T)               # A^T = Qa Ra
    return torch.linalg.svdvals(rb @ ra.T)     # core C = Rb Ra^T


def svd_factors(b: torch.Tensor, a: torch.Tensor, rank: Optional[int] = None, tol: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Exact re-factorisation B A = (Qb U S^1/2)(S^1/2 V^T Qa^T), truncated to ``rank``.

    Returns (B' (d, r'), A' (r', k), relative Frobenius error sqrt(sum_{i>r'} S_i^2 / sum_i S_i^2)).
    Without ``rank`` it keeps the singular values above ``tol * S_max`` (numerical rank).
    """
    qb, rb = torch.linalg.qr(b)
    qa, ra = torch.linalg.qr(a.T)
    u, s, vh = torch.linalg.svd(rb @ ra.T)
    if rank is None:
        rank = int((s > tol * s.max().clamp_min(1e-30)).sum()) if s.numel() else 0
    rank = min(rank, s.numel())
    root = s[:rank].sqrt()
    total = s.pow(2).sum()
    err = float((s[rank:].pow(2).sum() / total).sqrt()) if total > 0 else 0.0
    return (qb @ u[:, :rank]) * root, root[:, None] * (vh[:rank] @ qa.T), err


def cos_penalty(factors: Sequence[Factors], eps: float = 1e-12) -> torch.Tensor:
    """L_cos = sum_l (1 - cos(u_l, u_{l+1})) (Eq. 9), smoothed by eps so it is differentiable at 0."""
    terms = []
    for l in range(len(factors) - 1):
        inner = frob_inner(*factors[l], *factors[l + 1])
        n1, n2 = frob_inner(*factors[l], *factors[l]), frob_inner(*factors[l + 1], *factors[l + 1])
        terms.append(1 - inner / ((n1 + eps) * (n2 + eps)).sqrt())
    return torch.stack(terms).sum()


def laplacian_penalty(factors: Sequence[Factors]) -> torch.Tensor:
    """L_lap = sum_l ||u_{l+1} - u_l||^2 (Eq. 10) = the drift energy E."""
    return drift_energy(factors)
