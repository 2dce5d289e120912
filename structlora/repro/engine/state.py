"""What a run's state is made of beyond the optimizer: the trainable tensors (`trainable_state`), the
RNG states, a method controller that can save itself, and StructLoRA's similarity-capture state."""
from __future__ import annotations

import random
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn

__all__ = ["trainable_state", "load_trainable_state", "rng_state", "set_rng_state", "seed_everything",
           "resumable_controller", "capture_state", "set_capture_state"]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """CPU copies of the trainable parameters and of ALL buffers (gate masks, norm statistics, ...)."""
    state = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
    state.update({f"buffer:{n}": b.detach().to("cpu", copy=True)
                  for n, b in model.named_buffers() if b is not None})
    return state


@torch.no_grad()
def load_trainable_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy a ``trainable_state`` back into ``model`` in place (unknown names are an error)."""
    params = dict(model.named_parameters())
    buffers = {n: b for n, b in model.named_buffers() if b is not None}
    for name, value in state.items():
        if name.startswith("buffer:"):
            target = buffers.get(name[len("buffer:"):])
        else:
            target = params.get(name)
        if target is None:
            raise KeyError(f"checkpointed tensor {name!r} does not exist in the model")
        target.copy_(value.to(target.device, target.dtype))


def rng_state() -> dict[str, Any]:
    """The python, numpy, torch (and CUDA) RNG states of this process."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (every CUDA device too)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def resumable_controller(handle: Any) -> Any:
    """``handle.controller`` when it can save and restore its state (``state_dict``/``load_state_dict``)."""
    ctl = getattr(handle, "controller", None)
    if (ctl is not None and callable(getattr(ctl, "state_dict", None))
            and callable(getattr(ctl, "load_state_dict", None))):
        return ctl
    return None


_CAPTURE_FIELDS = ("capturing", "captured", "sketches")


def _family_owners(model: nn.Module) -> list[tuple[str, Any]]:
    """The (name, module) pairs of ``model`` that carry a ``families`` list (StructLoRA models)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(getattr(m, "families", None), list)]


def capture_state(model: nn.Module) -> dict[str, list[dict[str, Any]]] | None:
    """The similarity-capture fields of every family (CPU copies), or None when the model has none."""
    owners = _family_owners(model)
    if not owners:
        return None
    out: dict[str, list[dict[str, Any]]] = {}
    for name, owner in owners:
        out[name] = []
        for fam in owner.families:
            entry = {}
            for f in _CAPTURE_FIELDS:
                value = getattr(fam, f, None)
                entry[f] = value.detach().to("cpu", copy=True) if isinstance(value, torch.Tensor) else value
            out[name].append(entry)
    return out


def set_capture_state(model: nn.Module, state: Mapping[str, Sequence[Mapping[str, Any]]] | None) -> None:
    """Restore what ``capture_state`` saved (tensors go back to the family's device)."""
    if not state:
        return
    owners = dict(_family_owners(model))
    for name, entries in state.items():
        owner = owners.get(name)
        if owner is None or len(owner.families) != len(entries):
            raise KeyError(f"checkpointed capture state of {name!r} does not match the model's families")
        for fam, entry in zip(owner.families, entries):
            for f in _CAPTURE_FIELDS:
                value = entry.get(f)
                if isinstance(value, torch.Tensor):
                    device = fam.A(0).device if callable(getattr(fam, "A", None)) else value.device
                    value = value.to(device)
                setattr(fam, f, value)
