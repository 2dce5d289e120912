# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     notebook_metadata_filter: kernelspec,jupytext,-jupytext.text_representation.jupytext_version
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 03 · Few-shot: LoRA vs StructLoRA on 10 / 25 / 50 / 100% of the training data (paper Table 4)
#
# **What the paper claims.** With rank r = 8 fixed, "STRUCTLORA's advantage over LoRA grows as the
# amount of training data decreases": on BoolQ (LLaMA-7B) the gain is +2.7 / +3.1 / +2.5 / +2.2 points
# at 10 / 25 / 50 / 100% data, on CIFAR-100 (ViT-B/16) +2.7 / +2.5 / +1.9 / +2.6, on COCO captioning
# +3.5 / +4.1 / +3.9 / +6.2 CIDEr. The paper's own numbers support the claim only loosely: the gain at
# 10% exceeds the gain at 100% by +0.5 (BoolQ) and +0.1 (CIFAR-100), and is *smaller* by 2.7 CIDEr on
# COCO. We test (1) a positive gain at each fraction and (2) gain(10%) − gain(100%) > 0.
#
# **What stands in here.** `minilm-l6` on `sst2` as the language task, compared with the paper's BoolQ
# column (cpu, gpu and smoke tiers); `vit-tiny-fmnist` on `fmnist-transfer` (5,000 training images at
# 100%) for ViT-B/16 on CIFAR-100 and `smollm2-135m` on `boolq` for BoolQ/LLaMA-7B (gpu tier: too
# costly on 2 CPU cores); captioning is not run. A fraction keeps a stratified
# subset of the training split drawn with the run's seed (the 10% subset is inside the 25% one, ...);
# validation and test never change. Every run takes the same number of optimizer steps, so smaller
# fractions see their examples more often, as in the paper's fixed-epoch protocol they see fewer.

# %%
# Colab or any kernel without the project: clone it, install it with its [repro] extra, the offline
# asset packages and Fashion-MNIST, then work from the clone. In the project's own .venv (JupyterLab,
# papermill, nbval) `structlora` is importable and this cell does nothing.
import importlib.util

if importlib.util.find_spec("structlora") is None:
    import os, subprocess, sys  # noqa: E401
    REPO = os.environ.get("STRUCTLORA_REPO", "https://github.com/structlora/structlora")
    DEST = os.path.abspath("structlora-repo")
    if not os.path.isdir(DEST):
        subprocess.run(["git", "clone", "--depth", "1", REPO, DEST], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", f"{DEST}[repro]"], check=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "-r",
                    f"{DEST}/requirements-assets.txt"], check=True)
    if not os.path.exists("/usr/share/datasets/fashion-mnist"):
        subprocess.run("apt-get -qq update && apt-get -qq install -y dataset-fashion-mnist", shell=True)
    sys.path.insert(0, DEST)
    os.chdir(DEST)

# %%
import os
import time

import numpy as np
import pandas as pd
from IPython.display import Markdown, display

from structlora.repro.reproduce import repo_root

os.chdir(repo_root())

from structlora.repro import paper, plots
from structlora.repro.claims import claim_from_test, collapse_status, write_claims
from structlora.repro.assets.tasks import NUM_CLASSES
from structlora.repro.grid import RunSpec, run_grid
from structlora.repro.stats import compare_to_paper, paired_test, single_class_runs, single_class_table, summarize

pd.set_option("display.width", 200)
plots.setup_style()
NB = "03_few_shot"
_T0 = time.perf_counter()

# %%
# NBVAL_CHECK_OUTPUT
display(paper.table_frame(4))

# %% [markdown]
# ## Parameters (smoke tier; `params/<tier>/03_few_shot.yml` replaces them)
#
# The smoke tier only checks that every cell runs (3 optimizer steps per run, one seed): 25% and 100% of the data,
# where the 100% runs are the ones notebook 01 already trained (same specs, read back from the run cache).

# %% tags=["parameters"]
TIER = "smoke"
RESULTS_DIR = "results/smoke/runs"
TASKS = ["sst2"]
FRACTIONS = [0.25, 1.0]
METHODS = ["lora", "structlora"]
SEEDS = [0]
RANK = 8
N_JOBS = 1

