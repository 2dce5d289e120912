"""Several processes: the process group (`ProcessGroup`: rank, world size, device and the collectives
the loop needs, no-ops in one process), gradient averaging with one all-reduce (`GradSync`) and placing
the model on the process's device (`move_to`)."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["ProcessGroup", "GradSync", "move_to"]


class ProcessGroup:
    """Rank, world size and the few collectives the loop needs (no-ops in a single process)."""

    def __init__(self) -> None:
        from accelerate import Accelerator

        # cpu=True is what makes accelerate set up gloo for a CPU-only torchrun/accelerate launch.
        self.accelerator = Accelerator(cpu=not torch.cuda.is_available())
        self.device: torch.device = self.accelerator.device
        self.world: int = self.accelerator.num_processes
        self.rank: int = self.accelerator.process_index
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            self.world, self.rank = torch.distributed.get_world_size(), torch.distributed.get_rank()
        self.is_main: bool = self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1 and torch.distributed.is_available() and torch.distributed.is_initialized()

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def mean_(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            torch.distributed.all_reduce(t)
            t /= self.world
        return t

    def broadcast_(self, t: torch.Tensor) -> None:
        if self.active:
            torch.distributed.broadcast(t, src=0)

    def gather_objects(self, obj: Any) -> list[Any]:
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        if not self.active:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]


class GradSync:
    """Average the trainable gradients over processes with one all-reduce (DDP's arithmetic).

    A parameter without a gradient on every rank keeps ``grad=None`` (so AdamW skips it, as it would in
    a single process); if some ranks have one, the missing ones count as zeros.
    """

    def __init__(self, params: list[nn.Parameter], dist: ProcessGroup) -> None:
        self.params, self.dist = params, dist

    def __call__(self) -> None:
        if not self.dist.active:
            return
        ref = self.params[0]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).to(ref.dtype)
                          for p in self.params] +
                         [torch.tensor([float(p.grad is not None) for p in self.params],
                                       dtype=ref.dtype, device=ref.device)])
        self.dist.mean_(flat)
        offset = 0
        present = flat[-len(self.params):]
        for k, p in enumerate(self.params):
            n = p.numel()
            if present[k] > 0:
                g = flat[offset:offset + n].view_as(p).to(p.dtype)
                if p.grad is None:
                    p.grad = g.clone()
                else:
                    p.grad.copy_(g)
            offset += n


def move_to(model: nn.Module, device: torch.device) -> None:
    """``model.to(device)`` unless every parameter is already there (quantized models refuse ``.to``)."""
    def here(t: torch.Tensor) -> bool:
        return t.device.type == device.type and (device.index is None or t.device.index in (None, device.index)
                                                 or device.type == "cpu")
    if not all(here(p) for p in model.parameters()):
        model.to(device)
