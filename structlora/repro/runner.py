"""Running one spec: read its record back, or train it and write the record (and its weights).

* ``run(spec)`` trains one ``RunSpec`` and writes ``results_dir/<key>.json`` atomically (temporary file
  + ``os.replace``). Re-running returns the stored record when it is valid (`records.read_record`); an
  interrupted run resumes from ``results_dir/<key>.ckpt/`` (``engine.train``'s checkpoint, written at
  every evaluation and deleted once the record exists).
* A method that cannot run here (``methods.MethodSkipped``) gives a record with status ``"skipped"``
  and the reason; a run whose loss, gradients or parameters stop being finite (``engine.DivergedError``)
  one with status ``"diverged"``. Both are finished runs (read back, not retrained, unless ``force``).
* ``train_spec(spec)`` is ``run`` for notebooks that need the trained model: it returns
  ``TrainedRun(record, handle, task, encoded, loaded)`` and writes the trained part of the model
  (``<key>.weights.safetensors``), so a later call rebuilds the model instead of training again.
* Every call takes a ``RunMode`` (`structlora.repro.modes`: records-only, retrain, the pending list);
  ``train_run`` is the one function that trains, and it raises ``TrainingForbidden`` in records-only mode.
* Configuration errors (unknown method, a task whose ``model_kind`` is not the model's kind) are
  raised before any training.
"""
from __future__ import annotations

import datetime as _dt
import logging
import shutil
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch

from .._io import atomic_write, atomic_write_json
from . import engine
from .evidence import encode_predictions, update_evidence
from .loaders import LOADERS, current_backbone, method_skipped_types
from .locks import locked
from .modes import RunMode, pending_record
from .records import base_record, checkpoint_dir, is_main_process, read_record, record_path, weights_path
from .spec import RunSpec

__all__ = ["CALIBRATION_BATCHES", "TrainedRun", "check_method", "run", "train_spec", "train_run", "try_run",
           "read_or_train"]

log = logging.getLogger(__name__)

CALIBRATION_BATCHES = 4  # train batches handed to methods that calibrate (sensitivity_lora)


class TrainedRun(NamedTuple):
    """What ``train_spec`` returns: the record plus the live objects (``handle`` is None when skipped)."""

    record: dict[str, Any]
    handle: Any
    task: Any
    encoded: Any
    loaded: Any


def check_method(spec: RunSpec) -> None:
    """Raise ``ValueError`` for a method the loaders do not know (before anything trains)."""
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


def train_spec(spec: RunSpec, results_dir: str | Path | None = "results/runs", progress: bool = True,
               force: bool = False, *, progress_leave: bool = True, train: bool = True,
               retrain_since: float | None = None, pending_file: str | Path | None = None,
               mode: RunMode | None = None) -> TrainedRun:
    """Train ``spec`` and write its record and its weights under ``results_dir`` (None: write nothing).

    Unless ``force`` (or the record is older than ``retrain_since``), a valid record plus its
    ``weights_path`` file are read back instead: the model is rebuilt from the spec and the trained
    parameters and buffers are loaded into it, so the live model is the one the record describes. With
    ``train=False`` (records-only) a run with neither is returned as pending (``handle`` None) and
    listed in ``pending_file``. ``mode`` (a `RunMode`) replaces the three keywords. Resumes from
    ``results_dir/<key>.ckpt`` when a previous attempt was interrupted (``force`` discards it). Raises
    ``ValueError`` for an unknown method or a task/model mismatch before training. Holds the run's lock
    while training.
    """
    mode = mode or RunMode(train, retrain_since, pending_file)
    check_method(spec)
    if results_dir is None:
        if not mode.train:
            return TrainedRun(pending_record(spec, None, mode, weights=True), None, None, None, None)
        return train_run(spec, None, progress, force, progress_leave, mode=mode)

    def work() -> TrainedRun:
        if not force and not mode.stale(record_path(spec, results_dir)):
            back = _reload(spec, results_dir)
            if back is not None:
                return back
        if not mode.train:
            return TrainedRun(pending_record(spec, results_dir, mode, weights=True), None, None, None, None)
        return train_run(spec, results_dir, progress, force, progress_leave, keep_weights=True, mode=mode)

    return locked(spec, results_dir, True, work)[1]


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


