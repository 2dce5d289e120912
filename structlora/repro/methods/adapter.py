"""Houlsby bottleneck adapters, our own small implementation.

Houlsby, Giurgiu, Jastrzebski, Morrone, de Laroussilhe, Gesmundo, Attariyan, Gelly (2019),
"Parameter-Efficient Transfer Learning for NLP", ICML 2019.

Why our own: AdapterHub's ``adapters`` library requires transformers 4.x; installing it downgrades
transformers and breaks ``datasets`` (see shared/OFFLINE_ASSETS.md), so we do not depend on it.

An adapter is a residual bottleneck ``h + W_up f(W_down h + b_down) + b_up`` (``d -> m -> d``) inserted,
as in Houlsby et al., after the attention output projection and after the feed-forward output projection
of every layer, before the residual addition / layer norm. ``W_up`` and ``b_up`` are zero-initialised so the
adapted model starts as the base model; ``W_down`` is drawn from N(0, 1e-2^2). The nonlinearity is SiLU
("swish", AdapterHub's default for the Houlsby configuration). The adapters are registered as sub-modules
of the model (``model.bottleneck_adapters``) so they are part of ``parameters()``/``state_dict()`` and move
with ``.to(device)``; forward hooks on the projection modules apply them. Houlsby et al. also train the layer
norms; we train only adapters (+ the task head, as for every method) so the budget matches LoRA's.

The bottleneck ``m`` is chosen so that the adapter parameter count matches a given budget (LoRA's at the
same rank, paper Table 12: "bottleneck dim ... matches LoRA params").
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "ADAPTER_SITE_PATTERNS",
    "BottleneckAdapter",
    "add_bottleneck_adapters",
    "adapter_params",
    "bottleneck_for_budget",
    "find_adapter_sites",
    "out_features",
]

# Per architecture: regexes (matched with re.search on the full module name) of the attention-output and
# FFN-output projections. The first family all of whose patterns match wins ("bert" also covers HF ViT).
ADAPTER_SITE_PATTERNS: dict[str, tuple[str, ...]] = {
    "bert": (r"(^|\.)attention\.output\.dense$", r"(^|\.)layer\.\d+\.output\.dense$"),
    "mpnet": (r"(^|\.)attention\.attn\.o$", r"(^|\.)layer\.\d+\.output\.dense$"),
    "llama": (r"(^|\.)self_attn\.o_proj$", r"(^|\.)mlp\.down_proj$"),
    "timm-vit": (r"(^|\.)attn\.proj$", r"(^|\.)mlp\.fc2$"),
    "gpt2": (r"(^|\.)attn\.c_proj$", r"(^|\.)mlp\.c_proj$"),
}


def out_features(module: nn.Module) -> int:
    """Output width of a linear-like module (nn.Linear, transformers Conv1D, bnb Linear4bit)."""
    if isinstance(module, nn.Linear):
        return module.out_features
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor) and weight.dim() == 2:
        # transformers' Conv1D (gpt2) stores (in, out)
        return int(weight.shape[1] if type(module).__name__ == "Conv1D" else weight.shape[0])
    raise ValueError(f"cannot infer the output size of {type(module).__name__}")


def find_adapter_sites(model: nn.Module, patterns: Sequence[str] | None = None) -> list[str]:
    """Names of the modules after which adapters go (see ``ADAPTER_SITE_PATTERNS``)."""
    names = [name for name, _ in model.named_modules()]
    families = [tuple(patterns)] if patterns is not None else list(ADAPTER_SITE_PATTERNS.values())
    for family in families:
        per_pattern = [[n for n in names if re.search(p, n)] for p in family]
        if all(per_pattern):
            return [n for n in names if any(n in found for found in per_pattern)]
    raise ValueError(
        "adapter: found no attention-output / FFN-output projection in this model; known patterns: "
        f"{ADAPTER_SITE_PATTERNS}. Pass adapter_sites=[regex, ...] for another architecture."
    )


def adapter_params(d: int, m: int) -> int:
    """Parameter count of one bottleneck adapter of width ``d`` and bottleneck ``m``."""
    return 2 * d * m + m + d


def bottleneck_for_budget(dims: Sequence[int], budget: int) -> int:
    """The bottleneck ``m >= 1`` whose total adapter count over sites of widths ``dims`` is closest to ``budget``."""
    if not dims:
        raise ValueError("bottleneck_for_budget: no adapter sites")
    per_m = sum(2 * d + 1 for d in dims)
    m = max(1, round((budget - sum(dims)) / per_m))
    candidates = [c for c in (m - 1, m, m + 1) if c >= 1]
    return min(candidates, key=lambda c: abs(sum(adapter_params(d, c) for d in dims) - budget))


class BottleneckAdapter(nn.Module):
    """``h + up(act(down(h)))`` with ``up`` zero-initialised (identity at start)."""

    def __init__(self, d: int, m: int) -> None:
        super().__init__()
        self.down = nn.Linear(d, m)
        self.up = nn.Linear(m, d)
        self.act = nn.SiLU()
        nn.init.normal_(self.down.weight, std=1e-2)
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.up(self.act(self.down(h)))


def _hook(adapter: BottleneckAdapter):
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, tuple):
            return (adapter(output[0]), *output[1:])
        return adapter(output)

    return hook


def add_bottleneck_adapters(model: nn.Module, bottleneck: int, sites: Sequence[str] | None = None,
                            dtype: torch.dtype | None = None) -> nn.ModuleDict:
    """Insert a Houlsby adapter after each module in ``sites`` (default: :func:`find_adapter_sites`).

    The adapters are registered as ``model.bottleneck_adapters`` (a ``ModuleDict``) and are trainable;
    nothing else is frozen or unfrozen here. Returns the ``ModuleDict``.
    """
    if hasattr(model, "bottleneck_adapters"):
        raise ValueError("this model already has bottleneck adapters")
    sites = list(sites) if sites is not None else find_adapter_sites(model)
    modules = dict(model.named_modules())
    first = next(iter(model.parameters()), None)
    device = first.device if first is not None else None
    dtype = dtype or (first.dtype if first is not None and first.is_floating_point() else torch.float32)
    adapters = nn.ModuleDict()
    for site in sites:
        target = modules[site]
        adapter = BottleneckAdapter(out_features(target), bottleneck).to(device=device, dtype=dtype)
        adapters[site.replace(".", "__")] = adapter
        target.register_forward_hook(_hook(adapter))
    model.bottleneck_adapters = adapters
    return adapters
