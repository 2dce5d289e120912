"""Unit tests of notebook 06's helpers (structlora.repro.overhead) beyond the log-ratio statistics tested in
test_repro_helpers.py: Table 7's bounds, the benchmark tables and figure, the training-loop comparison,
the trained model's export / merge checks, the interleaved timing and the claims (tiny synthetic inputs)."""
from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats as sps

from structlora import StructLoraConfig, get_structlora_model
from structlora.repro import overhead, paper
from structlora.repro.claims import Claim
from toy import randomize_lora, tiny_bert, toy_batch

KW = dict(notebook="06_overhead", tier="smoke")


def _steps(times, refresh_round=None):
    return [{"round": i, "wall_s": t, "warmup": i == 0, "refresh_pos": 0 if i == refresh_round else -1}
            for i, t in enumerate(times)]


def _raw(model="toy", step_ratios=(1.01, 1.02, 1.015, 1.005)):
    return {"model": model, "r": 8,
            "steps": {"lora": _steps([9.0, 1.0, 1.0, 1.0, 1.0]), "both": _steps([9.0, *step_ratios])},
            "merged_eval_s": {"base": [1.0, 1.0, 1.0], "base-copy": [1.0, 1.0, 1.0], "both": [1.0, 1.02, 0.98]},
            "merged_plain": {"both": True}, "merged_max_abs_logit_diff": {"both": 1e-6}}


def _row(model="toy", **kw):
    return {"model": model, "r": 8, "variant": "both", "step_x_amortized": 1.05, "flops_x": 1.01,
            "op_calls_x": 1.5, "mem_x": 1.02, "mem_x_refresh": 1.03, **kw}


# ------------------------------------------------------------------------------------------------ section 1
def test_table7_bounds():
    t, m, gb = overhead.table7_bounds(paper.TABLE7)
    assert (t, m) == (6.0, 4.2) and gb == pytest.approx(0.7)
    toy = {"lora": {"time_per_epoch_rel": 2.0, "peak_mem_gb": 10.0},
           "structlora": {"time_per_epoch_rel": 3.0, "peak_mem_gb": 12.34}}
    assert overhead.table7_bounds(toy) == (50.0, 23.4, pytest.approx(2.34))


def test_run_benchmark_runs_or_reuses(tmp_path):
    out = tmp_path / "o.json"
    calls = []

    def main(argv):
        calls.append(argv)
        out.write_text(json.dumps({"rows": [{"a": len(calls)}]}))
        return 0

    res, measured = overhead.run_benchmark({"rounds": 3, "models": "m"}, out, reuse=True, main=main)  # nothing yet
    assert measured and calls == [["--rounds=3", "--models=m", f"--out={out}"]] and res == {"rows": [{"a": 1}]}
    res, measured = overhead.run_benchmark({"rounds": 3}, out, reuse=True, main=main)  # read back
    assert not measured and len(calls) == 1 and res["rows"][0]["a"] == 1
    assert overhead.run_benchmark({}, out, reuse=False, main=main)[0]["rows"][0]["a"] == 2
    with pytest.raises(RuntimeError, match="exited with 3"):
        overhead.run_benchmark({}, out, reuse=False, main=lambda argv: 3)


