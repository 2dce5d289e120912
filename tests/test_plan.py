"""structlora.repro.plan: the registered plan file, its seeds rule and the family-wise intervals."""
from __future__ import annotations

import math

import pytest
from scipy import stats as st

from structlora.repro.plan import (Comparison, Plan, exploratory_block, familywise_interval, fund_exploratory, load_plan,
                                  pooled_sigma, seeds_from_pilot)
from structlora.repro.stats import paired_test, seeds_needed


def test_the_committed_cpu_plan_is_valid_and_names_the_headline_family():
    plan = load_plan("cpu")
    assert plan is not None and plan.m == 10 and plan.alpha == 0.05
    ids = {c.claim for c in plan.primary}
    for task in ("sst2", "fmnist-transfer"):
        for tag in ("r2", "r4"):
            assert f"T3.{task}.{tag}.structlora>lora" in ids
        for tag in ("f10", "f25"):
            assert f"T4.{task}.{tag}.structlora>lora" in ids
    assert {"T1.fmnist-transfer.structlora>lora", "T2.sst2.structlora>lora"} <= ids
    assert all(plan.seeds_of(c.claim)[: len(plan.pilot_seeds)] == plan.pilot_seeds for c in plan.primary)
    assert load_plan("smoke") is None


def _plan(**kw) -> Plan:
    primary = [Comparison("A", "t1", 2, 1.0, 2.0), Comparison("B", "t1", 8, 0.1, 3.0),
               Comparison("C", "t2", 2, 1.0, 2.0)]
    return Plan(**{"name": "x", "primary": primary, "pilot_seeds": [0, 1, 2], "budget_core_hours": 10.0, **kw})


def test_plan_validation_refuses_what_cannot_be_run():
    with pytest.raises(ValueError, match="distinct"):
        _plan(primary=[Comparison("A", "t", 2, 1.0, 1.0)] * 2)
    with pytest.raises(ValueError, match="outside"):
        _plan(seeds={"Z": 5})
    with pytest.raises(ValueError, match="pilot seeds"):
        _plan(seeds={"A": 2})
    with pytest.raises(ValueError, match="paper != 0"):
        Comparison("A", "t", 2, 1.0, 0.0)
    assert _plan(seeds={"A": 5}).seeds_of("A") == [0, 1, 2, 3, 4] and _plan().seeds_of("B") == [0, 1, 2]


def test_familywise_interval_is_the_bonferroni_t_interval():
    import pandas as pd

    rows = [{"task": "t", "model": "m", "rank": 8, "fraction": 1.0, "method": meth, "seed": s, "test_accuracy": v}
            for s, (a, b) in enumerate([(1.0, 0.2), (2.5, 0.1), (0.4, 0.3), (1.9, 0.6)])
            for meth, v in (("structlora", a), ("lora", b))]
    t95 = paired_test(pd.DataFrame(rows), "structlora").iloc[0]
    lo, hi = familywise_interval(t95.diff_mean, t95.ci_low, t95.ci_high, int(t95.n), m=1)
    assert lo == pytest.approx(t95.ci_low) and hi == pytest.approx(t95.ci_high)       # m = 1: unchanged
    lo, hi = familywise_interval(t95.diff_mean, t95.ci_low, t95.ci_high, int(t95.n), m=10)
    direct = paired_test(pd.DataFrame(rows), "structlora", confidence=1 - 0.05 / 10).iloc[0]
    assert lo == pytest.approx(direct.ci_low) and hi == pytest.approx(direct.ci_high)
    assert all(map(math.isnan, familywise_interval(1.0, float("nan"), 2.0, 3, 10)))


def test_pooled_sigma_weights_by_degrees_of_freedom():
    sigma, dof = pooled_sigma({"A": [1.0, 2.0, 3.0], "B": [0.0, 0.0, 3.0, 3.0], "C": [5.0]})
    assert dof == 2 + 3 and sigma == pytest.approx(math.sqrt((1.0 * 2 + 3.0 * 3) / 5))


def test_seeds_rule_funds_the_cheapest_claims_within_the_budget():
    plan = _plan()
    diffs = {"A": [1.0, 2.0, 3.0], "B": [2.0, 1.0, 3.5], "C": [0.1, 0.2, 0.0]}
    out = seeds_from_pilot(plan, diffs, {"t1": 0.5, "t2": 0.01}, spent_core_hours=0.0).set_index("claim")
    sigma_t1, _ = pooled_sigma({"A": diffs["A"], "B": diffs["B"]})
    assert out.loc["A", "needed"] == max(3, seeds_needed(sigma_t1, 2.0, 0.5, 1 - 0.05 / 3))
    assert out.loc["B", "needed"] < out.loc["A", "needed"]          # larger paper effect, fewer seeds
    assert out.loc["C", "funded"] and out.loc["C", "cost_h"] < 0.2
    assert out["cost_h"][out["funded"]].sum() <= plan.budget_core_hours
    assert out.loc["A", "cost_h"] == pytest.approx(2 * (out.loc["A", "needed"] - 3) * 0.5)
    unfunded = out[~out["funded"]]
    assert len(unfunded) and (unfunded["seeds"] == 3).all()        # the budget cannot buy them
    tight = seeds_from_pilot(plan, diffs, {"t1": 0.5, "t2": 0.01}, spent_core_hours=9.99).set_index("claim")
    assert not tight.loc[["A", "B"], "funded"].any() and (tight.loc[["A", "B"], "seeds"] == 3).all()


