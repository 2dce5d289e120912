"""The main job: execute the reproduction notebooks in order and collect their claims.

``python -m structlora reproduce --tier cpu`` (``make reproduce``) runs every ``notebooks/0*`` notebook
with papermill, parameters from ``params/<tier>/<notebook>.yml`` (tier ``cpu`` uses the notebook's own
parameters cell: the committed notebooks carry the cpu tier), into ``results/executed/<notebook>.<tier>.ipynb``, then builds the claims ledger
(``results/CLAIMS.md`` + ``results/claims.csv`` for the cpu tier; ``CLAIMS.<tier>.md`` for the others).

* The jupytext ``.py`` file is the source of truth: when a notebook has one, it is converted in memory
  and executed (so an ``.ipynb`` that was not re-synced can never run stale code).
* Parameters are checked before anything runs: a key of a params file that the notebook's parameters
  cell does not define (a typo such as ``SEED`` for ``SEEDS``), or a parameter the file leaves out,
  stops the job naming the key, the file and the close match.
* Resuming: the training engine caches every finished run as a JSON record under the notebook's
  ``RESULTS_DIR``; the job says up front how many records it serves, so a re-run re-executes the
  notebooks from them in minutes (``--retrain`` recomputes every run instead). A notebook whose executed
  copy finished without error from the same source, parameters file and parameters (sha256) is
  skipped unless ``--force``.
* Modes are parameters, never environment variables: ``TRAIN`` (``--records-only`` injects False), and
  for a notebook whose parameters cell declares them, ``PENDING_FILE`` (``--records-only``: where its
  ``run_grid`` / ``train_spec`` list the runs without a record) and ``RETRAIN_SINCE`` (``--retrain``: the
  job's start time; older records train again). For a notebook that does not declare them the job does
  the same from the tier's specs (`structlora.repro.tierspecs`): it lists the runs without a record
  after the notebooks ran, and retrains the runs before they run.
* Executed copies are deterministic: fixed cell ids, no timestamps or absolute paths, no library
  warnings or progress bars (those stay live-only), so a re-run from the same records rewrites
  nothing that is committed.
* A failing cell stops the job (``--keep-going`` runs the remaining notebooks first) with the notebook
  name, the cell number, the first line of its source, the error and the path of the executed copy;
  the exit code is non-zero.
"""
from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import math
import os
import re
import signal
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from .._io import atomic_write

__all__ = ["TIERS", "JOB_PARAMETERS", "NotebookJob", "discover", "plan", "run_all", "main"]

JOB_PARAMETERS = ("PENDING_FILE", "RETRAIN_SINCE")
"""Parameters the job injects (records-only's pending list, retrain's start time) into a notebook that
declares them: a tier's params file need not set them, and they are not part of an executed copy's
``sources_sha256`` or metadata (a path or a time of one execution)."""

from .layout import OWN_CELL_TIER, TIERS, notebook_parameters, repo_root  # noqa: F401 (re-exported)


@dataclass
class NotebookJob:
    stem: str
    source: Path                 # the .py (preferred) or the .ipynb
    params_file: Path | None     # None for the cpu tier (the notebook's own parameters cell)
    output: Path
    parameters: dict[str, Any] = field(default_factory=dict)
    status: str = "pending"      # pending | up-to-date | ok | failed | not-run
    wall_s: float | None = None
    message: str = ""


def discover(notebooks_dir: Path) -> list[tuple[str, Path]]:
    """``[(stem, source)]`` for every ``0*`` notebook, sorted; the ``.py`` twin wins over the ``.ipynb``."""
    stems: dict[str, Path] = {}
    for p in sorted(notebooks_dir.glob("0*.ipynb")):
        stems[p.stem] = p
    for p in sorted(notebooks_dir.glob("0*.py")):
        stems[p.stem] = p
    return sorted(stems.items())


def _select(found: list[tuple[str, Path]], only: Sequence[str] | None) -> list[tuple[str, Path]]:
    if not only:
        return found
    tokens = [t.strip() for o in only for t in str(o).split(",") if t.strip()]
    chosen = [(s, p) for s, p in found if any(s == t or s.startswith(t) for t in tokens)]
    missing = [t for t in tokens if not any(s == t or s.startswith(t) for s, _ in found)]
    if missing:
        raise SystemExit(f"--only: no notebook matches {missing}; notebooks: {[s for s, _ in found]}")
    return chosen


