"""Zero-inference-cost export: merge into W0, or write a standard peft LoRA adapter (Sec. 3.5, E.7).

The trained StructLoRA update of module l is dW_l = B_eff A_eff (gates, scaling s and coordinator
mixing folded into B_eff; closed directions dropped), see `StructLoraModel.effective_factors`. Those
factors ARE a LoRA adapter of rank r'_l, so we write them with per-module ``rank_pattern`` and
``alpha_pattern`` equal to the rank (peft's scaling alpha/r = 1). Vanilla peft loads the result with
no structlora import. ``compress_rank`` optionally re-factorises each module by the exact QR+SVD route
(`lowrank.svd_factors`) and truncates, reporting the relative Frobenius error per module.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import torch
from peft import LoraConfig, get_peft_model_state_dict
from safetensors.torch import save_file
from torch import nn

from .lowrank import svd_factors

if TYPE_CHECKING:
    from .model import StructLoraModel

__all__ = ["save_adapter", "merge_and_unload", "relative_name"]

_PREFIX = "base_model.model."


def relative_name(name: str) -> str:
    """Module name in the base model (peft's names carry a ``base_model.model.`` prefix)."""
    return name[len(_PREFIX):] if name.startswith(_PREFIX) else name


def save_adapter(model: "StructLoraModel", save_directory: str | os.PathLike, compress_rank: Optional[int] = None,
                 svd_tol: float = 0.0) -> dict[str, Any]:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` loadable by vanilla peft.

    Returns a summary: per-module exported rank and (when compressing) relative reconstruction error,
    the total number of adapter parameters, and the file size in bytes.
    """
    if compress_rank is not None and compress_rank < 1:
        raise ValueError(f"compress_rank must be >= 1, got {compress_rank}")
    model._check_finite()
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    factors = model.effective_factors(drop_zero=True)
    fan_in_fan_out = bool(model.structlora_config.fan_in_fan_out)

    state = {k: v.detach().clone().contiguous() for k, v in get_peft_model_state_dict(model.peft_model).items()
             if ".lora_A." not in k and ".lora_B." not in k}
    ranks, errors = {}, {}
    for name, (b, a) in factors.items():
        err = 0.0
        if compress_rank is not None and b.shape[1] > 0:
            b, a, err = svd_factors(b, a, rank=min(compress_rank, b.shape[1]), tol=svd_tol)
        if b.shape[1] == 0:
            continue  # every direction closed: the module is left unadapted
        rel = relative_name(name)
        ranks[rel], errors[rel] = b.shape[1], err
        state[f"{name}.lora_A.weight"] = a.detach().contiguous().clone()
        state[f"{name}.lora_B.weight"] = b.detach().contiguous().clone()
    if not ranks:
        raise ValueError("every gate is closed: the exported adapter would be empty")

    src = model.structlora_config
    max_rank = max(ranks.values())
    config = LoraConfig(
        r=max_rank, lora_alpha=max_rank, target_modules=sorted(ranks), rank_pattern=dict(ranks),
        alpha_pattern=dict(ranks), lora_dropout=0.0, bias=src.bias, fan_in_fan_out=fan_in_fan_out,
        modules_to_save=src.modules_to_save, task_type=src.task_type,
        base_model_name_or_path=src.base_model_name_or_path, init_lora_weights=True,
    )
    config.save_pretrained(str(out))
    save_file(state, str(out / "adapter_model.safetensors"))
    summary = {
        "ranks": ranks, "relative_errors": errors, "max_relative_error": max(errors.values()),
        "adapter_parameters": int(sum(v.numel() for k, v in state.items() if ".lora_" in k)),
        "size_bytes": (out / "adapter_model.safetensors").stat().st_size,
    }
    (out / "structlora_export.json").write_text(json.dumps(summary, indent=2))
    return summary


@torch.no_grad()
def merge_and_unload(model: "StructLoraModel") -> nn.Module:
    """Return the plain base model with W0 <- W0 + B_eff A_eff for every adapted module.

    Its outputs equal the StructLoRA model's eval outputs (gates deterministic, coordinator folded
    in). The StructLoraModel must not be used afterwards (as with peft's own ``merge_and_unload``).
    """
    factors = model.effective_factors(drop_zero=True)
    base = model.peft_model.unload()  # removes LoRA layers, keeps trained modules_to_save
    modules = dict(base.named_modules())
    for name, (b, a) in factors.items():
        target = modules[relative_name(name)]
        delta = b @ a                                                   # (d, k): merging is dense by nature
        if model.structlora_config.fan_in_fan_out:
            delta = delta.T
        target.weight.add_(delta.to(target.weight.dtype))
    return base
