"""Pilots that plan the cpu tier (run in the background; records accumulate and resume).

    python scripts/pilot.py stages   # issue 11: do both StructLoRA stages act? sst2 / minilm-l6,
                                     # 350 steps of 32 (about one epoch), seeds 0-1, LoRA vs StructLoRA
    python scripts/pilot.py lr       # issue 13: each method's learning rate on validation, seeds 0-1
                                     # (the stages pilot is its lr = 5e-4 column, run first)
    python scripts/pilot.py lr --task fmnist-transfer
                                     # the same on vit-tiny-fmnist (its budget from params/cpu/budget.yml;
                                     # ~2 min a run), LoRA, StructLoRA and VeRA
    python scripts/pilot.py budget --task sst2
                                     # issue 20 (params/cpu/plan.yml): LoRA and StructLoRA at 2x the tier's
                                     # steps, seeds 0-1, against the same seeds at 1x (results/runs)
    python scripts/pilot.py plan --task fmnist-transfer
                                     # issue 20: train the plan's comparisons on one task at their seeds
                                     # (the pilot seeds until `seeds --write`), seed by seed; --sweeps
                                     # then the exploratory points of notebooks 02-03 on that task
    python scripts/pilot.py seeds [--write] [--task T]
                                     # issue 20: the plan's seeds rule from its internal pilot (pooled
                                     # sigma_d per task, family-wise power, core-hour budget); --write
                                     # records them in params/cpu/plan.yml (before the confirmatory runs)
    python scripts/pilot.py explore [--write]
                                     # issue 20: the plan's exploratory points (r = 16, 32, 50% data), 3
                                     # seeds each, funded cheapest first from what the primary family left;
                                     # --write records them in params/cpu/plan.yml (unfunded: not run)
    python scripts/pilot.py gates    # the target keep ratio without the compression term (lambda_IB = 0):
                                     # do the open gates stay small when only the Lagrangian acts?

Records go to ``results/pilot/<task>/`` (never read by the notebooks); the script prints the table
it was run for. ``--jobs`` runs that many processes (1 torch thread each).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd

from structlora.repro.grid import RunSpec, load_records, run_grid
from structlora.repro.notebook import TASK_MODEL, load_budget

BUDGET = dict(max_steps=350, batch_size=32, max_length=64, eval_every=50)
# StructLoRA closes half of its directions (the keep ratio of Fig. 2) through the Lagrangian; its gate
# logits must travel ~5 logit units in ~320 steps, hence 50x the base learning rate (2.5e-2 at 5e-4)
STAGES = {"lora": {}, "structlora": {"target_keep_ratio": 0.5, "gate_lr_multiplier": 50.0}}
LR_GRID = {"lora": (5e-4, 1e-3, 2e-4, 2e-3, 4e-3), "structlora": (5e-4, 1e-3, 2e-4, 2e-3, 4e-3, 8e-3),
           "vera": (8e-3, 3.2e-2, 1.28e-1)}
# the paper's top, 2x above, below, 4x above; 8x above when both chose 4x (the edge), and 16x for
# StructLoRA when it chose 8x (its open gates scale its update down, see the README). VeRA (added
# 2026-12-02, wave 5) trains only scaling vectors: its grid starts where it chose on the ViT, 4x and 16x
# LoRA's rate, and is extended by 4x at an edge (1.28e-1: 3.2e-2 was the top of its first grid)

EVIDENCE = ["eta_init", "eta", "mix_dev", "similarity_edges", "mean_gate", "closed_directions", "closed_target",
            "drift_energy", "uncoord_drift_energy", "cos_adj", "uncoord_cos_adj"]


def stage_specs() -> list[RunSpec]:
    return [RunSpec.make("sst2", "minilm-l6", m, rank=8, seed=s, lr=5e-4, **BUDGET, **kw)
            for m, kw in STAGES.items() for s in (0, 1)]


def gate_specs() -> list[RunSpec]:
    kw = {**STAGES["structlora"], "lambda_ib": 0.0}
    return [RunSpec.make("sst2", "minilm-l6", "structlora", rank=8, seed=s, lr=5e-4, **BUDGET, **kw) for s in (0, 1)]


# vit-tiny-fmnist on fmnist-transfer: from the paper's top (5e-4) upwards in factors of 4 (coarser than
# sst2's factors of 2, to fit one sitting; the sst2 pilot chose 4x-8x above the paper's top), StructLoRA
# one step of 2 higher (it chose 2x LoRA's rate on sst2); VeRA trains only scaling vectors and its
# authors use rates 10-100x LoRA's, hence its higher grid
VIT_LR_GRID = {"lora": (2e-3, 5e-4, 8e-3), "structlora": (4e-3, 1e-3, 1.6e-2), "vera": (8e-3, 3.2e-2, 1.28e-1)}
# (VeRA's 1.28e-1: its best rate was 3.2e-2, the top of its first grid)
PILOT_TASKS = ("sst2", "fmnist-transfer")   # the cpu tier's two tasks (their models: notebook.TASK_MODEL)
PAPER_T1 = 3.6  # StructLoRA - LoRA, Table 1 (CIFAR-100, for which fmnist-transfer stands in)


def lr_specs(task: str = "sst2", methods: list[str] | None = None) -> list[RunSpec]:
    if task == "sst2":
        return [RunSpec.make("sst2", "minilm-l6", m, rank=8, seed=s, lr=lr, **BUDGET, **STAGES.get(m, {}))
                for i in range(6) for m, lrs in LR_GRID.items() for lr in lrs[i:i + 1] for s in (0, 1)]
    model = TASK_MODEL[task]
    budget = {k: v for k, v in load_budget("cpu")[model].items() if k != "lr"}
    return [RunSpec.make(task, model, m, rank=8, seed=s, lr=lr, **budget)
            for i in range(6) for m, lrs in VIT_LR_GRID.items() if methods is None or m in methods
            for lr in lrs[i:i + 1] for s in (0, 1)]


def budget_specs(task: str, factor: int = 2, seeds: tuple[int, ...] = (0, 1)) -> tuple[list[RunSpec], list[RunSpec]]:
    """The budget check of the headline plan: (specs at ``factor`` x the tier's steps, the same at 1x)."""
    budget, model = load_budget("cpu"), TASK_MODEL[task]
    base = [RunSpec.make(task, model, m, rank=8, seed=s, **budget.run(model, m)) for m in ("lora", "structlora")
            for s in seeds]
    return [replace(sp, max_steps=sp.max_steps * factor) for sp in base], base


def budget_table(task: str, threshold: float = 0.5) -> pd.DataFrame:
    """Per arm, mean validation (and test) accuracy at 2x and 1x over the seeds both have; the task's
    budget must grow when an arm gains more than ``threshold`` points of validation accuracy."""
    long, short = budget_specs(task)
    a, b = load_records(f"results/pilot/{task}-budget", long), load_records("results/runs", short)
    rows = []
    for method in ("lora", "structlora"):
        x = a[(a["method"] == method) & (a["status"] == "ok")].set_index("seed")
        y = b[(b["method"] == method) & (b["status"] == "ok")].set_index("seed")
        both = x.index.intersection(y.index)
        gain = 100 * (x.loc[both, "val_accuracy"] - y.loc[both, "val_accuracy"]).mean() if len(both) else float("nan")
        rows.append({"method": method, "seeds": len(both), "val_2x": 100 * x.loc[both, "val_accuracy"].mean(),
                     "val_1x": 100 * y.loc[both, "val_accuracy"].mean(), "val_gain": gain,
                     "test_gain": 100 * (x.loc[both, "test_accuracy"] - y.loc[both, "test_accuracy"]).mean(),
                     "best_step_2x": x.loc[both, "best_step"].mean(), "raise_budget": bool(gain > threshold)})
    return pd.DataFrame(rows)


def plan_specs(plan, claim: str, seeds: list[int]) -> list[RunSpec]:
    """Both arms of one primary comparison of the plan at ``seeds`` (the tier's budget and rates)."""
    c, budget = plan.comparison(claim), load_budget("cpu")
    model = TASK_MODEL[c.task]
    return [RunSpec(task=c.task, model=model, method=m, rank=c.rank, fraction=c.fraction, seed=s,
                    **plan.run(c.task, budget.run(model, m))) for m in ("lora", "structlora") for s in seeds]


def plan_runs(task: str) -> list[RunSpec]:
    """Every run of the plan's primary comparisons on ``task`` at their seeds (the pilot seeds until
    ``seeds --write`` set them), seed by seed and in the plan's order, so a stop leaves whole pairs."""
    from structlora.repro.plan import load_plan
    from structlora.repro.reproduce import priority

    plan = load_plan("cpu")
    specs = [sp for c in plan.primary if c.task == task for sp in plan_specs(plan, c.claim, plan.seeds_of(c.claim))]
    return sorted(specs, key=lambda sp: priority(sp, plan))   # the order --train-pending trains the plan in


def spent_core_hours() -> float:
    """What the plan has spent: the wall time of every record of results/runs and results/pilot finished
    since the plan's registration (the commit that added its file; later commits only annotate it), plus
    the ViT pretraining, in core-hours (one torch thread per run)."""
    import json
    import subprocess

    from structlora.repro.plan import plan_path

    since = subprocess.run(["git", "log", "--diff-filter=A", "--format=%cI", "--", str(plan_path("cpu"))],
                           capture_output=True, text=True).stdout.strip().splitlines()[-1]
    spent_s = 0.0
    for folder in ("results/runs", "results/pilot"):
        for path in Path(folder).rglob("*.json"):
            rec = json.loads(path.read_text()) if ".removal-" not in path.name else {}
            if rec.get("finished_at", "") >= since and rec.get("wall_time_s"):
                spent_s += rec["wall_time_s"]
    vit = json.loads(open("structlora/repro/assets/vit-tiny-fmnist/meta.json").read())
    return (spent_s + vit["seconds"] * vit.get("num_threads", 1)) / 3600


def plan_seeds(write: bool = False, task: str | None = None) -> pd.DataFrame:
    """The plan's seeds rule applied to its internal pilot (`plan.seeds_from_pilot`): per claim the paired
    differences at the pilot seeds, pooled sigma_d per task, the seeds needed and those the budget buys.
    Spent so far: every record of results/runs and results/pilot written since the plan (its commit
    time) plus the ViT pretraining. ``write`` records ``seeds`` and ``needed`` in params/cpu/plan.yml."""
    import re

    from structlora.repro.plan import load_plan, plan_path, seeds_from_pilot

    plan = load_plan("cpu")
    diffs, cost = {}, {}
    for c in plan.primary:
        if task is not None and c.task != task:
            continue
        df = load_records("results/runs", plan_specs(plan, c.claim, plan.pilot_seeds))
        ok = df[df["status"] == "ok"].pivot_table(index="seed", columns="method", values="test_accuracy")
        if not {"lora", "structlora"} <= set(ok.columns) or ok.dropna().shape[0] < len(plan.pilot_seeds):
            raise SystemExit(f"{c.claim}: the pilot is not complete ({ok.dropna().shape[0]} of "
                             f"{len(plan.pilot_seeds)} paired seeds); train it first")
        diffs[c.claim] = list(100 * (ok["structlora"] - ok["lora"]).dropna())
        cost.setdefault(c.task, []).extend(df["wall_time_s"].dropna().tolist())
    spent = spent_core_hours()
    run_cost = {t: float(pd.Series(v).median()) / 3600 for t, v in cost.items()}
    table = seeds_from_pilot(plan, diffs, {t: run_cost.get(t, float("inf")) for t in {c.task for c in plan.primary}},
                             spent)
    if task is not None:        # a task whose pilot finished first is funded first, from the budget left
        table = table[table["task"] == task].reset_index(drop=True)
    print(f"spent so far: {spent:.2f} core-hours of {plan.budget_core_hours} (runs since the plan + ViT pretraining)")
    if write:
        done = sorted(set(table["claim"]) & (set(plan.seeds) | set(plan.needed)))
        if done:
            raise SystemExit(f"params/cpu/plan.yml: seeds already set for {done} (the rule applies once)")
        seeds = {**plan.seeds, **{r.claim: int(r.seeds) for r in table.itertuples()}}
        needed = {**plan.needed, **{r.claim: int(r.needed) for r in table.itertuples()}}
        order = [c.claim for c in plan.primary]
        block = ("seeds:\n" + "".join(f"  {c}: {seeds[c]}\n" for c in order if c in seeds)
                 + "needed:\n" + "".join(f"  {c}: {needed[c]}\n" for c in order if c in needed))
        text, n = re.subn(r"(?m)^seeds:( \{\})?\n(  .*\n)*(needed:\n(  .*\n)*)?", block, plan_path("cpu").read_text())
        if n != 1:
            raise SystemExit("params/cpu/plan.yml: no seeds block to write into")
        plan_path("cpu").write_text(text)
        print("wrote seeds and needed into params/cpu/plan.yml: commit it before the confirmatory runs")
    return table


def plan_explore(write: bool = False) -> pd.DataFrame:
    """The plan's exploratory rule (`plan.fund_exploratory`): every point of notebooks 02-03 outside the
    primary family (r = 16, 32, 50% data) costs both arms x 3 seeds x its task's median run (the plan's
    records); they are funded cheapest first from what the primary family left. ``write`` records the
    outcome in params/cpu/plan.yml, once, when every planned primary run has its record or the budget is
    already spent (then nothing the primary family still runs can change it)."""
    from structlora.repro.plan import exploratory_block, fund_exploratory, load_plan, plan_path
    from structlora.repro.sweeps import FRACTION, RANK
    from structlora.repro.tierspecs import tier_specs

    plan = load_plan("cpu")
    runs = {t: plan_runs(t) for t in dict.fromkeys(c.task for c in plan.primary)}
    cost, missing = {}, 0
    for t, specs in runs.items():
        df = load_records("results/runs", specs)
        ok = df[df["status"] == "ok"] if len(df) else df
        missing += len(specs) - len(ok)
        cost[t] = float(ok["wall_time_s"].median()) / 3600
    tier, points = tier_specs("cpu"), {}
    for nb, sweep in (("02_rank_sweep", RANK), ("03_few_shot", FRACTION)):
        for sp in tier[nb]:
            value = getattr(sp, sweep.axis)
            cid = sweep.claim_id(sp.task, value)
            if sp.task in cost and plan.comparison(sweep.primary_id(sp.task, value)) is None:
                points[cid] = 2 * 3 * cost[sp.task]
    spent = spent_core_hours()
    table = fund_exploratory(plan, points, spent)
    print(f"spent so far: {spent:.2f} core-hours of {plan.budget_core_hours}; primary runs without a record: "
          f"{missing}; median run: " + ", ".join(f"{t} {h:.2f} h" for t, h in cost.items()))
    if write:
        if plan.exploratory:
            raise SystemExit("params/cpu/plan.yml: the exploratory points are already decided (the rule applies once)")
        if missing and spent < plan.budget_core_hours:
            raise SystemExit(f"{missing} primary runs have no record and {plan.budget_core_hours - spent:.2f} "
                             "core-hours are left: decide the exploratory points after the primary family")
        path = plan_path("cpu")
        path.write_text(path.read_text().rstrip("\n") + "\n" + exploratory_block(table, spent))
        print("wrote the exploratory points into params/cpu/plan.yml: commit it")
    return table


def _table(folder: str) -> pd.DataFrame:
    df = load_records(folder)
    if df.empty:
        return df
    cols = ["method", "lr", "method_kwargs", "seed", "test_accuracy", "val_accuracy", "best_step", "max_steps"]
    cols += [f"diag_{c}" for c in EVIDENCE if f"diag_{c}" in df]
    return df[[c for c in cols if c in df]].sort_values(["method", "lr", "seed"])


def _lr_arms(df: pd.DataFrame) -> pd.DataFrame:
    """The finished runs of the learning-rate pilot's arms (the method kwargs of `STAGES`)."""
    import json

    want = {m: json.dumps(kw, sort_keys=True) for m, kw in STAGES.items()}
    ok = df[df["status"] == "ok"]
    if set(ok["task"]) != {"sst2"}:      # the vit pilot runs every method at its defaults
        return ok[ok["method_kwargs"] == "{}"]
    return ok[[want.get(m, "{}") == k for m, k in zip(ok["method"], ok["method_kwargs"])]]


def select_lr(df: pd.DataFrame) -> pd.DataFrame:
    """Per method, mean validation accuracy over the pilot seeds at each learning rate; the chosen rate
    is the best mean (the test split is never looked at)."""
    ok = _lr_arms(df)
    g = ok.groupby(["method", "lr"]).agg(val=("val_accuracy", "mean"), test=("test_accuracy", "mean"),
                                         seeds=("seed", "size"), best_step=("best_step", "mean")).reset_index()
    g["chosen"] = g["val"] == g.groupby("method")["val"].transform("max")
    return g


def power(df: pd.DataFrame, chosen: pd.DataFrame, paper_effect: float = 1.5, cap: int = 10) -> str:
    """sigma_d of StructLoRA - LoRA (test accuracy points, paired by seed, each at its chosen rate) and
    the seeds `stats.seeds_needed` asks for the paper's effect (T2, SST-2: +1.5)."""
    from structlora.repro.stats import seeds_needed

    lr = {r.method: r.lr for r in chosen[chosen["chosen"]].itertuples()}
    ok = _lr_arms(df)
    a = ok[(ok["method"] == "structlora") & (ok["lr"] == lr.get("structlora"))].set_index("seed")["test_accuracy"]
    b = ok[(ok["method"] == "lora") & (ok["lr"] == lr.get("lora"))].set_index("seed")["test_accuracy"]
    d = (a - b).dropna() * 100
    if len(d) < 2:
        return "power analysis: fewer than 2 paired seeds so far"
    sd = float(d.std(ddof=1))
    n = seeds_needed(sd, paper_effect)
    return (f"power analysis: StructLoRA - LoRA = {list(d.round(2))} points, sigma_d = {sd:.2f}; for a 95% "
            f"half-width <= {paper_effect / 2:.2f} (half the paper's +{paper_effect}) it needs n = {n} paired "
            f"seeds ({'within' if n <= cap else 'over'} the cap of {cap})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("which", choices=["stages", "lr", "gates", "budget", "seeds", "plan", "explore"])
    p.add_argument("--write", action="store_true", help="seeds / explore: record them in params/cpu/plan.yml")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--task", choices=sorted(PILOT_TASKS), default=None,
                   help="the task of lr, budget, plan (default sst2) and seeds (default: every task)")
    p.add_argument("--sweeps", action="store_true", help="plan: then every other point of notebooks 02-03 on --task")
    p.add_argument("--show", action="store_true", help="only print the table of the finished records")
    p.add_argument("--methods", nargs="+", default=None, help="lr on fmnist-transfer: only these methods")
    a = p.parse_args(argv)
    if a.task not in (None, "sst2") and a.which not in ("lr", "budget", "seeds", "plan"):
        p.error("--task applies to the lr, budget, seeds and plan commands only")
    if a.which == "seeds":
        with pd.option_context("display.width", 200):
            print(plan_seeds(a.write, a.task).to_string(index=False))
        return 0
    if a.which == "explore":
        with pd.option_context("display.width", 200):
            print(plan_explore(a.write).to_string(index=False))
        return 0
    a.task = a.task or "sst2"
    if a.which == "plan":
        specs = plan_runs(a.task)
        if a.sweeps:   # then the exploratory points of notebooks 02-03 on the task, seed by seed
            from structlora.repro.tierspecs import tier_specs

            tier = tier_specs("cpu")
            rest = [s for nb in ("02_rank_sweep", "03_few_shot") for s in tier[nb] if s.task == a.task]
            specs += sorted(dict.fromkeys(s for s in rest if s not in set(specs)), key=lambda s: s.seed)
        run_grid(specs, results_dir="results/runs", n_jobs=a.jobs, progress=True)
        return 0
    if a.which == "budget":
        if not a.show:
            long, short = budget_specs(a.task)
            run_grid(long, results_dir=f"results/pilot/{a.task}-budget", n_jobs=a.jobs, progress=True)
        print(budget_table(a.task).to_string(index=False))
        return 0
    folder = f"results/pilot/{a.task}"
    if not a.show:
        specs = lr_specs(a.task, a.methods) if a.which == "lr" else {"stages": stage_specs, "gates": gate_specs}[a.which]()
        run_grid(specs, results_dir=folder, n_jobs=a.jobs, progress=True)
    table = _table(folder)
    with pd.option_context("display.width", 250, "display.max_columns", 30):
        print(table.to_string(index=False))
        if len(table):
            chosen = select_lr(load_records(folder))
            print("\nlearning rate on validation (mean over seeds):")
            print(chosen.to_string(index=False))
            print(power(load_records(folder), chosen, **({} if a.task == "sst2" else {"paper_effect": PAPER_T1})))
    return 0


if __name__ == "__main__":
    sys.exit(main())
