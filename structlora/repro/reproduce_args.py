"""The ``python -m structlora reproduce`` command line: its arguments (tier, notebooks, modes) and the
submitit resource flags of ``--train-pending --executor submitit``.
"""
from __future__ import annotations

import argparse
from typing import Any

from .layout import TIERS

__all__ = ["add_arguments", "add_executor_arguments", "executor_options"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``reproduce`` command's arguments."""
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


def add_executor_arguments(p: argparse.ArgumentParser) -> None:
    """``--executor`` and the submitit resource flags of ``--train-pending``."""
    p.add_argument("--executor", choices=("pool", "submitit"), default="pool",
                   help="--train-pending: this machine's process pool (--jobs), or one cluster job per run through "
                        "submitit (SLURM job arrays; resources from params/<tier>/cluster.yml and the flags below)")
    for flag, dest, kind, text in _EXECUTOR_FLAGS:
        p.add_argument(flag, dest=f"submitit_{dest}", type=kind, default=None, help=f"--executor submitit: {text}",
                       metavar={int: "N", float: "GB"}.get(kind, "NAME"),
                       **({"choices": ("slurm", "local", "debug")} if dest == "cluster" else {}))


def executor_options(args: argparse.Namespace) -> dict[str, Any]:
    """The submitit options the command line set (None: not set, the tier's cluster.yml decides)."""
    return {dest: getattr(args, f"submitit_{dest}", None) for _, dest, _, _ in _EXECUTOR_FLAGS}
