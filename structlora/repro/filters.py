"""The filter notebook's (05) logic: the Fig. 2 comparisons of the three filters at one keep ratio, paired
over seeds, and the claims drawn from them and from the single-direction removal probe (`probes`).

Fig. 2 gives only the ordering IB > Top-k Norm > Random (bar heights are not in the text), so each
comparison is a claim of direction: the one verdict rule (`stats.decide`) with the paper's sign and a
margin of 0 (`stats.DIRECTION_ONLY`), and no power analysis (there is no effect size to plan for): the
filters run to the tier's seed cap, and a comparison still not significant there is *undecidable at this
scale*, with the seeds a difference of the observed size would need."""
from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np
import pandas as pd

from structlora.repro.claims import Claim, claim_line, claim_from_test, format_diff
from structlora.repro.notebook import TASK_MODEL
from structlora.repro.stats import DIRECTION_ONLY, decide, paired_test

__all__ = ["PAIRS", "pair_tests", "filter_claims", "relevance_claims", "directions_needed", "summary_markdown"]

# Fig. 2's ordering, as (a, b) pairs claimed a > b
PAIRS: tuple[tuple[str, str], ...] = (("filter_ib", "filter_random"), ("filter_ib", "filter_topk_norm"),
                                      ("filter_topk_norm", "filter_random"))


def pair_tests(ok: pd.DataFrame, labels: Mapping[str, str], pairs: Sequence[tuple[str, str]] = PAIRS,
               metric: str = "acc") -> pd.DataFrame:
    """`paired_test` of a − b per task for every pair, with ``comparison`` ("IB − Random"), ``a`` and ``b``."""
    tests = [paired_test(ok[ok["method"].isin([a, b])], method=a, baseline=b, metric=metric, by=("task",))
             .assign(comparison=f"{labels[a]} − {labels[b]}", a=a, b=b) for a, b in pairs]
    return pd.concat(tests, ignore_index=True)


def filter_claims(tests: pd.DataFrame, tasks: Sequence[str], labels: Mapping[str, str], keep_ratio: float,
                  notebook: str, tier: str, pairs: Sequence[tuple[str, str]] = PAIRS,
                  seeds_cap: int | None = None, pending: int = 0,
                  task_model: Mapping[str, str] | None = None) -> list[Claim]:
    """One direction-only claim per (task, pair) of Fig. 2 from ``pair_tests``; ``"skipped"`` when a pair
    has no paired runs. With ``seeds_cap``, a comparison still not significant at the cap is *undecidable
    at this scale* (`claims.claim_from_test`). ``task_model``: the model each task trained (the tier's
    ``Budget.task_model``; default the offline `TASK_MODEL`)."""
    task_model = TASK_MODEL if task_model is None else task_model
    claims = []
    for t in tasks:
        for a, b in pairs:
            row = tests[(tests["task"] == t) & (tests["a"] == a) & (tests["b"] == b)]
            what = "slightly beats" if a == "filter_topk_norm" else "beats"
            claims.append(claim_from_test(
                f"F2.{t}.{a.removeprefix('filter_')}>{b.removeprefix('filter_')}", notebook, tier,
                f"{labels[a]} {what} {labels[b]} at keep ratio {keep_ratio} on {t} ({task_model[t]})",
                row.iloc[0] if len(row) else None, DIRECTION_ONLY["paper_diff"], margin=DIRECTION_ONLY["margin"],
                seeds_cap=seeds_cap, paper_value="> 0 (Fig. 2; bar heights not given in the text)",
                note="" if len(row) else "not run", pending=pending))
    return claims


