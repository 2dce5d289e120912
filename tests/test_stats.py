"""structlora.repro.stats: summaries, paired tests (vs scipy and by hand), every verdict branch, paper tables."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as st

from structlora.repro.stats import compare_to_paper, paired_test, summarize, verdict


def _frame(values: dict[str, list[float]], task: str = "sst2", seeds=None) -> pd.DataFrame:
    rows = []
    for method, vals in values.items():
        for seed, v in zip(seeds or range(len(vals)), vals):
            rows.append({"task": task, "model": "m", "method": method, "rank": 8, "fraction": 1.0,
                         "seed": seed, "status": "ok", "test_accuracy": v})
    return pd.DataFrame(rows)


LORA = [0.80, 0.82, 0.81, 0.79]
OURS = [0.83, 0.84, 0.82, 0.83]


def test_summarize_mean_std_n():
    df = pd.concat([_frame({"lora": LORA, "ours": OURS}),
                    pd.DataFrame([{"task": "sst2", "model": "m", "method": "ours", "rank": 8, "fraction": 1.0,
                                   "seed": 9, "status": "skipped", "test_accuracy": np.nan}])])
    out = summarize(df, scale=100).set_index("method")
    assert out.loc["lora", "n"] == 4 and out.loc["ours", "n"] == 4         # the skipped run does not count
    assert out.loc["lora", "mean"] == pytest.approx(100 * np.mean(LORA))
    assert out.loc["lora", "std"] == pytest.approx(100 * np.std(LORA, ddof=1))
    assert out.loc["lora", "mean ± std"] == f"{100 * np.mean(LORA):.2f} ± {100 * np.std(LORA, ddof=1):.2f}"
    one = summarize(_frame({"lora": [0.5]})).iloc[0]
    assert one["n"] == 1 and math.isnan(one["std"]) and one["mean ± std"] == "0.50"
    with pytest.raises(KeyError, match="test_f1"):
        summarize(df, metric="test_f1")


def test_paired_test_matches_scipy_and_hand_ci():
    row = paired_test(_frame({"lora": LORA, "ours": OURS}), "ours").iloc[0]
    ref = st.ttest_rel(OURS, LORA)
    assert row["n"] == 4
    assert row["t"] == pytest.approx(ref.statistic) and row["p"] == pytest.approx(ref.pvalue)
    # by hand: d = (0.03, 0.02, 0.01, 0.04), mean 0.025, sd = sqrt(0.0005/3), t_{0.975,3} = 3.182446
    d = np.array([0.03, 0.02, 0.01, 0.04])
    half = 3.182446305284263 * math.sqrt(np.sum((d - 0.025) ** 2) / 3) / 2.0
    assert row["diff_mean"] == pytest.approx(0.025)
    assert row["diff_std"] == pytest.approx(math.sqrt(0.0005 / 3))
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((0.025 - half, 0.025 + half))
    assert row["method_mean"] == pytest.approx(np.mean(OURS)) and row["baseline_mean"] == pytest.approx(np.mean(LORA))


def test_paired_test_pairs_on_seed_and_warns_on_unmatched():
    df = pd.concat([_frame({"lora": [0.7, 0.8, 0.9]}, seeds=[0, 1, 2]),
                    _frame({"ours": [0.85, 0.97, 0.5]}, seeds=[1, 2, 3])])
    with pytest.warns(UserWarning, match=r"seeds \[0, 3\]"):
        row = paired_test(df, "ours").iloc[0]
    assert row["n"] == 2 and row["diff_mean"] == pytest.approx(0.06)
    assert row["p"] == pytest.approx(st.ttest_rel([0.85, 0.97], [0.8, 0.9]).pvalue)
    dup = pd.concat([_frame({"lora": LORA, "ours": OURS}), _frame({"ours": [0.1]})])
    with pytest.raises(ValueError, match="several runs with seed"):
        paired_test(dup, "ours")


def test_paired_test_groups_and_degenerate_cases():
    df = pd.concat([_frame({"lora": LORA, "ours": OURS}, task="a"), _frame({"lora": [0.5], "ours": [0.6]}, task="b"),
                    _frame({"lora": [0.5, 0.6], "ours": [0.5, 0.6]}, task="c")])
    out = paired_test(df, "ours").set_index("task")
    assert list(out.index) == ["a", "b", "c"]
    assert out.loc["b", "n"] == 1 and math.isnan(out.loc["b", "p"]) and math.isnan(out.loc["b", "ci_low"])
    assert out.loc["c", "p"] == 1.0 and out.loc["c", "t"] == 0.0 and out.loc["c", "diff_mean"] == 0.0


@pytest.mark.parametrize("args, expected", [
    # significant, paper's direction
    ((0.8, 0.3, 1.3, 0.01, 1.5), "reproduced"),
    ((-0.8, -1.3, -0.3, 0.01, -1.5), "reproduced"),              # paper claims a decrease
    # significant, opposite direction
    ((-0.8, -1.3, -0.3, 0.01, 1.5), "not reproduced"),
    # not significant, and every effect >= margin (0.75) in the paper's direction is excluded
    ((0.1, -0.4, 0.6, 0.6, 1.5), "not reproduced"),
    ((-0.1, -0.6, 0.4, 0.6, -1.5), "not reproduced"),
    # not significant, the interval still admits the paper's effect: too noisy to tell
    ((0.5, -1.0, 2.0, 0.4, 1.5), "inconclusive"),
    # excludes 1.5 but still admits 1.0 >= margin: inconclusive by default, not reproduced with margin=1.4
    ((0.2, -0.7, 1.2, 0.5, 1.5), "inconclusive"),
    # n < 2: NaN statistics
    ((0.5, math.nan, math.nan, math.nan, 1.5), "inconclusive"),
    ((0.5, 0.1, 0.9, 0.01, None), "inconclusive"),
])
def test_verdict_branches(args, expected):
    assert verdict(*args) == expected


def test_verdict_margin_and_parity():
    assert verdict(0.2, -0.7, 1.2, 0.5, 1.5, margin=1.4) == "not reproduced"
    assert verdict(0.05, -0.2, 0.3, 0.6, 0.0, margin=0.5) == "reproduced"
    assert verdict(0.05, -0.2, 0.7, 0.6, 0.0, margin=0.5) == "inconclusive"
    assert verdict(0.6, 0.1, 1.1, 0.02, 0.0, margin=0.5) == "not reproduced"
    with pytest.raises(ValueError, match="margin"):
        verdict(0.0, -0.1, 0.1, 0.9, 0.0)
    assert verdict(0.8, 0.3, 1.3, 0.04, 1.5, alpha=0.01) == "inconclusive"  # alpha is honoured
    assert "reproduced" in (verdict.__doc__ or "") and "inconclusive" in (verdict.__doc__ or "")


def test_compare_to_paper_tables():
    df = pd.concat([_frame({"lora": LORA, "ours": OURS}, task="a"), _frame({"lora": LORA, "ours": LORA}, task="b")])
    summary = summarize(df, by=("task", "method"))
    table = compare_to_paper(summary, {"a": {"lora": 80.0, "ours": 83.0}, ("b", "ours"): 84.0}, scale=100)
    row = table.set_index(["task", "method"]).loc[("a", "ours")]
    assert row["ours"] == pytest.approx(83.0) and row["paper"] == 83.0 and row["delta"] == pytest.approx(0.0)
    assert math.isnan(table.set_index(["task", "method"]).loc[("b", "lora"), "paper"])
    paired = paired_test(df, "ours", by=("task",))
    vt = compare_to_paper(paired, {"a": 1.5, "b": 1.5}, on=("task",), scale=100).set_index("task")
    assert vt.loc["a", "verdict"] == "reproduced"           # +2.5 points, CI excludes 0
    assert vt.loc["b", "verdict"] == "not reproduced"        # identical runs: CI [0, 0] excludes +0.75
    assert vt.loc["a", "ours (display)"].startswith("+2.50 [")


def test_single_class_runs_reads_the_constant_predictor_signature():
    """A collapsed run is found from (accuracy, macro-F1) alone; real predictions with the same accuracy
    are not flagged. Checked against sklearn on actual predictions."""
    from sklearn.metrics import accuracy_score, f1_score

    from structlora.repro.stats import single_class_runs

    y = np.array([0] * 52 + [1] * 48 + [2] * 0)
    rng = np.random.default_rng(0)
    preds = {"constant": np.zeros_like(y), "noisy": np.where(rng.random(100) < 0.5, y, 1 - y)}
    rows = [{"task": "t2", "test_accuracy": accuracy_score(y, p), "test_macro_f1": f1_score(y, p, average="macro")}
            for p in preds.values()]
    y3 = np.array([0] * 40 + [1] * 30 + [2] * 30)
    rows.append({"task": "t3", "test_accuracy": 0.4,
                 "test_macro_f1": f1_score(y3, np.zeros_like(y3), average="macro", zero_division=0)})
    rows.append({"task": "t3", "test_accuracy": float("nan"), "test_macro_f1": float("nan")})
    df = pd.DataFrame(rows)
    assert single_class_runs(df, {"t2": 2, "t3": 3}).tolist() == [True, False, True, False]
    assert single_class_runs(df.iloc[:2], 2).tolist() == [True, False]
    with pytest.raises(KeyError, match="t3"):
        single_class_runs(df, {"t2": 2})


def test_single_class_table_counts_collapsed_runs_per_group():
    from structlora.repro.stats import single_class_table

    df = pd.DataFrame({"task": ["a", "a", "a", "b", "b"], "method": ["x", "x", "y", "x", "x"],
                       "single_class": [True, False, False, True, True]})
    table = single_class_table(df, ["task", "method"])
    assert list(table.columns) == ["single-class runs", "runs"]
    assert table.to_dict("index") == {("a", "x"): {"single-class runs": 1, "runs": 2},
                                      ("b", "x"): {"single-class runs": 2, "runs": 2}}
    assert single_class_table(df[df["task"] == "a"].assign(single_class=False), ["method"]).empty
    with pytest.raises(KeyError, match="fraction"):
        single_class_table(df, ["fraction"])


def test_degenerate_claim_is_inconclusive_whatever_the_numbers():
    from structlora.repro.claims import claim_from_test

    test = {"diff_mean": 0.0, "ci_low": 0.0, "ci_high": 0.0, "p": 1.0, "n": 3, "diff_std": 0.0}
    plain = claim_from_test("c", "nb", "cpu", "x beats y", test, 2.0)
    assert plain.verdict == "not reproduced"   # zero difference on every seed: the rule's reading
    deg = claim_from_test("c", "nb", "cpu", "x beats y", test, 2.0, note="n=3",
                          degenerate="every run of both methods predicts one class")
    assert deg.verdict == "inconclusive" and deg.note == "every run of both methods predicts one class; n=3"


# ------------------------------------------------------------------------------ power, decisions, Holm
def test_seeds_needed_meets_the_half_width_and_is_minimal():
    import math

    from scipy import stats as st

    from structlora.repro.stats import seeds_needed

    for sigma, effect in [(1.4, 1.5), (3.4, 3.6), (0.5, 2.0), (12.0, 0.9)]:
        n = seeds_needed(sigma, effect, max_n=100000)
        half = lambda k: st.t.ppf(0.975, k - 1) * sigma / math.sqrt(k)  # noqa: E731
        assert half(n) <= effect / 2 and (n == 2 or half(n - 1) > effect / 2)
    assert seeds_needed(1.4, 1.5) == 16            # sst2's pilot spread against the paper's +1.5
    assert seeds_needed(0.0, 1.0) == 2 and seeds_needed(1.0, 0.0, max_n=50) == 51
    with pytest.raises(ValueError):
        seeds_needed(float("nan"), 1.0)


def test_holm_matches_the_step_down_definition():
    from structlora.repro.stats import holm

    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    out = holm([0.2, float("nan"), 0.01])
    assert out[0] == pytest.approx(0.2) and out[2] == pytest.approx(0.02) and out[1] != out[1]


@pytest.mark.parametrize("args, expected", [
    ((2.0, 1.0, 3.0, 0.01, 1.5), "reproduced"),
    ((0.4, 0.2, 0.6, 0.01, 1.5), "smaller than claimed"),
    ((-1.0, -1.8, -0.2, 0.02, 1.5), "not reproduced"),
    ((0.1, -0.3, 0.5, 0.5, 1.5), "not reproduced"),        # excludes half the effect, not significant
    ((0.5, -1.0, 2.0, 0.4, 1.5), "inconclusive"),
    ((-2.0, -3.0, -1.0, 0.01, -1.5), "reproduced"),        # a claimed decrease
])
def test_decide_outcomes(args, expected):
    from structlora.repro.stats import decide

    assert decide(*args) == expected


def test_decide_checks_the_arms_and_the_power_first():
    from structlora.repro.stats import decide, identical_arms

    assert decide(0.0, 0.0, 0.0, 1.0, 0.8, arms_identical=True) == "untestable (arms identical)"
    assert decide(2.0, 1.0, 3.0, 0.01, 1.5, seeds_required=40, seeds_cap=10) == "undecidable at this scale"
    assert identical_arms(["a", "b"], ["a", "b"]) and not identical_arms(["a", "b"], ["a", "c"])
    assert not identical_arms([], []) and not identical_arms(["a"], None)


def test_ledger_decides_each_primary_family_with_familywise_intervals_and_counts_a_comparison_once(tmp_path):
    from scipy import stats as st

    from structlora.repro.claims import build_ledger, claim_from_test, write_claims

    sig = {"diff_mean": 2.0, "ci_low": 1.0, "ci_high": 3.0, "p": 0.02, "n": 8}   # raw p significant
    claims = [
        # headline family (params/cpu/plan.yml): T2, the r = 2 claim (underpowered), two near-null claims
        claim_from_test("T2.sst2.structlora>lora", "01_x", "cpu", "beats LoRA", {**sig, "p": 0.002}, 1.5),
        claim_from_test("T3.sst2.r2.structlora>lora", "01_x", "cpu", "underpowered", sig, 2.3, seeds_required=40,
                        seeds_cap=10),
        claim_from_test("T3.sst2.r4.structlora>lora", "01_x", "cpu", "clearly null", {**sig, "diff_mean": 0.1,
                        "ci_low": -0.2, "ci_high": 0.4, "p": 0.5}, 2.3),
        claim_from_test("T4.sst2.f10.structlora>lora", "01_x", "cpu", "null at 95% only", {**sig, "diff_mean": 0.1,
                        "ci_low": -0.5, "ci_high": 0.7, "p": 0.7}, 1.6),
        # mechanism family
        claim_from_test("T5.sst2.full>no_coord", "01_x", "cpu", "coordinator helps", sig, 1.2),
        claim_from_test("T5.sst2.full>no_gate", "01_x", "cpu", "gate helps", sig, 1.9),
        claim_from_test("T5.sst2.full>lora", "01_x", "cpu", "same comparison as T2", sig, 2.2),
        claim_from_test("T6.sst2.full>graph_adjacency", "01_x", "cpu", "graph", {**sig, "diff_mean": 0.0,
                        "ci_low": 0.0, "ci_high": 0.0, "p": 1.0}, 0.8, arms_identical=True),
        claim_from_test("F2.sst2.ib>random", "01_x", "cpu", "primary, underpowered", {**sig, "p": 0.001}, 1.0,
                        seeds_required=40, seeds_cap=10),
        claim_from_test("T9.sst2.learned>static", "01_x", "cpu", "direction only", {**sig, "diff_mean": -0.2,
                        "ci_low": -0.8, "ci_high": 0.4, "p": 0.5}, 1.0, margin=0.0),
        claim_from_test("T2.sst2.structlora_best_peft", "01_x", "cpu", "best PEFT on validation is LoRA",
                        {**sig, "p": 0.0001}, 0.4, same_as="T2.sst2.structlora>lora"),
        claim_from_test("T3.sst2.r16.structlora>lora", "01_x", "cpu", "exploratory", sig, 1.4),
    ]
    assert claims[0].verdict == "reproduced" and claims[3].verdict == "not reproduced"   # raw 95% intervals
    write_claims("01_x", "cpu", claims, root=tmp_path)
    df = build_ledger(tmp_path, tier="cpu").set_index("claim_id")
    widen = lambda m: st.t.ppf(1 - 0.05 / (2 * m), 7) / st.t.ppf(0.975, 7)  # noqa: E731
    # headline: m = 4 (the underpowered claim counts, keeps its verdict); T2's family-wise interval
    # [2 -+ 1 x widen(4)] excludes 0 and p x 4 < 0.05 (p = 0.002 is what that interval implies) -> reproduced
    assert (df.loc["T2.sst2.structlora>lora", ["family", "m"]] == ["headline", 4]).all()
    assert df.loc["T2.sst2.structlora>lora", "ci_fw_low"] == pytest.approx(2 - widen(4))
    assert df.loc["T2.sst2.structlora>lora", "verdict"] == "reproduced"
    assert df.loc["T3.sst2.r2.structlora>lora", "verdict"] == "undecidable at this scale"
    # the "not reproduced" branch is family-wise too: a clearly null claim stays not reproduced, one whose
    # raw 95% interval just excludes half the effect becomes inconclusive once widened
    assert df.loc["T3.sst2.r4.structlora>lora", "verdict"] == "not reproduced"
    assert df.loc["T4.sst2.f10.structlora>lora", "ci_fw_high"] > 0.8
    assert df.loc["T4.sst2.f10.structlora>lora", "verdict"] == "inconclusive"
    # mechanism: m = 4 (T5 x 2, F2, T9); p x 4 = 0.08 is not significant, the intervals admit the half
    # effect -> inconclusive; identical arms and the repeats are not counted
    assert (df.loc["T5.sst2.full>no_coord", ["family", "m"]] == ["mechanism", 4]).all()
    assert df.loc["T5.sst2.full>no_coord", "verdict"] == "inconclusive"
    assert df.loc["T5.sst2.full>no_coord", "p_holm"] == pytest.approx(0.06)
    assert df.loc["F2.sst2.ib>random", "verdict"] == "undecidable at this scale"
    assert df.loc["T5.sst2.full>lora", "verdict"] == "see T2.sst2.structlora>lora"
    assert df.loc["T2.sst2.structlora_best_peft", "verdict"] == "see T2.sst2.structlora>lora"
    assert df.loc["T2.sst2.structlora_best_peft", "m"] != df.loc["T2.sst2.structlora_best_peft", "m"]
    assert df.loc["T6.sst2.full>graph_adjacency", "verdict"] == "untestable (arms identical)"
    # a claim of direction keeps its margin of 0: an interval that still admits > 0 decides nothing
    assert df.loc["T9.sst2.learned>static", "verdict"] == "inconclusive"
    assert df.loc["T3.sst2.r16.structlora>lora", "family"] == "exploratory"
    assert df.loc["T3.sst2.r16.structlora>lora", "verdict"] == "reproduced"              # raw interval
    # the first tables: one per family, with the plan's seeds, the seeds run and the family-wise interval
    md = (tmp_path / "CLAIMS.md").read_text()
    head = md.split("## Primary family: headline", 1)[1].split("## Primary family: mechanism", 1)[0]
    assert "m = 4" in head and "| T2.sst2.structlora>lora |" in head and "T5.sst2" not in head
    assert f"[{2 - widen(4):.1f}, {2 + widen(4):.1f}] | 3 | 8 |" in head                  # planned 3 (pilot), run 8
    mech = md.split("## Primary family: mechanism", 1)[1].split("## Verdict rule", 1)[0]
    assert "| F2.sst2.ib>random |" in mech and "| 40 |" in mech and "T3.sst2.r16" not in mech


def test_paired_test_runs_the_manipulation_check_on_prediction_fingerprints():
    from structlora.repro.claims import claim_from_test
    from structlora.repro.stats import paired_test

    rows = [{"task": "t", "method": m, "seed": s, "test_accuracy": 0.8, "test_predictions_sha256": f"h{s}"}
            for m in ("structlora", "lora") for s in (0, 1, 2)]
    df = pd.DataFrame(rows)
    tt = paired_test(df, "structlora", "lora", by=("task",))
    assert bool(tt.iloc[0]["arms_identical"])
    c = claim_from_test("T6.x", "nb", "cpu", "hybrid beats adjacency", tt.iloc[0], 0.8)
    assert c.verdict == "untestable (arms identical)" and c.arms_identical
    df.loc[(df["method"] == "lora") & (df["seed"] == 1), "test_predictions_sha256"] = "other"
    assert not bool(paired_test(df, "structlora", "lora", by=("task",)).iloc[0]["arms_identical"])


def test_claim_from_test_declares_undecidable_claims_with_the_seeds_they_need():
    from structlora.repro.claims import claim_from_test

    noisy = {"diff_mean": 1.0, "ci_low": -20.0, "ci_high": 22.0, "p": 0.8, "n": 3, "diff_std": 9.0}
    c = claim_from_test("T3.x", "nb", "cpu", "gain at low rank", noisy, 0.9, seeds_cap=10)
    assert c.verdict == "undecidable at this scale" and c.seeds_required > 10 and "paired seeds" in c.note


def _paired_rows(diffs):
    """A paired_test row of StructLoRA − static over len(diffs) seeds with the given differences."""
    rows = [{"task": "t", "method": "a", "seed": s, "test_accuracy": (80.0 + d) / 100}
            for s, d in enumerate(diffs)]
    rows += [{"task": "t", "method": "b", "seed": s, "test_accuracy": 0.80} for s in range(len(diffs))]
    return paired_test(pd.DataFrame(rows), "a", "b", by=("task",)).iloc[0]


def test_direction_only_claims_are_undecidable_only_once_they_reach_the_cap():
    from structlora.repro.claims import claim_from_test
    from structlora.repro.stats import seeds_needed

    noisy = [0.6, -0.5, 0.1, -0.3, 0.4, -0.2, 0.5, -0.6, 0.2, -0.1]          # mean +0.01, sd ~0.43
    at_cap = _paired_rows(noisy)
    c = claim_from_test("T9.x", "nb", "cpu", "learned > static", at_cap, 1.0, margin=0.0, seeds_cap=10)
    assert c.verdict == "undecidable at this scale"
    assert c.seeds_required == seeds_needed(at_cap["diff_std"], at_cap["diff_mean"], fraction=1.0, max_n=100)
    assert c.seeds_required > 10 and "direction only" in c.note and "exclude 0" in c.note
    below = claim_from_test("T9.x", "nb", "cpu", "learned > static", _paired_rows(noisy[:6]), 1.0, margin=0.0,
                            seeds_cap=10)
    assert below.verdict == "inconclusive" and below.seeds_required is None   # not at the cap yet: more seeds
    clear = [0.9, 1.1, 1.0, 1.2, 0.8, 1.0, 0.9, 1.1, 1.0, 1.0]
    won = claim_from_test("T9.x", "nb", "cpu", "learned > static", _paired_rows(clear), 1.0, margin=0.0, seeds_cap=10)
    assert won.verdict == "reproduced" and won.seeds_required <= 10             # significant at the cap: decided
    lost = claim_from_test("T9.x", "nb", "cpu", "learned > static", _paired_rows([-x for x in clear]), 1.0,
                           margin=0.0, seeds_cap=10)
    assert lost.verdict == "not reproduced"


def test_ledger_shows_seeds_beyond_the_search_as_more_than(tmp_path):
    from structlora.repro.claims import build_ledger, claim_from_test, write_claims

    flat = _paired_rows([0.3, -0.3, 0.2, -0.2, 0.1, -0.1, 0.4, -0.4, 0.5, -0.5])   # mean exactly 0
    c = claim_from_test("F2.sst2.ib>topk_norm", "05_x", "cpu", "IB beats top-k", flat, 1.0, margin=0.0, seeds_cap=10)
    assert c.seeds_required == 101 and "needs more than 100 paired seeds" in c.note
    write_claims("05_x", "cpu", [c], root=tmp_path)
    build_ledger(tmp_path, tier="cpu")
    assert "| 10 | > 100 |" in (tmp_path / "CLAIMS.md").read_text()
