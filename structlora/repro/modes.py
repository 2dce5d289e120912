"""How a job treats runs without a usable record: an explicit ``RunMode``, passed down, never a global.

* ``train=True`` (default): a run without a valid record trains; ``train=False`` is records-only:
  nothing trains, a run without a record comes back as a ``"pending"`` row (never written, never a
  result) and any attempt to train raises ``TrainingForbidden``.
* ``retrain_since`` (epoch seconds; ``python -m structlora reproduce --retrain`` passes its start time
  to every notebook as the ``RETRAIN_SINCE`` parameter): a record written before it is trained again,
  once (its new record is newer), so a run shared by two notebooks is not trained twice.
* ``pending_file`` (records-only; ``reproduce --records-only`` passes ``results/pending.<tier>.jsonl``
  as the ``PENDING_FILE`` parameter): each pending run is appended to it as one JSON line
  (``{"spec", "results_dir", "weights"}``), so ``reproduce --train-pending`` trains exactly the runs the
  notebooks asked for.

The pending runs themselves travel as data: the rows of ``run_grid``'s frame whose ``status`` is
``"pending"`` (``pending_count(df)``), and ``train_spec``'s record.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .records import base_record
from .spec import RunSpec

if TYPE_CHECKING:
    import pandas

__all__ = ["RunMode", "TrainingForbidden", "pending_record", "pending_count"]


class TrainingForbidden(RuntimeError):
    """A run was asked to train in records-only mode (``RunMode(train=False)``: a notebook's
    ``TRAIN = False``, ``reproduce --records-only``)."""


@dataclass(frozen=True)
class RunMode:
    """The job's mode (see the module docstring): whether runs may train, which records are retrained,
    where records-only mode lists the runs it did not train."""

    train: bool = True
    retrain_since: float | None = None
    pending_file: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.train, bool):
            raise TypeError(f"RunMode.train must be a bool, got {self.train!r}")
        if self.retrain_since is not None:
            if isinstance(self.retrain_since, bool) or not isinstance(self.retrain_since, (int, float)):
                raise TypeError(f"RunMode.retrain_since must be None or a time in seconds, got {self.retrain_since!r}")
            object.__setattr__(self, "retrain_since", float(self.retrain_since))
            if not self.train:
                raise ValueError("records-only mode (train=False) cannot retrain (retrain_since is set)")
        if self.pending_file is not None:
            object.__setattr__(self, "pending_file", str(self.pending_file))

    def stale(self, record: Path) -> bool:
        """True when the record file at ``record`` was written before ``retrain_since`` (train it again)."""
        if self.retrain_since is None:
            return False
        try:
            return record.stat().st_mtime < self.retrain_since
        except OSError:
            return False

    def forbid(self, spec: RunSpec) -> None:
        """Raise ``TrainingForbidden`` when this mode does not train (the guard of every training path)."""
        if not self.train:
            raise TrainingForbidden(f"run {spec.key()} has no record and training is forbidden "
                                    "(records-only mode: TRAIN = False / reproduce --records-only); train it "
                                    "with TRAIN = True or python -m structlora reproduce --train-pending")


def pending_record(spec: RunSpec, results_dir: str | Path | None, mode: RunMode,
                   weights: bool = False) -> dict[str, Any]:
    """The row of a run that records-only mode did not train (status "pending", never written), listed
    in ``mode.pending_file`` when there is one (``weights``: the notebook needs its trained model)."""
    record = base_record(spec)
    record.update(status="pending", skip_reason=f"not run yet: no record in {results_dir} (records-only mode)")
    if mode.pending_file:
        line = json.dumps({"spec": spec.to_dict(), "results_dir": str(results_dir), "weights": weights},
                          sort_keys=True)
        with open(mode.pending_file, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    return record


def pending_count(df: pandas.DataFrame) -> int:
    """How many runs of a grid's frame have no record yet (records-only mode): what a claim made from
    such a frame reports as partial (`claims.claim_from_test(pending=...)`)."""
    return int((df["status"] == "pending").sum()) if len(df) and "status" in df else 0
