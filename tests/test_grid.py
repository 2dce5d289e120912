"""structlora.repro.grid with toy loaders: records, resumption, corrupt records, skips, errors, parallel runs."""
from __future__ import annotations

import hashlib
import json
import os
import time

import pytest
import torch

import dist_train
from dist_train import CALLS
from structlora.repro import grid
from structlora.repro.grid import RunSpec, load_records, read_record, record_path, run, run_grid


pytestmark = pytest.mark.usefixtures("one_thread", "toy_loaders")


def _spec(method: str = "lora", **kw) -> RunSpec:
    """A toy run of a few steps (< 1 s)."""
    base = dict(rank=2, max_steps=6, eval_every=3, lr=1e-2, batch_size=16, max_length=16)
    return RunSpec.make("toy-seq", "toy-bert", method, **{**base, **kw})


# ------------------------------------------------------------------------------------------ spec
def test_runspec_make_key_and_round_trip():
    s = RunSpec.make("sst2", "minilm", "structlora", seed=1, lam=0.1, graph="adjacency", layers=[1, 2])
    assert s.method_kwargs == (("graph", "adjacency"), ("lam", 0.1), ("layers", (1, 2)))
    assert s.method_kwargs_dict() == {"graph": "adjacency", "lam": 0.1, "layers": [1, 2]}
    assert hash(s) == hash(RunSpec.make("sst2", "minilm", "structlora", layers=[1, 2], graph="adjacency",
                                        lam=0.1, seed=1))
    assert s.key() == RunSpec.from_dict(json.loads(json.dumps(s.to_dict()))).key()
    assert s.key() != RunSpec.make("sst2", "minilm", "structlora", seed=2, lam=0.1, graph="adjacency",
                                   layers=[1, 2]).key()
    # the key is a pure function of the fields: pinned so that an accidental change is noticed
    assert RunSpec("sst2", "minilm", "lora").key() == "sst2-minilm-lora-r8-s0-ea5540c823dc"
    assert RunSpec("a", "b", "lora", protocol=1, lr=1e-3, method_kwargs=(("x", [1, 2]),)).key() == \
        "a-b-lora-r8-s0-398079488557"
    assert RunSpec("a", "b", "lora", fraction=1, lr=1).key() == RunSpec("a", "b", "lora", fraction=1.0, lr=1.0).key()
    with pytest.raises(ValueError, match="rank"):
        RunSpec("sst2", "minilm", "lora", rank=0)
    with pytest.raises(TypeError, match="dict"):
        RunSpec.make("sst2", "minilm", "lora", pattern={"a": 1})


def test_precision_and_checkpointing_fields_leave_existing_keys_unchanged():
    """``precision`` / ``gradient_checkpointing`` are hashed only away from their defaults: every spec
    keeps the key (and the record's spec dict) it had before the fields existed."""
    from dataclasses import asdict

    from structlora.repro.spec import KEY_DEFAULTS

    base = RunSpec.make("sst2", "minilm", "structlora", seed=1, lam=0.1)
    old = asdict(base)
    for name in KEY_DEFAULTS:
        del old[name]
    digest = hashlib.sha256(json.dumps(old, sort_keys=True, default=str).encode()).hexdigest()[:12]
    assert base.key().endswith(digest) and set(base.to_dict()) == set(old)
    assert RunSpec.make("sst2", "minilm", "structlora", seed=1, lam=0.1, precision="fp32",
                        gradient_checkpointing=False).key() == base.key()
    bf16 = RunSpec.make("sst2", "minilm", "structlora", seed=1, lam=0.1, precision="bf16")
    ckpt = RunSpec.make("sst2", "minilm", "structlora", seed=1, lam=0.1, gradient_checkpointing=True)
    assert len({base.key(), bf16.key(), ckpt.key()}) == 3
    for s in (bf16, ckpt):
        assert RunSpec.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert bf16.train_config().precision == "bf16" and ckpt.train_config().gradient_checkpointing
    with pytest.raises(ValueError, match="precision"):
        RunSpec("sst2", "minilm", "lora", precision="int8")
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        RunSpec("sst2", "minilm", "lora", gradient_checkpointing=1)


