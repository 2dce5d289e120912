"""Where structlora keeps converted models, pretrained ViTs and tokenised datasets."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir(*parts: str) -> Path:
    """Return ``$STRUCTLORA_CACHE`` (default ``~/.cache/structlora``) joined with ``parts``, created."""
    root = Path(os.environ.get("STRUCTLORA_CACHE", Path.home() / ".cache" / "structlora"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