def test_budget_check_raises_the_steps_of_its_task_only_and_is_validated():
    plan = _plan(budget_check={"factor": 2, "result": {"t1": {"raise": True}, "t2": {"raise": False}}})
    assert plan.steps_factor("t1") == 2 and plan.steps_factor("t2") == 1 and _plan().steps_factor("t1") == 1
    base = {"max_steps": 350, "lr": 0.002, "batch_size": 32}
    assert plan.run("t1", base) == {**base, "max_steps": 700} and plan.run("t2", base) == base
    with pytest.raises(ValueError, match="factor"):
        _plan(budget_check={"factor": 0})
    with pytest.raises(ValueError, match="outside the plan"):
        _plan(budget_check={"factor": 2, "result": {"zz": {"raise": True}}})


def test_the_committed_plan_trains_both_tasks_at_twice_the_tiers_steps_in_notebooks_01_to_03():
    from structlora.repro.notebook import load_budget
    from structlora.repro.tierspecs import tier_specs

    plan, budget = load_plan("cpu"), load_budget("cpu")
    assert plan.steps_factor("sst2") == plan.steps_factor("fmnist-transfer") == 2   # the recorded outcomes
    specs = tier_specs("cpu")
    for stem in ("01_main_results", "02_rank_sweep", "03_few_shot"):
        for task, model in (("sst2", "minilm-l6"), ("fmnist-transfer", "vit-tiny-fmnist")):
            steps = {s.max_steps for s in specs[stem] if s.task == task}
            assert steps == {2 * budget[model]["max_steps"]}, (stem, task)
    for stem in ("04_ablations", "05_filter_strategies"):   # the mechanism family keeps the tier's budget
        assert {s.max_steps for s in specs[stem] if s.task == "sst2"} == {budget["minilm-l6"]["max_steps"]}


def test_exploratory_points_are_funded_cheapest_first_from_what_the_primary_family_left():
    plan = _plan()
    cost = {"r16": 1.0, "r32": 2.0, "f50": 4.0}
    out = fund_exploratory(plan, cost, spent_core_hours=7.5).set_index("claim")
    assert out.loc["r16", "funded"] and out.loc["r16", "seeds"] == 3
    assert not out.loc["r32", "funded"] and out.loc["r32", "seeds"] == 0   # 1.5 left after r16: too dear
    assert not out.loc["f50", "funded"]
    spent = fund_exploratory(plan, cost, spent_core_hours=10.4)
    assert not spent["funded"].any() and (spent["seeds"] == 0).all()      # the budget is spent: none run
    point = {"seeds": 0, "cost_core_hours": 1.2}
    decided = _plan(exploratory={"r16": point}, exploratory_spent=10.4)
    assert decided.exploratory_seeds("r16") == 0 and decided.exploratory_seeds("r32") is None
    assert "10 core-hours were spent (10.4)" in decided.unfunded_note("r16")
    assert "~1.2 core-hours" in decided.unfunded_note("r16")
    with pytest.raises(ValueError, match="exploratory"):
        _plan(exploratory={"A": point}, exploratory_spent=1.0)             # a primary claim
    with pytest.raises(ValueError, match="exploratory"):
        _plan(exploratory={"r16": point})                                  # no spend recorded
    with pytest.raises(ValueError, match="exploratory"):
        _plan(exploratory={"r16": {"seeds": -1, "cost_core_hours": 1.0}}, exploratory_spent=1.0)


def test_the_exploratory_block_written_into_a_plan_file_reads_back(tmp_path):
    import shutil

    src = load_plan("cpu").source
    (tmp_path / "params" / "cpu").mkdir(parents=True)
    dst = tmp_path / "params" / "cpu" / "plan.yml"
    shutil.copy(src, dst)
    text = dst.read_text()
    if "\nexploratory:" in text:                          # the committed plan has decided already
        text = text[: text.index("\nexploratory:") + 1]
    table = fund_exploratory(load_plan("cpu"), {"T3.sst2.r16.structlora>lora": 1.9,
                                                "T3.fmnist-transfer.r16.structlora>lora": 0.58}, 19.0)
    dst.write_text(text + exploratory_block(table, 19.0))
    plan = load_plan("cpu", root=tmp_path)
    assert plan.exploratory_spent == 19.0 and plan.seeds == load_plan("cpu").seeds
    assert plan.exploratory_seeds("T3.fmnist-transfer.r16.structlora>lora") == 3     # 0.58 of the 1.0 left
    assert plan.exploratory_seeds("T3.sst2.r16.structlora>lora") == 0
    assert "~1.9 core-hours" in plan.unfunded_note("T3.sst2.r16.structlora>lora")
