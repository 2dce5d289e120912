"""Seaborn figures shared by the reproduction notebooks.

Every notebook saves its figures with :func:`save_figure` to ``results/figures/<notebook>_<name>.<tier>.png``
(the tier is in the name, so smoke figures never replace cpu ones). The plotting helpers take tidy
DataFrames (one row per run, or one row per (group, metric) summary) and return the matplotlib Figure;
end the notebook cell with ``;`` so only the image is shown.

    from structlora.repro import plots
    plots.setup_style()
    fig = plots.method_bars(df, metric="test_accuracy", col="task")
    plots.save_figure(fig, "01_main_results", "methods", TIER)
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from .._io import atomic_write

__all__ = [
    "setup_style",
    "stripplot",
    "figure_path",
    "save_figure",
    "method_bars",
    "gain_panels",
    "ours_vs_paper",
    "layer_heatmap",
    "ablation_panels",
    "filter_bars",
    "removal_scatter",
    "METHOD_PALETTE",
    "method_label",
]

# Fixed colours for the methods people look for first; everything else gets a muted grey-blue.
METHOD_PALETTE: dict[str, str] = {
    "lora": "#4C72B0",
    "structlora": "#C44E52",
    "structlora_no_gate": "#DD8452",
    "structlora_no_coord": "#E7A96B",
    "dora": "#55A868",
    "full_ft": "#333333",
    "linear_probe": "#999999",
}
_OTHER = "#8DA0CB"


def method_label(method: str) -> str:
    """Paper-style display name (``"structlora"`` -> ``"StructLoRA"``)."""
    try:
        from .paper import METHOD_LABELS

        return METHOD_LABELS.get(method, method)
    except Exception:  # pragma: no cover
        return method


def _palette(methods: Iterable[str]) -> dict[str, str]:
    return {m: METHOD_PALETTE.get(m, _OTHER) for m in methods}


def setup_style(context: str = "notebook") -> None:
    """Seaborn whitegrid theme, fixed figure dpi; call once at the top of a notebook."""
    sns.set_theme(context=context, style="whitegrid", palette="deep")
    plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 120, "figure.autolayout": False,
                         "axes.titlesize": "medium", "svg.hashsalt": "structlora"})


def stripplot(*, seed: int = 0, **kwargs) -> plt.Axes:
    """``seaborn.stripplot`` with its jitter drawn from a seeded generator, so a re-run draws the same
    points and `save_figure` writes the same bytes (seaborn jitters with numpy's global RNG)."""
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        return sns.stripplot(**kwargs)
    finally:
        np.random.set_state(state)


def figure_path(notebook: str, name: str, tier: str, root: str | os.PathLike = "results") -> Path:
    """``<root>/figures/<notebook>_<name>.<tier>.png``."""
    return Path(root) / "figures" / f"{notebook}_{name}.{tier}.png"


def save_figure(fig: plt.Figure, notebook: str, name: str, tier: str, root: str | os.PathLike = "results") -> Path:
    """Save ``fig`` as PNG (no timestamp in the metadata, so reruns give identical bytes) and return the path."""
    path = figure_path(notebook, name, tier, root)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: fig.savefig(f, format="png", bbox_inches="tight", metadata={"Software": None}))
    return path


def _finish(fig: plt.Figure, title: str | None) -> plt.Figure:
    if title:
        fig.suptitle(title, y=1.02)
    return fig


