"""DyLoRA: nested-rank ("search-free") LoRA training on top of a peft LoRA model.

Valipour, Rezagholizadeh, Kobyzev, Ghodsi (2023), "DyLoRA: Parameter-Efficient Tuning of Pre-trained
Models using Dynamic Search-Free Low-Rank Adaptation", EACL 2023.

At every training step a rank ``b ~ U{1..r}`` is sampled and every LoRA module uses only the first ``b``
rows of ``A`` and the first ``b`` columns of ``B``, with scale ``alpha / b`` instead of ``alpha / r``::

    y = W0 x + (alpha / b) * B[:, :b] A[:b, :] x

so that every truncation of the trained adapter is itself a usable rank-``b`` adapter (nested ordering of
the rank-1 components). In evaluation mode the full rank ``r`` is used (scale ``alpha / r``), which is also
what peft's merge / save see, so ``merge_and_unload`` and ``save_pretrained`` work unchanged.

Implementation: a forward hook on each ``lora_A`` sub-module multiplies the rank-``r`` intermediate
``A x`` by ``mask_b * r / b`` (``mask_b`` keeps the first ``b`` entries). Multiplying the intermediate is
exactly the truncated product above, and the dropped rows/columns receive zero gradient. We train in the
paper's default ("non-frozen") mode: all of the first ``b`` components are updated, not only the b-th.
The rank is resampled by :meth:`DyLoRAController.on_step` after each optimizer step with a generator of
its own, so the sampled sequence is reproducible and independent of the global torch RNG.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["DyLoRAController", "apply_dylora"]


def _lora_layers(model: nn.Module, adapter_name: str) -> list[tuple[str, nn.Module]]:
    from peft.tuners.lora import LoraLayer

    return [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in getattr(module, "lora_A", {})
    ]


class DyLoRAController:
    """Samples the active rank ``b`` and truncates every LoRA module of ``model`` to it during training.

    Args:
        model: a peft model with LoRA adapters (all of the same rank ``r``).
        adapter_name: the peft adapter to control.
        seed: seed of the controller's own rank-sampling generator.
        min_rank: smallest rank sampled (DyLoRA's ``b_min``, default 1).
    """

    def __init__(self, model: nn.Module, adapter_name: str = "default", seed: int = 0, min_rank: int = 1) -> None:
        self.layers = _lora_layers(model, adapter_name)
        if not self.layers:
            raise ValueError("DyLoRA needs a peft LoRA model: no LoRA layer with adapter "
                             f"{adapter_name!r} was found")
        ranks = {layer.r[adapter_name] for _, layer in self.layers}
        if len(ranks) != 1:
            raise ValueError(f"DyLoRA needs one rank for every module, found ranks {sorted(ranks)}")
        self.max_rank: int = ranks.pop()
        if not 1 <= min_rank <= self.max_rank:
            raise ValueError(f"min_rank must be in [1, {self.max_rank}], got {min_rank}")
        self.min_rank = min_rank
        self.adapter_name = adapter_name
        self.generator = torch.Generator().manual_seed(seed)
        self.history: list[int] = []
        self.current_rank: int = self.max_rank
        self._handles = [
            layer.lora_A[adapter_name].register_forward_hook(self._hook) for _, layer in self.layers
        ]
        self.sample()

    def sample(self) -> int:
        """Draw a new training rank ``b ~ U{min_rank..r}`` and return it."""
        b = int(torch.randint(self.min_rank, self.max_rank + 1, (1,), generator=self.generator))
        self.current_rank = b
        self.history.append(b)
        return b

    def on_step(self, global_step: int, total_steps: int) -> None:
        """Called after every optimizer step: resample the rank for the next step."""
        self.sample()

    def state_dict(self) -> dict[str, Any]:
        """The sampler's state (generator, current rank, history), so a resumed run draws the same ranks."""
        return {"generator": self.generator.get_state(), "current_rank": self.current_rank,
                "history": list(self.history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned."""
        self.generator.set_state(state["generator"])
        self.current_rank = int(state["current_rank"])
        self.history = list(state["history"])

    def effective_rank(self, module: nn.Module) -> int:
        """The rank a LoRA sub-module uses now: ``current_rank`` in training, the full rank in eval."""
        return self.current_rank if module.training else self.max_rank

    def _hook(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        b = self.effective_rank(module)
        if b >= self.max_rank:
            return None
        mask = torch.zeros(self.max_rank, dtype=output.dtype, device=output.device)
        mask[:b] = self.max_rank / b  # keep the first b components, rescale alpha/r -> alpha/b
        return output * mask

    def remove(self) -> None:
        """Remove the hooks: the model becomes plain LoRA again."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def apply_dylora(model: nn.Module, adapter_name: str = "default", seed: int = 0,
                 min_rank: int = 1) -> DyLoRAController:
    """Turn a peft LoRA ``model`` into a DyLoRA model in place; returns the controller (see module doc)."""
    return DyLoRAController(model, adapter_name=adapter_name, seed=seed, min_rank=min_rank)