def train_run(spec: RunSpec, results_dir: str | Path | None, progress: bool = True, force: bool = False,
              progress_leave: bool = True, keep_weights: bool = False, *, mode: RunMode = RunMode()) -> TrainedRun:
    """Train ``spec`` now (no record is read back) and write its record (and, with ``keep_weights``, its
    weights) under ``results_dir`` (None: write nothing). The one path that trains: it raises
    ``TrainingForbidden`` when ``mode`` forbids training (records-only), before loading anything."""
    mode.forbid(spec)
    check_method(spec)
    ckpt = checkpoint_dir(spec, results_dir) if results_dir is not None else None
    if force and ckpt is not None and ckpt.exists() and is_main_process():
        shutil.rmtree(ckpt)
    record = base_record(spec)
    task, loaded, encoded = _load(spec)
    record["backbone"] = current_backbone(spec.model)  # after loading: a ViT pretrained just now has one
    handle = None
    try:
        handle = LOADERS["build_method"](spec.method, loaded, rank=spec.rank, seed=spec.seed,
                                         total_steps=spec.max_steps, **_method_kwargs(spec, task, loaded, encoded))
    except method_skipped_types() as exc:
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
        if result.regime:   # what training used when the spec asked for bf16 / checkpointing
            record["regime"] = result.regime
    record["finished_at"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    if results_dir is not None and is_main_process():
        if keep_weights and result is not None:
            _save_weights(spec, results_dir, handle.model, record["finished_at"])  # first: a record implies them
        atomic_write_json(record_path(spec, results_dir), record)
        if ckpt is not None and ckpt.exists():
            shutil.rmtree(ckpt, ignore_errors=True)
    return TrainedRun(record, handle, task, encoded, loaded)



def run(spec: RunSpec, results_dir: str | Path = "results/runs", force: bool = False, progress: bool = True,
        keep_model: bool = False, *, progress_leave: bool = True, train: bool = True,
        retrain_since: float | None = None, pending_file: str | Path | None = None,
        mode: RunMode | None = None) -> dict[str, Any] | TrainedRun:
    """The record of ``spec``: read back when a valid one exists (unless ``force``, or it is older than
    ``retrain_since``), else trained and written; with ``train=False`` a pending row instead (see
    `structlora.repro.modes`; ``mode`` replaces the three keywords).

    ``keep_model=True`` returns ``train_spec``'s ``TrainedRun`` (record, handle, task,
    encoded, loaded) for notebooks that probe the trained model.
    """
    mode = mode or RunMode(train, retrain_since, pending_file)
    if keep_model:
        return train_spec(spec, results_dir, progress, force, progress_leave=progress_leave, mode=mode)
    check_method(spec)
    return locked(spec, results_dir, True,
                  lambda: read_or_train(spec, results_dir, progress, force, progress_leave, mode=mode))[1]


def read_or_train(spec: RunSpec, results_dir: str | Path, progress: bool, force: bool, progress_leave: bool,
                  warn: bool = True, keep_weights: bool = False, *, mode: RunMode = RunMode()) -> dict[str, Any]:
    """Under the run's lock: the valid record (another process may just have written it), else train
    (a pending row when ``mode`` is records-only)."""
    path = record_path(spec, results_dir)
    if not force and not mode.stale(path):
        record = read_record(path, spec, warn=warn)
        if record is not None:
            return record
    if not mode.train:
        return pending_record(spec, results_dir, mode)
    return train_run(spec, results_dir, progress, force, progress_leave, keep_weights=keep_weights, mode=mode).record


def try_run(spec: RunSpec, results_dir: str | Path, progress: bool, force: bool, blocking: bool,
            keep_weights: bool = False, *, mode: RunMode = RunMode()) -> dict[str, Any] | None:
    """``read_or_train`` under the run's lock; None when not ``blocking`` and another process holds it
    (what the grid's loop, its pool workers and its cluster jobs call)."""
    done, record = locked(spec, results_dir, blocking,
                          lambda: read_or_train(spec, results_dir, progress, force, False, warn=False,
                                                keep_weights=keep_weights, mode=mode))
    return record if done else None
