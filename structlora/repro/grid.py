"""The experiment grid: one JSON record per run, resumable, optionally in parallel processes.

    specs = [RunSpec.make("sst2", "minilm", m, seed=s) for m in ("lora", "structlora") for s in range(3)]
    df = run_grid(specs, "results/runs")            # one row per run; finished runs are read back

* ``run(spec)`` trains one ``RunSpec`` and writes ``results_dir/<key>.json`` atomically (temporary file
  + ``os.replace``). Re-running returns the stored record when it is valid; a record that is not valid
  JSON, lacks keys, has another schema or was written for another spec is reported with a warning and
  recomputed, never read as a result. An interrupted run resumes from ``results_dir/<key>.ckpt/``
  (``engine.train``'s checkpoint, written at every evaluation and deleted once the record exists).
* A method that cannot run here (``structlora.repro.methods.MethodSkipped``) gives a record with status
  ``"skipped"`` and the reason: never silently dropped.
* A run whose loss, gradients or parameters stop being finite (``engine.DivergedError``) gives a record
  with status ``"diverged"``, the error (step and parameter) in ``error`` and empty metrics. Like a skip
  it is a finished run (read back, not retrained, unless ``force``); it is never a result: statuses are
  the closed set ``STATUSES`` = ok / skipped / diverged, and only ``"ok"`` records carry metrics, which
  ``read_record`` checks (present, finite, accuracy-like ones in [0, 1]). ``load_records`` returns only
  ``"ok"`` records unless asked otherwise; ``run_grid``'s frame keeps every status (filter on
  ``status == "ok"``, as the notebooks and ``stats`` do).
* A record also stores the registry's defaults of its method (``method_defaults``: what the method is
  beyond its spec, e.g. StructLoRA's keep ratio): a record written under other defaults is invalid and
  retrained, since the key hashes only the spec. Records without the field (older) are read as they are.
* Cost fields (``wall_time_s``, ``steps_per_s``, ``peak_mem_mb``) cover all the processes of a resumed
  run; ``cost_is_complete(record)`` says whether they can be trusted (False for old records of resumed
  runs, whose costs covered only the last process).
* Concurrency: each run is trained under a lock (``<record>.lock``, ``filelock``). ``run_grid`` tries
  every lock without waiting and leaves runs that another process holds for the end, where it waits
  for their records, so several grids on one folder share the work. Under ``torchrun`` (an initialised
  process group) no lock is taken: all ranks must train the same runs. Stale temporary files
  (``structlora._io.clean_stale_tmp``) and checkpoint folders of finished runs are removed.
* Configuration errors (unknown method, a task whose ``model_kind`` is not the model's kind) are
  raised before any training.
* ``train_spec(spec)`` is ``run`` for notebooks that need the trained model: it returns
  ``TrainedRun(record, handle, task, encoded, loaded)``. It also writes the trained part of the model
  (trainable parameters and buffers, ``<key>.weights.safetensors``, ~300 KB for minilm at r = 8), so a
  later call rebuilds the model from the record's spec and loads them instead of training again.
* Records-only mode (``$STRUCTLORA_RECORDS_ONLY``, set by ``python -m structlora reproduce
  --records-only``): nothing trains. A run without a record gets a row with status ``"pending"`` (never
  written, never a result) and, when the variable holds a file path, a line in that JSON-lines file
  (``{"spec", "results_dir", "weights"}``), so ``python -m structlora reproduce --train-pending`` can
  train exactly the runs the notebooks ask for.

The loaders live in the module-level dict ``LOADERS`` (``load_task``, ``load_model``, ``encode``,
``build_method``, ``list_methods``, ``update_diagnostics``) so that tests and notebooks can swap in toy
ones; ``run_grid(n_jobs > 1)`` hands the current ``LOADERS`` to its worker processes.
"""
from __future__ import annotations

import concurrent.futures as cf
import datetime as _dt
import hashlib
import json
import logging
import multiprocessing
import os
import platform
import re
import shutil
import socket
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, NamedTuple, Sequence

import math
import time

import torch
from filelock import FileLock, Timeout

from .._io import atomic_write, atomic_write_json, clean_stale_tmp
from . import engine
from .evidence import encode_predictions, update_evidence

