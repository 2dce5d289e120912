"""Delta tables and paired helpers of the ablation notebook (04): accuracy per variant and its paired
difference to a reference variant, per task; the paper's number as a short string."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from structlora.repro.stats import paired_test

__all__ = ["delta_table", "paired", "paper_str"]


def delta_table(summ: pd.DataFrame, runs: pd.DataFrame, tasks: Mapping[str, Sequence[str]], group: str,
                variants: Sequence[str], labels: Mapping[str, str], reference: str = "full",
                table_col: Callable[[str, str], Any] | None = None) -> pd.DataFrame:
    """One row per (task, variant of ``variants``) for the tasks whose group list holds ``group``: mean and
    std accuracy from ``summ`` (``summarize`` by task and variant, rounded to 0.1), the paired difference to
    ``reference`` (``delta``, ``ci_low``, ``ci_high``, ``n`` from ``paired_test`` on ``runs``, whose
    ``method`` column names the variant; 0 for the reference) and ``paper_delta = table_col(task, variant)``."""
    rows = []
    for t in tasks:
        if group not in tasks[t]:
            continue
        for v in variants:
            s = summ[(summ["task"] == t) & (summ["variant"] == v)]
            if s.empty:
                continue
            row = {"task": t, "variant": v, "setting": labels[v], "acc": round(float(s["mean"].iloc[0]), 1),
                   "std": round(float(s["std"].iloc[0]), 1) if pd.notna(s["std"].iloc[0]) else np.nan}
            if v != reference:
                tt = paired_test(runs[(runs["task"] == t) & runs["method"].isin([v, reference])], method=v,
                                 baseline=reference, metric="acc", by=("task",))
                if len(tt):
                    r = tt.iloc[0]
                    row.update(delta=round(float(r["diff_mean"]), 1), ci_low=round(float(r["ci_low"]), 1),
                               ci_high=round(float(r["ci_high"]), 1), n=int(r["n"]))
            else:
                row.update(delta=0.0)
            if table_col is not None:
                row["paper_delta"] = table_col(t, v)
            rows.append(row)
    return pd.DataFrame(rows)


def paired(runs: pd.DataFrame, task: str, a: str, b: str, metric: str = "acc") -> pd.Series | None:
    """Row of ``paired_test`` (a − b, matched seeds) on ``task`` of ``runs``, or None when nothing pairs."""
    sub = runs[(runs["task"] == task) & runs["method"].isin([a, b])]
    tt = paired_test(sub, method=a, baseline=b, metric=metric, by=("task",))
    return tt.iloc[0] if len(tt) else None


def paper_str(value: float | None, where: str, unit: str = "") -> str:
    """The paper's number with its sign and source, e.g. ``"+1.4 (Table 5)"``; ``"n/a"`` for None."""
    return "n/a" if value is None else f"{value:+.{2 if abs(value) < 1 else 1}f}{unit} ({where})"
