"""The training regime: bf16 autocast and gradient checkpointing where the model and device allow them
(`training_regime` says what was used), and the autocast context of the training forward."""
from __future__ import annotations

import logging
from typing import Any

import torch
from peft import PeftType
from torch import nn

from .config import TrainConfig

__all__ = ["autocast", "training_regime"]

log = logging.getLogger(__name__)


def autocast(device: torch.device, dtype: torch.dtype | None) -> Any:
    """``torch.autocast`` to ``dtype`` on ``device``'s type; nothing at all for fp32 (None)."""
    import contextlib

    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def training_regime(model: nn.Module, cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    """Turn on what ``cfg`` asks for where the model and the device support it, and say what is used:
    ``{"precision": "bf16" | "fp32", "gradient_checkpointing": bool}`` (the training forward's autocast
    dtype and whether activation checkpointing is on; reasons in ``"notes"`` when a request was dropped).

    Checkpointing: ``model.activation_checkpointing_enable`` (transformers >= 5, through peft and
    StructLoRA; ``gradient_checkpointing_enable``, its name before 5 and a deprecated alias since, where it
    is missing; non-reentrant, so frozen inputs need no gradient); a model without either (timm's ViT, whose
    checkpointing StructLoRA's gate noise does not know) trains without. bf16 autocast: on CUDA where
    the device supports bf16, on CPU always (torch's CPU autocast)."""
    used: dict[str, Any] = {"precision": "fp32", "gradient_checkpointing": False}
    notes = []
    if cfg.gradient_checkpointing:
        # transformers >= 5's name first, its older (now deprecated) one where that is missing
        name = next((n for n in ("activation_checkpointing", "gradient_checkpointing")
                     if callable(getattr(model, f"{n}_enable", None))), None)
        try:
            if _prefix_as_cache(model):
                notes.append("prefix tuning passes its prefix as past_key_values, which transformers drops "
                             "while training under gradient checkpointing: not checkpointed")
            elif name is not None:
                getattr(model, f"{name}_enable")(**{f"{name}_kwargs": {"use_reentrant": False}})
                used["gradient_checkpointing"] = True
            else:
                notes.append(f"{type(model).__name__} has no activation_checkpointing_enable: not checkpointed")
        except (ValueError, TypeError, NotImplementedError, AttributeError) as exc:
            notes.append(f"gradient checkpointing not supported: {exc}")
    if cfg.precision != "fp32":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            notes.append(f"{cfg.precision} autocast not supported on {torch.cuda.get_device_name(device)}: fp32")
        elif device.type not in ("cuda", "cpu"):
            notes.append(f"{cfg.precision} autocast not used on device {device.type}: fp32")
        else:
            used["precision"] = cfg.precision
    for note in notes:
        log.warning("training regime: %s", note)
    if notes:
        used["notes"] = notes
    return used


def _prefix_as_cache(model: nn.Module) -> bool:
    """Whether ``model`` is a peft model whose adapter feeds the base its prefix as ``past_key_values``
    (prefix tuning): transformers' decoder layers discard the cache while they train checkpointed."""
    return any(getattr(c, "peft_type", None) == PeftType.PREFIX_TUNING
               for c in (getattr(model, "peft_config", None) or {}).values())