if TYPE_CHECKING:
    import pandas

__all__ = [
    "SCHEMA",
    "LOADERS",
    "RunSpec",
    "TrainedRun",
    "run",
    "train_spec",
    "run_grid",
    "load_records",
    "converged",
    "retrain_pending",
    "read_record",
    "record_path",
    "records_to_frame",
    "cost_is_complete",
    "clean_results_dir",
    "STATUSES",
    "RECORDS_ONLY_ENV",
    "records_only",
    "weights_path",
    "pending_seen",
    "stop_pool",
]

log = logging.getLogger(__name__)

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
_STALE_S = 3600.0  # temporary files / orphan checkpoints older than this are removed
CALIBRATION_BATCHES = 4  # train batches handed to methods that calibrate (sensitivity_lora)


# --------------------------------------------------------------------------------------------- loaders
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


def _method_skipped_types() -> tuple[type[BaseException], ...]:
    try:
        from .methods import MethodSkipped
    except Exception:  # pragma: no cover - methods not importable: nothing can be skipped
        return ()
    return (MethodSkipped,)


# --------------------------------------------------------------------------------------------- spec
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
        """JSON-ready fields (tuples become lists)."""
        return json.loads(json.dumps(asdict(self), sort_keys=True, default=str))

    def method_kwargs_dict(self) -> dict[str, Any]:
        """``method_kwargs`` as a dict (tuples back to lists) for ``build_method``."""
        return {k: _thaw(v) for k, v in self.method_kwargs}

    def key(self) -> str:
        """``<task>-<model>-<method>-r<rank>-s<seed>-<sha256[:12] of all fields>`` (file-name safe, stable)."""
        fields_ = asdict(self)
        if fields_["protocol"] == 1:   # protocol-1 records were keyed before the field existed
            del fields_["protocol"]
        digest = hashlib.sha256(json.dumps(fields_, sort_keys=True, default=str).encode()).hexdigest()[:12]
        readable = f"{self.task}-{self.model}-{self.method}-r{self.rank}-s{self.seed}"
        return f"{re.sub(r'[^A-Za-z0-9._-]+', '_', readable)[:80]}-{digest}"

    def train_config(self) -> engine.TrainConfig:
        """The engine configuration of this run (the paper's protocol for everything not in the spec)."""
        return engine.TrainConfig(lr=self.lr, batch_size=self.batch_size, max_steps=self.max_steps,
                                  eval_every=self.eval_every, seed=self.seed, grad_accum=self.grad_accum,
                                  max_eval_examples=self.max_eval_examples)


# --------------------------------------------------------------------------------------------- records
def record_path(spec: RunSpec, results_dir: str | Path) -> Path:
    """Where the record of ``spec`` lives: ``results_dir/<key>.json``."""
    return Path(results_dir) / f"{spec.key()}.json"


def _checkpoint_dir(spec: RunSpec, results_dir: str | Path) -> Path:
    return Path(results_dir) / f"{spec.key()}.ckpt"


def weights_path(spec: RunSpec, results_dir: str | Path) -> Path:
    """Where ``train_spec`` keeps the trained part of the model: ``results_dir/<key>.weights.safetensors``."""
    return Path(results_dir) / f"{spec.key()}.weights.safetensors"


RECORDS_ONLY_ENV = "STRUCTLORA_RECORDS_ONLY"


def records_only() -> bool:
    """True when ``$STRUCTLORA_RECORDS_ONLY`` is set (not "" / "0"): runs without a record do not train."""
    return os.environ.get(RECORDS_ONLY_ENV, "") not in ("", "0")


_PENDING_SEEN: set[str] = set()


def pending_seen() -> int:
    """How many distinct runs this process found without a record in records-only mode (claims made
    from such a notebook say they are partial)."""
    return len(_PENDING_SEEN)