def relevance_claims(corr: pd.DataFrame, methods: Sequence[str], labels: Mapping[str, str], task: str, seed: int,
                     notebook: str, tier: str, pending: Collection[str] = ()) -> list[Claim]:
    """Sec. 3.2 / 4.3 ("magnitude is a poor proxy"): per probed model, the gate score ranks its active
    directions by task relevance (Δ validation loss when removed) better than their norm: ρ_gate − ρ_norm
    from `probes.correlation_table`, with its bootstrap CI over directions, judged as a claim of
    direction. ``"pending"`` for a model of ``pending`` (no record yet: records-only mode), ``"skipped"``
    for another model not probed, ``"inconclusive"`` when a score is constant."""
    claims = []
    for m in methods:
        c = corr[(corr["model"] == m) & (corr["directions"] == "active")]
        cid, text = f"F2.{task}.{m}.gate_ranks_relevance", (
            f"the gate score ranks the directions of a trained {labels[m]} model by their task relevance (Δ validation "
            f"loss when removed) better than their norm ‖b_j‖‖a_j‖ (Spearman ρ_gate − ρ_norm)")
        if c.empty or not np.isfinite(c["rho_gate-rho_norm"].iloc[0]):
            verdict, why = (("pending", "the probed model has no record yet (python -m structlora reproduce "
                             "--train-pending)") if m in pending else ("skipped", "model not probed in this tier")) \
                if c.empty else ("inconclusive", "a score is constant over the directions")
            claims.append(Claim(cid, notebook, text, "> 0 (Sec. 3.2, 4.3: magnitude is a poor proxy)", "n/a", None, None,
                                None, 0 if c.empty else int(c["n"].iloc[0]), tier, verdict, why))
            continue
        c = c.iloc[0]
        d, lo, hi, n = float(c["rho_gate-rho_norm"]), float(c["ci_low"]), float(c["ci_high"]), int(c["n"])
        verdict = decide(d, lo, hi, float(c["p_boot"]), **DIRECTION_ONLY)
        note = f"{n} active directions of one model ({task}, seed {seed}); bootstrap CI over directions"
        if verdict == "inconclusive":
            # the probe's sample is every active direction of the probed model: at this scale it cannot grow,
            # so an interval that includes 0 is undecidable here (the directions a difference of the observed
            # size would need, from the bootstrap half-width shrinking as 1/sqrt(n))
            verdict, need = "undecidable at this scale", directions_needed(d, lo, hi, n)
            note += (f"; the interval includes 0 and the probe has every active direction of the model; a difference "
                     f"of the observed size would need {need} directions")
        claims.append(Claim(
            cid, notebook, text, "> 0 (Sec. 3.2, 4.3: 'magnitude is a poor proxy'; not measured in the paper)",
            f"{format_diff(d, None, lo, hi, digits=2)}; ρ_gate {c['rho_gate_score']:.2f} (p={c['p_gate_score']:.2g}), "
            f"ρ_norm {c['rho_norm']:.2f} (p={c['p_norm']:.2g})", d, lo, hi, n, tier, verdict, note))
    return claims


def directions_needed(diff: float, ci_low: float, ci_high: float, n: int, max_factor: int = 100) -> str:
    """How many directions an interval like ``[ci_low, ci_high]`` over ``n`` would need to exclude 0 for a
    difference of ``diff``, assuming its half-width shrinks as 1/sqrt(n): ceil(n (half-width / |diff|)²),
    as text ("more than N" beyond ``max_factor`` times ``n``, or for a zero difference)."""
    half = 0.5 * (ci_high - ci_low)
    if diff == 0 or not np.isfinite(half):
        return f"more than {max_factor * n}"
    need = int(np.ceil(n * (half / abs(diff)) ** 2))
    return str(max(need, n + 1)) if need <= max_factor * n else f"more than {max_factor * n}"


def summary_markdown(claims: Sequence[Claim], tier: str) -> str:
    """The notebook's closing summary: Fig. 2's ordering and the gate-vs-norm probe, then one line per claim."""
    f2 = [c for c in claims if not c.claim_id.endswith("gate_ranks_relevance")]
    gr = [c for c in claims if c.claim_id.endswith("gate_ranks_relevance")]
    lines = [claim_line(c) for c in claims]
    return (f"**Summary ({tier} tier).** Fig. 2 ordering: {sum(c.verdict == 'reproduced' for c in f2)} of {len(f2)} "
            f"comparisons reproduced, {sum(c.verdict == 'not reproduced' for c in f2)} contradicted. "
            f"Gate vs norm as a relevance ranking: {sum(c.verdict == 'reproduced' for c in gr)} of {len(gr)} probed "
            f"models show the gate ranking better than the norm with a CI excluding 0; "
            f"{sum(c.ours_value is not None and c.ours_value <= 0 for c in gr)} show the norm ranking at least as well "
            f"as the gate (the paper's hypothesis does **not** hold there at our scale).\n\n" + "\n".join(lines))
