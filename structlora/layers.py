"""Which peft layers StructLoRA adapts, and how they are grouped into depth-ordered module families.

A family is every adapted module with the same name once each numeric path component is read as ``*``
(``...layer.3.attention.self.query`` -> ``...layer.*.attention.self.query``; Swin's
``layers.1.blocks.0...`` -> ``layers.*.blocks.*...``) and the same factor shapes (A r x k, B d x r),
in the order the model defines its modules (its depth order, not the numbers in the names). Two
members are chain neighbours only when no module of the same name pattern lies between them in the
model (``layers_to_transform=[0, 3]``: layers 0 and 3 are not neighbours). The coordinator
(Sec. 3.3) mixes updates within a family, across depth.

Supported layers (StructLoRA as a meta-adapter, paper appendix F, Table 11):

* peft LoRA layers (any `LoraLayer` with ``lora_A``/``lora_B``) over ``nn.Linear``, transformers'
  ``Conv1D`` (GPT-2; then ``layer.fan_in_fan_out`` is True) or a bitsandbytes 4-bit ``Linear4bit``
  (QLoRA: peft's ``lora.bnb.Linear4bit``, which is not a subclass of ``lora.Linear``). LoRA-FA is a
  LoRA layer whose A is frozen. Factors: A = lora_A.weight (r x k), B = lora_B.weight (d x r),
  scaling s = alpha / r.
* peft VeRA layers (`peft.tuners.vera.layer.Linear`): shared frozen random ``vera_A`` (r x k_max) and
  ``vera_B`` (d_max x r), trainable per-layer vectors lambda_b (d,) and lambda_d (r,):
  dW = diag(lambda_b) B diag(lambda_d) A. StructLoRA sees A = vera_A[:, :k] and
  B = diag(lambda_b) vera_B[:d] diag(lambda_d) with s = 1, so a gate m multiplies lambda_d.

Anything else (DoRA and other LoRA variants, LoRA on embeddings / convolutions / 8-bit layers, other
peft tuners, prefix tuning, own bottleneck adapters) is refused at wrap time (`check_supported`).
"""
from __future__ import annotations

import re

import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

__all__ = ["ADAPTER", "LoraLinear", "group_lora_layers", "family_links", "name_pattern", "check_supported", "is_vera",
           "factor_A", "factor_B", "layer_scaling", "layer_dropout", "is_4bit"]

ADAPTER = "default"
_NUMBER = re.compile(r"(?<=\.)\d+(?=\.)")   # a numeric path component (between two dots)


def is_4bit(module: nn.Module) -> bool:
    """A bitsandbytes 4-bit linear layer (``bnb.nn.Linear4bit``)."""
    return type(module).__name__ == "Linear4bit" and type(module).__module__.startswith("bitsandbytes")


def _supported_base(base: nn.Module) -> bool:
    return isinstance(base, nn.Linear) or type(base).__name__ == "Conv1D" or is_4bit(base)


def is_vera(module: nn.Module) -> bool:
    from peft.tuners.vera.layer import Linear as VeraLinear

    return isinstance(module, VeraLinear)


def _is_lora(module: nn.Module) -> bool:
    return (isinstance(module, LoraLayer) and ADAPTER in getattr(module, "lora_A", {})
            and ADAPTER in getattr(module, "lora_B", {}) and isinstance(module.lora_A[ADAPTER], nn.Linear)
            and _supported_base(module.get_base_layer()))


def _adapted(module: nn.Module) -> bool:
    if is_vera(module):
        return ADAPTER in module.vera_lambda_b and _supported_base(module.get_base_layer())
    return _is_lora(module)


def factor_A(layer: nn.Module) -> torch.Tensor:
    """(r, k) A of the layer's update dW = s B A (VeRA: the shared vera_A sliced to k columns)."""
    if is_vera(layer):
        return layer.vera_A[ADAPTER][:, : layer.in_features]
    return layer.lora_A[ADAPTER].weight


def factor_B(layer: nn.Module) -> torch.Tensor:
    """(d, r) B of the layer's update (VeRA: diag(lambda_b) vera_B[:d] diag(lambda_d), differentiable)."""
    if is_vera(layer):
        b = layer.vera_B[ADAPTER][: layer.out_features, :]
        return layer.vera_lambda_b[ADAPTER][:, None] * b * layer.vera_lambda_d[ADAPTER][None, :]
    return layer.lora_B[ADAPTER].weight