def _pending(spec: RunSpec, results_dir: str | Path | None, weights: bool = False) -> dict[str, Any]:
    """The row of a run that records-only mode did not train (status "pending", never written), noted
    in the pending file when ``$STRUCTLORA_RECORDS_ONLY`` names one."""
    _PENDING_SEEN.add(spec.key())
    record = _base_record(spec)
    record.update(status="pending", skip_reason=f"not run yet: no record in {results_dir} (records-only mode)")
    target = os.environ.get(RECORDS_ONLY_ENV, "")
    if target not in ("", "0", "1"):
        line = json.dumps({"spec": spec.to_dict(), "results_dir": str(results_dir), "weights": weights},
                          sort_keys=True)
        with open(target, "a", encoding="utf-8") as f:
            f.write(line + "\n")
    return record


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


def _validate(record: Any, spec: RunSpec | None) -> str | None:
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
    now = _current_defaults(stored.method)
    if "method_defaults" in record and record["method_defaults"] != now:
        return (f"written under other defaults of method {stored.method!r} ({record['method_defaults']} != "
                f"{now}): the registry changed since")
    backbone = _current_backbone(stored.model)
    if backbone is not None and record.get("backbone") != backbone:
        return (f"trained on backbone {record.get('backbone')!r} of {stored.model!r}, which now loads "
                f"{backbone!r}: archive the record (results/archive/) or restore those weights")
    return None


def _current_backbone(model: str) -> str | None:
    """What `assets.models.backbone_id` says ``model`` loads now (None when the loaders cannot say)."""
    fn = LOADERS.get("backbone_id")
    return fn(model) if fn is not None else None


def _current_defaults(method: str) -> dict[str, Any] | None:
    """The registry's defaults for ``method`` (None when the loaders cannot say, e.g. toy loaders)."""
    fn = LOADERS.get("method_defaults")
    try:
        return fn(method) if fn is not None else None
    except ValueError:
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
        problem = _validate(record, spec)
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
    root = Path(__file__).resolve().parents[2] / ".git"   # structlora/repro/grid.py -> the checkout
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


def _is_main_process() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
        or torch.distributed.get_rank() == 0


def _base_record(spec: RunSpec) -> dict[str, Any]:
    return {
        "spec": spec.to_dict(), "key": spec.key(), "status": "ok", "skip_reason": None,
        "metrics": {"validation": {}, "test": {}}, "best_step": None, "trainable_params": None,
        "total_params": None, "wall_time_s": None, "peak_mem_mb": None, "steps_per_s": None, "history": [],
        "diagnostics": {}, "versions": _versions(), "git_commit": _git_commit(), "hostname": socket.gethostname(),
        "device": _device_name(), "schema": SCHEMA, "finished_at": None,
        "method_defaults": _current_defaults(spec.method), "backbone": _current_backbone(spec.model),
    }


# --------------------------------------------------------------------------------------------- running
class TrainedRun(NamedTuple):
    """What ``train_spec`` returns: the record plus the live objects (``handle`` is None when skipped)."""

    record: dict[str, Any]
    handle: Any
    task: Any
    encoded: Any
    loaded: Any


def _check_method(spec: RunSpec) -> None:
    known = LOADERS["list_methods"]()
    if spec.method not in known:
        raise ValueError(f"unknown method {spec.method!r} in run {spec.key()}; known methods: {', '.join(known)}")


def _load(spec: RunSpec) -> tuple[Any, Any, Any]:
    """Task, model and encoded splits, with the task/model compatibility checked."""
    task = LOADERS["load_task"](spec.task, spec.fraction, spec.seed)
    kind = task.model_kind
    num_labels = None if kind == "causal-lm" else len(task.labels)
    # load_model itself refuses a registry model of another kind, with its own message
    loaded = LOADERS["load_model"](spec.model, task=kind, num_labels=num_labels, seed=spec.seed)
    if loaded.kind != kind:
        raise ValueError(f"task/model mismatch: task {spec.task!r} is trained by a {kind!r} model, but model "
                         f"{spec.model!r} is a {loaded.kind!r} model")
    encoded = LOADERS["encode"](task, loaded.tokenizer, spec.max_length)
    return task, loaded, encoded


def _method_kwargs(spec: RunSpec, task: Any, loaded: Any, encoded: Any) -> dict[str, Any]:
    kwargs = spec.method_kwargs_dict()
    if spec.method == "sensitivity_lora":
        n = kwargs.pop("calibration_batches", CALIBRATION_BATCHES)
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"sensitivity_lora: method kwarg calibration_batches must be an int >= 1, got {n!r}")
        kwargs["calibration_batches"] = engine.training_batches(
            task.kind, encoded["train"], spec.batch_size, spec.seed, n, engine.pad_token_id(loaded.tokenizer, loaded.model))
    return kwargs


