"""structlora.repro.engine: learning, determinism, best-checkpoint selection, MC scoring, resume, 2 processes."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from dist_train import (dist_setup, toy_bert, toy_handle, toy_image_data, toy_llama, toy_mc_data, toy_seq_data,
                        toy_vit)
from structlora.repro.engine import (TrainConfig, batch_indices, collate, evaluate, load_trainable_state,
                               score_choices, train, trainable_state)

HERE = Path(__file__).resolve().parent


pytestmark = pytest.mark.usefixtures("one_thread")


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


@pytest.fixture(scope="module")
def seq():
    return toy_seq_data()


# ------------------------------------------------------------------------------------------ learning
def test_seq_cls_learns_and_beats_chance(seq):
    task, enc = seq
    handle = toy_handle(toy_bert())
    before = evaluate(handle.model, task, enc["validation"])["accuracy"]
    res = train(handle, task, enc, TrainConfig(lr=2e-2, batch_size=16, max_steps=100, eval_every=25),
                progress=False)
    assert [h["step"] for h in res.history] == [25, 50, 75, 100]
    assert res.history[-1]["loss"] < res.history[0]["loss"] - 0.15
    assert res.val_metrics["accuracy"] >= 0.8 > before + 0.15
    assert res.test_metrics["accuracy"] >= 0.75
    assert res.val_metrics["accuracy"] == max(h["val_accuracy"] for h in res.history)
    assert res.steps_per_s > 0 and res.wall_time_s > 0 and res.peak_mem_mb > 0 and res.peak_mem_kind


def test_same_seed_same_numbers(seq):
    task, enc = seq
    cfg = TrainConfig(lr=1e-2, batch_size=16, max_steps=10, eval_every=5, seed=3)
    runs = []
    for _ in range(2):
        handle = toy_handle(toy_bert(seed=1))
        res = train(handle, task, enc, cfg, progress=False)
        runs.append((res, _params(handle.model)))
    (r1, p1), (r2, p2) = runs
    assert r1.history == r2.history and r1.val_metrics == r2.val_metrics and r1.test_metrics == r2.test_metrics
    _assert_same_params(p1, p2)
    # a different seed changes the data order and the dropout masks
    handle = toy_handle(toy_bert(seed=1))
    r3 = train(handle, task, enc, TrainConfig(lr=1e-2, batch_size=16, max_steps=10, eval_every=5, seed=4),
               progress=False)
    assert r3.history[0]["loss"] != r1.history[0]["loss"]


def test_grad_accum_matches_full_batch(seq):
    """Micro-batches weighted by their share of the batch give the full-batch gradient."""
    task, enc = seq
    out = []
    for accum in (1, 2):
        model = toy_bert(seed=0, dropout=0.0)  # no dropout: both runs compute the same function
        handle = toy_handle(model)
        train(handle, task, enc, TrainConfig(lr=1e-2, batch_size=16, max_steps=3, eval_every=0, grad_accum=accum),
              progress=False)
        out.append(_params(model))
    for name in out[0]:
        torch.testing.assert_close(out[0][name], out[1][name], rtol=1e-4, atol=1e-6)


def test_grad_accum_counts_structlora_steps_in_optimizer_steps(seq):
    """With grad_accum > 1 the engine attaches the optimizer, so StructLoRA's schedules count optimizer
    steps (3), not micro-batches (6); with grad_accum = 1 the two coincide."""
    from structlora import StructLoraConfig, get_structlora_model

    task, enc = seq
    for accum in (1, 2):
        torch.manual_seed(0)
        sm = get_structlora_model(toy_bert(seed=0, lora=False, dropout=0.0), StructLoraConfig(
            r=2, lora_alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS", gate="concrete",
            graph="adjacency", target_keep_ratio=None))
        train(toy_handle(sm, extra_loss=sm.structlora_loss), task, enc,
              TrainConfig(lr=1e-2, batch_size=16, max_steps=3, eval_every=0, grad_accum=accum), progress=False)
        assert int(sm.structlora_step) == 3, (accum, int(sm.structlora_step))


def test_image_cls_path():
    task, enc = toy_image_data()
    handle = toy_handle(toy_vit())
    res = train(handle, task, enc, TrainConfig(lr=1e-2, batch_size=16, max_steps=20, eval_every=10),
                progress=False)
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert res.test_metrics["accuracy"] > 0.6


# ------------------------------------------------------------------------------------------ best checkpoint
def test_test_metrics_come_from_best_validation_step(seq):
    """Scripted validation scores peak at step 4: the final model and the test numbers are step 4's."""
    task, enc = seq
    scripted = iter([0.5, 0.9, 0.6])
    real = task.compute_metrics
    calls = {"n": 0}

    def compute_metrics(preds, refs):
        calls["n"] += 1
        return {"accuracy": next(scripted)} if calls["n"] <= 3 else real(preds, refs)

    task = type(task)(**{**task.__dict__})
    task.compute_metrics = compute_metrics  # type: ignore[method-assign]
    snapshots = {}
    handle = toy_handle(toy_bert())
    handle.on_step = lambda step, total: snapshots.__setitem__(step, _params(handle.model))
    res = train(handle, task, enc, TrainConfig(lr=2e-2, batch_size=16, max_steps=6, eval_every=2), progress=False)
    assert res.best_step == 4 and res.val_metrics == {"accuracy": 0.9}
    assert [h["val_accuracy"] for h in res.history] == [0.5, 0.9, 0.6]
    _assert_same_params(_params(handle.model), snapshots[4])
    assert any(not torch.equal(snapshots[4][n], snapshots[6][n]) for n in snapshots[4])
    assert res.test_metrics == real(*_predictions(handle.model, enc["test"]))


