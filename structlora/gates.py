"""Stage 1: per-direction gates m in [0,1]^r for the filtered update dW~ = s B diag(m) A (Eq. 2, 11).

One `FamilyGate` holds the gates of all L layers of a module family as an (L, r) tensor, so a whole
family is sampled in one call per forward. The compression term L_IB (Eq. 3, 8, 12) is:

* ``"concrete"``: hard-concrete gates (Louizos, Welling & Kingma 2018; the Gumbel-sigmoid relaxation of
  Jang et al. 2017 stretched to reach exact 0/1). L_IB is the expected L0 norm, i.e. the mean
  probability that a gate is non-zero. This is the Bernoulli-prior reading of E.2: a KL to a
  Bernoulli(pi) prior is, up to constants, log((1-pi)/pi) times the expected number of open gates.
* ``"gaussian"``: multiplicative Gaussian gates m = mu (1 + sigma eps), mu = sigmoid(theta), with the
  same-variance prior N(0, sigma^2) of E.2, whose KL is ||mu||^2 / (2 sigma^2) (we average over gates).

At eval the gates are noise-free and input-independent (so merging stays exact): hard-concrete uses
clamp(sigmoid(log_alpha)(zeta-gamma)+gamma, 0, 1), which is exactly 0 when sigmoid(log_alpha) < 1/12.

Filters (Fig. 2) share one keep mask of ceil(rho r) directions per module: 'ib' ranks by the gate
logit, 'topk_norm' by ||b_j|| ||a_j|| (re-scored every K steps), 'random' is fixed at construction.
For 'ib' the mask uses a straight-through gradient so masked directions still feel the task gradient
through their gate and can re-enter the top-k.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

__all__ = ["FamilyGate", "GAMMA", "ZETA", "topk_mask"]

GAMMA, ZETA = -0.1, 1.1  # hard-concrete stretch interval (Louizos et al. 2018)


def topk_mask(score: torch.Tensor, k: int) -> torch.Tensor:
    """(L, r) score -> (L, r) float mask with exactly k ones per row (ties broken by index)."""
    idx = score.topk(k, dim=-1).indices  # (L, k)
    return torch.zeros_like(score).scatter_(-1, idx, 1.0)


class FamilyGate(nn.Module):
    """Gates of one module family: ``logits`` is (L, r); ``forward`` returns m (L, r)."""

    def __init__(self, num_layers: int, r: int, kind: Optional[str], filter: str, keep: Optional[int],
                 init: float, temperature: float, sigma: float, seed: int) -> None:
        super().__init__()
        self.kind, self.filter, self.keep = kind, filter, keep
        self.temperature, self.sigma = temperature, sigma
        self.logits = nn.Parameter(torch.full((num_layers, r), float(init))) if kind else None
        gen = torch.Generator().manual_seed(seed)
        # 'random' filter: one fixed mask with exactly `keep` ones per layer; 'topk_norm': re-scored buffer.
        mask = torch.ones(num_layers, r)
        if keep is not None and filter == "random":
            mask = topk_mask(torch.rand(num_layers, r, generator=gen), keep)
        self.register_buffer("mask", mask)           # (L, r), used by 'random' / 'topk_norm'
        self.register_buffer("mask_active", torch.tensor(False))  # becomes True after the warm-up

    # ---- gate values ----
    def gate_values(self, training: bool) -> Optional[torch.Tensor]:
        """(L, r) gate values before any keep mask: sampled in training, deterministic at eval."""
        if self.kind is None:
            return None
        if self.kind == "concrete":
            if training:
                u = torch.rand_like(self.logits).clamp(1e-6, 1 - 1e-6)
                s = torch.sigmoid((u.log() - (-u).log1p() + self.logits) / self.temperature)
            else:
                s = torch.sigmoid(self.logits)
            return (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)
        mu = torch.sigmoid(self.logits)  # gaussian
        if training:
            return mu * (1 + self.sigma * torch.randn_like(mu))
        return mu

    def forward(self, training: bool) -> Optional[torch.Tensor]:
        """(L, r) effective gate m, with the keep mask applied; None means 'all ones' (plain LoRA)."""
        m = self.gate_values(training)
        if self.keep is None or not (bool(self.mask_active) or not training):
            return m
        if self.filter == "ib":
            mask = topk_mask(self.logits.detach(), self.keep)
            # straight-through: forward m*mask, gradient to the gate as if unmasked.
            return m * mask + (m - m.detach()) * (1 - mask)
        return self.mask if m is None else m * self.mask

    # ---- compression term and scores ----
    def compression(self) -> torch.Tensor:
        """L_IB for this family, averaged over its gates (0 when there is no gate)."""
        if self.kind == "concrete":
            p_open = torch.sigmoid(self.logits - self.temperature * math.log(-GAMMA / ZETA))
            return p_open.mean()
        if self.kind == "gaussian":
            return torch.sigmoid(self.logits).pow(2).mean() / (2 * self.sigma**2)
        return torch.zeros(())

    def scores(self) -> Optional[torch.Tensor]:
        """(L, r) IB scores: P(gate open) (concrete) or mu (gaussian); None without a gate."""
        if self.kind == "concrete":
            return torch.sigmoid(self.logits - self.temperature * math.log(-GAMMA / ZETA)).detach()
        if self.kind == "gaussian":
            return torch.sigmoid(self.logits).detach()
        return None

    @torch.no_grad()
    def rescore_topk_norm(self, norms: torch.Tensor) -> None:
        """Set the 'topk_norm' mask from (L, r) direction norms ||b_j|| ||a_j||."""
        self.mask.copy_(topk_mask(norms, self.keep))