def _lock(spec: RunSpec, results_dir: str | Path) -> FileLock | None:
    """The run's lock (``<record>.lock``), or None under an initialised process group (no locking)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return None
    path = record_path(spec, results_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(path) + ".lock")


def _locked(spec: RunSpec, results_dir: str | Path, blocking: bool, work: Callable[[], Any]) -> tuple[bool, Any]:
    """``(True, work())`` run while holding the run's lock; ``(False, None)`` when ``blocking`` is False
    and another process holds it."""
    lock = _lock(spec, results_dir)
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


def train_spec(spec: RunSpec, results_dir: str | Path | None = "results/runs", progress: bool = True,
               force: bool = False, *, progress_leave: bool = True, train: bool = True) -> TrainedRun:
    """Train ``spec`` and write its record and its weights under ``results_dir`` (None: write nothing).

    Unless ``force``, a valid record plus its ``weights_path`` file are read back
    instead: the model is rebuilt from the spec and the trained parameters and buffers are loaded into
    it, so the live model is the one the record describes. With ``train=False`` (or in records-only
    mode) a run with neither is returned as pending (``handle`` None). Resumes from ``results_dir/<key>.ckpt`` when a previous
    attempt was interrupted (``force`` discards it). Raises ``ValueError`` for an unknown method or a
    task/model mismatch before training. Holds the run's lock while training.
    """
    if results_dir is None:
        return _train_spec(spec, None, progress, force, progress_leave)

    def work() -> TrainedRun:
        if not force and not retrain_pending(record_path(spec, results_dir)):
            back = _reload(spec, results_dir)
            if back is not None:
                return back
        if records_only() or not train:
            return TrainedRun(_pending(spec, results_dir, weights=True), None, None, None, None)
        return _train_spec(spec, results_dir, progress, force, progress_leave, keep_weights=True)

    _check_method(spec)
    return _locked(spec, results_dir, True, work)[1]


def _trained_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The part of a model that training changed: trainable parameters and every buffer (gate masks,
    Lagrange multipliers, similarity edges, the step counter), detached, contiguous, on cpu."""
    keep = {n for n, p in model.named_parameters() if p.requires_grad} | {n for n, _ in model.named_buffers()}
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if k in keep}


def _save_weights(spec: RunSpec, results_dir: str | Path, model: torch.nn.Module, finished_at: str) -> None:
    """The weights file, tied to its record by the run key and the record's ``finished_at``."""
    from safetensors.torch import save

    meta = {"key": spec.key(), "finished_at": finished_at}
    atomic_write(weights_path(spec, results_dir), save(_trained_state(model), metadata=meta))


