"""``RunSpec``: everything that defines one run, and its key (the record's file name).

``RunSpec.key()`` is ``<task>-<model>-<method>-r<rank>-s<seed>-<sha256[:12] of the fields>``; a field
added after records were written is left out of the hash while it holds its default (``protocol`` 1,
``precision`` "fp32", ``gradient_checkpointing`` False), so every committed record keeps its key.
"""
from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, fields
from typing import Any

from . import engine

__all__ = ["RunSpec", "PRECISIONS", "KEY_DEFAULTS"]

PRECISIONS = tuple(engine.AUTOCAST_DTYPES)
"""``RunSpec.precision``: fp32 (no autocast), or the autocast dtype of the forward and backward passes."""
KEY_DEFAULTS: dict[str, Any] = {"precision": "fp32", "gradient_checkpointing": False}
"""Fields added after records were written: left out of the key and the record's spec at these values."""


def _freeze(value: Any) -> Any:
    """Lists -> tuples, recursively (hashable, and JSON-stable: a tuple serialises as the list it was)."""
    if isinstance(value, (list, tuple)):
        return tuple(_freeze(v) for v in value)
    if isinstance(value, dict):
        raise TypeError("method_kwargs values must be scalars or (nested) lists, not dicts: a dict would not "
                        "round-trip through the JSON record; pass its entries as separate keywords")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_finite_kwarg(name: str, value: Any) -> None:
    """A NaN/inf method keyword would train nonsense and never equal itself (a key that cannot match)."""
    if isinstance(value, tuple):
        for v in value:
            _check_finite_kwarg(name, v)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"RunSpec.method_kwargs[{name!r}] must be finite, got {value!r}")


def _thaw(value: Any) -> Any:
    return [_thaw(v) for v in value] if isinstance(value, tuple) else value


@dataclass(frozen=True)
class RunSpec:
    """Everything that defines one run; ``key()`` hashes all of it (the record's file name).

    ``method_kwargs`` holds sorted ``(name, value)`` pairs passed to ``build_method`` (build with
    ``RunSpec.make(..., **method_kwargs)``). ``grad_accum`` splits each batch into micro-batches
    (same effective batch). ``max_eval_examples`` evaluates validation and test on a fixed subset.
    ``protocol`` names the training protocol the record was made under, so records of an earlier
    protocol are never read back as results of the current one: 1 = the runs of 2026-11-23 (BERT
    pooler head, zero-start coordinator gains); 2 = mean-pooling head for sentence-embedding
    checkpoints, the smoothing coordinator, gates with warm-up and Lagrangian keep ratio (issue 11/13).
    ``precision`` ("fp32", or "bf16": autocast) and ``gradient_checkpointing`` say how the engine trains
    (autocast, and ``model.gradient_checkpointing_enable()`` where the model has it); at their defaults
    they are not hashed (`KEY_DEFAULTS`).
    """

    task: str
    model: str
    method: str
    rank: int = 8
    seed: int = 0
    fraction: float = 1.0
    max_steps: int = 200
    lr: float = 5e-4
    batch_size: int = 32
    max_length: int = 64
    eval_every: int = 50
    method_kwargs: tuple[tuple[str, Any], ...] = ()
    max_eval_examples: int | None = None
    grad_accum: int = 1
    protocol: int = 2
    precision: str = "fp32"
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        for name in ("task", "model", "method"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise ValueError(f"RunSpec.{name} must be a non-empty string, got {getattr(self, name)!r}")
        for name, minimum in (("rank", 1), ("max_steps", 1), ("batch_size", 1), ("max_length", 1),
                              ("grad_accum", 1), ("seed", 0), ("eval_every", 0), ("protocol", 1)):
            value = getattr(self, name)
            if not _is_int(value) or value < minimum:
                raise ValueError(f"RunSpec.{name} must be an int >= {minimum}, got {value!r}")
        if self.max_eval_examples is not None and (not _is_int(self.max_eval_examples) or self.max_eval_examples < 1):
            raise ValueError(f"RunSpec.max_eval_examples must be None or an int >= 1, got {self.max_eval_examples!r}")
        for name in ("fraction", "lr"):  # 1 and 1.0 must give the same key
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"RunSpec.{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if not 0 < self.fraction <= 1:
            raise ValueError(f"RunSpec.fraction must be in (0, 1], got {self.fraction!r}")
        if self.lr <= 0:
            raise ValueError(f"RunSpec.lr must be > 0, got {self.lr!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"RunSpec.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(f"RunSpec.gradient_checkpointing must be a bool, got {self.gradient_checkpointing!r}")
        pairs = tuple(sorted((str(k), _freeze(v)) for k, v in dict(self.method_kwargs).items()))
        for k, v in pairs:
            _check_finite_kwarg(k, v)
        object.__setattr__(self, "method_kwargs", pairs)

    @classmethod
    def make(cls, task: str, model: str, method: str, **kwargs: Any) -> "RunSpec":
        """``RunSpec`` from field values; any keyword that is not a field goes to ``method_kwargs``."""
        names = {f.name for f in fields(cls)} - {"method_kwargs"}
        spec_kw = {k: v for k, v in kwargs.items() if k in names}
        method_kw = {k: v for k, v in kwargs.items() if k not in names}
        method_kw.update(dict(kwargs.get("method_kwargs", ())))
        method_kw.pop("method_kwargs", None)
        return cls(task=task, model=model, method=method, method_kwargs=tuple(method_kw.items()), **spec_kw)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "RunSpec":
        """Inverse of ``dataclasses.asdict`` (after a JSON round trip); unknown fields are an error."""
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown RunSpec fields {sorted(unknown)}")
        d = dict(d)
        d.setdefault("protocol", 1)   # records written before the field existed
        d["method_kwargs"] = tuple((k, v) for k, v in d.get("method_kwargs", ()))
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (tuples become lists); the `KEY_DEFAULTS` fields only when not at their default."""
        return json.loads(json.dumps(self._keyed_fields(keep_protocol=True), sort_keys=True, default=str))

    def _keyed_fields(self, keep_protocol: bool) -> dict[str, Any]:
        out = asdict(self)
        for name, default in KEY_DEFAULTS.items():
            if out[name] == default and type(out[name]) is type(default):
                del out[name]
        if not keep_protocol and out["protocol"] == 1:   # protocol-1 records were keyed before the field existed
            del out["protocol"]
        return out

    def method_kwargs_dict(self) -> dict[str, Any]:
        """``method_kwargs`` as a dict (tuples back to lists) for ``build_method``."""
        return {k: _thaw(v) for k, v in self.method_kwargs}

    def key(self) -> str:
        """``<task>-<model>-<method>-r<rank>-s<seed>-<sha256[:12] of all fields>`` (file-name safe, stable)."""
        fields_ = self._keyed_fields(keep_protocol=False)
        digest = hashlib.sha256(json.dumps(fields_, sort_keys=True, default=str).encode()).hexdigest()[:12]
        readable = f"{self.task}-{self.model}-{self.method}-r{self.rank}-s{self.seed}"
        return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', readable)[:80]}-{digest}"

    def train_config(self) -> engine.TrainConfig:
        """The engine configuration of this run (the paper's protocol for everything not in the spec)."""
        return engine.TrainConfig(lr=self.lr, batch_size=self.batch_size, max_steps=self.max_steps,
                                  eval_every=self.eval_every, seed=self.seed, grad_accum=self.grad_accum,
                                  max_eval_examples=self.max_eval_examples, precision=self.precision,
                                  gradient_checkpointing=self.gradient_checkpointing)

