"""Overhead of StructLoRA vs peft LoRA (paper Table 7): step time, training memory, merged inference, adapter size.

The measurement module of notebook 06 (`structlora.repro.overhead.run_benchmark` calls `main`), also run
from the command line by the thin ``benchmarks/overhead.py``. The models and variants it runs are
`bench_variants`, the memory count `bench_memory`; the rest stays one module (over 400 lines) because
the four measurements share one interleaving loop per (model, rank), `bench_one`. Its pass rule is
Table 7's own bounds (`table7_bounds`, `TARGETS`), the same numbers notebook 06's claims use.

In ONE process, for each model and LoRA rank r, four training variants are built on deep copies of the
same base model:

    lora   peft.get_peft_model(model, LoraConfig(r, 2r, ...))             (the reference, 1.00x)
    gate   StructLoRA Stage 1 only   (gate="concrete", graph=None)
    coord  StructLoRA Stage 2 only   (gate=None,       graph="hybrid")
    both   full StructLoRA           (gate="concrete", graph="hybrid")

and measured side by side on one fixed synthetic batch (random token ids):

* step time: one AdamW step = forward + (StructLoRA) extra loss + backward + step + zero_grad. After a
  warm-up, the variants are run round-robin (interleaved) for N rounds so that machine load drifts hit
  all of them alike; we report the median wall time per variant (IQR, min, max alongside), its ratio to
  LoRA's median, and the same ratio on process CPU time. Steps in which the coordinator captures its
  gradient sketch (the first `sim_batches` + 1 steps of every `sim_refresh_every`) are excluded from the
  median and measured in a separate interleaved "refresh" phase; the "amortized" ratio folds them back in
  at their real frequency (sim_batches + 1 steps out of every sim_refresh_every).
* training memory: on CPU there is no allocator peak counter, so we count, for one (non-refresh) step,
  the bytes that a training step holds at its peak: parameters (all, frozen included) + gradients +
  AdamW state + every tensor autograd saves for backward during the forward (found with
  `torch.autograd.graph.saved_tensors_hooks`, deduplicated by storage, parameters excluded). Refresh
  steps additionally hold the (L, d, p) sketch buffer and one (tokens, p) projection per layer; that is
  reported as the refresh-step memory. On CUDA, `torch.cuda.max_memory_allocated` is used instead
  (peak during the step minus memory allocated before it, plus this variant's resident parameters and
  optimizer state).
* merged inference: every variant is merged (`merge_and_unload`) and its eval forward is timed,
  interleaved, against the untouched base model; the merged model must be a plain model (same class, no
  LoRA module, same parameter count) and its logits must equal the adapter model's eval logits.
* exported adapter size: `adapter_model.safetensors` of peft's `save_pretrained` vs StructLoRA's exact
  export (a coordinated module exports at rank up to (deg+1) r: the smoother mixes neighbouring layers
  from the first step) and its `compress_rank=r` re-factorisation (max relative error).

Usage (``python -m structlora.repro.bench`` is the same command):
    .venv/bin/python benchmarks/overhead.py                 # minilm-l6, smollm2-135m, wide; r in {2, 8, 32}
    .venv/bin/python benchmarks/overhead.py --quick         # minilm-l6, r=8, few rounds (< 2 min)
    .venv/bin/python benchmarks/overhead.py --models wide --ranks 8 --rounds 20 --profile

Writes --out (JSON: environment, settings, raw per-step times, summary rows, targets) and the summary
rows as CSV next to it. Timings on a 2-core CPU are noisy: read the IQR columns before the ratios.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import gc
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

import pandas as pd
from tqdm.auto import tqdm

from .bench_memory import refresh_extra_bytes, training_memory
from .bench_variants import (MODEL_SPECS, VARIANTS, Bench, build_variant, count_step, ensure_normal_step,
                             refresh_position, sync_device, timed_step, train_step)
from .layout import repo_root
from .paper import TABLE7

__all__ = ["TARGETS", "MERGED_TOLERANCE", "table7_bounds", "stats", "paired_ratio", "is_plain", "safetensors_size",
           "eval_logits", "interleaved_eval", "bench_one", "profile_step", "targets_report", "write_outputs",
           "parse_args", "main"]


def table7_bounds(table: dict[str, dict[str, float]] = TABLE7) -> tuple[float, float, float]:
    """Table 7's bounds (``paper.TABLE7``): StructLoRA's step-time and peak-memory overhead over LoRA in %
    (rounded to 0.1: +6.0%, +4.2%) and its extra peak memory in GB (0.7)."""
    s, lora = table["structlora"], table["lora"]
    return (round(100 * (s["time_per_epoch_rel"] / lora["time_per_epoch_rel"] - 1), 1),
            round(100 * (s["peak_mem_gb"] / lora["peak_mem_gb"] - 1), 1), s["peak_mem_gb"] - lora["peak_mem_gb"])


_TIME_PCT, _MEM_PCT, _ = table7_bounds()
TARGETS = {  # paper Table 7 (LLaMA-7B, r=8): 1.06x time, 17.5 / 16.8 GB = +4.2% peak memory
    "step_time": 1 + _TIME_PCT / 100,
    "memory": 1 + _MEM_PCT / 100,
    "merged_inference": 1.00,
    "adapter_size": 1.00,
}
MERGED_TOLERANCE = 0.03  # merged-inference ratio within 1.00 +- this counts as 1.00x (timing noise)


# ---------------------------------------------------------------------------------------------- helpers
def stats(xs: list[float]) -> dict[str, float]:
    if not xs:
        return {"median": float("nan"), "q1": float("nan"), "q3": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "q1": q[0], "q3": q[2], "min": min(xs), "max": max(xs), "n": len(xs)}


def paired_ratio(num: dict[int, float] | list[float], den: dict[int, float] | list[float]) -> float:
    """Median over rounds of num_i / den_i, both timed in the same round (robust to slow load drifts)."""
    if isinstance(num, list):
        num, den = dict(enumerate(num)), dict(enumerate(den))
    common = sorted(set(num) & set(den))
    return statistics.median([num[i] / den[i] for i in common]) if common else float("nan")


def is_plain(merged: nn.Module, base: nn.Module) -> bool:
    no_lora = not any("lora_" in n for n, _ in merged.named_modules())
    same_params = sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in base.parameters())
    return type(merged) is type(base) and no_lora and same_params


def safetensors_size(directory: Path) -> int:
    return (directory / "adapter_model.safetensors").stat().st_size


def eval_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits.float()


def interleaved_eval(models: dict[str, nn.Module], batch: dict[str, torch.Tensor], rounds: int, device: torch.device,
                     desc: str) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {k: [] for k in models}
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    for m in models.values():
        m.eval()
        eval_logits(m, inputs)  # warm-up
    for i in tqdm(range(rounds), desc=desc, leave=False, file=sys.stderr):
        order = list(models.items())
        if i % 2:
            order.reverse()  # alternate order so no variant always runs right after the same one
        for k, m in order:
            with torch.no_grad():
                sync_device(device)
                t0 = time.perf_counter()
                m(**inputs)
                sync_device(device)
                times[k].append(time.perf_counter() - t0)
    return times


# ---------------------------------------------------------------------------------------------- one (model, rank)
def bench_one(bench: Bench, r: int, args: argparse.Namespace, device: torch.device, run: dict[str, Any]) -> list[dict[str, Any]]:
    base = bench.model.to(device).eval()
    batch = bench.make_batch(seed=r, device=device)
    variants = {name: build_variant(name, base, bench, r, device) for name in VARIANTS}
    for v in variants.values():
        v.model.train()
    raw: dict[str, Any] = {"model": bench.name, "r": r}

    # 1. warm-up, then interleaved timing (round-robin; order alternates every round)
    total = (args.warmup + bench.rounds) * len(variants)
    bar = tqdm(total=total, desc=f"{bench.name} r={r} train", leave=False, file=sys.stderr)
    for i in range(args.warmup + bench.rounds):
        order = list(variants.values())
        if i % 2:
            order.reverse()
        for v in order:
            if i >= args.warmup:
                ensure_normal_step(v)  # time normal steps only (refresh steps are timed in section 3)
            wall, cpu, step = timed_step(v, batch, device)
            pos = refresh_position(v, step)
            v.all_steps.append({"round": i, "step": step, "wall_s": wall, "cpu_s": cpu, "refresh_pos": pos, "warmup": i < args.warmup})
            if i >= args.warmup and pos < 0:
                v.times.append(wall)
                v.cpu_times.append(cpu)
                v.round_times[i] = wall
            bar.update(1)
    bar.close()

    # 2. training memory (a normal, non-refresh step for every variant)
    for v in variants.values():
        ensure_normal_step(v)
    mem = {name: training_memory(v, batch, device) for name, v in variants.items()}
    counts = {name: count_step(v, batch) for name, v in variants.items()}
    for name, v in variants.items():
        mem[name]["refresh_extra_bytes"] = refresh_extra_bytes(v, bench)

    # 3. refresh phase: coordinated variants run their whole sketch window, interleaved with LoRA steps
    coords = [v for v in variants.values() if v.refresh_window]
    lora_refresh: list[float] = []
    if coords and args.refresh_rounds > 0:
        lora = variants["lora"]
        for k in tqdm(range(args.refresh_rounds), desc=f"{bench.name} r={r} refresh", leave=False, file=sys.stderr):
            for v in coords:
                every = int(v.model.structlora_config.sim_refresh_every)
                v.model.structlora_step.fill_(every * (k + 2))
            for pos in range(max(v.refresh_window for v in coords)):
                for v in coords + [lora]:
                    wall, cpu, step = timed_step(v, batch, device)
                    if v.structlora:
                        got = refresh_position(v, step)
                        v.refresh_times.setdefault(got, []).append(wall)
                    else:
                        lora_refresh.append(wall)  # LoRA reference steps taken at the same time
        for v in coords:  # put the counters back on a normal step
            every = int(v.model.structlora_config.sim_refresh_every)
            v.model.structlora_step.fill_(every * (args.refresh_rounds + 2) + v.refresh_window)

    # 4. exported adapter sizes (after the timed training, so the coordinator has mixed)
    export: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        lora_dir = Path(tmp) / "lora"
        variants["lora"].model.save_pretrained(str(lora_dir))
        export["lora"] = {"size_bytes": safetensors_size(lora_dir), "max_rank": r, "mean_rank": float(r)}
        for name, v in variants.items():
            if not v.structlora:
                continue
            summary = v.model.save_pretrained(str(Path(tmp) / name))
            ranks = list(summary["ranks"].values())
            mix = [f.coord.summary()["mix_dev"] for f in v.model.families if f.coord is not None]
            export[name] = {"size_bytes": int(summary["size_bytes"]), "max_rank": max(ranks), "mean_rank": sum(ranks) / len(ranks),
                            "max_mix_dev": max(mix) if mix else 0.0}   # ||M - I||_F of the coordinator
            if v.model.structlora_config.graph is not None:
                comp = v.model.save_pretrained(str(Path(tmp) / f"{name}-c"), compress_rank=r)
                export[name].update(compressed_size_bytes=int(comp["size_bytes"]), compressed_max_rel_error=float(comp["max_relative_error"]))

    # 5. inference: unmerged eval (informative), then merge and compare with the untouched base
    unmerged_times = interleaved_eval({n: v.model for n, v in variants.items()}, batch, args.infer_rounds, device,
                                      f"{bench.name} r={r} eval (unmerged)")
    inputs = {k: t for k, t in batch.items() if k != "labels"}
    before = {n: eval_logits(v.model, inputs) for n, v in variants.items()}
    merged = {n: v.model.merge_and_unload().eval() for n, v in variants.items()}
    logit_diff = {n: float((eval_logits(m, inputs) - before[n]).abs().max()) for n, m in merged.items()}
    plain = {n: is_plain(m, base) for n, m in merged.items()}
    control = copy.deepcopy(base)  # identical compute to `base`: its ratio is the timing noise floor
    timed = {n: merged[n] for n in ("lora", "both")}  # all merged variants are plain models; time LoRA's and the full one
    merged_times = interleaved_eval({"base": base, "base-copy": control, **timed}, batch, args.infer_rounds, device, f"{bench.name} r={r} eval (merged)")

    # 6. summary rows
    ref = stats(variants["lora"].times)["median"]
    ref_cpu = stats(variants["lora"].cpu_times)["median"]
    ref_mem = mem["lora"]["total_bytes"]
    base_inf = stats(merged_times["base"])["median"]
    rows = []
    for name, v in variants.items():
        s, c = stats(v.times), stats(v.cpu_times)
        step_x = s["median"] / ref
        amort_x, refresh_x = step_x, float("nan")
        if v.refresh_window and lora_refresh:
            # each refresh-window step relative to LoRA steps taken in the same (refresh) phase
            every = int(v.model.structlora_config.sim_refresh_every)
            lref = statistics.median(lora_refresh)
            ratios = [statistics.median(v.refresh_times[p]) / lref if v.refresh_times.get(p) else step_x for p in range(v.refresh_window)]
            refresh_x = statistics.median(ratios)
            amort_x = (sum(ratios) + (every - v.refresh_window) * step_x) / every
        mt = stats(merged_times.get(name, []))
        row = {
            "model": bench.name, "r": r, "variant": name,
            "step_ms": 1e3 * s["median"], "step_ms_q1": 1e3 * s["q1"], "step_ms_q3": 1e3 * s["q3"],
            "step_ms_min": 1e3 * s["min"], "step_ms_max": 1e3 * s["max"], "steps_timed": s["n"],
            "step_x": step_x, "step_x_cpu": c["median"] / ref_cpu, "step_x_amortized": amort_x, "refresh_step_x": refresh_x,
            "step_x_min": s["min"] / stats(variants["lora"].times)["min"],
            "refresh_step_ms": (1e3 * statistics.median([t for ts in v.refresh_times.values() for t in ts])
                                if v.refresh_times else float("nan")),
            "flops_x": counts[name]["flops"] / counts["lora"]["flops"], "op_calls_x": counts[name]["op_calls"] / counts["lora"]["op_calls"],
            "gflops_step": counts[name]["flops"] / 1e9, "op_calls_step": counts[name]["op_calls"],
            "mem_mb": mem[name]["total_bytes"] / 2**20, "mem_x": mem[name]["total_bytes"] / ref_mem,
            "mem_extra_mb": (mem[name]["total_bytes"] - ref_mem) / 2**20,
            "saved_act_mb": mem[name]["saved_activation_bytes"] / 2**20,
            "mem_x_refresh": (mem[name]["total_bytes"] + mem[name]["refresh_extra_bytes"]) / ref_mem,
            "eval_unmerged_x": paired_ratio(unmerged_times[name], unmerged_times["lora"]),
            "step_x_paired": paired_ratio(v.round_times, variants["lora"].round_times),
            "merged_ms": 1e3 * mt["median"], "merged_x": paired_ratio(merged_times.get(name, []), merged_times["base"]),
            "merged_x_control": paired_ratio(merged_times["base-copy"], merged_times["base"]), "merged_plain": plain[name],
            "merged_max_abs_logit_diff": logit_diff[name],
            "adapter_bytes": export[name]["size_bytes"], "adapter_x": export[name]["size_bytes"] / export["lora"]["size_bytes"],
            "adapter_max_rank": export[name]["max_rank"],
            "adapter_x_compressed": (export[name]["compressed_size_bytes"] / export["lora"]["size_bytes"]
                                     if "compressed_size_bytes" in export[name] else export[name]["size_bytes"] / export["lora"]["size_bytes"]),
            "compressed_max_rel_error": export[name].get("compressed_max_rel_error", 0.0),
        }
        rows.append(row)
    raw.update(
        steps={n: v.all_steps for n, v in variants.items()},
        lora_refresh_phase_steps_wall_s=lora_refresh,
        refresh_steps_wall_s={n: {str(k): t for k, t in v.refresh_times.items()} for n, v in variants.items() if v.refresh_times},
        memory=mem, counts=counts, export=export, unmerged_eval_s=unmerged_times, merged_eval_s=merged_times,
        base_eval_ms=1e3 * base_inf, merged_plain=plain, merged_max_abs_logit_diff=logit_diff,
    )
    run["raw"].append(raw)
    del variants, merged, control
    gc.collect()
    return rows


# ---------------------------------------------------------------------------------------------- profile
def profile_step(bench: Bench, r: int, device: torch.device, steps: int = 5, top: int = 15) -> dict[str, Any]:
    """Where does full StructLoRA spend extra time vs LoRA? Per-phase CPU time, op counts, torch.profiler.

    Phases (process CPU time, median over `steps` interleaved steps): forward, structlora_loss, backward,
    optimizer step + zero_grad. Then one torch.profiler pass per variant: self CPU time and call count
    per op, and the ops whose time differs most.
    """
    from torch.profiler import ProfilerActivity, profile

    base = bench.model.to(device).eval()
    batch = bench.make_batch(seed=r, device=device)
    vs = {name: build_variant(name, base, bench, r, device) for name in ("lora", "both")}
    phases: dict[str, dict[str, list[float]]] = {n: {"forward": [], "structlora_loss": [], "backward": [], "optimizer": []} for n in vs}
    for v in vs.values():
        v.model.train()
        if v.structlora:
            v.model.structlora_step.fill_(10)  # normal (non-refresh) steps
        for _ in range(2):
            train_step(v, batch)
    clock = time.process_time if device.type == "cpu" else time.perf_counter
    for _ in range(steps):
        for n, v in vs.items():
            sync_device(device); t0 = clock()
            loss = v.model(**batch).loss
            sync_device(device); t1 = clock()
            if v.structlora:
                loss = loss + v.model.structlora_loss()
            sync_device(device); t2 = clock()
            loss.backward()
            sync_device(device); t3 = clock()
            v.opt.step(); v.opt.zero_grad(set_to_none=True)
            sync_device(device); t4 = clock()
            for k, (a, b) in zip(phases[n], ((t0, t1), (t1, t2), (t2, t3), (t3, t4))):
                phases[n][k].append(1e3 * (b - a))
    phase_ms = {n: {k: statistics.median(x) for k, x in ph.items()} for n, ph in phases.items()}
    out: dict[str, Any] = {"phase_ms": phase_ms, "clock": clock.__name__}
    tables, counts = {}, {}
    for name, v in vs.items():
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            for _ in range(steps):
                train_step(v, batch)
        ka = prof.key_averages()
        tables[name] = {e.key: e.self_cpu_time_total / steps / 1e3 for e in ka}  # ms per step
        counts[name] = {e.key: e.count / steps for e in ka}
        out[f"{name}_table"] = ka.table(sort_by="self_cpu_time_total", row_limit=top)
    keys = set(tables["lora"]) | set(tables["both"])
    diff = sorted(((k, tables["both"].get(k, 0.0) - tables["lora"].get(k, 0.0), tables["lora"].get(k, 0.0), tables["both"].get(k, 0.0),
                    counts["lora"].get(k, 0.0), counts["both"].get(k, 0.0)) for k in keys), key=lambda t: -abs(t[1]))
    out["total_self_cpu_ms"] = {n: sum(t.values()) for n, t in tables.items()}
    out["op_calls_per_step"] = {n: sum(c.values()) for n, c in counts.items()}
    out["diff_ms_per_step"] = [{"op": k, "delta_ms": d, "lora_ms": a, "both_ms": b, "lora_calls": ca, "both_calls": cb}
                               for k, d, a, b, ca, cb in diff[:top]]
    del vs
    gc.collect()
    return out


# ---------------------------------------------------------------------------------------------- targets
def targets_report(df: pd.DataFrame) -> list[dict[str, Any]]:
    """One line per target, judged on full StructLoRA ('both') over every model and rank measured."""
    full = df[df.variant == "both"]
    out = []

    def worst(col: str):
        i = full[col].idxmax()
        return float(full.loc[i, col]), f"{full.loc[i, 'model']} r={full.loc[i, 'r']}"

    def at_r8(col: str) -> str:
        sub = full[full.r == 8]
        return ", ".join(f"{m} {x:.3f}x" for m, x in zip(sub.model, sub[col])) or "-"

    val, where = worst("step_x")
    amort, awhere = worst("step_x_amortized")
    paired, pwhere = worst("step_x_paired")
    cpu, cwhere = worst("step_x_cpu")
    out.append({"target": f"step time <= {TARGETS['step_time']:.2f}x LoRA (paper Table 7)", "met": val <= TARGETS["step_time"] and amort <= TARGETS["step_time"],
                "measured": f"worst ratio of medians {val:.3f}x ({where}); amortized with sketch refreshes {amort:.3f}x ({awhere}); "
                            f"paired per-round {paired:.3f}x ({pwhere}); CPU time {cpu:.3f}x ({cwhere}); r=8: {at_r8('step_x')}"})
    val, where = worst("mem_x")
    rval, rwhere = worst("mem_x_refresh")
    out.append({"target": f"training memory <= +{_MEM_PCT}% (paper Table 7)", "met": val <= TARGETS["memory"],
                "measured": f"worst {100 * (val - 1):+.2f}% ({where}); at a sketch-refresh step {100 * (rval - 1):+.2f}% ({rwhere}); r=8: {at_r8('mem_x')}"})
    dev = (full["merged_x"] - 1).abs()
    band = full["merged_x_control"].sub(1).abs().clip(lower=MERGED_TOLERANCE)  # noise floor: base-copy vs base
    i = dev.idxmax()
    plain = bool(full["merged_plain"].all())
    diff = float(full["merged_max_abs_logit_diff"].max())
    within = bool((dev <= band).all())
    out.append({"target": "merged inference 1.00x base", "met": plain and diff <= 1e-4 and within,
                "measured": f"ratios {full['merged_x'].min():.3f}x..{full['merged_x'].max():.3f}x, worst {full.loc[i, 'merged_x']:.3f}x "
                            f"({full.loc[i, 'model']} r={full.loc[i, 'r']}; noise band there +-{band[i]:.3f} = max({MERGED_TOLERANCE}, "
                            f"|base-copy/base - 1|)); merged model is a plain model (same class, no LoRA module, same #params): {plain}; "
                            f"max |logits(merged) - logits(eval, unmerged)| = {diff:.2e}"})
    val, where = worst("adapter_x")
    cval, cwhere = worst("adapter_x_compressed")
    err = float(full["compressed_max_rel_error"].max())
    out.append({"target": "exported adapter no larger than LoRA's", "met": val <= TARGETS["adapter_size"],
                "measured": f"exact export up to {val:.2f}x ({where}, rank up to {int(full['adapter_max_rank'].max())}); "
                            f"with compress_rank=r up to {cval:.2f}x ({cwhere}), max relative error {err:.2e}"})
    return out


# ---------------------------------------------------------------------------------------------- main
def write_outputs(run: dict[str, Any], rows: list[dict[str, Any]], out: Path, started: float, final: bool) -> pd.DataFrame:
    df = pd.DataFrame(rows)
    run["rows"] = rows
    run["complete"] = final
    run["targets"] = targets_report(df)
    run["environment"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    run["elapsed_s"] = time.time() - started
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(run, indent=1, default=str))
    df.to_csv(out.with_suffix(".csv"), index=False)
    return df


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="minilm-l6,smollm2-135m,wide", help=f"comma list of {sorted(MODEL_SPECS)}")
    p.add_argument("--ranks", default="2,8,32", help="comma list of LoRA ranks")
    p.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default per model: minilm 12, smollm2 6, wide 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps per variant")
    p.add_argument("--refresh-rounds", type=int, default=2, help="rounds of the coordinator's sketch-refresh window timed separately")
    p.add_argument("--infer-rounds", type=int, default=None, help="interleaved eval-forward rounds (default: max(4, rounds // 2))")
    p.add_argument("--batch-size", type=int, default=None, help="override every model's batch size")
    p.add_argument("--seq-len", type=int, default=None, help="override every model's sequence length")
    p.add_argument("--quick", action="store_true", help="minilm-l6, r=8, batch 16 x 32, few rounds (< 2 min)")
    p.add_argument("--profile", action="store_true", help="also profile one step of LoRA vs StructLoRA (first model, r=8 or first rank)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch.set_num_threads (default: torch's own default; 1 is far more stable on an oversubscribed machine)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=str(repo_root() / "results" / "overhead.json"), help="JSON output; the CSV is written next to it")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.ranks = "minilm-l6", "8"
        args.rounds = args.rounds or 6
        args.warmup = min(args.warmup, 2)
        args.refresh_rounds = min(args.refresh_rounds, 1)
        args.batch_size = args.batch_size or 16
        args.seq_len = args.seq_len or 32
    return args


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    ranks = [int(x) for x in args.ranks.split(",") if x.strip()]
    unknown = [m for m in models if m not in MODEL_SPECS]
    if unknown:
        raise SystemExit(f"unknown model(s) {unknown}; choose from {sorted(MODEL_SPECS)}")
    started = time.time()
    run: dict[str, Any] = {
        "date": _dt.datetime.now().isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "environment": {
            "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
            "device": str(device), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
        "settings": {k: v for k, v in vars(args).items()},
        "what_is_measured": {
            "step_x": "median wall time of one AdamW training step (fwd + structlora_loss + bwd + step + zero_grad), interleaved round-robin, / LoRA's median; sketch-refresh steps excluded",
            "step_x_cpu": "same on process CPU time (less sensitive to other processes on the machine)",
            "flops_x": "FLOPs of one training step (torch.utils.flop_counter, matmul-type ops) / LoRA's: load-independent compute overhead",
            "op_calls_x": "aten op calls in one training step (forward, backward, optimizer) / LoRA's: load-independent dispatch overhead",
            "step_x_amortized": "median normal step folded with the measured sketch-refresh steps at their real frequency (sim_batches+1 of every sim_refresh_every)",
            "mem_x": ("cuda: resident params + optimizer state + peak allocated during one step" if device.type == "cuda" else
                      "bytes of params (all) + grads + AdamW state + tensors saved for backward in one forward (saved_tensors_hooks, deduplicated by storage), / LoRA's"),
            "mem_x_refresh": "mem_x plus the sketch buffers held during a sketch-refresh step",
            "step_x_paired": "median over rounds of (variant step / LoRA step in the same round)",
            "merged_x": "median over rounds of (eval forward (no_grad) of the merged model / the untouched base model in the same round), interleaved",
            "merged_x_control": "same for a deep copy of the base model (identical compute): the timing noise floor",
            "eval_unmerged_x": "median over rounds of eval forward before merging / peft LoRA's (unmerged) eval forward",
            "adapter_x": "adapter_model.safetensors bytes of the exact export / peft LoRA's (classifier head included in both)",
            "adapter_x_compressed": "same with save_pretrained(compress_rank=r)",
        },
        "raw": [], "skipped": {},
    }
    print(f"structlora overhead benchmark: {run['environment']['cpu_count']} CPU cores, torch threads {torch.get_num_threads()}, "
          f"device {device}, load average {run['environment']['loadavg_start']}")
    if device.type == "cpu":
        print("note: CPU timings on a small shared machine are noisy; compare medians with their IQR (step_ms_q1..q3 in the CSV).")
    rows: list[dict[str, Any]] = []
    profile_done = False
    for name in models:
        loader, (bsz, seq), rounds = MODEL_SPECS[name]
        batch_shape = (args.batch_size or bsz, args.seq_len or seq)
        bench = loader(batch_shape, args.rounds or rounds)
        if isinstance(bench, str):
            print(f"[skip] {name}: {bench}")
            run["skipped"][name] = bench
            continue
        print(f"[{name}] {bench.note}; targets {bench.target_modules}; batch {bench.batch_size} x {bench.seq_len}; "
              f"{bench.rounds} rounds x {len(VARIANTS)} variants after {args.warmup} warm-up steps")
        for r in ranks:
            infer_rounds = args.infer_rounds or max(4, bench.rounds // 2)
            ns = argparse.Namespace(**{**vars(args), "infer_rounds": infer_rounds})
            t0 = time.time()
            new = bench_one(bench, r, ns, device, run)
            rows.extend(new)
            write_outputs(run, rows, Path(args.out), started, final=False)  # partial results survive an interrupted run
            ref = new[0]
            print(f"  r={r:<3d} lora step {ref['step_ms']:.0f} ms (IQR {ref['step_ms_q1']:.0f}-{ref['step_ms_q3']:.0f}); "
                  + "; ".join(f"{x['variant']} {x['step_x']:.3f}x" for x in new[1:]) + f"  [{time.time() - t0:.0f} s]")
        if args.profile and not profile_done:
            pr = ranks[ranks.index(8)] if 8 in ranks else ranks[0]
            prof = profile_step(bench, pr, device)
            run["profile"] = {"model": name, "r": pr, **prof}
            print(f"\n[profile] {name} r={pr}, {prof['clock']} per phase (median ms/step):")
            for n, ph in prof["phase_ms"].items():
                print(f"    {n:<5s} " + "  ".join(f"{k} {x:8.1f}" for k, x in ph.items()) + f"  total {sum(ph.values()):8.1f}")
            print(f"  torch.profiler: self CPU ms/step lora {prof['total_self_cpu_ms']['lora']:.1f}, both {prof['total_self_cpu_ms']['both']:.1f}; "
                  f"op calls/step lora {prof['op_calls_per_step']['lora']:.0f}, both {prof['op_calls_per_step']['both']:.0f}; "
                  "largest differences (both - lora):")
            for d in prof["diff_ms_per_step"]:
                print(f"    {d['op'][:48]:<48s} {d['delta_ms']:+9.2f} ms  (lora {d['lora_ms']:8.2f} ms x{d['lora_calls']:.0f}, "
                      f"both {d['both_ms']:8.2f} ms x{d['both_calls']:.0f})")
            profile_done = True
        del bench
        gc.collect()
    if not rows:
        print("nothing measured")
        return 1

    df = write_outputs(run, rows, Path(args.out), started, final=True)
    out = Path(args.out)

    table = df.set_index(["model", "r", "variant"])[
        ["step_ms", "step_x", "step_x_paired", "step_x_cpu", "step_x_amortized", "flops_x", "op_calls_x", "mem_mb", "mem_x", "mem_x_refresh", "eval_unmerged_x",
         "merged_x", "merged_x_control", "merged_max_abs_logit_diff", "adapter_x", "adapter_max_rank", "adapter_x_compressed", "compressed_max_rel_error"]]
    table = table.rename(columns={"step_x_paired": "step×paired", "step_x": "step×", "step_x_cpu": "step×cpu", "step_x_amortized": "step×amort", "flops_x": "flops×", "op_calls_x": "ops×", "mem_x": "mem×",
                                  "mem_x_refresh": "mem×refresh", "eval_unmerged_x": "eval×(unmerged)", "merged_x": "merged×base", "merged_x_control": "ctrl×base",
                                  "merged_max_abs_logit_diff": "|Δlogits|", "adapter_x": "adapter×", "adapter_max_rank": "rank",
                                  "adapter_x_compressed": "adapter×(compress r)", "compressed_max_rel_error": "compress err"})
    with pd.option_context("display.width", 250, "display.max_columns", 30, "display.float_format", "{:.3f}".format):
        print("\nratios to peft LoRA (merged× is to the untouched base model):")
        print(table.to_string(float_format=lambda x: f"{x:.3g}" if abs(x) < 1e-2 and x != 0 else f"{x:.3f}"))
    print(f"\nload average start {run['environment']['loadavg_start']}, end {run['environment']['loadavg_end']}; "
          f"elapsed {run['elapsed_s']:.0f} s; wrote {out} and {out.with_suffix('.csv')}")
    print("\ntargets (judged on full StructLoRA = 'both', over every model and rank measured):")
    for t in run["targets"]:
        print(f"  [{'met' if t['met'] else 'NOT met'}] {t['target']}: {t['measured']}")
    for name, why in run["skipped"].items():
        print(f"  (skipped {name}: {why})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
