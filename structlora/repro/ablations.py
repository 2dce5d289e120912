"""The ablation notebook's (04) logic: its variants and groups (Tables 5, 6, 9 and appendix E.5), the delta
tables (accuracy per variant and its paired difference to a reference variant), Table 9's drift-energy /
CosAdj table, the cost table, the tier coverage and the claims, one per distinct comparison."""
from __future__ import annotations

import warnings
from collections import Counter
from functools import partial
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd

from structlora.repro import paper
from structlora.repro.claims import Claim, claim_line, claim_from_test
from structlora.repro.notebook import TASK_MODEL
from structlora.repro.stats import paired_test as _paired_test

__all__ = ["GROUPS", "LABELS", "ORDER", "variants", "t5_paper_delta", "t6_paper_delta", "delta_table", "paired",
           "paper_str", "n_range", "COVERAGE_ORDER", "coverage", "t9_table", "cost_table", "ablation_claims", "summary_markdown"]


def paired_test(*args, **kwargs):
    """`stats.paired_test` without its unpaired-seed warning: the ablation arms run different numbers of
    seeds by design (each sized by its own power analysis), so seeds without a partner are expected and
    dropped silently; ``n`` says how many pairs were compared."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="paired_test: seeds")
        return _paired_test(*args, **kwargs)

# variant -> method name (the kwargs are in `variants`); "full" is the default StructLoRA (T=1, hybrid graph)
_METHOD = {"full": "structlora", "no_gate": "structlora_no_gate", "no_coord": "structlora_no_coord", "lora": "lora",
           "gnn_T2": "structlora", "gnn_T3": "structlora", "graph_adjacency": "structlora",
           "graph_similarity": "structlora", "lora_cos": "lora_cos", "lora_lap": "lora_lap",
           "static_eta": "structlora", "zero_gains": "structlora"}
ORDER = list(_METHOD)
GROUPS: dict[str, list[str]] = {
    "components": ["full", "no_gate", "no_coord", "lora"],                    # Table 5
    "gnn_depth": ["full", "gnn_T2", "gnn_T3"],                                # Table 6 (T = 1, 2, 3)
    "graph": ["full", "graph_adjacency", "graph_similarity"],                 # Table 6 (hybrid = full)
    "penalties": ["full", "lora", "lora_cos", "lora_lap"],                    # Table 9 (+ LoRA reference)
    "coupling": ["full", "static_eta", "zero_gains"],                         # E.5: learned vs static coupling
}
LABELS: dict[str, str] = {
    "full": "StructLoRA (full: T=1, hybrid)", "no_gate": "w/o IB filter", "no_coord": "w/o GNN coordination",
    "lora": "w/o both (LoRA)", "gnn_T2": "2-layer GNN (T=2)", "gnn_T3": "3-layer GNN (T=3)",
    "graph_adjacency": "adjacency only", "graph_similarity": "similarity only", "lora_cos": "LoRA+Cos",
    "lora_lap": "LoRA+Lap", "static_eta": "static coupling (eta frozen)", "zero_gains": "zero-start edge gains"}
# the coverage table's first columns: the tasks the offline tiers run ablations on, in their table order
COVERAGE_ORDER: tuple[str, ...] = ("sst2", "fmnist-transfer", "boolq")
# Table 6's row of each variant
_T6_ROW = {"full": "structlora (1-layer GNN, hybrid graph)", "gnn_T2": "2-layer GNN", "gnn_T3": "3-layer GNN",
           "graph_adjacency": "adjacency only", "graph_similarity": "similarity only"}


def variants(penalty_weight: float = 0.1) -> dict[str, tuple[str, dict[str, Any]]]:
    """variant -> (method, method kwargs) of every ablation (`ORDER`); the penalties (Table 9) take
    ``penalty_weight``."""
    kw: dict[str, dict[str, Any]] = {
        "gnn_T2": {"gnn_steps": 2}, "gnn_T3": {"gnn_steps": 3}, "graph_adjacency": {"graph": "adjacency"},
        "graph_similarity": {"graph": "similarity"}, "lora_cos": {"penalty_weight": penalty_weight},
        "lora_lap": {"penalty_weight": penalty_weight},
        "static_eta": {"learn_eta": False},       # E.5's static control: the same M, eta frozen
        "zero_gains": {"coordinator": "gains"}}   # the earlier reading: zero-start edge gains
    return {v: (m, kw.get(v, {})) for v, m in _METHOD.items()}


def t5_paper_delta(task: str, variant: str) -> float | None:
    """Table 5's (variant − full) in the column ``task`` stands in for (`paper.ABLATION_COL`: BoolQ for the
    language tasks, CIFAR-100 for fmnist-transfer and cifar100); None where the table has no such value."""
    col = paper.ABLATION_COL[task]
    a, b = paper.TABLE5.get(_METHOD[variant], {}).get(col), paper.TABLE5["structlora"].get(col)
    return None if a is None or b is None else round(a - b, 2)


def t6_paper_delta(task: str, variant: str) -> float:
    """Table 6's (variant − full) on BoolQ / LLaMA-7B, its only column, whatever the task."""
    return round(paper.TABLE6[_T6_ROW[variant]] - paper.TABLE6[_T6_ROW["full"]], 2)


