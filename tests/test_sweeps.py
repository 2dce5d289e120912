"""structlora.repro.sweeps (notebooks 02/03) and plots.gain_panels, on synthetic records."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from structlora.repro import plots
from structlora.repro.notebook import load_budget
from structlora.repro.plan import Comparison, Plan
from structlora.repro.sweeps import FRACTION, RANK, contrast_test, gain_frame, paper_frame, point_tests, sweep_claims, sweep_specs


def _plan(**kw) -> Plan:
    primary = [Comparison("T3.sst2.r2.structlora>lora", "sst2", 2, 1.0, 2.3),
               Comparison("T2.sst2.structlora>lora", "sst2", 8, 1.0, 1.5)]
    return Plan(**{"name": "t", "primary": primary, "pilot_seeds": [0, 1, 2], "budget_core_hours": 1.0, **kw})


def _runs(gain: dict[float, list[float]], axis: str = "rank", task: str = "sst2") -> pd.DataFrame:
    """LoRA at 80 and StructLoRA at 80 + gain, per (value, seed)."""
    rows = []
    for v, per_seed in gain.items():
        for s, g in enumerate(per_seed):
            for m, acc in (("lora", 80.0), ("structlora", 80.0 + g)):
                rows.append({"task": task, "model": "minilm-l6", axis: v, "method": m, "seed": s, "acc": acc,
                             "test_accuracy": acc / 100, "status": "ok", "single_class": False,
                             **({"fraction": 1.0} if axis == "rank" else {"rank": 8})})
    return pd.DataFrame(rows)


def test_primary_points_run_the_plans_seeds_and_the_others_the_notebooks():
    plan = _plan(seeds={"T3.sst2.r2.structlora>lora": 5, "T2.sst2.structlora>lora": 4})
    specs = sweep_specs(RANK, ["sst2"], [2, 8, 16], load_budget("cpu"), [0, 1, 2], plan)
    seeds = {(s.rank, s.method): sorted(x.seed for x in specs if (x.rank, x.method) == (s.rank, s.method)) for s in specs}
    assert seeds[(2, "lora")] == seeds[(2, "structlora")] == [0, 1, 2, 3, 4]
    assert seeds[(8, "structlora")] == [0, 1, 2, 3]              # r = 8, all data: T2's seeds
    assert seeds[(16, "lora")] == [0, 1, 2]                      # exploratory
    assert {s.fraction for s in specs} == {1.0} and {s.lr for s in specs if s.method == "lora"} == {0.002}
    assert {s.max_steps for s in specs} == {load_budget("cpu")["minilm-l6"]["max_steps"]}   # no budget raise
    raised = _plan(budget_check={"factor": 2, "result": {"sst2": {"raise": True}}})
    assert {s.max_steps for s in sweep_specs(RANK, ["sst2"], [2], load_budget("cpu"), [0], raised)} == {700}
    few = sweep_specs(FRACTION, ["sst2"], [0.1, 1.0], load_budget("cpu"), [0, 1], None)
    assert {s.rank for s in few} == {8} and len(few) == 2 * 2 * 2


def test_contrast_is_paired_over_the_seeds_that_ran_every_point():
    ok = _runs({2: [2.0, 3.0, 1.0], 4: [1.0, 1.0, 1.0], 16: [0.0, 1.0, 0.5], 32: [0.5, 0.0, 0.0]})
    ok = ok[~((ok["rank"] == 32) & (ok["seed"] == 2))]           # seed 2 lacks r = 32: left out
    got = contrast_test(ok, RANK, "sst2", [2, 4], [16, 32])
    low = np.array([1.5, 2.0]); high = np.array([0.25, 0.5])
    assert got["n"] == 2 and got["diff_mean"] == pytest.approx((low - high).mean())
    assert contrast_test(ok, RANK, "sst2", [2], [64]) is None


def test_sweep_claims_point_repeats_to_their_claim_and_take_the_plans_power():
    plan = _plan(seeds={"T3.sst2.r2.structlora>lora": 3}, needed={"T3.sst2.r2.structlora>lora": 12})
    ok = _runs({2: [0.1, -0.2, 0.3], 8: [0.5, 0.1, 0.2], 16: [0.0, 0.2, -0.1]})
    claims = {c.claim_id: c for c in sweep_claims(ok, RANK, ["sst2"], [2, 8, 16], "02_x", "cpu", plan, 10)}
    assert claims["T3.sst2.r2.structlora>lora"].verdict == "undecidable at this scale"   # needs 12, bought 3
    assert claims["T3.sst2.r2.structlora>lora"].seeds_required == 12
    assert claims["T3.sst2.r8.structlora>lora"].same_as == "T2.sst2.structlora>lora"
    assert claims["T3.sst2.r16.structlora>lora"].same_as == "" and claims["T3.sst2.r16.structlora>lora"].n == 3
    assert claims["T3.sst2.gain_largest_low_rank"].paper_value.startswith("+")


def test_gain_panels_label_every_x_position_ours_and_the_papers():
    ok = _runs({8: [0.5, 0.1, 0.2], 16: [0.0, 0.2, -0.1]})
    gains = gain_frame(point_tests(ok, RANK), RANK, ["sst2"], _plan())
    assert gains.set_index("rank").loc[8, "fw_high"] > gains.set_index("rank").loc[8, "ci_high"]  # T2: primary
    assert np.isnan(gains.set_index("rank").loc[16, "fw_low"])
    fig = plots.gain_panels(gains, "rank", paper_frame(RANK, ["sst2"]), xlabel="r", labels={"sst2": "boolq"})
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["2", "4", "8", "16", "32"]
    assert ax.get_title() == "sst2"


def test_sweep_claims_say_pending_when_the_notebook_has_runs_without_records():
    ok = _runs({2: [0.1, -0.2, 0.3]})
    got = {c.claim_id: c for c in sweep_claims(ok, RANK, ["sst2"], [2, 4], "02", "cpu", None, 10, pending=6)}
    assert got["T3.sst2.r4.structlora>lora"].verdict == "pending"           # nothing ran, runs pending
    assert all(c.note.startswith("partial: 6 run(s)") for c in got.values())
    none = {c.claim_id: c for c in sweep_claims(ok, RANK, ["sst2"], [2, 4], "02", "cpu", None, 10)}
    assert none["T3.sst2.r4.structlora>lora"].verdict == "skipped"


def test_an_exploratory_point_the_budget_did_not_fund_is_not_run_and_is_undecidable_with_its_cost():
    explo = {"T3.sst2.r16.structlora>lora": {"seeds": 0, "cost_core_hours": 1.6},
             "T3.sst2.r32.structlora>lora": {"seeds": 3, "cost_core_hours": 1.7}}
    plan = _plan(exploratory=explo, exploratory_spent=20.4)
    specs = sweep_specs(RANK, ["sst2"], [2, 8, 16, 32], load_budget("cpu"), [0, 1, 2, 3], plan)
    assert not [s for s in specs if s.rank == 16]                          # unfunded: no run, not pending
    assert sorted({s.seed for s in specs if s.rank == 32}) == [0, 1, 2]   # funded: the plan's 3 seeds
    undecided = sweep_specs(RANK, ["sst2"], [16], load_budget("cpu"), [0, 1, 2, 3], _plan())
    assert sorted({s.seed for s in undecided}) == [0, 1, 2, 3]            # no decision yet: the notebook's
    ok = _runs({2: [0.1, -0.2, 0.3], 8: [0.5, 0.1, 0.2], 32: [0.0, 0.2, -0.1]})
    got = {c.claim_id: c for c in sweep_claims(ok, RANK, ["sst2"], [2, 4, 8, 16, 32], "02", "cpu", plan, 10, pending=2)}
    r16 = got["T3.sst2.r16.structlora>lora"]
    assert r16.verdict == "undecidable at this scale" and r16.n == 0
    assert "plan's 1 core-hours were spent (20.4)" in r16.note and "~1.6 core-hours" in r16.note
    assert got["T3.sst2.r4.structlora>lora"].verdict == "pending"          # a primary point without runs
    assert got["T3.sst2.r32.structlora>lora"].n == 3                       # funded and run: tested
    contrast = got["T3.sst2.gain_largest_low_rank"]
    assert contrast.verdict == "undecidable at this scale" and "r16" in contrast.note
