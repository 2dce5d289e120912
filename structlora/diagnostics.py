"""Exact diagnostics and static penalties from low-rank factors (Eq. 6, 9, 10, 13; Table 9, 13; Fig. 4, 6).

Every update is handled as factors dW = B A with B (d x r), A (r x k) (gates, scaling and coordinator
mixing already folded into B). Frobenius inner products go through r x r products,

    <B1 A1, B2 A2>_F = tr((B1^T B2)(A2 A1^T)),

so nothing here forms a dense d x k matrix (cost O((d + k) r^2) per pair). Cosines are defined as 0
when a norm is 0 (e.g. LoRA at initialisation, where B = 0).

Gradients w.r.t. dW (Table 13) are G_l = sum_t delta_t x_t^T; their cosines are estimated from a
random-projection sketch G_l R (R: k x p, N(0, 1/p); unbiased inner products, Johnson-Lindenstrauss)
or computed exactly through token Gram matrices (O(T^2 (d + k)), for small batches).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Optional, Sequence

import torch
from torch import nn

from .model import ADAPTER, StructLoraModel, group_lora_layers

__all__ = [
    "frob_inner", "gram_matrix", "drift_energy", "cosine_matrix", "cos_adj", "singular_values",
    "svd_factors", "cos_penalty", "laplacian_penalty", "factors_by_family", "update_diagnostics",
    "gradient_cosines", "structlora_report",
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


def factors_by_family(model: nn.Module) -> dict[str, list[tuple[str, Factors]]]:
    """Eval-mode update factors of every adapted module, grouped into depth-ordered families.

    StructLoRA: gated + coordinated (what is merged/exported). Plain peft LoRA: (s B, A).
    """
    if isinstance(model, StructLoraModel):
        eff = model.effective_factors(drop_zero=False)
        return {fam.key: [(n, eff[n]) for n in fam.names] for fam in model.families}
    groups = group_lora_layers(model)
    if not groups:
        raise ValueError("no peft LoRA layers found in the model")
    return {key: [(name, (layer.lora_B[ADAPTER].weight.detach() * layer.scaling[ADAPTER],
                          layer.lora_A[ADAPTER].weight.detach())) for name, layer in members]
            for key, members in groups.items()}


@torch.no_grad()
def update_diagnostics(model: nn.Module) -> dict[str, float]:
    """Summary over families: total drift energy E, mean CosAdj, mean ||dW||_F. {} if not a LoRA model."""
    try:
        fams = factors_by_family(model)
    except ValueError:
        return {}
    energies, cosines, norms = [], [], []
    for members in fams.values():
        factors = [f for _, f in members]
        energies.append(float(drift_energy(factors)))
        if len(factors) > 1:
            cosines.append(float(cos_adj(factors)))
        norms += [float(frob_inner(*f, *f).clamp_min(0).sqrt()) for f in factors]
    return {"drift_energy": sum(energies), "cos_adj": sum(cosines) / max(len(cosines), 1),
            "update_norm": sum(norms) / max(len(norms), 1)}


def gradient_cosines(model: nn.Module, batches: Iterable[dict[str, Any]],
                     loss_fn: Optional[Callable[[Any], torch.Tensor]] = None,
                     method: str = "sketch", sketch_dim: int = 256, seed: int = 0) -> dict[str, torch.Tensor]:
    """(L, L) cosine of the batch-summed dL/dW per family (Table 13: read the first off-diagonal).

    ``method="sketch"``: <G_a R, G_b R> with a shared R (k x p); ``"exact"``: token Gram matrices.
    Runs forward/backward on ``batches`` (loss = ``loss_fn(outputs)`` or ``outputs.loss``) and then
    clears parameter gradients.
    """
    if method not in ("sketch", "exact"):
        raise ValueError(f"method must be 'sketch' or 'exact', got {method!r}")
    groups = group_lora_layers(model)
    if not groups:
        raise ValueError("no peft LoRA layers found in the model")
    records: dict[str, list] = {name: [] for members in groups.values() for name, _ in members}
    projections: dict[int, torch.Tensor] = {}
    sketches: dict[str, torch.Tensor] = {}
    handles = []

    def hook(name: str):
        def fwd(module, inputs, output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1])            # (T, k)
            if method == "sketch":
                k = x.shape[-1]
                if k not in projections:
                    gen = torch.Generator().manual_seed(seed + k)
                    projections[k] = (torch.randn(k, sketch_dim, generator=gen) / sketch_dim**0.5).to(x)
                xr = x @ projections[k]                                           # (T, p)

            def bwd(grad):
                delta = grad.detach().reshape(-1, grad.shape[-1])                # (T, d)
                if method == "sketch":
                    g = delta.T @ xr                                              # (d, p)
                    sketches[name] = sketches[name] + g if name in sketches else g
                else:
                    records[name].append((delta, x))
            if output.requires_grad:
                output.register_hook(bwd)
        return fwd

    for members in groups.values():
        for name, layer in members:
            handles.append(layer.register_forward_hook(hook(name)))
    try:
        was_training = model.training
        model.eval()  # deterministic gates / no dropout while measuring
        for batch in batches:
            out = model(**batch)
            loss = loss_fn(out) if loss_fn is not None else out.loss
            loss.backward()
        model.train(was_training)
    finally:
        for h in handles:
            h.remove()
        model.zero_grad(set_to_none=True)

    result = {}
    for key, members in groups.items():
        names = [n for n, _ in members]
        n = len(names)
        gram = torch.zeros(n, n)
        for i in range(n):
            for j in range(i, n):
                if method == "sketch":
                    v = (sketches[names[i]] * sketches[names[j]]).sum()
                else:
                    v = sum(((da @ db.T) * (xa @ xb.T)).sum() for da, xa in records[names[i]]
                            for db, xb in records[names[j]])
                gram[i, j] = gram[j, i] = float(v)
        norms = gram.diagonal().clamp_min(0).sqrt()
        denom = norms[:, None] * norms[None, :]
        result[key] = torch.where(denom > 0, gram / denom.clamp_min(1e-30), torch.zeros_like(gram))
    return result


@torch.no_grad()
def structlora_report(model: StructLoraModel):
    """Per module: directions kept (eval gate > 0) of r, exported rank, ||dW||_F, IB score summary;
    per family (repeated on its rows): drift energy E and CosAdj of the coordinated updates."""
    import pandas as pd

    model._check_finite()
    eff = model.effective_factors(drop_zero=True)
    full = model.effective_factors(drop_zero=False)
    rows = []
    was_training = model.training
    model.eval()
    model._reset_states()
    for fam in model.families:
        m = model.family_state(fam)["m"]
        scores = fam.gate.scores()
        factors = [full[n] for n in fam.names]
        energy = float(drift_energy(factors))
        cadj = float(cos_adj(factors)) if len(factors) > 1 else float("nan")
        for l, name in enumerate(fam.names):
            r = fam.A(l).shape[0]
            kept = int((m[l] > 0).sum()) if m is not None else r
            b, a = full[name]
            rows.append({"module": name, "family": fam.key, "layer": l, "r": r, "kept": kept,
                         "exported_rank": eff[name][1].shape[0],
                         "update_norm": float(frob_inner(b, a, b, a).clamp_min(0).sqrt()),
                         "mean_gate_score": float(scores[l].mean()) if scores is not None else float("nan"),
                         "family_drift_energy": energy, "family_cos_adj": cadj})
    model._reset_states()
    model.train(was_training)
    return pd.DataFrame(rows)
