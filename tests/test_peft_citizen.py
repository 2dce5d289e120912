"""StructLoRA behaves like a peft citizen (issue 10): merge/export/forward agree on nn.Linear and GPT-2
Conv1D; the Trainer evaluates, checkpoints, resumes and loads the best model; peft's conventions hold.

One named test pins each defect of the issue:
1. `test_merge_export_and_forward_agree_on_every_layer_type` (+ `test_structlora_uses_the_config_peft_corrected`)
2. `test_trainer_evaluate_reports_eval_loss_and_metrics`
3. `test_trainer_save_model_writes_an_adapter_and_from_pretrained_resumes`,
   `test_trainer_resume_from_checkpoint_continues_exactly`, `test_trainer_load_best_model_at_end`
4. `test_trainable_parameter_count_includes_gates_and_coordinator`, `test_save_pretrained_takes_peft_keywords`,
   `test_training_mode_follows_the_peft_model_after_loading`
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file

from structlora import StructLoraConfig, StructLoraModel, get_structlora_model
from structlora.layers import group_lora_layers
from toy import randomize_lora, tiny_bert, tiny_gpt2, toy_batch

PLAIN = {"gate": None, "graph": None}
STRUCTURED = {"gate": "concrete", "graph": "hybrid", "gate_warmup_steps": 0}

# (name, base factory, task type, targets, user's fan_in_fan_out)
LAYER_CASES = [
    ("gpt2-lm-c_attn", lambda: tiny_gpt2("lm"), "CAUSAL_LM", ["c_attn"], False),
    ("gpt2-cls-attn.c_proj", lambda: tiny_gpt2("cls"), "SEQ_CLS", ["attn.c_proj"], False),
    ("gpt2-lm-c_proj-user-fifo", lambda: tiny_gpt2("lm"), "CAUSAL_LM", ["c_proj"], True),
    ("bert-query-value", lambda: tiny_bert(layers=3), "SEQ_CLS", ["query", "value"], False),
]


def _trained(make_base, task: str, targets: list[str], fan_in_fan_out: bool, kw: dict) -> StructLoraModel:
    cfg = StructLoraConfig(r=4, lora_alpha=8, target_modules=targets, task_type=task,
                           fan_in_fan_out=fan_in_fan_out, **kw)
    sm = get_structlora_model(make_base(), cfg)
    randomize_lora(sm)  # B != 0 and gains != 0: a trained-ish state
    if sm.gates and next(iter(sm.gates.values())).logits is not None:
        with torch.no_grad():  # open, partly open and closed gates
            for gate in sm.gates.values():
                gate.logits.copy_(torch.linspace(-3, 3, gate.logits.numel()).reshape(gate.logits.shape))
    return sm.eval()


# ---------------------------------------------------------------------- defect 1: merge on every layer type
@pytest.mark.parametrize("kw", [PLAIN, STRUCTURED], ids=["plain", "gate+graph"])
@pytest.mark.parametrize("name,make_base,task,targets,fifo", LAYER_CASES, ids=[c[0] for c in LAYER_CASES])
def test_merge_export_and_forward_agree_on_every_layer_type(tmp_path, name, make_base, task, targets, fifo, kw):
    sm = _trained(make_base, task, targets, fifo, kw)
    ids = toy_batch()["input_ids"]
    with torch.no_grad():
        expected = sm(input_ids=ids).logits
        # the folded export, loaded by vanilla peft on a fresh copy of the base
        sm.save_pretrained(tmp_path / "export")
        vanilla = PeftModel.from_pretrained(make_base(), str(tmp_path / "export")).eval()
        torch.testing.assert_close(vanilla(input_ids=ids).logits, expected, rtol=0, atol=1e-4)
        merged = sm.merge_and_unload()
        assert not any("lora" in type(m).__name__.lower() for m in merged.modules())
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize("make_base,targets,fifo,want", [
    (lambda: tiny_gpt2("lm"), ["attn.c_proj"], False, True),
    (lambda: tiny_gpt2("lm"), ["c_attn"], True, True),
    (lambda: tiny_bert(layers=3), ["query"], True, False),
])
def test_structlora_uses_the_config_peft_corrected(make_base, targets, fifo, want):
    user = StructLoraConfig(r=4, target_modules=targets, fan_in_fan_out=fifo, **PLAIN)
    with pytest.warns(UserWarning, match="fan_in_fan_out") if fifo != want else _no_op():
        sm = get_structlora_model(make_base(), user)
    assert sm.structlora_config.fan_in_fan_out is want
    assert sm.peft_model.peft_config["default"].fan_in_fan_out is want
    assert user.fan_in_fan_out is fifo  # the user's object is not mutated
    groups = group_lora_layers(sm.peft_model)  # Conv1D-wrapping lora.Linear layers are collected, by depth
    assert sum(len(v) for v in groups.values()) == 3 * len(targets)
    assert all(layer.fan_in_fan_out is want for v in groups.values() for _, layer in v)


class _no_op:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# ---------------------------------------------------------------------- Trainer helpers
def _dataset(n: int = 32, seed: int = 0):
    from datasets import Dataset

    batch = toy_batch(n=n, seed=seed)
    return Dataset.from_dict({"input_ids": batch["input_ids"].tolist(), "labels": batch["labels"].tolist()})


def _args(out: Path, **kw):
    from transformers import TrainingArguments

    base = dict(output_dir=str(out), per_device_train_batch_size=8, per_device_eval_batch_size=8, report_to=[],
                learning_rate=1e-2, use_cpu=True, save_strategy="no", logging_strategy="no", seed=0,
                dataloader_num_workers=0, disable_tqdm=True)
    return TrainingArguments(**{**base, **kw})


def _accuracy(pred) -> dict[str, float]:
    return {"accuracy": float((np.argmax(pred.predictions, -1) == pred.label_ids).mean())}


def _make(**kw) -> StructLoraModel:
    cfg = StructLoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"], task_type="SEQ_CLS",
                           **{**STRUCTURED, **kw})
    return get_structlora_model(tiny_bert(layers=3), cfg)


def _trainable(sm: StructLoraModel) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in sm.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------------- defect 2: evaluate
def test_trainer_evaluate_reports_eval_loss_and_metrics(tmp_path):
    from transformers import Trainer

    from structlora.integrations import StructLoraTrainer

    sm = _make(**PLAIN)
    randomize_lora(sm)
    ds = _dataset()
    trainer = StructLoraTrainer(model=sm, args=_args(tmp_path), eval_dataset=ds, compute_metrics=_accuracy)
    assert trainer.label_names == ["labels"]
    metrics = trainer.evaluate()
    assert "eval_loss" in metrics and "eval_accuracy" in metrics, metrics
    # vanilla peft's Trainer on the same weights (plain config = peft LoRA)
    ref = Trainer(model=sm.peft_model, args=_args(tmp_path), eval_dataset=ds, compute_metrics=_accuracy).evaluate()
    assert metrics["eval_loss"] == pytest.approx(ref["eval_loss"], abs=1e-6)
    assert metrics["eval_accuracy"] == ref["eval_accuracy"]


# ---------------------------------------------------------------------- defect 3: save, load, resume
def test_trainer_save_model_writes_an_adapter_and_from_pretrained_resumes(tmp_path):
    from structlora.integrations import StructLoraTrainer

    sm = _make()
    trainer = StructLoraTrainer(model=sm, args=_args(tmp_path / "run", max_steps=3), train_dataset=_dataset())
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    files = set(os.listdir(out))
    assert {"adapter_config.json", "adapter_model.safetensors", "structlora_state.safetensors",
            "structlora_config.json"} <= files and "model.safetensors" not in files
    # the raw trainable factors (peft's own format), not the folded export
    saved = load_file(str(out / "adapter_model.safetensors"))
    raw = get_peft_model_state_dict(sm.peft_model)
    assert saved.keys() == raw.keys()
    for k in raw:
        torch.testing.assert_close(saved[k], raw[k], rtol=0, atol=0)
    state = load_file(str(out / "structlora_state.safetensors"))
    assert int(state["structlora_step"]) == 3 and any(k.startswith("gates.") for k in state)
    assert any(k.endswith("theta") for k in state)

    sm.eval()
    ids = toy_batch()["input_ids"]
    loaded = StructLoraModel.from_pretrained(tiny_bert(layers=3), out, is_trainable=True)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(input_ids=ids).logits, sm(input_ids=ids).logits, rtol=0, atol=1e-6)
    for (k, p), (k2, q) in zip(sm.named_parameters(), loaded.named_parameters()):
        assert k == k2 and p.requires_grad == q.requires_grad and torch.equal(p, q), k
    assert int(loaded.structlora_step) == 3
    # training goes on: gates, gains and factors move
    before = _trainable(loaded)
    StructLoraTrainer(model=loaded.train(), args=_args(tmp_path / "more", max_steps=1), train_dataset=_dataset()).train()
    after = _trainable(loaded)
    for key in ("gates.family0.logits", "coordinators.family0.theta"):
        assert not torch.equal(before[key], after[key]), key
    assert int(loaded.structlora_step) == 4

    # a folded export is refused with a clear error
    sm.save_pretrained(tmp_path / "export")
    with pytest.raises(ValueError, match="PeftModel.from_pretrained"):
        StructLoraModel.from_pretrained(tiny_bert(layers=3), tmp_path / "export")


@pytest.mark.parametrize("at", [4, 1], ids=["epoch-end", "mid-epoch-mid-capture"])
def test_trainer_resume_from_checkpoint_continues_exactly(tmp_path, at):
    """8 uninterrupted steps == ``at`` steps, a checkpoint, then the rest resumed in a fresh process-like
    setup (new model, new Trainer). At step 1 a gradient-similarity sketch is half accumulated."""
    from structlora.integrations import StructLoraTrainer

    ds = _dataset()
    kw = {"sim_threshold": -1.0}  # every similarity edge is added: the refresh at step 2 changes the graph
    full = _make(**kw)
    StructLoraTrainer(model=full, args=_args(tmp_path / "full", max_steps=8), train_dataset=ds).train()
    assert not torch.equal(full.coordinators["family0"].adjacency, full.coordinators["family0"].chain)

    first = _make(**kw)
    StructLoraTrainer(model=first, args=_args(tmp_path / "part", max_steps=8, save_strategy="steps",  # same schedule
                                              save_steps=at), train_dataset=ds).train()
    if at == 1:
        assert "capture.family0.sketches" in load_file(str(tmp_path / "part" / "checkpoint-1" / "structlora_state.safetensors"))
    resumed = _make(**kw)
    StructLoraTrainer(model=resumed, args=_args(tmp_path / "part", max_steps=8), train_dataset=ds).train(
        resume_from_checkpoint=str(tmp_path / "part" / f"checkpoint-{at}"))
    want, got = _trainable(full), _trainable(resumed)
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
    assert int(resumed.structlora_step) == int(full.structlora_step) == 8
    for a, b in zip(full.coordinators.values(), resumed.coordinators.values()):
        assert torch.equal(a.adjacency, b.adjacency)


def test_trainer_load_best_model_at_end(tmp_path):
    from structlora.integrations import StructLoraTrainer

    sm = _make()
    args = _args(tmp_path, max_steps=6, eval_strategy="steps", eval_steps=2, save_strategy="steps", save_steps=2,
                 load_best_model_at_end=True, metric_for_best_model="accuracy", greater_is_better=True)
    trainer = StructLoraTrainer(model=sm, args=args, train_dataset=_dataset(), eval_dataset=_dataset(16, seed=3),
                                compute_metrics=_accuracy)
    trainer.train()
    best = trainer.state.best_model_checkpoint
    assert best is not None and trainer.state.best_metric is not None
    saved = load_file(os.path.join(best, "adapter_model.safetensors"))
    for k, v in get_peft_model_state_dict(sm.peft_model).items():
        assert torch.equal(saved[k], v), k
    state = load_file(os.path.join(best, "structlora_state.safetensors"))
    assert int(sm.structlora_step) == int(state["structlora_step"]) == trainer.state.best_global_step
    assert torch.equal(sm.gates["family0"].logits.detach(), state["gates.family0.logits"])


# ---------------------------------------------------------------------- defect 4: peft conventions
def test_trainable_parameter_count_includes_gates_and_coordinator(capsys):
    sm = _make()
    trainable, total = sm.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for p in sm.parameters() if p.requires_grad)
    assert total == sum(p.numel() for p in sm.parameters())
    assert trainable > sm.peft_model.get_nb_trainable_parameters()[0]  # gates + gains on top of LoRA + head
    sm.print_trainable_parameters()
    assert f"trainable params: {trainable:,d} || all params: {total:,d}" in capsys.readouterr().out


def test_save_pretrained_takes_peft_keywords(tmp_path):
    sm = _make()
    randomize_lora(sm)
    summary = sm.save_pretrained(tmp_path / "a", safe_serialization=True, selected_adapters=["default"])
    assert summary["ranks"] and (tmp_path / "a" / "adapter_model.safetensors").is_file()
    with pytest.raises(ValueError, match="safe_serialization"):
        sm.save_pretrained(tmp_path / "b", safe_serialization=False)
    with pytest.raises(ValueError, match="selected_adapters"):
        sm.save_pretrained(tmp_path / "b", selected_adapters=["other"])
    assert sm.save_pretrained(tmp_path / "b", is_main_process=False) is None and not (tmp_path / "b").exists()
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["fan_in_fan_out"] is False


@pytest.mark.parametrize("is_trainable", [False, True])
def test_training_mode_follows_the_peft_model_after_loading(tmp_path, is_trainable):
    sm = _make()
    sm.save_training_state(tmp_path)
    loaded = StructLoraModel.from_pretrained(tiny_bert(layers=3), tmp_path, is_trainable=is_trainable)
    dropout = loaded.peft_model.get_base_model().bert.embeddings.dropout
    assert loaded.training == loaded.peft_model.training == dropout.training
    assert all(p.requires_grad == is_trainable for p in loaded.gates.parameters())
    loaded.train()
    assert loaded.peft_model.training and dropout.training
    loaded.eval()
    assert not loaded.peft_model.training and not dropout.training
    assert get_structlora_model(tiny_bert(layers=3).train(), _make().structlora_config).training
    assert not get_structlora_model(tiny_bert(layers=3).eval(), _make().structlora_config).training


# ---------------------------------------------------------------------- README: the Trainer example as printed
_README_PRELUDE = """
import torch
from transformers import BertConfig, BertForSequenceClassification

def make_base():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=3,
        num_attention_heads=2, intermediate_size=32, max_position_embeddings=32, num_labels=2))

g = torch.Generator().manual_seed(0)
train_ds = [{"input_ids": torch.randint(0, 64, (8,), generator=g), "labels": int(i % 2)} for i in range(16)]
eval_ds = train_ds[:8]
"""


def _readme_blocks(heading: str) -> list[str]:
    """The python blocks of the README section under ``heading`` (up to the next ``## `` heading)."""
    import re

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return re.findall(r"```python\n(.*?)```", text[start:end if end != -1 else None], re.S)


def test_readme_trainer_example_runs_as_printed(tmp_path, monkeypatch, capsys):
    blocks = _readme_blocks("## Using StructLoRA on your own model")
    assert len(blocks) >= 2, "the README's Trainer example is missing"
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(_README_PRELUDE + blocks[1], "README-trainer-example", "exec"), scope)
    assert "eval_loss" in capsys.readouterr().out
    assert scope["trainer"].state.best_model_checkpoint is not None
    assert (tmp_path / "trained" / "structlora_state.safetensors").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert scope["model"].get_nb_trainable_parameters()[0] > 0