def delta_table(summ: pd.DataFrame, runs: pd.DataFrame, tasks: Mapping[str, Sequence[str]], group: str,
                variants: Sequence[str] | None = None, labels: Mapping[str, str] | None = None,
                reference: str = "full", table_col: Callable[[str, str], Any] | None = None) -> pd.DataFrame:
    """One row per (task, variant of ``variants``) for the tasks whose group list holds ``group``: mean and
    std accuracy from ``summ`` (``summarize`` by task and variant, rounded to 0.1), the paired difference to
    ``reference`` (``delta``, ``ci_low``, ``ci_high``, ``n`` from ``paired_test`` on ``runs``, whose
    ``method`` column names the variant; 0 for the reference) and ``paper_delta = table_col(task, variant)``.
    ``variants`` and ``labels`` default to ``GROUPS[group]`` and `LABELS`."""
    variants, labels = variants or GROUPS[group], labels or LABELS
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


def n_range(ns) -> str:
    """``"3"`` when every count is 3, ``"3-10"`` for counts from 3 to 10."""
    ns = sorted(set(ns))
    return f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}-{ns[-1]}"


def coverage(params: Mapping[str, Mapping[str, Any] | None], tier: str, all_tasks: Sequence[str] | None = None,
             task_model: Mapping[str, str] | None = None) -> tuple[pd.DataFrame, list[tuple]]:
    """What each tier runs: (group × task table of ``"<tier>:<seeds>"`` cells, the (task, group) pairs
    ``tier`` leaves out). ``params`` maps a tier to its notebook parameters (``TASKS``, ``SEEDS`` and the
    optional ``SEEDS_BY_MODEL`` / ``SEEDS_BY_VARIANT`` overrides) or None where the tier has no file.
    ``all_tasks``: the tasks a tier could leave out (default: those any tier runs, `COVERAGE_ORDER`'s
    first); ``task_model``: the model each task trains in these tiers (their ``Budget.task_model``;
    default the offline `TASK_MODEL`)."""
    task_model = TASK_MODEL if task_model is None else task_model
    cover = []
    for name, p in params.items():
        if p is None:
            continue
        for t, groups in p["TASKS"].items():
            base = (p.get("SEEDS_BY_MODEL") or {}).get(task_model[t], p["SEEDS"])
            for g in groups:  # seeds per variant of the group: "cpu:3" or "cpu:3-10"
                n = n_range(len((p.get("SEEDS_BY_VARIANT") or {}).get(v, base)) for v in GROUPS[g])
                cover.append({"tier": name, "task": t, "group": g, "cell": f"{name}:{n}"})
    cover = pd.DataFrame(cover, columns=["tier", "task", "group", "cell"])
    ran = list(dict.fromkeys(cover["task"]))
    all_tasks = [t for t in dict.fromkeys([*COVERAGE_ORDER, *ran]) if t in ran] if all_tasks is None else all_tasks
    table = (cover.groupby(["group", "task"])["cell"].agg(" ".join).unstack("task")
             .reindex(index=list(GROUPS), columns=[t for t in all_tasks if t in set(cover["task"])]).fillna(""))
    have = set(zip(cover.loc[cover["tier"] == tier, "task"], cover.loc[cover["tier"] == tier, "group"]))
    return table, [(t, g) for t in all_tasks for g in GROUPS if (t, g) not in have]


