"""Run records: one JSON file per run (``<results_dir>/<key>.json``), their schema and validation.

* A record that is not valid JSON, lacks keys, has another schema or was written for another spec is
  reported with a warning (``read_record``) and recomputed, never read as a result.
* Statuses are the closed set ``STATUSES`` = ok / skipped / diverged; only ``"ok"`` records carry
  metrics, which ``read_record`` checks (present, finite, accuracy-like ones in [0, 1]).
* A record also stores the registry's defaults of its method (``method_defaults``) and the backbone it
  was trained on: a record written under other defaults or on another backbone is invalid and retrained,
  since the key hashes only the spec. Records without the fields (older) are read as they are.
* Cost fields (``wall_time_s``, ``steps_per_s``, ``peak_mem_mb``) cover all the processes of a resumed
  run; ``cost_is_complete(record)`` says whether they can be trusted.
* ``records_to_frame`` / ``load_records``: one DataFrame row per record (what the notebooks read).
"""
from __future__ import annotations

import json
import math
import platform
import socket
import warnings
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from .loaders import current_backbone, current_defaults
from .spec import KEY_DEFAULTS, RunSpec

if TYPE_CHECKING:
    import pandas

__all__ = ["SCHEMA", "RECORD_KEYS", "STATUSES", "METRIC_RANGES", "record_path", "checkpoint_dir", "weights_path",
           "read_record", "validate", "cost_is_complete", "converged", "base_record", "is_main_process",
           "records_to_frame", "load_records"]

SCHEMA = 1
RECORD_KEYS = frozenset({
    "spec", "key", "status", "skip_reason", "metrics", "best_step", "trainable_params", "total_params",
    "wall_time_s", "peak_mem_mb", "steps_per_s", "history", "diagnostics", "versions", "git_commit",
    "hostname", "device", "finished_at", "schema",
})
STATUSES = ("ok", "skipped", "diverged")
"""Closed set of record statuses: a result (``ok``), a method that cannot run here (``skipped``, with
``skip_reason``), a run stopped by a non-finite loss/gradient/parameter (``diverged``, with ``error``)."""
# Metrics whose value must lie in a range (others only need to be finite numbers).
METRIC_RANGES: dict[str, tuple[float, float]] = {
    "accuracy": (0.0, 1.0), "acc_norm": (0.0, 1.0), "f1": (0.0, 1.0), "precision": (0.0, 1.0),
    "recall": (0.0, 1.0), "matthews_correlation": (-1.0, 1.0), "mcc": (-1.0, 1.0), "pearson": (-1.0, 1.0),
    "spearmanr": (-1.0, 1.0),
}


# --------------------------------------------------------------------------------------------- records
def record_path(spec: RunSpec, results_dir: str | Path) -> Path:
    """Where the record of ``spec`` lives: ``results_dir/<key>.json``."""
    return Path(results_dir) / f"{spec.key()}.json"


def checkpoint_dir(spec: RunSpec, results_dir: str | Path) -> Path:
    """Where an interrupted run keeps its engine checkpoint: ``results_dir/<key>.ckpt``."""
    return Path(results_dir) / f"{spec.key()}.ckpt"


def weights_path(spec: RunSpec, results_dir: str | Path) -> Path:
    """Where ``train_spec`` keeps the trained part of the model: ``results_dir/<key>.weights.safetensors``."""
    return Path(results_dir) / f"{spec.key()}.weights.safetensors"



def _number_problem(where: str, value: Any, lo: float | None = None, hi: float | None = None) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return f"{where} is not a finite number ({value!r})"
    if lo is not None and hi is not None and not lo <= value <= hi:
        return f"{where} = {value!r} is outside [{lo:g}, {hi:g}]"
    return None


def _metrics_problem(split: str, metrics: Any, required: bool) -> str | None:
    if not isinstance(metrics, dict):
        return f"metrics[{split!r}] is not a dict"
    if required and not metrics:
        return f"metrics[{split!r}] is empty"
    for name, value in metrics.items():
        problem = _number_problem(f"metrics[{split!r}][{name!r}]", value, *METRIC_RANGES.get(name, (None, None)))
        if problem:
            return problem
    return None


def _ok_problem(record: dict[str, Any]) -> str | None:
    """Why an ``"ok"`` record's results cannot be used (None when they can)."""
    metrics = record["metrics"]
    if not isinstance(metrics, dict):
        return "metrics is not a dict"
    problem = (_metrics_problem("validation", metrics.get("validation"), required=False)
               or _metrics_problem("test", metrics.get("test"), required=True))
    if problem:
        return problem
    if not isinstance(record["history"], list):
        return "history is not a list"
    for i, entry in enumerate(record["history"]):
        if not isinstance(entry, dict):
            return f"history[{i}] is not a dict"
        problem = _number_problem(f"history[{i}]['loss']", entry.get("loss"))
        if problem:
            return problem
    for key in ("wall_time_s", "peak_mem_mb", "steps_per_s"):
        problem = _number_problem(key, record[key], 0.0, math.inf)
        if problem:
            return problem
    return None


