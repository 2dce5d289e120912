"""Where the grid's runs train when they leave this machine's process pool: a cluster scheduler, through
`submitit <https://github.com/facebookincubator/submitit>`_.

    run_grid(specs, "results/runs", executor="submitit",
             executor_options={"partition": "gpu", "timeout_min": 240, "gpus_per_node": 1, "mem_gb": 32})

* ``submitit.AutoExecutor`` picks SLURM where ``sbatch`` exists and its local executor elsewhere
  (``cluster="local"`` forces the local one: real separate processes on this machine, what the tests
  use; ``"debug"`` runs in this process). The runs without a record go out as **job arrays**, one
  array per group of runs that share their resources (`ClusterOptions.for_model`); each job trains
  **one** run with ``runner.try_run`` under the run's lock, so it writes the record exactly as the pool
  does (same key, same atomic write, same ``<record>.lock``) and returns it.
* Two arrays over the same runs (two submitters, or a submitter started again while its old jobs
  still run) never train a run twice: a job that finds the run's lock held waits for it and then reads
  the record the holder wrote (or, if the holder died, resumes its checkpoint).
* A job that times out or is preempted is requeued by submitit (`TrainJob.checkpoint`) and resumes
  from the run's checkpoint (``<key>.ckpt``, written by the engine at every evaluation). A job that dies
  without a result (SIGKILL, out of memory, a lost node) is resubmitted up to ``max_retries`` times and
  resumes the same way. A job whose training raised an error is not retried: after the array has
  finished, the first such error is raised with the run's key (finished runs keep their records).
* The submitter waits for the arrays and returns the records (``run_grid`` builds its frame from them).

Resources come from the tier's ``params/<tier>/cluster.yml`` (`load_cluster_options`: a ``default``
block plus per-model overrides) and the command line (``python -m structlora reproduce --train-pending
--executor submitit --partition gpu ...``), the command line winning. The results folder must be on a
file system every node sees, with working ``flock`` locks (NFS v4, most Lustre/GPFS mounts).
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Sequence

if TYPE_CHECKING:
    from .grid import RunSpec

__all__ = ["EXECUTORS", "SubmititOptions", "ClusterOptions", "TrainJob", "load_cluster_options",
           "submit_runs", "wait_runs", "run_submitit"]

log = logging.getLogger(__name__)

EXECUTORS = ("pool", "submitit")
"""``pool``: this machine's process pool (``run_grid(n_jobs)``); ``submitit``: a cluster scheduler."""

CLUSTERS = (None, "slurm", "local", "debug")


