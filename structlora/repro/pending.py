"""The runs without a record: the pending list (``results/pending.<tier>.jsonl``) that ``--records-only``
and ``--list-pending`` write, the order ``--train-pending`` trains it in (`priority`, `PRIMARY_RUNS`),
training it, and ``--retrain`` for the notebooks that do not declare ``RETRAIN_SINCE``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
from pathlib import Path
from typing import Any, Iterator, Sequence

from .._io import atomic_write
from .layout import repo_root

__all__ = ["PRIMARY_RUNS", "pending_path", "read_pending", "priority", "list_pending", "tier_runs", "pending_lines",
           "retrain_runs", "train_pending", "sigterm_interrupts"]


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
    lines = pending_lines(tier, root)
    atomic_write(path, "".join(line + "\n" for line in lines))
    print(f"{len(lines)} run(s) of tier {tier} have no record: listed in {path.relative_to(root)}; train them with\n"
          f"  python -m structlora reproduce --tier {tier} --train-pending [--executor submitit]")
    return 0


def tier_runs(tier: str, root: Path, stems: Sequence[str] | None = None) -> list[tuple[Any, str]]:
    """``(RunSpec, RESULTS_DIR)`` of every run the tier's params ask for (of ``stems`` only, when given)."""
    from .notebook import tier_params
    from .tierspecs import tier_specs

    out = []
    for stem, specs in tier_specs(tier, root).items():
        if stems is None or stem in stems:
            folder = str((tier_params(stem, tier, root) or {}).get("RESULTS_DIR", "results/runs"))
            out += [(spec, folder) for spec in specs]
    return out


def pending_lines(tier: str, root: Path, stems: Sequence[str] | None = None) -> list[str]:
    """The pending list's lines (``{"spec", "results_dir", "weights"}``) of the runs without a valid record,
    and of notebook 05's probed models (`tierspecs.tier_probes`) without their weights too ("weights":
    true, so ``--train-pending`` keeps them and the probe never has to retrain)."""
    from .grid import read_record, record_path, weights_path
    from .notebook import tier_params
    from .tierspecs import tier_probes

    lines = {}

    def add(spec: Any, folder: str, weights: bool) -> None:
        lines[(spec.key(), folder)] = json.dumps({"spec": spec.to_dict(), "results_dir": folder,
                                                  "weights": weights}, sort_keys=True)

    for spec, folder in tier_runs(tier, root, stems):
        if read_record(root / record_path(spec, folder), spec, warn=False) is None:
            add(spec, folder, False)
    stem = "05_filter_strategies"
    if stems is None or stem in stems:
        folder = str((tier_params(stem, tier, root) or {}).get("RESULTS_DIR", "results/runs"))
        for spec in tier_probes(tier, root):
            if (read_record(root / record_path(spec, folder), spec, warn=False) is None
                    or not weights_path(spec, root / folder).is_file()):
                add(spec, folder, True)
    return list(lines.values())


def retrain_runs(tier: str, stems: Sequence[str], since: float, root: Path, n_jobs: int = 2) -> None:
    """``--retrain`` for notebooks that do not declare ``RETRAIN_SINCE``: train again, before they run,
    every run of theirs (from the tier's specs) whose record is older than ``since``; a run whose
    weights file exists (a probed model) writes new weights too."""
    from .grid import run_grid, weights_path

    runs = tier_runs(tier, root, stems)
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