def check_params(stem: str, params_file: Path, params: dict[str, Any], names: dict[str, Any]) -> None:
    """Fail before any run when ``params`` has a key the notebook does not define, or lacks one it does."""
    unknown = [k for k in params if k not in names]
    missing = [k for k in names if k not in params and k != "TIER" and k not in JOB_PARAMETERS]
    problems = []
    for k in unknown:
        close = difflib.get_close_matches(k, list(names), n=1)
        problems.append(f"unknown parameter {k!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
    for k in missing:
        problems.append(f"missing parameter {k!r} (the notebook's cpu value would run silently)")
    if problems:
        raise SystemExit(f"{params_file}: " + "; ".join(problems) + f". Notebook {stem} defines: {', '.join(names)}")


def load_params(path: Path) -> dict[str, Any]:
    import yaml

    with open(path, encoding="utf-8") as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise SystemExit(f"{path}: expected a mapping of parameter names to values, got {type(data).__name__}")
    return data


def plan(tier: str, only: Sequence[str] | None = None, root: Path | None = None,
         results: Path | None = None) -> list[NotebookJob]:
    """The notebooks to run for ``tier`` with their parameters and output paths."""
    if tier not in TIERS:
        raise SystemExit(f"unknown tier {tier!r}; choose one of {TIERS}")
    root = root or repo_root()
    results = results or root / "results"
    found = _select(discover(root / "notebooks"), only)
    if not found:
        raise SystemExit(f"no notebooks found under {root / 'notebooks'}")
    jobs = []
    for stem, src in found:
        params: dict[str, Any] = {}
        pfile = None
        if tier != OWN_CELL_TIER:
            pfile = root / "params" / tier / f"{stem}.yml"
            if not pfile.exists():
                raise SystemExit(f"missing parameter file {pfile.relative_to(root)} for notebook {stem} "
                                 f"(tier {tier}); every notebook needs one per tier but {OWN_CELL_TIER}")
            params = load_params(pfile)
            check_params(stem, pfile, params, notebook_parameters(src))
        if params.get("TIER", tier) != tier:
            raise SystemExit(f"{pfile}: TIER is {params['TIER']!r} but the job runs tier {tier!r}")
        params["TIER"] = tier  # cpu: the notebook's own parameters cell, nothing else injected
        jobs.append(NotebookJob(stem, src, pfile, results / "executed" / f"{stem}.{tier}.ipynb", params))
    return jobs


def _sources(job: NotebookJob) -> list[Path]:
    paths = [job.source]  # the .py when there is one (what runs); the paired .ipynb carries the cpu outputs
    if job.params_file:
        paths.append(job.params_file)
    return [p for p in paths if p.exists()]


def sources_sha256(job: NotebookJob) -> str:
    """sha256 over the notebook source, its params file and the parameters (what decides its outputs)."""
    h = hashlib.sha256()
    for p in _sources(job):
        h.update(p.read_bytes())
    h.update(json.dumps(_kept_parameters(job.parameters), sort_keys=True, default=str).encode())
    return h.hexdigest()


def _kept_parameters(parameters: dict[str, Any]) -> dict[str, Any]:
    """The parameters that decide an executed copy's outputs (without `JOB_PARAMETERS`)."""
    return {k: v for k, v in parameters.items() if k not in JOB_PARAMETERS}


def up_to_date(job: NotebookJob) -> bool:
    """The executed copy finished without error from the same sources and parameters (by sha256, not
    by file times, which a fresh clone resets)."""
    try:
        meta = json.loads(job.output.read_text(encoding="utf-8")).get("metadata", {}).get("structlora", {})
    except (OSError, json.JSONDecodeError):
        return False
    return meta.get("status") == "ok" and meta.get("sources_sha256") == sources_sha256(job)


def _input_notebook(job: NotebookJob, tmpdir: Path) -> Path:
    """The notebook papermill executes: the .py converted by jupytext, else the .ipynb itself."""
    if job.source.suffix == ".py":
        import jupytext

        nb = jupytext.read(job.source)
        nb.metadata.setdefault("kernelspec", {"name": "python3", "display_name": "Python 3", "language": "python"})
    else:
        import nbformat

        nb = nbformat.read(job.source, as_version=4)
    for i, cell in enumerate(nb.cells):  # jupytext draws random ids: fixed ones keep executed copies diffable
        cell["id"] = f"cell-{i:03d}"
    path = tmpdir / f"{job.stem}.ipynb"
    import nbformat

    nbformat.write(nb, path)
    return path


def _describe_failure(job: NotebookJob, err: BaseException) -> str:
    from papermill.exceptions import PapermillExecutionError

    if isinstance(err, PapermillExecutionError):
        src = (err.source or "").strip().splitlines()
        first = next((ln for ln in src if ln.strip() and not ln.startswith("# NBVAL")), src[0] if src else "")
        idx = err.cell_index
        try:  # papermill inserts an "injected-parameters" cell: count cells as in the source notebook
            cells = json.loads(job.output.read_text(encoding="utf-8"))["cells"]
            injected = sum(1 for c in cells[:idx] if "injected-parameters" in c.get("metadata", {}).get("tags", []))
        except (OSError, ValueError, KeyError, TypeError):
            injected = 0
        return (f"notebook {job.stem} failed in cell {idx - injected} of {job.source.name} (counting from 0; cell "
                f"{idx} of the executed notebook, execution count {err.exec_count}): `{first.strip()}`\n"
                f"  {err.ename}: {err.evalue}\n  executed notebook: {job.output}")
    return f"notebook {job.stem} failed: {type(err).__name__}: {err}\n  executed notebook: {job.output}"


def run_job(job: NotebookJob, root: Path, cell_progress: bool = True, log_output: bool = False) -> None:
    import papermill as pm

    job.output.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="structlora-nb-") as td:
        src = _input_notebook(job, Path(td))
        try:
            pm.execute_notebook(
                str(src), str(job.output), parameters=job.parameters or None, kernel_name="python3",
                progress_bar={"leave": False, "desc": f"  {job.stem}", "position": 1} if cell_progress else False,
                log_output=log_output, cwd=str(root), request_save_on_cell_execute=True,
                # the kernel's own log: errors only (it warns on every start that local TCP is unencrypted)
                extra_arguments=["--IPKernelApp.log_level=ERROR"],
            )
            job.status = "ok"
            # a records-only copy is never "up to date" for a job that trains (its pending runs are missing)
            clean_executed(job.output, job.output, root,
                           marker={"status": "ok" if job.parameters.get("TRAIN") is not False else "records-only",
                                   "tier": job.parameters.get("TIER", "smoke"), "sources_sha256": sources_sha256(job)})
        except BaseException as err:  # noqa: BLE001 - reported, then re-raised as a job failure
            job.status = "failed"
            job.message = _describe_failure(job, err)
            if isinstance(err, KeyboardInterrupt):
                raise
        finally:
            job.wall_s = time.perf_counter() - t0


