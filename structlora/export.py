"""Zero-inference-cost export: merge into W0, or write a standard peft LoRA adapter (Sec. 3.5, E.7).

The trained StructLoRA update of module l is dW_l = B_eff A_eff (gates, scaling s and coordinator
mixing folded into B_eff; closed directions dropped), see `StructLoraModel.effective_factors`. Those
factors ARE a LoRA adapter of rank r'_l, so we write them with per-module ``rank_pattern`` and
``alpha_pattern`` equal to the rank (peft's scaling alpha/r = 1). Vanilla peft loads the result with
no structlora import. ``compress_rank`` optionally re-factorises each module by the exact QR+SVD route
(`lowrank.svd_factors`) and truncates, reporting the relative Frobenius error per module.

The folded export cannot resume training (gates and coordinator are folded away). `save_training_state`
writes what can: the wrapped model's own peft adapter (raw trainable factors and head, via
``peft_model.save_pretrained``) plus ``structlora_state.safetensors`` (gate logits and masks, coordinator parameters
and adjacency, step counter, an in-progress gradient sketch) and ``structlora_config.json`` (the
`StructLoraConfig`, written last, so its presence marks a complete directory).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Optional

import torch
from peft import LoraConfig, get_peft_model_state_dict, load_peft_weights, set_peft_model_state_dict
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from ._io import atomic_write, atomic_write_json
from .config import StructLoraConfig
from .lowrank import svd_factors


__all__ = ["save_adapter", "merge_and_unload", "relative_name", "save_training_state", "load_training_state",
           "read_training_config", "STATE_FILE", "CONFIG_FILE", "EXPORT_FILE"]

_PREFIX = "base_model.model."
STATE_FILE = "structlora_state.safetensors"   # gates, coordinator, step counter, capture state
CONFIG_FILE = "structlora_config.json"        # {"format": ..., "version": 1, "config": StructLoraConfig fields}
EXPORT_FILE = "structlora_export.json"        # summary of a folded export
_FORMAT = "structlora-training-state"


def relative_name(name: str) -> str:
    """Module name in the base model (peft's names carry a ``base_model.model.`` prefix)."""
    return name[len(_PREFIX):] if name.startswith(_PREFIX) else name


def save_adapter(model: nn.Module, save_directory: str | os.PathLike, compress_rank: Optional[int] = None,
                 svd_tol: float = 0.0, save_embedding_layers: str | bool = "auto") -> dict[str, Any]:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` loadable by vanilla peft.

    Returns a summary: per-module exported rank and (when compressing) relative reconstruction error,
    the total number of adapter parameters, and the file size in bytes.
    """
    if compress_rank is not None and compress_rank < 1:
        raise ValueError(f"compress_rank must be >= 1, got {compress_rank}")
    model.check_finite()
    out = Path(save_directory)
    out.mkdir(parents=True, exist_ok=True)
    factors = model.effective_factors(drop_zero=True)
    fan_in_fan_out = bool(model.structlora_config.fan_in_fan_out)  # as peft corrected it (model._synced_config)

    peft_state = get_peft_model_state_dict(model.peft_model, save_embedding_layers=save_embedding_layers)
    state = {k: v.detach().clone().contiguous() for k, v in peft_state.items()
             if ".lora_A." not in k and ".lora_B." not in k and "vera_" not in k}  # VeRA folds into LoRA factors
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
    atomic_write(out / "adapter_model.safetensors", safetensors_bytes(state, metadata={"format": "pt"}))
    for stale in (STATE_FILE, CONFIG_FILE):  # a folded export is not a training state
        (out / stale).unlink(missing_ok=True)
    summary = {
        "ranks": ranks, "relative_errors": errors, "max_relative_error": max(errors.values()),
        "adapter_parameters": int(sum(v.numel() for k, v in state.items() if ".lora_" in k)),
        "size_bytes": (out / "adapter_model.safetensors").stat().st_size,
    }
    atomic_write(out / EXPORT_FILE, json.dumps(summary, indent=2))
    return summary


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Return the plain base model with W0 <- W0 + B_eff A_eff for every adapted module.

    Its outputs equal the StructLoRA model's eval outputs (gates deterministic, coordinator folded
    in). The StructLoraModel must not be used afterwards (as with peft's own ``merge_and_unload``).

    A VeRA base folds exactly (dW = diag(lambda_b) B diag(coef) A). A bitsandbytes 4-bit base
    (QLoRA) is *dequantized*: each adapted ``Linear4bit`` becomes an ``nn.Linear`` in its compute dtype
    holding dequant(W0) + dW, which is what the 4-bit forward computes, so the outputs are unchanged.
    Re-quantizing W0 + dW to NF4 (peft's own 4-bit merge) would round the update away and change the
    outputs; for a 4-bit deployment load the folded adapter (`save_adapter`) on the 4-bit base instead.
    Unadapted 4-bit layers stay 4-bit.
    """
    from .layers import is_4bit

    factors = model.effective_factors(drop_zero=True)
    # per layer, as peft sets it: Conv1D (GPT-2) stores W0 as (k, d), nn.Linear as (d, k)
    transposed = {name: bool(getattr(layer, "fan_in_fan_out", False))
                  for fam in model.families for name, layer in zip(fam.names, fam.layers)}
    base = model.peft_model.unload()  # removes LoRA/VeRA layers, keeps trained modules_to_save
    modules = dict(base.named_modules())
    for name, (b, a) in factors.items():
        rel = relative_name(name)
        target = modules[rel]
        delta = b @ a                                                   # (d, k): merging is dense by nature
        if is_4bit(target):
            target = _dequantized_linear(target)
            parent, _, child = rel.rpartition(".")
            setattr(base.get_submodule(parent) if parent else base, child, target)
        if transposed[name]:
            delta = delta.T                                             # (k, d)
        target.weight.add_(delta.to(target.weight.dtype))
    return base


def _dequantized_linear(q: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` in the compute dtype of a bitsandbytes ``Linear4bit`` with its dequantized weight."""
    import bitsandbytes.functional as bnbf

    dtype = q.compute_dtype or torch.float32
    weight = bnbf.dequantize_4bit(q.weight.data, q.weight.quant_state).to(dtype)    # (d, k)
    out = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device=weight.device, dtype=dtype)
    out.weight.data.copy_(weight.reshape(q.out_features, q.in_features))
    if q.bias is not None:
        out.bias.data.copy_(q.bias.data.to(dtype))
    out.requires_grad_(False)
    return out


# ---------------------------------------------------------------------- resumable training state
def _structlora_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every tensor of the wrapper outside the peft model (gates.*, coordinators.*, structlora_step),
    plus ``capture.<slot>.*`` for a family whose gradient sketch is being accumulated."""
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()
             if not k.startswith("peft_model.")}
    for slot, fam in zip(model.gates.keys(), model.families):
        if fam.capturing:
            state[f"capture.{slot}.sketches"] = fam.sketches.detach().cpu().contiguous().clone()  # (L, d, p)
            state[f"capture.{slot}.captured"] = torch.tensor(fam.captured)
    return state