def _reload(spec: RunSpec, results_dir: str | Path) -> TrainedRun | None:
    """``TrainedRun`` of a finished run from its record and weights; None (with a warning when the
    weights are unusable) when either is missing or does not belong to this spec."""
    from safetensors import safe_open

    record, path = read_record(record_path(spec, results_dir), spec, warn=False), weights_path(spec, results_dir)
    if record is not None and record["status"] != "ok":
        return TrainedRun(record, None, None, None, None)   # skipped / diverged: nothing to rebuild
    if record is None or not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            meta, tensors = f.metadata() or {}, {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:
        warnings.warn(f"ignoring {path}: unreadable weights ({type(exc).__name__}: {exc})", stacklevel=3)
        return None
    if meta.get("key") != spec.key() or meta.get("finished_at") != record.get("finished_at"):
        warnings.warn(f"ignoring {path}: weights of run {meta.get('key')!r} finished at {meta.get('finished_at')},"
                      f" not of the record {spec.key()!r} finished at {record.get('finished_at')}", stacklevel=3)
        return None
    task, loaded, encoded = _load(spec)
    handle = LOADERS["build_method"](spec.method, loaded, rank=spec.rank, seed=spec.seed,
                                     total_steps=spec.max_steps, **_method_kwargs(spec, task, loaded, encoded))
    own = handle.model.state_dict()
    bad = sorted(k for k, v in tensors.items() if k not in own or own[k].shape != v.shape)
    if bad:
        warnings.warn(f"ignoring {path}: {len(bad)} tensor(s) do not fit the rebuilt model, e.g. {bad[0]}",
                      stacklevel=3)
        return None
    handle.model.load_state_dict(tensors, strict=False)
    handle.model.eval()
    return TrainedRun(record, handle, task, encoded, loaded)


def _train_spec(spec: RunSpec, results_dir: str | Path | None, progress: bool, force: bool,
                progress_leave: bool, keep_weights: bool = False) -> TrainedRun:
    _check_method(spec)
    ckpt = _checkpoint_dir(spec, results_dir) if results_dir is not None else None
    if force and ckpt is not None and ckpt.exists() and _is_main_process():
        shutil.rmtree(ckpt)
    record = _base_record(spec)
    task, loaded, encoded = _load(spec)
    record["backbone"] = _current_backbone(spec.model)  # after loading: a ViT pretrained just now has one
    handle = None
    try:
        handle = LOADERS["build_method"](spec.method, loaded, rank=spec.rank, seed=spec.seed,
                                         total_steps=spec.max_steps, **_method_kwargs(spec, task, loaded, encoded))
    except _method_skipped_types() as exc:
        reason = getattr(exc, "reason", None) or (exc.args[0] if exc.args else type(exc).__name__)
        record.update(status="skipped", skip_reason=str(reason))
    result = None
    if handle is not None:
        try:
            result = engine.train(handle, task, encoded, spec.train_config(), tokenizer=loaded.tokenizer,
                                  checkpoint_dir=ckpt, progress=progress, progress_leave=progress_leave,
                                  desc=f"{spec.method}/{spec.task}/s{spec.seed}", run_id=spec.key())
        except engine.DivergedError as exc:
            log.warning("run %s diverged: %s", spec.key(), exc)
            record.update(status="diverged", error=str(exc), diverged_at_step=exc.step,
                          diverged_param=exc.name, history=exc.history,
                          trainable_params=int(handle.trainable_params))
    if result is not None:
        try:
            diagnostics = LOADERS["update_diagnostics"](handle.model) or {}
        except Exception as exc:  # a non-LoRA model: no diagnostics
            log.debug("no diagnostics for %s: %s", spec.key(), exc)
            diagnostics = {}
        params = {id(p): p.numel() for p in handle.model.parameters()}
        record.update(
            metrics={"validation": result.val_metrics, "test": result.test_metrics}, best_step=result.best_step,
            trainable_params=int(handle.trainable_params), total_params=int(sum(params.values())),
            wall_time_s=result.wall_time_s, peak_mem_mb=result.peak_mem_mb, peak_mem_kind=result.peak_mem_kind,
            steps_per_s=result.steps_per_s, history=result.history, resumed_from=result.resumed_from,
            train_time_s=result.train_time_s, eval_time_s=result.eval_time_s, train_steps=result.train_steps,
            sessions=result.sessions, cost_partial=result.cost_partial,
            diagnostics={k: float(v) for k, v in diagnostics.items()}, world_size=result.world_size,
            train_config=result.config, notes=getattr(handle, "notes", ""),
            test_predictions_sha256=result.test_predictions_sha256,
            test_predictions=encode_predictions(result.test_predictions), **update_evidence(handle.model))
    record["finished_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    if results_dir is not None and _is_main_process():
        if keep_weights and result is not None:
            _save_weights(spec, results_dir, handle.model, record["finished_at"])  # first: a record implies them
        atomic_write_json(record_path(spec, results_dir), record)
        if ckpt is not None and ckpt.exists():
            shutil.rmtree(ckpt, ignore_errors=True)
    return TrainedRun(record, handle, task, encoded, loaded)


def run(spec: RunSpec, results_dir: str | Path = "results/runs", force: bool = False, progress: bool = True,
        keep_model: bool = False, *, progress_leave: bool = True) -> dict[str, Any] | TrainedRun:
    """The record of ``spec``: read back when a valid one exists (unless ``force``), else trained and written.

    ``keep_model=True`` returns ``train_spec``'s ``TrainedRun`` (record, handle, task,
    encoded, loaded) for notebooks that probe the trained model.
    """
    if keep_model:
        return train_spec(spec, results_dir, progress, force, progress_leave=progress_leave)
    _check_method(spec)
    return _locked(spec, results_dir, True,
                   lambda: _read_or_train(spec, results_dir, progress, force, progress_leave))[1]


def _read_or_train(spec: RunSpec, results_dir: str | Path, progress: bool, force: bool,
                   progress_leave: bool, warn: bool = True, keep_weights: bool = False) -> dict[str, Any]:
    """Under the run's lock: the valid record (another process may just have written it), else train."""
    path = record_path(spec, results_dir)
    if not force and not retrain_pending(path):
        record = read_record(path, spec, warn=warn)
        if record is not None:
            return record
    if records_only():
        return _pending(spec, results_dir)
    return _train_spec(spec, results_dir, progress, force, progress_leave, keep_weights=keep_weights).record


RETRAIN_ENV = "STRUCTLORA_RETRAIN"


def retrain_pending(path: Path) -> bool:
    """True when ``$STRUCTLORA_RETRAIN`` holds a time (set by ``python -m structlora reproduce
    --retrain`` for the notebooks it runs) and the record at ``path`` was written before it: every run
    is then trained once again, and a run shared by two notebooks is not trained twice."""
    since = os.environ.get(RETRAIN_ENV)
    if not since:
        return False
    try:
        return path.stat().st_mtime < float(since)
    except (OSError, ValueError):
        return False


def _try_run(spec: RunSpec, results_dir: str | Path, progress: bool, force: bool, blocking: bool,
             keep_weights: bool = False) -> dict[str, Any] | None:
    """``_read_or_train`` under the run's lock; None when not ``blocking`` and another process holds it."""
    done, record = _locked(spec, results_dir, blocking,
                           lambda: _read_or_train(spec, results_dir, progress, force, False, warn=False,
                                                  keep_weights=keep_weights))
    return record if done else None


def clean_results_dir(results_dir: str | Path, older_than_s: float = _STALE_S) -> int:
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


# --------------------------------------------------------------------------------------------- grid
def _init_worker(threads: int, loaders: dict[str, Callable[..., Any]]) -> None:
    torch.set_num_threads(threads)
    LOADERS.update(loaders)


def _run_in_worker(spec: RunSpec, results_dir: str, force: bool, blocking: bool = False,
                   keep_weights: bool = False) -> dict[str, Any] | None:
    return _try_run(spec, results_dir, False, force, blocking, keep_weights)


# Executors other than this machine's process pool register here (`structlora.repro.executors` adds
# "submitit" when the package is imported), so the grid never imports them: name -> function(todo,
# results_dir, options, force, keep_keys, tick) returning the records by run key.
EXECUTOR_BACKENDS: dict[str, Callable[..., dict[str, dict[str, Any]]]] = {}


def run_grid(specs: Sequence[RunSpec], results_dir: str | Path = "results/runs", n_jobs: int = 1,
             progress: bool = True, force: bool = False, keep_weights: Sequence[RunSpec] = (),
             train: bool = True, executor: str = "pool", executor_options: Any = None) -> pandas.DataFrame:
    """Run every spec (duplicates once), reading back finished ones; one DataFrame row per spec.

    ``n_jobs > 1`` runs specs in that many spawned processes, each with
    ``max(1, cpu_count // n_jobs)`` torch threads. One overall tqdm bar counts runs (inner bars are
    transient with ``n_jobs=1`` and off otherwise). The first failing run stops the grid (runs already
    finished keep their records) and its exception is re-raised with the run's key; a diverged run is
    not a failure (its record has status ``"diverged"``).

    Runs whose lock another process holds (another grid on the same folder) are left for the end, where
    the grid waits for their records (training them itself if the other process died first).

    The runs in ``keep_weights`` also write their trained weights, as ``train_spec`` does (the models
    a notebook probes, trained side by side with the rest). ``train=False`` trains nothing: runs
    without a record come back as ``"pending"`` rows (records-only; a notebook's ``TRAIN`` parameter).

    ``executor="submitit"`` trains the runs without a record as cluster jobs instead (one job per run,
    SLURM job arrays, or submitit's local executor), with ``executor_options`` (a mapping of
    `executors.SubmititOptions` fields, or `executors.ClusterOptions`); ``n_jobs`` is then unused.
    See `structlora.repro.executors`.
    """
    from tqdm.auto import tqdm

    if executor != "pool" and executor not in EXECUTOR_BACKENDS:
        raise ValueError(f"executor must be one of {['pool', *EXECUTOR_BACKENDS]}, got {executor!r}")
    specs = list(dict.fromkeys(specs))
    keep = {spec.key() for spec in keep_weights}
    for spec in specs:
        if not isinstance(spec, RunSpec):
            raise TypeError(f"run_grid expects RunSpec objects, got {type(spec).__name__}")
        _check_method(spec)
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    clean_results_dir(results_dir)
    records: dict[str, dict[str, Any]] = {}
    todo = []
    for spec in specs:
        path = record_path(spec, results_dir)
        record = None if force or retrain_pending(path) else read_record(path, spec)
        if record is None:
            todo.append(spec)
        else:
            records[spec.key()] = record
    if records_only() or not train:
        records.update({spec.key(): _pending(spec, results_dir) for spec in todo})
        todo = []
    bar = tqdm(total=len(specs), initial=len(specs) - len(todo), desc="runs", disable=not progress,
               dynamic_ncols=True)
    try:
        if executor != "pool" and todo:
            backend = EXECUTOR_BACKENDS[executor]
            records.update(backend(todo, results_dir, executor_options, force, keep, lambda: bar.update(1)))
        elif n_jobs <= 1 or len(todo) <= 1:
            for blocking in (False, True):          # first the free runs, then wait for the busy ones
                busy = []
                for spec in todo:
                    bar.set_postfix_str(spec.key()[:60], refresh=False)
                    try:
                        record = _try_run(spec, results_dir, progress, force, blocking, spec.key() in keep)
                    except Exception as exc:
                        raise RuntimeError(f"run {spec.key()} failed: {exc}") from exc
                    if record is None:
                        busy.append(spec)
                        continue
                    records[spec.key()] = record
                    bar.update(1)
                todo = busy
        else:
            threads = max(1, (os.cpu_count() or 1) // n_jobs)
            ctx = multiprocessing.get_context("spawn")
            with cf.ProcessPoolExecutor(max_workers=min(n_jobs, len(todo)), mp_context=ctx,
                                        initializer=_init_worker, initargs=(threads, dict(LOADERS))) as pool:
                for blocking in (False, True):
                    futures = {pool.submit(_run_in_worker, spec, str(results_dir), force, blocking,
                                           spec.key() in keep): spec
                               for spec in todo}
                    busy = []
                    try:
                        for fut in cf.as_completed(futures):
                            spec = futures[fut]
                            try:
                                record = fut.result()
                            except Exception as exc:
                                raise RuntimeError(f"run {spec.key()} failed: {exc}") from exc
                            if record is None:
                                busy.append(spec)
                                continue
                            records[spec.key()] = record
                            bar.update(1)
                    except BaseException:
                        stop_pool(pool)
                        raise
                    todo = busy
    finally:
        bar.close()
    return records_to_frame([records[spec.key()] for spec in specs])


def stop_pool(pool: cf.ProcessPoolExecutor) -> None:
    """Cancel the queued runs of ``pool`` and terminate its workers (a run in progress keeps its
    checkpoint and resumes from it next time).

    Without this, leaving ``run_grid`` on an exception or Ctrl-C would wait for (or, when the driver is
    killed, orphan) the workers, which train their current run to the end. ``ProcessPoolExecutor`` has
    no public way to stop a busy worker before Python 3.14 (``terminate_workers``), hence ``_processes``.
    """
    procs = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    for proc in procs:
        proc.join(timeout=5)
        if proc.is_alive():   # SIGTERM not acted on in time (e.g. a worker still starting up): SIGKILL
            proc.kill()
            proc.join(timeout=5)


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
    spec_cols = [f.name for f in fields(RunSpec)]
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
