"""Statistics over grid results: seed summaries, paired t-tests against a baseline, and verdicts.

The paper averages three seeds and runs paired two-sided t-tests against vanilla LoRA at 95%
(appendix A). ``paired_test`` pairs runs on matched seeds, ``verdict`` turns a paired difference into
"reproduced" / "not reproduced" / "inconclusive" by the rule written in its docstring.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats as _st

__all__ = ["paired_difference", "summarize", "paired_test", "verdict", "compare_to_paper", "single_class_runs", "single_class_table", "VERDICTS",
           "OUTCOMES", "DIRECTION_ONLY", "seeds_needed", "holm", "decide", "identical_arms"]

VERDICTS = ("reproduced", "not reproduced", "inconclusive")
DEFAULT_BY = ("task", "model", "method", "rank", "fraction")
FINGERPRINT = "test_predictions_sha256"   # per-run hash of the test predictions (grid records)


def _ok_rows(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["status"] == "ok"] if "status" in df.columns else df


def _check_columns(df: pd.DataFrame, cols: Sequence[str], what: str) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise KeyError(f"{what}: missing column(s) {missing}; available: {sorted(map(str, df.columns))}")


def summarize(df: pd.DataFrame, metric: str = "test_accuracy", by: Sequence[str] = DEFAULT_BY,
              scale: float = 1.0, digits: int = 2) -> pd.DataFrame:
    """Mean, sample std (ddof=1; NaN for one run), n and a ``"mean ± std"`` display string per group.

    Only rows with ``status == "ok"`` count (when there is a status column). ``scale`` multiplies the
    metric (e.g. 100 for percentages) before summarising; ``digits`` formats the display column.
    """
    by = list(by)
    _check_columns(df, by + [metric], "summarize")
    rows = _ok_rows(df).dropna(subset=[metric])
    g = rows.assign(_v=rows[metric].astype(float) * scale).groupby(by, dropna=False, sort=True)["_v"]
    out = g.agg(mean="mean", std=lambda v: v.std(ddof=1), n="count").reset_index()
    out["mean ± std"] = [f"{m:.{digits}f}" if n < 2 else f"{m:.{digits}f} ± {s:.{digits}f}"
                         for m, s, n in zip(out["mean"], out["std"], out["n"])]
    return out


def paired_difference(x: Sequence[float], y: Sequence[float], confidence: float = 0.95) -> dict[str, float]:
    """Paired statistics of d = x - y for two aligned samples (e.g. two per-seed contrasts): ``n``,
    ``diff_mean``, ``diff_std``, ``ci_low`` / ``ci_high`` (t-interval), ``t`` and two-sided ``p``."""
    return _paired_stats(np.asarray(x, dtype=float), np.asarray(y, dtype=float), confidence)


def _paired_stats(x: np.ndarray, y: np.ndarray, confidence: float) -> dict[str, float]:
    """Statistics of d = x - y: mean, std, the t-interval of the mean, t and two-sided p (ttest_rel)."""
    d = x - y
    n = len(d)
    out = {"n": n, "diff_mean": float(d.mean()) if n else math.nan, "diff_std": math.nan,
           "ci_low": math.nan, "ci_high": math.nan, "t": math.nan, "p": math.nan,
           "method_mean": float(x.mean()) if n else math.nan, "baseline_mean": float(y.mean()) if n else math.nan}
    if n < 2:
        return out
    sd = float(d.std(ddof=1))
    out["diff_std"] = sd
    if sd == 0.0:  # every pair differs by the same amount: a degenerate, infinitely precise difference
        mean = out["diff_mean"]
        out.update(ci_low=mean, ci_high=mean, t=math.copysign(math.inf, mean) if mean else 0.0,
                   p=0.0 if mean else 1.0)
        return out
    half = _st.t.ppf(0.5 + confidence / 2, n - 1) * sd / math.sqrt(n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = _st.ttest_rel(x, y)
    out.update(ci_low=out["diff_mean"] - half, ci_high=out["diff_mean"] + half, t=float(res.statistic),
               p=float(res.pvalue))
    return out


def paired_test(df: pd.DataFrame, method: str, baseline: str = "lora", metric: str = "test_accuracy",
                by: Sequence[str] = ("task", "model", "rank", "fraction"), confidence: float = 0.95,
                scale: float = 1.0) -> pd.DataFrame:
    """Paired comparison of ``method`` with ``baseline`` on matched seeds, one row per ``by`` group.

    Runs are paired by an inner join on ``seed`` inside each group (seeds present for only one of the
    two are dropped with a warning; two runs of one method with the same seed in a group are an error,
    add the distinguishing column to ``by``). Columns: ``by``, ``method``, ``baseline``, ``n`` (pairs),
    ``method_mean``, ``baseline_mean``, ``diff_mean`` and ``diff_std`` (ddof=1) of ``method -
    baseline``, ``ci_low``/``ci_high`` (the ``confidence`` t-interval of the mean difference,
    ``mean ± t_{n-1} * std / sqrt(n)``), ``t`` and two-sided ``p`` (``scipy.stats.ttest_rel``). With
    fewer than 2 pairs the interval, t and p are NaN. When all differences are equal (std 0), the
    interval is the point, p = 0 (t = ±inf) for a non-zero difference, p = 1 (t = 0) for zero.
    ``arms_identical`` is the manipulation check: True when the frame has the runs' prediction
    fingerprints (``test_predictions_sha256``) and every paired seed's two runs predicted the same.
    """
    by = [c for c in by if c != "method"]
    _check_columns(df, by + ["method", "seed", metric], "paired_test")
    rows = _ok_rows(df).dropna(subset=[metric])
    rows = rows[rows["method"].isin([method, baseline])]
    results = []
    groups = rows.groupby(by, dropna=False, sort=True) if by else [((), rows)]
    for key, grp in groups:
        key = key if isinstance(key, tuple) else (key,)
        sides, prints = {}, {}
        for name in (method, baseline):
            part = grp[grp["method"] == name]
            dup = part["seed"][part["seed"].duplicated()].tolist()
            if dup:
                raise ValueError(f"paired_test: {name!r} has several runs with seed(s) {dup} in group "
                                 f"{dict(zip(by, key))}; add the column that tells them apart to `by`")
            sides[name] = part.set_index("seed")[metric].astype(float) * scale
            if FINGERPRINT in part:
                prints[name] = part.set_index("seed")[FINGERPRINT]
        if sides[method].empty or sides[baseline].empty:
            continue
        joined = pd.concat({"m": sides[method], "b": sides[baseline]}, axis=1, join="inner").sort_index()
        unmatched = sorted(set(sides[method].index) ^ set(sides[baseline].index))
        if unmatched:
            warnings.warn(f"paired_test: seeds {unmatched} of group {dict(zip(by, key))} have no partner "
                          f"run ({method} vs {baseline}) and are dropped", stacklevel=2)
        stats = _paired_stats(joined["m"].to_numpy(), joined["b"].to_numpy(), confidence)
        same = (len(prints) == 2 and identical_arms(list(prints[method].reindex(joined.index)),
                                                    list(prints[baseline].reindex(joined.index))))
        results.append({**dict(zip(by, key)), "method": method, "baseline": baseline, **stats,
                        "arms_identical": bool(same)})
    cols = by + ["method", "baseline", "n", "method_mean", "baseline_mean", "diff_mean", "diff_std",
                 "ci_low", "ci_high", "t", "p", "arms_identical"]
    return pd.DataFrame(results, columns=cols)


def single_class_runs(df: pd.DataFrame, num_classes: Mapping[str, int] | int, split: str = "test") -> pd.Series:
    """True for runs that predict ONE class for every example of ``split`` (a collapsed run).

    Read from the recorded metrics, no predictions needed: a constant predictor of a class with share
    ``p`` has accuracy ``p``, F1 ``2p / (1 + p)`` on that class and 0 on the other ``K - 1``, so its
    macro-F1 is exactly ``2p / ((1 + p) K)``. ``num_classes`` is ``K`` (one int, or per task name);
    needs the columns ``<split>_accuracy`` and ``<split>_macro_f1`` (and ``task`` for a mapping).
    Comparisons between two collapsed methods test the budget, not the methods.
    """
    _check_columns(df, [f"{split}_accuracy", f"{split}_macro_f1"], "single_class_runs")
    acc = df[f"{split}_accuracy"].astype(float)
    f1 = df[f"{split}_macro_f1"].astype(float)
    if isinstance(num_classes, Mapping):
        _check_columns(df, ["task"], "single_class_runs")
        k = df["task"].map(num_classes).astype(float)
        if k.isna().any():
            raise KeyError(f"single_class_runs: no class count for task(s) {sorted(set(df['task'][k.isna()]))}")
    else:
        k = pd.Series(float(num_classes), index=df.index)
    signature = 2.0 * acc / ((1.0 + acc) * k)
    return pd.Series(np.isclose(f1, signature, rtol=0.0, atol=1e-9) & acc.notna(), index=df.index)


def single_class_table(df: pd.DataFrame, by: Sequence[str], column: str = "single_class") -> pd.DataFrame:
    """Per group of ``by``, how many runs predict one class (``column``, e.g. from ``single_class_runs``)
    and how many runs there are; only groups with at least one such run (empty frame: none)."""
    _check_columns(df, [*by, column], "single_class_table")
    counts = df.groupby(list(by))[column].agg(["sum", "size"])
    return counts[counts["sum"] > 0].rename(columns={"sum": "single-class runs", "size": "runs"})


def _nan(x: Any) -> bool:
    return x is None or (isinstance(x, (float, np.floating)) and math.isnan(x))


def verdict(diff_mean: float, ci_low: float, ci_high: float, p: float, paper_diff: float | None,
            alpha: float = 0.05, margin: float | None = None) -> str:
    """Whether our paired difference (method minus baseline) reproduces the paper's difference: the
    three-way rule of protocol 1, kept for claims of parity (``paper_diff`` 0 with a margin); every
    notebook's verdict is `decide`'s.

    The paper's claim is an effect of ``paper_diff`` (same units as ours) in its direction
    ``s = sign(paper_diff)``; ``[ci_low, ci_high]`` is our 95% t-interval of the mean paired
    difference over seeds and ``p`` its two-sided paired t-test p-value. ``margin`` is the smallest
    effect we would still count as "the paper's effect"; by default half of ``|paper_diff|``.

    1. **reproduced**: ``p < alpha`` and our mean difference has the paper's sign: a significant
       effect in the claimed direction (its size may differ; compare it with ``paper_diff``).
    2. **not reproduced**: ``p < alpha`` with the opposite sign (a significant effect against the
       claim); or, without a significant effect, the interval excludes every effect of at least
       ``margin`` in the paper's direction (``s * ci_high < margin`` for ``s = +1``, i.e. with 95%
       confidence the true effect is less than half of what the paper reports).
    3. **inconclusive**: everything else, i.e. no significant difference while the interval still
       admits an effect of ``margin`` or more (too few seeds or too much noise to decide); also when
       the statistics are undefined (fewer than 2 paired seeds: NaN interval or p) or there is no
       paper value to compare with.

    A ``paper_diff`` of 0 (a claim of parity) needs an explicit ``margin``: reproduced when the
    interval lies inside ``(-margin, margin)`` (equivalence), not reproduced when ``p < alpha``
    (a significant difference), inconclusive otherwise.
    """
    if any(_nan(v) for v in (diff_mean, ci_low, ci_high, p)) or _nan(paper_diff):
        return "inconclusive"
    if ci_low > ci_high:
        raise ValueError(f"ci_low {ci_low} > ci_high {ci_high}")
    significant = p < alpha
    if paper_diff == 0:
        if margin is None or margin <= 0:
            raise ValueError("a parity claim (paper_diff == 0) needs an equivalence margin > 0")
        if significant:
            return "not reproduced"
        return "reproduced" if -margin < ci_low and ci_high < margin else "inconclusive"
    s = 1.0 if paper_diff > 0 else -1.0
    margin = 0.5 * abs(paper_diff) if margin is None else float(margin)
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    if significant and s * diff_mean > 0:
        return "reproduced"
    if significant and s * diff_mean < 0:
        return "not reproduced"
    upper_in_paper_direction = ci_high if s > 0 else -ci_low
    if upper_in_paper_direction < margin:
        return "not reproduced"
    return "inconclusive"


def _flatten(paper: Mapping[Any, Any], depth: int) -> dict[tuple, float]:
    out: dict[tuple, float] = {}
    for k, v in paper.items():
        key = k if isinstance(k, tuple) else (k,)
        if isinstance(v, Mapping):
            for sub, val in _flatten(v, depth - len(key)).items():
                out[key + sub] = val
        else:
            out[key] = v
    return out


def compare_to_paper(ours: pd.DataFrame, paper: Mapping[Any, Any], on: Sequence[str] = ("task", "method"),
                     value: str | None = None, scale: float = 1.0, digits: int = 2,
                     alpha: float = 0.05, margin: float | None = None) -> pd.DataFrame:
    """Side-by-side table of our numbers and the paper's.

    ``paper`` maps keys of the ``on`` columns to the paper's value, as tuples
    (``{("sst2", "lora"): 95.1}``) or nested dicts (``{"sst2": {"lora": 95.1}}``). ``ours`` is a
    ``summarize`` table (``value`` defaults to ``"mean"``) or a ``paired_test`` table (``value``
    defaults to ``"diff_mean"``; the paper's values are then its differences and a ``verdict`` column
    is added by `decide`, the one verdict rule, without the power analysis: a claim's verdict is its
    ``claim_from_test``'s). ``scale`` multiplies our numbers (e.g. 100 for fractions vs the paper's
    percentages). Columns: ``on``, ``ours``, ``paper``, ``delta`` (ours - paper), ``ours (display)``
    and, for paired tables, ``n``, ``ci_low``, ``ci_high``, ``p``, ``verdict``. Rows of ours without a
    paper value keep ``paper`` NaN; paper entries we did not run appear with ``ours`` NaN.
    """
    on = list(on)
    _check_columns(ours, on, "compare_to_paper")
    paired = "diff_mean" in ours.columns
    value = value or ("diff_mean" if paired else "mean")
    _check_columns(ours, [value], "compare_to_paper")
    flat = _flatten(paper, len(on))
    bad = [k for k in flat if len(k) != len(on)]
    if bad:
        raise ValueError(f"paper keys {bad[:3]} do not have one entry per `on` column {on}")
    theirs = pd.DataFrame([dict(zip(on, k), paper=float(v)) for k, v in flat.items()], columns=on + ["paper"])
    mine = ours.copy()
    mine["ours"] = mine[value].astype(float) * scale
    extra = []
    if paired:
        for c in ("ci_low", "ci_high"):
            mine[c] = mine[c].astype(float) * scale
        extra = [c for c in ("n", "ci_low", "ci_high", "p", "arms_identical") if c in mine.columns]
    elif "std" in mine.columns:
        mine["std"] = mine["std"].astype(float) * scale
        extra = [c for c in ("std", "n") if c in mine.columns]
    table = mine[on + ["ours"] + extra].merge(theirs, on=on, how="outer")
    table["delta"] = table["ours"] - table["paper"]
    if paired:
        table["ours (display)"] = [_fmt_ci(m, lo, hi, digits) for m, lo, hi in
                                   zip(table["ours"], table["ci_low"], table["ci_high"])]
        same = table["arms_identical"].fillna(False) if "arms_identical" in table.columns else [False] * len(table)
        table["verdict"] = [decide(m, lo, hi, p, pd_, arms_identical=bool(a), alpha=alpha, margin=margin)
                            for m, lo, hi, p, pd_, a in zip(table["ours"], table["ci_low"], table["ci_high"],
                                                            table["p"], table["paper"], same)]
    else:
        stds = table["std"] if "std" in table.columns else [math.nan] * len(table)
        table["ours (display)"] = [("" if _nan(m) else f"{m:.{digits}f}" if _nan(s) else
                                    f"{m:.{digits}f} ± {s:.{digits}f}") for m, s in zip(table["ours"], stds)]
    return table.sort_values(on, kind="stable").reset_index(drop=True)


def _fmt_ci(mean: float, lo: float, hi: float, digits: int) -> str:
    if _nan(mean):
        return ""
    if _nan(lo) or _nan(hi):
        return f"{mean:+.{digits}f}"
    return f"{mean:+.{digits}f} [{lo:+.{digits}f}, {hi:+.{digits}f}]"


# ------------------------------------------------------------------------------ power, decisions, Holm
# a claim of direction only ("> 0" in the paper, no number): decide() with the paper's sign and margin 0
DIRECTION_ONLY: dict[str, float] = {"paper_diff": 1.0, "margin": 0.0}

OUTCOMES = ("reproduced", "smaller than claimed", "not reproduced", "inconclusive",
            "undecidable at this scale", "untestable (arms identical)")


def seeds_needed(sigma_d: float, effect: float, fraction: float = 0.5, confidence: float = 0.95,
                 max_n: int = 10_000) -> int:
    """Smallest number of paired seeds n >= 2 whose ``confidence`` t-interval of the mean difference has
    half-width at most ``fraction * |effect|``: t_{n-1, (1+c)/2} * sigma_d / sqrt(n) <= fraction |effect|.

    ``sigma_d`` is the (pilot) standard deviation of the paired difference, ``effect`` the paper's
    difference, in the same units. With half-width <= |effect|/2 an interval centred on the paper's
    effect excludes 0 and an interval centred on 0 excludes the paper's effect, so either outcome is
    decided. Returns ``max_n + 1`` when even ``max_n`` seeds are not enough (or the effect is 0).
    """
    if not (sigma_d >= 0) or math.isinf(sigma_d):
        raise ValueError(f"sigma_d must be a finite number >= 0, got {sigma_d!r}")
    target = fraction * abs(effect)
    if target <= 0:
        return max_n + 1
    if sigma_d == 0:
        return 2
    for n in range(2, max_n + 1):
        if _st.t.ppf(0.5 + confidence / 2, n - 1) * sigma_d / math.sqrt(n) <= target:
            return n
    return max_n + 1


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm-Bonferroni adjusted p-values (step-down, monotone, capped at 1), in the input order; NaN
    stays NaN and does not count as a test. Hand-written because scipy offers only Benjamini-Hochberg
    (``false_discovery_control``) and statsmodels is not a dependency."""
    p = np.asarray(pvalues, dtype=float)
    valid = np.flatnonzero(~np.isnan(p))
    out = np.full(p.shape, np.nan)
    m = len(valid)
    running = 0.0
    for rank, i in enumerate(valid[np.argsort(p[valid], kind="stable")]):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out.tolist()


