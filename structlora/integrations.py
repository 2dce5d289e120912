"""`transformers.Trainer` integration: the StructLoRA loss terms, optimizer groups and checkpoints.

    trainer = StructLoraTrainer(model=get_structlora_model(base, cfg), args=..., train_dataset=...)

`compute_loss` adds ``model.structlora_loss()`` (Eq. 8) to the task loss in training, scaled like the task
loss under gradient accumulation (so lambda_IB is a price per optimizer step); `create_optimizer` uses
``model.structlora_param_groups`` (gate logits and coordinator parameters get their own learning rate, no decay) and
attaches the optimizer (`StructLoraModel.attach_optimizer`), so every StructLoRA schedule counts optimizer
steps, not micro-batches. ``activation_checkpointing=True`` (``gradient_checkpointing=True`` before transformers 5) and bf16/fp16 work as for a peft model. Label names, ``can_return_loss`` and the dataset columns come from the wrapped transformers
model (as for a peft model), so `evaluate()` reports ``eval_loss`` and ``compute_metrics``.
``save_model`` and every checkpoint write `StructLoraModel.save_training_state` (the raw peft adapter
plus the StructLoRA state), which ``train(resume_from_checkpoint=...)``, ``load_best_model_at_end`` and
`StructLoraModel.from_pretrained` read back. For deployment, ``model.save_pretrained(dir)`` writes the
folded export. A plain PyTorch loop needs only ``loss = out.loss + model.structlora_loss()``, plus
``model.attach_optimizer(opt)`` once when it accumulates gradients.
"""
from __future__ import annotations

import inspect
import os
from typing import Any, Optional

import torch
from transformers import Trainer
from transformers.utils import can_return_loss, find_labels

from .model import StructLoraModel

__all__ = ["StructLoraTrainer", "unwrap_structlora"]

TRAINING_ARGS_NAME = "training_args.bin"  # what Trainer._save writes next to the model


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

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.model is not None:
            # Trainer inspects type(model).forward, ours is (*args, **kwargs): inspect the base model instead.
            base = unwrap_structlora(self.model).peft_model.get_base_model()
            if self.args.label_names is None:
                self.label_names = find_labels(type(base))
            self.can_return_loss = can_return_loss(type(base))
            self.model_accepts_loss_kwargs = getattr(base, "accepts_loss_kwargs", any(
                p.kind == inspect.Parameter.VAR_KEYWORD for p in inspect.signature(base.forward).parameters.values()))

    def compute_loss(self, model: torch.nn.Module, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        if model.training:
            extra = unwrap_structlora(model).structlora_loss()
            if self._loss_scaled_for_accumulation(kwargs.get("num_items_in_batch")):
                # the Trainer will not divide this loss by the accumulation steps (the task loss is already a
                # share of the whole optimizer step): the StructLoRA terms must be divided here, once per micro-batch
                extra = extra / self.current_gradient_accumulation_steps
            loss = loss + extra
        return (loss, outputs) if return_outputs else loss

    def _loss_scaled_for_accumulation(self, num_items_in_batch: Any) -> bool:
        """The rule of ``Trainer.training_step``: True when it does not divide the loss by the accumulation steps."""
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return bool(self.loss_is_scaled_for_ga)
        return bool((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                    or self.compute_loss_func is not None)

    def _set_signature_columns_if_needed(self) -> None:
        # Trainer drops dataset columns the model's forward does not name; ours takes **kwargs, so
        # inspect the wrapped transformers model instead.
        if self._signature_columns is None:
            base = unwrap_structlora(self.model).peft_model.get_base_model()
            self._signature_columns = list(inspect.signature(base.forward).parameters) + sorted(
                {"label", "label_ids", *self.label_names})

    def create_optimizer(self, *args: Any, **kwargs: Any):
        sm = unwrap_structlora(self.model)
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW(
                sm.structlora_param_groups(self.args.learning_rate, self.args.weight_decay),
                betas=(self.args.adam_beta1, self.args.adam_beta2), eps=self.args.adam_epsilon)
        sm.attach_optimizer(self.optimizer)   # steps = optimizer steps (gradient accumulation)
        return self.optimizer

    # ---- checkpoints: the resumable StructLoRA training state instead of a full model.safetensors ----
    def _save(self, output_dir: Optional[str] = None, state_dict: Optional[dict] = None) -> None:
        """`StructLoraModel.save_training_state` (+ processing class, training args) instead of a full
        ``model.safetensors``. ``state_dict`` (FSDP / DeepSpeed gathers) is not used: the model's own
        tensors are written, so sharded-parameter setups are not supported here."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        unwrap_structlora(self.model).save_training_state(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Optional[torch.nn.Module] = None) -> None:
        """Restore a checkpoint written by `_save` into the model, in place (for ``resume_from_checkpoint``)."""
        unwrap_structlora(model if model is not None else self.model).load_training_state(resume_from_checkpoint)

    def _load_best_model(self) -> None:
        """``load_best_model_at_end``: restore the best checkpoint's training state in place."""
        unwrap_structlora(self.model).load_training_state(self.state.best_model_checkpoint)
