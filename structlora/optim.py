"""The one optimizer policy of every method: the AdamW parameter grouping (`param_groups`)."""
from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["param_groups"]


def param_groups(model: nn.Module, lr: float, weight_decay: float,
                 extra: Any = ()) -> list[dict[str, Any]]:
    """The one AdamW parameter grouping of every method (fair baselines, issue 11 item 6).

    Trainable parameters of ``model`` not in ``extra``, in ``named_parameters`` order (tied tensors once):
    matrices (``ndim >= 2``: weights, LoRA factors, the head weight) with ``weight_decay``; biases,
    LayerNorm weights and other vectors (VeRA's lambdas) with none; all at ``lr``. ``extra`` are
    method-specific groups (e.g. StructLoRA's gates and coordinator, with their lr multipliers), appended
    as given; their parameters are taken out of the shared groups. Empty groups are dropped.
    """
    extra = [dict(g, params=list(g["params"])) for g in extra if list(g["params"])]
    seen = {id(p) for g in extra for p in g["params"]}
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (decay if p.ndim >= 2 else no_decay).append(p)
    shared = [{"params": decay, "lr": lr, "weight_decay": weight_decay},
              {"params": no_decay, "lr": lr, "weight_decay": 0.0}]
    return [g for g in shared if g["params"]] + extra