@dataclass(frozen=True)
class SubmititOptions:
    """What one job asks the scheduler for, and how the submitter treats its jobs.

    ``cluster`` None lets submitit choose (SLURM where available, else local). ``slurm`` holds extra
    ``#SBATCH`` options (e.g. ``{"account": "proj42", "qos": "normal", "constraint": "a100"}``);
    ``setup`` shell lines run before each job (``module load cuda``, ``source .venv/bin/activate``).
    ``max_retries``: resubmissions of a job that died without a result (each resumes the checkpoint).
    """

    folder: str = "results/submitit"
    cluster: str | None = None
    partition: str | None = None
    timeout_min: int = 120
    gpus_per_node: int = 0
    cpus_per_task: int = 1
    mem_gb: float | None = None
    array_parallelism: int = 64
    max_retries: int = 2
    setup: tuple[str, ...] = ()
    slurm: tuple[tuple[str, Any], ...] = ()
    poll_s: float = 1.0

    def __post_init__(self) -> None:
        if self.cluster not in CLUSTERS:
            raise ValueError(f"SubmititOptions.cluster must be one of {CLUSTERS}, got {self.cluster!r}")
        for name, minimum in (("timeout_min", 1), ("gpus_per_node", 0), ("cpus_per_task", 1),
                              ("array_parallelism", 1), ("max_retries", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
                raise ValueError(f"SubmititOptions.{name} must be an int >= {minimum}, got {value!r}")
        if self.mem_gb is not None and not (isinstance(self.mem_gb, (int, float)) and self.mem_gb > 0):
            raise ValueError(f"SubmititOptions.mem_gb must be None or > 0, got {self.mem_gb!r}")
        object.__setattr__(self, "setup", tuple(self.setup))
        slurm = self.slurm.items() if isinstance(self.slurm, Mapping) else self.slurm
        object.__setattr__(self, "slurm", tuple(sorted((str(k), v) for k, v in slurm)))

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any], base: "SubmititOptions | None" = None,
                     where: str = "submitit options") -> "SubmititOptions":
        """``base`` (default: the defaults) with the entries of ``values`` replaced; None values are
        ignored (an option the command line did not set); an unknown name is an error naming the close match."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = [k for k in values if k not in names]
        if unknown:
            hints = [f"{k!r}" + (f" (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, names, 1)) else "")
                     for k in unknown]
            raise ValueError(f"{where}: unknown option(s) {', '.join(hints)}; known: {', '.join(names)}")
        return dataclasses.replace(base or cls(), **{k: v for k, v in values.items() if v is not None})

    def executor(self, folder: str | Path | None = None) -> Any:
        """A configured ``submitit.AutoExecutor`` writing its pickles and logs under ``folder``."""
        import submitit

        ex = submitit.AutoExecutor(folder=str(folder or self.folder), cluster=self.cluster)
        params: dict[str, Any] = {"timeout_min": self.timeout_min, "gpus_per_node": self.gpus_per_node,
                                  "cpus_per_task": self.cpus_per_task, "name": "structlora"}
        if self.mem_gb is not None:
            params["mem_gb"] = self.mem_gb
        if ex.cluster == "slurm":
            params.update(slurm_array_parallelism=self.array_parallelism, slurm_partition=self.partition,
                          slurm_setup=list(self.setup) or None,
                          slurm_additional_parameters=dict(self.slurm) or None)
        elif ex.cluster == "local" and self.setup:
            params["local_setup"] = list(self.setup)
        ex.update_parameters(**params)
        return ex


@dataclass(frozen=True)
class ClusterOptions:
    """A tier's resources: ``default`` for every run, ``models`` the overrides of a model's runs (a
    7B causal LM needs more memory and time than RoBERTa-base)."""

    default: SubmititOptions = field(default_factory=SubmititOptions)
    models: tuple[tuple[str, SubmititOptions], ...] = ()

    def for_model(self, model: str) -> SubmititOptions:
        return dict(self.models).get(model, self.default)

    def override(self, values: Mapping[str, Any]) -> "ClusterOptions":
        """Every block with ``values`` (the command line's options) replaced."""
        return ClusterOptions(SubmititOptions.from_mapping(values, self.default, "command line"),
                              tuple((m, SubmititOptions.from_mapping(values, o, "command line")) for m, o in self.models))


def load_cluster_options(tier: str, root: str | Path | None = None) -> ClusterOptions:
    """``params/<tier>/cluster.yml`` (keys ``default`` and ``models``, each a mapping of
    `SubmititOptions` fields; a model's block overrides the default's); the defaults when the tier has none."""
    import yaml

    from .layout import params_path

    path = params_path(tier, "cluster.yml", root)
    if not path.is_file():
        return ClusterOptions()
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    unknown = sorted(set(data) - {"default", "models"})
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown} (expected default, models)")
    default = SubmititOptions.from_mapping(data.get("default") or {}, where=f"{path}: default")
    models = tuple((str(m), SubmititOptions.from_mapping(v or {}, default, f"{path}: models.{m}"))
                   for m, v in (data.get("models") or {}).items())
    return ClusterOptions(default, models)


def as_cluster_options(options: "ClusterOptions | SubmititOptions | Mapping[str, Any] | None") -> ClusterOptions:
    """``run_grid``'s ``executor_options`` in any of its forms, as `ClusterOptions`."""
    if options is None:
        return ClusterOptions()
    if isinstance(options, ClusterOptions):
        return options
    if isinstance(options, SubmititOptions):
        return ClusterOptions(options)
    return ClusterOptions(SubmititOptions.from_mapping(options))


