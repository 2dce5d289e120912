"""LoRA-Dropout: dropout on the LoRA parameters as a sparsity regulariser.

Lin, Ma, Chu, Li, Zhang, Chen (2024), "LoRA Dropout as a Sparsity Regularizer for Overfitting Control".

Unlike peft's ``lora_dropout`` (dropout on the *input* activations of the adapter), LoRA-Dropout drops
*parameters*: Bernoulli masks zero whole columns of ``A`` (its input features) and whole rows of ``B``
(its output features)::

    A' = A diag(m_in),   B' = diag(m_out) B,   m_in ~ Bern(1-p)^k / (1-p),  m_out ~ Bern(1-p)^d / (1-p)
    y  = W0 x + s B' A' x = W0 x + s * m_out * (B (A (m_in * x)))

The masks are the inverted-dropout kind (kept entries scaled by ``1/(1-p)``) so that the update has the same
expectation as plain LoRA, which is what is used at evaluation time (masks off). They are sampled per module
and resampled by :meth:`LoRADropoutController.on_step` after every optimizer step (one mask per step, shared
by the micro-batches of gradient accumulation), from a generator of the controller's own. The default rate
``p = 0.1`` is the smallest rate in the paper's sweep; the paper's optional test-time ensemble is not used.

Implementation: a forward pre-hook on ``lora_A`` masks its input, a forward hook on ``lora_B`` masks its
output; peft's merge / save see the unmasked weights.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["LoRADropoutController", "apply_lora_dropout"]


def _lora_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in getattr(module, "lora_A", {})
    ]


class LoRADropoutController:
    """Holds and resamples the parameter-dropout masks of every LoRA module of ``model``.

    Args:
        model: a peft LoRA model.
        p: drop probability of each column of ``A`` and each row of ``B`` (default 0.1).
        adapter_name: the peft adapter to control.
        seed: seed of the controller's own mask generator.
    """

    def __init__(self, model: nn.Module, p: float = 0.1, adapter_name: str = "default", seed: int = 0) -> None:
        if not 0.0 <= p < 1.0:
            raise ValueError(f"LoRA-Dropout rate p must be in [0, 1), got {p}")
        self.layers = _lora_layers(model, adapter_name)
        if not self.layers:
            raise ValueError("LoRA-Dropout needs a peft LoRA model: no LoRA layer with adapter "
                             f"{adapter_name!r} was found")
        self.p = p
        self.adapter_name = adapter_name
        self.generator = torch.Generator().manual_seed(seed)
        self.in_masks: dict[str, torch.Tensor] = {}
        self.out_masks: dict[str, torch.Tensor] = {}
        self._handles = []
        for name, layer in self.layers:
            lora_a, lora_b = layer.lora_A[adapter_name], layer.lora_B[adapter_name]
            self._handles.append(lora_a.register_forward_pre_hook(self._make_in_hook(name)))
            self._handles.append(lora_b.register_forward_hook(self._make_out_hook(name)))
        self.resample()

    def _mask(self, n: int) -> torch.Tensor:
        keep = torch.rand(n, generator=self.generator) >= self.p
        return keep.float() / (1.0 - self.p)

    def resample(self) -> None:
        """Draw fresh masks for every module."""
        for name, layer in self.layers:
            self.in_masks[name] = self._mask(layer.lora_A[self.adapter_name].in_features)
            self.out_masks[name] = self._mask(layer.lora_B[self.adapter_name].out_features)

    def on_step(self, global_step: int, total_steps: int) -> None:
        """Called after every optimizer step: new masks for the next step."""
        self.resample()

    def state_dict(self) -> dict[str, Any]:
        """The mask generator's state and the current masks, so a resumed run draws the same masks."""
        return {"generator": self.generator.get_state(),
                "in_masks": {k: v.clone() for k, v in self.in_masks.items()},
                "out_masks": {k: v.clone() for k, v in self.out_masks.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        if set(state["in_masks"]) != set(self.in_masks):
            raise ValueError("LoRA-Dropout state is for other modules: "
                             f"{sorted(state['in_masks'])[:3]} vs {sorted(self.in_masks)[:3]}")
        self.generator.set_state(state["generator"])
        self.in_masks = {k: v.clone() for k, v in state["in_masks"].items()}
        self.out_masks = {k: v.clone() for k, v in state["out_masks"].items()}

    def _make_in_hook(self, name: str):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            if not module.training or self.p == 0.0:
                return None
            x = args[0]
            mask = self.in_masks[name].to(device=x.device, dtype=x.dtype)
            return (x * mask, *args[1:])

        return hook

    def _make_out_hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
            if not module.training or self.p == 0.0:
                return None
            return output * self.out_masks[name].to(device=output.device, dtype=output.dtype)

        return hook

    def remove(self) -> None:
        """Remove the hooks: the model becomes plain LoRA again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def apply_lora_dropout(model: nn.Module, p: float = 0.1, adapter_name: str = "default",
                       seed: int = 0) -> LoRADropoutController:
    """Add LoRA-Dropout (parameter dropout, see module doc) to a peft LoRA ``model`` in place."""
    return LoRADropoutController(model, p=p, adapter_name=adapter_name, seed=seed)