def _predictions(model, ds):
    batch = collate("seq-cls", ds[:], 0)
    labels = batch.pop("labels")
    model.eval()
    with torch.no_grad():
        preds = model(**batch).logits.argmax(-1)
    return preds.numpy(), labels.numpy()


# ------------------------------------------------------------------------------------------ multiple choice
def _hand_scores(model, ids_per_example, starts_per_example):
    """sum_t log softmax(logits[t-1])[x_t] over the continuation, one unpadded sequence at a time."""
    model.eval()
    out = []
    with torch.no_grad():
        for opts, starts in zip(ids_per_example, starts_per_example):
            row = []
            for seq, start in zip(opts, starts):
                logits = model(input_ids=torch.tensor([seq])).logits[0].double()
                lp = torch.log_softmax(logits, -1)
                row.append(sum(lp[t - 1, seq[t]].item() for t in range(start, len(seq))))
            out.append(np.array(row))
    return out


def test_mc_scores_equal_hand_computation():
    task, enc = toy_mc_data(n_train=4, n_eval=12)
    model = toy_llama(seed=2)
    ds = enc["validation"]
    scores = score_choices(model, ds["choice_input_ids"], ds["choice_starts"], batch_size=5)
    hand = _hand_scores(model, ds["choice_input_ids"], ds["choice_starts"])
    for s, h in zip(scores, hand):
        np.testing.assert_allclose(s, h, rtol=1e-5, atol=1e-5)
    metrics = evaluate(model, task, ds, batch_size=4)
    refs = np.array(ds["label"])
    lengths = [np.array([len(seq) - s for seq, s in zip(o, st)]) for o, st in
               zip(ds["choice_input_ids"], ds["choice_starts"])]
    assert metrics["accuracy"] == pytest.approx(np.mean([np.argmax(h) for h in hand] == refs))
    assert metrics["acc_norm"] == pytest.approx(np.mean([np.argmax(h / n) for h, n in zip(hand, lengths)] == refs))


def test_mc_single_token_fast_path_equals_general_path():
    _, enc = toy_mc_data(n_train=4, n_eval=10, single_token=True)
    model = toy_llama(seed=3)
    ds = enc["validation"]
    fast = score_choices(model, ds["choice_input_ids"], ds["choice_starts"], batch_size=4)
    hand = _hand_scores(model, ds["choice_input_ids"], ds["choice_starts"])
    for s, h in zip(fast, hand):
        np.testing.assert_allclose(s, h, rtol=1e-5, atol=1e-5)


