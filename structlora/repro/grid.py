"""The experiment grid: one JSON record per run, resumable, optionally in parallel processes.

    specs = [RunSpec.make("sst2", "minilm", m, seed=s) for m in ("lora", "structlora") for s in range(3)]
    df = run_grid(specs, "results/runs")            # one row per run; finished runs are read back

The grid is split by concern; this module runs a list of specs and re-exports the public names of the
others, so ``from structlora.repro.grid import ...`` keeps working:

* `structlora.repro.spec`: ``RunSpec`` and its key;
* `structlora.repro.records`: the record's schema, validation, paths, provenance, ``load_records``;
* `structlora.repro.locks`: one lock per run, ``clean_results_dir``;
* `structlora.repro.loaders`: ``LOADERS``, the injectable loaders (tests and notebooks swap in toy ones;
  ``run_grid(n_jobs > 1)`` hands the current entries to its worker processes);
* `structlora.repro.modes`: ``RunMode`` (records-only, retrain, the pending list), ``TrainingForbidden``;
* `structlora.repro.runner`: ``run``, ``train_spec``, ``train_run``: one run read back or trained.

Concurrency: ``run_grid`` tries every run's lock without waiting and leaves runs that another process
holds for the end, where it waits for their records (training them itself if the other process died
first), so several grids on one folder share the work. Stale temporary files and checkpoint folders
of finished runs are removed first (``clean_results_dir``).
"""
from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

import torch

from .loaders import LOADERS
from .locks import clean_results_dir
from .modes import RunMode, TrainingForbidden, pending_count, pending_record
from .records import (RECORD_KEYS, SCHEMA, STATUSES, converged, cost_is_complete, load_records, read_record,
                      record_path, records_to_frame, weights_path)
from .runner import CALIBRATION_BATCHES, TrainedRun, check_method, run, train_run, train_spec, try_run
from .spec import RunSpec

if TYPE_CHECKING:
    import pandas

__all__ = [
    "SCHEMA",
    "RECORD_KEYS",
    "CALIBRATION_BATCHES",
    "LOADERS",
    "RunSpec",
    "RunMode",
    "TrainingForbidden",
    "TrainedRun",
    "run",
    "train_spec",
    "train_run",
    "run_grid",
    "load_records",
    "converged",
    "read_record",
    "record_path",
    "records_to_frame",
    "cost_is_complete",
    "clean_results_dir",
    "STATUSES",
    "weights_path",
    "pending_count",
    "stop_pool",
    "EXECUTOR_BACKENDS",
]

# Executors other than this machine's process pool register here (`structlora.repro.executors` adds
# "submitit" when the package is imported), so the grid never imports them: name -> function(todo,
# results_dir, options, force, keep_keys, tick, retrain_since=...) returning the records by run key.
EXECUTOR_BACKENDS: dict[str, Callable[..., dict[str, dict[str, Any]]]] = {}

# one attempt over the runs still to do: yields (spec, record), the record None when another process
# holds the run's lock (tried again, waiting for it, in the second round)
_Attempt = Callable[[list[RunSpec], bool], Iterator[tuple[RunSpec, "dict[str, Any] | None"]]]


def _init_worker(threads: int, loaders: dict[str, Callable[..., Any]]) -> None:
    torch.set_num_threads(threads)
    LOADERS.update(loaders)


def _run_in_worker(spec: RunSpec, results_dir: str, force: bool, blocking: bool, keep_weights: bool,
                   mode: RunMode) -> dict[str, Any] | None:
    return try_run(spec, results_dir, False, force, blocking, keep_weights, mode=mode)


def _failed(spec: RunSpec, exc: BaseException) -> RuntimeError:
    return RuntimeError(f"run {spec.key()} failed: {exc}")


