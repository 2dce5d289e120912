"""One lock per run and the cleaning of a results folder.

Each run is trained under a lock (``<record>.lock``, ``filelock``), so several grids, pool workers or
cluster jobs on one folder never train a run twice. Under ``torchrun`` (an initialised process group)
no lock is taken: all ranks must train the same runs. ``clean_results_dir`` removes what killed
processes left behind (stale temporary files, checkpoints of finished or abandoned runs).
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
from filelock import FileLock, Timeout

from .._io import clean_stale_tmp
from .records import read_record, record_path
from .spec import RunSpec

__all__ = ["STALE_S", "run_lock", "locked", "clean_results_dir"]

STALE_S = 3600.0  # temporary files / orphan checkpoints older than this are removed


def run_lock(spec: RunSpec, results_dir: str | Path) -> FileLock | None:
    """The run's lock (``<record>.lock``), or None under an initialised process group (no locking)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return None
    path = record_path(spec, results_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock")


def locked(spec: RunSpec, results_dir: str | Path, blocking: bool, work: Callable[[], Any]) -> tuple[bool, Any]:
    """``(True, work())`` run while holding the run's lock; ``(False, None)`` when ``blocking`` is False
    and another process holds it."""
    lock = run_lock(spec, results_dir)
    if lock is None:
        return True, work()
    try:
        lock.acquire(timeout=-1 if blocking else 0)
    except Timeout:
        return False, None
    try:
        return True, work()
    finally:
        lock.release()


def clean_results_dir(results_dir: str | Path, older_than_s: float = STALE_S) -> int:
    """Remove stale leftovers of killed processes under ``results_dir``; return how many were removed.

    * temporary files/folders of ``atomic_write`` older than ``older_than_s`` (``clean_stale_tmp``);
    * ``<key>.ckpt`` folders whose run already has a valid record (killed between writing the record
      and deleting the checkpoint), or untouched for ``older_than_s`` with no one holding the run's lock
      and no record file (abandoned).
    """
    results_dir = Path(results_dir)
    removed = clean_stale_tmp(results_dir, older_than_s)
    now = time.time()
    for ckpt in sorted(results_dir.glob("*.ckpt")):
        if not ckpt.is_dir():
            continue
        record = results_dir / (ckpt.name[: -len(".ckpt")] + ".json")
        lock = FileLock(str(record) + ".lock")
        try:
            lock.acquire(timeout=0)
        except Timeout:
            continue  # a process is working on it
        try:
            finished = read_record(record, warn=False) is not None
            newest = max([p.stat().st_mtime for p in ckpt.rglob("*")] + [ckpt.stat().st_mtime])
            if finished or (not record.exists() and now - newest > older_than_s):
                shutil.rmtree(ckpt, ignore_errors=True)
                removed += 1
        except OSError:
            continue
        finally:
            lock.release()
    return removed
