"""The registered plan of a tier (``params/<tier>/plan.yml``): its primary family, pilot, seeds and budget.

The plan is committed before its confirmatory runs (git history is the proof). This module reads and
validates it, builds the runs it names, and applies its two declared rules:

- **seeds from the pilot** (`seeds_from_pilot`): sigma_d of each task is pooled over that task's primary
  comparisons at the pilot seeds (pooled variance = mean of the per-comparison variances of the paired
  difference); each claim needs ``n = max(len(pilot_seeds), stats.seeds_needed(sigma, paper,
  fraction=0.5, confidence=1 - alpha/m))``: its family-wise interval then has a half-width of half the
  paper's effect. Claims are funded cheapest first (n x the task's median run cost) while the core-hour
  budget lasts; an unfunded claim keeps its pilot seeds and is *undecidable at this scale*;
- **exploratory points while the budget lasts** (`fund_exploratory`): after the primary family, the
  other points of notebooks 02-03 (r = 16, 32, 50% data) get their seeds (3) cheapest first while the
  budget left buys them; an unfunded point (0 seeds) is *undecidable at this scale* and is not run;
- **family-wise intervals** (`familywise_interval`): every verdict of the family is read from the
  paired t-interval at confidence ``1 - alpha/m`` (Bonferroni), so each branch of `stats.decide`
  (reproduced, smaller than claimed, not reproduced) holds with family-wise error <= alpha.

Hand-written: no library plans paired-seed experiments under a compute budget.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

from .layout import params_path

__all__ = ["Comparison", "Plan", "exploratory_block", "familywise_interval", "fund_exploratory", "load_plan",
           "plan_path", "pooled_sigma", "seeds_from_pilot"]


def plan_path(tier: str, root: str | Path | None = None) -> Path:
    """``<repo>/params/<tier>/plan.yml``."""
    return params_path(tier, "plan.yml", root)


@dataclass(frozen=True)
class Comparison:
    """One primary comparison: StructLoRA minus LoRA on ``task`` at ``rank`` and data ``fraction``."""

    claim: str       # the claim id the notebooks write (e.g. "T3.sst2.r2.structlora>lora")
    task: str        # a task of the tier (its model: notebook.TASK_MODEL)
    rank: int        # LoRA rank r of both arms
    fraction: float  # share of the training split both arms train on
    paper: float     # the paper's difference, in accuracy points

    def __post_init__(self) -> None:
        if self.rank < 1 or not 0 < self.fraction <= 1 or not math.isfinite(self.paper) or self.paper == 0:
            raise ValueError(f"bad primary comparison {self}: need rank >= 1, 0 < fraction <= 1, paper != 0")


@dataclass
class Plan:
    """A tier's registered plan (see the module docstring and the plan file's comments)."""

    name: str
    primary: list[Comparison]
    pilot_seeds: list[int]                      # the internal pilot, reused in the confirmatory test
    budget_core_hours: float                    # every run of the plan, pilots and pretraining included
    alpha: float = 0.05                         # family-wise error of the primary family
    seeds: dict[str, int] = field(default_factory=dict)   # claim -> seeds bought, filled from the pilot
    needed: dict[str, int] = field(default_factory=dict)  # claim -> seeds the power analysis asks for
    budget_check: dict[str, Any] = field(default_factory=dict)
    # exploratory point -> {"seeds": n (0: unfunded), "cost_core_hours": what its seeds cost}, and the
    # core-hours spent when that was decided (`fund_exploratory`); empty until then
    exploratory: dict[str, dict[str, float]] = field(default_factory=dict)
    exploratory_spent: float | None = None
    source: str = ""

    def __post_init__(self) -> None:
        ids = [c.claim for c in self.primary]
        if not ids or len(set(ids)) != len(ids):
            raise ValueError(f"{self.source}: the primary family must list distinct claims, got {ids}")
        if len(self.pilot_seeds) < 2 or len(set(self.pilot_seeds)) != len(self.pilot_seeds):
            raise ValueError(f"{self.source}: pilot_seeds must be >= 2 distinct seeds, got {self.pilot_seeds}")
        if not 0 < self.alpha < 1 or not self.budget_core_hours > 0:
            raise ValueError(f"{self.source}: need 0 < alpha < 1 and budget_core_hours > 0")
        unknown = sorted((set(self.seeds) | set(self.needed)) - set(ids))
        if unknown:
            raise ValueError(f"{self.source}: seeds for claims outside the primary family: {unknown}")
        small = {k: v for k, v in self.seeds.items() if v < len(self.pilot_seeds)}
        if small:
            raise ValueError(f"{self.source}: a claim runs at least its pilot seeds, got {small}")
        factor = self.budget_check.get("factor", 1)
        if not isinstance(factor, int) or factor < 1:
            raise ValueError(f"{self.source}: budget_check.factor must be an int >= 1, got {factor!r}")
        tasks = {c.task for c in self.primary}
        stray = sorted(set(self.budget_check.get("result") or {}) - tasks)
        if stray:
            raise ValueError(f"{self.source}: budget_check.result names tasks outside the plan: {stray}")
        both = sorted(set(self.exploratory) & set(ids))
        bad = {k: v for k, v in self.exploratory.items()
               if set(v) != {"seeds", "cost_core_hours"} or int(v["seeds"]) < 0 or float(v["cost_core_hours"]) < 0}
        if both or bad or (bool(self.exploratory) != (self.exploratory_spent is not None)):
            raise ValueError(f"{self.source}: exploratory points need seeds >= 0, cost_core_hours >= 0, a "
                             f"spent_core_hours, and ids outside the primary family (got {both or bad or 'no spend'})")
        self.exploratory = {k: {"seeds": int(v["seeds"]), "cost_core_hours": float(v["cost_core_hours"])}
                            for k, v in self.exploratory.items()}

    @property
    def m(self) -> int:
        """The size of the primary family (Bonferroni's m)."""
        return len(self.primary)

    def seeds_of(self, claim: str) -> list[int]:
        """The seeds ``claim`` runs: its planned count once the pilot set it, else the pilot seeds."""
        n = self.seeds.get(claim, len(self.pilot_seeds))
        extra = [s for s in range(max(self.pilot_seeds) + 1, 10_000) if s not in self.pilot_seeds]
        return list(self.pilot_seeds) + extra[: max(0, n - len(self.pilot_seeds))]

    def comparison(self, claim: str) -> Comparison | None:
        return next((c for c in self.primary if c.claim == claim), None)

    def power(self, claim: str) -> dict[str, int]:
        """`claims.claim_from_test` arguments of a primary claim whose seeds the pilot set: the seeds its
        power analysis needs against the seeds the budget bought (more needed than bought: undecidable
        at this scale); ``{}`` for any other claim."""
        if self.comparison(claim) is None or claim not in self.needed:
            return {}
        return {"seeds_required": self.needed[claim], "seeds_cap": len(self.seeds_of(claim))}

    def exploratory_seeds(self, claim: str) -> int | None:
        """The seeds the budget gave an exploratory point (0: unfunded), None while undecided."""
        point = self.exploratory.get(claim)
        return None if point is None else int(point["seeds"])

    def unfunded_note(self, claim: str) -> str:
        """Why an exploratory point did not run ("" unless `exploratory_seeds` is 0)."""
        if self.exploratory_seeds(claim) != 0:
            return ""
        cost = float(self.exploratory[claim]["cost_core_hours"])
        return (f"not run: the plan's {self.budget_core_hours:g} core-hours were spent ({self.exploratory_spent:.1f}) "
                f"before the exploratory points; its seeds would cost ~{cost:.1f} core-hours (params/cpu/plan.yml)")

    def steps_factor(self, task: str) -> int:
        """How many times the tier's ``max_steps`` the plan's notebooks (01-03) train ``task``: the budget
        check's ``factor`` where its recorded ``result`` raised the task's budget, else 1."""
        result = (self.budget_check.get("result") or {}).get(task) or {}
        return int(self.budget_check.get("factor", 1)) if result.get("raise") else 1

    def run(self, task: str, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """RunSpec keyword arguments of ``task`` at the plan's budget: the tier's (``kwargs``, from
        `notebook.Budget.run`) with ``max_steps`` times `steps_factor`, for every method of the plan's
        notebooks on that task (one budget per table, so competitors train as long as the arms)."""
        return {**kwargs, "max_steps": int(kwargs["max_steps"]) * self.steps_factor(task)}

    def arm_seeds(self, task: str, rank: int, fraction: float) -> list[int] | None:
        """The seeds of both arms of the primary comparison at (task, rank, fraction), if there is one."""
        c = next((c for c in self.primary if (c.task, c.rank) == (task, rank)
                  and math.isclose(c.fraction, fraction)), None)
        return self.seeds_of(c.claim) if c is not None else None


def load_plan(tier: str, root: str | Path | None = None) -> Plan | None:
    """The tier's plan, or None when it has none (the smoke and gpu tiers)."""
    import yaml

    path = plan_path(tier, root)
    if not path.is_file():
        return None
    data = yaml.safe_load(path.read_text()) or {}
    known = {"name", "registered", "primary", "alpha", "margin", "budget_check", "pilot_seeds",
             "budget_core_hours", "seeds", "needed", "exploratory"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{path}: unknown keys {unknown}")
    explo = data.get("exploratory") or {}
    spent = explo.get("spent_core_hours")
    return Plan(name=str(data["name"]), primary=[Comparison(**c) for c in data["primary"]],
                pilot_seeds=[int(s) for s in data["pilot_seeds"]],
                budget_core_hours=float(data["budget_core_hours"]), alpha=float(data.get("alpha", 0.05)),
                seeds={str(k): int(v) for k, v in (data.get("seeds") or {}).items()},
                needed={str(k): int(v) for k, v in (data.get("needed") or {}).items()},
                budget_check=dict(data.get("budget_check") or {}),
                exploratory={str(k): dict(v or {}) for k, v in (explo.get("points") or {}).items()},
                exploratory_spent=float(spent) if spent is not None else None, source=str(path))


def familywise_interval(mean: float, ci_low: float, ci_high: float, n: int, m: int,
                        alpha: float = 0.05) -> tuple[float, float]:
    """Widen a paired 95% t-interval (from `stats.paired_test`, n pairs) to the Bonferroni family-wise
    interval at confidence 1 - alpha/m: half-width x t_{n-1, 1-alpha/(2m)} / t_{n-1, 0.975}."""
    from scipy import stats as st

    if n < 2 or any(map(_nan, (mean, ci_low, ci_high))):
        return float("nan"), float("nan")
    half = (ci_high - ci_low) / 2 * st.t.ppf(1 - alpha / (2 * m), n - 1) / st.t.ppf(0.975, n - 1)
    return mean - half, mean + half


def _nan(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def pooled_sigma(diffs: Mapping[str, Sequence[float]]) -> tuple[float, int]:
    """Pooled sigma_d over comparisons (``claim -> paired differences``): the square root of the
    df-weighted mean of their sample variances, and its degrees of freedom."""
    num = dof = 0.0
    for d in diffs.values():
        if len(d) >= 2:
            num += pd.Series(d, dtype=float).var(ddof=1) * (len(d) - 1)
            dof += len(d) - 1
    return (math.sqrt(num / dof) if dof else float("nan")), int(dof)


def seeds_from_pilot(plan: Plan, pilot_diffs: Mapping[str, Sequence[float]],
                     run_cost_h: Mapping[str, float], spent_core_hours: float) -> pd.DataFrame:
    """The plan's seeds rule: one row per primary claim with ``task``, ``paper``, ``sigma_pooled`` (and
    its ``dof``), ``needed`` (family-wise half-width <= |paper| / 2), ``cost_h`` (the extra core-hours of
    both arms beyond the pilot), ``funded`` and ``seeds`` (planned: ``needed`` when funded, else the
    pilot's). ``pilot_diffs``: claim -> paired differences (points) at the pilot seeds;
    ``run_cost_h``: task -> median core-hours of one run; ``spent_core_hours``: already spent."""
    from .stats import seeds_needed

    n0 = len(plan.pilot_seeds)
    rows = []
    for task in dict.fromkeys(c.task for c in plan.primary):
        sigma, dof = pooled_sigma({c.claim: pilot_diffs.get(c.claim, []) for c in plan.primary if c.task == task})
        for c in (c for c in plan.primary if c.task == task):
            needed = (max(n0, seeds_needed(sigma, c.paper, 0.5, 1 - plan.alpha / plan.m))
                      if not math.isnan(sigma) else None)
            cost = 2 * (needed - n0) * run_cost_h[task] if needed is not None else math.inf
            rows.append({"claim": c.claim, "task": task, "paper": c.paper, "sigma_pooled": sigma, "dof": dof,
                         "needed": needed, "cost_h": cost})
    df = pd.DataFrame(rows).sort_values("cost_h", kind="stable")
    df["funded"] = _cheapest_first(df["cost_h"], plan.budget_core_hours - spent_core_hours)
    df["seeds"] = [int(n) if f else n0 for n, f in zip(df["needed"], df["funded"])]
    return df.sort_index().reset_index(drop=True)


def fund_exploratory(plan: Plan, point_cost_h: Mapping[str, float], spent_core_hours: float,
                     seeds: int = 3) -> pd.DataFrame:
    """The plan's exploratory rule ("3 seeds while the budget lasts, after the primary family"): one row
    per exploratory point with ``cost_h`` (``point_cost_h``: both arms at ``seeds`` seeds), ``funded``
    (cheapest first, while the budget left after ``spent_core_hours`` buys it) and ``seeds`` (``seeds``
    when funded, else 0: the point is not run and is *undecidable at this scale*)."""
    points = sorted(point_cost_h.items(), key=lambda kv: (kv[1], kv[0]))
    funded = _cheapest_first([cost for _, cost in points], plan.budget_core_hours - spent_core_hours)
    rows = [{"claim": claim, "cost_h": float(cost), "funded": ok, "seeds": seeds if ok else 0}
            for (claim, cost), ok in zip(points, funded)]
    return pd.DataFrame(rows, columns=["claim", "cost_h", "funded", "seeds"])


def _cheapest_first(costs: Sequence[float], left: float) -> list[bool]:
    """Which of ``costs`` (already in funding order) the ``left`` core-hours buy, each bought while it fits."""
    funded = []
    for cost in costs:
        ok = cost <= left
        left -= cost if ok else 0.0
        funded.append(bool(ok))
    return funded


def exploratory_block(table: pd.DataFrame, spent_core_hours: float) -> str:
    """The plan file's ``exploratory:`` block for the outcome of `fund_exploratory` (read by `load_plan`)."""
    return (f"exploratory:\n  spent_core_hours: {spent_core_hours:.2f}\n  points:\n"
            + "".join(f"    {r.claim}: {{seeds: {int(r.seeds)}, cost_core_hours: {r.cost_h:.2f}}}\n"
                      for r in table.itertuples()))