_VOLATILE_CELL_META = ("papermill", "execution", "ExecuteTime")
_WIDGET = "application/vnd.jupyter.widget-view+json"
_WARNING = re.compile(r"^\S+:\d+: \w*Warning: ")
_PROGRESS = re.compile(r"\r|\d+%\|")
# timings of this execution (wall time, load average): shown live, not kept in the committed copies,
# so re-executing from the same records rewrites the same bytes
_TIMING_LINE = re.compile(r"^(notebook wall time|probe time|benchmark time)\b.*\n?", re.M)


def strip_noise(text: str) -> str:
    """stderr text without what is not a result: python warnings (``file:line: XWarning: message`` and
    the source line below it), transformers' load report (a fresh classification head is "MISSING", as
    expected) and text progress bars."""
    lines, out, i = text.splitlines(keepends=True), [], 0
    while i < len(lines):
        ln = lines[i]
        if "LOAD REPORT" in ln:
            i += 1
            while i < len(lines) and not lines[i].startswith("Notes:"):
                i += 1
            i += 1
            while i < len(lines) and lines[i].startswith("- "):
                i += 1
            continue
        if _WARNING.match(ln):
            for k in range(i + 1, min(i + 6, len(lines))):
                if lines[k].startswith("  "):
                    i = k
                    break
            i += 1
            continue
        if not _PROGRESS.search(ln):
            out.append(ln)
        i += 1
    return "".join(out) if "".join(out).strip() else ""