def validate(record: Any, spec: RunSpec | None) -> str | None:
    """Why ``record`` cannot be used (None when it is a valid record of ``spec``)."""
    if not isinstance(record, dict):
        return "not a JSON object"
    missing = RECORD_KEYS - set(record)
    if missing:
        return f"missing keys {sorted(missing)}"
    if record["schema"] != SCHEMA:
        return f"schema {record['schema']!r} != {SCHEMA}"
    status = record["status"]
    if not isinstance(status, str) or status not in STATUSES:
        return f"unknown status {status!r} (expected one of {STATUSES})"
    if status == "ok":
        problem = _ok_problem(record)
        if problem:
            return problem
    elif status == "skipped" and not (isinstance(record["skip_reason"], str) and record["skip_reason"]):
        return "a skipped record without skip_reason"
    elif status == "diverged" and not (isinstance(record.get("error"), str) and record["error"]):
        return "a diverged record without error"
    if status != "ok" and any(record["metrics"].get(s) for s in ("validation", "test")
                              if isinstance(record["metrics"], dict)):
        return f"a {status!r} record with metrics"
    try:
        stored = RunSpec.from_dict(record["spec"])
    except (TypeError, ValueError) as exc:
        return f"bad spec ({exc})"
    if record["key"] != stored.key():
        return "key does not match its spec"
    if spec is not None and stored != spec:
        return "written for another spec"
    now = current_defaults(stored.method)
    if "method_defaults" in record and record["method_defaults"] != now:
        return (f"written under other defaults of method {stored.method!r} ({record['method_defaults']} != "
                f"{now}): the registry changed since")
    backbone = current_backbone(stored.model)
    if backbone is not None and record.get("backbone") != backbone:
        return (f"trained on backbone {record.get('backbone')!r} of {stored.model!r}, which now loads "
                f"{backbone!r}: archive the record (results/archive/) or restore those weights")
    return None


def cost_is_complete(record: dict[str, Any]) -> bool:
    """True when the record's cost fields (``wall_time_s``, ``steps_per_s``, ``peak_mem_mb``) cover the
    whole run: an ``"ok"`` record not marked ``cost_partial``. A record written before costs were
    carried through checkpoints (no ``cost_partial`` field) counts as complete only if it was not resumed.
    """
    if record.get("status") != "ok":
        return False
    if "cost_partial" in record:
        return record["cost_partial"] is False
    return record.get("resumed_from") is None


def read_record(path: str | Path, spec: RunSpec | None = None, *, warn: bool = True) -> dict[str, Any] | None:
    """The record at ``path`` if it exists and is valid (for ``spec`` when given), else None.

    An existing but invalid file (truncated, corrupt, too deeply nested, wrong schema, another spec,
    an unknown status, missing/non-finite/out-of-range metrics) triggers a warning (unless ``warn`` is False).
    """
    path = Path(path)
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
        problem = validate(record, spec)
    except (OSError, ValueError, TypeError, AttributeError, RecursionError) as exc:
        problem = f"unreadable ({type(exc).__name__}: {exc})"
    if problem is not None:
        if warn:
            warnings.warn(f"ignoring invalid run record {path}: {problem}; it will be recomputed", stacklevel=2)
        return None
    return record


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "datasets", "accelerate", "structlora"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "unknown"
    try:
        from .. import __version__

        out["structlora"] = __version__
    except Exception:  # pragma: no cover
        pass
    return out


def _git_commit() -> str | None:
    """HEAD commit of the checkout holding this package, read from ``.git`` (no git subprocess)."""
    root = Path(__file__).resolve().parents[2] / ".git"   # structlora/repro/records.py -> the checkout
    try:
        if root.is_file():  # worktree: "gitdir: <path>"
            root = Path(root.read_text().split(":", 1)[1].strip())
        head = (root / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head.split(":", 1)[1].strip()
        for base in (root, Path((root / "commondir").read_text().strip()) if (root / "commondir").exists() else root):
            base = base if base.is_absolute() else root / base
            if (base / ref).exists():
                return (base / ref).read_text().strip()
            packed = base / "packed-refs"
            if packed.exists():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split()[0]
    except (OSError, IndexError):
        return None
    return None


def _device_name() -> str:
    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)})"
    return f"cpu ({torch.get_num_threads()} threads)"


