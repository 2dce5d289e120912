"""LoRAPrune: LoRA-gradient-guided structured pruning during LoRA fine-tuning.

Zhang, Chen, Shen, Yang, Ou, Yu, Zhuang (2023/2024), "LoRAPrune: Structured Pruning Meets Low-Rank
Parameter-Efficient Fine-Tuning", arXiv:2305.18403 (ACL 2024 Findings).

LoRAPrune estimates the first-order (Taylor) importance of the merged weight ``W = W0 + s B A`` without the
gradient of the large frozen ``W0``: the gradient of ``W`` is approximated from the LoRA factors' gradients
(the paper's Eq. with the learning rate folded to 1)::

    G_hat = dL/dB A + B dL/dA - dL/dB dL/dA                                   (d x k)
    I_ij  = (G_hat_ij * W_ij)^2,        I_group = sum_{(i,j) in group} I_ij

Groups here are the output channels (rows) of each adapted module. The group importance is smoothed with
a moving average ``I_bar <- lam I_bar + (1 - lam) I`` (``lam = 0.9``) and the channels are pruned
progressively: after optimizer step ``t`` each module has ``floor(s_t * d)`` channels pruned, with the cubic
schedule ``s_t = s_final (1 - (1 - t / T)^3)`` (Zhu & Gupta 2017) reaching ``s_final`` (default 0.2) at
``T = total_steps``; the channels with the lowest ``I_bar`` among those still alive are removed, and removed
channels stay removed.

Simplifications (documented): pruning is per adapted module (uniform sparsity over the q/v projections)
rather than over dependency groups (whole heads / FFN channels with their coupled layers), and the
pruned channels are masked (output zeroed) rather than sliced out of the network, so the model keeps its
shapes. After each pruning event the pruned rows of ``W0``, its bias and ``B`` are zeroed in place, so
``merge_and_unload`` yields the pruned model without the masking hooks.

``on_step`` reads the LoRA gradients from ``.grad`` (so, in data-parallel training, after the all-reduce:
every rank prunes the same channels); when the loop has already called ``optimizer.zero_grad()``, it falls
back to copies taken by ``post_accumulate_grad`` hooks during backward.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["LoRAPruneController", "apply_loraprune", "cubic_sparsity"]


def _lora_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in getattr(module, "lora_A", {})
    ]


def cubic_sparsity(step: int, total_steps: int, final_sparsity: float) -> float:
    """Cubic sparsity schedule ``s_f (1 - (1 - t/T)^3)``, clamped to ``[0, s_f]``."""
    frac = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return final_sparsity * (1.0 - (1.0 - frac) ** 3)


class LoRAPruneController:
    """Tracks LoRA-guided channel importance and prunes output channels of the adapted modules.

    Args:
        model: a peft LoRA model.
        total_steps: number of optimizer steps of the run (the schedule reaches ``sparsity`` there).
        sparsity: final fraction of output channels pruned in every adapted module (default 0.2).
        beta: moving-average coefficient of the importance (paper's lambda, default 0.9).
        adapter_name: the peft adapter to control.
    """

    def __init__(self, model: nn.Module, total_steps: int, sparsity: float = 0.2, beta: float = 0.9,
                 adapter_name: str = "default") -> None:
        if not 0.0 <= sparsity < 1.0:
            raise ValueError(f"LoRAPrune sparsity must be in [0, 1), got {sparsity}")
        if total_steps is None or total_steps <= 0:
            raise ValueError("LoRAPrune needs total_steps > 0 for its pruning schedule")
        self.layers = _lora_layers(model, adapter_name)
        if not self.layers:
            raise ValueError("LoRAPrune needs a peft LoRA model: no LoRA layer with adapter "
                             f"{adapter_name!r} was found")
        self.total_steps = int(total_steps)
        self.sparsity = float(sparsity)
        self.beta = float(beta)
        self.adapter_name = adapter_name
        self.importance: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self._grads: dict[tuple[str, str], torch.Tensor] = {}
        self._handles: list[Any] = []
        for name, layer in self.layers:
            out_features = layer.lora_B[adapter_name].out_features
            self.masks[name] = torch.ones(out_features, dtype=torch.bool)
            self._handles.append(layer.register_forward_hook(self._make_mask_hook(name)))
            for part in ("A", "B"):
                weight = getattr(layer, f"lora_{part}")[adapter_name].weight
                self._handles.append(weight.register_post_accumulate_grad_hook(self._make_grad_hook(name, part)))

    # hooks -----------------------------------------------------------------------------------------
    def _make_grad_hook(self, name: str, part: str):
        def hook(param: torch.Tensor) -> None:
            if param.grad is not None:
                self._grads[(name, part)] = param.grad.detach().clone()

        return hook

    def _make_mask_hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> torch.Tensor | None:
            mask = self.masks[name]
            if bool(mask.all()):
                return None
            return output * mask.to(device=output.device, dtype=output.dtype)

        return hook

    # importance --------------------------------------------------------------------------------------
    @torch.no_grad()
    def channel_importance(self, name: str, layer: nn.Module) -> torch.Tensor | None:
        """Per-output-channel LoRA-guided importance of one module from the last captured gradients."""
        weight_a = layer.lora_A[self.adapter_name].weight
        weight_b = layer.lora_B[self.adapter_name].weight
        # prefer the live .grad (after any distributed all-reduce); else the copy taken during backward
        grad_a = weight_a.grad if weight_a.grad is not None else self._grads.get((name, "A"))
        grad_b = weight_b.grad if weight_b.grad is not None else self._grads.get((name, "B"))
        if grad_a is None or grad_b is None:
            return None
        a, b = weight_a.float(), weight_b.float()
        grad_a, grad_b = grad_a.float(), grad_b.float()
        g_hat = grad_b @ a + b @ grad_a - grad_b @ grad_a
        base = layer.get_base_layer().weight
        if getattr(layer, "fan_in_fan_out", False):
            base = base.T
        merged = base.float() + layer.scaling[self.adapter_name] * (b @ a)
        return (g_hat * merged).pow(2).sum(dim=1).cpu()

    def update_importance(self) -> None:
        """Fold the last captured gradients into the moving-average importance."""
        for name, layer in self.layers:
            score = self.channel_importance(name, layer)
            if score is None:
                continue
            prev = self.importance.get(name)
            self.importance[name] = score if prev is None else self.beta * prev + (1 - self.beta) * score
        self._grads.clear()

    # pruning ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def prune_to(self, sparsity: float) -> None:
        """Prune each module's least important live channels until ``floor(sparsity * d)`` are pruned."""
        for name, layer in self.layers:
            mask = self.masks[name]
            target = int(math.floor(sparsity * mask.numel()))
            n_pruned = int((~mask).sum())
            if target > n_pruned:
                score = self.importance.get(name, torch.zeros(mask.numel())).clone()
                score[~mask] = float("inf")
                drop = torch.argsort(score)[: target - n_pruned]
                mask[drop] = False
            self._zero_pruned(name, layer)

    @torch.no_grad()
    def _zero_pruned(self, name: str, layer: nn.Module) -> None:
        rows = ~self.masks[name]
        if not bool(rows.any()):
            return
        base = layer.get_base_layer()
        weight = base.weight
        idx = rows.nonzero().flatten().to(weight.device)
        if getattr(layer, "fan_in_fan_out", False):
            weight.data[:, idx] = 0
        else:
            weight.data[idx] = 0
        if getattr(base, "bias", None) is not None:
            base.bias.data[idx] = 0
        lora_b = layer.lora_B[self.adapter_name].weight
        lora_b.data[idx.to(lora_b.device)] = 0

    def current_sparsity(self) -> float:
        """Fraction of pruned output channels over all adapted modules."""
        total = sum(m.numel() for m in self.masks.values())
        return float(sum(int((~m).sum()) for m in self.masks.values())) / max(total, 1)

    def on_step(self, global_step: int, total_steps: int) -> None:
        """After every optimizer step: update the importance and prune to the scheduled sparsity."""
        self.update_importance()
        self.prune_to(cubic_sparsity(global_step, total_steps or self.total_steps, self.sparsity))

    def state_dict(self) -> dict[str, Any]:
        """Importance averages and channel masks (the pruned rows of the frozen ``W0`` are not in the
        trainable state, so ``load_state_dict`` zeroes them again)."""
        return {"importance": {k: v.clone() for k, v in self.importance.items()},
                "masks": {k: v.clone() for k, v in self.masks.items()}}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned and re-apply the pruning to ``W0`` and ``B``."""
        if set(state["masks"]) != set(self.masks):
            raise ValueError("LoRAPrune state is for other modules: "
                             f"{sorted(state['masks'])[:3]} vs {sorted(self.masks)[:3]}")
        self.importance = {k: v.clone() for k, v in state["importance"].items()}
        self.masks = {k: v.clone().bool() for k, v in state["masks"].items()}
        for name, layer in self.layers:
            self._zero_pruned(name, layer)

    def remove(self) -> None:
        """Remove the hooks (pruned rows stay zero in ``W0`` and ``B``)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def apply_loraprune(model: nn.Module, total_steps: int, sparsity: float = 0.2, beta: float = 0.9,
                    adapter_name: str = "default") -> LoRAPruneController:
    """Add LoRAPrune's importance tracking and progressive channel pruning to a peft LoRA ``model``."""
    return LoRAPruneController(model, total_steps=total_steps, sparsity=sparsity, beta=beta,
                               adapter_name=adapter_name)
