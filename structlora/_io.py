"""The project's one atomic-write helper: a file or a directory appears whole or not at all.

Everything structlora and its reproduction write (run records, checkpoints, claims, figures, executed
notebooks, converted models, tokenised datasets) goes through `atomic_write` or `atomic_dir`: the
content goes to a temporary sibling (``.<name>.<pid>.<random>.tmp``), is flushed and fsynced, and
is renamed over the final path with ``os.replace``, so a reader or a killed writer never sees a half
file. `clean_stale_tmp` removes the siblings that killed writers leave behind.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Union

__all__ = ["atomic_write", "atomic_write_json", "atomic_dir", "clean_stale_tmp"]

Content = Union[bytes, str, Callable[[IO[bytes]], Any]]


def _tmp_sibling(path: Path, kind: str = "tmp") -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.{kind}")


def atomic_write(path: str | os.PathLike, content: Content, *, fsync: bool = True) -> Path:
    """Write ``content`` (bytes, text, or a callable given the open binary file) to ``path`` atomically.

    The parent directory is created. On any error the temporary file is removed and the error re-raised;
    ``path`` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(path)
    try:
        with open(tmp, "wb") as f:
            if isinstance(content, str):
                f.write(content.encode("utf-8"))
            elif isinstance(content, (bytes, bytearray)):
                f.write(content)
            else:
                content(f)
            f.flush()
            if fsync:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1) -> Path:
    """`atomic_write` of ``json.dumps(obj, sort_keys=True)`` (stable bytes for the same object)."""
    return atomic_write(path, json.dumps(obj, indent=indent, sort_keys=True, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``final``; on success it is renamed to ``final``.

    An interrupted writer leaves only a ``.<name>.*.tmp`` sibling, never a half-written ``final``.
    An existing ``final`` is replaced (moved aside, then deleted).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
        old = None
        if final.exists():
            old = _tmp_sibling(final, "old")
            final.rename(old)
        tmp.rename(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def clean_stale_tmp(folder: str | os.PathLike, older_than_s: float = 3600.0) -> int:
    """Remove the temporary siblings (files or folders) under ``folder`` that `atomic_write` or
    `atomic_dir` left more than ``older_than_s`` seconds ago; return how many were removed.

    Younger ones are kept: another process may still be writing them.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    now, removed = time.time(), 0
    for p in folder.rglob(".*"):
        if not (p.name.endswith(".tmp") or p.name.endswith(".old")):
            continue
        try:
            if now - p.stat().st_mtime < older_than_s:
                continue
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            removed += 1
        except OSError:
            continue
    return removed
