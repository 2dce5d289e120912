"""What a run record keeps of the trained model, so later analyses never have to train it again.

Every record written since the headline plan (``params/cpu/plan.yml``) carries, beside its metrics:

- ``test_predictions``: the class index of every test example, in test order (`encode_predictions`:
  a string of digits when every class index is below 10, else a list of ints; `decode_predictions`);
- ``update_spectra``: per adapted module, the singular values of its final update dW (StructLoRA: gated
  and coordinated, what merges; LoRA: s B A), computed exactly from the factors through the r x r core
  (`structlora.lowrank.singular_values`), never forming a d x k matrix (the spectrum analysis of Fig. 6);
- ``update_cosines``: per module family (e.g. every ``query`` of the encoder, in depth order), the
  layer-by-layer cosine matrix of those updates (`structlora.lowrank.cosine_matrix`, Fig. 4): the
  layer-coherence analysis of Sec. 4.

Spectra and cosines are kept only where dW is the low-rank product the library reads
(`structlora.diagnostics.factors_by_family`: StructLoRA and plain peft LoRA layers); DoRA's magnitude
vector, AdaLoRA's SVD triplets and VeRA's scaled shared matrices change dW, so those records (and
non-LoRA methods) carry ``None``.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from structlora.diagnostics import factors_by_family
from structlora.lowrank import cosine_matrix, singular_values

__all__ = ["decode_predictions", "encode_predictions", "update_evidence"]

_DIGITS = 6  # significant digits kept for singular values and cosines (enough for any figure)


def encode_predictions(preds: Sequence[Any] | None) -> str | list | None:
    """Test predictions in a compact JSON form: ``"0110..."`` when they are class indices 0-9, else the list."""
    if preds is None:
        return None
    values = list(preds)
    if all(isinstance(p, int) and not isinstance(p, bool) and 0 <= p <= 9 for p in values):
        return "".join(str(p) for p in values)
    return values


def decode_predictions(stored: str | list | None) -> list | None:
    """Inverse of `encode_predictions`."""
    if stored is None:
        return None
    return [int(c) for c in stored] if isinstance(stored, str) else list(stored)


def _exact_low_rank(model: nn.Module) -> bool:
    """True when every adapted layer applies dW = B A as `factors_by_family` reads it."""
    for module in model.modules():
        if hasattr(module, "lora_E") or hasattr(module, "vera_lambda_b"):   # AdaLoRA: B E A; VeRA: shared A, B
            return False
        if any(bool(v) for v in (getattr(module, "use_dora", None) or {}).values()):  # DoRA: magnitude
            return False
    return True


def _rounded(t: torch.Tensor) -> Any:
    return [float(f"{v:.{_DIGITS}g}") for v in t.tolist()] if t.dim() == 1 else [_rounded(row) for row in t]


@torch.no_grad()
def update_evidence(model: nn.Module) -> dict[str, Any]:
    """``{"update_spectra": {module: [s_1 >= s_2 ...]}, "update_cosines": {family: [[...]]}}`` of a
    trained model (eval-mode updates), or both None when the model has no exact low-rank update."""
    none = {"update_spectra": None, "update_cosines": None}
    if not _exact_low_rank(model):
        return none
    was_training = model.training
    model.eval()
    try:
        fams = factors_by_family(model)
    except ValueError:  # not a LoRA model
        return none
    finally:
        model.train(was_training)
    spectra: dict[str, list[float]] = {}
    cosines: dict[str, list[list[float]]] = {}
    for key, members in fams.items():
        factors = [(b.detach().double(), a.detach().double()) for _, (b, a) in members]  # B (d, r), A (r, k)
        for (name, _), (b, a) in zip(members, factors):
            spectra[name] = _rounded(singular_values(b, a))                             # (r,)
        cosines[key] = _rounded(cosine_matrix(factors))                                 # (L, L)
    return {"update_spectra": spectra, "update_cosines": cosines}
