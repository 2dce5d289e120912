"""Building the fine-tuning methods compared in the paper (Table 1, 2, 12; appendix A) by name.

Each method is one `structlora.repro.catalogue.MethodSpec` (registered in `.specs`): its builder, the
model kinds it adapts, what it needs, its budget policy. One name -> one handle with a uniform interface::

    handle = build_method("dylora", loaded, rank=8, seed=0, total_steps=1000)
    opt = handle.build_optimizer(lr=2e-4, weight_decay=0.01)
    for step, batch in enumerate(batches, start=1):
        out = handle.model(**batch)
        loss = out.loss + (handle.extra_loss() if handle.extra_loss else 0)
        loss.backward(); opt.step()
        if handle.on_step: handle.on_step(step, total_steps)   # after step(), BEFORE zero_grad()
        opt.zero_grad()

Conventions shared by every builder:

* ``loaded.model`` is deep-copied first (``inplace=True`` adapts it in place instead), so building
  several methods from one :class:`~structlora.repro.assets.models.LoadedModel` never stacks adapters.
* ``torch.manual_seed(seed)`` is called right before any new parameter is created.
* the peft ``task_type`` follows ``loaded.kind``: ``SEQ_CLS`` for "seq-cls", ``CAUSAL_LM`` for "causal-lm",
  none for "image-cls". The classification head (seq-cls / image-cls) is trainable for every method
  (peft ``modules_to_save``, as in peft's GLUE recipes), linear probing included.
* LoRA-family defaults follow appendix A: target modules from ``loaded.target_modules`` (q/v),
  ``lora_alpha = 2 * rank`` (r=8, alpha=16), ``lora_dropout = 0``. Extra ``**kwargs`` go to the method's
  config (peft's ``LoraConfig`` / ``StructLoraConfig`` fields) or to its own options (documented per method).
* ``on_step(global_step, total_steps)`` is called after every optimizer step with ``global_step`` = number
  of optimizer steps done (1-based), before ``zero_grad`` (AdaLoRA's importance needs the gradients).

Errors are raised before any training: unknown name (the message lists the names), a method that cannot
apply to the model kind (`MethodSpec.kinds`, ``unsupported``) or cannot run here (``skipped``), missing
required options (``needs``), and (:func:`check_budget`) budget mismatches (``budget``).
"""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from ..catalogue import KINDS, get_method, method_specs, method_view
from .base import (
    BuildContext,
    MethodHandle,
    MethodSkipped,
    count_trainable,
    head_names,
    lora_param_count,
    param_groups,
)
from .own_methods import pinned_library_defaults
from .peft_methods import quantize_for_qlora as _quantize_for_qlora  # noqa: F401  (tests/test_meta_adapter)
from .peft_methods import require_bitsandbytes

if TYPE_CHECKING:  # pragma: no cover
    import pandas

    from ..assets.models import LoadedModel

__all__ = [
    "BUDGET_POLICY",
    "BuildContext",
    "KINDS",
    "MethodHandle",
    "MethodSkipped",
    "build_method",
    "check_budget",
    "count_trainable",
    "describe_methods",
    "list_methods",
    "lora_param_count",
    "method_defaults",
    "param_groups",
    "pinned_library_defaults",
]

BUDGET_POLICY: Mapping[str, str] = method_view(lambda s: s.budget, keep=lambda s: s.budget != "same-rank")
"""How :func:`check_budget` treats each method (`MethodSpec.budget`, Table 12); any other method is a
same-rank LoRA variant (reported). A live view of the catalogue."""


def list_methods() -> list[str]:
    """Every registered method name, in the catalogue's order."""
    return [s.name for s in method_specs()]


def method_defaults(name: str) -> dict[str, Any]:
    """The configuration the catalogue gives method ``name`` beyond its run's spec (`MethodSpec.config`:
    the StructLoRA variants' overrides, the full method's for the meta-adapters; {} for the others). A run
    record stores it, so a record written under other defaults is never served for the method as it is
    now (`grid.read_record`)."""
    return copy.deepcopy(dict(get_method(name).config))


def describe_methods() -> pandas.DataFrame:
    """One row per method: source (peft / own / structlora / skipped), paper, model kinds, budget policy."""
    import pandas as pd

    return pd.DataFrame([
        {"method": s.name, "source": s.source, "paper": s.citation, "kinds": ",".join(s.kinds),
         "budget": s.budget if s.budget != "same-rank" else "same-rank LoRA variant"}
        for s in method_specs()
    ])


def _already_adapted(model: nn.Module) -> bool:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return hasattr(model, "bottleneck_adapters") or any(isinstance(m, BaseTunerLayer) for m in model.modules())


