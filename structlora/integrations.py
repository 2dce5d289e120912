"""`transformers.Trainer` integration: the StructLoRA loss terms and optimizer groups.

    trainer = StructLoraTrainer(model=get_structlora_model(base, cfg), args=..., train_dataset=...)

`compute_loss` adds ``model.structlora_loss()`` (Eq. 8) to the task loss; `create_optimizer` uses
``model.structlora_param_groups`` (gate logits and edge gains get their own learning rate, no decay).
A plain PyTorch loop needs only ``loss = out.loss + model.structlora_loss()``.
"""
from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import Trainer

from .model import StructLoraModel

__all__ = ["StructLoraTrainer", "unwrap_structlora"]


def unwrap_structlora(model: torch.nn.Module) -> StructLoraModel:
    """Find the StructLoraModel inside DDP / accelerate / compile wrappers."""
    seen = model
    for _ in range(4):
        if isinstance(seen, StructLoraModel):
            return seen
        seen = getattr(seen, "module", getattr(seen, "_orig_mod", seen))
    raise TypeError(f"expected a StructLoraModel (from get_structlora_model), got {type(model).__name__}")


class StructLoraTrainer(Trainer):
    """A `transformers.Trainer` that optimises L_task + lambda_IB L_IB (+ static penalty)."""

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        if model.training:
            loss = loss + unwrap_structlora(model).structlora_loss()
        return (loss, outputs) if return_outputs else loss

    def _set_signature_columns_if_needed(self) -> None:
        # Trainer drops dataset columns the model's forward does not name; ours takes **kwargs, so
        # inspect the wrapped transformers model instead.
        if self._signature_columns is None:
            base = unwrap_structlora(self.model).peft_model.get_base_model()
            self._signature_columns = list(inspect.signature(base.forward).parameters) + ["label", "label_ids", "labels"]

    def create_optimizer(self, *args: Any, **kwargs: Any):
        if self.optimizer is None:
            sm = unwrap_structlora(self.model)
            self.optimizer = torch.optim.AdamW(
                sm.structlora_param_groups(self.args.learning_rate, self.args.weight_decay),
                betas=(self.args.adam_beta1, self.args.adam_beta2), eps=self.args.adam_epsilon)
        return self.optimizer