def is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
        or torch.distributed.get_rank() == 0


def base_record(spec: RunSpec) -> dict[str, Any]:
    """A record of ``spec`` before training: provenance filled in, status "ok", no result yet."""
    return {
        "spec": spec.to_dict(), "key": spec.key(), "status": "ok", "skip_reason": None,
        "metrics": {"validation": {}, "test": {}}, "best_step": None, "trainable_params": None,
        "total_params": None, "wall_time_s": None, "peak_mem_mb": None, "steps_per_s": None, "history": [],
        "diagnostics": {}, "versions": _versions(), "git_commit": _git_commit(), "hostname": socket.gethostname(),
        "device": _device_name(), "schema": SCHEMA, "finished_at": None,
        "method_defaults": current_defaults(spec.method), "backbone": current_backbone(spec.model),
    }


_ALWAYS = ("val_accuracy", "test_accuracy", "val_macro_f1", "test_macro_f1")  # columns even of an all-pending frame


def records_to_frame(records: Sequence[dict[str, Any]]) -> pandas.DataFrame:
    """One row per record: spec fields (``method_kwargs`` as a JSON string), ``key``, ``status``,
    ``skip_reason``, ``error`` (diverged runs), ``val_<metric>``/``test_<metric>``, ``best_step``, parameter
    counts, time, memory, ``steps_per_s``, ``cost_complete`` (``cost_is_complete``) and ``diag_<name>``
    diagnostics."""
    import pandas as pd

    rows = []
    for rec in records:
        spec = dict(rec["spec"])
        spec["method_kwargs"] = json.dumps(dict(spec.get("method_kwargs") or []), sort_keys=True)
        row = {**spec, "key": rec["key"], "status": rec["status"], "skip_reason": rec["skip_reason"],
               "error": rec.get("error"), "cost_complete": cost_is_complete(rec)}
        metrics = rec.get("metrics") or {}
        row.update({f"val_{k}": v for k, v in (metrics.get("validation") or {}).items()})
        row.update({f"test_{k}": v for k, v in (metrics.get("test") or {}).items()})
        for k in ("best_step", "trainable_params", "total_params", "wall_time_s", "peak_mem_mb", "steps_per_s"):
            row[k] = rec.get(k)
        row.update({f"diag_{k}": v for k, v in (rec.get("diagnostics") or {}).items()})
        row["test_predictions_sha256"] = rec.get("test_predictions_sha256")
        row["converged"] = converged(rec)
        rows.append(row)
    spec_cols = [f.name for f in fields(RunSpec) if f.name not in KEY_DEFAULTS]   # as in a record's spec
    df = pd.DataFrame(rows)
    if df.empty:
        return pd.DataFrame(columns=spec_cols + ["key", "status", "skip_reason"] + list(_ALWAYS))
    for col in _ALWAYS:   # every task reports accuracy: a frame of pending / skipped runs still has the column
        if col not in df:
            df[col] = float("nan")
    return df


def converged(record: dict[str, Any]) -> bool | None:
    """The convergence flag of a run: True when its best validation step is not its last evaluation
    (the validation curve turned, so more steps would not have helped), False when the best step is the
    last one (still improving when the budget ended), None without an evaluation history."""
    steps = [h.get("step") for h in (record.get("history") or []) if h.get("step") is not None]
    if not steps or record.get("best_step") is None:
        return None
    return int(record["best_step"]) < max(steps)


def load_records(results_dir: str | Path = "results/runs", specs: Sequence[RunSpec] | None = None,
                 statuses: Sequence[str] | None = ("ok",)) -> pandas.DataFrame:
    """DataFrame of the valid records in ``results_dir`` (only those of ``specs`` when given; missing
    ones are left out). Invalid files are reported with a warning and skipped.

    Only records with a status in ``statuses`` are returned: by default the ``"ok"`` ones, the only
    records that are results (``statuses=None``: every status, e.g. to list skipped/diverged runs).
    Without ``specs`` only canonical file names (``<key>.json`` of the record's own key) are read, so a
    copy of a record under another name is not counted twice.
    """
    results_dir = Path(results_dir)
    if specs is not None:
        found = [read_record(record_path(s, results_dir), s) for s in dict.fromkeys(specs)]
    else:
        found = []
        for p in sorted(results_dir.glob("*.json")):
            record = read_record(p)
            if record is None:
                continue
            if p.name != f"{record['key']}.json":
                warnings.warn(f"ignoring {p}: a copy of record {record['key']} under another name", stacklevel=2)
                continue
            found.append(record)
    return records_to_frame([r for r in found if r is not None and (statuses is None or r["status"] in statuses)])
