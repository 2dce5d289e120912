"""Sensitivity-LoRA: rank allocation from a second-order sensitivity of the frozen weights.

Zhang, Huang, Li, Xiao, Leong, Zhang, Long, Wang, Xu (2025), "Sensitivity-LoRA: Low-Load
Sensitivity-Based Fine-Tuning for Large Language Models", arXiv:2509.09119.

Sensitivity-LoRA gives each weight matrix a LoRA rank proportional to how sensitive the loss is to it, a
sensitivity measured through the Hessian of the loss with respect to the (frozen) pretrained weight. We use
the standard cheap proxy for the Hessian diagonal, the empirical Fisher information::

    S(W) = sum_{batches} sum_{ij} (dL/dW_ij)^2          (trace of the diagonal Fisher, per module)

computed on a few calibration batches from the training split (``calibration_batches``), with the model in
eval mode (no dropout) and only the target weights requiring grad. Ranks are then allocated in proportion
to ``S`` under the same total budget as uniform LoRA (``rank * n_modules``, every module at least rank 1;
largest-remainder rounding, so the total is exact). The allocation is handed to peft as ``rank_pattern``;
``alpha_pattern`` keeps the scale ``alpha / r`` of uniform LoRA for every module, so a module's update is
not shrunk just because it got more rank. With modules of equal shape (q/v) the trainable count equals
LoRA's exactly.

This is a simplification of the paper's metric (which combines global and local Hessian-based
sensitivities); the proxy is documented in the report of every run that uses it.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

__all__ = [
    "allocate_ranks",
    "estimate_sensitivity",
    "matches_target",
    "rank_and_alpha_patterns",
    "target_linear_names",
]


def matches_target(name: str, target_modules: Sequence[str] | str) -> bool:
    """peft's rule: a regex string must fully match; a list entry must equal the name or be its suffix."""
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def target_linear_names(model: nn.Module, target_modules: Sequence[str] | str) -> list[str]:
    """Names of the modules of ``model`` (with a 2-D ``weight``) that peft would adapt."""
    names = [
        name for name, module in model.named_modules()
        if matches_target(name, target_modules)
        and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2
    ]
    if not names:
        raise ValueError(f"no module of the model matches target_modules={target_modules!r}")
    return names


def estimate_sensitivity(model: nn.Module, target_modules: Sequence[str] | str,
                         calibration_batches: Iterable[Mapping[str, torch.Tensor]]) -> dict[str, float]:
    """Empirical-Fisher sensitivity of every target module's frozen weight (see module doc).

    Each batch is moved to the model's device and passed as ``model(**batch)``; it must produce ``.loss``
    (i.e. include labels). The model's parameters' ``requires_grad`` flags, grads and train/eval mode are restored afterwards.
    """
    names = target_linear_names(model, target_modules)
    modules = dict(model.named_modules())
    params = list(model.parameters())
    saved_flags = [p.requires_grad for p in params]
    saved_grads = [p.grad for p in params]
    was_training = model.training
    scores = {name: 0.0 for name in names}
    n_batches = 0
    try:
        for p in params:
            p.requires_grad_(False)
            p.grad = None
        for name in names:
            modules[name].weight.requires_grad_(True)
        model.eval()
        device = modules[names[0]].weight.device
        for batch in calibration_batches:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            out = model(**batch)
            loss = getattr(out, "loss", None)
            if loss is None:
                raise ValueError("sensitivity_lora: a calibration batch produced no loss; "
                                 "calibration batches must include labels")
            loss.backward()
            for name in names:
                weight = modules[name].weight
                if weight.grad is not None:
                    scores[name] += float(weight.grad.detach().float().pow(2).sum())
                    weight.grad = None
            n_batches += 1
    finally:
        for p, flag, grad in zip(params, saved_flags, saved_grads):
            p.requires_grad_(flag)
            p.grad = grad
        model.train(was_training)
    if n_batches == 0:
        raise ValueError("sensitivity_lora: calibration_batches is empty")
    return scores


def allocate_ranks(sensitivity: Mapping[str, float], total_rank: int, min_rank: int = 1) -> dict[str, int]:
    """Split ``total_rank`` over the modules in proportion to ``sensitivity`` (each gets >= ``min_rank``).

    Largest-remainder rounding makes the ranks sum to ``total_rank`` exactly. Non-finite or all-zero
    sensitivities fall back to a uniform split.
    """
    names = list(sensitivity)
    n = len(names)
    if n == 0:
        raise ValueError("allocate_ranks: no modules")
    if total_rank < min_rank * n:
        raise ValueError(f"allocate_ranks: total rank {total_rank} < {min_rank} x {n} modules")
    values = [max(float(sensitivity[k]), 0.0) for k in names]
    if not all(math.isfinite(v) for v in values) or sum(values) <= 0.0:
        values = [1.0] * n
    spare = total_rank - min_rank * n
    total = sum(values)
    shares = [spare * v / total for v in values]
    extra = [math.floor(s) for s in shares]
    left = spare - sum(extra)
    order = sorted(range(n), key=lambda i: (shares[i] - extra[i], values[i]), reverse=True)
    for i in order[:left]:
        extra[i] += 1
    return {name: min_rank + e for name, e in zip(names, extra)}


def rank_and_alpha_patterns(ranks: Mapping[str, int], rank: int, lora_alpha: float
                            ) -> tuple[dict[str, int], dict[str, float]]:
    """peft ``rank_pattern`` / ``alpha_pattern`` (keys: escaped full module names) keeping ``alpha/r``."""
    scale = lora_alpha / rank
    rank_pattern = {re.escape(name): int(r) for name, r in ranks.items()}
    alpha_pattern = {re.escape(name): scale * int(r) for name, r in ranks.items()}
    return rank_pattern, alpha_pattern