def test_mc_sft_training_learns():
    task, enc = toy_mc_data(n_train=64, n_eval=32)
    handle = toy_handle(toy_llama(seed=0))
    res = train(handle, task, enc, TrainConfig(lr=3e-2, batch_size=16, max_steps=40, eval_every=20),
                progress=False)
    assert set(res.val_metrics) >= {"accuracy", "acc_norm"} and set(res.test_metrics) >= {"accuracy", "acc_norm"}
    assert res.history[-1]["loss"] < res.history[0]["loss"]


# ------------------------------------------------------------------------------------------ resume
class _Killed(RuntimeError):
    pass


class _StepCounter:
    """A method controller with checkpointable state (``state_dict``/``load_state_dict``)."""

    def __init__(self, die_at: int | None = None) -> None:
        self.steps, self.die_at = 0, die_at

    def on_step(self, step: int, total: int) -> None:
        self.steps += 1
        if step == self.die_at:
            raise _Killed

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]


def _counting_handle(die_at: int | None = None):
    ctl = _StepCounter(die_at)
    return toy_handle(toy_bert(seed=0), on_step=ctl.on_step, controller=ctl)


def test_resume_after_kill_matches_uninterrupted(seq, tmp_path):
    task, enc = seq
    cfg = TrainConfig(lr=1e-2, batch_size=16, max_steps=10, eval_every=4, seed=5)
    ref_handle = _counting_handle()
    ref = train(ref_handle, task, enc, cfg, progress=False)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(_Killed):
        train(_counting_handle(die_at=7), task, enc, cfg, checkpoint_dir=ckpt, progress=False)
    assert (ckpt / "state.pt").exists()
    handle = _counting_handle()
    res = train(handle, task, enc, cfg, checkpoint_dir=ckpt, progress=False)
    assert res.resumed_from == 4
    assert res.history == ref.history and res.best_step == ref.best_step
    assert res.test_metrics == ref.test_metrics
    _assert_same_params(_params(handle.model), _params(ref_handle.model))
    assert handle.controller.steps == ref_handle.controller.steps == 10   # controller state restored
    # a finished checkpoint resumes straight to the test evaluation; a different config is refused
    again = train(toy_handle(toy_bert(seed=0)), task, enc, cfg, checkpoint_dir=ckpt, progress=False)
    assert again.resumed_from == 10 and again.test_metrics == ref.test_metrics
    with pytest.warns(UserWarning, match=f"discarding checkpoint {ckpt / 'state.pt'}.*different configuration"):
        other = train(toy_handle(toy_bert(seed=0)), task, enc, TrainConfig(lr=2e-2, batch_size=16, max_steps=10,
                      eval_every=4, seed=5), checkpoint_dir=ckpt, progress=False)
    assert other.resumed_from is None                                     # discarded: started afresh


class _DieAt:
    """Wrap a method's ``on_step`` so the run is killed right after optimizer step ``die_at``."""

    def __init__(self, on_step, die_at: int) -> None:
        self.on_step, self.die_at = on_step, die_at

    def __call__(self, step: int, total: int) -> None:
        self.on_step(step, total)
        if step == self.die_at:
            raise _Killed