def layer_scaling(layer: nn.Module) -> float:
    """s of dW = s B A: alpha / r for LoRA, 1 for VeRA (its scale lives in the lambda vectors)."""
    return 1.0 if is_vera(layer) else float(layer.scaling[ADAPTER])


def layer_dropout(layer: nn.Module) -> nn.Module:
    return layer.vera_dropout[ADAPTER] if is_vera(layer) else layer.lora_dropout[ADAPTER]


def check_supported(model: nn.Module) -> None:
    """Raise ValueError naming the module and its type for any adapter StructLoRA cannot act on."""
    peft_config = getattr(model, "peft_config", None)
    if isinstance(peft_config, dict) and ADAPTER in peft_config:
        ptype = str(getattr(peft_config[ADAPTER], "peft_type", ""))
        if ptype.split(".")[-1] not in ("LORA", "VERA"):
            raise ValueError(f"StructLoRA supports peft LoRA (incl. QLoRA, LoRA-FA) and VeRA adapters; this "
                             f"model's adapter is {ptype.split('.')[-1]} ({type(peft_config[ADAPTER]).__name__})")
    for name, module in model.named_modules():
        if type(module).__name__ == "BottleneckAdapter" or hasattr(module, "bottleneck_adapters"):
            raise ValueError(f"{name or 'model'}: {type(module).__name__} (bottleneck adapter / AdapterFusion) "
                             "is not supported by StructLoRA: it gates and coordinates low-rank LoRA/VeRA updates only")
        if not isinstance(module, BaseTunerLayer):
            continue
        if isinstance(module, LoraLayer) and ADAPTER in getattr(module, "lora_A", {}):
            if module.use_dora.get(ADAPTER, False) or ADAPTER in getattr(module, "lora_variant", {}):
                variant = type(getattr(module, "lora_variant", {}).get(ADAPTER, None)).__name__
                raise ValueError(f"{name}: LoRA variants (DoRA, ...; here {variant}) are not supported by StructLoRA")
        if not _adapted(module):
            raise ValueError(f"{name}: {type(module).__module__}.{type(module).__name__} over "
                             f"{type(module.get_base_layer()).__name__} is not supported by StructLoRA (supported: "
                             "peft LoRA / VeRA layers over nn.Linear, Conv1D or bitsandbytes Linear4bit)")


def name_pattern(name: str) -> str:
    """``a.3.b.0.c`` -> ``a.*.b.*.c``: the module name with every numeric path component as ``*``."""
    return _NUMBER.sub("*", "." + name + ".")[1:-1]


def group_lora_layers(model: nn.Module) -> dict[str, list[tuple[str, nn.Module]]]:
    """Group the supported adapted layers (see the module docstring) into families, in the model's module order.

    Key: the name pattern (`name_pattern`); when layers of one pattern have different factor shapes
    (Swin's stages, ``rank_pattern``), each shape is its own family, keyed ``pattern[i]`` in order of
    first appearance. A module with no numeric path component is a family of its own (one node).
    """
    families: dict[tuple[str, tuple], list[tuple[str, nn.Module]]] = {}
    for name, module in model.named_modules():
        if _adapted(module):
            shape = (tuple(factor_A(module).shape), tuple(factor_B(module).shape))
            families.setdefault((name_pattern(name), shape), []).append((name, module))
    shapes: dict[str, list[tuple]] = {}
    for pattern, shape in families:
        shapes.setdefault(pattern, []).append(shape)
    return {(p if len(shapes[p]) == 1 else f"{p}[{shapes[p].index(sh)}]"): members
            for (p, sh), members in families.items()}


def family_links(model: nn.Module, names: list[str]) -> list[bool]:
    """(L - 1) flags: member l and l + 1 of a family are depth neighbours, i.e. no other module with the
    same name pattern lies between them in the model's module order (see the module docstring)."""
    pattern = name_pattern(names[0])
    order = {n: i for i, n in enumerate(n for n, _ in model.named_modules() if name_pattern(n) == pattern)}
    return [order[b] == order[a] + 1 for a, b in zip(names, names[1:])]