def t9_table(ok: pd.DataFrame, tasks: Mapping[str, Sequence[str]]) -> pd.DataFrame:
    """Table 9 at our scale: per task running the ``penalties`` group and per variant, mean test accuracy
    (``acc``, %), drift energy ``E`` (``diag_drift_energy``: Σ_l ‖ΔW_{l+1} − ΔW_l‖²_F), ``CosAdj``
    (``diag_cos_adj``) and the extra training cost (median ``step_s`` relative to LoRA's, %), beside the
    paper's row in the column the task stands in for."""
    rows = []
    for t in tasks:
        if "penalties" not in tasks[t]:
            continue
        sub = ok[(ok["task"] == t) & ok["variant"].isin(GROUPS["penalties"])]
        lora_step = sub.loc[sub["variant"] == "lora", "step_s"].median()
        col = paper.ABLATION_COL[t]
        for v in GROUPS["penalties"]:
            s = sub[sub["variant"] == v]
            if s.empty:
                continue
            prow = paper.TABLE9.get(_METHOD[v])
            rows.append({
                "task": t, "variant": v, "setting": LABELS[v], "acc": round(s["acc"].mean(), 1),
                "E": float(s["diag_drift_energy"].mean()), "CosAdj": round(float(s["diag_cos_adj"].mean()), 3),
                "extra_cost_%": round(100 * (s["step_s"].median() / lora_step - 1), 1) if pd.notna(lora_step) else np.nan,
                "paper_acc": prow["task_score"][col] if prow else None,
                "paper_E_x1e-2": prow["drift_energy_e2"][col] if prow else None,
                "paper_CosAdj": prow["cos_adj"][col] if prow else None,
                "paper_extra_cost_%": prow["extra_cost_pct"] if prow else None})
    return pd.DataFrame(rows)


def cost_table(ok: pd.DataFrame, tasks: Sequence[str]) -> pd.DataFrame:
    """Per (task, variant): median step time (``step_s``), wall time and peak memory of the runs, their
    count, and step time / memory relative to LoRA's on the same task (NaN without LoRA runs)."""
    cost = (ok.groupby(["task", "variant"])
            .agg(step_s=("step_s", "median"), wall_time_s=("wall_time_s", "median"),
                 peak_mem_mb=("peak_mem_mb", "median"), runs=("seed", "size")).reset_index())
    ref = cost[cost["variant"] == "lora"].set_index("task")
    for col, name in (("step_s", "step_x_lora"), ("peak_mem_mb", "mem_x_lora")):
        cost[name] = [getattr(r, col) / ref.loc[r.task, col] if r.task in ref.index else np.nan
                      for r in cost.itertuples()]
    cost["setting"] = cost["variant"].map(LABELS)
    have = set(zip(cost["task"], cost["variant"]))
    return cost.set_index(["task", "variant"]).reindex([(t, v) for t in tasks for v in ORDER if (t, v) in have])


def _relative_energy(ok: pd.DataFrame, task: str, v: str) -> pd.Series | None:
    """Paired test of the relative change of E (%, per seed) of the full model against variant ``v``."""
    sub = ok[(ok["task"] == task) & ok["variant"].isin(["full", v])]
    piv = sub.pivot_table(index="seed", columns="variant", values="diag_drift_energy")
    if not {"full", v} <= set(piv.columns):
        return None
    rel = pd.DataFrame({"seed": piv.index, "task": task, "method": "rel",
                        "dE": 100 * (piv["full"] / piv[v] - 1)}).dropna()
    rel = pd.concat([rel, rel.assign(method="zero", dE=0.0)])
    tt = paired_test(rel, method="rel", baseline="zero", metric="dE", by=("task",)) if len(rel) else pd.DataFrame()
    return tt.iloc[0] if len(tt) else None