def _clean_outputs(outputs: list, root: Path) -> list:
    kept = []
    prefixes = sorted({str(root.resolve()) + os.sep, str(root) + os.sep, str(Path.home()) + os.sep}, key=len,
                      reverse=True)

    def rel(text: str) -> str:
        for p in prefixes:
            text = text.replace(p, "")
        return text

    for out in outputs:
        if out.get("output_type") == "stream":
            text = out.get("text", "")
            if out.get("name") == "stderr":
                text = strip_noise(text)
            out["text"] = rel(_TIMING_LINE.sub("", text))
            if not out["text"].strip():
                continue
        elif "data" in out:
            if _WIDGET in out["data"]:
                continue  # a live progress bar: its state is not saved, its text fallback is a timing
            for mime, val in list(out["data"].items()):
                if isinstance(val, str) and mime.startswith("text/"):
                    out["data"][mime] = rel(val)
        elif out.get("output_type") == "error":
            out["traceback"] = [rel(t) for t in out.get("traceback", [])]
        kept.append(out)
    return kept


def clean_executed(src: Path, dst: Path, root: Path | None = None, marker: dict[str, Any] | None = None,
                   drop_injected: bool = False) -> None:
    """Copy an executed notebook to ``dst`` without volatile content: papermill timings and paths,
    execution timestamps, widget state, library warnings and progress bars on stderr, the machine's
    absolute paths (made relative to the repository), empty tag lists. ``marker`` is stored as
    ``metadata.structlora`` (what `up_to_date` reads). A re-run from the same records and sources thus
    writes the same bytes. ``drop_injected`` removes papermill's injected-parameters cell (the committed
    notebooks: they were executed with their own parameters cell's values, so they pair with the .py)."""
    import nbformat

    root = root or repo_root()
    nb = nbformat.read(src, as_version=4)
    pm_meta = nb.metadata.pop("papermill", {}) or {}
    nb.metadata.pop("widgets", None)
    nb.metadata.pop("structlora", None)  # replaced by ``marker`` (how this copy was executed), if given
    if marker is not None:
        kept = _kept_parameters(pm_meta.get("parameters", marker.get("parameters", {})) or {})
        nb.metadata["structlora"] = {**marker, "parameters": kept}
    if drop_injected:
        nb.cells = [c for c in nb.cells if "injected-parameters" not in c.metadata.get("tags", [])]
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i:03d}"
        for k in _VOLATILE_CELL_META:
            cell.metadata.pop(k, None)
        if "tags" in cell.metadata and not cell.metadata["tags"]:
            del cell.metadata["tags"]
        if cell.cell_type == "code":
            cell.outputs = _clean_outputs(cell.outputs, root)
    text = nbformat.writes(nb)
    atomic_write(dst, text if text.endswith("\n") else text + "\n")


def count_records(folder: Path) -> int:
    """Finished run records (``<key>.json``) in a results folder."""
    return sum(1 for p in folder.glob("*.json") if not p.name.startswith(".")) if folder.is_dir() else 0


def announce(tier: str, jobs: list[NotebookJob], root: Path, retrain: bool) -> str:
    """What the job is about to do: the notebooks, the run records it serves, how to retrain."""
    folders = sorted({str(j.parameters.get("RESULTS_DIR", "results/smoke/runs" if tier == "smoke" else "results/runs"))
                      for j in jobs})
    n = sum(count_records(root / f) for f in folders)
    lines = [f"structlora reproduce: tier {tier}, {len(jobs)} notebook(s): {', '.join(j.stem for j in jobs)}"]
    if retrain:
        lines.append(f"  --retrain: every run is trained again ({n} existing record(s) in {', '.join(folders)} "
                     f"are recomputed and overwritten); see params/{tier}/*.yml for the expected times")
    else:
        lines.append(f"  serving {n} run record(s) from {', '.join(folders)}: finished runs are read back, not "
                     "retrained; only runs without a record train")
        lines.append("  to retrain every run from scratch: python -m structlora reproduce --retrain "
                     f"--tier {tier} (or make reproduce RETRAIN=1)")
    return "\n".join(lines)


def pending_path(tier: str, root: Path | None = None) -> Path:
    """Where ``--records-only`` lists the runs the notebooks asked for and found no record of."""
    return (root or repo_root()) / "results" / f"pending.{tier}.jsonl"


def read_pending(path: Path) -> list[tuple[Any, str, bool]]:
    """``(RunSpec, results_dir, weights)`` per pending run in ``path``, each run once (weights wins)."""
    from .grid import RunSpec

    out: dict[tuple[str, str], tuple[Any, str, bool]] = {}
    for line in path.read_text(encoding="utf-8").splitlines() if path.is_file() else []:
        item = json.loads(line)
        spec = RunSpec.from_dict(item["spec"])
        k = (spec.key(), item["results_dir"])
        out[k] = (spec, item["results_dir"], bool(item["weights"]) or (k in out and out[k][2]))
    return list(out.values())


