"""The pre-registered primary families of claims and their family-wise decision: which claims form the
"headline" (the tier's registered plan) and "mechanism" (`MECHANISM`) families, which claim ids repeat another
comparison (`SAME_COMPARISON`), and `decide_family`, which re-decides each family's claims from Bonferroni
family-wise intervals. `structlora.repro.claims` applies it when it builds the ledger.
"""
from __future__ import annotations

import pandas as pd

__all__ = ["MECHANISM", "SAME_COMPARISON", "primary_families", "decide_family"]

# The pre-registered primary families. "headline" is the tier's registered plan (params/<tier>/plan.yml,
# `plan.load_plan`: StructLoRA vs LoRA at low rank and low data, T1, T2); "mechanism" is protocol 2's
# family (the stages, the filters, the coordinator, the cost, the best other PEFT method). Each family is
# decided with Bonferroni family-wise intervals at alpha = 0.05 (`decide_family`); every other claim is
# exploratory (raw 95% intervals).
MECHANISM = (
    "T2.sst2.structlora_best_peft", "T1.fmnist-transfer.structlora_best_peft",
    "T5.sst2.full>no_gate", "T5.sst2.full>no_coord", "T6.sst2.full>graph_adjacency", "T9.sst2.learned>static",
    "F2.sst2.ib>random", "F2.sst2.ib>topk_norm", "F2.sst2.filter_ib.gate_ranks_relevance",
    "T7.minilm-l6.r8.step_time", "T7.minilm-l6.r8.memory",
)


def primary_families(tier: str) -> dict[str, tuple[str, ...]]:
    """``{"headline": the tier's plan's claims (none without a plan), "mechanism": MECHANISM}``."""
    from .plan import load_plan

    plan = load_plan(tier)
    return {"headline": tuple(c.claim for c in plan.primary) if plan is not None else (), "mechanism": MECHANISM}


# One claim per distinct comparison: these ids are the same runs compared the same way as another claim
# (StructLoRA - LoRA, sst2, r = 8, 100% data) and point to it instead of being counted again.
SAME_COMPARISON = {
    "T3.sst2.r8.structlora>lora": "T2.sst2.structlora>lora",
    "T4.sst2.f100.structlora>lora": "T2.sst2.structlora>lora",
    "T5.sst2.full>lora": "T2.sst2.structlora>lora",
    "T3.fmnist-transfer.r8.structlora>lora": "T1.fmnist-transfer.structlora>lora",
    "T4.fmnist-transfer.f100.structlora>lora": "T1.fmnist-transfer.structlora>lora",
}


def decide_family(df: pd.DataFrame, families: dict[str, tuple[str, ...]] | None = None,
                  alpha: float = 0.05, seeds_planned: dict[str, int] | None = None) -> pd.DataFrame:
    """Mark each claim with its primary family (``families``, default `primary_families` of the cpu
    tier) or "exploratory", point repeated comparisons to their claim (`SAME_COMPARISON`: verdict "see
    <id>", not counted), and re-decide each family's claims that carry a p-value from Bonferroni
    family-wise intervals (`plan.familywise_interval`, confidence 1 - alpha/m, m the family members with
    data): every branch of `stats.decide` then holds with family-wise error <= alpha. ``ci_fw_low`` /
    ``ci_fw_high`` hold those intervals, ``m`` the family size, ``p_holm`` Holm-adjusted p within the
    family (reported, not used). A claim the power analysis or the plan's budget declared undecidable at
    this scale counts in its family (conservative) but keeps its verdict. ``seeds_planned`` (claim ->
    seeds, default the cpu plan's) fills the column of that name."""
    from .plan import familywise_interval, load_plan
    from .stats import decide, holm

    if families is None:
        families = primary_families("cpu")
    if seeds_planned is None:
        plan = load_plan("cpu")
        seeds_planned = {c.claim: len(plan.seeds_of(c.claim)) for c in plan.primary} if plan is not None else {}
    df = df.copy()
    extra = ["family", "same_as", "p_holm", "m", "ci_fw_low", "ci_fw_high", "seeds_planned"]
    if not len(df):
        return df.assign(**{c: [] for c in extra})
    for col, default in (("p", None), ("paper_diff", None), ("arms_identical", False), ("seeds_required", None),
                         ("margin", None)):
        if col not in df:
            df[col] = default
    member = {c: name for name, ids in families.items() for c in ids}
    df["family"] = [member.get(c, "exploratory") for c in df["claim_id"]]
    own = df["same_as"].fillna("").astype(str) if "same_as" in df else pd.Series("", index=df.index)
    df["same_as"] = [SAME_COMPARISON.get(c, o) for c, o in zip(df["claim_id"], own)]
    df.loc[df["same_as"] != "", "verdict"] = "see " + df.loc[df["same_as"] != "", "same_as"]
    for col in ("p_holm", "m", "ci_fw_low", "ci_fw_high"):
        df[col] = float("nan")
    df["seeds_planned"] = [seeds_planned.get(c) for c in df["claim_id"]]
    for name in families:
        fam = df.index[(df["family"] == name) & df["p"].notna() & df["paper_diff"].notna()
                       & ~df["verdict"].isin(["skipped", "pending"]) & (df["same_as"] == "")
                       & ~df["arms_identical"].astype(bool)
                       & ~df["note"].astype(str).str.contains("single class")]
        m = len(fam)
        if not m:
            continue
        df.loc[fam, "p_holm"] = holm(df.loc[fam, "p"].astype(float).tolist())
        df.loc[fam, "m"] = m
        for i in fam:
            r = df.loc[i]
            lo, hi = familywise_interval(r["ours_value"], r["ci_low"], r["ci_high"], int(r["n"]), m, alpha)
            df.loc[i, ["ci_fw_low", "ci_fw_high"]] = lo, hi
            if r["verdict"] == "undecidable at this scale":   # the power analysis comes first (stats.decide)
                continue
            margin = None if r["margin"] is None or r["margin"] != r["margin"] else float(r["margin"])
            df.loc[i, "verdict"] = decide(r["ours_value"], lo, hi, min(1.0, float(r["p"]) * m), r["paper_diff"],
                                          arms_identical=bool(r["arms_identical"]), margin=margin)
    return df