def build_method(name: str, loaded: LoadedModel, rank: int = 8, seed: int = 0, total_steps: int | None = None,
                 *, inplace: bool = False, head_modules: list[str] | None = None, **kwargs: Any) -> MethodHandle:
    """Build method ``name`` on ``loaded`` (see the module docstring for the shared conventions).

    Args:
        name: one of :func:`list_methods` (its `MethodSpec` says which kinds it adapts and what it needs).
        loaded: the model to adapt (``kind``, ``model``, ``target_modules`` are used).
        rank: LoRA rank; adapter/prefix sizes are matched to LoRA at this rank.
        seed: ``torch.manual_seed(seed)`` before new parameters are created; seeds the methods' own RNGs.
        total_steps: optimizer steps of the run (required by adalora and loraprune).
        inplace: adapt ``loaded.model`` itself instead of a deep copy.
        head_modules: names of the classification head modules (default: ``loaded.modules_to_save``,
            else detected by name: classifier / score / head / fc).
        **kwargs: method options / config fields (see each method's notes).

    Raises:
        ValueError: unknown name, a method that cannot apply to ``loaded.kind``, missing or unknown options.
        MethodSkipped: the method cannot run in this environment (reason in ``.reason``).
    """
    spec = get_method(name)
    kind = getattr(loaded, "kind", None)
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")
    if kind not in spec.kinds:
        raise ValueError(spec.unsupported or f"{name} cannot apply to {kind} models (supports: {', '.join(spec.kinds)})")
    if kind in spec.skipped:
        raise MethodSkipped(spec.skipped[kind])
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if "bitsandbytes" in spec.needs:
        require_bitsandbytes()
    if "total_steps" in spec.needs and (total_steps is None or total_steps <= 0):
        raise ValueError(f"{name} needs total_steps > 0 (its schedule is defined over the whole run)")
    if "calibration_batches" in spec.needs and not kwargs.get("calibration_batches"):
        raise ValueError(f"{name} needs calibration_batches=[batch, ...] (a few labelled batches from "
                         "the training split) to estimate the per-module sensitivity")

    model = loaded.model if inplace else copy.deepcopy(loaded.model)
    if _already_adapted(model):
        raise ValueError(f"{name}: the model already carries adapters; build from a fresh LoadedModel "
                         "(or use inplace=False)")
    if head_modules is not None:
        heads = list(head_modules)
    elif kind == "causal-lm":
        heads = []
    else:
        heads = list(getattr(loaded, "modules_to_save", None) or []) or head_names(model, kind)
    torch.manual_seed(seed)
    handle = spec.builder(BuildContext(name, loaded, model, rank, seed, total_steps, dict(kwargs), heads,
                                       method_defaults(name)))
    handle.name = name
    handle.trainable_params = count_trainable(handle.model)
    return handle


def check_budget(handles: Mapping[str, MethodHandle], reference: str = "lora",
                 tolerance: float = 0.1) -> pandas.DataFrame:
    """Table of trainable parameters and their ratio to ``reference`` (paper Table 12).

    Budget-matched methods (``BUDGET_POLICY[...] == "matched"``: adapter, prefix) must be within
    ``tolerance`` (relative) of the reference, else ValueError listing the offenders. Exempt methods
    (full_ft, linear_probe, vera, lora_fa, adalora) say why in ``status``; the other LoRA variants at the
    same rank are reported (``status`` notes a deviation beyond tolerance, nothing is raised).
    """
    import pandas as pd

    if reference not in handles:
        raise ValueError(f"check_budget: reference method {reference!r} is not among {sorted(handles)}")
    ref = handles[reference].trainable_params
    if ref <= 0:
        raise ValueError(f"check_budget: reference {reference!r} has no trainable parameters")
    rows, bad = [], []
    for name, handle in handles.items():
        ratio = handle.trainable_params / ref
        within = abs(ratio - 1.0) <= tolerance
        policy = "reference" if name == reference else BUDGET_POLICY.get(name, "same-rank")
        if policy == "matched":
            status = "ok" if within else f"MISMATCH ({ratio:.3f}x)"
            if not within:
                bad.append(f"{name}: {handle.trainable_params} vs {ref} ({ratio:.3f}x)")
        elif policy.startswith("exempt"):
            status = policy
        elif policy == "reference":
            status = "reference"
        else:
            status = "ok" if within else f"same-rank variant, {ratio:.3f}x (reported, not enforced)"
        rows.append({"method": name, "trainable_params": handle.trainable_params, "ratio": round(ratio, 4),
                     "policy": policy.split(":")[0], "status": status})
    table = pd.DataFrame(rows)
    if bad:
        raise ValueError(f"budget mismatch beyond {tolerance:.0%} of {reference}: " + "; ".join(bad))
    return table