# The mechanism family's runs (claims.MECHANISM; r = 8, all the data), in the order the
# pending runs train, in waves of (task, method, method kwargs): within a wave seed by seed, so the paired comparisons grow
# together and a session that stops leaves whole seeds behind. Wave 1 is sst2's StructLoRA stages
# against LoRA; wave 2 the best-PEFT candidate and fmnist-transfer (which waits for a ViT that reaches
# ~0.9 on its own classes); everything else comes after.
PRIMARY_RUNS: tuple[tuple[tuple[str, str, dict[str, Any] | None], ...], ...] = (   # None: any kwargs
    (("sst2", "lora", {}), ("sst2", "structlora", {}), ("sst2", "structlora_no_gate", {}),
     ("sst2", "structlora_no_coord", {}), ("sst2", "structlora", {"graph": "adjacency"}),
     ("sst2", "structlora", {"learn_eta": False}), ("sst2", "filter_ib", None), ("sst2", "filter_random", None),
     ("sst2", "filter_topk_norm", None)),
    (("sst2", "dora", {}), ("fmnist-transfer", "lora", {}), ("fmnist-transfer", "structlora", {}),
     ("fmnist-transfer", "dora", {})),
)


def priority(spec: Any, plan: Any = None) -> tuple[int, int, int, str]:
    """Sort key of a pending run: first the registered ``plan``'s primary comparisons (both arms at
    their defaults), seed by seed and, within a seed, in the plan's order (so paired seeds grow together
    and a stop leaves whole pairs); then wave by wave of `PRIMARY_RUNS` (seed, then order); the rest
    after."""
    kw = spec.method_kwargs_dict()
    if plan is not None and spec.method in ("lora", "structlora") and not kw:
        for i, c in enumerate(plan.primary):
            if (spec.task, spec.rank) == (c.task, c.rank) and math.isclose(spec.fraction, c.fraction):
                return (0, spec.seed, i, spec.key())
    for w, wave in enumerate(PRIMARY_RUNS, start=1):
        for i, (task, method, want) in enumerate(wave):
            if (spec.task, spec.method, spec.rank, spec.fraction) == (task, method, 8, 1.0) and want in (None, kw):
                return (w, spec.seed, i, spec.key())
    return (len(PRIMARY_RUNS) + 1, spec.seed, 0, spec.key())


def list_pending(tier: str, root: Path | None = None) -> int:
    """Write `pending_path` from the tier's params (`tierspecs.tier_specs`): every run without a valid
    record under its notebook's ``RESULTS_DIR``, for ``--train-pending``."""
    root = root or repo_root()
    path = pending_path(tier, root)
    lines = _pending_lines(tier, root)
    atomic_write(path, "".join(line + "\n" for line in lines))
    print(f"{len(lines)} run(s) of tier {tier} have no record: listed in {path.relative_to(root)}; train them with\n"
          f"  python -m structlora reproduce --tier {tier} --train-pending [--executor submitit]")
    return 0


def _tier_runs(tier: str, root: Path, stems: Sequence[str] | None = None) -> list[tuple[Any, str]]:
    """``(RunSpec, RESULTS_DIR)`` of every run the tier's params ask for (of ``stems`` only, when given)."""
    from .notebook import tier_params
    from .tierspecs import tier_specs

    out = []
    for stem, specs in tier_specs(tier, root).items():
        if stems is None or stem in stems:
            folder = str((tier_params(stem, tier, root) or {}).get("RESULTS_DIR", "results/runs"))
            out += [(spec, folder) for spec in specs]
    return out


def _pending_lines(tier: str, root: Path, stems: Sequence[str] | None = None) -> list[str]:
    """The pending list's lines (``{"spec", "results_dir", "weights"}``) of the runs without a valid record."""
    from .grid import read_record, record_path

    lines = {}
    for spec, folder in _tier_runs(tier, root, stems):
        if read_record(root / record_path(spec, folder), spec, warn=False) is None:
            lines[(spec.key(), folder)] = json.dumps({"spec": spec.to_dict(), "results_dir": folder,
                                                      "weights": False}, sort_keys=True)
    return list(lines.values())


