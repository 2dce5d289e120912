"""The resumable checkpoint of a run (``state.pt``): written atomically after every evaluation, read back
only by the same run (``run_id``) with the same configuration; anything else is discarded with a warning."""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from ..._io import atomic_write
from .config import TrainConfig, config_dict
from .distributed import ProcessGroup
from .state import rng_state, trainable_state

__all__ = ["CKPT_NAME", "load_checkpoint", "save_checkpoint"]

log = logging.getLogger(__name__)

CKPT_NAME = "state.pt"
_CKPT_FORMAT = 2  # 2: run_id, cumulative cost, similarity-capture state
# Fields that must agree between a checkpoint and the run resuming from it.
_RESUME_KEYS = ("lr", "batch_size", "max_steps", "eval_every", "warmup_ratio", "weight_decay", "seed",
                "grad_accum", "max_grad_norm", "betas")


def _check_resume(ck: Any, cfg: TrainConfig, world: int, run_id: str | None) -> str | None:
    """Why checkpoint ``ck`` cannot be resumed by this run (None when it can)."""
    if not isinstance(ck, dict):
        return f"not a checkpoint ({type(ck).__name__})"
    if ck.get("format") != _CKPT_FORMAT:
        return f"unknown checkpoint format {ck.get('format')!r} (expected {_CKPT_FORMAT})"
    if ck.get("run_id") != run_id:
        return f"written by another run ({ck.get('run_id')!r}, this run is {run_id!r})"
    mine, theirs = config_dict(cfg), ck.get("config", {})
    diff = {k: (theirs.get(k), mine[k]) for k in _RESUME_KEYS if theirs.get(k) != mine[k]}
    if diff:
        return f"written by a run with a different configuration (checkpoint vs now: {diff})"
    return None


def load_checkpoint(path: Path, cfg: TrainConfig, dist: ProcessGroup,
                    run_id: str | None) -> dict[str, Any] | None:
    """The checkpoint at ``path`` when this run can resume from it, else None.

    A checkpoint that cannot be read or belongs to another run/configuration is reported with a
    warning naming ``path`` and deleted (by the main process), so that the run restarts.
    """
    if not path.exists():
        return None
    try:
        ck = torch.load(path, map_location="cpu", weights_only=False)
        problem = _check_resume(ck, cfg, dist.world, run_id)
    except Exception as exc:  # truncated, garbage, pickled from another code version, ...
        ck, problem = None, f"unreadable ({type(exc).__name__}: {exc})"
    if problem is None:
        if ck.get("world_size", 1) != dist.world:
            log.warning("%s: written with %d process(es), resuming with %d (dropout RNG streams differ)",
                       path, ck.get("world_size", 1), dist.world)
        return ck
    warnings.warn(f"discarding checkpoint {path}: {problem}; the run starts afresh", stacklevel=3)
    dist.barrier()
    if dist.is_main:
        try:
            path.unlink()
        except OSError:
            pass
    dist.barrier()
    return None


def save_checkpoint(path: Path, dist: ProcessGroup, cfg: TrainConfig, step: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, history: list, best_state: Any,
                    best_step: int, best_val: dict, best_score: float | None, wall: float,
                    controller_state: Any = None, *, run_id: str | None = None,
                    cost: Mapping[str, Any] | None = None, capture: Any = None) -> None:
    """Write the resumable state with ``atomic_write`` (temporary file, fsync, ``os.replace``)."""
    rngs = dist.gather_objects(rng_state())
    if dist.is_main:
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "format": _CKPT_FORMAT, "run_id": run_id, "config": config_dict(cfg), "step": step,
            "world_size": dist.world, "model": trainable_state(model), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "rng": rngs, "history": history, "best_state": best_state,
            "best_step": best_step, "best_val": best_val, "best_score": best_score, "wall_time_s": wall,
            "controller": controller_state, "cost": dict(cost) if cost is not None else None,
            "capture": capture,
        }
        atomic_write(path, lambda f: torch.save(state, f))
    dist.barrier()