# --------------------------------------------------------------------------------------------- the job
class TrainJob:
    """One job: train one run (or read back the record another process wrote) and return its record.

    Runs in the job's own process: it installs the submitter's loaders (``grid.LOADERS``, as the pool's
    workers do), takes the run's lock (waiting when another job holds it) and calls ``runner.try_run``.
    ``retrain_since`` is the job's `RunMode.retrain_since` (``reproduce --retrain``): a record older than
    it is trained again.
    ``checkpoint`` is submitit's requeue hook (timeout, preemption): the same job is submitted again and
    resumes from the run's checkpoint.
    """

    def __init__(self, results_dir: str, force: bool, loaders: Mapping[str, Callable[..., Any]],
                 threads: int = 1, retrain_since: float | None = None) -> None:
        self.results_dir = results_dir
        self.force = force
        self.loaders = dict(loaders)
        self.threads = threads
        self.retrain_since = retrain_since

    def __call__(self, spec: "RunSpec", keep_weights: bool = False) -> dict[str, Any]:
        import torch

        from .loaders import LOADERS
        from .modes import RunMode
        from .runner import try_run

        torch.set_num_threads(self.threads)
        LOADERS.update(self.loaders)
        mode = RunMode(retrain_since=self.retrain_since)
        record = try_run(spec, self.results_dir, False, self.force, True, keep_weights, mode=mode)
        assert record is not None  # blocking: the lock was taken
        return record

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """Requeue this job with the same arguments (the engine's checkpoint holds the progress); a
        requeued job must not retrain from scratch, so ``force`` is dropped."""
        from submitit.helpers import DelayedSubmission

        again = TrainJob(self.results_dir, False, self.loaders, self.threads, self.retrain_since)
        return DelayedSubmission(again, *args, **kwargs)


# --------------------------------------------------------------------------------------------- submit / wait
def _groups(specs: Sequence["RunSpec"], options: ClusterOptions) -> dict[SubmititOptions, list["RunSpec"]]:
    out: dict[SubmititOptions, list[RunSpec]] = {}
    for spec in specs:
        out.setdefault(options.for_model(spec.model), []).append(spec)
    return out


def submit_runs(specs: Sequence["RunSpec"], results_dir: str | Path, options: Any = None, force: bool = False,
                keep_weights: Iterable[str] = (), loaders: Mapping[str, Callable[..., Any]] | None = None,
                retrain_since: float | None = None) -> list[tuple["RunSpec", Any]]:
    """Submit one job per spec (one job array per resource group) and return ``(spec, job)`` pairs.

    Nothing is checked here (finished runs, locks): each job does that itself, under the run's lock.
    ``keep_weights``: the keys of the runs that also write their trained weights; ``retrain_since``:
    records older than this time are trained again (`RunMode.retrain_since`).
    """
    from .loaders import LOADERS

    opts = as_cluster_options(options)
    keep = set(keep_weights)
    loaders = dict(LOADERS if loaders is None else loaders)
    submitted: list[tuple[RunSpec, Any]] = []
    for group, members in _groups(specs, opts).items():
        job = TrainJob(str(Path(results_dir).resolve()), force, loaders, group.cpus_per_task, retrain_since)
        jobs = group.executor().map_array(job, members, [s.key() in keep for s in members])
        if group.cluster == "local" or (jobs and type(jobs[0]).__name__ == "LocalJob"):
            for j in jobs:  # local files appear at once: do not wait 15 s for the result of a killed job
                j._results_timeout_s = 2
        submitted.extend(zip(members, jobs))
        log.info("submitted %d run(s) as job array %s", len(members), jobs[0].job_id.split("_")[0] if jobs else "-")
    return submitted