def retrain_runs(tier: str, stems: Sequence[str], since: float, root: Path, n_jobs: int = 2) -> None:
    """``--retrain`` for notebooks that do not declare ``RETRAIN_SINCE``: train again, before they run,
    every run of theirs (from the tier's specs) whose record is older than ``since``; a run whose
    weights file exists (a probed model) writes new weights too."""
    from .grid import run_grid, weights_path

    runs = _tier_runs(tier, root, stems)
    for folder in dict.fromkeys(folder for _, folder in runs):
        specs = [spec for spec, f in runs if f == folder]
        keep = [spec for spec in specs if weights_path(spec, root / folder).is_file()]
        run_grid(specs, root / folder, n_jobs=n_jobs, progress=True, keep_weights=keep, retrain_since=since)


def train_pending(tier: str, n_jobs: int = 2, root: Path | None = None, executor: str = "pool",
                  executor_options: dict[str, Any] | None = None) -> int:
    """Train the runs ``--records-only`` listed (`priority` order), ``n_jobs`` at a time; the models a
    notebook probes also keep their weights (``run_grid(keep_weights=...)``, as ``train_spec`` does).

    ``executor="submitit"``: one cluster job per run instead (`structlora.repro.executors`), with the
    resources of ``params/<tier>/cluster.yml`` and ``executor_options`` (the command line's) over them."""
    from .grid import run_grid

    from .plan import load_plan

    root = root or repo_root()
    path = pending_path(tier, root)
    plan = load_plan(tier, root)
    items = sorted(read_pending(path), key=lambda it: priority(it[0], plan))
    if not items:
        print(f"nothing pending in {path} (run python -m structlora reproduce --tier {tier} --records-only first)")
        return 0
    options = None
    if executor == "submitit":
        from .executors import load_cluster_options

        options = load_cluster_options(tier, root).override(executor_options or {})
        how = f"as submitit jobs ({options.default.cluster or 'SLURM where available, else local'})"
    else:
        how = f"{n_jobs} at a time"
    print(f"training {len(items)} pending run(s) of tier {tier} from {path.relative_to(root)}, {how}", flush=True)
    os.chdir(root)  # the notebooks' RESULTS_DIR are relative to the repository
    with sigterm_interrupts():  # `kill PID` stops the workers too (grid.stop_pool), not only this driver
        for folder in dict.fromkeys(folder for _, folder, _ in items):
            specs = [spec for spec, f, _ in items if f == folder]
            keep = [spec for spec, f, weights in items if f == folder and weights]
            df = run_grid(specs, results_dir=folder, n_jobs=n_jobs, progress=True, keep_weights=keep,
                          executor=executor, executor_options=options)
            print(f"{folder}: {', '.join(f'{k} {v}' for k, v in df['status'].value_counts().items())}", flush=True)
    return 0


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM raises ``KeyboardInterrupt`` in the main thread (as Ctrl-C does), so
    a background ``--train-pending`` stopped with ``kill`` unwinds and terminates its worker pool."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def _raise(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_all(tier: str = "cpu", only: Sequence[str] | None = None, force: bool = False, keep_going: bool = False,
            ledger: bool = True, log_output: bool = False, root: Path | None = None,
            update_notebooks: bool = False, retrain: bool = False, records_only: bool = False) -> int:
    """Run the notebooks of ``tier``; returns the process exit code (0 = all ok).

    ``records_only``: nothing trains; the notebooks show the runs without a record as pending, and the
    pending runs are listed in `pending_path` for ``--train-pending``."""
    from tqdm.auto import tqdm

    root = root or repo_root()
    results = root / "results"
    jobs = plan(tier, only, root, results)
    for job in jobs:  # TRAIN: records-only trains nothing; otherwise what has no record trains
        job.parameters["TRAIN"] = not records_only
    print(announce(tier, jobs, root, retrain), flush=True)
    declared = {job.stem: notebook_parameters(job.source) for job in jobs}
    if records_only:
        if retrain:
            raise SystemExit("--records-only and --retrain contradict each other")
        pending = pending_path(tier, root)
        pending.parent.mkdir(parents=True, exist_ok=True)
        pending.unlink(missing_ok=True)
        for job in jobs:
            if "PENDING_FILE" in declared[job.stem]:
                job.parameters["PENDING_FILE"] = str(pending)
        force = True  # cheap (nothing trains), and the copies must show the records as they are now
    if retrain:
        since = time.time()  # records older than this train again (once: a run shared by two notebooks)
        for job in jobs:
            if "RETRAIN_SINCE" in declared[job.stem]:
                job.parameters["RETRAIN_SINCE"] = since
        undeclared = [job.stem for job in jobs if "RETRAIN_SINCE" not in declared[job.stem]]
        if undeclared:
            retrain_runs(tier, undeclared, since, root)
        force = True
    t_all = time.perf_counter()
    failed = False
    bar = tqdm(jobs, desc=f"reproduce [{tier}]", unit="nb", position=0, dynamic_ncols=True)
    for job in bar:
        bar.set_postfix_str(job.stem)
        if failed and not keep_going:
            job.status = "not-run"
            continue
        if not force and up_to_date(job):
            job.status = "up-to-date"
            tqdm.write(f"[skip] {job.stem}: {job.output.relative_to(root)} is up to date (use --force to rerun)")
            continue
        run_job(job, root, log_output=log_output)
        if job.status == "ok":
            tqdm.write(f"[ok]   {job.stem}: {job.wall_s / 60:.1f} min -> {job.output.relative_to(root)}")
            if update_notebooks:
                dst = root / "notebooks" / f"{job.stem}.ipynb"
                kept = json.loads(job.output.read_text(encoding="utf-8")).get("metadata", {}).get("structlora")
                clean_executed(job.output, dst, root, marker=kept, drop_injected=True)  # marker: how it was executed
                tqdm.write(f"       updated {dst.relative_to(root)} with the {tier}-tier outputs")
        else:
            failed = True
            tqdm.write(f"[FAIL] {job.message}")
    bar.close()

    if ledger:
        from .claims import build_ledger

        df = build_ledger(results, tier=tier)
        suffix = "" if tier == "cpu" else f".{tier}"
        counts = df["verdict"].value_counts().to_dict() if len(df) else {}
        print(f"claims ledger: {results / f'CLAIMS{suffix}.md'} ({len(df)} claims: "
              f"{', '.join(f'{k} {v}' for k, v in sorted(counts.items())) or 'none'})"
              + (" -- PARTIAL, some notebooks failed" if failed else ""))
    print("\nsummary:")
    for j in jobs:
        t = f"{j.wall_s / 60:6.1f} min" if j.wall_s is not None else "       -  "
        print(f"  {j.stem:<28} {j.status:<11} {t}")
    print(f"  total wall time: {(time.perf_counter() - t_all) / 60:.1f} min")
    if records_only:
        undeclared = [job.stem for job in jobs if "PENDING_FILE" not in declared[job.stem]]
        if undeclared:  # their runs without a record, from the tier's specs (the notebooks did not list them)
            with open(pending_path(tier, root), "a", encoding="utf-8") as f:
                f.writelines(line + "\n" for line in _pending_lines(tier, root, undeclared))
        items = read_pending(pending_path(tier, root))
        print(f"\nrecords-only: {len(items)} run(s) have no record yet and are shown as pending "
              f"({sum(w for *_, w in items)} of them probed models); train them, primary family first, with\n"
              f"  python -m structlora reproduce --tier {tier} --train-pending [--jobs 2]")
    if failed:
        print("\nFAILED:", file=sys.stderr)
        for j in jobs:
            if j.status == "failed":
                print("  " + j.message, file=sys.stderr)
        return 1
    return 0


