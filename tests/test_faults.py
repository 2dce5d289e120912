"""Issue 12, "results that cannot lie": divergence, typed specs, whole-run costs, exact resume inside a
similarity-capture window, corrupt/foreign checkpoints, per-run locks, record validation, clean-up.

Every test here failed on the code before the fix (except the fsync pin, kept as a guard).
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time

import pytest
import torch
from filelock import FileLock

import dist_train
from dist_train import CALLS, toy_bert, toy_handle, toy_seq_data
from structlora.repro import grid, runner
from structlora.repro.engine import DivergedError, TrainConfig, train
from structlora.repro.grid import (RunSpec, cost_is_complete, load_records, read_record, record_path, run,
                                   run_grid)


pytestmark = pytest.mark.usefixtures("one_thread", "toy_loaders")


@pytest.fixture(scope="module")
def seq():
    return toy_seq_data(n_train=64, n_eval=32)


def _spec(method: str = "lora", **kw) -> RunSpec:
    base = dict(rank=2, max_steps=6, eval_every=3, lr=1e-2, batch_size=16, max_length=16)
    return RunSpec.make("toy-seq", "toy-bert", method, **{**base, **kw})


class _Killed(RuntimeError):
    pass


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _nan_into_lora_a(model: torch.nn.Module) -> str:
    name, p = next((n, p) for n, p in model.named_parameters() if "lora_A" in n)
    with torch.no_grad():
        p.view(-1)[0] = float("nan")
    return name


# ------------------------------------------------------------------------------------------ 1. divergence
def test_nan_in_a_lora_factor_stops_within_one_step_naming_it(seq):
    task, enc = seq
    handle = toy_handle(toy_bert())
    names = {}
    handle.on_step = lambda step, total: names.setdefault("p", _nan_into_lora_a(handle.model)) if step == 5 else None
    with pytest.raises(DivergedError) as info:
        train(handle, task, enc, TrainConfig(lr=1e-2, batch_size=16, max_steps=10, eval_every=3), progress=False)
    err = info.value
    assert err.step == 5 and err.quantity == "parameter" and err.name == names["p"]
    assert "step 5" in str(err) and names["p"] in str(err) and [h["step"] for h in err.history] == [3]


def test_non_finite_loss_and_gradient_are_named(seq):
    task, enc = seq
    calls = {"n": 0}

    def extra():
        calls["n"] += 1
        return torch.tensor(float("inf") if calls["n"] == 3 else 0.0)

    with pytest.raises(DivergedError, match="step 3: non-finite loss"):
        train(toy_handle(toy_bert(), extra_loss=extra), task, enc, TrainConfig(lr=1e-2, batch_size=16, max_steps=6),
              progress=False)
    model = toy_bert()
    name, p = next((n, p) for n, p in model.named_parameters() if "lora_B" in n)
    p.register_hook(lambda g: g * float("nan"))
    with pytest.raises(DivergedError, match=f"step 1: non-finite gradient of '{name}'"):
        train(toy_handle(model), task, enc, TrainConfig(lr=1e-2, batch_size=16, max_steps=6), progress=False)


def test_diverged_run_gives_a_diverged_record_never_a_result(tmp_path, monkeypatch):
    def nan_build(*args, **kwargs):
        handle = dist_train.toy_build_method(*args, **kwargs)
        if kwargs["seed"] == 1:
            handle.on_step = lambda step, total: _nan_into_lora_a(handle.model) if step == 5 else None
        return handle

    monkeypatch.setitem(grid.LOADERS, "build_method", nan_build)
    bad, good = _spec(seed=1), _spec(seed=2)
    df = run_grid([bad, good], tmp_path, progress=False)               # a divergence does not stop the grid
    assert list(df["status"]) == ["diverged", "ok"]
    rec = read_record(record_path(bad, tmp_path), bad)
    assert rec["status"] == "diverged" and "step 5" in rec["error"] and "lora_A" in rec["error"]
    assert rec["metrics"] == {"validation": {}, "test": {}} and rec["diverged_at_step"] == 5
    assert not (tmp_path / f"{bad.key()}.ckpt").exists()
    assert list(load_records(tmp_path)["key"]) == [good.key()]          # not a claim input
    assert len(load_records(tmp_path, statuses=None)) == 2
    assert not cost_is_complete(rec)
    CALLS["build_method"] = 0
    run_grid([bad, good], tmp_path, progress=False)                     # a finished run: not retrained
    assert CALLS["build_method"] == 0


@pytest.mark.parametrize("field,value", [
    ("lr", float("inf")), ("lr", float("nan")), ("seed", -1), ("eval_every", "10"), ("max_eval_examples", 2.5),
    ("fraction", float("nan")), ("rank", True), ("max_steps", 3.0), ("grad_accum", None),
])
def test_runspec_fields_are_typed_and_finite(field, value):
    with pytest.raises(ValueError, match=f"RunSpec.{field}"):
        RunSpec("sst2", "minilm", "lora", **{field: value})


def test_non_finite_method_kwargs_and_train_config_are_refused():
    with pytest.raises(ValueError, match="method_kwargs\\['lam'\\]"):
        RunSpec.make("sst2", "minilm", "structlora", lam=float("nan"))
    for kw in ({"lr": float("inf")}, {"lr": float("nan")}, {"seed": -1}, {"eval_every": "10"},
               {"max_eval_examples": 2.5}, {"max_grad_norm": float("nan")}, {"weight_decay": float("inf")}):
        with pytest.raises(ValueError, match=f"TrainConfig.{next(iter(kw))}"):
            TrainConfig(**kw)


# ------------------------------------------------------------------------------------------ 3. cost of resumed runs
def test_cost_covers_every_process_of_a_resumed_run(seq, tmp_path):
    """Killed during the TEST evaluation: the resumed process trains nothing, yet the cost is the run's."""
    task, enc = seq
    real = task.compute_metrics
    calls = {"n": 0}

    def dying_metrics(preds, refs):
        calls["n"] += 1
        if calls["n"] == 3:                                             # validation at 3 and 6, then test
            raise _Killed
        return real(preds, refs)

    dying = type(task)(**{**task.__dict__})
    dying.compute_metrics = dying_metrics  # type: ignore[method-assign]
    cfg = TrainConfig(lr=1e-2, batch_size=16, max_steps=6, eval_every=3)
    with pytest.raises(_Killed):
        train(toy_handle(toy_bert()), dying, enc, cfg, checkpoint_dir=tmp_path, progress=False)
    peak_before = torch.load(tmp_path / "state.pt", weights_only=False)["cost"]["peak_mem_mb"]
    res = train(toy_handle(toy_bert()), task, enc, cfg, checkpoint_dir=tmp_path, progress=False)
    assert res.resumed_from == 6 and res.sessions == 2 and res.train_steps == 6 and not res.cost_partial
    assert res.steps_per_s > 0 and res.train_time_s > 0 and res.peak_mem_mb >= peak_before > 0