def method_bars(df: pd.DataFrame, metric: str = "test_accuracy", *, x: str = "method", col: str | None = "task",
                order: Sequence[str] | None = None, col_order: Sequence[str] | None = None,
                paper: pd.DataFrame | None = None, scale: float = 100.0, col_wrap: int = 3,
                ylabel: str | None = None, title: str | None = None, height: float = 3.2) -> plt.Figure:
    """Mean ± std bars over seeds per method (one panel per ``col``), each seed as a dot.

    ``df``: one row per run with columns ``x``, ``col`` and ``metric`` (runs with NaN metric are dropped).
    ``paper``: optional rows (``x``, ``col``, ``paper``) drawn as black diamonds (the paper's number; on a
    different model and scale, so compare the ordering, not the level). ``scale`` multiplies the metric
    (fractions -> %); use 1.0 when the metric is already in points.
    """
    d = df.dropna(subset=[metric]).copy()
    if d.empty:
        fig, ax = plt.subplots(figsize=(4, 2))
        ax.text(0.5, 0.5, "no finished runs", ha="center", va="center")
        ax.set_axis_off()
        return _finish(fig, title)
    d["_y"] = d[metric].astype(float) * scale
    order = list(order) if order is not None else list(dict.fromkeys(d[x]))
    order = [m for m in order if m in set(d[x])]
    panels = list(col_order) if col_order is not None else (list(dict.fromkeys(d[col])) if col else [None])
    panels = [p for p in panels if p is None or p in set(d[col])]
    ncol = min(col_wrap, len(panels))
    nrow = int(np.ceil(len(panels) / ncol))
    width = max(3.5, 0.42 * len(order) + 1.0)
    fig, axes = plt.subplots(nrow, ncol, figsize=(width * ncol, height * nrow), squeeze=False, sharey=False)
    pal = _palette(order)
    for i, p in enumerate(panels):
        ax = axes[i // ncol][i % ncol]
        sub = d if p is None else d[d[col] == p]
        present = [m for m in order if m in set(sub[x])]
        sns.barplot(data=sub, x=x, y="_y", hue=x, order=present, hue_order=present, palette=pal, errorbar="sd",
                    ax=ax, legend=False, alpha=0.85, capsize=0.15, err_kws={"linewidth": 1.0})
        stripplot(data=sub, x=x, y="_y", order=present, color="black", size=3, ax=ax, jitter=0.15)
        if paper is not None and len(paper):
            pp = paper if p is None else paper[paper[col] == p]
            pos = {m: k for k, m in enumerate(present)}
            pts = [(pos[m], v) for m, v in zip(pp[x], pp["paper"]) if m in pos and pd.notna(v)]
            if pts:
                ax.scatter(*zip(*pts), marker="D", color="black", facecolor="white", zorder=5, s=22,
                           label="paper")
                ax.legend(loc="lower right", fontsize="x-small")
        lo = sub["_y"].min()
        ax.set_ylim(bottom=max(0.0, lo - 0.15 * (sub["_y"].max() - lo + 1e-9) - 2))
        ax.set_title(str(p) if p is not None else "")
        ax.set_xlabel("")
        ax.set_ylabel(ylabel or metric)
        ax.set_xticks(range(len(present)), [method_label(m) for m in present], rotation=60, ha="right",
                      fontsize="small")
    for j in range(len(panels), nrow * ncol):
        axes[j // ncol][j % ncol].set_axis_off()
    fig.tight_layout()
    return _finish(fig, title)


def gain_panels(gains: pd.DataFrame, x: str, paper: pd.DataFrame, *, xlabel: str, labels: dict[str, str],
                fmt: str = "{:g}", title: str | None = None) -> plt.Figure:
    """Tables 3-4 per task: one panel per task of our StructLoRA - LoRA gain at every ``x`` (95% CI as
    error bars; the plan's family-wise interval, where the point is primary, as a wider pale bar) beside
    the paper's gain for the column the task stands in for (``labels``: task -> column name), dashed.

    ``gains``: rows of `sweeps.gain_frame` (``task``, ``x``, ``diff_mean``, ``ci_low``, ``ci_high``,
    ``fw_low``, ``fw_high``, ``n``); ``paper``: rows of `sweeps.paper_frame` (``task``, ``x``, ``gain``).
    The x positions are evenly spaced and every one is labelled (``fmt``), ours and the paper's alike; a
    point we did not run shows only the paper's value. ``n`` (paired seeds) is written under each point.
    """
    tasks = list(dict.fromkeys(list(paper["task"]) + list(gains["task"])))  # the caller's task order
    fig, axes = plt.subplots(1, max(1, len(tasks)), figsize=(4.6 * max(1, len(tasks)), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        ours = gains[gains["task"] == task].sort_values(x)
        theirs = paper[paper["task"] == task].sort_values(x)
        values = sorted(set(ours[x].astype(float)) | set(theirs[x].astype(float)))
        pos = {v: i for i, v in enumerate(values)}
        px = [pos[float(v)] for v in theirs[x]]
        ax.plot(px, theirs["gain"], linestyle="--", marker="s", markerfacecolor="white", color="0.45",
                label=f"paper: {labels.get(task, task)}")
        ox = np.array([pos[float(v)] for v in ours[x]], dtype=float)
        y = ours["diff_mean"].to_numpy(dtype=float)
        if "fw_low" in ours and ours["fw_low"].notna().any():
            fw = np.vstack([np.nan_to_num(y - ours["fw_low"].to_numpy(dtype=float)),
                            np.nan_to_num(ours["fw_high"].to_numpy(dtype=float) - y)])
            ax.errorbar(ox, y, yerr=fw, fmt="none", elinewidth=6, alpha=0.25, color="C0",
                        label="family-wise interval (primary)")
        err = np.vstack([np.nan_to_num(y - ours["ci_low"].to_numpy(dtype=float)),
                         np.nan_to_num(ours["ci_high"].to_numpy(dtype=float) - y)])
        ax.errorbar(ox, y, yerr=err, marker="o", capsize=3, color="C0", label=f"ours: {task} (95% CI)")
        for xi, yi, n in zip(ox, y, ours.get("n", pd.Series([None] * len(ours)))):
            if n is not None and n == n:
                ax.annotate(f"n={int(n)}", (xi, yi), textcoords="offset points", xytext=(6, -10), fontsize="x-small")
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(values)), [fmt.format(v) for v in values])
        ax.set_xlabel(xlabel)
        ax.set_ylabel("StructLoRA − LoRA (points)")
        ax.set_title(task)
        ax.legend(fontsize="x-small", loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def ours_vs_paper(comp: pd.DataFrame, *, ours: str = "ours", paper: str = "paper", hue: str = "task",
                  label: str | None = "method", title: str | None = None) -> plt.Figure:
    """Scatter of our score against the paper's (same units), one colour per ``hue``; y = x dashed."""
    d = comp.dropna(subset=[ours, paper])
    fig, ax = plt.subplots(figsize=(4.6, 4.2))
    if d.empty:
        ax.text(0.5, 0.5, "nothing to compare", ha="center", va="center")
        ax.set_axis_off()
        return _finish(fig, title)
    sns.scatterplot(data=d, x=paper, y=ours, hue=hue, ax=ax, s=40)
    lo = float(min(d[ours].min(), d[paper].min())) - 2
    hi = float(max(d[ours].max(), d[paper].max())) + 2
    ax.plot([lo, hi], [lo, hi], "--", color="grey", linewidth=0.8)
    if label:
        for r in d.itertuples(index=False):
            if getattr(r, label) in ("lora", "structlora"):
                ax.annotate(method_label(getattr(r, label)), (getattr(r, paper), getattr(r, ours)), fontsize=7,
                            xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("paper")
    ax.set_ylabel("ours")
    ax.legend(fontsize="x-small")
    fig.tight_layout()
    return _finish(fig, title)


def layer_heatmap(matrix: np.ndarray | pd.DataFrame, *, title: str | None = None, vmin: float = -1.0,
                  vmax: float = 1.0, cmap: str = "vlag", ax: plt.Axes | None = None,
                  annot: bool | None = None) -> plt.Figure:
    """Layer x layer matrix (e.g. cosine of updates, Figure 4); annotated when small."""
    if ax is None:
        n = np.asarray(matrix).shape[0]
        fig, ax = plt.subplots(figsize=(max(3.5, 0.45 * n + 1.5), max(3.0, 0.45 * n + 1.0)))
    else:
        fig = ax.figure
    n = np.asarray(matrix).shape[0]
    sns.heatmap(matrix, vmin=vmin, vmax=vmax, cmap=cmap, square=True, ax=ax,
                annot=(n <= 12) if annot is None else annot, fmt=".2f", annot_kws={"fontsize": 7},
                cbar_kws={"shrink": 0.8})
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig


def ablation_panels(runs: pd.DataFrame, tasks: Sequence[str], order: Sequence[str], labels: dict[str, str],
                    method_of: dict[str, str], side: Sequence[str], title: str | None = None) -> plt.Figure:
    """Notebook 04's figure: one row per task; test accuracy of every variant present (bars: mean ± std,
    one dot per seed), then drift energy E and CosAdj of the ``side`` variants. ``runs`` has ``task``,
    ``variant``, ``acc`` (%), ``diag_drift_energy`` and ``diag_cos_adj``; colours follow ``method_of``."""
    fig, axes = plt.subplots(len(tasks), 3, figsize=(15, 3.6 * len(tasks)), squeeze=False,
                             gridspec_kw={"width_ratios": [2.2, 1, 1]})
    for i, t in enumerate(tasks):
        sub = runs[runs["task"] == t]
        present = [v for v in order if v in set(sub["variant"])]
        pal = {v: METHOD_PALETTE.get(method_of[v], _OTHER) for v in present}
        ax = axes[i][0]
        sns.barplot(data=sub, x="variant", y="acc", hue="variant", order=present, hue_order=present, palette=pal,
                    errorbar="sd", ax=ax, legend=False, alpha=0.85)
        stripplot(data=sub, x="variant", y="acc", order=present, color="black", size=4, ax=ax, jitter=0.15)
        if len(sub):
            ax.set_ylim(max(0, sub["acc"].min() - 3), min(100, sub["acc"].max() + 2))
        ax.set_xticks(range(len(present)))
        ax.set_xticklabels([labels[v].replace(" (", "\n(") for v in present], rotation=35, ha="right", fontsize=8)
        ax.set_xlabel("")
        ax.set_ylabel(f"{t}: test accuracy (%)")
        pen = [v for v in side if v in set(sub["variant"])]
        for j, (metric, name) in enumerate([("diag_drift_energy", "drift energy E (↓)"), ("diag_cos_adj", "CosAdj (↑)")]):
            ax2 = axes[i][1 + j]
            sns.barplot(data=sub[sub["variant"].isin(pen)], x="variant", y=metric, hue="variant", order=pen,
                        hue_order=pen, palette=pal, errorbar="sd", ax=ax2, legend=False, alpha=0.85)
            ax2.set_xticks(range(len(pen)))
            ax2.set_xticklabels([labels[v].split(" (")[0] for v in pen], rotation=35, ha="right", fontsize=8)
            ax2.set_xlabel("")
            ax2.set_ylabel(name)
    fig.tight_layout()
    return _finish(fig, title)


_FILTER_PALETTE = {"filter_ib": "#C44E52", "filter_random": "#8C8C8C", "filter_topk_norm": "#4C72B0"}


def filter_bars(runs: pd.DataFrame, tasks: Sequence[str], order: Sequence[str], labels: dict[str, str],
                xlabel: str, ylabels: Sequence[str], reference: str = "lora", reference_label: str = "LoRA",
                title: str | None = None) -> plt.Figure:
    """Notebook 05's Fig. 2: per task, test accuracy (``acc``, %) of the filters in ``order`` (bars: mean ±
    std, one dot per seed) with the ``reference`` method's mean as a dashed line."""
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.8 * len(tasks), 3.6), squeeze=False)
    order = [m for m in order if m in set(runs["method"])]
    for ax, t, ylabel in zip(axes[0], tasks, ylabels):
        sub = runs[(runs["task"] == t) & runs["method"].isin(order)]
        sns.barplot(data=sub, x="method", y="acc", hue="method", order=order, hue_order=order,
                    palette={m: _FILTER_PALETTE.get(m, _OTHER) for m in order}, errorbar="sd", ax=ax, legend=False,
                    alpha=0.85)
        stripplot(data=sub, x="method", y="acc", order=order, color="black", size=4, ax=ax, jitter=0.15)
        ref = runs[(runs["task"] == t) & (runs["method"] == reference)]["acc"]
        if len(ref):
            ax.axhline(ref.mean(), color="#4C72B0", ls="--", lw=1, label=reference_label)
            ax.legend(loc="lower right", fontsize=8)
        both = pd.concat([sub["acc"], ref])
        if len(sub):
            ax.set_ylim(max(0, both.min() - 3), min(100, both.max() + 2))
        ax.set_xticks(range(len(order)))
        ax.set_xticklabels([labels[m] for m in order])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
    fig.tight_layout()
    return _finish(fig, title)


def removal_scatter(removal: dict[str, pd.DataFrame], corr: pd.DataFrame, labels: dict[str, str],
                    title: str | None = None) -> plt.Figure:
    """Notebook 05's single-direction removal probe: per probed model, the loss increase of each direction
    against the rank of its gate score, its norm and its effective norm (Spearman's ρ uses ranks; the raw
    range is in the axis label), titled with ρ on the active directions from ``corr``."""
    fig, axes = plt.subplots(len(removal), 3, figsize=(14, 3.7 * len(removal)), squeeze=False)
    for i, (m, r) in enumerate(removal.items()):
        for j, (score, name) in enumerate((("gate_score", "gate score P(open)"), ("norm", "‖b_j‖·‖a_j‖"),
                                           ("effective_norm", "effective norm s·m_j·‖b_j‖‖a_j‖"))):
            ax = axes[i][j]
            d = r.assign(score_rank=r[score].rank(method="average"))
            sns.scatterplot(data=d, x="score_rank", y="dloss", hue="family", style="active", style_order=[True, False],
                            ax=ax, s=28, alpha=0.8, legend=(j == 2))
            c = corr[(corr["model"] == m) & (corr["directions"] == "active")]
            rho = c[f"rho_{score}"].iloc[0] if len(c) else np.nan
            ax.set_title(f"{labels[m]}: ρ(active) = {rho:.2f}", fontsize=9)
            ax.set_xlabel(f"rank of {name}\n(range {r[score].min():.4g} … {r[score].max():.4g})", fontsize=9)
            ax.set_ylabel("Δ validation loss when removed" if j == 0 else "")
            ax.axhline(0, color="grey", lw=0.6)
        if axes[i][2].get_legend() is not None:
            sns.move_legend(axes[i][2], "upper left", bbox_to_anchor=(1.02, 1), fontsize=8)
    fig.tight_layout()
    return _finish(fig, title)
