"""Which notebooks a tier's job runs, with which parameters: discovery (the ``.py`` twin wins), the
parameters files and their checks, the sha256 that decides whether an executed copy is up to date, and
what the job announces before it starts.
"""
from __future__ import annotations

import difflib
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .layout import OWN_CELL_TIER, TIERS, notebook_parameters, repo_root

__all__ = ["JOB_PARAMETERS", "NotebookJob", "discover", "check_params", "load_params", "plan", "sources_sha256",
           "kept_parameters", "up_to_date", "count_records", "announce"]

JOB_PARAMETERS = ("PENDING_FILE", "RETRAIN_SINCE")
"""Parameters the job injects (records-only's pending list, retrain's start time) into a notebook that
declares them: a tier's params file need not set them, and they are not part of an executed copy's
``sources_sha256`` or metadata (a path or a time of one execution)."""


@dataclass
class NotebookJob:
    """One notebook of a tier's job: its source, parameters file and parameters, executed copy and outcome."""

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
    """A tier's parameters file (YAML mapping of parameter names to values)."""
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
    h.update(json.dumps(kept_parameters(job.parameters), sort_keys=True, default=str).encode())
    return h.hexdigest()


def kept_parameters(parameters: dict[str, Any]) -> dict[str, Any]:
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
