"""The main-results notebook's (01) logic: which methods apply to which task, what each tier runs, our
accuracy beside Tables 1 and 2, the ranks of the PEFT methods, and the claims (StructLoRA vs LoRA, and vs
the strongest other PEFT method, chosen on validation)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import pandas as pd

from structlora.repro import paper  # (importing paper registers every method and task in the catalogue)
from structlora.repro.claims import Claim, claim_line, claim_from_test, collapse_status
from structlora.repro.assets.tasks import task_kind
from structlora.repro.catalogue import LiveMap, LiveSeq, method_specs, task_specs
from structlora.repro.notebook import TASK_MODEL
from structlora.repro.plan import Plan
from structlora.repro.stats import compare_to_paper, paired_test

__all__ = ["PAPER_METHODS", "NOT_PEFT", "MODEL_KIND", "GRID_KEYS", "in_scope", "applies", "not_applicable",
           "seeds_of", "grid_of", "coverage", "side_by_side", "peft_ranks", "main_claims", "summary_markdown"]

# Tables 1 and 2's rows, in the paper's order (MethodSpec.paper_row; a live view of the catalogue)
PAPER_METHODS: Sequence[str] = LiveSeq(lambda: tuple(s.name for s in method_specs() if s.paper_row))
NOT_PEFT = frozenset({"full_ft", "linear_probe"})  # the paper's upper / lower bounds
# the kind of each notebook model (TaskSpec.model -> TaskSpec.model_kind; a live view of the catalogue)
MODEL_KIND: Mapping[str, str] = LiveMap(lambda: {t.model: t.model_kind for t in task_specs() if t.model is not None})
GRID_KEYS = ("TASKS", "METHODS", "TASK_METHODS", "SEEDS", "TASK_SEEDS", "RANK")


def in_scope() -> list[str]:
    """The paper's methods (Tables 1-2's rows) the catalogue has, in `PAPER_METHODS` order."""
    return list(PAPER_METHODS)


def _kinds() -> dict[str, list[str]]:
    return {s.name: list(s.kinds) for s in method_specs()}


def applies(task: str, method: str) -> bool:
    """Whether the method can adapt this task's model at all (e.g. prefix tuning needs a text model): the
    task's model kind (`assets.tasks.task_kind`), whichever model of that kind a tier trains it on."""
    return task_kind(task) in _kinds()[method]


def not_applicable(task_model: Mapping[str, str] | None = None) -> list[str]:
    """One line per (task, method) of the paper that no tier can run, and why, over ``task_model`` (the
    model each task trains: the tier's ``Budget.task_model``; default the offline `TASK_MODEL`)."""
    kinds, task_model = _kinds(), TASK_MODEL if task_model is None else task_model
    return [f"{m} on {t}: {m} supports {', '.join(kinds[m])} models, {task_model[t]} is {task_kind(t)}"
            for t in task_model for m in in_scope() if not applies(t, m)]


def seeds_of(p: Mapping[str, Any], task: str, method: str, plan: Plan | None = None) -> list[int]:
    """The seeds of one (task, method): LoRA and StructLoRA run the seeds of the registered plan's
    comparison at (task, ``RANK``, all the data) when it has one (T1, T2); otherwise ``TASK_SEEDS[task]``
    is a list (every method of the task) or a ``{method: seeds}`` map (the arms a power analysis sized;
    the other methods keep ``SEEDS``)."""
    planned = plan.arm_seeds(task, p["RANK"], 1.0) if plan is not None and method in ("lora", "structlora") else None
    if planned is not None:
        return planned
    per = p["TASK_SEEDS"].get(task, p["SEEDS"])
    return list(per.get(method, p["SEEDS"]) if isinstance(per, Mapping) else per)


def grid_of(p: Mapping[str, Any], plan: Plan | None = None) -> list[dict[str, Any]]:
    """(task, method, seeds) of one tier's parameters (`GRID_KEYS`) and plan, methods that do not apply
    left out."""
    missing = [k for k in GRID_KEYS if k not in p]
    assert not missing, f"the tier's parameters must set every grid parameter; missing {missing}"
    return [{"task": t, "method": m, "seeds": len(seeds_of(p, t, m, plan))}
            for t in p["TASKS"] for m in p["TASK_METHODS"].get(t, p["METHODS"]) if applies(t, m)]


