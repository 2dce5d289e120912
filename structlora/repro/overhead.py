"""Overhead statistics of notebook 06: per-round log-ratio intervals and the margin claims of Table 7.

The interleaved benchmark (``benchmarks/overhead.py``) times every variant once per round on the same
batch, so the per-round ratio variant / reference cancels slow drifts of the machine's load. ``log_ci``
averages the log ratios (a geometric mean) with a 95% t-interval, as % overhead. Table 7's claims are
upper bounds, so ``margin_claim`` tests margin = bound − our overhead with the one verdict rule
(``stats.decide``) in its direction-only form.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats as _st

from structlora.repro.claims import Claim, format_diff
from structlora.repro.stats import DIRECTION_ONLY, decide

__all__ = ["round_ratios", "merged_ratios", "log_ci", "per_round_table", "p_vs_bound", "margin_claim",
           "DIRECTION_ONLY"]

# margin claims ("overhead below the bound") use stats.DIRECTION_ONLY: the claim's direction (+1: margin to the bound > 0), margin 0


def round_ratios(raw: Mapping[str, Any], variant: str, ref: str = "lora") -> np.ndarray:
    """Per-round log(step time of ``variant`` / step time of ``ref``) over the rounds both have, normal
    (non-refresh, non-warm-up) steps only. ``raw["steps"][name]`` lists ``{"round", "wall_s", "warmup",
    "refresh_pos"}`` dicts (``refresh_pos`` < 0: not a sketch-refresh step)."""
    def by_round(name: str) -> dict[int, float]:
        return {s["round"]: s["wall_s"] for s in raw["steps"][name] if not s["warmup"] and s["refresh_pos"] < 0}
    a, b = by_round(variant), by_round(ref)
    common = sorted(set(a) & set(b))
    return np.log(np.array([a[i] for i in common]) / np.array([b[i] for i in common]))


def merged_ratios(raw: Mapping[str, Any], variant: str) -> np.ndarray:
    """Per-round log(merged-inference time of ``variant`` / base model's time), over the common rounds."""
    a, b = raw["merged_eval_s"][variant], raw["merged_eval_s"]["base"]
    return np.log(np.asarray(a[: len(b)]) / np.asarray(b[: len(a)]))


def log_ci(logs: Sequence[float] | np.ndarray) -> dict[str, Any]:
    """Geometric-mean ratio of log ratios ``logs`` with a 95% t-interval, as % overhead: ``pct``,
    ``pct_low``, ``pct_high``, the one-sample t-test ``p`` against 0, ``n`` and ``logs``. The interval
    and p are NaN for fewer than 2 values or no spread; ``pct`` is NaN for no value."""
    n = len(logs)
    m = float(np.mean(logs)) if n else float("nan")
    if n >= 2 and np.std(logs, ddof=1) > 0:
        half = float(_st.t.ppf(0.975, n - 1) * np.std(logs, ddof=1) / np.sqrt(n))
        p = float(_st.ttest_1samp(logs, 0.0).pvalue)
    else:
        half, p = float("nan"), float("nan")
    pct = lambda x: 100 * (np.exp(x) - 1)  # noqa: E731
    return {"pct": pct(m), "pct_low": pct(m - half), "pct_high": pct(m + half), "p": p, "n": n, "logs": np.asarray(logs)}


def per_round_table(raws: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """``log_ci`` rows of every benchmark result in ``raws``: train step of gate / coord / both vs LoRA,
    and merged inference of lora / both vs the base model (each when measured)."""
    per_round = []
    for raw in raws:
        for v in ("gate", "coord", "both"):
            if v in raw["steps"]:
                per_round.append({"model": raw["model"], "r": raw["r"], "variant": v, "what": "train step vs LoRA",
                                  **log_ci(round_ratios(raw, v))})
        for v in ("lora", "both"):
            if v in raw.get("merged_eval_s", {}):
                per_round.append({"model": raw["model"], "r": raw["r"], "variant": v,
                                  "what": "merged inference vs base", **log_ci(merged_ratios(raw, v))})
    return pd.DataFrame(per_round)


def p_vs_bound(est: Mapping[str, Any], bound: float) -> float:
    """Two-sided p of H0 'overhead == bound': t-test of the log ratios against log(1 + bound/100); an exact
    count (no spread) gives p = 0 unless it equals the bound (the convention of stats.paired_test)."""
    logs = est.get("logs")
    if logs is None:
        return 0.0 if est["pct"] != bound else 1.0
    if len(logs) < 2 or np.std(logs, ddof=1) == 0:
        return float("nan")
    return float(_st.ttest_1samp(logs, np.log1p(bound / 100)).pvalue)


def margin_claim(cid: str, text: str, bound: float, est: Mapping[str, Any] | None, paper_value: str, note: str,
                 *, notebook: str, tier: str) -> Claim:
    """Claim that our overhead (``est['pct']`` with its CI ``pct_low``..``pct_high``) stays below ``bound`` %.

    ``est`` None or with a non-finite ``pct``: a *skipped* claim ("not measured"). Otherwise the margin
    d = bound − pct with CI [bound − pct_high, bound − pct_low] is decided by ``stats.decide`` with
    ``DIRECTION_ONLY`` and ``p_vs_bound``.
    """
    if est is None or not np.isfinite(est.get("pct", np.nan)):
        return Claim(cid, notebook, text, paper_value, "not measured", None, None, None, 0, tier, "skipped", note)
    d = bound - est["pct"]
    lo, hi = bound - est["pct_high"], bound - est["pct_low"]
    v = decide(d, lo, hi, p_vs_bound(est, bound), **DIRECTION_ONLY)
    ci = (f" (95% CI [{est['pct_low']:+.1f}, {est['pct_high']:+.1f}])"
          if np.isfinite(est["pct_low"]) and np.isfinite(est["pct_high"]) and est["pct_low"] != est["pct_high"] else "")
    ours = f"overhead {est['pct']:+.1f}%{ci}; margin to {bound:g}%: {format_diff(d, None, lo, hi)}"
    return Claim(cid, notebook, text, paper_value, ours, d, lo if np.isfinite(lo) else None,
                 hi if np.isfinite(hi) else None, int(est.get("n", 0)), tier, v, note)