def test_the_benchmark_is_in_the_package_and_passes_by_table_7():
    """`pip install "structlora[repro]"` runs 06's benchmark (no script loaded by path); the command-line
    script is a thin wrapper; the benchmark's pass rule is Table 7's own bounds, as the notebook's."""
    import subprocess
    from pathlib import Path

    from structlora.repro import bench

    t, m, _ = overhead.table7_bounds(paper.TABLE7)
    assert bench.TARGETS["step_time"] == pytest.approx(1 + t / 100) and bench.TARGETS["memory"] == pytest.approx(1 + m / 100)
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "overhead.py"
    assert "from structlora.repro.bench import main" in script.read_text() and len(script.read_text().splitlines()) < 15
    r = subprocess.run([sys.executable, "-m", "structlora.repro.bench", "--help"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and "--quick" in r.stdout


def test_bench_table_columns_rounding_and_notes():
    result = {"rows": [{"zzz": 1, "step_x": 1.234567, "variant": "both", "model": "m", "r": 8}],
              "what_is_measured": {"step_x": "median ratio", "zzz": "not shown", "mem_x": "counted"}}
    table, notes = overhead.bench_table(result)
    assert list(table.columns) == ["model", "r", "variant", "step_x"] and table["step_x"].iloc[0] == 1.2346
    assert notes == {"step_x": "median ratio", "mem_x": "counted"}
    assert overhead.bench_table({"rows": result["rows"]})[1] == {}


def test_timings_frame_rows():
    raw = _raw()
    raw["steps"]["both"] = _steps([9.0, 1.1, 1.2, 5.0, 1.1], refresh_round=3)
    f = overhead.timings_frame([raw])
    steps = f[f["kind"] == "train step"]
    assert steps.groupby("variant")["ms"].apply(list).to_dict() == {
        "both": pytest.approx([1100.0, 1200.0, 1100.0]), "lora": [1000.0] * 4}  # warm-up and refresh steps dropped
    inf = f[f["kind"] == "inference (merged)"]
    assert list(inf["variant"]) == ["base"] * 3 + ["merged both"] * 3  # base-copy (the control) is not drawn
    assert set(f["model"]) == {"toy r=8"} and inf["ms"].iloc[4] == pytest.approx(1020.0)


def test_timings_figure_panels_and_points():
    f = overhead.timings_frame([_raw("a"), _raw("b")])
    fig = overhead.timings_figure(f, "title")
    try:
        axes = fig.axes
        assert [ax.get_title() for ax in axes] == ["a r=8: train step", "b r=8: train step",
                                                   "a r=8: inference (merged)", "b r=8: inference (merged)"]
        assert all(ax.get_ylabel() == "ms per call" for ax in axes) and fig._suptitle.get_text() == "title"
        # every call is one strip-plot point (box plots without fliers add no point collections)
        points = [sum(len(c.get_offsets()) for c in ax.collections) for ax in axes]
        assert points == [8, 8, 6, 6]
    finally:
        plt.close(fig)


# ------------------------------------------------------------------------------------------------ section 2
def _runs(step_l, step_s, mem=(100.0, 110.0)):
    rows = []
    for seed, (a, b) in enumerate(zip(step_l, step_s)):
        rows += [{"key": f"l{seed}", "task": "sst2", "method": "lora", "seed": seed, "status": "ok", "cost_complete": True,
                  "steps_per_s": 1 / a, "peak_mem_mb": mem[0], "trainable_params": 10},
                 {"key": f"s{seed}", "task": "sst2", "method": "structlora", "seed": seed, "status": "ok",
                  "cost_complete": True, "steps_per_s": 1 / b, "peak_mem_mb": mem[1] + seed, "trainable_params": 12}]
    return pd.DataFrame(rows)


def test_cost_runs_and_summary():
    df = _runs([0.1, 0.2], [0.11, 0.22])
    df.loc[1, "cost_complete"] = False
    df.loc[2, "status"] = "skipped"
    ok, partial = overhead.cost_runs(df)
    assert list(partial["key"]) == ["s0"] and list(ok["key"]) == ["l0", "s1"]  # l1 skipped
    assert ok["step_ms"].tolist() == pytest.approx([100.0, 220.0])
    assert ok["log_step"].tolist() == pytest.approx(np.log([100.0, 220.0]).tolist())
    assert ok["log_mem"].tolist() == pytest.approx(np.log([100.0, 111.0]).tolist())
    ok, _ = overhead.cost_runs(_runs([0.1, 0.3], [0.11, 0.22]))
    s = overhead.loop_summary(ok)
    assert s.loc["lora", "step_ms"] == pytest.approx(200.0) and s.loc["structlora", "peak_rss_mb"] == 110.5
    assert s.loc["structlora", "runs"] == 2 and s.loc["structlora", "trainable_params"] == 12


def test_loop_comparison_matches_the_paired_log_ratios():
    lo, st = np.array([0.10, 0.20, 0.15]), np.array([0.105, 0.22, 0.156])
    ok, _ = overhead.cost_runs(_runs(lo, st))
    table, est = overhead.loop_comparison(ok)
    d = np.log(st / lo)
    half = sps.t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3)
    step = table.set_index("quantity").loc["step time"]
    assert step["structlora_vs_lora_%"] == pytest.approx(100 * (np.exp(d.mean()) - 1))
    assert step["ci_low_%"] == pytest.approx(100 * (np.exp(d.mean() - half) - 1)) and step["n"] == 3
    mem = np.log(np.array([110.0, 111.0, 112.0]) / 100.0)
    assert table.set_index("quantity").loc["peak RSS", "structlora_vs_lora_%"] == pytest.approx(
        100 * (np.exp(mem.mean()) - 1))
    assert est["pct"] == pytest.approx(step["structlora_vs_lora_%"]) and est["n"] == 3
    assert est["pct_high"] == pytest.approx(step["ci_high_%"])
    table1, est1 = overhead.loop_comparison(overhead.cost_runs(_runs([0.1], [0.11]))[0])
    assert est1 is None and list(table1["n"]) == [1, 1]


# ------------------------------------------------------------------------------------------------ section 3
class _Cols:
    """``dataset[[i, j]]`` -> column dict, like a datasets.Dataset."""

    def __init__(self, cols):
        self.cols = cols

    def __len__(self):
        return len(self.cols["input_ids"])

    def __getitem__(self, idx):
        return {k: [v[i] for i in idx] for k, v in self.cols.items()}


def test_parity_batches_sample_pad_and_drop_labels():
    ids = [[1] * (1 + i % 3) for i in range(7)]
    ds = _Cols({"input_ids": ids, "attention_mask": [[1] * len(x) for x in ids], "labels": list(range(7))})
    rows, batches = overhead.parity_batches(ds, "seq-cls", SimpleNamespace(pad_token_id=9), 5, size=2)
    np.testing.assert_array_equal(rows, np.sort(np.random.default_rng(0).permutation(7)[:5]))
    assert [len(b["input_ids"]) for b in batches] == [2, 2, 1] and all("labels" not in b for b in batches)
    first = [ids[int(i)] for i in rows[:2]]
    width = max(map(len, first))
    assert batches[0]["input_ids"].tolist() == [x + [9] * (width - len(x)) for x in first]
    assert batches[0]["attention_mask"].tolist() == [[1] * len(x) + [0] * (width - len(x)) for x in first]
    _, b0 = overhead.parity_batches(ds, "seq-cls", SimpleNamespace(pad_token_id=None), 7, size=7)
    assert int(b0[0]["input_ids"][0, -1]) in (0, 1) and (b0[0]["input_ids"] == 0).sum() > 0
    assert len(overhead.parity_batches(ds, "seq-cls", None, 100)[0]) == 7


def _structlora():
    cfg = StructLoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS",
                           gate="concrete", graph=None)
    sm = get_structlora_model(tiny_bert(layers=2), cfg)
    randomize_lora(sm)
    return sm


