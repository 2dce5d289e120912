"""Notebooks 02 and 03: StructLoRA minus LoRA along one axis, rank (Table 3) or data fraction (Table 4).

Both notebooks run the same design: for every task and every value of the axis, LoRA and StructLoRA
paired by seed, everything else held fixed (r = 8 along the fraction axis, all the data along the rank
axis). The points the registered plan (``params/<tier>/plan.yml``) names are primary: they run the
plan's seeds and their verdict uses the plan's power analysis; the other points and the contrasts
("the gain is larger at low rank / low data") are exploratory with the notebook's seeds.

`Sweep` describes one axis; `sweep_specs` builds the runs, `point_tests` the paired tests,
`sweep_claims` the claims and `contrast_test` the per-seed contrast between two groups of points.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from .claims import SAME_COMPARISON, Claim, claim_from_test, collapse_status
from .grid import RunSpec
from .notebook import TASK_MODEL, Budget
from .paper import ABLATION_COL, paper_diff
from .plan import Plan
from .stats import paired_difference, paired_test

__all__ = ["RANK", "FRACTION", "Sweep", "contrast_test", "gain_frame", "paper_frame", "point_tests", "sweep_claims",
           "sweep_specs"]


@dataclass(frozen=True)
class Sweep:
    """One axis of the headline tables."""

    axis: str              # the RunSpec field that varies: "rank" or "fraction"
    table: int             # the paper's table (3 or 4)
    prefix: str            # claim id prefix ("T3", "T4")
    fixed: dict[str, Any]  # the other axis, held fixed
    low_label: str         # what the contrast's low group is called in words

    def tag(self, value: float) -> str:
        """``r2`` / ``f10``: the claim id's point label."""
        return f"r{int(value)}" if self.axis == "rank" else f"f{int(round(100 * value))}"

    def claim_id(self, task: str, value: float) -> str:
        return f"{self.prefix}.{task}.{self.tag(value)}.structlora>lora"

    def primary_id(self, task: str, value: float) -> str:
        """The claim whose seeds this point runs: itself, or the claim it repeats (e.g. r = 8 is T1/T2)."""
        cid = self.claim_id(task, value)
        return SAME_COMPARISON.get(cid, cid)

    def paper_gain(self, task: str, value: float) -> float | None:
        return paper_diff(self.table, ABLATION_COL[task], **{self.axis: value})


RANK = Sweep("rank", 3, "T3", {"fraction": 1.0}, "r <= 8")
FRACTION = Sweep("fraction", 4, "T4", {"rank": 8}, "the smallest fraction")


def _seeds(sweep: Sweep, task: str, value: float, plan: Plan | None, seeds: Sequence[int]) -> list[int]:
    """The plan's seeds at a primary point; at an exploratory point the first seeds the plan's budget
    gave it (none when unfunded), or all of the notebook's ``seeds`` while the plan has not decided."""
    pid = sweep.primary_id(task, value)
    if plan is not None and plan.comparison(pid) is not None:
        return plan.seeds_of(pid)
    n = plan.exploratory_seeds(sweep.claim_id(task, value)) if plan is not None else None
    return list(seeds) if n is None else list(seeds)[:n]


def sweep_specs(sweep: Sweep, tasks: Sequence[str], values: Sequence[float], budget: Budget,
                seeds: Sequence[int], plan: Plan | None = None,
                methods: Sequence[str] = ("lora", "structlora")) -> list[RunSpec]:
    """Every run of the sweep: per task, value and method, the plan's seeds for a primary point, else
    ``seeds`` (as many as the plan's budget gave an exploratory point, `_seeds`); the tier's budget and learning rates (``budget``), at the plan's budget on its tasks
    (`Plan.run`: the budget check may have raised a task's steps)."""
    out = []
    for t in tasks:
        model = budget.task_model.get(t, TASK_MODEL.get(t, ""))  # the tier's model (the paper tier's hub ids)
        for v in values:
            point = {**sweep.fixed, sweep.axis: v}
            for m in methods:
                kw = plan.run(t, budget.run(model, m)) if plan is not None else budget.run(model, m)
                out += [RunSpec(task=t, model=model, method=m, seed=s, **point, **kw)
                        for s in _seeds(sweep, t, v, plan, seeds)]
    return out


def point_tests(ok: pd.DataFrame, sweep: Sweep, metric: str = "acc") -> pd.DataFrame:
    """StructLoRA minus LoRA at every (task, value), paired by seed (`stats.paired_test`)."""
    return paired_test(ok, method="structlora", baseline="lora", metric=metric, by=("task", sweep.axis))


def contrast_test(ok: pd.DataFrame, sweep: Sweep, task: str, low: Sequence[float], high: Sequence[float],
                  metric: str = "acc") -> dict[str, float] | None:
    """Per seed, the mean gain over the ``low`` values minus the mean gain over the ``high`` values,
    paired over the seeds that ran every one of those points (`stats.paired_difference`); None when
    fewer than two seeds did."""
    sub = ok[(ok["task"] == task) & ok[sweep.axis].isin(list(low) + list(high))]
    wide = sub.pivot_table(index="seed", columns=[sweep.axis, "method"], values=metric)
    need = [(v, m) for v in list(low) + list(high) for m in ("lora", "structlora")]
    if any(k not in wide.columns for k in need):
        return None
    wide = wide[need].dropna()
    if len(wide) < 2:
        return None
    gain = {v: wide[(v, "structlora")] - wide[(v, "lora")] for v in list(low) + list(high)}  # per seed
    lo = np.mean([gain[v].to_numpy() for v in low], axis=0)
    hi = np.mean([gain[v].to_numpy() for v in high], axis=0)
    return paired_difference(lo, hi)