def test_cost_is_complete_helper(tmp_path, monkeypatch):
    spec = _spec(max_steps=8)

    def dying_build(*args, **kwargs):
        handle = dist_train.toy_build_method(*args, **kwargs)

        def on_step(step, total):
            if step == 5:
                raise _Killed
        handle.on_step = on_step
        return handle

    monkeypatch.setitem(grid.LOADERS, "build_method", dying_build)
    with pytest.raises(_Killed):
        run(spec, tmp_path, progress=False)
    monkeypatch.setitem(grid.LOADERS, "build_method", dist_train.toy_build_method)
    rec = run(spec, tmp_path, progress=False)
    assert rec["resumed_from"] == 3 and rec["sessions"] == 2 and rec["train_steps"] == 8
    assert rec["cost_partial"] is False and cost_is_complete(rec)
    old = {k: v for k, v in rec.items() if k != "cost_partial"}        # a record of the old code
    assert not cost_is_complete(old) and cost_is_complete({**old, "resumed_from": None})
    assert not cost_is_complete({**rec, "cost_partial": True})


# ------------------------------------------------------------------------------------------ 4. capture window
def test_resume_is_exact_inside_a_similarity_capture_window(seq, tmp_path):
    """Captures start at steps 0, 4, ... and last 3 batches: the step-6 checkpoint is inside one."""
    from structlora.repro.assets.models import LoadedModel
    from structlora.repro.methods import build_method

    task, enc = seq
    cfg = TrainConfig(lr=1e-2, batch_size=16, max_steps=7, eval_every=3, seed=1)

    def handle():
        model = toy_bert(seed=0, lora=False, dropout=0.0)
        loaded = LoadedModel("toy-bert", "seq-cls", model, None, ["query", "value"], 2,
                             modules_to_save=["classifier"])
        return build_method("structlora", loaded, rank=4, seed=0, total_steps=cfg.max_steps, graph="similarity",
                            sim_refresh_every=4, sim_batches=3)

    def capture(h):
        return [(f.capturing, f.captured, None if f.sketches is None else f.sketches.clone())
                for f in h.model.families]

    ref_h = handle()
    ref = train(ref_h, task, enc, cfg, progress=False)
    assert any(c for c, _, _ in capture(ref_h))                        # the run ends inside a window
    killed = handle()
    inner = killed.on_step

    def die(step, total):
        if inner is not None:
            inner(step, total)
        if step == 7:
            raise _Killed
    killed.on_step = die
    with pytest.raises(_Killed):
        train(killed, task, enc, cfg, checkpoint_dir=tmp_path, progress=False)
    assert torch.load(tmp_path / "state.pt", weights_only=False)["capture"] is not None
    res_h = handle()
    res = train(res_h, task, enc, cfg, checkpoint_dir=tmp_path, progress=False)
    assert res.resumed_from == 6 and res.history == ref.history and res.test_metrics == ref.test_metrics
    for (c1, n1, s1), (c2, n2, s2) in zip(capture(res_h), capture(ref_h)):
        assert (c1, n1) == (c2, n2)
        assert (s1 is None) == (s2 is None) and (s1 is None or torch.equal(s1, s2))
    everything = lambda m: {k: v.detach().clone() for k, v in m.state_dict().items()}  # noqa: E731
    a, b = everything(res_h.model), everything(ref_h.model)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------ 5. checkpoints
