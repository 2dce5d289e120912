"""What every method builder shares: the handle it returns, the context it gets, the optimizer policy.

A builder of the catalogue (`structlora.repro.catalogue.MethodSpec.builder`) has one typed signature,
``builder(ctx: BuildContext) -> MethodHandle``; `structlora.repro.methods.registry.build_method` makes
the context (a copy of the model, the head names, the seed set) after the checks that the method's
`MethodSpec` declares (model kinds, what it needs).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .sensitivity_lora import target_linear_names

if TYPE_CHECKING:  # pragma: no cover
    from ..assets.models import LoadedModel

__all__ = [
    "BuildContext",
    "MethodHandle",
    "MethodSkipped",
    "count_trainable",
    "head_names",
    "lora_param_count",
    "param_groups",
    "set_requires_grad",
]


class MethodSkipped(Exception):
    """Raised (before training) when a method cannot run in this environment; ``reason`` says why."""

    def __init__(self, reason: str) -> None:
        if not reason:
            raise ValueError("MethodSkipped needs a reason")
        super().__init__(reason)
        self.reason = reason


@dataclass
class BuildContext:
    """Everything a builder gets: one typed signature for every method of the catalogue."""

    name: str                  # the registered name being built (a variant shares its builder)
    loaded: LoadedModel        # kind, target_modules (appendix A: q/v) of the model to adapt
    model: nn.Module           # the module to adapt: a deep copy of loaded.model unless inplace=True
    rank: int                  # LoRA rank; adapter / prefix sizes are matched to LoRA at this rank
    seed: int                  # torch.manual_seed(seed) ran right before the build; seeds own RNGs too
    total_steps: int | None    # optimizer steps of the run (AdaLoRA's and LoRAPrune's schedules)
    options: dict[str, Any] = field(default_factory=dict)   # build_method's **kwargs; builders pop theirs
    heads: list[str] = field(default_factory=list)          # classification head modules (always trainable)
    config: Mapping[str, Any] = field(default_factory=dict)  # the spec's config overrides (MethodSpec.config)


@dataclass
class MethodHandle:
    """What the trainer needs to run one method (see `structlora.repro.methods.registry` for the loop)."""

    name: str
    model: nn.Module
    trainable_params: int
    extra_loss: Callable[[], torch.Tensor] | None = None
    on_step: Callable[[int, int], None] | None = None
    make_optimizer: Callable[[float, float], torch.optim.Optimizer] | None = None
    notes: str = ""
    controller: Any = None  # the method's own state object (DyLoRA / LoRA-Dropout / LoRAPrune controller, ...)
    extra_param_groups: Callable[[float], list[dict[str, Any]]] | None = None  # method-only groups (StructLoRA)

    def param_groups(self, lr: float, weight_decay: float) -> list[dict[str, Any]]:
        """The shared AdamW grouping (`param_groups`) of this method's trainable parameters."""
        return param_groups(self.model, lr, weight_decay,
                            extra=self.extra_param_groups(lr) if self.extra_param_groups is not None else ())

    def build_optimizer(self, lr: float, weight_decay: float,
                        betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Optimizer:
        """The one optimizer of every method: ``make_optimizer(lr, wd)`` when the optimizer is part of the
        method (LoRA-FA's projected update), else AdamW (eps 1e-8) over `param_groups`, the same grouping
        for every method (fair baselines). Raises RuntimeError when a trainable parameter is in no group."""
        if self.make_optimizer is not None:
            return self.make_optimizer(lr, weight_decay)
        groups = self.param_groups(lr, weight_decay)
        grouped = {id(p) for g in groups for p in g["params"]}
        missing = [n for n, p in self.model.named_parameters() if p.requires_grad and id(p) not in grouped]
        if missing:
            raise RuntimeError(f"optimizer policy left trainable parameters out of every group: {missing[:5]}")
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8)


def param_groups(model: nn.Module, lr: float, weight_decay: float, extra: Any = ()) -> list[dict[str, Any]]:
    """The one optimizer policy of every method (fair baselines): AdamW with decay on matrices (weights,
    LoRA factors, the head weight), none on biases / LayerNorm / vectors, and method-specific ``extra``
    groups (StructLoRA's gates and coordinator, with their lr multipliers) appended; see
    `structlora.optim.param_groups`, which this is."""
    from ...optim import param_groups as _shared

    return _shared(model, lr, weight_decay, extra=extra)


def count_trainable(model: nn.Module) -> int:
    """Number of trainable parameters (shared / tied tensors counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def lora_param_count(model: nn.Module, target_modules: list[str] | str, rank: int) -> int:
    """Adapter parameters of plain LoRA of rank ``rank`` on ``target_modules``: sum of r (d_in + d_out)
    (the budget Table 12 matches the adapter and prefix baselines to)."""
    modules = dict(model.named_modules())
    return sum(rank * sum(modules[n].weight.shape) for n in target_linear_names(model, target_modules))


_HEAD_CANDIDATES = {"seq-cls": ("classifier", "score"), "image-cls": ("classifier", "head", "fc", "score")}


def head_names(model: nn.Module, kind: str) -> list[str]:
    """Full names of the classification head module(s) of a seq-cls / image-cls model ([] otherwise)."""
    if kind not in _HEAD_CANDIDATES:
        return []
    named = list(model.named_modules())
    get_classifier = getattr(model, "get_classifier", None)  # timm
    if callable(get_classifier):
        head = get_classifier()
        for name, module in named:
            if module is head and name and any(p.numel() for p in module.parameters()):
                return [name]
    for cand in _HEAD_CANDIDATES[kind]:
        hits = [n for n, m in named if n.split(".")[-1] == cand and any(True for _ in m.parameters())]
        if hits:
            return [min(hits, key=lambda n: n.count("."))]
    raise ValueError(f"cannot find the classification head of this {kind} model "
                     f"(looked for modules named {_HEAD_CANDIDATES[kind]}); pass head_modules=[...]")


def set_requires_grad(model: nn.Module, names: list[str]) -> None:
    """Make every parameter of the named modules trainable (the heads)."""
    modules = dict(model.named_modules())
    for name in names:
        for p in modules[name].parameters():
            p.requires_grad_(True)