def coverage(params: Mapping[str, Mapping[str, Any] | None], tier: str,
             tasks: Sequence[str] | None = None) -> tuple[pd.DataFrame, str]:
    """What each tier runs: (method × task table of ``"<tier>:<seeds>"`` cells, ``"n/a"`` where the method
    cannot adapt the model; a line saying how many applicable pairs ``tier`` leaves out, and how many of
    those the gpu tier runs). ``params`` maps a tier to its parameters, None where it has no file;
    ``tasks``: the table's columns (the tasks of the tier's ``Budget.task_model``; default the offline
    `TASK_MODEL`'s)."""
    scope, tasks = in_scope(), list(TASK_MODEL if tasks is None else tasks)
    from structlora.repro.plan import load_plan

    cover = pd.DataFrame([{**r, "tier": name} for name, p in params.items() if p is not None
                          for r in grid_of(p, load_plan(name))],
                         columns=["task", "method", "seeds", "tier"])
    table = (cover.assign(cell=lambda d: d["tier"] + ":" + d["seeds"].astype(str))
             .groupby(["method", "task"])["cell"].agg(" ".join).unstack("task")
             .reindex(index=scope, columns=tasks).fillna(""))
    pairs = [(t, m) for t in tasks for m in scope]
    for t, m in pairs:
        if not applies(t, m):
            table.loc[m, t] = "n/a"
    ran = set(zip(cover.loc[cover["tier"] == tier, "task"], cover.loc[cover["tier"] == tier, "method"]))
    left_out = [(t, m) for t, m in pairs if applies(t, m) and (t, m) not in ran]
    line = (f"this tier ({tier}) leaves out {len(left_out)} of the "
            f"{sum(applies(t, m) for t, m in pairs)} applicable (task, method) pairs")
    if tier != "gpu" and params.get("gpu") is not None:
        gpu = {(r["task"], r["method"]) for r in grid_of(params["gpu"])}
        line += f"\n  of which the gpu tier runs {sum(x in gpu for x in left_out)}"
    return table, line


def _paper_map(tasks: Sequence[str]) -> dict[tuple[str, str], float]:
    return {(t, m): v for t in tasks for m in in_scope()
            if (v := paper.paper_value(paper.MAIN_TABLE[t], m, t)) is not None}


def side_by_side(summ: pd.DataFrame, tasks: Sequence[str]) -> pd.DataFrame:
    """Our mean ± std test accuracy beside the paper's (Table 1 or 2, the column each task stands in for),
    one row per method, a column pair per task; "not run" / "—" where a side has no number."""
    comp = compare_to_paper(summ, _paper_map(tasks), on=("task", "method"), digits=1)
    comp["ours (display)"] = comp["ours (display)"].replace("", "not run")
    side = (comp.pivot(index="method", columns="task", values=["ours (display)", "paper"])
            .swaplevel(axis=1).sort_index(axis=1).reindex(index=[m for m in in_scope() if m in set(comp["method"])]))
    return side.fillna("—")


def peft_ranks(summ: pd.DataFrame, tasks: Sequence[str]) -> pd.DataFrame:
    """The rank of each PEFT method (full fine-tuning and the linear probe left out) by mean test accuracy,
    ours beside the paper's, per task (1 = best; ties share the lower rank)."""
    pm = _paper_map(tasks)
    peft = summ[~summ["method"].isin(NOT_PEFT)].copy()
    peft["paper"] = [pm.get((t, m)) for t, m in zip(peft["task"], peft["method"])]
    peft["ours"] = peft.groupby("task")["mean"].rank(ascending=False, method="min").astype("Int64")
    peft["paper "] = peft.groupby("task")["paper"].rank(ascending=False, method="min").astype("Int64")
    ranks = (peft.pivot(index="method", columns="task", values=["ours", "paper "]).swaplevel(axis=1).sort_index(axis=1)
             .reindex(index=[m for m in in_scope() if m in set(peft["method"])]))
    return ranks.astype(object).where(ranks.notna(), "—")