def _kill_after(step_to_die: int):
    def build(*args, **kwargs):
        handle = dist_train.toy_build_method(*args, **kwargs)

        def on_step(step, total):
            if step == step_to_die:
                raise _Killed
        handle.on_step = on_step
        return handle
    return build


@pytest.mark.parametrize("damage", ["empty", "garbage", "truncated"])
def test_corrupt_checkpoint_is_reported_with_its_path_and_discarded(damage, tmp_path, monkeypatch):
    spec = _spec(max_steps=8)
    monkeypatch.setitem(grid.LOADERS, "build_method", _kill_after(5))
    with pytest.raises(_Killed):
        run(spec, tmp_path, progress=False)
    ckpt = tmp_path / f"{spec.key()}.ckpt" / "state.pt"
    data = ckpt.read_bytes()
    ckpt.write_bytes({"empty": b"", "garbage": os.urandom(200), "truncated": data[: len(data) // 2]}[damage])
    monkeypatch.setitem(grid.LOADERS, "build_method", dist_train.toy_build_method)
    with pytest.warns(UserWarning, match=f"discarding checkpoint {ckpt}.*unreadable"):
        rec = run(spec, tmp_path, progress=False)
    fresh = run(spec, tmp_path / "fresh", progress=False)
    assert rec["status"] == "ok" and rec["resumed_from"] is None and rec["history"] == fresh["history"]


def test_foreign_checkpoint_is_not_resumed(tmp_path, monkeypatch):
    """A checkpoint copied from a run with another max_length is refused (tied to the spec key)."""
    other, spec = _spec(max_steps=8, max_length=16), _spec(max_steps=8, max_length=32)
    monkeypatch.setitem(grid.LOADERS, "build_method", _kill_after(5))
    with pytest.raises(_Killed):
        run(other, tmp_path, progress=False)
    shutil.copytree(tmp_path / f"{other.key()}.ckpt", tmp_path / f"{spec.key()}.ckpt")
    monkeypatch.setitem(grid.LOADERS, "build_method", dist_train.toy_build_method)
    with pytest.warns(UserWarning, match="discarding checkpoint .*written by another run"):
        rec = run(spec, tmp_path, progress=False)
    assert rec["resumed_from"] is None


def test_checkpoints_are_fsynced(seq, tmp_path, monkeypatch):
    from structlora import _io

    synced = []
    real = os.fsync
    monkeypatch.setattr(_io.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    task, enc = seq
    train(toy_handle(toy_bert()), task, enc, TrainConfig(lr=1e-2, batch_size=16, max_steps=4, eval_every=2),
          checkpoint_dir=tmp_path, progress=False)
    assert len(synced) == 2                                             # one per checkpoint write


# ------------------------------------------------------------------------------------------ 6. locks
def test_a_run_locked_by_another_process_is_left_to_it(tmp_path):
    """Run A is held by "another process" (a thread holding A's lock): the grid trains B first, then
    waits for A's record instead of training A a second time."""
    a, b = _spec(seed=1), _spec(seed=2)
    lock = FileLock(str(record_path(a, tmp_path)) + ".lock")
    held = threading.Event()
    order = []

    def other_process():
        lock.acquire()
        held.set()
        try:
            deadline = time.time() + 60
            while not record_path(b, tmp_path).exists() and time.time() < deadline:
                time.sleep(0.05)
            order.append("B seen")
            runner.read_or_train(a, tmp_path, False, False, False)     # it trains A under its lock
        finally:
            lock.release()

    t = threading.Thread(target=other_process)
    t.start()
    assert held.wait(30)
    df = run_grid([a, b], tmp_path, progress=False)
    t.join()
    assert order == ["B seen"] and list(df["status"]) == ["ok", "ok"]
    assert CALLS["build_method"] == 2                                   # A once (the other), B once (this grid)


def test_stale_temporaries_and_checkpoints_are_cleaned(tmp_path):
    spec = _spec()
    run(spec, tmp_path, progress=False)
    old = time.time() - 2 * 3600
    tmp = tmp_path / f".{spec.key()}.json.123.abcd1234.tmp"
    tmp.write_text("{")
    young = tmp_path / ".x.json.1.deadbeef.tmp"
    young.write_text("{")
    leftover = tmp_path / f"{spec.key()}.ckpt"                          # killed after the record, before rmtree
    leftover.mkdir()
    (leftover / "state.pt").write_bytes(b"x")
    abandoned = tmp_path / "gone-run-000000000000.ckpt"
    abandoned.mkdir()
    (abandoned / "state.pt").write_bytes(b"x")
    for p in (tmp, abandoned / "state.pt", abandoned):
        os.utime(p, (old, old))
    run_grid([spec], tmp_path, progress=False)
    assert not tmp.exists() and young.exists() and not leftover.exists() and not abandoned.exists()


# ------------------------------------------------------------------------------------------ 7. record contents
@pytest.mark.parametrize("damage,why", [
    (lambda r: r["metrics"].update(test={}), "empty"),
    (lambda r: r["metrics"]["test"].update(accuracy="garbage"), "finite"),
    (lambda r: r["metrics"]["test"].update(accuracy=float("nan")), "finite"),
    (lambda r: r["metrics"]["validation"].update(accuracy=1.5), "outside"),
    (lambda r: r.update(status="skipped"), "skip_reason"),
    (lambda r: r.update(status="bogus"), "unknown status"),
    (lambda r: r["history"][0].update(loss=float("nan")), "loss"),
    (lambda r: r.update(steps_per_s=float("inf")), "steps_per_s"),
])
def test_invalid_record_contents_are_rejected(damage, why, tmp_path):
    spec = _spec()
    path = record_path(spec, tmp_path)
    run(spec, tmp_path, progress=False)
    rec = json.loads(path.read_text())
    damage(rec)
    path.write_text(json.dumps(rec))
    with pytest.warns(UserWarning, match=f"invalid run record.*{why}"):
        assert read_record(path, spec) is None


def test_deeply_nested_record_is_invalid_not_a_crash(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.warns(UserWarning, match="invalid run record.*RecursionError"):
        assert read_record(path) is None


def test_load_records_counts_canonical_names_only(tmp_path):
    spec = _spec()
    run(spec, tmp_path, progress=False)
    shutil.copy(record_path(spec, tmp_path), tmp_path / "backup-copy.json")
    with pytest.warns(UserWarning, match="copy of record"):
        assert len(load_records(tmp_path)) == 1


def test_unknown_model_says_so_with_the_offline_names():
    from structlora.repro.assets.models import list_models, load_model

    start = time.perf_counter()
    with pytest.raises(ValueError, match="unknown model 'nope'") as info:
        load_model("nope")
    assert time.perf_counter() - start < 1.0 and all(n in str(info.value) for n in list_models())
