"""Fault injection for the run harness (issue 12): every fault must end in a record identical to an
uninterrupted run, or in a clearly reported outcome; every bad input must raise an error naming it.

    .venv/bin/python benchmarks/faults.py            # tiny random models, CPU, about a minute

Prints one line per fault / bad input and the totals ``faults injected / survived`` and
``bad inputs / clear errors``; exits 1 unless every fault survived and every error was clear.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

import torch  # noqa: E402

import dist_train  # noqa: E402  (toy models and loaders of the tests)
from structlora.repro import grid  # noqa: E402
from structlora.repro.engine import TrainConfig  # noqa: E402
from structlora.repro.grid import RunSpec, read_record, record_path, run, run_grid  # noqa: E402


class Killed(RuntimeError):
    """Stands for a SIGKILL at a chosen point (the process state is lost, the files stay)."""


def spec(seed: int = 0, **kw: Any) -> RunSpec:
    base = dict(rank=2, max_steps=8, eval_every=3, lr=1e-2, batch_size=16, max_length=16, seed=seed)
    return RunSpec.make("toy-seq", "toy-bert", "lora", **{**base, **kw})


def builder(on_step: Callable[[Any, int], None] | None = None) -> Callable[..., Any]:
    def build(*args: Any, **kwargs: Any) -> Any:
        handle = dist_train.toy_build_method(*args, **kwargs)
        if on_step is not None:
            handle.on_step = lambda step, total: on_step(handle, step)
        return handle
    return build


def die_at(k: int) -> Callable[[Any, int], None]:
    def f(handle: Any, step: int) -> None:
        if step == k:
            raise Killed
    return f


def same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a["status"] == b["status"] == "ok" and a["metrics"] == b["metrics"] and a["history"] == b["history"]


def main() -> int:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    grid.LOADERS.update(dist_train.TOY_LOADERS)
    work = Path(tempfile.mkdtemp(prefix="structlora-faults-"))
    fresh = {s: run(spec(s), work / "fresh", progress=False) for s in range(3)}
    faults: list[tuple[str, bool]] = []

    def fault(name: str, seed: int, inject: Callable[[Path, RunSpec], None],
              check: Callable[[dict[str, Any]], bool] | None = None) -> None:
        folder = work / name
        s = spec(seed)
        grid.LOADERS["build_method"] = dist_train.toy_build_method
        try:
            inject(folder, s)
            grid.LOADERS["build_method"] = dist_train.toy_build_method
            rec = run_grid([s], folder, progress=False).to_dict("records")[0] and read_record(record_path(s, folder), s)
            ok = rec is not None and (check(rec) if check else same(rec, fresh[seed]))
        except Exception as exc:  # an injected fault must never escape
            print(f"    {name}: {type(exc).__name__}: {exc}")
            ok = False
        faults.append((name, ok))
        print(f"  fault {name:<34} {'survived' if ok else 'NOT SURVIVED'}")

    def kill(k: int) -> Callable[[Path, RunSpec], None]:
        def inject(folder: Path, s: RunSpec) -> None:
            grid.LOADERS["build_method"] = builder(die_at(k))
            try:
                run(s, folder, progress=False)
            except Killed:
                pass
        return inject

    def kill_in_test_eval(folder: Path, s: RunSpec) -> None:
        real = grid.LOADERS["load_task"]

        def load_task(*a: Any, **k: Any) -> Any:
            task = real(*a, **k)
            calls = {"n": 0}
            metrics = task.compute_metrics

            def dying(p: Any, r: Any) -> Any:
                calls["n"] += 1
                if calls["n"] == 4:                      # validations at 3, 6, 8, then the test
                    raise Killed
                return metrics(p, r)
            task.compute_metrics = dying
            return task
        grid.LOADERS["load_task"] = load_task
        try:
            run(s, folder, progress=False)
        except Killed:
            pass
        finally:
            grid.LOADERS["load_task"] = real

    def damage_ckpt(how: str) -> Callable[[Path, RunSpec], None]:
        def inject(folder: Path, s: RunSpec) -> None:
            kill(5)(folder, s)
            p = folder / f"{s.key()}.ckpt" / "state.pt"
            data = p.read_bytes()
            p.write_bytes({"empty": b"", "garbage": os.urandom(256), "truncated": data[: len(data) // 2]}[how])
        return inject

    def foreign_ckpt(folder: Path, s: RunSpec) -> None:
        other = spec(s.seed, max_length=32)
        kill(5)(folder, other)
        shutil.copytree(folder / f"{other.key()}.ckpt", folder / f"{s.key()}.ckpt")

    def damage_record(how: str) -> Callable[[Path, RunSpec], None]:
        def inject(folder: Path, s: RunSpec) -> None:
            run(s, folder, progress=False)
            p = record_path(s, folder)
            rec = json.loads(p.read_text())
            if how == "truncated":
                p.write_text(p.read_text()[:100]); return
            if how == "nested":
                p.write_text("[" * 100_000 + "]" * 100_000); return
            if how == "nan-accuracy":
                rec["metrics"]["test"]["accuracy"] = float("nan")
            elif how == "empty-test":
                rec["metrics"]["test"] = {}
            elif how == "status-skipped":
                rec["status"] = "skipped"
            elif how == "foreign":
                rec = json.loads(record_path(spec(s.seed + 1), work / "fresh").read_text())
            p.write_text(json.dumps(rec))
        return inject

    def nan_factor(folder: Path, s: RunSpec) -> None:
        def poison(handle: Any, step: int) -> None:
            if step == 5:
                p = next(p for n, p in handle.model.named_parameters() if "lora_A" in n)
                with torch.no_grad():
                    p.view(-1)[0] = float("nan")
        grid.LOADERS["build_method"] = builder(poison)
        run(s, folder, progress=False)

    def stale_tmp(folder: Path, s: RunSpec) -> None:
        run(s, folder, progress=False)
        t = folder / f".{s.key()}.json.1.deadbeef.tmp"
        t.write_text("{")
        old = time.time() - 7200
        os.utime(t, (old, old))

    print("faults:")
    for k in (2, 3, 4, 7):
        fault(f"kill at step {k}", k % 3, kill(k))
    fault("kill during test evaluation", 1, kill_in_test_eval)
    for how in ("empty", "garbage", "truncated"):
        fault(f"{how} checkpoint", 2, damage_ckpt(how))
    fault("checkpoint of another spec", 0, foreign_ckpt)
    for how in ("truncated", "nested", "nan-accuracy", "empty-test", "status-skipped", "foreign"):
        fault(f"record {how}", 1, damage_record(how))
    fault("NaN in a LoRA factor", 0, nan_factor,
          lambda r: r["status"] == "diverged" and "step 5" in r["error"] and "lora_A" in r["error"])
    fault("stale temporary file", 0, stale_tmp,
          lambda r: not list((work / "stale temporary file").glob(".*.tmp")) and same(r, fresh[0]))

    print("bad inputs:")
    bad: list[tuple[str, bool]] = []
    cases: list[tuple[str, Callable[[], Any], str]] = [
        ("RunSpec(lr=inf)", lambda: RunSpec("t", "m", "lora", lr=float("inf")), "RunSpec.lr"),
        ("RunSpec(lr=nan)", lambda: RunSpec("t", "m", "lora", lr=float("nan")), "RunSpec.lr"),
        ("RunSpec(seed=-1)", lambda: RunSpec("t", "m", "lora", seed=-1), "RunSpec.seed"),
        ("RunSpec(eval_every='10')", lambda: RunSpec("t", "m", "lora", eval_every="10"), "RunSpec.eval_every"),
        ("RunSpec(max_eval_examples=2.5)", lambda: RunSpec("t", "m", "lora", max_eval_examples=2.5),
         "RunSpec.max_eval_examples"),
        ("RunSpec(rank=True)", lambda: RunSpec("t", "m", "lora", rank=True), "RunSpec.rank"),
        ("RunSpec(lam=nan)", lambda: RunSpec.make("t", "m", "lora", lam=float("nan")), "method_kwargs['lam']"),
        ("TrainConfig(lr=inf)", lambda: TrainConfig(lr=float("inf")), "TrainConfig.lr"),
        ("load_model('nope')", lambda: __import__("structlora.repro.assets.models", fromlist=["x"]).load_model("nope"),
         "unknown model 'nope'"),
        ("run_grid unknown method", lambda: run_grid([spec(0).__class__.make("toy-seq", "toy-bert", "nope")],
                                                    work / "bad", progress=False), "unknown method 'nope'"),
    ]
    for name, call, needle in cases:
        try:
            call()
            clear = False
        except Exception as exc:
            clear = needle in str(exc)
        bad.append((name, clear))
        print(f"  bad input {name:<30} {'clear error' if clear else 'UNCLEAR'}")

    shutil.rmtree(work, ignore_errors=True)
    survived, clear = sum(ok for _, ok in faults), sum(ok for _, ok in bad)
    print(f"faults injected / survived: {len(faults)} / {survived}")
    print(f"bad inputs / clear errors: {len(bad)} / {clear}")
    return 0 if survived == len(faults) and clear == len(bad) else 1


if __name__ == "__main__":
    raise SystemExit(main())