def test_logits_of_and_is_plain():
    sm = _structlora()
    batches = [{"input_ids": toy_batch(3, seed=0)["input_ids"]}, {"input_ids": toy_batch(2, seed=1)["input_ids"]}]
    sm.train()
    out = overhead.logits_of(sm, batches)
    with torch.no_grad():
        ref = torch.cat([sm(**b).logits for b in batches])
    assert out.shape == (5, 2) and not sm.training and torch.equal(out, ref.float())
    base = tiny_bert(layers=2)
    assert overhead.is_plain(tiny_bert(layers=2), base)
    assert not overhead.is_plain(sm, base)
    assert not overhead.is_plain(tiny_bert(layers=3), base)  # same class, more parameters


def test_export_check_parity_and_sizes():
    import copy

    from peft import LoraConfig, get_peft_model

    sm = _structlora()
    batches = [{"input_ids": toy_batch(4, seed=0)["input_ids"]}]
    merged = copy.deepcopy(sm).merge_and_unload().eval()
    lora = get_peft_model(tiny_bert(layers=2), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                                          task_type="SEQ_CLS"))
    ex = overhead.export_check(sm, tiny_bert(layers=2), merged, lora, batches, rank=4)
    assert ex.plain and ex.merged_diff < 1e-4 and ex.vanilla_diff < 1e-4 and np.isfinite(ex.compressed_diff)
    assert ex.lora_bytes > 0 and ex.exact["size_bytes"] > 0 and max(ex.compressed["ranks"].values()) <= 4
    # a model that is not the merged one: the parity check sees the difference
    other = overhead.export_check(sm, tiny_bert(layers=2), tiny_bert(layers=2, seed=5), lora, batches, rank=4)
    assert other.merged_diff > 1e-3


def test_export_table_ratios():
    ex = overhead.ExportCheck(exact={"size_bytes": 300, "ranks": {"a": 4, "b": 12}, "max_relative_error": 0.0},
                              compressed={"size_bytes": 150, "ranks": {"a": 4, "b": 8}, "max_relative_error": 0.02},
                              lora_bytes=100, vanilla_diff=1e-6, compressed_diff=0.3, merged_diff=1e-7, plain=True)
    t = overhead.export_table(ex, 8)
    assert list(t["adapter"]) == ["peft LoRA", "StructLoRA exact", "StructLoRA compressed to r=8"]
    assert list(t["x_lora"]) == [1.0, 3.0, 1.5] and list(t["max_rank"]) == [8, 12, 8]
    assert list(t["max_rel_error"]) == [0.0, 0.0, 0.02] and list(t["bytes"]) == [100, 300, 150]
    assert np.isnan(t["max_abs_logit_diff_vs_structlora"].iloc[0])
    assert list(t["max_abs_logit_diff_vs_structlora"].iloc[1:]) == [1e-6, 0.3]


