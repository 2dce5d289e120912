"""What StructLoRA accepts of peft: exactly one adapter whose LoRA fields agree with the StructLoraConfig
(`check_peft_config`), the config fields peft corrects while building its layers (`synced_config`), and
the peft APIs a StructLoraModel refuses (`REFUSED_PEFT_APIS`, `refused_api`)."""
from __future__ import annotations

import copy
from typing import Any, Callable

from peft import PeftModel

from .config import StructLoraConfig
from .layers import ADAPTER

__all__ = ["REFUSED_PEFT_APIS", "check_peft_config", "refused_api", "synced_config"]

# peft APIs that would act on the raw LoRA weights or on several adapters, bypassing the gates and the
# coordinator: refused, naming what to use instead. Every other public method of peft's PeftModel /
# LoraModel is exact for StructLoRA (tests/test_training_regimes.py walks them all): merge_adapter,
# unmerge_adapter and peft's merge_and_unload merge the gated, coordinated update (`get_delta_weight` of
# each layer is StructLoRA's), ``adapter_names=`` takes "default" / "__base__" rows, disable_adapter gives
# the base model.
REFUSED_PEFT_APIS: dict[str, str] = {
    "add_adapter": "StructLoRA trains one adapter ('default'): wrap another copy of the base model instead",
    "load_adapter": "load a training state with StructLoraModel.from_pretrained(base, dir) or a folded export with "
                    "peft.PeftModel.from_pretrained(base, dir)",
    "delete_adapter": "StructLoRA trains one adapter ('default'); use merge_and_unload() or unload() to drop it",
    "add_weighted_adapter": "combine folded exports (model.save_pretrained(dir)) in plain peft instead",
    "inject_adapter": "StructLoRA trains one adapter ('default'): wrap another copy of the base model instead",
    "subtract_mutated_init": "PiSSA/OLoRA conversion is not supported; export with model.save_pretrained(dir)",
    "push_to_hub": "write the folded export with model.save_pretrained(dir) and upload dir "
                   "(huggingface_hub.upload_folder); peft's push_to_hub would upload the raw, ungated factors",
}


def refused_api(name: str) -> Callable[..., Any]:
    """A stand-in for peft API ``name`` that raises NotImplementedError saying what to use instead."""
    def refused(*args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{name} is not supported on a StructLoraModel: {REFUSED_PEFT_APIS[name]}")
    refused.__name__ = name
    return refused


def check_peft_config(config: StructLoraConfig, peft_model: PeftModel) -> None:
    """Refuse a StructLoraConfig whose LoRA fields disagree with the peft model StructLoRA is put on (the
    layers are peft's: a different r or alpha in the config would be reported but not used), and a peft
    model with more than the one adapter StructLoRA runs."""
    names = list(peft_model.peft_config)
    if names != [ADAPTER]:
        raise ValueError(f"the peft model has adapters {names}; StructLoRA runs exactly one, named {ADAPTER!r}")
    peft_cfg = peft_model.peft_config[ADAPTER]
    fields = ("r",) if "VERA" in str(peft_cfg.peft_type) else ("r", "lora_alpha", "use_rslora")
    diff = {f: (getattr(config, f), getattr(peft_cfg, f)) for f in fields if getattr(config, f) != getattr(peft_cfg, f)}
    if diff:
        raise ValueError("the StructLoraConfig disagrees with the peft model it is put on: "
                         + ", ".join(f"{f}={c!r} (peft: {p!r})" for f, (c, p) in diff.items())
                         + "; build the StructLoraConfig with the peft model's values")


def synced_config(config: StructLoraConfig, peft_model: PeftModel) -> StructLoraConfig:
    """A copy of ``config`` with the fields peft corrects while building its layers (``fan_in_fan_out``:
    True on GPT-2's Conv1D, False on nn.Linear), so StructLoRA never acts on a stale value."""
    corrected = peft_model.peft_config[ADAPTER]
    if corrected.fan_in_fan_out == config.fan_in_fan_out:
        return config
    config = copy.deepcopy(config)
    config.fan_in_fan_out = corrected.fan_in_fan_out
    return config