def add_arguments(p) -> None:
    p.add_argument("--tier", choices=TIERS, default="cpu",
                   help="smoke: seconds-long budgets (params/smoke/budget.yml); cpu: the 2-core collection "
                        "(protocol 2: ~11 h on 2 cores when no run record is committed; minutes from the records); "
                        "gpu: the larger budgets (see docs/notebooks.md); paper: the paper's hub models "
                        "(params/paper, each task's model from its budget.yml's task_model; see the README)")
    p.add_argument("--only", action="append", metavar="NB",
                   help="run only notebooks whose name starts with NB (e.g. 02 or 02_rank_sweep); repeatable, "
                        "comma-separated lists accepted")
    p.add_argument("--force", action="store_true", help="re-execute notebooks whose executed copy is up to date "
                   "(finished runs are still read back from their records)")
    p.add_argument("--retrain", action="store_true", help="train every run again, ignoring and overwriting the "
                   "committed run records (hours on the cpu tier: see params/<tier>/*.yml); implies --force")
    p.add_argument("--keep-going", action="store_true", help="run the remaining notebooks after a failure")
    p.add_argument("--no-ledger", action="store_true", help="do not rebuild results/CLAIMS.md at the end")
    p.add_argument("--log-output", action="store_true", help="stream the notebooks' cell output to the terminal")
    p.add_argument("--records-only", action="store_true",
                   help="train nothing: show runs without a record as pending and list them in "
                        "results/pending.<tier>.jsonl (minutes on any tier)")
    p.add_argument("--train-pending", action="store_true",
                   help="train the runs the last --records-only job listed, the pre-registered primary family "
                        "first (resumable: stop any time, finished runs keep their records); then rerun the job")
    p.add_argument("--jobs", type=int, default=2, help="--train-pending: runs side by side (1 torch thread each)")
    p.add_argument("--dry-run", action="store_true",
                   help="run nothing at scale: build every kind of run of the tier (one per model, method and method "
                        "keywords) on a tiny random model of the same architecture and synthetic data of the same "
                        "schema, train 2 steps and write a record to a temporary folder (offline, ~1 min on a CPU)")
    p.add_argument("--list-pending", action="store_true",
                   help="write results/pending.<tier>.jsonl from the tier's params alone (structlora.repro.tierspecs), "
                        "without executing the notebooks: every run without a record, for --train-pending")
    add_executor_arguments(p)
    p.add_argument("--update-notebooks", action="store_true",
                   help="(cpu tier, with --records-only) also write the executed notebooks, without volatile "
                        "metadata, over notebooks/<nb>.ipynb: how the committed cpu-tier outputs are refreshed")


