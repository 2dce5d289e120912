"""Diagnostics of a trained (or training) model, from its low-rank factors (Table 9, 13; Fig. 4, 6).

`factors_by_family` reads the eval-mode update factors of every adapted module (StructLoRA: gated
and coordinated, i.e. what is merged/exported; plain peft LoRA: (s B, A)); `update_diagnostics`
summarises drift energy E and CosAdj (exact algebra in `lowrank`); `structlora_report` is the
per-module table behind `StructLoraModel.structlora_report()`.

Gradients w.r.t. dW (Table 13) are G_l = sum_t delta_t x_t^T; `gradient_cosines` estimates their
cosines from a random-projection sketch G_l R (R: k x p, N(0, 1/p); unbiased inner products,
Johnson-Lindenstrauss) or computes them exactly through token Gram matrices (O(T^2 (d + k)), for
small batches).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from .layers import ADAPTER, group_lora_layers
from .lowrank import Factors, cos_adj, drift_energy, frob_inner


__all__ = ["factors_by_family", "update_diagnostics", "stage_evidence", "uncoordinated_factors", "gradient_cosines",
           "structlora_report", "Report", "polarization", "POLAR_BAND"]


def factors_by_family(model: nn.Module) -> dict[str, list[tuple[str, Factors]]]:
    """Eval-mode update factors of every adapted module, grouped into depth-ordered families.

    StructLoRA: gated + coordinated (what is merged/exported). Plain peft LoRA: (s B, A).
    """
    if hasattr(model, "effective_factors") and hasattr(model, "families"):  # a StructLoraModel
        eff = model.effective_factors(drop_zero=False)
        return {fam.key: [(n, eff[n]) for n in fam.names] for fam in model.families}
    groups = group_lora_layers(model)
    if not groups:
        raise ValueError("no peft LoRA layers found in the model")
    return {key: [(name, (layer.lora_B[ADAPTER].weight.detach() * layer.scaling[ADAPTER],
                          layer.lora_A[ADAPTER].weight.detach())) for name, layer in members]
            for key, members in groups.items()}


def _summary(fams: dict[str, list[Factors]]) -> dict[str, float]:
    energies, cosines, norms = [], [], []
    for factors in fams.values():
        energies.append(float(drift_energy(factors)))
        if len(factors) > 1:
            cosines.append(float(cos_adj(factors)))
        norms += [float(frob_inner(*f, *f).clamp_min(0).sqrt()) for f in factors]
    return {"drift_energy": sum(energies), "cos_adj": sum(cosines) / max(len(cosines), 1),
            "update_norm": sum(norms) / max(len(norms), 1)}


@torch.no_grad()
def uncoordinated_factors(model: nn.Module) -> dict[str, list[Factors]]:
    """Per family, the eval-mode gated but *uncoordinated* updates s B diag(m) A (what the layers would
    apply with M = I): the baseline against which the coordinator's effect on E and CosAdj is read."""
    was_training = model.training
    model.eval()
    model.reset_states()
    try:
        out = {}
        for fam in model.families:
            out[fam.key] = [tuple(t.detach() for t in model.uncoordinated_layer_factors(fam, l))
                            for l in range(len(fam.layers))]
        return out
    finally:
        model.reset_states()
        model.train(was_training)


@torch.no_grad()
def stage_evidence(model: nn.Module) -> dict[str, float]:
    """Per-run evidence that both stages acted: mean eta and eta_max (smoother), mean ||M - I||_F, edges
    and similarity edges (summed over families), mean eval gate, closed directions and their target,
    and E / CosAdj of the uncoordinated update (``uncoord_*``) beside the coordinated one."""
    out: dict[str, float] = {}
    coords = [fam.coord for fam in model.families if fam.coord is not None]
    if coords:
        summaries = [c.summary() for c in coords]
        out["mix_dev"] = sum(x["mix_dev"] for x in summaries) / len(summaries)
        out["edges"] = sum(x["edges"] for x in summaries)
        out["similarity_edges"] = sum(x["similarity_edges"] for x in summaries)
        if "eta" in summaries[0]:
            out["eta"] = sum(x["eta"] for x in summaries) / len(summaries)
            out["eta_max"] = sum(x["eta_max"] for x in summaries) / len(summaries)
            out["eta_init"] = float(model.structlora_config.eta_init) * out["eta_max"]
    gates = [fam.gate for fam in model.families if fam.gate.kind is not None]
    if gates:
        values = torch.cat([g.forward(False).flatten() for g in gates])
        out["mean_gate"] = float(values.mean())
        out["closed_directions"] = float(sum(g.closed_count() for g in gates))
        out["directions"] = float(values.numel())
        target = model.structlora_config.target_keep_ratio
        if target is not None:
            r = model.families[0].A(0).shape[0]
            open_per_module = max(1, math.ceil(target * r))
            out["closed_target"] = float(sum((r - open_per_module) * g.logits.shape[0] for g in gates))
    unco = _summary(uncoordinated_factors(model))
    out.update({f"uncoord_{k}": v for k, v in unco.items()})
    return out