def save_training_state(model: nn.Module, save_directory: str | os.PathLike) -> None:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (``peft_model.save_pretrained``:
    raw factors and head), `STATE_FILE` and `CONFIG_FILE` (last). See the module docstring."""
    out = Path(save_directory)
    model.check_finite()
    (out / CONFIG_FILE).unlink(missing_ok=True)  # the directory is incomplete until the config is back
    model.peft_model.save_pretrained(str(out), safe_serialization=True)
    (out / EXPORT_FILE).unlink(missing_ok=True)  # no longer a folded export
    atomic_write(out / STATE_FILE, safetensors_bytes(_structlora_state(model), metadata={"format": "pt"}))
    atomic_write_json(out / CONFIG_FILE, {"format": _FORMAT, "version": 1,
                                          "config": model.structlora_config.to_json_dict()})


def read_training_config(save_directory: str | os.PathLike) -> StructLoraConfig:
    """The `StructLoraConfig` of a `save_training_state` directory; a clear error for anything else."""
    path = Path(save_directory)
    if not (path / CONFIG_FILE).is_file():
        if (path / EXPORT_FILE).is_file() or (path / "adapter_config.json").is_file():
            raise ValueError(f"{path} holds a LoRA adapter without {CONFIG_FILE} (e.g. the folded export of "
                             "StructLoraModel.save_pretrained): load it with peft.PeftModel.from_pretrained(base, path); "
                             "to resume StructLoRA training save with save_training_state (Trainer checkpoints do)")
        raise FileNotFoundError(f"no StructLoRA training state ({CONFIG_FILE}) in {path}")
    data = json.loads((path / CONFIG_FILE).read_text())
    if data.get("format") != _FORMAT:
        raise ValueError(f"{path / CONFIG_FILE} is not a StructLoRA training state (format {data.get('format')!r})")
    return StructLoraConfig.from_json_dict(data["config"])


@torch.no_grad()
def load_training_state(model: nn.Module, save_directory: str | os.PathLike) -> None:
    """Load a `save_training_state` directory into ``model`` in place (peft's ``set_peft_model_state_dict``
    for the adapter; strict for the StructLoRA tensors)."""
    path = Path(save_directory)
    read_training_config(path)  # fail clearly on a folded export or a foreign folder
    device = model.families[0].A(0).device
    result = set_peft_model_state_dict(model.peft_model, load_peft_weights(str(path), device=str(device)))
    # bias="all" makes peft save every bias, also the raw ".modules_to_save." / ".original_module." copies of a
    # head's bias beside its canonical key (which is what loads it): those duplicates are not foreign weights
    unexpected = [k for k in result.unexpected_keys if ".modules_to_save." not in k and ".original_module." not in k]
    if unexpected:
        raise ValueError(f"{path}: adapter weights this model does not have: {unexpected[:5]}")
    state = load_file(str(path / STATE_FILE))
    capture = {k: state.pop(k) for k in list(state) if k.startswith("capture.")}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith("peft_model.")]
    if missing or unexpected:
        raise ValueError(f"{path / STATE_FILE} does not fit this model: missing {missing}, unexpected {unexpected}")
    for slot, fam in zip(model.gates.keys(), model.families):
        key = f"capture.{slot}.sketches"
        fam.capturing = key in capture
        fam.sketches = capture[key].to(device) if fam.capturing else None
        fam.captured = int(capture[f"capture.{slot}.captured"]) if fam.capturing else 0
    model.reset_states()
