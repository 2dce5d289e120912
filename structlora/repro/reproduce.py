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

This module is the job itself (`run_all`, `main`); which notebooks run with which parameters is
`structlora.repro.jobs`, executing one `structlora.repro.execute`, the pending list and its training
`structlora.repro.pending`, the command line's arguments `structlora.repro.reproduce_args`; their public
names are re-exported here.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from .execute import clean_executed, run_job, strip_noise
from .jobs import (JOB_PARAMETERS, NotebookJob, announce, check_params, count_records, discover, load_params, plan,
                   sources_sha256, up_to_date)
from .layout import OWN_CELL_TIER, TIERS, notebook_parameters, repo_root
from .pending import (PRIMARY_RUNS, list_pending, pending_lines, pending_path, priority, read_pending, retrain_runs,
                      sigterm_interrupts, train_pending)
from .reproduce_args import add_arguments, add_executor_arguments, executor_options

__all__ = ["TIERS", "JOB_PARAMETERS", "NotebookJob", "discover", "plan", "run_all", "main",
           # re-exported from the modules the job was split into (tests, scripts and docs import them from here)
           "OWN_CELL_TIER", "repo_root", "notebook_parameters", "check_params", "load_params", "sources_sha256",
           "up_to_date", "count_records", "announce", "run_job", "strip_noise", "clean_executed", "PRIMARY_RUNS",
           "pending_path", "read_pending", "priority", "list_pending", "pending_lines", "retrain_runs",
           "train_pending", "sigterm_interrupts", "add_arguments", "add_executor_arguments", "executor_options"]


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
                f.writelines(line + "\n" for line in pending_lines(tier, root, undeclared))
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


def main(args: argparse.Namespace) -> int:
    """Run the ``reproduce`` command line's choice (the job, ``--dry-run``, ``--list-pending`` or ``--train-pending``)."""
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