def _wait(jobs: Sequence[Any], poll_s: float, progress: Callable[[], None] | None) -> None:
    import time

    waiting = list(jobs)
    while waiting:
        still = [j for j in waiting if not j.done()]
        for _ in range(len(waiting) - len(still)):
            if progress is not None:
                progress()
        waiting = still
        if waiting:
            time.sleep(poll_s)


def wait_runs(submitted: Sequence[tuple["RunSpec", Any]], poll_s: float = 1.0,
              progress: Callable[[], None] | None = None) -> tuple[dict[str, dict[str, Any]], dict[str, BaseException]]:
    """Wait for every job; ``(records, failures)`` by run key. A failure is the job's exception:
    ``submitit.core.utils.FailedJobError`` (the training raised) or ``UncompletedJobError`` (the job
    died without a result: killed, out of memory, node lost)."""
    _wait([job for _, job in submitted], poll_s, progress)
    records: dict[str, dict[str, Any]] = {}
    failures: dict[str, BaseException] = {}
    for spec, job in submitted:
        try:
            records[spec.key()] = job.result()
        except Exception as exc:  # noqa: BLE001 - sorted by the caller (retried or raised)
            failures[spec.key()] = exc
    return records, failures


def _cancel(submitted: Sequence[tuple["RunSpec", Any]]) -> None:
    for _, job in submitted:
        try:
            if not job.done():
                job.cancel(check=False)
        except Exception as exc:  # noqa: BLE001 - best effort on the way out
            log.warning("could not cancel job %s: %s", getattr(job, "job_id", "?"), exc)


def run_submitit(specs: Sequence["RunSpec"], results_dir: str | Path, options: Any = None, force: bool = False,
                 keep_weights: Iterable[str] = (), progress: Callable[[], None] | None = None,
                 retrain_since: float | None = None) -> dict[str, dict[str, Any]]:
    """Train ``specs`` as submitit jobs and return their records by key (what ``run_grid`` calls).

    A job that died without a result is resubmitted (it resumes the run's checkpoint) up to its
    group's ``max_retries``; a job whose training raised is not. When the arrays are done, the first
    training error (or a job that died on its last try) is raised as ``RuntimeError("run <key>
    failed: ...")``. Leaving early (Ctrl-C) cancels the jobs still queued or running.
    """
    from submitit.core.utils import UncompletedJobError

    opts = as_cluster_options(options)
    keep = list(keep_weights)
    records: dict[str, dict[str, Any]] = {}
    todo, tries = list(specs), 0
    while todo:
        submitted = submit_runs(todo, results_dir, opts, force, keep, retrain_since=retrain_since)
        try:
            done, failures = wait_runs(submitted, min(o.poll_s for o in _groups(todo, opts)), progress)
        except BaseException:
            _cancel(submitted)
            raise
        records.update(done)
        tries += 1
        lost = [s for s in todo if isinstance(failures.get(s.key()), UncompletedJobError)
                and tries <= opts.for_model(s.model).max_retries]
        errors = {k: e for k, e in failures.items() if k not in {s.key() for s in lost}}
        if errors:
            key, exc = next(iter(errors.items()))
            why = (f"its job ended without a result after {tries} tr{'y' if tries == 1 else 'ies'} (killed, out "
                   f"of memory, node lost; submitted again, it resumes its checkpoint): "
                   if isinstance(exc, UncompletedJobError) else "")
            more = f" (and {len(errors) - 1} more failed run(s): {', '.join(list(errors)[1:])})" if len(errors) > 1 else ""
            raise RuntimeError(f"run {key} failed: {why}{exc}{more}") from exc
        for spec in lost:
            log.warning("run %s: its job ended without a result; resubmitting (try %d), it resumes its checkpoint",
                        spec.key(), tries + 1)
        todo, force = lost, False  # a retry resumes; it never starts a forced run from scratch again
    return records


def _register() -> None:
    from .grid import EXECUTOR_BACKENDS

    EXECUTOR_BACKENDS["submitit"] = run_submitit


_register()
