"""The loaders a run goes through, in one injectable dict: ``LOADERS``.

``load_task``, ``load_model``, ``encode``, ``build_method``, ``list_methods``, ``update_diagnostics``,
``method_defaults`` and ``backbone_id`` are module-level functions that import the assets and methods
lazily, so that tests and notebooks can swap in toy ones (``monkeypatch.setitem(LOADERS, ...)``) and the
grid's worker processes and cluster jobs can receive the submitter's entries by pickling them.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["LOADERS", "method_skipped_types", "current_backbone", "current_defaults"]


def _load_task(name: str, fraction: float = 1.0, seed: int = 0) -> Any:
    from .assets.tasks import load_task

    return load_task(name, fraction, seed)


def _load_model(name: str, task: str | None = None, num_labels: int | None = None, seed: int = 0) -> Any:
    from .assets.models import load_model

    return load_model(name, task=task, num_labels=num_labels, seed=seed)


def _encode(task: Any, tokenizer: Any, max_length: int) -> Any:
    from .assets.tasks import encode

    return encode(task, tokenizer, max_length)


def _build_method(name: str, loaded: Any, rank: int = 8, seed: int = 0, total_steps: int | None = None,
                  **kwargs: Any) -> Any:
    from .methods import build_method

    return build_method(name, loaded, rank=rank, seed=seed, total_steps=total_steps, **kwargs)


def _list_methods() -> list[str]:
    from .methods import list_methods

    return list_methods()


def _method_defaults(name: str) -> dict[str, Any]:
    from .methods import method_defaults

    return method_defaults(name)


def _backbone_id(name: str) -> str | None:
    from .assets.models import backbone_id

    return backbone_id(name)


def _update_diagnostics(model: torch.nn.Module) -> dict[str, float]:
    from ..diagnostics import update_diagnostics

    return update_diagnostics(model)


LOADERS: dict[str, Callable[..., Any]] = {
    "load_task": _load_task,
    "load_model": _load_model,
    "encode": _encode,
    "build_method": _build_method,
    "list_methods": _list_methods,
    "update_diagnostics": _update_diagnostics,
    "method_defaults": _method_defaults,
    "backbone_id": _backbone_id,
}
"""Injectable loaders (monkeypatch entries in tests; module-level functions so worker processes can import them)."""



def method_skipped_types() -> tuple[type[BaseException], ...]:
    """The exception a method raises when it cannot run here (``methods.MethodSkipped``)."""
    try:
        from .methods import MethodSkipped
    except Exception:  # pragma: no cover - methods not importable: nothing can be skipped
        return ()
    return (MethodSkipped,)


def current_backbone(model: str) -> str | None:
    """What `assets.models.backbone_id` says ``model`` loads now (None when the loaders cannot say)."""
    fn = LOADERS.get("backbone_id")
    return fn(model) if fn is not None else None


def current_defaults(method: str) -> dict[str, Any] | None:
    """The registry's defaults for ``method`` (None when the loaders cannot say, e.g. toy loaders)."""
    fn = LOADERS.get("method_defaults")
    try:
        return fn(method) if fn is not None else None
    except ValueError:
        return None