# --train-pending --executor submitit: the command line's resources, over params/<tier>/cluster.yml
_EXECUTOR_FLAGS = (("--cluster", "cluster", str, "slurm, local or debug (default: SLURM where sbatch exists, else local)"),
                   ("--partition", "partition", str, "SLURM partition"),
                   ("--timeout-min", "timeout_min", int, "wall-clock limit of each job, minutes"),
                   ("--gpus", "gpus_per_node", int, "GPUs per job"),
                   ("--cpus-per-task", "cpus_per_task", int, "CPU cores per job (its torch threads)"),
                   ("--mem-gb", "mem_gb", float, "memory per job, GB"),
                   ("--array-parallelism", "array_parallelism", int, "jobs of one array running at once"),
                   ("--max-retries", "max_retries", int, "resubmissions of a job that died without a result"),
                   ("--submitit-folder", "folder", str, "submitit's pickles and logs (default results/submitit)"))


def add_executor_arguments(p) -> None:
    """``--executor`` and the submitit resource flags of ``--train-pending``."""
    p.add_argument("--executor", choices=("pool", "submitit"), default="pool",
                   help="--train-pending: this machine's process pool (--jobs), or one cluster job per run through "
                        "submitit (SLURM job arrays; resources from params/<tier>/cluster.yml and the flags below)")
    for flag, dest, kind, text in _EXECUTOR_FLAGS:
        p.add_argument(flag, dest=f"submitit_{dest}", type=kind, default=None, help=f"--executor submitit: {text}",
                       metavar={int: "N", float: "GB"}.get(kind, "NAME"),
                       **({"choices": ("slurm", "local", "debug")} if dest == "cluster" else {}))


def executor_options(args) -> dict[str, Any]:
    """The submitit options the command line set (None: not set, the tier's cluster.yml decides)."""
    return {dest: getattr(args, f"submitit_{dest}", None) for _, dest, _, _ in _EXECUTOR_FLAGS}


def main(args) -> int:
    if args.update_notebooks and (args.tier != OWN_CELL_TIER or not args.records_only):
        raise SystemExit("--update-notebooks: the committed notebooks carry the cpu tier executed from the records "
                         "(use --tier cpu --records-only)")
    if args.dry_run:
        from .dryrun import main as dry_run_main

        return dry_run_main(args.tier)
    if args.list_pending:
        return list_pending(args.tier)
    if args.train_pending:
        return train_pending(args.tier, n_jobs=args.jobs, executor=args.executor,
                             executor_options=executor_options(args))
    if args.executor != "pool":
        raise SystemExit("--executor: only --train-pending trains runs outside the notebooks")
    return run_all(tier=args.tier, only=args.only, force=args.force, keep_going=args.keep_going,
                   ledger=not args.no_ledger, log_output=args.log_output, update_notebooks=args.update_notebooks,
                   retrain=args.retrain, records_only=args.records_only)
