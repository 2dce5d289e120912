"""The configuration and the outcome of one training run: `TrainConfig` (validated hyper-parameters),
`TrainResult`, and `config_dict`, the configuration as records and checkpoints store it."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["AUTOCAST_DTYPES", "TrainConfig", "TrainResult", "config_dict"]


AUTOCAST_DTYPES: dict[str, torch.dtype | None] = {"fp32": None, "bf16": torch.bfloat16}
"""``TrainConfig.precision``: the dtype of the training forward's ``torch.autocast`` (fp32: none). bf16
only: fp16 autocast would need a gradient scaler."""
# fields added after records were written: left out of the stored configuration at their default
_NEW_DEFAULTS: dict[str, Any] = {"precision": "fp32", "gradient_checkpointing": False}


def _check_real(name: str, value: Any) -> None:
    """``value`` is a finite real number (not a bool), else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"TrainConfig.{name} must be a finite number, got {value!r}")


def _check_int(name: str, value: Any, minimum: int | None) -> None:
    """``value`` is an int (not a bool) >= ``minimum`` (when given), else ``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"TrainConfig.{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"TrainConfig.{name} must be >= {minimum}, got {value!r}")


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run.

    ``batch_size`` is the effective batch per optimizer step (over all processes and accumulation
    micro-batches). ``max_grad_norm`` (``None`` disables clipping) follows the HF Trainer default of 1.0;
    the paper does not state one. ``max_eval_examples`` evaluates validation AND test on the same fixed
    random subset (drawn with seed 0, independent of ``seed``, so that all methods and seeds of a grid
    are scored on identical examples).
    """

    lr: float = 5e-4
    batch_size: int = 32
    max_steps: int = 200
    eval_every: int = 50
    warmup_ratio: float = 0.06
    weight_decay: float = 0.01
    seed: int = 0
    grad_accum: int = 1
    eval_batch_size: int = 64
    max_eval_examples: int | None = None
    max_grad_norm: float | None = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    precision: str = "fp32"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        if self.precision not in AUTOCAST_DTYPES:
            raise ValueError(f"TrainConfig.precision must be one of {tuple(AUTOCAST_DTYPES)}, got {self.precision!r}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(f"TrainConfig.gradient_checkpointing must be a bool, got {self.gradient_checkpointing!r}")
        for name in ("lr", "warmup_ratio", "weight_decay"):
            _check_real(name, getattr(self, name))
        if self.lr <= 0:
            raise ValueError(f"TrainConfig.lr must be > 0, got {self.lr}")
        for name in ("batch_size", "max_steps", "grad_accum", "eval_batch_size"):
            _check_int(name, getattr(self, name), 1)
        _check_int("seed", self.seed, 0)
        _check_int("eval_every", self.eval_every, None)
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"TrainConfig.warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.weight_decay < 0:
            raise ValueError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_eval_examples is not None:
            _check_int("max_eval_examples", self.max_eval_examples, 1)
        if self.max_grad_norm is not None:
            _check_real("max_grad_norm", self.max_grad_norm)
            if self.max_grad_norm <= 0:
                raise ValueError(f"TrainConfig.max_grad_norm must be None or > 0, got {self.max_grad_norm}")
        if len(tuple(self.betas)) != 2:
            raise ValueError(f"TrainConfig.betas must be two numbers, got {self.betas!r}")
        for b in self.betas:
            _check_real("betas", b)
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]

    @property
    def warmup_steps(self) -> int:
        """Number of linear warm-up steps: ``ceil(warmup_ratio * max_steps)`` (as HF Trainer)."""
        return math.ceil(self.warmup_ratio * self.max_steps)


@dataclass
class TrainResult:
    """Outcome of ``train``. The model in ``handle.model`` holds the best-validation state afterwards.

    ``history`` has one dict per evaluation: ``step``, ``loss`` (mean training loss since the previous
    evaluation), ``lr`` and ``val_<metric>`` for every validation metric. ``wall_time_s`` is the whole
    run (summed over resumed sessions), ``steps_per_s`` the optimizer steps over their training time
    (evaluations excluded), both summed over all sessions of a resumed run (``train_steps``,
    ``train_time_s``, ``eval_time_s``); ``peak_mem_mb`` (described by ``peak_mem_kind``, see
    ``PeakMemory``) is the maximum over sessions. ``sessions`` counts the processes that worked on the
    run; ``cost_partial`` is True when some session's cost is unknown (a checkpoint without it).
    """

    best_step: int
    val_metrics: dict[str, float]
    test_metrics: dict[str, float]
    history: list[dict[str, float]]
    wall_time_s: float
    peak_mem_mb: float
    steps_per_s: float
    peak_mem_kind: str = ""
    train_time_s: float = 0.0
    eval_time_s: float = 0.0
    resumed_from: int | None = None
    train_steps: int = 0
    sessions: int = 1
    cost_partial: bool = False
    world_size: int = 1
    metric: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    regime: dict[str, Any] = field(default_factory=dict)   # what training used (`training_regime`)
    test_predictions_sha256: str | None = None   # the manipulation check: equal hashes = same predictions
    test_predictions: list[int] | None = None    # class index per test example, in test order (later analyses)


def config_dict(cfg: TrainConfig) -> dict[str, Any]:
    """``cfg`` as records and checkpoints store it (JSON types; later fields left out at their default)."""
    d = asdict(cfg)
    d["betas"] = list(d["betas"])
    for name, default in _NEW_DEFAULTS.items():   # records and checkpoints of earlier runs stay comparable
        if d[name] == default:
            del d[name]
    return d
