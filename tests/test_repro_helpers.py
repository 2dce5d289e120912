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
