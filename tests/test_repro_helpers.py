"""Unit tests of the helpers the reproduction notebooks call (tiny synthetic inputs; no training)."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from structlora import StructLoraConfig, get_structlora_model
from structlora.repro import probes
from toy import randomize_lora, tiny_bert, toy_batch


# ----------------------------------------------------------------------------------------- probes (05)
def _probe_model(**kw):
    cfg = StructLoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS",
                           gate="concrete", graph=None, **kw)
    sm = get_structlora_model(tiny_bert(layers=2), cfg)
    randomize_lora(sm)
    return sm


def test_probe_layers_even_spacing():
    assert probes.probe_layers(6, None) == list(range(6))
    assert probes.probe_layers(6, 10) == list(range(6))
    assert probes.probe_layers(6, 2) == [0, 5]
    assert probes.probe_layers(5, 3) == [0, 2, 4]


def test_val_loss_matches_cross_entropy():
    sm = _probe_model()
    batches = [toy_batch(8, seed=0), toy_batch(4, seed=1)]
    loss, acc = probes.val_loss(sm, batches)
    with torch.no_grad():
        logits = torch.cat([sm(input_ids=b["input_ids"]).logits for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    assert loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-5)
    assert acc == pytest.approx(float((logits.argmax(-1) == labels).float().mean()))


def test_removal_table_one_row_per_direction_and_restores_the_model():
    sm = _probe_model()
    batches = [toy_batch(8, seed=0), toy_batch(8, seed=1)]
    before = {n: p.detach().clone() for n, p in sm.named_parameters()}
    tab = probes.removal_table_model(sm, batches, n_layers=None, progress=False)
    assert len(tab) == sum(len(f.names) * f.A(0).shape[0] for f in sm.families)  # 2 families x 2 layers x r=4
    assert set(tab.columns) >= {"family", "layer", "direction", "gate_score", "norm", "effective_norm", "dloss",
                                "dacc", "active"}
    assert tab.attrs["n_examples"] == 16
    for n, p in sm.named_parameters():
        assert torch.equal(p, before[n]), n
    # one direction by hand: zero column j of B and recompute the loss
    fam = sm.families[0]
    row = tab[(tab["family"] == fam.key.split(".")[-1]) & (tab["layer"] == 1) & (tab["direction"] == 2)].iloc[0]
    with torch.no_grad():
        B = fam.B(1)
        saved = B[:, 2].clone()
        B[:, 2] = 0.0
        loss, _ = probes.val_loss(sm, batches)
        B[:, 2] = saved
    assert row["dloss"] == pytest.approx(loss - tab.attrs["base_loss"], abs=1e-6)
    assert row["dloss"] != 0.0
    sub = probes.removal_table_model(sm, batches, n_layers=1, progress=False)
    assert set(sub["layer"]) == {0}


def test_removal_table_refuses_a_coordinator():
    cfg = StructLoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS")
    sm = get_structlora_model(tiny_bert(layers=2), cfg)
    if all(f.coord is None for f in sm.families):
        pytest.skip("the default config has no coordinator")
    with pytest.raises(ValueError, match="graph=None"):
        probes.removal_table_model(sm, [toy_batch()], progress=False)


def test_probe_batches_fixed_subset():
    from datasets import Dataset

    ids = [[1, 2, 3], [4, 5], [6], [7, 8, 9, 10], [11, 12]]
    ds = Dataset.from_dict({"input_ids": ids, "attention_mask": [[1] * len(i) for i in ids], "labels": [0, 1, 0, 1, 0]})
    out = probes.probe_batches(SimpleNamespace(kind="seq-cls"), {"validation": ds},
                               SimpleNamespace(tokenizer=None), n=4, batch_size=3)
    assert [len(b["labels"]) for b in out] == [3, 1]
    assert out[0]["input_ids"].shape[0] == 3
    again = probes.probe_batches(SimpleNamespace(kind="seq-cls"), {"validation": ds},
                                 SimpleNamespace(tokenizer=None), n=4, batch_size=3)
    assert torch.equal(out[0]["input_ids"], again[0]["input_ids"])


def test_spearman_and_constant_inputs():
    rho, p = probes.spearman([1, 2, 3, 4], [10, 20, 30, 40])
    assert rho == pytest.approx(1.0) and p < 0.1
    assert np.isnan(probes.spearman([1, 1, 1], [1, 2, 3])[0])
    assert np.isnan(probes.spearman([1, 2], [1, 2])[0])


def test_boot_diff_sign_and_nan():
    rng = np.random.default_rng(0)
    y = rng.normal(size=40)
    d = pd.DataFrame({"dloss": y, "good": y + 0.1 * rng.normal(size=40), "bad": rng.normal(size=40)})
    lo, hi, p = probes.boot_diff(d, "good", "bad", n_boot=200)
    assert 0 < lo < hi and p < 0.05
    assert probes.boot_diff(d, "good", "bad", n_boot=200) == (lo, hi, p)  # seeded
    const = d.assign(bad=1.0)
    assert all(np.isnan(probes.boot_diff(const, "good", "bad", n_boot=50)))


def test_correlation_table_rows():
    rng = np.random.default_rng(1)
    n = 12
    y = rng.normal(size=n)
    r = pd.DataFrame({"dloss": y, "gate_score": y, "norm": -y, "effective_norm": rng.normal(size=n),
                      "active": [True] * 8 + [False] * 4})
    corr = probes.correlation_table({"m": r, "tiny": r.head(2)}, n_boot=100)
    assert list(zip(corr["model"], corr["directions"])) == [("m", "active"), ("m", "all"), ("tiny", "active"),
                                                             ("tiny", "all")]
    first = corr.iloc[0]
    assert first["n"] == 8 and first["rho_gate_score"] == pytest.approx(1.0)
    assert first["rho_gate-rho_norm"] == pytest.approx(2.0)
    assert np.isnan(corr.iloc[3]["ci_low"])
    assert probes.correlation_table({}, n_boot=10).empty


# ----------------------------------------------------------------------------------------- overhead (06)
from structlora.repro import overhead  # noqa: E402


def _raw():
    def steps(times, refresh_round=None):
        return [{"round": i, "wall_s": t, "warmup": i == 0, "refresh_pos": 0 if i == refresh_round else -1}
                for i, t in enumerate(times)]
    return {"model": "toy", "r": 8,
            "steps": {"lora": steps([9.0, 1.0, 1.0, 1.0, 1.0]), "both": steps([9.0, 1.1, 1.2, 5.0, 1.1], refresh_round=3)},
            "merged_eval_s": {"base": [1.0, 1.0, 1.0], "both": [1.0, 1.02, 0.98, 7.0], "lora": [1.0, 1.0, 1.0]}}


def test_round_ratios_drop_warmup_and_refresh_steps():
    logs = overhead.round_ratios(_raw(), "both")
    np.testing.assert_allclose(logs, np.log([1.1, 1.2, 1.1]))
    np.testing.assert_allclose(overhead.merged_ratios(_raw(), "both"), np.log([1.0, 1.02, 0.98]))


def test_log_ci_geometric_mean_and_degenerate_cases():
    logs = np.log([1.1, 1.2, 1.1])
    est = overhead.log_ci(logs)
    assert est["pct"] == pytest.approx(100 * (np.exp(logs.mean()) - 1))
    assert est["pct_low"] < est["pct"] < est["pct_high"] and est["n"] == 3 and 0 < est["p"] < 1
    flat = overhead.log_ci(np.zeros(3))
    assert flat["pct"] == 0 and np.isnan(flat["pct_low"]) and np.isnan(flat["p"])
    assert np.isnan(overhead.log_ci(np.array([]))["pct"])


def test_per_round_table_rows():
    tab = overhead.per_round_table([_raw()])
    assert list(zip(tab["variant"], tab["what"])) == [("both", "train step vs LoRA"), ("lora", "merged inference vs base"),
                                                      ("both", "merged inference vs base")]
    assert tab.iloc[1]["pct"] == pytest.approx(0.0)


def test_p_vs_bound():
    assert overhead.p_vs_bound({"pct": 3.0}, 4.0) == 0.0  # exact count, not at the bound
    assert overhead.p_vs_bound({"pct": 4.0}, 4.0) == 1.0
    assert np.isnan(overhead.p_vs_bound({"pct": 1.0, "logs": np.zeros(3)}, 4.0))
    logs = np.log([1.01, 1.02, 1.015, 1.005])
    p = overhead.p_vs_bound({"pct": 1.0, "logs": logs}, 4.0)
    from scipy import stats as sps
    assert p == pytest.approx(sps.ttest_1samp(logs, np.log(1.04)).pvalue)


def test_margin_claim_verdicts():
    kw = dict(notebook="06_overhead", tier="smoke")
    below = overhead.log_ci(np.log([1.01, 1.02, 1.015, 1.005]))
    c = overhead.margin_claim("T7.x", "at most 4% slower", 4.0, below, "≤ +4%", "note", **kw)
    assert c.verdict == "reproduced" and c.ours_value == pytest.approx(4.0 - below["pct"])
    assert c.ci_low == pytest.approx(4.0 - below["pct_high"]) and c.n == 4 and c.notebook == "06_overhead"
    assert c.ours.startswith("overhead +1.2% (95% CI [")
    above = overhead.log_ci(np.log([1.20, 1.22, 1.21, 1.19]))
    assert overhead.margin_claim("T7.y", "t", 4.0, above, "p", "", **kw).verdict == "not reproduced"
    exact = overhead.margin_claim("T7.m", "t", 4.2, {"pct": 1.0, "pct_low": 1.0, "pct_high": 1.0, "n": 1}, "p", "", **kw)
    assert exact.verdict == "reproduced" and "95% CI" not in exact.ours.split(";")[0]
    skipped = overhead.margin_claim("T7.s", "t", 4.0, None, "p", "why", **kw)
    assert skipped.verdict == "skipped" and skipped.ours == "not measured" and skipped.tier == "smoke"
    assert overhead.margin_claim("T7.n", "t", 4.0, {"pct": float("nan")}, "p", "", **kw).verdict == "skipped"


# ----------------------------------------------------------------------------------------- ablations (04)
from structlora.repro import ablations  # noqa: E402
from structlora.repro.stats import summarize  # noqa: E402


def test_delta_table_and_paired():
    runs = pd.DataFrame({"task": ["t"] * 6, "method": ["full"] * 3 + ["no_gate"] * 3, "seed": [0, 1, 2] * 2,
                         "status": "ok", "acc": [80.0, 82.0, 81.0, 78.0, 79.5, 80.0]})
    summ = summarize(runs.assign(variant=runs["method"]), metric="acc", by=("task", "variant"))
    tab = ablations.delta_table(summ, runs, {"t": ["components"], "u": ["graph"]}, "components",
                                ["full", "no_gate", "missing"], {"full": "StructLoRA", "no_gate": "w/o gate"},
                                table_col=lambda t, v: -1.0)
    assert list(tab["variant"]) == ["full", "no_gate"]
    assert tab.iloc[0]["delta"] == 0.0 and tab.iloc[0]["acc"] == 81.0
    assert tab.iloc[1]["delta"] == pytest.approx(-1.8) and tab.iloc[1]["n"] == 3 and tab.iloc[1]["paper_delta"] == -1.0
    r = ablations.paired(runs, "t", "no_gate", "full")
    assert r["diff_mean"] == pytest.approx(-1.8333, abs=1e-3) and r["n"] == 3
    assert ablations.paired(runs, "u", "no_gate", "full") is None


def test_paper_str():
    assert ablations.paper_str(None, "Table 5") == "n/a"
    assert ablations.paper_str(-0.45, "Table 5") == "-0.45 (Table 5)"
    assert ablations.paper_str(1.44, "Table 9", "%") == "+1.4% (Table 9)"


def test_ablation_variants_and_the_paper_deltas_they_are_compared_with():
    v = ablations.variants(0.3)
    assert list(v) == ablations.ORDER and set(sum(ablations.GROUPS.values(), [])) <= set(v)
    assert v["static_eta"] == ("structlora", {"learn_eta": False}) and v["lora_cos"] == ("lora_cos", {"penalty_weight": 0.3})
    assert v["full"] == ("structlora", {}) and v["no_gate"] == ("structlora_no_gate", {})
    # Table 5, BoolQ column (sst2 stands in): 79.4 - 81.3; CIFAR-100 column for fmnist-transfer: 81.9 - 84.1
    assert ablations.t5_paper_delta("sst2", "no_gate") == pytest.approx(-1.9)
    assert ablations.t5_paper_delta("fmnist-transfer", "lora") == pytest.approx(-2.6)
    assert ablations.t6_paper_delta("fmnist-transfer", "graph_adjacency") == pytest.approx(-0.8)  # 80.5 - 81.3


def test_ablation_coverage_names_the_seeds_of_each_group_and_what_a_tier_leaves_out():
    params = {"smoke": {"TASKS": {"sst2": ["components"]}, "SEEDS": [0]},
              "cpu": {"TASKS": {"sst2": ["components", "coupling"]}, "SEEDS": [0, 1, 2],
                      "SEEDS_BY_VARIANT": {"full": list(range(10)), "no_coord": [0, 1, 2, 3]}},
              "gpu": None}
    table, missing = ablations.coverage(params, "cpu", all_tasks=("sst2", "boolq"))
    assert table.loc["components", "sst2"] == "smoke:1 cpu:3-10" and table.loc["coupling", "sst2"] == "cpu:3-10"
    assert table.loc["graph", "sst2"] == "" and list(table.columns) == ["sst2"]
    assert ("sst2", "graph") in missing and ("sst2", "coupling") not in missing and ("boolq", "components") in missing
    assert ablations.n_range([3]) == "3" and ablations.n_range([10, 3, 4]) == "3-10"


def test_ablation_coverage_of_a_tier_on_other_models_lists_its_own_tasks():
    """The paper tier: its tasks are the columns (the offline ones first, in COVERAGE_ORDER), its models'
    seeds are looked up in SEEDS_BY_MODEL, and it leaves out only pairs of tasks that it runs."""
    models = {"boolq": "TinyLlama/TinyLlama_v1.1", "cifar100": "vit_base_patch16_224"}
    params = {"paper": {"TASKS": {"cifar100": ["components"], "boolq": ["components", "graph"]}, "SEEDS": [0, 1, 2],
                        "SEEDS_BY_MODEL": {"vit_base_patch16_224": [0]}}}
    table, missing = ablations.coverage(params, "paper", task_model=models)
    assert list(table.columns) == ["boolq", "cifar100"]
    assert table.loc["components", "cifar100"] == "paper:1" and table.loc["graph", "boolq"] == "paper:3"
    assert {t for t, _ in missing} == {"boolq", "cifar100"} and ("cifar100", "graph") in missing


def _ablation_runs(full_gain: float = 2.0) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = []
    for seed in range(5):
        base = 80 + rng.normal(0, 1)
        for v, acc, step, energy in (("full", base + full_gain + 0.1 * seed, 0.12, 1.0), ("lora", base, 0.10, 2.0),
                                     ("lora_cos", base + 0.5, 0.11, 4.0), ("static_eta", base + 0.2 * seed, 0.12, 1.0)):
            rows.append({"task": "sst2", "variant": v, "seed": seed, "acc": acc, "step_s": step, "wall_time_s": 10.0,
                         "peak_mem_mb": 100.0 if v == "lora" else 110.0, "diag_drift_energy": energy,
                         "diag_cos_adj": 0.5 if v == "full" else 0.3})
    return pd.DataFrame(rows)


def test_t9_and_cost_tables_relate_every_variant_to_lora():
    ok = _ablation_runs()
    t9 = ablations.t9_table(ok, {"sst2": ["penalties"], "boolq": ["components"]})
    assert list(t9["variant"]) == ["full", "lora", "lora_cos"]  # lora_lap has no run
    full = t9.set_index("variant").loc["full"]
    assert full["extra_cost_%"] == pytest.approx(20.0) and full["E"] == 1.0 and full["paper_acc"] == 81.3
    cost = ablations.cost_table(ok, ["sst2"])
    assert list(cost.index.get_level_values("variant")) == ["full", "lora", "lora_cos", "static_eta"]
    assert cost.loc[("sst2", "lora_cos"), "step_x_lora"] == pytest.approx(1.1)
    assert cost.loc[("sst2", "full"), "mem_x_lora"] == pytest.approx(1.1) and cost.loc[("sst2", "full"), "runs"] == 5


def test_ablation_claims_pair_the_variants_over_seeds_and_judge_each_once():
    ok = _ablation_runs(full_gain=2.0)
    claims = ablations.ablation_claims(ok, {"sst2": ["components", "penalties", "coupling"]}, "04_ablations", "smoke",
                                       seeds_cap=10)
    by = {c.claim_id: c for c in claims}
    assert len(by) == len(claims)
    lora = by["T5.sst2.full>lora"]
    assert lora.n == 5 and lora.ours_value == pytest.approx(2.2) and lora.paper_diff == pytest.approx(2.2)
    assert lora.verdict == "reproduced"
    assert by["T5.sst2.full>no_gate"].verdict == "skipped"  # no run of the variant: never a silent zero
    # drift energy: full's E is half LoRA+Cos's at every seed: -75% relative change (1 / 4 - 1)
    assert by["T9.sst2.full<lora_cos.E"].ours_value == pytest.approx(-75.0)
    assert by["T9.sst2.full>lora_cos.CosAdj"].ours_value == pytest.approx(0.2)
    coupling = by["T9.sst2.learned>static"]  # direction only: margin 0, no power analysis
    assert coupling.ours_value == pytest.approx(1.8) and coupling.verdict == "reproduced" and coupling.seeds_required is None
    md = ablations.summary_markdown(claims, "smoke")
    assert f"Verdicts of the {len(claims)} ablation claims" in md and "T9.sst2.full<lora_cos.E" not in md.split("\n\n")[0]
    worse = ablations.ablation_claims(_ablation_runs(full_gain=-3.0), {"sst2": ["components"]}, "04", "smoke")
    assert "T5.sst2.full>lora" in ablations.summary_markdown(worse, "smoke").split("\n\n")[0]


def test_ablation_panels_draws_accuracy_energy_and_cosadj_per_task():
    import matplotlib.pyplot as plt

    from structlora.repro import plots

    ok = pd.concat([_ablation_runs(), _ablation_runs().assign(task="boolq")])
    fig = plots.ablation_panels(ok, ["sst2", "boolq"], ablations.ORDER, ablations.LABELS,
                                {v: m for v, (m, _) in ablations.variants().items()}, side=["full", "lora", "lora_cos"],
                                title="x")
    assert len(fig.axes) == 6 and fig.axes[0].get_ylabel() == "sst2: test accuracy (%)"
    assert len(fig.axes[0].get_xticklabels()) == 4 and len(fig.axes[1].get_xticklabels()) == 3
    plt.close(fig)


def test_tier_params_reads_the_tier_file_and_wall_time_reports_the_load(tmp_path):
    import time

    from structlora.repro.notebook import tier_params, wall_time

    (tmp_path / "params" / "gpu").mkdir(parents=True)
    (tmp_path / "params" / "gpu" / "nb.yml").write_text("SEEDS: [0, 1]\nSEEDS_BY_VARIANT: {full: [0, 1, 2]}\n")
    assert tier_params("nb", "gpu", tmp_path) == {"SEEDS": [0, 1], "SEEDS_BY_VARIANT": {"full": [0, 1, 2]}}
    assert tier_params("nb", "smoke", tmp_path) is None
    (tmp_path / "notebooks").mkdir()                   # the cpu tier is the notebook's own parameters cell
    (tmp_path / "notebooks" / "nb.py").write_text('# %% tags=["parameters"]\nTIER = "cpu"\nSEEDS = [0, 1, 2]\n')
    assert tier_params("nb", "cpu", tmp_path) == {"TIER": "cpu", "SEEDS": [0, 1, 2]}
    t0 = time.perf_counter() - 90
    assert wall_time(t0).startswith("notebook wall time: 1.5 min")
    assert "load average" in wall_time(t0, time.process_time())


# ------------------------------------------------------------------------------- pending runs (reproduce)
def test_pending_runs_train_primary_family_first_seed_by_seed(tmp_path):
    import json

    from structlora.repro.grid import RunSpec
    from structlora.repro.reproduce import priority, read_pending

    mk = lambda m, s, **kw: RunSpec.make("sst2", "minilm-l6", m, seed=s, **kw)  # noqa: E731
    specs = [mk("lora", 1, rank=4), mk("structlora", 1), mk("structlora", 0, graph="similarity"),
             mk("filter_ib", 1, keep_ratio=0.5), mk("lora", 1), mk("structlora", 0), mk("dora", 0),
             mk("lora", 0, fraction=0.1)]
    path = tmp_path / "pending.jsonl"
    lines = [{"spec": s.to_dict(), "results_dir": "results/runs", "weights": False} for s in specs]
    lines.append({**lines[1], "weights": True})                     # listed twice: once kept for a probe
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    items = read_pending(path)
    assert len(items) == len(specs) and [w for s, _, w in items if s == specs[1]] == [True]
    order = [s for s, _, _ in sorted(items, key=lambda it: priority(it[0]))]
    # wave 1 (sst2 stages vs LoRA, r = 8, all data) seed by seed, then wave 2 (DoRA), then the rest
    assert order[:4] == [mk("structlora", 0), mk("lora", 1), mk("structlora", 1), mk("filter_ib", 1, keep_ratio=0.5)]
    assert order[4] == mk("dora", 0)
    assert set(order[5:]) == {mk("structlora", 0, graph="similarity"), mk("lora", 1, rank=4), mk("lora", 0, fraction=0.1)}
    # with the registered plan, its primary comparisons come first, seed by seed in the plan's order
    from structlora.repro.plan import load_plan

    plan = load_plan("cpu")
    order = [s for s, _, _ in sorted(items, key=lambda it: priority(it[0], plan))]
    assert order[:5] == [mk("lora", 0, fraction=0.1), mk("structlora", 0), mk("lora", 1, rank=4), mk("lora", 1),
                         mk("structlora", 1)]


def test_make_reproduce_reexecutes_from_records_and_trains_only_when_asked():
    import shutil
    import subprocess
    from pathlib import Path

    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    root = Path(__file__).resolve().parents[1]
    dry = lambda *a: subprocess.run(["make", "-n", "reproduce", *a], cwd=root, capture_output=True,  # noqa: E731
                                    text=True, check=True).stdout
    assert "--records-only" in dry() and "--train-pending" not in dry()
    assert "--train-pending" in dry("TRAIN=1")
    assert "--retrain" in dry("RETRAIN=1") and "--records-only" not in dry("RETRAIN=1")
    assert "--records-only" not in dry("TIER=smoke")


# ----------------------------------------------------------------------------------------- filters (05)
from structlora.repro import filters  # noqa: E402

_FILTER_LABELS = {"filter_ib": "IB", "filter_random": "Random", "filter_topk_norm": "Top-k Norm", "lora": "LoRA",
                  "structlora_no_coord": "no coord"}


def _filter_runs() -> pd.DataFrame:
    rows = []
    for seed in range(4):
        for m, acc in (("filter_ib", 82.0 + 0.2 * seed), ("filter_random", 80.0), ("filter_topk_norm", 82.0 - 0.1 * seed),
                       ("lora", 83.0)):
            rows.append({"task": "sst2", "method": m, "seed": seed, "acc": acc})
    return pd.DataFrame(rows)


def test_filter_pair_tests_and_claims_follow_fig2_ordering_as_claims_of_direction():
    tests = filters.pair_tests(_filter_runs(), _FILTER_LABELS)
    assert list(tests["comparison"]) == ["IB − Random", "IB − Top-k Norm", "Top-k Norm − Random"]
    assert tests["diff_mean"].tolist() == pytest.approx([2.3, 0.45, 1.85])
    claims = {c.claim_id: c for c in filters.filter_claims(tests, ["sst2", "boolq"], _FILTER_LABELS, 0.5, "05", "smoke")}
    assert claims["F2.sst2.ib>random"].verdict == "reproduced"       # +2.3, CI above 0: margin 0
    assert claims["F2.sst2.ib>topk_norm"].verdict == "inconclusive"  # +0.45 [-0.17, 1.07]
    assert claims["F2.sst2.ib>random"].seeds_required is None        # direction only: no power analysis
    assert claims["F2.boolq.ib>random"].verdict == "skipped" and claims["F2.boolq.ib>random"].note == "not run"
    worse = _filter_runs()
    worse.loc[worse["method"] == "filter_ib", "acc"] = 79.0 + 0.1 * worse["seed"]
    c = {c.claim_id: c for c in filters.filter_claims(filters.pair_tests(worse, _FILTER_LABELS), ["sst2"],
                                                      _FILTER_LABELS, 0.5, "05", "smoke")}
    assert c["F2.sst2.ib>random"].verdict == "not reproduced"


def test_relevance_claims_judge_rho_gate_minus_rho_norm_and_say_why_when_they_cannot():
    corr = pd.DataFrame([
        {"model": "filter_ib", "directions": "active", "n": 48, "rho_gate-rho_norm": 0.4, "ci_low": 0.1, "ci_high": 0.7,
         "p_boot": 0.01, "rho_gate_score": 0.5, "p_gate_score": 0.001, "rho_norm": 0.1, "p_norm": 0.4},
        {"model": "structlora_no_coord", "directions": "active", "n": 96, "rho_gate-rho_norm": np.nan,
         "ci_low": np.nan, "ci_high": np.nan, "p_boot": np.nan, "rho_gate_score": np.nan, "p_gate_score": np.nan,
         "rho_norm": 0.1, "p_norm": 0.4}])
    got = filters.relevance_claims(corr, ["filter_ib", "structlora_no_coord", "lora"], _FILTER_LABELS, "sst2", 0, "05", "cpu")
    assert [c.verdict for c in got] == ["reproduced", "inconclusive", "skipped"]
    assert got[0].ours_value == 0.4 and got[0].n == 48 and "ρ_gate 0.50" in got[0].ours
    assert got[1].note == "a score is constant over the directions" and got[2].note == "model not probed in this tier"
    md = filters.summary_markdown(got, "cpu")
    assert "1 of 3 probed models show the gate ranking better" in md and md.count("\n- **") == 3
    # records-only: a probed model without a record yet is pending, not skipped
    (c,) = filters.relevance_claims(corr, ["lora"], _FILTER_LABELS, "sst2", 0, "05", "paper", pending=["lora"])
    assert c.verdict == "pending" and "--train-pending" in c.note


def test_a_probe_whose_interval_includes_0_is_undecidable_with_the_directions_it_would_need():
    row = {"model": "filter_ib", "directions": "active", "n": 44, "rho_gate-rho_norm": 0.1, "ci_low": -0.3,
           "ci_high": 0.5, "p_boot": 0.6, "rho_gate_score": -0.1, "p_gate_score": 0.3, "rho_norm": -0.2, "p_norm": 0.2}
    (c,) = filters.relevance_claims(pd.DataFrame([row]), ["filter_ib"], _FILTER_LABELS, "sst2", 0, "05", "cpu")
    assert c.verdict == "undecidable at this scale" and "would need 704 directions" in c.note  # 44 * (0.4/0.1)^2
    assert filters.directions_needed(0.0, -0.4, 0.4, 44) == "more than 4400"
    assert filters.directions_needed(0.4, 0.1, 0.7, 48) == "49"    # already excludes 0: one more than n at least


def test_filter_bars_and_removal_scatter_draw_one_panel_per_task_and_score():
    import matplotlib.pyplot as plt

    from structlora.repro import plots

    fig = plots.filter_bars(_filter_runs(), ["sst2"], ["filter_ib", "filter_random", "filter_topk_norm"], _FILTER_LABELS,
                            xlabel="keep", ylabels=["acc"])
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["IB", "Random", "Top-k Norm"]
    assert ax.get_lines()[-1].get_ydata()[0] == pytest.approx(83.0)  # LoRA's mean, dashed
    plt.close(fig)
    r = pd.DataFrame({"gate_score": [0.1, 0.5, 0.9], "norm": [1.0, 2.0, 3.0], "effective_norm": [0.1, 1.0, 2.7],
                      "dloss": [0.0, 0.01, 0.05], "family": "query", "active": [False, True, True]})
    corr = pd.DataFrame([{"model": "filter_ib", "directions": "active", "rho_gate_score": 1.0, "rho_norm": 1.0,
                          "rho_effective_norm": 1.0}])
    fig = plots.removal_scatter({"filter_ib": r}, corr, _FILTER_LABELS)
    assert len(fig.axes) == 3 and fig.axes[0].get_title() == "IB: ρ(active) = 1.00"
    plt.close(fig)


# ------------------------------------------------------------------------------------ main results (01)
from structlora.repro import main_results  # noqa: E402


def test_main_results_grid_and_coverage_say_what_each_tier_runs():
    assert not main_results.applies("fmnist-transfer", "prefix") and main_results.applies("sst2", "prefix")
    assert any(line.startswith("prefix on fmnist-transfer") for line in main_results.not_applicable())
    cpu = {"TASKS": ["sst2", "fmnist-transfer"], "METHODS": ["lora", "prefix"], "TASK_METHODS": {"sst2": ["lora", "dora"]},
           "SEEDS": [0, 1, 2], "TASK_SEEDS": {"sst2": list(range(10))}, "RANK": 8}
    assert main_results.grid_of(cpu) == [{"task": "sst2", "method": "lora", "seeds": 10},
                                         {"task": "sst2", "method": "dora", "seeds": 10},
                                         {"task": "fmnist-transfer", "method": "lora", "seeds": 3}]
    with pytest.raises(AssertionError, match="RANK"):
        main_results.grid_of({k: v for k, v in cpu.items() if k != "RANK"})
    sized = {**cpu, "TASK_SEEDS": {"fmnist-transfer": {"lora": list(range(7))}}}   # per-method seeds
    assert main_results.seeds_of(sized, "fmnist-transfer", "lora") == list(range(7))
    assert main_results.seeds_of(sized, "fmnist-transfer", "prefix") == [0, 1, 2]
    assert main_results.seeds_of(sized, "sst2", "dora") == [0, 1, 2]
    assert main_results.grid_of(sized)[-1] == {"task": "fmnist-transfer", "method": "lora", "seeds": 7}
    gpu = {**cpu, "TASKS": ["boolq"], "METHODS": ["lora", "structlora"], "TASK_METHODS": {}}
    table, line = main_results.coverage({"cpu": cpu, "gpu": gpu}, "cpu")
    # coverage reads each tier's registered plan: the cpu plan gives T2's arms (LoRA, StructLoRA on sst2)
    # its own seeds (the pilot's 3 until the seeds rule runs); the other methods keep TASK_SEEDS
    assert table.loc["lora", "sst2"] == "cpu:3" and table.loc["dora", "sst2"] == "cpu:10"
    assert table.loc["lora", "boolq"] == "gpu:3"
    assert table.loc["prefix", "fmnist-transfer"] == "n/a" and table.loc["structlora", "sst2"] == ""
    n_applicable = len(main_results.in_scope()) * 6 - 1
    assert line.startswith(f"this tier (cpu) leaves out {n_applicable - 3} of the {n_applicable} applicable")
    assert line.endswith("of which the gpu tier runs 2")


def test_main_results_of_a_tier_on_hub_models_take_the_models_of_its_budget():
    """The paper tier's budget names its own models (Budget.task_model): the coverage table's columns, the
    not-applicable lines and the claims say them; the cpu tier's defaults are the offline TASK_MODEL."""
    from structlora.repro.notebook import TASK_MODEL, load_budget, peer_tiers

    models = load_budget("paper").task_model
    assert load_budget("cpu").task_model == dict(TASK_MODEL) and "glue/sst2" not in TASK_MODEL
    assert peer_tiers("cpu") == ["gpu"] and peer_tiers("paper") == []
    paper_p = {"TASKS": ["glue/sst2", "cifar100"], "METHODS": ["lora", "prefix", "structlora"], "TASK_METHODS": {},
               "SEEDS": [0, 1, 2], "TASK_SEEDS": {}, "RANK": 8}
    table, line = main_results.coverage({"paper": paper_p}, "paper", tasks=list(models))
    assert list(table.columns) == list(models) and table.loc["lora", "glue/sst2"] == "paper:3"
    assert table.loc["prefix", "cifar100"] == "n/a" and table.loc["lora", "boolq"] == ""
    assert "prefix on cifar100: prefix supports seq-cls, causal-lm models, vit_base_patch16_224 is image-cls" \
        in main_results.not_applicable(models)
    claims = main_results.main_claims(pd.DataFrame(columns=["task", "method", "seed", "acc", "val_accuracy",
                                                            "single_class"]),
                                      ["glue/sst2"], "01", "paper", seeds_cap=3, pending=30, task_model=models)
    assert {c.verdict for c in claims} == {"pending"}
    assert "(FacebookAI/roberta-base; paper: sst2, Table 2)" in claims[0].claim