@torch.no_grad()
def update_diagnostics(model: nn.Module) -> dict[str, float]:
    """Summary over families: total drift energy E, mean CosAdj, mean ||dW||_F of the applied (for
    StructLoRA: gated and coordinated) updates; for StructLoRA also `stage_evidence`. {} if not a
    LoRA model."""
    try:
        fams = factors_by_family(model)
    except ValueError:
        return {}
    out = _summary({k: [f for _, f in members] for k, members in fams.items()})
    if hasattr(model, "families"):
        out.update(stage_evidence(model))
    return out


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


class Report(list):
    """The rows (one dict per adapted module) of `structlora_report`.

    A plain list, so the method needs no pandas; ``to_pandas()`` gives a DataFrame where pandas is
    installed, and printing it (or showing it in Jupyter) gives an aligned text table.
    """

    def to_pandas(self):
        import pandas as pd  # optional: the reproduction extra installs it

        return pd.DataFrame(list(self))

    def __str__(self) -> str:
        if not self:
            return "(empty report)"
        cols = list(self[0])

        def fmt(v: Any) -> str:
            return f"{v:.4g}" if isinstance(v, float) else str(v)

        cells = [[fmt(row[c]) for c in cols] for row in self]
        widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(cols, widths))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)) for r in cells]
        return "\n".join(lines)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # IPython / Jupyter display
        p.text(str(self))


POLAR_BAND = 0.1   # a gate within 0.1 of 0 or 1 at eval is "polarized" (METHOD_NOTES, "Selection or scaling?")


def polarization(m: torch.Tensor) -> torch.Tensor:
    """(..., r) eval gates -> (...) share of gates within `POLAR_BAND` of 0 or 1: 1 when the gates select
    directions (closed or open), low when they scale the update (every gate partly open)."""
    return ((m <= POLAR_BAND) | (m >= 1 - POLAR_BAND)).float().mean(-1)


@torch.no_grad()
def structlora_report(model: nn.Module) -> Report:
    """Per module: directions kept (eval gate > 0) of r, gate polarization (share of gates near 0 or 1),
    exported rank, ||dW||_F, IB score summary; per family (repeated on its rows): drift energy E and CosAdj
    of the coordinated updates, and a note (a one-layer family has no coordinator)."""
    model.check_finite()
    eff = model.effective_factors(drop_zero=True)
    full = model.effective_factors(drop_zero=False)
    rows = []
    was_training = model.training
    model.eval()
    model.reset_states()
    for fam in model.families:
        m = model.family_state(fam)["m"]
        scores = fam.gate.scores()
        factors = [full[n] for n in fam.names]
        energy = float(drift_energy(factors))
        cadj = float(cos_adj(factors)) if len(factors) > 1 else float("nan")
        note = "one layer: no coordinator" if model.structlora_config.graph and fam.coord is None else ""
        for l, name in enumerate(fam.names):
            r = fam.A(l).shape[0]
            kept = int((m[l] > 0).sum()) if m is not None else r
            b, a = full[name]
            rows.append({"module": name, "family": fam.key, "layer": l, "r": r, "kept": kept,
                         "polarization": float(polarization(m[l])) if m is not None else float("nan"),
                         "exported_rank": eff[name][1].shape[0],
                         "update_norm": float(frob_inner(b, a, b, a).clamp_min(0).sqrt()),
                         "mean_gate_score": float(scores[l].mean()) if scores is not None else float("nan"),
                         "family_drift_energy": energy, "family_cos_adj": cadj, "note": note})
    model.reset_states()
    model.train(was_training)
    return Report(rows)