def sweep_claims(ok: pd.DataFrame, sweep: Sweep, tasks: Sequence[str], values: Sequence[float],
                 notebook: str, tier: str, plan: Plan | None, seed_cap: int, pending: int = 0) -> list[Claim]:
    """One claim per (task, value), then per task the contrast of the gain at low against high values.

    A point the plan names uses the plan's power analysis (``plan.needed`` against the seeds the
    budget bought); a point that repeats another claim (r = 8 at all the data is T1 / T2) points to it;
    the others are exploratory with the tier's ``seed_cap`` (one the plan's budget did not fund is
    *undecidable at this scale*, `Plan.unfunded_note`). ``pending``: the notebook's runs without a
    record (`grid.pending_count`), said in every claim."""
    tests = point_tests(ok, sweep)
    claims = []
    for t in tasks:
        col = ABLATION_COL[t]
        for v in values:
            cid, pid = sweep.claim_id(t, v), sweep.primary_id(t, v)
            row = tests[(tests["task"] == t) & np.isclose(tests[sweep.axis].astype(float), v)]
            gain = sweep.paper_gain(t, v)
            degenerate, note = collapse_status(ok[(ok["task"] == t) & np.isclose(ok[sweep.axis].astype(float), v)])
            power = (plan.power(cid) if plan is not None else {}) or {"seeds_cap": seed_cap}
            label = f"r={int(v)}" if sweep.axis == "rank" else f"{v:.0%} of the data"
            unfunded = plan.unfunded_note(cid) if plan is not None and not len(row) else ""
            claims.append(claim_from_test(
                cid, notebook, tier, pending=pending, claim=f"StructLoRA beats LoRA at {label} on {t}",
                test=row.iloc[0] if len(row) else None, paper_diff=gain,
                paper_value=f"{gain:+.1f} (Table {sweep.table}, {col}, {label})" if gain is not None else "n/a",
                note=note if len(row) else "" if unfunded else "not run", degenerate=degenerate,
                same_as=pid if pid != cid else "", unfunded=unfunded, **power))
        claims.append(_contrast_claim(ok, sweep, t, values, notebook, tier, seed_cap, pending, plan))
    return claims


def _contrast_claim(ok: pd.DataFrame, sweep: Sweep, task: str, values: Sequence[float], notebook: str,
                    tier: str, seed_cap: int, pending: int = 0, plan: Plan | None = None) -> Claim:
    if sweep.axis == "rank":
        low, high = [v for v in values if v <= 8], [v for v in values if v > 8]
        cid, words = f"T3.{task}.gain_largest_low_rank", "the gain is larger at r<=8 than at r>8"
    else:
        low, high = [min(values)], [max(values)]
        cid, words = f"T4.{task}.gain_grows_as_data_shrinks", "the gain is larger with the least data than with all"
    if not low or not high or low == high:
        return claim_from_test(cid, notebook, tier, f"{words} on {task}", None, None,
                               note="needs values on both sides in this tier", pending=pending)
    paper_gain = {v: sweep.paper_gain(task, v) for v in list(low) + list(high)}
    p_contrast = (round(float(np.mean([paper_gain[v] for v in low]) - np.mean([paper_gain[v] for v in high])), 2)
                  if all(g is not None for g in paper_gain.values()) else None)
    test = contrast_test(ok, sweep, task, low, high)
    unrun = [sweep.tag(v) for v in list(low) + list(high)
             if plan is not None and plan.exploratory_seeds(sweep.claim_id(task, v)) == 0]
    unfunded = (f"not run: the plan's budget did not fund {', '.join(unrun)} (params/cpu/plan.yml)"
                if unrun and test is None else "")
    ends = ok[(ok["task"] == task) & ok[sweep.axis].isin(list(low) + list(high))]
    degenerate, note = collapse_status(ends) if len(ends) else ("", "")
    return claim_from_test(
        cid, notebook, tier, f"{words} on {task} (mean gain over {sweep.axis} {low} minus over {high})",
        test, p_contrast, paper_value=(f"{p_contrast:+.1f} (Table {sweep.table}, {ABLATION_COL[task]})"
                                       if p_contrast is not None else "n/a"),
        note=note, degenerate=degenerate, seeds_cap=seed_cap, pending=pending, unfunded=unfunded)


def gain_frame(tests: pd.DataFrame, sweep: Sweep, tasks: Sequence[str], plan: Plan | None) -> pd.DataFrame:
    """The figure's rows: our gain per (task, value) with its 95% interval, and with the family-wise
    interval of the plan where the point is primary (``fw_low`` / ``fw_high``, else NaN)."""
    from .plan import familywise_interval

    rows = tests[tests["task"].isin(tasks)].copy()
    fw = []
    for r in rows.itertuples(index=False):
        pid = sweep.primary_id(r.task, getattr(r, sweep.axis))
        if plan is not None and plan.comparison(pid) is not None:
            fw.append(familywise_interval(r.diff_mean, r.ci_low, r.ci_high, int(r.n), plan.m, plan.alpha))
        else:
            fw.append((math.nan, math.nan))
    rows["fw_low"], rows["fw_high"] = [a for a, _ in fw], [b for _, b in fw]
    return rows


def paper_frame(sweep: Sweep, tasks: Sequence[str]) -> pd.DataFrame:
    """The paper's gains for the columns our tasks stand in for, keyed by our task names."""
    from .paper import table_frame

    pap = table_frame(sweep.table)
    return pd.concat([pap[pap["dataset"] == ABLATION_COL[t]].assign(task=t) for t in tasks], ignore_index=True) \
        if tasks else pap.iloc[:0]