@pytest.mark.parametrize("method", ["dylora", "lora_dropout", "loraprune", "adalora"])
def test_resume_is_exact_for_methods_with_state(method, seq, tmp_path):
    """The controllers' state (rank sampler, dropout masks, pruning masks + zeroed W0 rows, AdaLoRA
    importance) is checkpointed, so a killed-and-resumed run equals the uninterrupted one."""
    from structlora.repro.methods import build_method
    from structlora.repro.assets.models import LoadedModel

    task, enc = seq
    cfg = TrainConfig(lr=1e-2, batch_size=16, max_steps=10, eval_every=4, seed=5)
    kw = {"sparsity": 0.5} if method == "loraprune" else {}

    def handle():
        model = toy_bert(seed=0, lora=False, dropout=0.0)
        loaded = LoadedModel("toy-bert", "seq-cls", model, None, ["query", "value"], 2,
                             modules_to_save=["classifier"])
        return build_method(method, loaded, rank=4, seed=0, total_steps=cfg.max_steps, **kw)

    ref_handle = handle()
    ref = train(ref_handle, task, enc, cfg, progress=False)
    killed = handle()
    killed.on_step = _DieAt(killed.on_step, die_at=6)
    ckpt = tmp_path / "ckpt"
    with pytest.raises(_Killed):
        train(killed, task, enc, cfg, checkpoint_dir=ckpt, progress=False)
    resumed_handle = handle()
    res = train(resumed_handle, task, enc, cfg, checkpoint_dir=ckpt, progress=False)
    assert res.resumed_from == 4
    assert res.history == ref.history and res.test_metrics == ref.test_metrics
    everything = lambda m: {k: v.detach().clone() for k, v in m.state_dict().items()}  # noqa: E731 (frozen W0 too)
    _assert_same_params(everything(resumed_handle.model), everything(ref_handle.model))


# ------------------------------------------------------------------------------------------ helpers
def test_batches_and_state_helpers():
    a = [batch_indices(10, 4, seed=0, step=s) for s in range(4)]
    assert all(len(b) == 4 for b in a)
    assert len(set(np.concatenate(a[:2]).tolist())) == 8          # no repeat inside an epoch
    assert not np.array_equal(a[0], a[2])                          # a new permutation per epoch
    assert np.array_equal(batch_indices(10, 4, 0, 3), a[3])        # stateless
    assert len(batch_indices(3, 8, 0, 0)) == 3                     # a split smaller than a batch
    model = toy_bert()
    state = trainable_state(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    load_trainable_state(model, state)
    _assert_same_params(_params(model), {k: v for k, v in state.items() if not k.startswith("buffer:")})
    with pytest.raises(ValueError, match="batch_size"):
        TrainConfig(batch_size=0)


def test_collate_pads_dynamically():
    cols = {"input_ids": [[1, 5, 6], [1, 7]], "attention_mask": [[1, 1, 1], [1, 1]], "labels": [0, 1]}
    b = collate("seq-cls", cols, pad_id=0)
    assert b["input_ids"].tolist() == [[1, 5, 6], [1, 7, 0]] and b["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    b = collate("multiple-choice", {"input_ids": [[1, 2], [1, 2, 3]], "labels": [[-100, 2], [-100, -100, 3]]}, 9)
    assert b["labels"].tolist() == [[-100, 2, -100], [-100, -100, 3]] and b["input_ids"][0, 2] == 9
    with pytest.raises(ValueError, match="unknown task kind"):
        collate("regression", cols)


# ------------------------------------------------------------------------------------------ 2 processes
@pytest.mark.dist
def test_two_processes_end_identical(tmp_path):
    """torchrun, 2 CPU processes (gloo): ranks start apart, end with identical parameters and metrics."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(HERE), str(HERE.parent)])}
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(29500 + os.getpid() % 1000),
           str(HERE / "dist_train.py"), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{k}.pt", weights_only=False) for k in (0, 1))
    assert r0["world_size"] == r1["world_size"] == 2
    _assert_same_params(r0["params"], r1["params"])
    assert r0["val"] == r1["val"] and r0["test"] == r1["test"] and r0["history"] == r1["history"]
    # ... and equal (up to float summation order) to one process doing the 4 micro-batches itself
    task, enc, handle, cfg = dist_setup(world=1)
    ref = train(handle, task, enc, cfg, progress=False)
    for name, value in _params(handle.model).items():
        torch.testing.assert_close(r0["params"][name], value, rtol=1e-4, atol=1e-5)
    assert [h["loss"] for h in r0["history"]] == pytest.approx([h["loss"] for h in ref.history], rel=1e-4)