def ablation_claims(ok: pd.DataFrame, tasks: Mapping[str, Sequence[str]], notebook: str, tier: str,
                    seeds_cap: int | None = None, pending: int = 0,
                    task_model: Mapping[str, str] | None = None) -> list[Claim]:
    """The ablation claims of the groups each task runs, every one a paired test over seeds judged by
    `claim_from_test` against the paper's difference in the column the task stands in for:
    Table 5 (full − w/o IB filter / w/o GNN / LoRA; T5), Table 6 (T=1 vs T=2, 3; hybrid vs adjacency /
    similarity; T6), Table 9 (accuracy, relative drift energy and CosAdj against LoRA+Cos / LoRA+Lap)
    and appendix E.5 (learned vs static coupling: direction only, margin 0). ``ok`` holds the finished
    runs with ``variant``, ``seed``, ``acc`` (%) and the ``diag_*`` columns; ``task_model`` the model each task
    trained (the tier's ``Budget.task_model``; default the offline `TASK_MODEL`)."""
    task_model = TASK_MODEL if task_model is None else task_model
    okv = ok.assign(method=ok["variant"])  # paired tests compare variants (several share a method name)
    test = partial(paired, okv)
    claim = partial(claim_from_test, notebook=notebook, tier=tier, seeds_cap=seeds_cap, pending=pending)
    claims = []
    for t in tasks:
        colname = paper.COLUMN_LABEL[paper.ABLATION_COL[t]]
        col = paper.ABLATION_COL[t]
        stand_in = f"{t}/{task_model[t]} compared with the paper's {colname} column"
        if "components" in tasks[t]:
            for v, what in (("no_gate", "the IB filter"), ("no_coord", "the GNN coordinator"), ("lora", "both modules")):
                pd5 = t5_paper_delta(t, v)
                pdiff = -pd5 if pd5 is not None else None
                claims.append(claim(f"T5.{t}.full>{v}", claim=f"removing {what} lowers accuracy on {t} (full − {LABELS[v]})",
                                    test=test(t, "full", v), paper_diff=pdiff,
                                    paper_value=paper_str(pdiff, f"Table 5, {colname}"), note=stand_in))
        for g in ("gnn_depth", "graph"):
            if g not in tasks[t]:
                continue
            for v in GROUPS[g][1:]:
                pdiff = -t6_paper_delta(t, v)
                what = {"gnn_T2": "T=1 beats T=2", "gnn_T3": "T=1 beats T=3",
                        "graph_adjacency": "hybrid graph beats adjacency-only",
                        "graph_similarity": "hybrid graph beats similarity-only"}[v]
                claims.append(claim(f"T6.{t}.full>{v}", claim=f"{what} on {t} (accuracy)", test=test(t, "full", v),
                                    paper_diff=pdiff, paper_value=paper_str(pdiff, "Table 6, BoolQ/LLaMA-7B"),
                                    note=f"{t}/{task_model[t]} compared with the paper's BoolQ/LLaMA-7B"))
        if "penalties" in tasks[t]:
            full9 = paper.TABLE9["structlora"]
            for v in ("lora_cos", "lora_lap"):
                p9 = paper.TABLE9[v]
                pdiff = round(full9["task_score"][col] - p9["task_score"][col], 2)
                claims.append(claim(f"T9.{t}.full>{v}.acc", claim=f"StructLoRA beats {LABELS[v]} in accuracy on {t}",
                                    test=test(t, "full", v), paper_diff=pdiff,
                                    paper_value=paper_str(pdiff, f"Table 9, {colname}"), note=stand_in))
                pdiff = round(100 * (full9["drift_energy_e2"][col] / p9["drift_energy_e2"][col] - 1), 1)
                claims.append(claim(
                    f"T9.{t}.full<{v}.E",
                    claim=f"StructLoRA has a lower drift energy E than {LABELS[v]} on {t} (relative change of E, %)",
                    test=_relative_energy(ok, t, v), paper_diff=pdiff,
                    paper_value=paper_str(pdiff, f"Table 9, {colname}", "%"),
                    note=stand_in + "; E = Σ_l ‖ΔW_{l+1} − ΔW_l‖²_F over query and value families of the trained model"))
                pdiff = round(full9["cos_adj"][col] - p9["cos_adj"][col], 2)
                claims.append(claim(f"T9.{t}.full>{v}.CosAdj", claim=f"StructLoRA has a higher CosAdj than {LABELS[v]} on {t}",
                                    test=test(t, "full", v, metric="diag_cos_adj"), paper_diff=pdiff,
                                    paper_value=paper_str(pdiff, f"Table 9, {colname}"), note=stand_in, digits=3))
        if "coupling" in tasks[t]:
            # E.5: "learned coordination often exceeds static" (no number given): direction only, margin 0
            claims.append(claim(f"T9.{t}.learned>static",
                                claim=f"learned coupling (eta learned) beats static coupling (eta frozen) on {t}",
                                test=test(t, "full", "static_eta"), paper_diff=1.0, margin=0.0,
                                paper_value="> 0 (appendix E.5; no number given)", note=stand_in))
            claims.append(claim(f"T9.{t}.smoother>zero_gains",
                                claim=f"the smoothing coordinator beats zero-start edge gains on {t}",
                                test=test(t, "full", "zero_gains"), paper_diff=1.0, margin=0.0,
                                paper_value="> 0 (our reading vs the earlier one; not a claim of the paper)",
                                note="exploratory: compares two readings of Eq. 4-5; " + stand_in))
    return claims


def summary_markdown(claims: Sequence[Claim], tier: str) -> str:
    """The notebook's closing summary: the count of each verdict, the claims whose measured difference has the
    opposite sign to the paper's (for E, "lower" is the paper's sign), and one line per claim."""
    lines = [claim_line(c) for c in claims]
    counts = ", ".join(f"{n} {v}" for v, n in Counter(c.verdict for c in claims).most_common())
    wrong_sign = [c.claim_id for c in claims if c.ours_value is not None
                  and (c.ours_value >= 0 if c.claim_id.endswith(".E") else c.ours_value <= 0)]
    return (f"**Summary ({tier} tier).** Verdicts of the {len(claims)} ablation claims: {counts or 'none'}. "
            f"The measured difference has the opposite sign to the paper's (or is zero) for: "
            f"{', '.join(wrong_sign) or 'none'}. Where a claim is not reproduced, the component does **not** "
            f"help at our scale (small encoder, short budget), which says nothing about LLaMA-7B.\n\n" + "\n".join(lines))