def main_claims(ok: pd.DataFrame, tasks: Sequence[str], notebook: str, tier: str,
                seeds_cap: int | None = None, plan: Plan | None = None, pending: int = 0,
                task_model: Mapping[str, str] | None = None) -> list[Claim]:
    """Per task: StructLoRA − LoRA (Table 1 or 2), and StructLoRA − the strongest other PEFT method, the
    competitor chosen by mean *validation* accuracy (never test), against the paper's margin over its own
    strongest competitor. When that competitor is LoRA the second claim points to the first
    (``same_as``) instead of counting the comparison twice. Comparisons where every run of both arms
    predicts one class are inconclusive (`collapse_status`). StructLoRA − LoRA takes its power analysis
    from the registered ``plan`` once its pilot set the seeds (T1, T2), else from ``seeds_cap``. ``pending``:
    the notebook's runs without a record (`grid.pending_count`), said in every claim. ``task_model``: the
    model each task trained (the tier's ``Budget.task_model``; default the offline `TASK_MODEL`)."""
    cft = partial(claim_from_test, pending=pending)
    task_model = TASK_MODEL if task_model is None else task_model
    claims = []
    tests = {r["task"]: r for r in paired_test(ok, method="structlora", baseline="lora", metric="acc",
                                               by=("task",)).to_dict("records")}
    for t in tasks:
        table_no, col = paper.MAIN_TABLE[t], paper.PAPER_TASK[t][paper.MAIN_TABLE[t]]
        pdiff = paper.paper_diff(table_no, t)
        degenerate, note = collapse_status(ok[(ok["task"] == t) & ok["method"].isin(["structlora", "lora"])])
        cid = f"T{table_no}.{t}.structlora>lora"
        power = (plan.power(cid) if plan is not None else {}) or {"seeds_cap": seeds_cap}
        claims.append(cft(
            cid, notebook, tier,
            f"StructLoRA beats LoRA on {t} ({task_model[t]}; paper: {col}, Table {table_no})", tests.get(t), pdiff,
            paper_value=f"{pdiff:+.1f} (Table {table_no}, {col})", **power, degenerate=degenerate,
            note=note if t in tests else "StructLoRA or LoRA did not run on this task in this tier"))
    for t in tasks:
        table_no, col = paper.MAIN_TABLE[t], paper.PAPER_TASK[t][paper.MAIN_TABLE[t]]
        cid = f"T{table_no}.{t}.structlora_best_peft"
        others_ok = ok[(ok["task"] == t) & ~ok["method"].isin(NOT_PEFT | {"structlora"})]
        means = others_ok.groupby("method")["val_accuracy"].mean().dropna()
        if "structlora" not in set(ok.loc[ok["task"] == t, "method"]) or means.empty:
            claims.append(cft(cid, notebook, tier, f"StructLoRA is the best PEFT method on {t}", None, None,
                                          note="fewer than two PEFT methods ran on this task in this tier"))
            continue
        best = means.idxmax()
        table = paper.TABLE1 if table_no == 1 else paper.TABLE2
        others = {m: v[col] for m, v in table.items() if m not in NOT_PEFT | {"structlora"} and col in v}
        p_best = max(others, key=others.get)
        pdiff = round(table["structlora"][col] - others[p_best], 2)
        sub = ok[(ok["task"] == t) & ok["method"].isin(["structlora", best])]
        bt = paired_test(sub, method="structlora", baseline=best, metric="acc", by=("task",))
        degenerate, note = collapse_status(sub)
        claims.append(cft(
            cid, notebook, tier,
            f"StructLoRA is the best PEFT method on {t}: vs the strongest other PEFT method here on validation ({best})",
            bt.iloc[0] if len(bt) else None, pdiff,
            paper_value=f"{pdiff:+.1f} vs {paper.METHOD_LABELS[p_best]} (Table {table_no}, {col})",
            note="; ".join(x for x in (f"{len(means) + 1} PEFT methods ran on {t} in this tier", note) if x),
            seeds_cap=seeds_cap, degenerate=degenerate,
            same_as=f"T{table_no}.{t}.structlora>lora" if best == "lora" else ""))
    return claims


def summary_markdown(claims: Sequence[Claim], tier: str) -> str:
    """The notebook's closing summary: on how many tasks StructLoRA's gain over LoRA is reproduced and on
    how many it does not beat LoRA at all, then one line per claim."""
    beats = [c for c in claims if c.claim_id.endswith("structlora>lora")]
    n_rep = sum(c.verdict == "reproduced" for c in beats)
    n_neg = sum(c.ours_value is not None and c.ours_value <= 0 for c in beats)
    lines = [claim_line(c, note=True) for c in claims]
    return "\n".join([f"At our scale ({tier} tier) StructLoRA's gain over LoRA is reproduced on {n_rep} of "
                      f"{len(beats)} tasks; on {n_neg} task(s) StructLoRA does **not** beat LoRA at all "
                      f"(mean difference ≤ 0).", ""] + lines)
