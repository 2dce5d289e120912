"""What every notebook shares: the tier's one budget (``params/<tier>/budget.yml``).

A tier's budget is one file for all six notebooks, so the notebooks cannot drift apart:

    BUDGET = load_budget(TIER)                        # after the parameters cell
    RunSpec.make(task, model, method, **BUDGET.run(model, method), ...)

``models`` holds each model's training budget (steps, batch size, sequence length, evaluation period,
evaluation subset); ``lr`` each model's learning rate per method, selected on validation by the pilot
(``scripts/pilot.py lr``) and then frozen, with a ``default``; the StructLoRA ablation variants
(``STRUCTLORA_FAMILY``) inherit StructLoRA's rate. ``seed_cap`` is the most seeds the tier runs for a
comparison (claims that the power analysis says need more are *undecidable at this scale*).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from . import methods as _methods  # noqa: F401  (registers every method in the catalogue)
from .assets import tasks as _tasks  # noqa: F401  (registers every task in the catalogue)
from .catalogue import LiveSeq, get_method, method_specs, task_view
from .layout import OWN_CELL_TIER, notebook_parameters, params_path, repo_root

__all__ = ["findings", "Budget", "load_budget", "budget_path", "tier_params", "wall_time", "run_summary", "STRUCTLORA_FAMILY", "BUDGET_KEYS", "TASK_MODEL", "peer_tiers"]

# The offline model each offline task trains (its stand-in for the paper's model, docs/notebooks.md;
# TaskSpec.model), a live view of the catalogue: the default of a tier's ``Budget.task_model``, which the
# notebooks read (the paper tier's budget names its hub tasks' models instead).
TASK_MODEL: Mapping[str, str] = task_view(lambda t: t.model, keep=lambda t: t.model is not None and t.hub is None)
BUDGET_KEYS = ("max_steps", "batch_size", "max_length", "eval_every", "max_eval_examples")
# optional per-model regime keys (RunSpec fields whose defaults stay out of the run key): the paper tier's
# hub models train under bf16 autocast with gradient checkpointing
REGIME_KEYS = ("precision", "gradient_checkpointing")
# methods that are StructLoRA with a stage removed, changed or replaced: they train at StructLoRA's rate
# (MethodSpec.lr_from), a live view of the catalogue
STRUCTLORA_FAMILY: Sequence[str] = LiveSeq(lambda: tuple(s.name for s in method_specs() if s.lr_from == "structlora"))


def _lr_from(method: str) -> str | None:
    """The method whose learning rate ``method`` trains at (None: its own, or not a catalogue method)."""
    try:
        return get_method(method).lr_from
    except ValueError:
        return None


def budget_path(tier: str, root: str | Path | None = None) -> Path:
    """``<repo>/params/<tier>/budget.yml``."""
    return params_path(tier, "budget.yml", root)


@dataclass
class Budget(Mapping[str, dict]):
    """One tier's budget; ``BUDGET[model]`` is the model's budget with its default learning rate."""

    tier: str
    models: dict[str, dict[str, Any]]
    lr: dict[str, dict[str, float]] = field(default_factory=dict)
    seed_cap: int = 3
    source: str = ""
    task_model: dict[str, str] = field(default_factory=lambda: dict(TASK_MODEL))

    def __post_init__(self) -> None:
        if self.task_model != dict(TASK_MODEL):   # a tier's own models (the paper tier's hub ids) need budgets
            missing = sorted({m for m in self.task_model.values() if m not in self.models})
            if missing:
                raise ValueError(f"{self.source}: task_model names model(s) {missing} without a budget in models")
        for model, b in self.models.items():
            missing = [k for k in BUDGET_KEYS if k not in b]
            unknown = [k for k in b if k not in BUDGET_KEYS + REGIME_KEYS]
            if missing or unknown:
                raise ValueError(f"{self.source}: model {model!r}: missing {missing}, unknown {unknown} "
                                 f"(a model's budget has exactly {list(BUDGET_KEYS)})")
            if "default" not in self.lr.get(model, {}):
                raise ValueError(f"{self.source}: lr.{model}.default is required")
        if not isinstance(self.seed_cap, int) or self.seed_cap < 2:
            raise ValueError(f"{self.source}: seed_cap must be an int >= 2, got {self.seed_cap!r}")

    def __getitem__(self, model: str) -> dict[str, Any]:
        if model not in self.models:
            raise KeyError(f"no budget for model {model!r} in {self.source} (models: {sorted(self.models)})")
        return {**self.models[model], "lr": self.lr_of(model, "default")}

    def __iter__(self):
        return iter(self.models)

    def __len__(self) -> int:
        return len(self.models)

    def lr_of(self, model: str, method: str) -> float:
        """The method's frozen learning rate on ``model``, else that of the method it inherits its rate
        from (`MethodSpec.lr_from`: StructLoRA's for its ablation variants), else the model's default."""
        table = self.lr.get(model, {})
        if method in table:
            return float(table[method])
        inherit = _lr_from(method)
        if inherit is not None and inherit in table:
            return float(table[inherit])
        return float(table["default"])

    def run(self, model: str, method: str) -> dict[str, Any]:
        """RunSpec keyword arguments: the model's budget at the method's learning rate."""
        return {**self.models[model], "lr": self.lr_of(model, method)} if model in self.models else self[model]


def load_budget(tier: str, root: str | Path | None = None) -> Budget:
    """Read ``params/<tier>/budget.yml`` (keys ``models``, ``lr``, ``seed_cap`` and, for a tier on other
    models than the offline ones, ``task_model``: the model each task trains, default `TASK_MODEL`)."""
    import yaml

    path = budget_path(tier, root)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: every tier needs one budget file")
    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    unknown = sorted(set(data) - {"models", "lr", "seed_cap", "task_model"})
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown} (expected models, lr, seed_cap, task_model)")
    return Budget(tier, data.get("models") or {}, data.get("lr") or {}, data.get("seed_cap", 3), str(path),
                  dict(data.get("task_model") or dict(TASK_MODEL)))


def peer_tiers(tier: str, root: str | Path | None = None, tiers: Sequence[str] = ("cpu", "gpu")) -> list[str]:
    """The tiers of ``tiers`` (``tier`` left out) whose budgets train every task on the same model as
    ``tier``'s (``Budget.task_model``): the coverage tables of notebooks 01 and 04 show their runs beside
    ``tier``'s (the paper tier's hub models have no peer: a cell of another model's runs would not compare)."""
    own = load_budget(tier, root).task_model
    return [t for t in tiers if t != tier and load_budget(t, root).task_model == own]


def run_summary(df: "Any") -> str:
    """One line over a grid's frame: runs ok (and how many converged: best validation step before the
    last evaluation, `grid.converged`), skipped and diverged, and the runs pending (no record yet, in
    records-only mode: ``reproduce --records-only``)."""
    status = df["status"] if "status" in df else []
    ok = df[status == "ok"] if len(df) else df
    conv = ok["converged"] if "converged" in ok else None
    n_conv = int(conv.fillna(False).astype(bool).sum()) if conv is not None else 0
    return (f"{len(ok)} runs ok ({n_conv} converged: best validation step before the last evaluation), "
            f"{int((status == 'skipped').sum()) if len(df) else 0} skipped, "
            f"{int((status == 'diverged').sum()) if len(df) else 0} diverged"
            + (f", {n_pending} PENDING (no record yet: python -m structlora reproduce --train-pending)"
               if (n_pending := int((status == 'pending').sum()) if len(df) else 0) else ""))


def tier_params(notebook: str, tier: str, root: str | Path | None = None) -> dict[str, Any] | None:
    """A tier's parameters of a notebook: the cpu tier's are the notebook's own parameters cell, the
    others' ``params/<tier>/<notebook>.yml`` (what papermill injects); None when there is none."""
    import yaml

    root = Path(root or repo_root())
    if tier == OWN_CELL_TIER:
        source = root / "notebooks" / f"{notebook}.py"
        return notebook_parameters(source) if source.exists() else None
    path = root / "params" / tier / f"{notebook}.yml"
    return yaml.safe_load(path.read_text()) if path.exists() else None


def findings(notebook: str, tier: str, root: str | Path | None = None) -> str:
    """What the notebook found, in one line per claim, generated from its last execution's claims (the
    cpu tier: the ledger ``results/claims.csv``, whose primary claims carry their family-wise verdict;
    other tiers: ``results/claims/<notebook>.<tier>.json``). Shown at the top of each notebook."""
    from .claims import read_claims

    results = Path(root or repo_root()) / "results"
    ledger = results / "claims.csv"
    if tier == "cpu" and ledger.exists():
        import pandas as pd

        df = pd.read_csv(ledger)
        df = df[df["notebook"] == notebook]
    else:
        df = read_claims(results, tier=tier)
        df = df[df["notebook"] == notebook] if len(df) else df
    if not len(df):
        return f"_No claims of this notebook for the {tier} tier yet: they appear here once it has run to the end._"
    lines = []
    for r in df.itertuples(index=False):
        family = getattr(r, "family", "")
        tag = f" ({family})" if isinstance(family, str) and family and family != "exploratory" else ""
        lines.append(f"- **{r.verdict}**{tag}: {r.claim} (paper {r.paper_value}; ours {r.ours}, n = {r.n})")
    return "\n".join(lines)


def wall_time(t0: float, c0: float | None = None) -> str:
    """The notebook's closing line: wall time since ``t0`` (``time.perf_counter``), and with ``c0``
    (``time.process_time``) the process's CPU time, core count and load average, which say whether the
    wall time was measured on idle cores."""
    import os
    import time

    line = f"notebook wall time: {(time.perf_counter() - t0) / 60:.1f} min"
    if c0 is not None:
        line += (f" (this process's CPU time {(time.process_time() - c0) / 60:.1f} min on {os.cpu_count()} cores, "
                 f"load average {os.getloadavg()[0]:.1f})")
    return line