def run_grid(specs: Sequence[RunSpec], results_dir: str | Path = "results/runs", n_jobs: int = 1,
             progress: bool = True, force: bool = False, keep_weights: Sequence[RunSpec] = (),
             train: bool = True, executor: str = "pool", executor_options: Any = None, *,
             retrain_since: float | None = None, pending_file: str | Path | None = None,
             mode: RunMode | None = None) -> pandas.DataFrame:
    """Run every spec (duplicates once), reading back finished ones; one DataFrame row per spec.

    ``n_jobs > 1`` runs specs in that many spawned processes, each with
    ``max(1, cpu_count // n_jobs)`` torch threads. One overall tqdm bar counts runs (inner bars are
    transient with ``n_jobs=1`` and off otherwise). The first failing run stops the grid (runs already
    finished keep their records) and its exception is re-raised with the run's key; a diverged run is
    not a failure (its record has status ``"diverged"``).

    Runs whose lock another process holds (another grid on the same folder) are left for the end, where
    the grid waits for their records (training them itself if the other process died first).

    The runs in ``keep_weights`` also write their trained weights, as ``train_spec`` does (the models
    a notebook probes, trained side by side with the rest).

    Modes (`structlora.repro.modes`; ``mode`` replaces the three keywords): ``train=False`` trains
    nothing: runs without a record come back as ``"pending"`` rows (records-only; a notebook's ``TRAIN``
    parameter), listed in ``pending_file`` when given (``PENDING_FILE``); ``retrain_since`` trains
    again every run whose record is older (``RETRAIN_SINCE``).

    ``executor="submitit"`` trains the runs without a record as cluster jobs instead (one job per run,
    SLURM job arrays, or submitit's local executor), with ``executor_options`` (a mapping of
    `executors.SubmititOptions` fields, or `executors.ClusterOptions`); ``n_jobs`` is then unused.
    See `structlora.repro.executors`.
    """
    from tqdm.auto import tqdm

    mode = mode or RunMode(train, retrain_since, pending_file)
    if executor != "pool" and executor not in EXECUTOR_BACKENDS:
        raise ValueError(f"executor must be one of {['pool', *EXECUTOR_BACKENDS]}, got {executor!r}")
    specs = list(dict.fromkeys(specs))
    keep = {spec.key() for spec in keep_weights}
    for spec in specs:
        if not isinstance(spec, RunSpec):
            raise TypeError(f"run_grid expects RunSpec objects, got {type(spec).__name__}")
        check_method(spec)
    results_dir = Path(results_dir)
    results_dir.mkdir(parents=True, exist_ok=True)
    clean_results_dir(results_dir)
    records: dict[str, dict[str, Any]] = {}
    todo = []
    for spec in specs:
        path = record_path(spec, results_dir)
        record = None if force or mode.stale(path) else read_record(path, spec)
        if record is None:
            todo.append(spec)
        else:
            records[spec.key()] = record
    if not mode.train:
        records.update({spec.key(): pending_record(spec, results_dir, mode) for spec in todo})
        todo = []
    bar = tqdm(total=len(specs), initial=len(specs) - len(todo), desc="runs", disable=not progress,
               dynamic_ncols=True)
    try:
        if executor != "pool" and todo:
            backend = EXECUTOR_BACKENDS[executor]
            records.update(backend(todo, results_dir, executor_options, force, keep, lambda: bar.update(1),
                                   retrain_since=mode.retrain_since))
        elif todo:
            def done(spec: RunSpec, record: dict[str, Any]) -> None:
                records[spec.key()] = record
                bar.update(1)

            if n_jobs <= 1 or len(todo) <= 1:
                def attempt(runs: list[RunSpec], blocking: bool) -> Iterator[tuple[RunSpec, dict[str, Any] | None]]:
                    for spec in runs:
                        bar.set_postfix_str(spec.key()[:60], refresh=False)
                        try:
                            yield spec, try_run(spec, results_dir, progress, force, blocking, spec.key() in keep,
                                                mode=mode)
                        except Exception as exc:
                            raise _failed(spec, exc) from exc

                _two_rounds(todo, attempt, done)
            else:
                _in_pool(todo, results_dir, n_jobs, force, keep, mode, done)
    finally:
        bar.close()
    return records_to_frame([records[spec.key()] for spec in specs])


def _two_rounds(todo: list[RunSpec], attempt: _Attempt, done: Callable[[RunSpec, dict[str, Any]], None]) -> None:
    """First every run whose lock is free, then (waiting for each lock) the runs another process held."""
    for blocking in (False, True):
        busy = []
        for spec, record in attempt(todo, blocking):
            if record is None:
                busy.append(spec)
            else:
                done(spec, record)
        todo = busy


def _in_pool(todo: list[RunSpec], results_dir: Path, n_jobs: int, force: bool, keep: set[str], mode: RunMode,
             done: Callable[[RunSpec, dict[str, Any]], None]) -> None:
    """`_two_rounds` in ``n_jobs`` spawned worker processes (the current ``LOADERS`` handed to them)."""
    threads = max(1, (os.cpu_count() or 1) // n_jobs)
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=min(n_jobs, len(todo)), mp_context=ctx,
                                initializer=_init_worker, initargs=(threads, dict(LOADERS))) as pool:
        def attempt(runs: list[RunSpec], blocking: bool) -> Iterator[tuple[RunSpec, dict[str, Any] | None]]:
            futures = {pool.submit(_run_in_worker, spec, str(results_dir), force, blocking, spec.key() in keep,
                                   mode): spec for spec in runs}
            for fut in cf.as_completed(futures):
                spec = futures[fut]
                try:
                    record = fut.result()
                except Exception as exc:
                    raise _failed(spec, exc) from exc
                yield spec, record

        try:
            _two_rounds(todo, attempt, done)
        except BaseException:
            stop_pool(pool)
            raise


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