# %%
from functools import partial

from structlora.repro.notebook import TASK_MODEL, load_budget, run_summary

BUDGET = load_budget(TIER)  # params/<tier>/budget.yml: the tier's one budget, shared by every notebook
# every verdict runs the power analysis against the tier's seed cap (stats.seeds_needed, stats.decide)
claim_from_test = partial(claim_from_test, seeds_cap=BUDGET.seed_cap)

# %%
PAPER_COL = paper.ABLATION_COL
specs = [RunSpec(task=t, model=TASK_MODEL[t], method=m, rank=RANK, seed=s, fraction=f, **BUDGET.run(TASK_MODEL[t], m))
         for t in TASKS for f in FRACTIONS for m in METHODS for s in SEEDS]
print(f"tier {TIER}: {len(specs)} runs = {len(TASKS)} task(s) x {len(FRACTIONS)} fractions x {len(METHODS)} methods "
      f"x {len(SEEDS)} seeds")
print("paper fractions left out in this tier:", [f for f in (0.1, 0.25, 0.5, 1.0) if f not in FRACTIONS] or "none")
STANDS_IN = {"boolq": "boolq", "cifar100": "fmnist-transfer"}  # paper column -> our task
for col, t in STANDS_IN.items():
    if t not in TASKS:
        print(f"paper column {col}: its stand-in {t} ({TASK_MODEL[t]}) is not run in this tier (the gpu tier runs it)")
print("paper column coco_caption: not run in any tier (no vision-language model or caption data offline)")
if "sst2" in TASKS:
    print("sst2 has no column in Table 4: its gains are set against the paper's BoolQ column")

# %%
df = run_grid(specs, results_dir=RESULTS_DIR, n_jobs=N_JOBS, progress=True)
ok = df[df["status"] == "ok"].copy()
ok["acc"] = 100.0 * ok["test_accuracy"]
ok["single_class"] = single_class_runs(ok, NUM_CLASSES)  # runs that predict one class (did not train)
print(f"{run_summary(df)}")

# %%
# NBVAL_CHECK_OUTPUT
skipped = df[df["status"] != "ok"]
if len(skipped):
    display(skipped.groupby(["task", "method", "fraction", "skip_reason"]).size().rename("runs").reset_index())
else:
    print("no run was skipped")
display(ok.groupby(["task", "method"])["trainable_params"].first().unstack("method").astype("Int64"))
collapsed = single_class_table(ok, ["task", "fraction", "method"])
if len(collapsed):  # a comparison where every run of both methods predicts one class is inconclusive
    display(collapsed)
else:
    print("every run predicts more than one class")

# %% [markdown]
# ## Our table beside the paper's

# %%
# NBVAL_CHECK_OUTPUT
summ = summarize(ok, metric="acc", by=("task", "fraction", "method"), digits=1)
acc = summ.pivot_table(index=["task", "fraction"], columns="method", values="mean").round(1)
tests = paired_test(ok, method="structlora", baseline="lora", metric="acc", by=("task", "fraction"))
paper_gain = {(t, f): paper.paper_diff(4, PAPER_COL[t], fraction=f) for t in TASKS for f in FRACTIONS}
comp = compare_to_paper(tests, paper_gain, on=("task", "fraction"), digits=1)
tab = acc.join(comp.set_index(["task", "fraction"])[["ours (display)", "paper", "n", "p"]]
               .rename(columns={"ours (display)": "gain [95% CI]", "paper": "paper gain"}))
tab["p"] = tab["p"].round(3)
display(tab)

# %%
pap = paper.table_frame(4).rename(columns={"dataset": "task"})
pap = pap[pap["task"].isin({PAPER_COL[t] for t in TASKS})]
pap["task"] = "paper " + pap["task"]
fig = plots.gain_curve(tests, x="fraction", hue="task", paper=pap, paper_y="gain", logx=True,
                       xlabel="fraction of the training split",
                       title=f"StructLoRA − LoRA by data fraction ({TIER} tier)")
fig_path = plots.save_figure(fig, NB, "fraction_gain", TIER)
fig;