def decide(diff_mean: float, ci_low: float, ci_high: float, p: float, paper_diff: float | None, *,
           arms_identical: bool = False, alpha: float = 0.05, margin: float | None = None,
           seeds_required: int | None = None, seeds_cap: int | None = None) -> str:
    """The one verdict rule of every notebook (README "How a claim is decided"), for a paired difference
    (method minus baseline) against the paper's difference ``paper_diff`` (same units).

    Checked in this order:

    1. **untestable (arms identical)**: the manipulation check failed: the two arms made the same
       predictions (or have the same weights), so the comparison tests nothing.
    2. **undecidable at this scale**: the power analysis (`seeds_needed`) asks for more seeds than the
       tier's cap (``seeds_required > seeds_cap``); the claim is not run as noise. A claim of direction
       only ("> 0", no number: margin 0) has no effect to plan for, so it runs to the cap; there
       ``seeds_required`` is what a difference of the observed size needs for its interval to exclude 0
       (`claims.claim_from_test`), so one still not significant at the cap is undecidable at this scale.
    3. Let s = sign(paper_diff) and margin = |paper_diff| / 2 (unless given); ``p`` may be a
       Holm-adjusted p-value (primary family) or a raw one (exploratory).
       * **reproduced**: significant (p < alpha), the paper's sign, and the interval reaches half the
         paper's effect (s * upper end >= margin);
       * **smaller than claimed**: significant, the paper's sign, but the interval excludes half the
         effect (s * upper end < margin);
       * **not reproduced**: significant with the opposite sign, or not significant while the interval
         excludes half the effect;
       * **inconclusive**: otherwise (or undefined statistics / no paper value).
    """
    if arms_identical:
        return "untestable (arms identical)"
    if seeds_required is not None and seeds_cap is not None and seeds_required > seeds_cap:
        return "undecidable at this scale"
    if any(_nan(v) for v in (diff_mean, ci_low, ci_high, p)) or _nan(paper_diff) or paper_diff == 0:
        return "inconclusive"
    if ci_low > ci_high:
        raise ValueError(f"ci_low {ci_low} > ci_high {ci_high}")
    s = 1.0 if paper_diff > 0 else -1.0
    margin = 0.5 * abs(paper_diff) if margin is None else float(margin)
    upper = ci_high if s > 0 else -ci_low          # the interval's end in the paper's direction
    significant = p < alpha
    if significant and s * diff_mean > 0:
        return "reproduced" if upper >= margin else "smaller than claimed"
    if significant and s * diff_mean < 0:
        return "not reproduced"
    return "not reproduced" if upper < margin else "inconclusive"


def identical_arms(a: Sequence[Any] | None, b: Sequence[Any] | None) -> bool:
    """Manipulation check: True when two arms' per-run fingerprints (e.g. the sha256 of each run's
    test predictions, paired by seed) are all equal, i.e. the two methods computed the same thing."""
    if a is None or b is None or len(a) == 0 or len(a) != len(b):
        return False
    return all(x is not None and x == y for x, y in zip(a, b))