def test_interleaved_times_alternates_and_times_each_call():
    clock, calls = SimpleNamespace(t=0.0), []

    def model(name, cost):
        def call(**inputs):
            assert inputs == {"x": 1} and not torch.is_grad_enabled()
            calls.append(name)
            clock.t += cost
        return call

    times = overhead.interleaved_times({"base": model("base", 1.0), "merged": model("merged", 3.0)}, {"x": 1}, 3,
                                       clock=lambda: clock.t)
    assert times == {"base": [1.0, 1.0, 1.0], "merged": [3.0, 3.0, 3.0]}
    assert calls == ["base", "merged", "base", "merged", "merged", "base", "base", "merged"]  # warm-up first


# ------------------------------------------------------------------------------------------------ the claims
def test_benchmark_claims_ids_verdicts_and_notes():
    result = {"raw": [_raw("toy"), _raw("big", step_ratios=(1.20, 1.22, 1.21, 1.19))], "rows": [_row("toy")]}
    claims = overhead.benchmark_claims(result, time_bound=6.0, mem_bound=4.2, merged_tol=3.0, **KW)
    assert [c.claim_id for c in claims] == ["T7.toy.r8.step_time", "T7.toy.r8.memory", "T7.toy.r8.merged_inference",
                                            "T7.big.r8.step_time", "T7.big.r8.memory", "T7.big.r8.merged_inference"]
    step, mem, merged, big_step, big_mem, _ = claims
    assert step.claim == "StructLoRA's training step is at most 6% slower than LoRA's (toy, r=8, interleaved benchmark)"
    est = overhead.log_ci(np.log([1.01, 1.02, 1.015, 1.005]))
    assert step.verdict == "reproduced" and step.ours_value == pytest.approx(6.0 - est["pct"]) and step.n == 4
    assert step.note == ("CPU; per-round ratios over 4 rounds, sketch-refresh steps excluded; amortized with "
                         "refreshes 1.050x; load-independent counts: FLOPs 1.010x, aten op calls 1.50x")
    assert mem.verdict == "reproduced" and mem.ours_value == pytest.approx(4.2 - 2.0) and mem.n == 1
    assert mem.note.endswith("at a sketch-refresh step +3.00%") and mem.paper_value == "≤ +4.2% (Table 7: 17.5 vs 16.8 GB)"
    assert merged.verdict == "inconclusive" and merged.paper_value == "1.00x (Sec. 3.5, E.7)"
    assert merged.claim.endswith("(1.00x, within 3%) (toy, r=8)")
    assert merged.note == "merged model is a plain model: True; max |logit diff| merged vs eval 1.0e-06"
    # no summary row for "big": the step claim is still decided (and fails the bound), memory is not measured
    assert big_step.verdict == "not reproduced" and big_step.note == "CPU"
    assert big_mem.verdict == "skipped" and big_mem.note == "CPU"
    no_counts = overhead.benchmark_claims({"raw": [_raw()], "rows": [{k: v for k, v in _row().items()
                                                                      if k != "flops_x"}]},
                                          time_bound=6.0, mem_bound=4.2, merged_tol=3.0, **KW)
    assert no_counts[0].note.endswith("amortized with refreshes 1.050x")


def test_summary_markdown_counts_and_lines():
    def claim(i, verdict, note=""):
        return Claim(i, "06_overhead", f"claim {i}", "≤ +6%", "overhead +1.0%", 5.0, 4.0, 6.0, 3, "smoke", verdict, note)

    ex = overhead.ExportCheck(exact={"size_bytes": 300, "ranks": {"a": 12}, "max_relative_error": 0.0},
                              compressed={"size_bytes": 100, "ranks": {"a": 8}, "max_relative_error": 1.5e-3},
                              lora_bytes=100, vanilla_diff=0.0, compressed_diff=0.0, merged_diff=0.0, plain=True)
    md = overhead.summary_markdown([claim("a", "reproduced", "why"), claim("b", "not reproduced"),
                                    claim("c", "inconclusive")], ex, 8, "smoke")
    head, body = md.split("\n\n")
    assert head.startswith("**Summary (smoke tier).** 1 of 3 overhead claims reproduced, 1 contradicted")
    assert "3.00x LoRA's when exact (max rank 12) and 1.00x when compressed to r=8 (max relative error 1.5e-03)" in head
    assert body.splitlines() == [
        "- **a** — claim a: paper ≤ +6%; ours overhead +1.0% (n=3) → **reproduced** (why)",
        "- **b** — claim b: paper ≤ +6%; ours overhead +1.0% (n=3) → **not reproduced**",
        "- **c** — claim c: paper ≤ +6%; ours overhead +1.0% (n=3) → **inconclusive**"]