def _main_runs() -> pd.DataFrame:
    rows = []
    for seed in range(4):
        for m, test, val in (("lora", 85.0, 0.80), ("structlora", 86.0 + 0.1 * seed, 0.81), ("dora", 87.0, 0.79),
                             ("full_ft", 90.0, 0.95)):
            rows.append({"task": "sst2", "method": m, "seed": seed, "acc": test + 0.3 * (seed % 2),
                         "val_accuracy": val, "single_class": False})
    return pd.DataFrame(rows)


def test_main_claims_choose_the_competitor_on_validation_and_never_count_lora_twice():
    claims = {c.claim_id: c for c in main_results.main_claims(_main_runs(), ["sst2"], "01", "smoke", seeds_cap=10)}
    beats, best = claims["T2.sst2.structlora>lora"], claims["T2.sst2.structlora_best_peft"]
    assert beats.ours_value == pytest.approx(1.15) and beats.paper_diff == 1.5 and beats.n == 4
    # DoRA has the best test accuracy but LoRA the best validation accuracy: the competitor is LoRA, a repeat of T2
    assert "(lora)" in best.claim and best.same_as == "T2.sst2.structlora>lora"
    assert best.paper_diff == pytest.approx(0.4)  # 95.0 - Sensitivity-LoRA's 94.6 (Table 2, SST-2)
    runs = _main_runs()
    runs.loc[runs["method"] == "dora", "val_accuracy"] = 0.9
    best = {c.claim_id: c for c in main_results.main_claims(runs, ["sst2"], "01", "smoke")}["T2.sst2.structlora_best_peft"]
    assert "(dora)" in best.claim and best.same_as == "" and best.ours_value == pytest.approx(-0.85)
    alone = main_results.main_claims(runs[runs["method"] == "structlora"], ["sst2"], "01", "smoke")
    assert [c.verdict for c in alone] == ["skipped", "skipped"]
    md = main_results.summary_markdown(list(claims.values()), "smoke")
    assert beats.verdict == "reproduced" and "reproduced on 1 of 1 tasks" in md  # +1.15 [0.94, 1.36] vs half of 1.5
    assert md.count("\n- **") == 2


def test_side_by_side_and_peft_ranks_put_ours_beside_the_paper():
    summ = summarize(_main_runs(), metric="acc", by=("task", "method"), digits=1)
    side = main_results.side_by_side(summ, ["sst2"])
    assert side.loc["lora", ("sst2", "paper")] == 93.5 and side.loc["full_ft", ("sst2", "paper")] == "—"
    ranks = main_results.peft_ranks(summ, ["sst2"])
    assert "full_ft" not in ranks.index and ranks.loc["dora", ("sst2", "ours")] == 1
    assert ranks.loc["structlora", ("sst2", "paper ")] == 1 and ranks.loc["dora", ("sst2", "paper ")] == "—"
