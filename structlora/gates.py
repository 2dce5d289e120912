"""Stage 1: per-direction gates m in [0,1]^r for the filtered update dW~ = s B diag(m) A (Eq. 2, 11).

One `FamilyGate` holds the gates of all L layers of a module family as an (L, r) tensor, so a whole
family is sampled in one call per forward. The compression term L_IB (Eq. 3, 8, 12) is:

* ``"concrete"``: hard-concrete gates (Louizos, Welling & Kingma 2018; the Gumbel-sigmoid relaxation of
  Jang et al. 2017 stretched to reach exact 0/1). L_IB is the expected L0 norm, i.e. the mean
  probability that a gate is non-zero. This is the Bernoulli-prior reading of E.2: a KL to a
  Bernoulli(pi) prior is, up to constants, log((1-pi)/pi) times the expected number of open gates.
* ``"gaussian"``: additive Gaussian gates m = mu + sigma eps, mu = sigmoid(theta), eps ~ N(0, 1), with
  the same-variance prior N(0, sigma^2) of E.2: KL(N(mu, sigma^2) || N(0, sigma^2)) = mu^2 / (2 sigma^2)
  exactly. (Multiplicative noise mu (1 + sigma eps) has variance (mu sigma)^2, for which that expression
  is not the KL; we use the additive form so the penalty is the KL it claims to be.)

The compression term is per module: each module contributes its mean over its r gates (the expected
fraction of open directions for hard-concrete), and `StructLoraModel.structlora_loss` sums the modules,
so ``lambda_ib`` is the price of one module's full open fraction, whatever the number of modules.

A target keep ratio rho (``target_keep_ratio``) is reached by a Lagrange multiplier on the expected
L0 (Louizos et al. 2018; Wang et al. 2020; Xia et al. 2022, CoFi), in the augmented-Lagrangian form
(the method of multipliers): per module, with s_l its expected open fraction, the loss gains
lambda_l (s_l - rho) + (mu / 2) (s_l - rho)^2, and after every training step the multiplier takes a
dual-ascent step lambda_l += eta (s_l - rho) (`dual_step`; a buffer, not an Adam parameter: Adam would
move it by a fixed amount per step whatever the gap, which made it overshoot). The quadratic term
pulls s_l back at once when it crosses rho; the multiplier removes the remaining offset slowly
(eta << mu). As in CoFi, the target is
ramped linearly from 1 (all open) to rho over ``target_ramp_steps`` after the warm-up, so the
constraint moves no faster than the gates can follow: a target imposed at once lets the multipliers
grow while the gates are still open and then overshoot, closing every direction (seen on SST-2, see
the README's deviations). At eval, when more than
ceil(rho r) gates of a module are open, the extra ones with the lowest scores are closed. While
``hold`` is set (the warm-up, while B is near 0) the gates pass a zero gradient to their logits, so the
compression term cannot move them before the task says anything.

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
                 init: float, temperature: float, sigma: float, seed: int, target: Optional[float] = None) -> None:
        super().__init__()
        self.kind, self.filter, self.keep = kind, filter, keep
        self.temperature, self.sigma, self.target = temperature, sigma, target
        self.hold = False  # set by the model during the gate warm-up: logits get no gradient
        # the training step's noise (L, r): u ~ U(0, 1) (concrete) or eps ~ N(0, 1) (gaussian), drawn at its
        # first use in a step and reused by every forward of that step (accumulated micro-batches, the
        # recompute of gradient checkpointing); `new_step` clears it
        self.noise: Optional[torch.Tensor] = None
        self.logits = nn.Parameter(torch.full((num_layers, r), float(init))) if kind else None
        if target is not None and kind != "concrete":
            raise ValueError("a target keep ratio needs hard-concrete gates (gate='concrete')")
        # lambda_l per module (the dual variable); None without a target
        self.register_buffer("lagrange", torch.zeros(num_layers) if target is not None else None)
        gen = torch.Generator().manual_seed(seed)
        # 'random' filter: one fixed mask with exactly `keep` ones per layer; 'topk_norm': re-scored buffer.
        mask = torch.ones(num_layers, r)
        if keep is not None and filter == "random":
            mask = topk_mask(torch.rand(num_layers, r, generator=gen), keep)
        self.register_buffer("mask", mask)           # (L, r), used by 'random' / 'topk_norm'
        self.register_buffer("mask_active", torch.tensor(False))  # becomes True after the warm-up

    # ---- gate values ----
    def new_step(self) -> None:
        """Forget the step's noise: the next training forward draws a new sample."""
        self.noise = None

    def step_noise(self) -> torch.Tensor:
        """(L, r) the current step's noise, drawn now if this step has none (fp32: the gates' precision)."""
        if self.noise is None or self.noise.device != self.logits.device:
            like = self.logits.detach().float()
            self.noise = torch.rand_like(like) if self.kind == "concrete" else torch.randn_like(like)
        return self.noise

    def gate_values(self, training: bool) -> Optional[torch.Tensor]:
        """(L, r) gate values before any keep mask: sampled in training (Eq. 2, the step's noise), deterministic
        at eval; computed in fp32 whatever the model's dtype."""
        if self.kind is None:
            return None
        logits = self.logits.float()
        # held: a zero gradient (not none), so data-parallel wrappers still see the logits used
        logits = logits.detach() + 0.0 * logits if self.hold else logits
        if self.kind == "concrete":
            if training:
                u = self.step_noise().clamp(1e-6, 1 - 1e-6)
                s = torch.sigmoid((u.log() - (-u).log1p() + logits) / self.temperature)
            else:
                s = torch.sigmoid(logits)
            m = (s * (ZETA - GAMMA) + GAMMA).clamp(0.0, 1.0)
            if not training and self.target is not None:   # close the extra open gates, lowest score first
                k = max(1, math.ceil(self.target * logits.shape[-1]))
                m = m * topk_mask(logits.detach(), k)
            return m
        mu = torch.sigmoid(logits)  # gaussian: additive noise of the prior's variance
        if training:
            return mu + self.sigma * self.step_noise()
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
    def open_fraction(self) -> torch.Tensor:
        """(L,) expected fraction of open gates per module, (1/r) sum_j P(m_j != 0) (hard-concrete)."""
        return torch.sigmoid(self.logits - self.temperature * math.log(-GAMMA / ZETA)).mean(-1)

    def compression(self) -> torch.Tensor:
        """The family's L_IB averaged over its gates (the mean of `module_compression`)."""
        return self.module_compression().mean()

    def module_compression(self) -> torch.Tensor:
        """(L,) L_IB per module: the expected open fraction (concrete) or mean mu^2 / (2 sigma^2), the KL
        to N(0, sigma^2) (gaussian); zeros when there is no gate."""
        if self.kind == "concrete":
            return self.open_fraction()
        if self.kind == "gaussian":
            return torch.sigmoid(self.logits).pow(2).mean(-1) / (2 * self.sigma**2)
        return torch.zeros(1)

    def lagrangian(self, target: Optional[float] = None, mu: float = 10.0) -> torch.Tensor:
        """sum_l lambda_l (s_l - rho_t) + (mu / 2) (s_l - rho_t)^2 (0 without a target); ``target`` is the
        current point rho_t of the target schedule (default: the final target rho)."""
        if self.lagrange is None:
            return torch.zeros(())
        gap = self.open_fraction() - (self.target if target is None else target)   # (L,)
        return (self.lagrange * gap + 0.5 * mu * gap.pow(2)).sum()

    @torch.no_grad()
    def dual_step(self, target: Optional[float] = None, eta: float = 0.05) -> None:
        """lambda_l += eta (s_l - rho_t): the multiplier's ascent step, once per training step."""
        if self.lagrange is not None:
            self.lagrange += eta * (self.open_fraction() - (self.target if target is None else target))

    @torch.no_grad()
    def closed_count(self) -> int:
        """Directions whose deterministic (eval) gate is exactly 0, over the family."""
        m = self.forward(False)
        return 0 if m is None else int((m == 0).sum())

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