# ------------------------------------------------------------------------------------------ grid
def test_grid_resumes_and_recomputes_only_bad_records(tmp_path):
    specs = [_spec(seed=s) for s in range(6)]
    df = run_grid(specs, tmp_path, progress=False)
    assert CALLS["build_method"] == 6
    assert list(df["status"]) == ["ok"] * 6 and list(df["seed"]) == list(range(6))
    assert {"val_accuracy", "test_accuracy", "trainable_params", "wall_time_s", "peak_mem_mb",
            "diag_lora_norm", "skip_reason"} <= set(df.columns)
    before = {s.key(): json.loads(record_path(s, tmp_path).read_text()) for s in specs}

    paths = [record_path(s, tmp_path) for s in specs]
    paths[0].unlink()                                                   # deleted (killed before writing)
    paths[1].write_text("{not json")                                    # corrupt
    paths[2].write_text(paths[2].read_text()[: len(paths[2].read_text()) // 2])  # truncated
    rec = json.loads(paths[3].read_text())
    rec["schema"] = 0                                                   # old schema
    paths[3].write_text(json.dumps(rec))
    paths[4].write_text(paths[5].read_text())                           # another spec's record
    CALLS["build_method"] = 0
    with pytest.warns(UserWarning, match="invalid run record") as caught:
        df2 = run_grid(specs, tmp_path, progress=False)
    assert CALLS["build_method"] == 5                                   # 0-4 recomputed, 5 read back
    assert len([w for w in caught if "invalid run record" in str(w.message)]) == 4
    after = {s.key(): json.loads(record_path(s, tmp_path).read_text()) for s in specs}
    for key in before:                                                  # same seed -> same numbers
        assert after[key]["metrics"] == before[key]["metrics"] and after[key]["history"] == before[key]["history"]
    assert df2[["seed", "test_accuracy"]].equals(df[["seed", "test_accuracy"]])

    CALLS["build_method"] = 0
    run_grid(specs, tmp_path, progress=False)                           # everything finished: no work
    assert CALLS["build_method"] == 0
    assert len(load_records(tmp_path)) == 6 and len(load_records(tmp_path, specs[:2])) == 2


def test_interrupted_run_resumes_from_checkpoint(tmp_path, monkeypatch):
    spec = _spec(max_steps=8, eval_every=3)

    class Killed(RuntimeError):
        pass

    def dying_build(*args, **kwargs):
        handle = dist_train.toy_build_method(*args, **kwargs)

        def on_step(step, total):
            if step == 5:
                raise Killed
        handle.on_step = on_step
        return handle

    monkeypatch.setitem(grid.LOADERS, "build_method", dying_build)
    with pytest.raises(Killed):
        run(spec, tmp_path, progress=False)
    assert not record_path(spec, tmp_path).exists()
    assert (tmp_path / f"{spec.key()}.ckpt" / "state.pt").exists()
    monkeypatch.setitem(grid.LOADERS, "build_method", dist_train.toy_build_method)
    rec = run(spec, tmp_path, progress=False)
    assert rec["status"] == "ok" and rec["resumed_from"] == 3
    assert not (tmp_path / f"{spec.key()}.ckpt").exists()
    fresh = run(spec, tmp_path / "fresh", progress=False)
    assert fresh["resumed_from"] is None
    assert rec["metrics"] == fresh["metrics"] and rec["history"] == fresh["history"]


def test_skipped_method_is_recorded_with_reason(tmp_path):
    specs = [_spec(method="skipme"), _spec()]
    df = run_grid(specs, tmp_path, progress=False)
    row = df[df["method"] == "skipme"].iloc[0]
    assert row["status"] == "skipped" and "hardware" in row["skip_reason"]
    rec = read_record(record_path(specs[0], tmp_path), specs[0])
    assert rec["status"] == "skipped" and rec["metrics"] == {"validation": {}, "test": {}}
    CALLS["build_method"] = 0
    run_grid(specs, tmp_path, progress=False)                           # a skip is a finished run
    assert CALLS["build_method"] == 0


def test_record_contents_and_determinism(tmp_path):
    spec = _spec(seed=3)
    a = run(spec, tmp_path / "a", progress=False)
    b = run(spec, tmp_path / "b", progress=False)
    assert a["metrics"] == b["metrics"] and a["history"] == b["history"] and a["best_step"] == b["best_step"]
    assert grid.RECORD_KEYS <= set(a) and a["schema"] == grid.SCHEMA and a["key"] == spec.key()
    assert a["spec"] == spec.to_dict() and a["versions"]["torch"] and a["finished_at"]
    assert 0 < a["trainable_params"] < a["total_params"] and a["diagnostics"]["lora_norm"] > 0
    c = run(_spec(seed=4), tmp_path / "a", progress=False)
    assert c["history"] != a["history"]
    # the manipulation check's fingerprint: same run, same predictions; its hash is in the frame too
    assert a["test_predictions_sha256"] and a["test_predictions_sha256"] == b["test_predictions_sha256"]
    assert "test_predictions_sha256" in grid.records_to_frame([a, c]).columns
    # force recomputes; keep_model hands back the trained model
    CALLS["build_method"] = 0
    out = run(spec, tmp_path / "a", progress=False, keep_model=True)
    assert CALLS["build_method"] == 1 and out.record["metrics"] == a["metrics"] and out.handle is not None
    assert out.task.name == "toy-seq" and "train" in out.encoded


def test_calibration_batches_for_sensitivity_lora(tmp_path):
    rec = run(_spec(method="sensitivity_lora"), tmp_path, progress=False)  # toy builder asserts 4 batches
    assert rec["status"] == "ok"


def test_configuration_errors_come_before_training(tmp_path):
    with pytest.raises(ValueError, match="unknown method 'nope'"):
        run(_spec(method="nope"), tmp_path, progress=False)
    assert CALLS["load_task"] == CALLS["load_model"] == 0
    with pytest.raises(ValueError, match="task/model mismatch|needs a 'image-cls' model"):
        run(RunSpec.make("toy-img", "toy-bert", "lora", max_steps=2), tmp_path, progress=False)
    assert CALLS["build_method"] == 0 and not list(tmp_path.glob("*.json"))
    with pytest.raises(RuntimeError, match="failed:.*unknown toy model"):
        run_grid([_spec(), RunSpec.make("toy-seq", "bert-xl", "lora")], tmp_path, progress=False)
    assert CALLS["build_method"] == 1


@pytest.mark.slow
def test_parallel_grid_matches_sequential(tmp_path):
    """n_jobs=2: spawned workers (each imports torch/transformers: ~10 s idle, more on a busy machine)."""
    specs = [_spec(seed=s) for s in range(2)]
    seq = run_grid(specs, tmp_path / "seq", progress=False)
    par = run_grid(specs, tmp_path / "par", n_jobs=2, progress=False)
    assert list(par["key"]) == list(seq["key"])
    assert list(par["status"]) == ["ok", "ok"]
    assert par["val_accuracy"].tolist() == pytest.approx(seq["val_accuracy"].tolist(), abs=0.07)


def test_retrain_recomputes_records_older_than_the_job_once(tmp_path):
    """``reproduce --retrain`` passes its start time to the notebooks (``RETRAIN_SINCE`` ->
    ``run_grid(retrain_since=...)``): older records are trained again, a record written after it
    (another notebook's shared run) is read back."""
    from structlora.repro.grid import RunMode

    spec = _spec(seed=7)
    run(spec, tmp_path, progress=False)
    old = time.time() - 100
    os.utime(record_path(spec, tmp_path), (old, old))
    assert not RunMode().stale(record_path(spec, tmp_path))
    since = time.time()
    assert RunMode(retrain_since=since).stale(record_path(spec, tmp_path))
    CALLS["build_method"] = 0
    run_grid([spec], tmp_path, progress=False, retrain_since=since)
    assert CALLS["build_method"] == 1                               # trained again, once
    assert not RunMode(retrain_since=since).stale(record_path(spec, tmp_path))
    run_grid([spec], tmp_path, progress=False, retrain_since=since)
    assert CALLS["build_method"] == 1                               # the new record is read back
    with pytest.raises(ValueError, match="cannot retrain"):
        RunMode(train=False, retrain_since=since)


def test_records_carry_a_convergence_flag_and_a_prediction_fingerprint(tmp_path):
    from structlora.repro.grid import converged

    assert converged({"best_step": 50, "history": [{"step": 50}, {"step": 100}]}) is True
    assert converged({"best_step": 100, "history": [{"step": 50}, {"step": 100}]}) is False
    assert converged({"best_step": None, "history": []}) is None


# ------------------------------------------------------------------------------- trained models, records only
def _structlora_builder(name, loaded, rank=8, seed=0, total_steps=None, **kwargs):
    """A toy StructLoRA (gates closing half the directions, hybrid graph): buffers that must travel."""
    from structlora import StructLoraConfig, get_structlora_model

    CALLS["build_method"] += 1
    torch.manual_seed(seed)
    cfg = StructLoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["query", "value"], task_type="SEQ_CLS",
                           gate="concrete", graph="hybrid", gate_warmup_steps=1, target_keep_ratio=0.5,
                           target_ramp_steps=2, sim_batches=1, structlora_seed=seed)
    sm = get_structlora_model(loaded.model, cfg)
    return dist_train.toy_handle(sm, name=name, extra_loss=sm.structlora_loss)


def _eval_logits(trained):
    from structlora.repro.engine import collate

    batch = collate("seq-cls", trained.encoded["validation"][:16])
    batch.pop("labels")
    trained.handle.model.eval()
    with torch.no_grad():
        return trained.handle.model(**batch).logits


@pytest.mark.parametrize("builder", ["peft-lora", "structlora"])
def test_train_spec_keeps_the_trained_model_and_rebuilds_it_without_training(tmp_path, monkeypatch, builder):
    if builder == "structlora":
        monkeypatch.setitem(grid.LOADERS, "build_method", _structlora_builder)
    spec = _spec(seed=1, max_steps=8, eval_every=4)
    first = grid.train_spec(spec, tmp_path, progress=False)
    assert grid.weights_path(spec, tmp_path).is_file()
    CALLS["build_method"] = 0
    back = grid.train_spec(spec, tmp_path, progress=False)
    assert CALLS["build_method"] == 1 and back.record == read_record(record_path(spec, tmp_path), spec)
    assert torch.equal(_eval_logits(first), _eval_logits(back))      # the same model, not a retrained one
    if builder == "structlora":
        sm = back.handle.model
        assert int(sm.structlora_step) == int(first.handle.model.structlora_step) > 0
    # weights of another training (a record rewritten since) are refused, and the run trains again
    rec = json.loads(record_path(spec, tmp_path).read_text())
    rec["finished_at"] = "2000-01-01T00:00:00+00:00"
    record_path(spec, tmp_path).write_text(json.dumps(rec))
    CALLS["build_method"] = 0
    with pytest.warns(UserWarning, match="not of the record"):
        grid.train_spec(spec, tmp_path, progress=False)
    assert CALLS["build_method"] == 1


def test_records_only_mode_trains_nothing_and_lists_the_pending_runs(tmp_path, monkeypatch):
    """Records-only is an explicit mode (``train=False``, the pending list as ``pending_file``), no
    environment variable or global: nothing trains, the runs come back pending (as data: the frame's
    rows), and an attempt to train in that mode raises ``TrainingForbidden``."""
    from structlora.repro import engine

    done, missing, probed = _spec(seed=0), _spec(seed=1), _spec(seed=2)
    run(done, tmp_path, progress=False)
    pending_file = tmp_path / "pending.jsonl"

    def no_training(*args, **kwargs):
        raise AssertionError("the engine was asked to train in records-only mode")

    monkeypatch.setattr(engine, "train", no_training)   # the engine the runner calls
    CALLS["build_method"] = 0
    ro = {"train": False, "pending_file": pending_file}
    df = run_grid([done, missing], tmp_path, progress=False, **ro)
    assert list(df["status"]) == ["ok", "pending"] and CALLS["build_method"] == 0
    assert grid.pending_count(df) == 1
    assert run(missing, tmp_path, progress=False, **ro)["status"] == "pending"
    out = grid.train_spec(probed, tmp_path, progress=False, **ro)
    assert out.handle is None and out.record["status"] == "pending" and CALLS["build_method"] == 0
    assert not record_path(missing, tmp_path).exists() and not record_path(probed, tmp_path).exists()
    lines = [json.loads(x) for x in pending_file.read_text().splitlines()]
    assert [RunSpec.from_dict(x["spec"]) for x in lines] == [missing, missing, probed]
    assert [x["weights"] for x in lines] == [False, False, True]
    assert "pending" not in grid.STATUSES     # never a record status
    # training directly in that mode raises, before anything is loaded or built
    with pytest.raises(grid.TrainingForbidden, match="records-only"):
        grid.train_run(missing, tmp_path, progress=False, mode=grid.RunMode(train=False))
    with pytest.raises(grid.TrainingForbidden):
        grid.train_run(missing, None, mode=grid.RunMode(train=False))
    assert CALLS["build_method"] == 0 and not record_path(missing, tmp_path).exists()
    # without a pending file nothing is written anywhere; a second records-only grid rewrites no byte
    before = {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    df2 = run_grid([done, missing, probed], tmp_path, progress=False, train=False)
    assert list(df2["status"]) == ["ok", "pending", "pending"]
    assert {p: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before
    # claims made from such a frame say they are partial; one with nothing to test is pending, not skipped
    from structlora.repro.claims import claim_from_test

    c = claim_from_test("T2.x", "nb", "cpu", "beats LoRA", None, 1.5, note="arms not run",
                        pending=grid.pending_count(df2))
    assert c.verdict == "pending" and c.note.startswith("partial: 2 run(s)")
    c = claim_from_test("T2.x", "nb", "cpu", "beats LoRA", None, 1.5, note="arms not run")
    assert c.verdict == "skipped" and c.note == "arms not run"


def test_a_record_written_under_other_method_defaults_is_not_served(tmp_path, monkeypatch):
    """Changing a method's registry defaults (e.g. StructLoRA's keep ratio) must retrain its runs: the
    key holds only the spec, so the record carries the defaults it was trained under."""
    spec = _spec(seed=5)
    rec = run(spec, tmp_path, progress=False)
    assert rec["method_defaults"] == {}                      # peft LoRA: nothing beyond the spec
    monkeypatch.setitem(grid.LOADERS, "method_defaults", lambda name: {"target_keep_ratio": 0.5})
    with pytest.warns(UserWarning, match="other defaults"):
        assert read_record(record_path(spec, tmp_path), spec) is None
    CALLS["build_method"] = 0
    assert run(spec, tmp_path, progress=False)["method_defaults"] == {"target_keep_ratio": 0.5}
    assert CALLS["build_method"] == 1
    # the registry's own defaults: StructLoRA's gated variants close half their directions
    from structlora.repro.methods import method_defaults

    assert method_defaults("structlora")["target_keep_ratio"] == 0.5 and method_defaults("lora") == {}
    assert method_defaults("qlora+structlora") == method_defaults("structlora")


def test_records_name_the_commit_of_the_checkout():
    import subprocess
    from pathlib import Path

    root = Path(grid.__file__).resolve().parents[2]
    if not (root / ".git").exists():
        pytest.skip("not a git checkout")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True).stdout.strip()
    from structlora.repro import records

    assert records._git_commit() == head


def _pid_state(pid: int) -> str | None:
    """The process state letter of ``pid`` from /proc (R, S, D, Z, ...), or None when there is no such process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return None


def _pid_runs(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie or a reaped pid does not run)."""
    if not os.path.exists("/proc/self/stat"):   # no procfs: fall back to signal 0
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return _pid_state(pid) not in (None, "Z", "X")


def test_stop_pool_terminates_a_busy_worker():
    """Leaving run_grid on Ctrl-C / SIGTERM must not leave workers training (they used to run on)."""
    import concurrent.futures as cf
    import multiprocessing

    from structlora.repro.grid import stop_pool

    pool = cf.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
    busy = pool.submit(time.sleep, 120)
    queued = [pool.submit(time.sleep, 120) for _ in range(3)]  # one of them sits in the call queue
    deadline = time.monotonic() + 60
    while not busy.running() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert busy.running()
    procs = list(pool._processes.values())
    t0 = time.monotonic()
    stop_pool(pool)
    assert time.monotonic() - t0 < 20
    # Ask the OS, not ``Process.is_alive``: the executor's own thread may reap a worker first, and then
    # ``is_alive`` polls a pid that is gone (ECHILD) and keeps answering True. A SIGKILLed worker can
    # also take a moment to die on a loaded machine, hence the deadline.
    assert procs
    deadline = time.monotonic() + 30
    while any(_pid_runs(p.pid) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(_pid_runs(p.pid) for p in procs), [(p.pid, _pid_state(p.pid)) for p in procs]
    deadline = time.monotonic() + 30   # each is cancelled, or fails with BrokenProcessPool
    while not all(f.done() for f in queued) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(f.cancelled() or f.exception() is not None for f in queued)


def test_sigterm_interrupts_turns_sigterm_into_keyboard_interrupt():
    import signal

    from structlora.repro.reproduce import sigterm_interrupts

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt):
        with sigterm_interrupts():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(10)
    assert signal.getsignal(signal.SIGTERM) is before


# ------------------------------------------------------------------- backbone and evidence (issue 20)
def test_a_record_trained_on_other_backbone_weights_is_not_served(tmp_path, monkeypatch):
    """Re-pretraining a backbone must not serve records trained on the old weights: the record names its
    backbone and read_record refuses another, naming both."""
    spec = _spec(seed=6)
    monkeypatch.setitem(grid.LOADERS, "backbone_id", lambda name: "sha256:old")
    assert run(spec, tmp_path, progress=False)["backbone"] == "sha256:old"
    assert read_record(record_path(spec, tmp_path), spec) is not None
    monkeypatch.setitem(grid.LOADERS, "backbone_id", lambda name: "sha256:new")
    with pytest.warns(UserWarning, match="'sha256:old'.*'sha256:new'"):
        assert read_record(record_path(spec, tmp_path), spec) is None
    rec = json.loads(record_path(spec, tmp_path).read_text())
    del rec["backbone"]                                     # a record that does not name its weights
    record_path(spec, tmp_path).write_text(json.dumps(rec))
    with pytest.warns(UserWarning, match="backbone None"):
        assert read_record(record_path(spec, tmp_path), spec) is None


@pytest.mark.parametrize("builder", ["peft-lora", "structlora"])
def test_records_keep_predictions_spectra_and_layer_cosines(tmp_path, monkeypatch, builder):
    """Every record keeps the per-example test predictions (they hash to the fingerprint), the exact
    singular values of each module's final update and the layer-by-layer cosine matrix per family,
    equal to a dense SVD / dense cosines of the merged-style updates."""
    import hashlib

    from structlora.diagnostics import factors_by_family
    from structlora.repro.evidence import decode_predictions

    if builder == "structlora":
        monkeypatch.setitem(grid.LOADERS, "build_method", _structlora_builder)
    spec = _spec(seed=2, max_steps=8, eval_every=4)
    trained = grid.train_spec(spec, tmp_path, progress=False)
    rec = json.loads(record_path(spec, tmp_path).read_text())
    preds = decode_predictions(rec["test_predictions"])
    assert len(preds) == len(trained.encoded["test"]) and set(preds) <= {0, 1}
    assert hashlib.sha256(json.dumps(preds).encode()).hexdigest() == rec["test_predictions_sha256"]
    trained.handle.model.eval()
    fams = factors_by_family(trained.handle.model)
    assert sorted(rec["update_cosines"]) == sorted(fams)
    for key, members in fams.items():
        dense = [(b.double() @ a.double()).flatten() for _, (b, a) in members]   # dW_l, d*k
        assert len(rec["update_cosines"][key]) == len(members) >= 2
        for i, wi in enumerate(dense):
            for j, wj in enumerate(dense):
                cos = float(wi @ wj / (wi.norm() * wj.norm()))
                assert abs(rec["update_cosines"][key][i][j] - cos) < 1e-5
        for (name, (b, a)) in members:
            s = torch.linalg.svdvals(b.double() @ a.double())[: b.shape[1]]
            assert torch.allclose(torch.tensor(rec["update_spectra"][name], dtype=torch.float64), s,
                                  rtol=1e-5, atol=1e-9)


def test_prediction_encoding_round_trips():
    from structlora.repro.evidence import decode_predictions, encode_predictions

    assert encode_predictions([0, 3, 9, 1]) == "0391" and decode_predictions("0391") == [0, 3, 9, 1]
    assert encode_predictions([0, 12]) == [0, 12] and decode_predictions([0, 12]) == [0, 12]
    assert encode_predictions([0.5, 1.0]) == [0.5, 1.0]       # regression outputs stay numbers
    assert encode_predictions(None) is None and decode_predictions(None) is None


def test_every_committed_record_loads_with_its_key(monkeypatch):
    """Every committed record (results/runs, results/pilot) is valid under the current registry and
    backbones and sits under the key its spec still hashes to: refactors never orphan a record."""
    from pathlib import Path

    from structlora.repro import loaders

    for name in grid.LOADERS:                          # the real loaders, not the toy ones of this module
        monkeypatch.setitem(grid.LOADERS, name, getattr(loaders, f"_{name}"))
    root = Path(__file__).resolve().parents[1] / "results"
    paths = sorted(p for d in ("runs", "pilot") for p in (root / d).rglob("*.json")
                   if ".removal-" not in p.name)              # the analyses kept beside a record
    assert len(paths) > 100
    for path in paths:
        record = json.loads(path.read_text())
        spec = RunSpec.from_dict(record["spec"])
        assert path.stem == spec.key() == record["key"], path
        assert set(spec.to_dict()) - set(record["spec"]) <= {"protocol"}, path   # new fields at defaults add nothing
        assert read_record(path, spec) is not None, path
