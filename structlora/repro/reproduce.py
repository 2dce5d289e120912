"""The main job: execute the reproduction notebooks in order and collect their claims.

``python -m structlora reproduce --tier cpu`` (``make reproduce``) runs every ``notebooks/0*`` notebook
with papermill, parameters from ``params/<tier>/<notebook>.yml`` (tier ``smoke`` uses the notebook's own
parameters cell), into ``results/executed/<notebook>.<tier>.ipynb``, then builds the claims ledger
(``results/CLAIMS.md`` + ``results/claims.csv`` for the cpu tier; ``CLAIMS.<tier>.md`` for the others).

* The jupytext ``.py`` file is the source of truth: when a notebook has one, it is converted in memory
  and executed (so an ``.ipynb`` that was not re-synced can never run stale code).
* Resuming: the training engine caches every finished run under the notebook's ``results_dir``, so an
  interrupted job picks up where it stopped. A notebook whose executed copy finished without error, is
  newer than its source and parameter file, and was run with the same parameters, is skipped unless
  ``--force``.
* A failing cell stops the job (``--keep-going`` runs the remaining notebooks first) with the notebook
  name, the cell number, the first line of its source, the error and the path of the executed copy;
  the exit code is non-zero.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .._io import atomic_write

__all__ = ["TIERS", "NotebookJob", "discover", "plan", "run_all", "main"]

TIERS = ("smoke", "cpu", "gpu")


def repo_root() -> Path:
    """The repository root: the first parent of this file (or of the cwd) holding ``notebooks/``."""
    for base in (Path.cwd(), Path(__file__).resolve().parent.parent):
        for p in (base, *base.parents):
            if (p / "notebooks").is_dir() and (p / "structlora").is_dir():
                return p
    return Path.cwd()


@dataclass
class NotebookJob:
    stem: str
    source: Path                 # the .py (preferred) or the .ipynb
    params_file: Path | None     # None for the smoke tier
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
        if tier != "smoke":
            pfile = root / "params" / tier / f"{stem}.yml"
            if not pfile.exists():
                raise SystemExit(f"missing parameter file {pfile.relative_to(root)} for notebook {stem} "
                                 f"(tier {tier}); every notebook needs one per non-smoke tier")
            params = load_params(pfile)
        if params.get("TIER", tier) != tier:
            raise SystemExit(f"{pfile}: TIER is {params['TIER']!r} but the job runs tier {tier!r}")
        if tier != "smoke":  # smoke: the notebook's own parameters cell, nothing injected
            params["TIER"] = tier
        jobs.append(NotebookJob(stem, src, pfile, results / "executed" / f"{stem}.{tier}.ipynb", params))
    return jobs


def _sources(job: NotebookJob) -> list[Path]:
    paths = [job.source]  # the .py when there is one (what runs); the paired .ipynb only carries smoke outputs
    if job.params_file:
        paths.append(job.params_file)
    return [p for p in paths if p.exists()]


def up_to_date(job: NotebookJob) -> bool:
    """Executed copy exists, finished without error, is newer than the sources, same parameters."""
    out = job.output
    if not out.exists():
        return False
    if any(p.stat().st_mtime > out.stat().st_mtime for p in _sources(job)):
        return False
    try:
        meta = json.loads(out.read_text(encoding="utf-8")).get("metadata", {}).get("papermill", {})
    except (OSError, json.JSONDecodeError):
        return False
    if meta.get("exception") or meta.get("end_time") is None:
        return False
    return meta.get("parameters", {}) == json.loads(json.dumps(job.parameters))


def _input_notebook(job: NotebookJob, tmpdir: Path) -> Path:
    """The notebook papermill executes: the .py converted by jupytext, else the .ipynb itself."""
    if job.source.suffix == ".py":
        import jupytext

        nb = jupytext.read(job.source)
        nb.metadata.setdefault("kernelspec", {"name": "python3", "display_name": "Python 3", "language": "python"})
        path = tmpdir / f"{job.stem}.ipynb"
        jupytext.write(nb, path)
        return path
    return job.source


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
            )
            job.status = "ok"
        except BaseException as err:  # noqa: BLE001 - reported, then re-raised as a job failure
            job.status = "failed"
            job.message = _describe_failure(job, err)
            if isinstance(err, KeyboardInterrupt):
                raise
        finally:
            job.wall_s = time.perf_counter() - t0


_VOLATILE_CELL_META = ("papermill", "execution", "ExecuteTime")


def clean_executed(src: Path, dst: Path) -> None:
    """Copy an executed notebook to ``dst`` without volatile metadata (papermill timings, execution
    timestamps, empty tag lists), so the committed smoke-tier ``.ipynb`` diffs only where outputs change."""
    import nbformat

    nb = nbformat.read(src, as_version=4)
    nb.metadata.pop("papermill", None)
    for cell in nb.cells:
        for k in _VOLATILE_CELL_META:
            cell.metadata.pop(k, None)
        if "tags" in cell.metadata and not cell.metadata["tags"]:
            del cell.metadata["tags"]
    text = nbformat.writes(nb)
    atomic_write(dst, text if text.endswith("\n") else text + "\n")


def run_all(tier: str = "cpu", only: Sequence[str] | None = None, force: bool = False, keep_going: bool = False,
            ledger: bool = True, log_output: bool = False, root: Path | None = None,
            update_notebooks: bool = False) -> int:
    """Run the notebooks of ``tier``; returns the process exit code (0 = all ok)."""
    from tqdm.auto import tqdm

    root = root or repo_root()
    results = root / "results"
    jobs = plan(tier, only, root, results)
    print(f"structlora reproduce: tier {tier}, {len(jobs)} notebook(s): {', '.join(j.stem for j in jobs)}", flush=True)
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
                clean_executed(job.output, dst)
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
    if failed:
        print("\nFAILED:", file=sys.stderr)
        for j in jobs:
            if j.status == "failed":
                print("  " + j.message, file=sys.stderr)
        return 1
    return 0


def add_arguments(p) -> None:
    p.add_argument("--tier", choices=TIERS, default="cpu",
                   help="smoke: seconds-long budgets (the notebooks' own parameters); cpu: the 2-core collection "
                        "(~2 h); gpu: the larger budgets (see docs/notebooks.md)")
    p.add_argument("--only", action="append", metavar="NB",
                   help="run only notebooks whose name starts with NB (e.g. 02 or 02_rank_sweep); repeatable, "
                        "comma-separated lists accepted")
    p.add_argument("--force", action="store_true", help="rerun notebooks whose executed copy is up to date")
    p.add_argument("--keep-going", action="store_true", help="run the remaining notebooks after a failure")
    p.add_argument("--no-ledger", action="store_true", help="do not rebuild results/CLAIMS.md at the end")
    p.add_argument("--log-output", action="store_true", help="stream the notebooks' cell output to the terminal")
    p.add_argument("--update-notebooks", action="store_true",
                   help="(smoke tier only) also write the executed notebooks, without volatile metadata, over "
                        "notebooks/<nb>.ipynb: how the committed smoke-tier outputs are refreshed")


def main(args) -> int:
    if args.update_notebooks and args.tier != "smoke":
        raise SystemExit("--update-notebooks: the committed notebooks carry smoke-tier outputs only (use --tier smoke)")
    return run_all(tier=args.tier, only=args.only, force=args.force, keep_going=args.keep_going,
                   ledger=not args.no_ledger, log_output=args.log_output, update_notebooks=args.update_notebooks)
