"""Which peft layers StructLoRA adapts, and how they are grouped into depth-ordered module families.

A family is every adapted module with the same name up to its first numeric path component
(``...layer.3.attention.self.query`` -> ``...layer.*.attention.self.query``); the coordinator
(Sec. 3.3) mixes updates within a family, across depth.

peft's `lora.Linear` wraps both ``nn.Linear`` and transformers' ``Conv1D`` (GPT-2's ``c_attn``,
``c_proj``, ``c_fc``; then ``layer.fan_in_fan_out`` is True), so both are collected here; their LoRA
factors A (r x k) and B (d x r) have the same orientation, only the stored W0 is transposed.
"""
from __future__ import annotations

import re

from peft.tuners.lora import Linear as LoraLinear
from torch import nn

__all__ = ["ADAPTER", "LoraLinear", "group_lora_layers"]

ADAPTER = "default"
_LAYER_INDEX = re.compile(r"\.(\d+)\.")


def group_lora_layers(model: nn.Module) -> dict[str, list[tuple[str, nn.Module]]]:
    """Group peft LoRA linear layers (over nn.Linear or Conv1D) into families: same name up to the first layer index.

    ``...layer.3.attention.self.query`` -> family ``...layer.*.attention.self.query``, ordered by depth.
    A module with no numeric path component is a family of its own.
    """
    families: dict[str, list[tuple[int, str, nn.Module]]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLinear) or ADAPTER not in module.lora_A:
            continue
        match = _LAYER_INDEX.search(name + ".")
        key = name if match is None else name[: match.start()] + ".*." + name[match.end():]
        index = -1 if match is None else int(match.group(1))
        families.setdefault(key.rstrip("."), []).append((index, name, module))
    return {k: [(n, m) for _, n, m in sorted(v, key=lambda t: t[0])] for k, v in families.items()}