# %% [markdown]
# ## Verdicts
#
# 1. At each fraction: StructLoRA − LoRA paired over seeds (same seed = same few-shot subset) against the
#    paper's gain at that fraction.
# 2. "The gain grows as data shrinks": per seed, gain at the smallest fraction minus gain at 100%,
#    paired over seeds, against the same contrast in the paper's table.

# %%
# NBVAL_CHECK_OUTPUT
claims = []
for t in TASKS:
    col = PAPER_COL[t]
    for f in FRACTIONS:
        row = tests[(tests["task"] == t) & np.isclose(tests["fraction"], f)]
        pd_ = paper.paper_diff(4, col, fraction=f)
        degenerate, note = collapse_status(ok[(ok["task"] == t) & np.isclose(ok["fraction"], f)])
        claims.append(claim_from_test(
            f"T4.{t}.f{int(round(100 * f))}.structlora>lora", NB, TIER,
            f"StructLoRA beats LoRA with {f:.0%} of the training data on {t}",
            row.iloc[0] if len(row) else None, pd_, paper_value=f"{pd_:+.1f} (Table 4, {col}, {f:.0%})",
            note=note if len(row) else "not run", degenerate=degenerate))
    lo_f, hi_f = min(FRACTIONS), max(FRACTIONS)
    sub = ok[ok["task"] == t].pivot_table(index=["seed", "fraction"], columns="method", values="acc")
    if lo_f < hi_f and {"lora", "structlora"} <= set(sub.columns):
        g = (sub["structlora"] - sub["lora"]).rename("gain").reset_index()
        g = g[np.isclose(g["fraction"], lo_f) | np.isclose(g["fraction"], hi_f)]
        g["method"] = np.where(np.isclose(g["fraction"], lo_f), "small", "full")
        ct = paired_test(g.assign(task=t), method="small", baseline="full", metric="gain", by=("task",))
        p_contrast = round(paper.paper_diff(4, col, fraction=lo_f) - paper.paper_diff(4, col, fraction=hi_f), 2)
        ends = ok[(ok["task"] == t) & (np.isclose(ok["fraction"], lo_f) | np.isclose(ok["fraction"], hi_f))]
        degenerate, note = collapse_status(ends)
        claims.append(claim_from_test(
            f"T4.{t}.gain_grows_as_data_shrinks", NB, TIER,
            f"the gain is larger with {lo_f:.0%} than with {hi_f:.0%} of the data on {t}",
            ct.iloc[0] if len(ct) else None, p_contrast,
            paper_value=f"{p_contrast:+.1f} (Table 4, {col}: gain at {lo_f:.0%} minus gain at {hi_f:.0%})",
            note=note, degenerate=degenerate))
    else:
        claims.append(claim_from_test(f"T4.{t}.gain_grows_as_data_shrinks", NB, TIER,
                                      f"the gain grows as data shrinks on {t}", None, None,
                                      note="needs two fractions in this tier"))
ledger = pd.DataFrame([c.to_dict() for c in claims])
display(ledger[["claim_id", "paper_value", "ours", "n", "verdict"]])

# %%
per_f = [c for c in claims if c.claim_id.endswith("structlora>lora")]
pos = sum(c.ours_value is not None and c.ours_value > 0 for c in per_f)
rep = sum(c.verdict == "reproduced" for c in per_f)
trend = [c for c in claims if c.claim_id.endswith("gain_grows_as_data_shrinks")]
lines = [f"- **{c.claim_id}**: paper {c.paper_value}; ours {c.ours} (n={c.n}) → **{c.verdict}**"
         + (f" ({c.note})" if c.note else "") for c in claims]
display(Markdown(
    f"StructLoRA's mean gain over LoRA is positive at {pos} of {len(per_f)} (task, fraction) points and "
    f"significantly so (reproduced) at {rep}; where it is not, StructLoRA does **not** beat LoRA at our scale. "
    f"The 'gain grows as data shrinks' contrast is "
    + ", ".join(f"{c.verdict} on {c.claim_id.split('.')[1]}" for c in trend) + ".\n\n" + "\n".join(lines)))

# %%
path = write_claims(NB, TIER, claims)
print(f"wrote {len(claims)} claims to {path}; figure: {fig_path}")
print(f"notebook wall time: {(time.perf_counter() - _T0) / 60:.1f} min")
